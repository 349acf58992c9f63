"""Where a digits generator's geometry defect and PPL sit: at class boundaries, or inside the classes.

    python benchmarks/geometry_anatomy.py RUN_DIR [RUN_DIR ...] --out results/digits/anatomy

Issue 12 asks the isometric term for -50% local isometry defect and -25% PPL at <= 10% FD cost.
This splits both figures of each run's EMA generator by the digit class its samples fall in
(the cached digits CNN, the one behind FD), to show which part the term moves:

- local defect: held-out anchors with 3 neighbours at radius 0.5 (the evaluation's setting);
  `gsd.evaluation.geometry.local_defect_shares` splits the grouped loss into one share per
  group, and a group "crosses" when some neighbour's sample is classified differently from its
  anchor's. Reported: the crossing groups' fraction and share, and the loss left in the
  others (what a term acting only at class boundaries could not remove).
- PPL: slerp path steps as in `gsd.evaluate` (eps 1e-4, float64, digits-CNN features, 1-99%
  filter); a step is "at a class change" when the samples at t - 0.02 and t + 0.02 are
  classified differently. Reported: those steps' fraction and share of the filtered mean,
  and the PPL of the other steps.

Runs with the same isometric settings (config.json: lambda_irl, irl_neighbours, irl_radius)
form one row: mean over the runs (seeds) with the standard error of that mean. The same latents
for every run. Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gsd import runs  # noqa: E402
from gsd.errors import UsageError  # noqa: E402
from gsd.generator import load_generator  # noqa: E402
from gsd.evaluation.digits_classifier import digits_classifier
from gsd.evaluation.geometry import local_defect_shares, neighbour_latents
from gsd.evaluation.ppl import PPL_EPS, float64_copy, path_length_samples, slerp  # noqa: E402

LATENT_SEED = 20261129   # anchors and PPL pairs: the same for every run
CLASS_WINDOW = 0.02      # a PPL step is at a class change when G's class differs at t -/+ this
NEIGHBOURS, RADIUS = 3, 0.5


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="digits run directories written by python -m gsd.train")
    p.add_argument("--out", type=Path, default=REPO / "results" / "digits" / "anatomy",
                   help="output path without suffix (default: %(default)s)")
    p.add_argument("--anchors", type=int, default=2048, help="held-out anchors of the local defect")
    p.add_argument("--pairs", type=int, default=2048, help="slerp pairs of the PPL split")
    p.add_argument("--cache-dir", default=None, help="cache of the digits classifier (default: $GSD_CACHE)")
    return p.parse_args(argv)


def check_runs(paths) -> str | None:
    """Why the run directories cannot be split (one line), or None: before anything is loaded."""
    for run in paths:
        try:
            cfg = runs.read_config(run)
        except UsageError as exc:
            return str(exc)
        if cfg.get("dataset") != "digits":
            return f"{run}: a digits run is needed (the split uses the digits classifier), got {cfg.get('dataset')!r}"
        if runs.latest_step(run) is None:
            return f"{run}: no checkpoint yet"
    return None


def ema_generator(run_dir: Path):
    """The run's EMA generator in float64 as G(eps) -> samples, and its config."""
    gen = load_generator(run_dir)
    g64 = float64_copy(gen.net)
    s = gen.sigma_init
    return (lambda z: g64(s * z, torch.full((z.shape[0],), s, dtype=torch.float64))), gen.info["config"]


@torch.no_grad()
def defect_split(G, classify, anchors: torch.Tensor) -> dict:
    g = NEIGHBOURS + 1
    z = neighbour_latents(anchors, neighbours=NEIGHBOURS, radius=RADIUS)
    x = torch.cat([G(c) for c in z.split(1024)])
    shares = local_defect_shares(x, z, g)
    cls = classify(x).reshape(-1, g)
    cross = (cls != cls[:, :1]).any(1)
    total = float(shares.sum())
    return {"local_defect": total, "crossing_fraction": float(cross.double().mean()),
            "crossing_share": float(shares[cross].sum()) / total, "within_class_defect": float(shares[~cross].sum()),
            "top10_share": float(shares.sort(descending=True).values[: len(shares) // 10].sum()) / total}


@torch.no_grad()
def ppl_split(G, classify, features, z1, z2, t) -> dict:
    v = path_length_samples(G, z1, z2, t, eps=PPL_EPS, features=features).numpy()
    lo_t, hi_t = (t - CLASS_WINDOW).clamp(0, 1), (t + CLASS_WINDOW).clamp(0, 1)
    change = (classify(G(slerp(z1, z2, lo_t))) != classify(G(slerp(z1, z2, hi_t)))).numpy()
    lo, hi = np.percentile(v, [1, 99])
    keep = (v >= lo) & (v <= hi)
    return {"ppl": float(v[keep].mean()), "change_fraction": float(change[keep].mean()),
            "change_share": float(v[keep & change].sum() / v[keep].sum()),
            "ppl_other_steps": float(v[keep & ~change].mean()), "ppl_change_steps": float(v[keep & change].mean())}


def setting_of(cfg: dict) -> str:
    lam, k = float(cfg.get("lambda_irl") or 0.0), int(cfg.get("irl_neighbours") or 0)
    if lam == 0:
        return "plain SiD" if k == 0 else f"lambda-irl 0, K = {k}"
    return f"lambda-irl {lam:g}, K = {k}, R = {float(cfg.get('irl_radius', RADIUS)):g}"


def mean_se(values):
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


KEYS = [("local_defect", "local defect", 4), ("crossing_fraction", "groups crossing a class", 3),
        ("crossing_share", "their share of the defect", 2), ("within_class_defect", "defect in the other groups", 4),
        ("ppl", "PPL", 0), ("change_fraction", "steps at a class change", 3),
        ("change_share", "their share of PPL", 2), ("ppl_other_steps", "PPL of the other steps", 0),
        ("ppl_change_steps", "PPL of the class-change steps", 0)]


def write_report(rows: dict, out: Path, args) -> None:
    lines = ["| setting | runs | " + " | ".join(label for _, label, _ in KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for name, recs in rows.items():
        cells = []
        for key, _, digits in KEYS:
            m, se = mean_se([r[key] for r in recs])
            cells.append(f"{m:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}"))
        lines.append(f"| {name} | {len(recs)} | " + " | ".join(cells) + " |")
    header = (f"{args.anchors} anchors ({NEIGHBOURS} neighbours at radius {RADIUS}) and {args.pairs} slerp pairs, "
              f"latent seed {LATENT_SEED}; ± = standard error of the mean over the runs.\n\n")
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"anchors": args.anchors, "pairs": args.pairs, "latent_seed": LATENT_SEED,
                                                    "class_window": CLASS_WINDOW, "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    mean = {k: [statistics.fmean(r[k] for r in rows[n]) for n in names] for k, _, _ in KEYS}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 1.6 + 0.45 * len(names) + 0.8))
    y = np.arange(len(names))
    inside = np.array(mean["within_class_defect"])
    a.barh(y, inside, color="#4c72b0", label="groups inside one class")
    a.barh(y, np.array(mean["local_defect"]) - inside, left=inside, color="#dd8452", label="groups crossing a class")
    a.set_yticks(y, names)
    a.set_xlabel("local isometry defect (stacked shares)")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    other = np.array(mean["ppl"]) * (1 - np.array(mean["change_share"]))
    b.barh(y, other, color="#4c72b0", label="steps inside one class")
    b.barh(y, np.array(mean["ppl"]) - other, left=other, color="#dd8452", label="steps at a class change")
    b.set_yticks(y, [""] * len(names))
    b.set_xlabel("PPL (digits-CNN features; stacked shares of the mean)")
    b.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    control = [i for i, n in enumerate(names) if n.startswith("lambda-irl 0,")]
    if control:  # issue 12's targets against the lambda-0 control: -50% local defect, -25% PPL
        a.axvline(0.5 * mean["local_defect"][control[0]], color="k", ls="--", lw=1)
        b.axvline(0.75 * mean["ppl"][control[0]], color="k", ls="--", lw=1)
        a.text(0.5 * mean["local_defect"][control[0]], len(names) - 0.45, " target", fontsize=8, va="top")
        b.text(0.75 * mean["ppl"][control[0]], len(names) - 0.45, " target", fontsize=8, va="top")
    fig.suptitle("Where the geometry defect and PPL of the one-step digits generator sit")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_runs(args.runs) or (None if args.anchors > 0 and args.pairs > 0 else
                                        "--anchors and --pairs must be positive")
    if problem:
        print(f"geometry_anatomy.py: error: {problem}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    clf, _ = digits_classifier(cache_dir=args.cache_dir)
    clf64 = float64_copy(clf.eval())
    classify = lambda x: torch.cat([clf64(c).argmax(1) for c in x.split(1024)])  # noqa: E731
    features = lambda x: clf64.features(x)  # noqa: E731  # PPL's feature space in gsd.evaluate for digits
    gen = torch.Generator().manual_seed(LATENT_SEED)
    shape = (1, 8, 8)
    anchors = torch.randn(args.anchors, *shape, generator=gen, dtype=torch.float64)
    z1 = torch.randn(args.pairs, *shape, generator=gen, dtype=torch.float64)
    z2 = torch.randn(args.pairs, *shape, generator=gen, dtype=torch.float64)
    t = torch.rand(args.pairs, generator=gen, dtype=torch.float64)
    rows: dict = {}
    for run in args.runs:
        G, cfg = ema_generator(run)
        rec = {"run": str(run), "seed": cfg.get("seed"), **defect_split(G, classify, anchors),
               **ppl_split(G, classify, features, z1, z2, t)}
        rows.setdefault(setting_of(cfg), []).append(rec)
        print(f"{run}: local defect {rec['local_defect']:.4f} ({rec['crossing_share']:.2f} in the "
              f"{rec['crossing_fraction']:.3f} of groups crossing a class), PPL {rec['ppl']:.0f} "
              f"({rec['change_share']:.2f} in the {rec['change_fraction']:.3f} of steps at a class change)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(rows, args.out, args)
    print(f"wrote {args.out.with_suffix('.md')}, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
