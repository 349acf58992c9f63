"""Metric-over-iterations curves of distillation runs, with the teacher and the noise floor drawn on them.

    python benchmarks/training_curves.py runs/gmm-default runs/gmm-long --out results/gmm/curves
    python benchmarks/training_curves.py runs/digits-default runs/digits-long --out results/digits/curves

Every kept checkpoint of every run (train with --keep-every to keep them) and step 0 (the
teacher copy G starts from) is evaluated with the same latents as gsd.evaluate (seed 0) and
the evaluation core's metrics: sliced W2, high-quality fraction, NLL gap and mode-weight error
for gmm (exact, against the known mixture); FD, KID, precision and recall in the digits-CNN
feature space for digits. The 35-NFE Heun teacher is evaluated once on the same latents, and
the noise floor is the same metric for real-vs-real (digits: two halves of the real data) or
exact-sampler-vs-truth (gmm) samples of the same size.

Writes OUT.png (one panel per metric, one line per run) and OUT.json (every value).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PANELS = {  # dataset -> (key, label, higher is better)
    "gmm": [("sliced_wasserstein", "sliced W2", False), ("high_quality_fraction", "high-quality fraction", True),
            ("nll_gap", "NLL gap to true samples", False), ("mode_weight_error", "mode-weight error (TV)", False)],
    "digits": [("fd", "FD (digits-CNN features)", False), ("kid", "KID", False), ("precision", "precision", True),
               ("recall", "recall", True)],
}


def curve(run_dir: Path, num_samples: int, space_cache: dict, teacher_cache: dict) -> dict:
    from gsd import runs
    from gsd.evaluation import metrics
    from gsd.evaluation.assemble import FeatureSpace
    from gsd.evaluation.core import load_run
    from gsd.sampling.samplers import heun_sample

    run = load_run(run_dir, device="cpu")
    ds = run.dataset
    if ds.name not in PANELS:
        raise SystemExit(f"{run_dir}: curves are drawn for gmm and digits runs, not {ds.name}")
    if ds.name not in space_cache:
        space_cache[ds.name] = FeatureSpace(ds, run.device)
    space = space_cache[ds.name]
    eps, labels = metrics.evaluation_latents(0, num_samples, ds.sample_shape, run.device, run.num_classes)
    gen = run.generator
    s = gen.sigma_init
    net0 = run.extra["teacher_net"]

    def g0(e, lab):  # step 0: the teacher network used as a one-step generator (G's initial weights)
        return net0(s * e, torch.full((e.shape[0],), s, device=e.device), lab)

    points = []
    with torch.no_grad():
        gens = [(0, g0)] + [(st, None) for st in runs.complete_steps(run_dir)]
        for step, fn in gens:
            if fn is None:
                gen.load_checkpoint_weights(runs.load_checkpoint_weights(run_dir, step))
                fn = gen
            x = metrics.batched(fn, eps, labels)
            m: dict = {}
            result: dict = {}
            metrics.distribution_section(result, ds, space, [(m, x)], num_samples)
            points.append({"iteration": step, **{k: m.get(k) for k, _, _ in PANELS[ds.name]}})
            print(f"[curves] {run_dir.name} step {step}: "
                  + ", ".join(f"{k} {m.get(k):.4g}" for k, _, _ in PANELS[ds.name] if m.get(k) is not None),
                  flush=True)
        key = (ds.name, run.teacher_id, num_samples)
        if key not in teacher_cache:
            xt = metrics.batched(lambda e, lab: heun_sample(run.teacher, e, lab), eps, labels)
            mt: dict = {}
            metrics.distribution_section(result, ds, space, [(mt, xt)], num_samples)
            floor = result.get("noise_floor") or {}
            teacher_cache[key] = ({k: mt.get(k) for k, _, _ in PANELS[ds.name]},
                                  {k: floor.get(k) for k, _, _ in PANELS[ds.name]}, floor.get("what"))
    teacher, floor, floor_what = teacher_cache[key]
    cfg = run.config
    return {"run": str(run_dir), "dataset": ds.name, "iters": cfg.get("iters"), "seed": cfg.get("seed"),
            "lambda_irl": cfg.get("lambda_irl"), "irl_neighbours": cfg.get("irl_neighbours"),
            "points": points, "teacher": teacher, "noise_floor": floor, "noise_floor_what": floor_what,
            "num_samples": num_samples}


def plot(curves: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = curves[0]["dataset"]
    panels = PANELS[ds]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label, higher_better) in zip(axes, panels):
        for c in curves:
            pts = [(p["iteration"], p[key]) for p in c["points"] if p[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"{Path(c['run']).name} ({c['iters']} it.)")
        t, f = curves[0]["teacher"].get(key), curves[0]["noise_floor"].get(key)
        if t is not None:
            ax.axhline(t, color="black", lw=1, ls="--", label="teacher (Heun, 35 NFE)")
        if f is not None:
            ax.axhline(f, color="grey", lw=1, ls=":", label="noise floor")
        ax.set_xscale("symlog", linthresh=max(1, min(c["iters"] for c in curves) // 10))
        ax.set_xlim(left=0)  # iterations are never negative (symlog would show a negative decade)
        values = [abs(p[key]) for c in curves for p in c["points"] if p[key] is not None] + [abs(t or 0), abs(f or 0)]
        if not higher_better and max(values) > 10 * max(min(v for v in values if v > 0), 1e-12):
            # step 0 (the teacher copy) is far off: linear near the teacher, log beyond
            ax.set_yscale("symlog", linthresh=max(abs(t or 0), abs(f or 0), 1e-6))
        ax.set_xlabel("iteration")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ds}: one-step generator over training ({curves[0]['num_samples']} samples per point; "
                 f"floor: {curves[0]['noise_floor_what'] or '-'})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/training_curves.py", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="gsd.train run directories (same data set and teacher)")
    p.add_argument("--out", required=True, help="output path without extension (.png and .json are written)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per point (default: gsd.evaluate's)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    space_cache, teacher_cache, curves = {}, {}, []
    for d in args.runs:
        d = Path(d)
        n = args.num_samples
        if n is None:
            from gsd.evaluation.core import default_num_samples
            cfg = json.loads((d / "config.json").read_text())
            n = min(default_num_samples(cfg["dataset"], 1797), 4000)
        curves.append(curve(d, n, space_cache, teacher_cache))
    if len({c["dataset"] for c in curves}) != 1:
        raise SystemExit("all runs must be of one data set")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1, default=str))
    plot(curves, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
