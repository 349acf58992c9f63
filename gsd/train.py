"""`python -m gsd.train`: distil a teacher into a one-step generator (SiD + IRL), evaluate it.

    python -m gsd.train --fused                 # digits, default teacher (trained + cached)
    python -m gsd.train --dataset gmm --lambda-irl 1
    python -m gsd.train --resume runs/digits-20250101-120000 --iters 2000
    torchrun --nproc_per_node=4 -m gsd.train --dataset cifar10 --batch 256   # 4 processes, DDP

Under torchrun (gsd.parallel) --batch is the global batch, split over the processes
(--batch-per-gpu, with gradient accumulation when smaller than batch / world); rank 0 alone
logs, checkpoints and evaluates; --resume needs the world size the run was started with.

Ops: --fused runs the fastest fused gsd_kernels backend for the device and stops (one line,
exit 2, nothing written) where none can serve it; --no-fused runs the reference ops. The
backend each op ran is recorded as "backends" in config.json and metrics.json.

Run directories: every setting and --out are checked before the data set or the teacher is
loaded. A run directory with no complete checkpoint (a crash or kill before the first one)
is started again by giving it as --out; --resume continues a run from its newest complete
checkpoint (falling back to an older kept one when the latest is incomplete). Ctrl-C
finishes the current iteration, saves it and exits 130 (a second Ctrl-C stops at once, then
the previous checkpoint stays the newest: a half-done iteration is never saved).

A run that goes wrong stops (one line, exit 2) after --max-bad-iters consecutive bad
iterations; see that flag's help for the rule.

Python API for experiments: `run(config) -> run_dir`, where config is a dict with the
flag names as keys (dashes -> underscores); missing keys take the defaults.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from gsd.cli import add_cache_arg, add_data_args, add_distill_args, add_runtime_args, make_parser, nonnegative_int, positive_int, run_main, exit_process
from gsd.config import (  # noqa: F401  (re-exported: gsd.train's names since the start)
    DATASET_DEFAULTS, DEFAULT_MAX_BAD_ITERS, EXPLODE_FACTOR, EXPLODE_WINDOW, RESUME_FREE, RUN_DEFAULTS, RUN_KEYS,
    TRAINING_KEYS, resolve_config,
)
from gsd.errors import TrainingStopped  # noqa: F401  (re-exported)
from gsd.training import run, summary_table  # noqa: F401  (the library behind this command; re-exported)

def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m gsd.train",
                    "Distil a pretrained EDM teacher into a one-step generator with SiD + an isometric "
                    "regulariser, then evaluate it against the 35-NFE Heun teacher.")
    add_data_args(p)
    add_runtime_args(p)
    add_distill_args(p)
    p.add_argument("--adam-betas", type=float, nargs=2, default=RUN_DEFAULTS["adam_betas"], metavar=("B1", "B2"),
                   help="Adam betas of generator and fake score (SiD uses 0 0.999)")
    p.add_argument("--lr-fake", type=float, default=RUN_DEFAULTS["lr_fake"],
                   help="learning rate of the fake score (default: --lr)")
    p.add_argument("--irl-bandwidth", type=float, default=RUN_DEFAULTS["irl_bandwidth"],
                   help="kernel bandwidth h of --irl-weighting local (default: from the latents)")
    p.add_argument("--batch-per-gpu", type=positive_int, default=RUN_DEFAULTS["batch_per_gpu"],
                   help="samples per process and micro-step under torchrun (default: --batch / world size); "
                        "--batch / (this x world size) gradient-accumulation steps, which must be whole")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=RUN_DEFAULTS["precision"],
                   help="autocast dtype of the network forwards (losses and optimiser stay fp32; fp16 uses a "
                        "gradient scaler)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator, fake score and teacher")
    p.add_argument("--grad-checkpoint", action="store_true", default=RUN_DEFAULTS["grad_checkpoint"],
                   help="gradient checkpointing: recompute the generator's and fake score's block activations "
                        "in the backward pass instead of storing them (less memory, one more forward of each block)")
    p.add_argument("--gen-loss-scale", type=float, default=RUN_DEFAULTS["gen_loss_scale"],
                   help="factor on the generator loss before Adam (SiD's lsg)")
    p.add_argument("--log-every", type=positive_int, default=RUN_DEFAULTS["log_every"],
                   help="iterations between log.jsonl records")
    p.add_argument("--max-bad-iters", type=nonnegative_int, default=RUN_DEFAULTS["max_bad_iters"], metavar="K",
                   help="stop the run (one line, exit 2, the last checkpoint kept) after K consecutive bad "
                        "iterations: a loss is non-finite, or one of the two steps dropped every sample (non-finite "
                        "generator samples or network outputs), or the loss has exploded (the median of "
                        f"|loss_fake| + |loss_gen| over the last {EXPLODE_WINDOW} iterations above "
                        f"{EXPLODE_FACTOR:g} x max(1, the first iteration's loss_fake, or loss_gen without SiD)); "
                        "0 never stops")
    p.add_argument("--ckpt-every", type=positive_int, default=RUN_DEFAULTS["ckpt_every"],
                   help="iterations between checkpoints (default per dataset)")
    p.add_argument("--keep-every", type=nonnegative_int, default=RUN_DEFAULTS["keep_every"],
                   help="keep every checkpoint whose step is a multiple of this (default 5x --ckpt-every; "
                        "0 keeps only the latest)")
    p.add_argument("--eval-samples", type=nonnegative_int, default=RUN_DEFAULTS["eval_samples"],
                   help="samples per Frechet distance / sliced Wasserstein (default: 1000 for digits, "
                        "4000 for gmm, 2000 otherwise; 0 skips the evaluation)")
    add_cache_arg(p)
    # testing / experiment knobs, not shown in --help
    p.add_argument("--exact-teacher", dest="exact_teacher", action="store_true",
                   default=RUN_DEFAULTS["exact_teacher"],
                   help=argparse.SUPPRESS)
    p.add_argument("--no-exact-teacher", dest="exact_teacher", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--latency-repeats", type=positive_int, default=RUN_DEFAULTS["latency_repeats"],
                   help=argparse.SUPPRESS)
    p.add_argument("--classifier-epochs", type=positive_int, default=RUN_DEFAULTS["classifier_epochs"],
                   help=argparse.SUPPRESS)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=RUN_DEFAULTS["progress"],
                   help=argparse.SUPPRESS)
    return p


def _explicit(argv: Sequence[str] | None) -> dict:
    """Only the flags given on the command line (for --resume comparisons)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    ns = p.parse_args(argv)
    return vars(ns)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    explicit = _explicit(argv)
    run(vars(args), explicit=explicit)
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
