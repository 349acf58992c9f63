"""`python -m gsd.experiments`: the paper's tables on the embedded data, end to end.

    python -m gsd.experiments                       # digits, default size (~15-25 min on 2 CPU cores)
    python -m gsd.experiments --scale 8 --device cuda
    python -m gsd.experiments --root exp2 --seed 1

Trains (or reuses) four distillation runs under `--root` from one teacher and one seed:

- `full`:      GSD, SiD + isometric loss (--lambda-irl F --irl-neighbours K --irl-radius R)
- `no-irl`:    the same command with --lambda-irl 0 (same anchor/neighbour batch, no regulariser)
- `plain-sid`: plain SiD (--lambda-irl 0 --irl-neighbours 0: i.i.d. batch)
- `no-sid`:    without the distillation loss (--lambda-sid 0 --lambda-irl-raw 1: the scale-free
               weight is relative to the SiD gradient, which is off here)

evaluates them with `gsd.evaluate` (same latents for every run and for the teacher) and
writes `ROOT/results.md` with

- Table 1: MSA (the teacher's 35-NFE Heun sampler) vs GSD one-step: FD, PPL, inference
  time, NFE;
- Table 2: the loss ablation: FD, PPL, isometry defect, training time;
- the DSG guidance table (`gsd.evaluation.guidance`) and latent-editing numbers (`gsd.edit`) when those
  modules are importable, otherwise a line saying they are unavailable;
- seeds, settings and the machine (CPU model, cores, threads, torch version, device),

plus PNGs in the same folder: loss curves (log.jsonl), FD over training (the kept
checkpoints), latency bars and sample grids. A run directory is reused when its config
matches (its name carries a hash of the training settings); an unfinished one is resumed.
Nothing is tuned toward the paper: the text states what came out, including when the
isometric loss did not lower PPL or the isometry defect.

The work is gsd.study's (`run_experiments`); this module is its parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch

from gsd import runs
from gsd.argtypes import positive_float, positive_int, seed_int
from gsd.cli import (
    add_cache_arg, add_device_arg, add_fid_weights_arg, add_num_samples_arg, add_setting, add_teacher_args, make_parser,
    run_main,
)
from gsd.config import SETTING
from gsd.study import run_experiments

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m gsd.experiments",
                    "Train (or reuse) the full / no-IRL / no-SiD distillation runs, evaluate them against the "
                    "35-NFE Heun teacher and write results.md with Table 1, Table 2 and figures.")
    p.add_argument("--root", default="experiments", metavar="DIR", help="folder of the runs and of results.md")
    p.add_argument("--dataset", choices=["digits", "gmm"], default="digits", help="embedded data set")
    p.add_argument("--scale", type=positive_float, default=1.0,
                   help="size factor: iterations x SCALE, batch x min(round(SCALE), 4), PPL pairs x SCALE "
                        "(use > 1 on a GPU)")
    p.add_argument("--iters", type=positive_int, default=None,
                   help="distillation iterations per run (default: %(default)s = gsd.train's default for the data set "
                        "x --scale)")
    # gsd.train's flags, one definition (the full-loss run takes them; the no-IRL and no-SiD runs
    # keep the neighbours and radius, plain SiD uses no neighbours, the no-SiD run --lambda-irl-raw 1)
    for name in ("lambda_irl", "irl_neighbours", "irl_radius"):
        add_setting(p, SETTING[name])
    add_teacher_args(p)
    p.add_argument("--seed", type=seed_int, default=0, help="random seed of training and evaluation")
    add_device_arg(p)
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="training runs in parallel, as subprocesses (default: %(default)s = 2 on a CPU with >= 2 cores, "
                        "else 1)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads of this process, split between parallel jobs (default: %(default)s = torch's "
                        "choice, the core count)")
    add_num_samples_arg(p)
    p.add_argument("--ppl-samples", type=positive_int, default=None, help="PPL latent pairs (default: %(default)s = 512 x --scale)")
    p.add_argument("--latency-repeats", type=positive_int, default=7, help="timed latency repeats (median)")
    add_fid_weights_arg(p)
    p.add_argument("--no-fused", action="store_true", help="train with the reference (eager) ops")
    p.add_argument("--no-extras", action="store_true", help="skip the guidance and editing sections")
    p.add_argument("--re-evaluate", action="store_true",
                   help="evaluate every run again even when its eval.json matches the settings")
    add_cache_arg(p)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    runs.check_out_path(args.root, "--root")  # a file, /proc, read-only: one line before any run starts
    if args.jobs is None:
        wants_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.jobs = 1 if (wants_gpu or args.tiny or (os.cpu_count() or 1) < 2) else 2
    run_experiments(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
