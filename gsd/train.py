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

from gsd.cli import add_settings, exit_process, make_parser, parse_settings, run_main
from gsd.config import RUN_DEFAULTS
from gsd.errors import UsageError
from gsd.fileio import read_json_file
from gsd.distillation.run import run


def build_parser() -> argparse.ArgumentParser:
    """gsd.train's flags: every run setting's (gsd.config.SETTINGS), with the defaults shown."""
    p = make_parser("python -m gsd.train",
                    "Distil a pretrained EDM teacher into a one-step generator with SiD + an isometric "
                    "regulariser, then evaluate it against the 35-NFE Heun teacher.")
    for group in ("data", "runtime", "distill", "train", "hidden"):
        add_settings(p, group)
    # gsd.experiments hands its runs' resolved settings over as a JSON file, not rebuilt flags
    p.add_argument("--settings-json", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    explicit = parse_settings(build_parser(), argv)
    path = explicit.pop("settings_json", None)
    if path is not None:
        if explicit:
            raise UsageError(f"--settings-json takes no other flags, got {', '.join(sorted(explicit))}")
        settings = read_json_file(path, what=f"--settings-json {path}")
        if not isinstance(settings, dict):
            raise UsageError(f"--settings-json {path} does not hold a run's settings")
        run(settings)
        return 0
    run({**RUN_DEFAULTS, **explicit}, explicit=explicit)
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
