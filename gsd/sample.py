"""Draw (optionally loss-guided) samples from a teacher and write a PNG grid.

    python -m gsd.sample --dataset digits --num 64 --out samples.png
    python -m gsd.sample --guidance inpaint --method dsg --mask bottom --num 12 --out inpaint.png
    python -m gsd.sample --guidance class --target-class 3 --method dps --num 16 --out threes.png

Sampler: the stochastic ancestral sampler of `gsd.sampling.samplers` (DDPM posterior steps on EDM's
time steps), guided by DSG or plain loss guidance (DPS), see `gsd.sampling.samplers.guided_sample`.
Inpainting completes held-out real images (the split `gsd.evaluation.metrics` holds out); its grid
shows, per sample, the masked reference (hidden pixels grey), the result and the original.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

import torch

from gsd.cli import (
    add_cache_arg, add_teacher_args, add_data_args, add_guidance_args, add_runtime_args, make_parser, run_main,
)
from gsd.argtypes import bounded_int, count_int
from gsd.errors import UsageError
from gsd.util import check_image_output, check_memory, format_bytes
from gsd.data import load_dataset
from gsd.sampling.guidance import (MASK_NAMES, classifier_loss, guidance_classifier, heldout_indices, inpaint_mask,
                          inpainting_loss)
from gsd.evaluation.digits_classifier import digits_classifier
from gsd.evaluation.plots import check_grid_size, save_image_grid
from gsd.sampling.samplers import guided_sample, latents_for_seeds, MAX_SAMPLER_STEPS
from gsd.teachers.recipes import get_teacher
from gsd.util import resolve_device

# Sampling keeps a few float32 copies of the whole set at once (latents, the current x,
# the denoised estimate); guidance adds gradients of the same size.
SAMPLER_COPIES = 3
MAX_SCALE = 1024  # PNG pixel upscaling; the grid size check bounds scale * grid further

__all__ = ["build_parser", "main"]


def build_parser():
    p = make_parser("python -m gsd.sample",
                    "Sample a teacher with the stochastic ancestral sampler, optionally with loss guidance "
                    "(DSG or DPS), and write a PNG grid.")
    add_data_args(p)
    add_runtime_args(p)
    for action in p._actions:  # --out is the PNG file here
        if action.dest == "out":
            action.metavar = "PNG"
            action.help = "output PNG grid (required)"
    add_teacher_args(p)
    add_cache_arg(p)
    p.add_argument("--num", type=count_int, default=16, help="number of samples")
    p.add_argument("--steps", type=bounded_int(1, MAX_SAMPLER_STEPS, "more steps than any sampler takes"),
                   default=30, help=f"sampler steps (= network evaluations), at most {MAX_SAMPLER_STEPS}")
    add_guidance_args(p)
    p.add_argument("--scale", type=bounded_int(1, MAX_SCALE), default=4, help="pixel upscaling of the PNG")
    return p


def _validate_out(args) -> None:
    """Checks that need no data set: before anything is loaded."""
    if args.out is None:
        raise UsageError("--out PNG is required")
    check_image_output(args.out, "--out", suffixes=(".png",))
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(args.out)))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder} does not exist")


def _validate(args, dataset) -> None:
    if len(dataset.sample_shape) != 3:
        raise UsageError(f"--dataset {dataset.name} is not an image data set; gsd.sample writes image grids")
    if args.target_class is not None:
        if args.guidance != "class":
            raise UsageError("--target-class needs --guidance class")
        if not 0 <= args.target_class < dataset.num_classes:
            raise UsageError(f"--target-class {args.target_class} is out of range [0, {dataset.num_classes})")
    if args.mask is not None and args.guidance != "inpaint":
        raise UsageError("--mask needs --guidance inpaint")
    if args.guidance == "class" and dataset.name != "digits":
        raise UsageError("--guidance class needs a classifier; one exists for --dataset digits only")
    if args.guidance == "inpaint" and args.num > len(dataset) // 5:
        raise UsageError(f"--num {args.num} exceeds the {len(dataset) // 5} held-out images to inpaint")
    one_copy = 4 * args.num * math.prod(dataset.sample_shape)  # float32
    check_memory(SAMPLER_COPIES * one_copy,
                 f"sampling --num {args.num} samples of shape {tuple(dataset.sample_shape)} "
                 f"({format_bytes(one_copy)} per copy, {SAMPLER_COPIES} copies)", "lower --num")
    if args.guidance == "inpaint":  # reference, result and original per sample
        check_grid_size(3 * args.num, dataset.sample_shape, nrow=3 * _inpaint_cols(args.num), scale=args.scale,
                        what=f"the grid of --num {args.num} inpaintings at --scale {args.scale}")
    else:
        check_grid_size(args.num, dataset.sample_shape, scale=args.scale,
                        what=f"the grid of --num {args.num} samples at --scale {args.scale}")


def _inpaint_cols(n: int) -> int:
    return max(1, min(n, round(math.sqrt(n / 3)) or 1))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate_out(args)
    dataset = load_dataset(args.dataset, data_root=args.data_root, resolution=args.resolution,
                           download=args.download, shapes_kinds=args.shapes_kinds)
    _validate(args, dataset)

    device = resolve_device(args.device)
    teacher = get_teacher(dataset, teacher_path=args.teacher, cache_dir=args.cache_dir, device=device,
                          trust_pickle=args.trust_pickle, conditional=args.conditional)
    n = args.num
    seeds = [args.seed * 1_000_003 + i for i in range(n)]
    latents = latents_for_seeds(seeds, dataset.sample_shape, device=device)
    method = "none" if args.guidance == "none" else args.method
    step_size = args.step_size if args.step_size is not None else (0.5 if args.guidance == "inpaint" else 2.0)
    loss = None
    if args.guidance == "inpaint":
        held = heldout_indices(len(dataset))
        pick = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(args.seed))[:n]]
        ref = dataset.data[pick].to(device)
        names = [args.mask] * n if args.mask else [MASK_NAMES[i % len(MASK_NAMES)] for i in range(n)]
        masks = torch.stack([inpaint_mask(m, dataset.sample_shape) for m in names]).to(device)
        loss = inpainting_loss(ref, masks)
    elif args.guidance == "class":
        clf, _ = guidance_classifier(dataset, cache_dir=args.cache_dir, device=device)
        targets = (torch.full((n,), args.target_class, dtype=torch.long) if args.target_class is not None
                   else torch.arange(n) % dataset.num_classes)
        loss = classifier_loss(clf, targets)
    x = guided_sample(teacher, latents, loss, method=method, guidance_rate=args.guidance_rate,
                      step_size=step_size, num_steps=args.steps, seeds=seeds).clamp(-1, 1).cpu()

    out = os.path.expanduser(args.out)
    setting = {"none": "", "dsg": f" rate {args.guidance_rate:g}", "dps": f" step {step_size:g}"}[method]
    if args.guidance == "inpaint":
        m = masks.cpu()
        ref = ref.cpu()
        obs = ((x - ref).square() * m).flatten(1).sum(1) / m.flatten(1).sum(1)
        masked = ref * m  # hidden pixels 0 = grey
        tiles = torch.stack([masked, x, ref], dim=1).flatten(0, 1)
        save_image_grid(tiles, out, nrow=3 * _inpaint_cols(n), scale=args.scale)
        print(f"inpaint ({method}{setting}, {args.steps} steps): MSE on the observed region "
              f"{obs.mean().item():.4f} over {n} held-out images")
    else:
        save_image_grid(x, out, scale=args.scale)
        if args.guidance == "class":
            evaluator, _ = digits_classifier(dataset, cache_dir=args.cache_dir, device=device)
            with torch.no_grad():
                pred = evaluator(x.to(device)).argmax(1).cpu()
            print(f"class ({method}{setting}, {args.steps} steps): {(pred == targets).float().mean().item():.3f} "
                  f"of {n} samples labelled as their target by the evaluation classifier")
    print(f"grid: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
