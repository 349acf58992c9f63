"""Teacher training (docs/definitions.md §3.1 EDM loss) and the teacher cache.

    python -m gsd.teacher --dataset digits            # train (or find) the cached teacher
    python -m gsd.teacher --dataset gmm --out t.safetensors --iters 2000

`get_teacher` is what the other commands call: an explicit checkpoint, or a cached one
keyed by a hash of (network config, training recipe, seed, data), trained on a miss.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from typing import Sequence

import torch

from gsd.cli import (UsageError, add_data_args, add_runtime_args, check_image_output, check_memory,
                     check_output_file, count_int, make_parser, nonnegative_float, positive_float, run_main)
from gsd.data import Dataset, load_dataset
from gsd.networks import (EDMPrecond, build_denoiser, default_config, load_denoiser, read_denoiser_metadata,
                          save_denoiser)
from gsd.plots import check_grid_size, grid_layout, save_image_grid  # noqa: F401  (re-exported)
from gsd.progress import progress_bar
from gsd.util import cache_dir as default_cache_dir, resolve_device  # noqa: F401  (re-exported)

__all__ = ["default_teacher_recipe", "edm_loss", "train_teacher", "get_teacher", "teacher_cache_path",
           "default_cache_dir", "resolve_device", "save_image_grid", "grid_layout", "check_grid_size", "main"]

P_MEAN, P_STD = -1.2, 1.2
CACHE_VERSION = 1  # bump when training changes in a way the cache key does not capture

# iters/batch/lr per data set; ema = EMA half-life in images (None: 5% of all images);
# xflip: random horizontal flips (natural images only).
_RECIPES = {
    "digits": dict(iters=2500, batch=64, lr=2e-3, ema_halflife_images=None, xflip=False),
    "gmm": dict(iters=3000, batch=256, lr=1e-3, ema_halflife_images=None, xflip=False),
    "cifar10": dict(iters=20000, batch=128, lr=5e-4, ema_halflife_images=None, xflip=True),
    "folder": dict(iters=20000, batch=64, lr=5e-4, ema_halflife_images=None, xflip=True),
}


def default_teacher_recipe(name: str) -> dict:
    """Default training recipe of a data set's teacher: dict(iters, batch, lr, ...)."""
    if name not in _RECIPES:
        raise UsageError(f"no teacher recipe for dataset {name!r} (known: {', '.join(_RECIPES)})")
    return dict(_RECIPES[name])


# ----------------------------------------------------------------------------------------
# Loss and training.

def edm_loss(net, y: torch.Tensor, labels=None, *, generator: torch.Generator | None = None,
             sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """EDM loss (docs/definitions.md §3.1): mean over the batch of lambda(sigma) ||D(y + sigma eps; sigma) - y||^2.

    ln sigma ~ N(-1.2, 1.2^2) unless `sigma` is given; eps ~ N(0, I) unless `noise` is.
    """
    n = y.shape[0]
    gen_device = generator.device if generator is not None else y.device
    if sigma is None:
        sigma = (torch.randn(n, generator=generator, device=gen_device) * P_STD + P_MEAN).exp().to(y.device)
    sigma = sigma.reshape(n).to(y.dtype)
    if noise is None:
        noise = torch.randn(y.shape, generator=generator, device=gen_device).to(y.device, y.dtype)
    sd = net.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    s = sigma.reshape(n, *([1] * (y.ndim - 1)))
    denoised = net(y + s * noise, sigma, labels)
    return (weight * (denoised - y).square().reshape(n, -1).sum(1)).mean()


def _lr_factor(it: int, iters: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% over the remaining iterations."""
    if it < warmup:
        return (it + 1) / warmup
    span = max(iters - warmup, 1)
    progress = min((it - warmup) / span, 1.0)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train_teacher(dataset: Dataset, config: dict | None = None, *, iters: int, batch: int, lr: float,
                  device="cpu", seed: int = 0, ema_halflife_images: float | None = None, progress: bool = True,
                  xflip: bool = False, warmup_iters: int | None = None, log_every: int = 50) -> EDMPrecond:
    """Train an EDM denoiser on `dataset`; returns the EMA network (eval mode, on `device`).

    config: a `gsd.networks` config (default: `default_config(dataset.name, dataset.sample_shape, 0)`,
    unconditional). A conditional config (label_dim > 0) trains on the data set's labels.
    gmm data sets with a mixture draw fresh samples every step. EMA half-life in images,
    default 5% of all training images, ramped up as min(half-life, 0.1 * images so far).
    The returned network has `train_history`: [(iteration, mean loss over the last window)].
    """
    device = resolve_device(device)
    if config is None:
        config = default_config(dataset.name, dataset.sample_shape, 0)
    if iters < 1 or batch < 1 or not lr > 0:
        raise UsageError(f"bad teacher recipe: iters={iters}, batch={batch}, lr={lr}")
    # Adam's first step is lr / (1 - beta1) = 10 lr, a float32 scalar: larger cannot even be applied
    if not 10 * lr <= torch.finfo(torch.float32).max:
        raise UsageError(f"teacher learning rate {lr:g} overflows float32 arithmetic in Adam; lower --lr")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_denoiser(config)
    if tuple(net.sample_shape) != tuple(dataset.sample_shape):
        raise UsageError(f"network config is for samples of shape {tuple(net.sample_shape)}, "
                         f"dataset {dataset.name} has {tuple(dataset.sample_shape)}")
    conditional = net.label_dim > 0
    if conditional and dataset.labels is None:
        raise UsageError(f"a class-conditional teacher needs labels, dataset {dataset.name} has none")
    if conditional and net.label_dim != dataset.num_classes:
        raise UsageError(f"network has {net.label_dim} classes, dataset {dataset.name} has {dataset.num_classes}")
    net = net.to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)

    fresh = dataset.mixture is not None
    data = None if fresh else dataset.data.to(device)
    labels = None if (fresh or not conditional) else dataset.labels.to(device)
    if not fresh and (data is None or data.shape[0] == 0):
        raise UsageError(f"dataset {dataset.name} is empty")
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)

    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = warmup_iters if warmup_iters is not None else min(200, max(iters // 10, 1))
    total_images = iters * batch
    halflife = ema_halflife_images if ema_halflife_images is not None else 0.05 * total_images
    history, window = [], []
    bar = progress_bar(total=iters, desc=f"teacher {dataset.name}", enabled=progress, leave=False, file=sys.stderr)
    for it in range(iters):
        if fresh:
            y, ids = dataset.mixture.sample(batch, generator=cpu_gen)
            y = y.to(device)
            lab = ids.to(device) if conditional else None
        else:
            idx = torch.randint(0, data.shape[0], (batch,), generator=cpu_gen).to(device)
            y = data[idx]
            lab = labels[idx] if labels is not None else None
            if xflip and y.ndim == 4:
                flip = (torch.rand(batch, generator=cpu_gen) < 0.5).to(device)
                y = torch.where(flip[:, None, None, None], y.flip(3), y)
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(it, iters, warmup)
        loss = edm_loss(net, y, lab, generator=dev_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
        opt.step()
        # EMA with a half-life in images, ramped up early in training.
        nimg = (it + 1) * batch
        hl = min(halflife, 0.1 * nimg) if halflife > 0 else 0.0
        beta = 0.5 ** (batch / hl) if hl > 0 else 0.0
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p.detach(), 1.0 - beta)
            for b_ema, b in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b)
        window.append(float(loss.detach()))
        if (it + 1) % log_every == 0 or it + 1 == iters:
            history.append((it + 1, sum(window) / len(window)))
            window = []
            bar.set_postfix(loss=f"{history[-1][1]:.4f}", refresh=False)
            if not math.isfinite(history[-1][1]):
                # zeroed gradients cannot bring a non-finite network back: stop now, not after all iters
                bar.close()
                raise UsageError(f"teacher training on {dataset.name} produced a non-finite loss by iteration "
                                 f"{it + 1} (lr {lr:g}); lower --lr")
        bar.update(1)
    bar.close()
    ema.train_history = history
    return ema


# ----------------------------------------------------------------------------------------
# Cache.

def _data_fingerprint(dataset: Dataset) -> str:
    if dataset.mixture is not None:
        return "mixture:" + hashlib.sha256(json.dumps(dataset.mixture.to_dict()).encode()).hexdigest()
    h = hashlib.blake2b(digest_size=16)
    data = dataset.data.detach().to("cpu").contiguous()
    h.update(str((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.numpy())
    if dataset.labels is not None:
        h.update(dataset.labels.to("cpu").contiguous().numpy())
    return h.hexdigest()


def _full_recipe(name: str, recipe: dict | None) -> dict:
    full = default_teacher_recipe(name) if name in _RECIPES else dict(
        iters=2000, batch=64, lr=5e-4, ema_halflife_images=None, xflip=False)
    for key, value in (recipe or {}).items():
        if value is not None:
            full[key] = value
    return full


def teacher_cache_path(dataset: Dataset, config: dict, recipe: dict, seed: int, cache_dir=None) -> str:
    """<cache>/teachers/<dataset>-<hash of config + recipe + seed + data>.safetensors"""
    key = json.dumps({"v": CACHE_VERSION, "config": config, "recipe": recipe, "seed": int(seed),
                      "dataset": dataset.name, "data": _data_fingerprint(dataset)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = os.path.expanduser(os.fspath(cache_dir)) if cache_dir is not None else default_cache_dir()
    return os.path.join(root, "teachers", f"{dataset.name}-{digest}.safetensors")


def check_teacher_matches(net: EDMPrecond, dataset: Dataset, path: str) -> None:
    shape = tuple(getattr(net, "sample_shape", ()))
    if shape != tuple(dataset.sample_shape):
        raise UsageError(f"teacher {path} is for samples of shape {shape}, but dataset {dataset.name} "
                         f"has shape {tuple(dataset.sample_shape)}")
    if net.label_dim and net.label_dim != dataset.num_classes:
        raise UsageError(f"teacher {path} is conditional on {net.label_dim} classes, but dataset "
                         f"{dataset.name} has {dataset.num_classes}")


def _train_and_save(dataset, config, recipe, seed, device, progress, path) -> EDMPrecond:
    start = time.perf_counter()
    net = train_teacher(dataset, config, iters=recipe["iters"], batch=recipe["batch"], lr=recipe["lr"],
                        device=device, seed=seed, ema_halflife_images=recipe.get("ema_halflife_images"),
                        progress=progress, xflip=bool(recipe.get("xflip", False)))
    seconds = time.perf_counter() - start
    final_loss = net.train_history[-1][1] if net.train_history else None
    save_denoiser(path, net, extra_metadata={
        "kind": "teacher", "dataset": dataset.name, "sample_shape": list(dataset.sample_shape),
        "recipe": recipe, "seed": seed, "train_seconds": round(seconds, 2), "final_loss": final_loss,
        "device": str(resolve_device(device))})
    net.train_seconds = seconds
    return net


def get_teacher(dataset: Dataset, *, teacher_path=None, cache_dir=None, device="cpu", seed: int = 0,
                progress: bool = True, config: dict | None = None, recipe: dict | None = None,
                trust_pickle: bool = False) -> EDMPrecond:
    """The teacher for `dataset` (eval mode, on `device`).

    teacher_path: load it (`gsd.import_teacher.load_teacher_any`: gsd .safetensors, diffusers
    folder, EDM .pkl with trust_pickle) and check it fits the data set (UsageError otherwise). Else the
    cache file for (config, recipe, seed, data) under cache_dir / $GSD_CACHE / ~/.cache/gsd,
    trained and saved (atomically) when missing. `recipe` overrides the data set's default
    recipe key by key; `config` the default (unconditional) network.
    """
    dev = resolve_device(device)
    if teacher_path is not None:
        from gsd.import_teacher import check_teacher_path, load_teacher_any

        path = os.fspath(teacher_path)
        check_teacher_path(path, trust_pickle=trust_pickle)
        net = load_teacher_any(path, device=dev, trust_pickle=trust_pickle)
        check_teacher_matches(net, dataset, path)
        return net
    if config is None:
        config = default_config(dataset.name, dataset.sample_shape, 0)
    recipe = _full_recipe(dataset.name, recipe)
    path = teacher_cache_path(dataset, config, recipe, seed, cache_dir)
    if os.path.exists(path):
        try:
            net = load_denoiser(path, device=dev)
            check_teacher_matches(net, dataset, path)
            return net
        except UsageError as exc:
            print(f"cached teacher unusable ({exc}); retraining", file=sys.stderr, flush=True)
    print(f"no cached {dataset.name} teacher: training one ({recipe['iters']} iters, batch {recipe['batch']}) "
          f"-> {path}", file=sys.stderr, flush=True)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create teacher cache folder {os.path.dirname(path)}: {exc.strerror}") from None
    net = _train_and_save(dataset, config, recipe, seed, dev, progress, path)
    return net.to(dev).eval()


# ----------------------------------------------------------------------------------------
# CLI.

def _recipe_help() -> str:
    return "; ".join(f"{k}: {v['iters']} iters, batch {v['batch']}, lr {v['lr']:g}" for k, v in _RECIPES.items())


def build_parser():
    p = make_parser("python -m gsd.teacher",
                    "Train an EDM teacher denoiser on a data set (or find it in the teacher cache).")
    add_data_args(p)
    add_runtime_args(p)
    for action in p._actions:  # --out is a file here (a folder also works)
        if action.dest == "out":
            action.metavar = "PATH"
            action.help = ("output .safetensors file (an existing folder gets <dataset>-<hash>.safetensors); "
                           "default: the teacher cache")
    p.add_argument("--iters", type=count_int, default=None,
                   help=f"training iterations (None = per dataset; {_recipe_help()})")
    p.add_argument("--batch", type=count_int, default=None, help="batch size (None = per dataset)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak Adam learning rate (None = per dataset)")
    p.add_argument("--ema-halflife", type=nonnegative_float, default=None,
                   help="EMA half-life of the teacher, in images (None = 5%% of all training images; 0 = no EMA)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="teacher cache folder (None = $GSD_CACHE or ~/.cache/gsd)")
    p.add_argument("--grid", default=None, metavar="PNG",
                   help="also write a grid of 64 Heun-sampled images (image data sets) to this PNG")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def check_teacher_out(path: str) -> str:
    """The file `--out` names (a folder gets the cache file name later); refuses, in one line,
    a place no file can be written and an existing file that is not a gsd denoiser file:
    `--out` replaces an old teacher, never anything else."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return path
    check_output_file(path, "--out")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder} does not exist")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise UsageError(f"--out {path} exists and is not a regular file; refusing to replace it")
        try:
            read_denoiser_metadata(path)
        except UsageError:
            raise UsageError(f"--out {path} exists and is not a gsd teacher file; refusing to overwrite it "
                             f"(choose another name or remove it)") from None
    return path


def _check_batch_memory(dataset: Dataset, batch: int) -> None:
    # A lower bound: the batch, its noise and the noisy input, in float32. The network's
    # activations come on top, so a batch refused here could never have run.
    numel = math.prod(dataset.sample_shape)
    check_memory(3 * 4 * batch * numel, f"a training batch of {batch} samples of shape "
                 f"{tuple(dataset.sample_shape)}", "lower --batch")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # every flag is checked before the data set is loaded and before training starts
    out = check_teacher_out(args.out) if args.out is not None else None
    if args.grid is not None:
        check_image_output(args.grid, "--grid")
        if args.dataset == "gmm":
            raise UsageError("--grid needs an image data set (digits, cifar10, folder), not gmm")
    if args.cache_dir is not None and os.path.exists(os.path.expanduser(args.cache_dir)) \
            and not os.path.isdir(os.path.expanduser(args.cache_dir)):
        raise UsageError(f"--cache-dir {args.cache_dir} is a file, not a folder")
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, data_root=args.data_root, resolution=args.resolution,
                           download=args.download)
    if args.grid is not None and len(dataset.sample_shape) != 3:
        raise UsageError("--grid needs an image data set")
    recipe = _full_recipe(dataset.name, dict(iters=args.iters, batch=args.batch, lr=args.lr,
                                             ema_halflife_images=args.ema_halflife))
    _check_batch_memory(dataset, recipe["batch"])
    config = default_config(dataset.name, dataset.sample_shape, 0)
    if out is None:
        path = teacher_cache_path(dataset, config, recipe, args.seed, args.cache_dir)
        existed = os.path.exists(path)
        net = get_teacher(dataset, cache_dir=args.cache_dir, device=device, seed=args.seed,
                          progress=not args.no_progress, config=config, recipe=recipe)
        print(f"teacher ({'cached' if existed else 'trained'}): {path}")
    else:
        path = out
        if os.path.isdir(path):
            path = check_teacher_out(os.path.join(
                path, os.path.basename(teacher_cache_path(dataset, config, recipe, args.seed, "."))))
        net = _train_and_save(dataset, config, recipe, args.seed, device, not args.no_progress, path)
        print(f"teacher (trained in {net.train_seconds:.1f} s): {path}")
    if args.grid is not None:
        from gsd.samplers import heun_sample, latents_for_seeds

        latents = latents_for_seeds(range(64), dataset.sample_shape, device=device)
        samples = heun_sample(net, latents)
        print(f"sample grid: {save_image_grid(samples, args.grid, scale=4)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
