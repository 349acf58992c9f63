"""Teacher training (docs/definitions.md §3.1 EDM loss) and the default-teacher cache.

`get_teacher` is what the commands call: an explicit checkpoint (through
`gsd.teachers.loading.load_teacher`), or a cached one keyed by a hash of (network config, training
recipe, seed, data), trained on a miss. `python -m gsd.teacher` is its command line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

from gsd.data import Dataset
from gsd.errors import UsageError
from gsd.models.networks import EDMPrecond, build_denoiser, default_config
from gsd.models.checkpoint import load_denoiser, save_denoiser
from gsd.progress import progress_bar
from gsd.teachers.loading import check_teacher_fits, load_teacher
from gsd.util import cache_dir as default_cache_dir, resolve_device

__all__ = ["default_teacher_recipe", "edm_loss", "train_teacher", "get_teacher", "teacher_cache_path", "P_MEAN",
           "P_STD", "CACHE_VERSION", "RECIPES", "full_recipe", "train_and_save"]

P_MEAN, P_STD = -1.2, 1.2
CACHE_VERSION = 1  # bump when training changes in a way the cache key does not capture

# iters/batch/lr per data set; ema = EMA half-life in images (None: 5% of all images);
# xflip: random horizontal flips (natural images only).
RECIPES = {
    "digits": dict(iters=2500, batch=64, lr=2e-3, ema_halflife_images=None, xflip=False),
    "gmm": dict(iters=3000, batch=256, lr=1e-3, ema_halflife_images=None, xflip=False),
    # shapes: a few minutes on a 2-core CPU at 16x16 (issue 25's budget for a whole default run)
    "shapes": dict(iters=2000, batch=32, lr=2e-3, ema_halflife_images=None, xflip=False),
    "cifar10": dict(iters=20000, batch=128, lr=5e-4, ema_halflife_images=None, xflip=True),
    "folder": dict(iters=20000, batch=64, lr=5e-4, ema_halflife_images=None, xflip=True),
}


def default_teacher_recipe(name: str) -> dict:
    """Default training recipe of a data set's teacher: dict(iters, batch, lr, ...)."""
    if name not in RECIPES:
        raise UsageError(f"no teacher recipe for dataset {name!r} (known: {', '.join(RECIPES)})")
    return dict(RECIPES[name])


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


def _initial_network(dataset: Dataset, config: dict, seed: int, lr: float, iters: int, batch: int) -> EDMPrecond:
    """The freshly initialised network of a teacher recipe, checked against the data set."""
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
    if net.label_dim > 0 and dataset.labels is None:
        raise UsageError(f"a class-conditional teacher needs labels, dataset {dataset.name} has none")
    if net.label_dim > 0 and net.label_dim != dataset.num_classes:
        raise UsageError(f"network has {net.label_dim} classes, dataset {dataset.name} has {dataset.num_classes}")
    return net


class _Batches:
    """Training batches: fresh mixture samples for gmm, else rows drawn with replacement (with
    an optional horizontal flip), from one CPU generator."""

    def __init__(self, dataset: Dataset, device, conditional: bool, seed: int, xflip: bool):
        self.dataset, self.device, self.conditional, self.xflip = dataset, device, conditional, xflip
        self.fresh = dataset.mixture is not None
        self.data = None if self.fresh else dataset.data.to(device)
        self.labels = None if (self.fresh or not conditional) else dataset.labels.to(device)
        if not self.fresh and (self.data is None or self.data.shape[0] == 0):
            raise UsageError(f"dataset {dataset.name} is empty")
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, batch: int):
        if self.fresh:
            y, ids = self.dataset.mixture.sample(batch, generator=self.gen)
            return y.to(self.device), (ids.to(self.device) if self.conditional else None)
        idx = torch.randint(0, self.data.shape[0], (batch,), generator=self.gen).to(self.device)
        y = self.data[idx]
        lab = self.labels[idx] if self.labels is not None else None
        if self.xflip and y.ndim == 4:
            flip = (torch.rand(batch, generator=self.gen) < 0.5).to(self.device)
            y = torch.where(flip[:, None, None, None], y.flip(3), y)
        return y, lab


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def train_teacher(dataset: Dataset, config: dict | None = None, *, iters: int, batch: int, lr: float,
                  device="cpu", seed: int = 0, ema_halflife_images: float | None = None, progress: bool = True,
                  xflip: bool = False, warmup_iters: int | None = None, log_every: int = 50) -> EDMPrecond:
    """Train an EDM denoiser on `dataset`; returns the EMA network (eval mode, on `device`).

    config: a `gsd.models.networks` config (default: `default_config(dataset.name, dataset.sample_shape, 0)`,
    unconditional). A conditional config (label_dim > 0) trains on the data set's labels.
    gmm data sets with a mixture draw fresh samples every step. EMA half-life in images,
    default 5% of all training images, ramped up as min(half-life, 0.1 * images so far).
    The returned network has `train_history`: [(iteration, mean loss over the last window)].
    """
    device = resolve_device(device)
    if config is None:
        config = default_config(dataset.name, dataset.sample_shape, 0)
    net = _initial_network(dataset, config, seed, lr, iters, batch).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    batches = _Batches(dataset, device, net.label_dim > 0, seed, xflip)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)

    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = warmup_iters if warmup_iters is not None else min(200, max(iters // 10, 1))
    halflife = ema_halflife_images if ema_halflife_images is not None else 0.05 * (iters * batch)
    history, window = [], []
    bar = progress_bar(total=iters, desc=f"teacher {dataset.name}", enabled=progress, leave=False, file=sys.stderr)
    for it in range(iters):
        y, lab = batches.next(batch)
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(it, iters, warmup)
        loss = edm_loss(net, y, lab, generator=dev_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
        opt.step()
        # EMA with a half-life in images, ramped up early in training
        hl = min(halflife, 0.1 * ((it + 1) * batch)) if halflife > 0 else 0.0
        _ema_update(ema, net, 0.5 ** (batch / hl) if hl > 0 else 0.0)
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


def full_recipe(name: str, recipe: dict | None) -> dict:
    full = default_teacher_recipe(name) if name in RECIPES else dict(
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


def train_and_save(dataset, config, recipe, seed, device, progress, path) -> EDMPrecond:
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
                trust_pickle: bool = False, conditional: bool = False) -> EDMPrecond:
    """The teacher for `dataset` (eval mode, on `device`).

    teacher_path: `gsd.teachers.loading.load_teacher` (gsd .safetensors, diffusers folder, EDM .pkl with
    trust_pickle; the fit check on the data set; UsageError otherwise). Else the
    cache file for (config, recipe, seed, data) under cache_dir / $GSD_CACHE / ~/.cache/gsd,
    trained and saved (atomically) when missing. `recipe` overrides the data set's default
    recipe key by key; `config` the default network (unconditional unless `conditional`: then
    it takes the data set's class labels).
    """
    dev = resolve_device(device)
    if teacher_path is not None:
        return load_teacher(teacher_path, dataset=dataset, device=dev, trust_pickle=trust_pickle)
    if conditional and (dataset.labels is None or not dataset.num_classes):
        raise UsageError(f"--conditional: --dataset {dataset.name} has no class labels")
    if config is None:
        config = default_config(dataset.name, dataset.sample_shape, dataset.num_classes if conditional else 0)
    recipe = full_recipe(dataset.name, recipe)
    path = teacher_cache_path(dataset, config, recipe, seed, cache_dir)
    if os.path.exists(path):
        try:
            net = load_denoiser(path, device=dev)
            check_teacher_fits(net, dataset, path)
            return net
        except UsageError as exc:
            print(f"cached teacher unusable ({exc}); retraining", file=sys.stderr, flush=True)
    print(f"no cached {dataset.name} teacher: training one ({recipe['iters']} iters, batch {recipe['batch']}) "
          f"-> {path}", file=sys.stderr, flush=True)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create teacher cache folder {os.path.dirname(path)}: {exc.strerror}") from None
    net = train_and_save(dataset, config, recipe, seed, dev, progress, path)
    return net.to(dev).eval()
