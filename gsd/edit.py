"""`python -m gsd.edit RUN_DIR`: latent editing with the one-step generator G(z).

    python -m gsd.edit runs/digits-20250101-120000                 # all target classes
    python -m gsd.edit RUN --target-class 3 --alphas 0.1 0.2 0.4 --num 4000

Writes into --out (default RUN_DIR):

- `interp.png`: slerp interpolation strips between pairs of latents (one row per pair,
  t = 0 ... 1 left to right);
- `edit_class{c}.png`: attribute edits towards class c (rows: source samples, columns:
  increasing alpha, the first column is the unedited sample);
- `edit.json`: the figures of merit below (also printed).

Method (InterFaceGAN-style). The latent is z = sigma_init * eps with eps ~ N(0, I) of the
data's shape; it is flattened to a vector of D numbers for the linear model. `num` samples
G(z) are labelled by a classifier (digits: the cached digits CNN of gsd.evaluation.metrics; gmm: the
nearest mixture mode), a one-vs-rest logistic regression on z is fitted per target class,
and n_c = w_c / ||w_c|| is its unit normal, pointing towards the class. An edit is

    z' = z + alpha * R * n_c,      R = sigma_init * sqrt(D)  (the typical latent norm E||z||),

so alpha is the step as a fraction of the typical latent norm (alpha = 1/sqrt(D) is one
standard deviation of z along n_c; for digits, D = 64: alpha = 0.125). Edits are linear
(not re-projected onto the latent sphere).

Figures of merit, on held-out source latents (seeds disjoint from the fitting set):

- edit success rate at alpha: among sources whose label is not c, the fraction whose
  edited sample is labelled c; averaged over the target classes;
- path smoothness (PPL-style): along z + a R n_c, a = 0, h, ..., max(alphas), the squared
  distance of classifier features between consecutive points divided by h^2 (h in alpha
  units), percentile-filtered (keep 1%..99%) like PPL, then averaged; the same along
  random unit directions as a reference. Feature network: the digits CNN's penultimate
  layer (`gsd.evaluation.digits_classifier.DIGITS_FEATURE_NAME`), raw coordinates for gmm.

Library (gsd.evaluation.editing): `edit_metrics(run_dir, ...) -> dict` (no files
written), `load_generator`, `slerp`, `fit_direction`, `find_directions`, `filtered_mean`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from gsd.fileio import write_json_atomic
from gsd import runs
from gsd.evaluation.editing import ALPHA_WHY, DEFAULT_ALPHAS, DEFAULT_NUM, MAX_ALPHA, edit_metrics, write_figures
from gsd.cli import add_runtime_args, make_parser, run_main
from gsd.argtypes import bounded_float, count_int
from gsd.errors import UsageError

__all__ = ["build_parser", "main"]

# --------------------------------------------------------------------------- CLI

def build_parser():
    p = make_parser("python -m gsd.edit",
                    "Latent editing with a run's one-step generator: slerp strips, class directions "
                    "(linear boundaries on z), edit grids, edit success rate and path smoothness.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a gsd.train run directory")
    p.add_argument("--num", type=count_int, default=DEFAULT_NUM,
                   help="labelled samples G(z) used to fit the class boundaries")
    p.add_argument("--num-edit", type=count_int, default=256, help="held-out source latents that are edited")
    p.add_argument("--alphas", type=bounded_float(0, MAX_ALPHA, ALPHA_WHY), nargs="+", default=list(DEFAULT_ALPHAS),
                   help="edit steps, as fractions of the typical latent norm sigma_init*sqrt(D)")
    p.add_argument("--path-steps", type=count_int, default=8,
                   help="segments of each edit path for the smoothness measure")
    p.add_argument("--target-class", type=int, default=None,
                   help="edit towards this class only (None: every class)")
    add_runtime_args(p)
    for action in p._actions:
        if action.dest == "out":
            action.help = "where the PNGs and edit.json go (default: RUN_DIR)"
        if action.dest == "seed":
            action.help = "seed of the latents (fitting, sources, strips)"
    return p


def _format(result: dict) -> str:
    lines = [f"latent editing of {result['run_dir']} (step {result['checkpoint_step']}, "
             f"lambda_irl {result['lambda_irl']}), labels: {result['labeller']}"]
    lines.append(f"boundaries fitted on {result['num']} samples; classes "
                 f"{sorted(int(k) for k, r in result['per_class'].items())}"
                 + (f"; skipped {sorted(int(k) for k in result['skipped_classes'])}"
                    if result["skipped_classes"] else ""))
    lines.append("alpha (fraction of latent norm " + f"{result['latent_norm']:.3g})  edit success rate")
    for a in result["alphas"]:
        v = result["success_rate"][repr(a)]
        lines.append(f"  {a:<10g}  {'n/a' if v is None else f'{v:.3f}'}")
    ps = result["path_smoothness"]
    lines.append(f"path smoothness ({result['feature']}; step {result['path_step']:.4g}): "
                 f"{'n/a' if ps is None else f'{ps:.4g}'}  (random directions: "
                 f"{result['path_smoothness_random']:.4g})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    out_dir = Path(args.out) if args.out else run_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    runs.check_out_path(out_dir)  # /proc, under a file, read-only: before minutes of fitting
    targets = None if args.target_class is None else [args.target_class]
    result = edit_metrics(run_dir, num=args.num, alphas=args.alphas, seed=args.seed, device=args.device,
                          target_classes=targets, num_edit=args.num_edit, path_steps=args.path_steps,
                          return_state=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: cannot create it ({exc.strerror})") from None
    files = write_figures(result, out_dir, seed=args.seed)
    result.pop("_state")
    result["files"] = files
    write_json_atomic(out_dir / "edit.json", result)
    print(_format(result))
    print(f"wrote {', '.join(files + ['edit.json'])} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
