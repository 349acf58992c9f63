"""`python -m gsd.evaluate RUN_DIR`: evaluate a distillation run (docs/definitions.md §3.6), write eval.json.

    python -m gsd.evaluate runs/digits-20250101-120000
    python -m gsd.evaluate RUN --fid-weights ~/pt_inception-2015-12-05-6726825d.pth --require-fid

Loads config.json, the run's teacher (teacher.safetensors) and the latest checkpoint (EMA
generator), then compares the one-step generator G with the teacher's 35-NFE Heun sampler
started from the same latents:

- Frechet distance in the run's feature space: the digits CNN's penultimate features for
  digits (labelled as such, not FID), raw coordinates for gmm;
- FID with pytorch-fid's Inception weights (`gsd.evaluation.fid`; for cifar10 and folder runs,
  downloaded into the torch hub cache when missing and online), computed as `python -m gsd.fid
  calc` scores image files: the one-step samples (gsd.generate's images of the evaluation seeds)
  as uint8, pytorch-fid's preprocessing, against --fid-ref REF.npz or the run's data rendered to
  uint8 the same way; `fid_protocol` names the samples, seeds, reference and the weights file's
  sha256. Without weights: `"fid": null` and `"fid_unavailable": "<reason>"`; never a made-up
  number, never another feature space under FID's name. --num-samples defaults to 50000 for
  cifar10 and folder runs (the field's protocol);
- PPL (`gsd.evaluation.ppl`), eps = 1e-4, 1%-99% filter, in a named feature space, for G and for the
  teacher's Heun map (a deterministic function of the same initial noise);
- KID with its standard error, precision / recall (k = 3) and a 95% bootstrap interval of FD,
  in the same feature space, with their noise floor (`noise_floor`: real vs real, or exact
  sampler vs truth for gmm) and a "within noise" label per G-vs-teacher difference;
- isometry defect (optimal-scale isometry loss) on held-out latents, and the local isometry
  defect (the same loss over anchors and their neighbours, fixed settings in `local_isometry`);
- latency at batch 64: one-step vs 35-NFE Heun, synchronised, warm-up excluded, median of
  interleaved repeats;
- gmm: sliced Wasserstein, MMD, mode coverage, NLL under the true mixture (and its gap to true
  samples) and mode-weight error.

The sections are gsd.evaluation.metrics' evaluation core, which gsd.train's end-of-run evaluation also
uses (same seeds, estimators and latency method).

Bad input (a folder that is not a run, missing files, a run written by another version,
--fid-weights that is not a file, --require-fid without weights): one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from gsd.cli import add_cache_arg, add_device_arg, add_fid_weights_arg, add_num_samples_arg, make_parser, run_main
from gsd.argtypes import MAX_COUNT, bounded_int, count_int, nonnegative_int, seed_int
from gsd.errors import UsageError
from gsd.evaluation.core import EVAL_NAME, evaluate_run, format_table
from gsd.seed_ranges import MAX_ISOMETRY_LATENTS, SEED_RANGE_WHY

__all__ = ["build_parser", "main"]


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m gsd.evaluate",
                    "Evaluate a distillation run: Frechet distance, FID (when Inception weights are on disk), "
                    "PPL, isometry defect, latency of the one-step generator vs the 35-NFE Heun teacher; "
                    "writes RUN_DIR/eval.json.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by python -m gsd.train")
    add_num_samples_arg(p)
    p.add_argument("--ppl-samples", type=bounded_int(0, MAX_COUNT), default=512,
                   help="latent pairs of the PPL estimate (0 skips PPL)")
    add_device_arg(p)
    p.add_argument("--seed", type=seed_int, default=0,
                   help="random seed of the latents (sample i uses seed*1e8 + i) and of the PPL draws")
    p.add_argument("--step", type=nonnegative_int, default=None, help="checkpoint step to evaluate (default: %(default)s = the latest)")
    add_fid_weights_arg(p)
    p.add_argument("--require-fid", action="store_true",
                   help="fail (exit 2) when no Inception weights are at hand instead of recording fid: null")
    p.add_argument("--fid-ref", default=None, metavar="REF.npz",
                   help="reference statistics of the FID (mu, sigma: python -m gsd.fid ref, or EDM's files) (default: "
                        "%(default)s = the run's data set, min(its size, --num-samples) images rendered to uint8)")
    p.add_argument("--latency-batch", type=count_int, default=64, help="batch size of the latency measurement")
    p.add_argument("--latency-repeats", type=count_int, default=7, help="timed repeats (median reported)")
    p.add_argument("--isometry-latents", type=bounded_int(2, MAX_ISOMETRY_LATENTS, SEED_RANGE_WHY),
                   default=512,
                   help="held-out latents of the isometry defect")
    p.add_argument("--factor-metrics", action=argparse.BooleanOptionalAction, default=None,
                   help="the factor metrics of a --dataset shapes run: factor-space PPL, local factor isometry, "
                        "factor fidelity, traversal purity (default: %(default)s = on for shapes runs; a run of "
                        "another data set is refused)")
    add_cache_arg(p)
    p.add_argument("--classifier-epochs", type=count_int, default=30, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.isometry_latents < 2:
        raise UsageError("--isometry-latents must be >= 2")
    result = evaluate_run(args.run_dir, device=args.device, step=args.step, num_samples=args.num_samples,
                          ppl_samples=args.ppl_samples, seed=args.seed, fid_weights=args.fid_weights,
                          require_fid=args.require_fid, latency_batch=args.latency_batch,
                          latency_repeats=args.latency_repeats, isometry_latents=args.isometry_latents,
                          cache_dir=args.cache_dir, classifier_epochs=args.classifier_epochs, progress=args.progress,
                          fid_ref=args.fid_ref, factor_metrics=args.factor_metrics)
    print(format_table(result))
    print(f"wrote {Path(args.run_dir) / EVAL_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
