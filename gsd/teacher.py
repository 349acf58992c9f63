"""`python -m gsd.teacher`: train an EDM teacher (or find it in the teacher cache).

    python -m gsd.teacher --dataset digits            # train (or find) the cached teacher
    python -m gsd.teacher --dataset gmm --out t.safetensors --iters 2000

The training and the cache are the library module gsd.teachers.recipes (`get_teacher`,
`train_teacher`); this module is the command line.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

from gsd.cli import add_cache_arg, add_data_args, add_runtime_args, make_parser, run_main
from gsd.argtypes import count_int, nonnegative_float, positive_float
from gsd.errors import UsageError
from gsd.util import check_image_output, check_memory, check_output_file
from gsd.data import Dataset, load_dataset
from gsd.models.networks import default_config
from gsd.models.checkpoint import read_denoiser_metadata
from gsd.evaluation.plots import save_image_grid
from gsd.sampling.samplers import heun_sample, latents_for_seeds
from gsd.teachers.recipes import RECIPES, full_recipe, get_teacher, teacher_cache_path, train_and_save
from gsd.util import resolve_device

__all__ = ["build_parser", "main", "check_teacher_out"]

# ----------------------------------------------------------------------------------------
# CLI.

def _recipe_help() -> str:
    return "; ".join(f"{k}: {v['iters']} iters, batch {v['batch']}, lr {v['lr']:g}" for k, v in RECIPES.items())


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
    add_cache_arg(p)
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
                           download=args.download, shapes_kinds=args.shapes_kinds)
    if args.conditional and not dataset.num_classes:
        raise UsageError(f"--conditional: --dataset {dataset.name} has no class labels")
    if args.grid is not None and len(dataset.sample_shape) != 3:
        raise UsageError("--grid needs an image data set")
    recipe = full_recipe(dataset.name, dict(iters=args.iters, batch=args.batch, lr=args.lr,
                                             ema_halflife_images=args.ema_halflife))
    _check_batch_memory(dataset, recipe["batch"])
    config = default_config(dataset.name, dataset.sample_shape, dataset.num_classes if args.conditional else 0)
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
        net = train_and_save(dataset, config, recipe, args.seed, device, not args.no_progress, path)
        print(f"teacher (trained in {net.train_seconds:.1f} s): {path}")
    if args.grid is not None:
        latents = latents_for_seeds(range(64), dataset.sample_shape, device=device)
        samples = heun_sample(net, latents)
        print(f"sample grid: {save_image_grid(samples, args.grid, scale=4)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
