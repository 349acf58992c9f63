"""`python -m gsd.export RUN_DIR --out G.safetensors`: a run's one-step generator as one file.

    python -m gsd.export runs/cifar10-sid --out G.safetensors            # the latest checkpoint's EMA
    python -m gsd.export runs/cifar10-sid --out G-10000.safetensors --step 10000

The file is a gsd safetensors network whose metadata says what it is (docs/definitions.md §3.9):
the architecture, sigma_init, label_dim, sample shape, value range [-1, 1], the checkpoint step
and the sha256 of the run's config.json. `gsd.load_generator(FILE)` and `python -m
gsd.generate FILE` read it back without running code from it, checking it as teacher files are
checked (header before allocation, finite weights, float32). The work is
`gsd.generator.export_generator`. Bad input (not a run, no complete checkpoint, an --out that
exists or cannot be written) is one line and exit 2, with nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from gsd.cli import make_parser, run_main
from gsd.argtypes import nonnegative_int
from gsd.errors import UsageError
from gsd.util import check_output_file
from gsd.generator import export_generator

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m gsd.export",
                    "Write a run's EMA one-step generator alone to a safetensors file, with its architecture, "
                    "sigma_init, labels, sample shape, value range and a digest of the run's config.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by python -m gsd.train")
    p.add_argument("--out", required=True, metavar="G.safetensors", help="the file to write")
    p.add_argument("--step", type=nonnegative_int, default=None,
                   help="checkpoint to export (default: %(default)s = the latest complete one)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = check_output_file(args.out, "--out")
    if not out.endswith(".safetensors"):
        raise UsageError(f"--out must name a .safetensors file, got {out!r}")
    if os.path.lexists(out):
        raise UsageError(f"--out {out} exists; gsd.export does not replace it (remove it or choose another)")
    meta = export_generator(args.run_dir, out, step=args.step)
    print(f"wrote {out}: the EMA generator of {args.run_dir} at step {meta['step']} ({meta['dataset']}, "
          f"{'x'.join(map(str, meta['sample_shape']))}, {meta['label_dim']} classes, sigma_init "
          f"{meta['sigma_init']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
