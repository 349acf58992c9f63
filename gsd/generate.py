"""`python -m gsd.generate SOURCE --seeds 0-49999 --out DIR`: a one-step generator's images by seed.

    python -m gsd.generate runs/cifar10-sid --seeds 0-49999 --subdirs --out samples/
    python -m gsd.generate G.safetensors --seeds 0-9999 --out samples.npz
    python -m gsd.generate sid-cifar10.pkl --trust-pickle --seeds 0-63 --grid grid.png
    torchrun --nproc_per_node=4 -m gsd.generate runs/cifar10-sid --seeds 0-49999 --out samples/

SOURCE is a run directory (its EMA generator; --raw for G itself, --step for another
checkpoint), a file written by python -m gsd.export, or an official SiD/SiDA snapshot pickle
(--trust-pickle; --sigma-init, default 2.5). Outputs (docs/definitions.md §3.9):

- a folder: `{seed:06d}.png` per seed (--subdirs: 1000 per subfolder) and gsd-generate.json;
- `X.npz`: uint8 NHWC `arr_0`, with the labels as `arr_1` for a class-conditional generator;
- `--grid X.png`: every image in one grid.

The image of a seed depends only on the seed, its label and the generator: not on --batch,
the number of processes, or an interruption (the network runs on aligned blocks of 16 seeds).
An interrupted folder continues with --resume, which keeps complete files only (each PNG is
written atomically). An existing non-empty --out is refused without --resume. Bad input (seed
list, class, paths, SOURCE) is one line and exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from gsd.cli import (
    add_device_arg, add_generator_args, add_label_args, exit_process, make_parser, run_main, seed_list,
)
from gsd.argtypes import count_int
from gsd.generation import check_outputs, generate_images

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m gsd.generate",
                    "Write a one-step generator's images by seed: PNG files in a folder, an npz (uint8 NHWC arr_0) "
                    "and/or a grid. A seed's image does not depend on --batch, the number of processes or an "
                    "interruption.")
    add_generator_args(p)
    p.add_argument("--seeds", type=seed_list, default=seed_list("0-63"), metavar="LIST",
                   help="seeds, as 0-49999 or 1,5,10-20 (default: 0-63)")
    p.add_argument("--out", default=None, metavar="DIR|X.npz",
                   help="a folder for {seed:06d}.png files, or an .npz file")
    p.add_argument("--subdirs", action="store_true", help="1000 PNGs per subfolder (000000/, 001000/, ...), as EDM")
    p.add_argument("--grid", default=None, metavar="X.png", help="also write every image in one grid")
    add_label_args(p)
    p.add_argument("--batch", type=count_int, default=256,
                   help="images per step (rounded up to whole blocks of 16 seeds; the images do not depend on it)")
    add_device_arg(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted generation in --out: complete files are kept, the missing ones "
                        "generated")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    outs = check_outputs(args.out, args.grid, subdirs=args.subdirs, resume=args.resume)
    labels = args.class_idx if args.class_idx is not None else args.labels
    res = generate_images(args.source, args.seeds, outs, labels=labels, batch=args.batch, device=args.device,
                          step=args.step, raw=args.raw, trust_pickle=args.trust_pickle, sigma_init=args.sigma_init,
                          progress=args.progress)
    if res["rank"] == 0:
        labels = "" if res["labels"] is None else f", labels {res['labels']}"
        done = []
        if outs.folder:
            skipped = f", {res['skipped']} already there" if res["skipped"] else ""
            done.append(f"{res['written']} PNG files in {outs.folder}{skipped}")
        done += [p for p in (outs.npz, outs.grid) if p]
        print(f"{res['seeds']} images of {'x'.join(map(str, res['image_shape']))} from {res['generator']['source']}"
              f"{labels}: {'; '.join(done)} ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
