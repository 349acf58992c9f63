"""The isometric regulariser's sweep on digits: what each setting buys in geometry and costs in quality.

    python benchmarks/geometry_sweep.py                          # every setting, seeds 0 1 2
    python benchmarks/geometry_sweep.py --only plain-sid gsd --seeds 0
    python benchmarks/geometry_sweep.py --report-only            # rebuild the table from finished runs

For every setting below and every seed it trains `python -m gsd.train --fused --dataset digits`
with the setting's flags (default iterations and batch), then evaluates each run in one process
(the same evaluation latents for every run, so the teacher side is computed once):

- `gsd.evaluate`'s figures: FD (digits-CNN features; with the real-vs-real noise floor), KID,
  precision/recall, PPL, the global isometry defect (random held-out pairs) and the local one
  (held-out anchors and their neighbours);
- `gsd.edit`'s figures: edit success at alpha 0.25 and path smoothness;
- seconds per iteration from the run's own clock (log.jsonl; JSON only, see TIMING).

Results go to OUT/geometry_sweep.{md,json,png}: per setting the mean over seeds with the
standard error of that mean, and a Pareto plot (geometry against quality). Runs live under
--root and are reused when finished, so an interrupted sweep continues where it stopped.
Training runs go two at a time with one thread each (--jobs): seconds per iteration are then
comparable between settings of one sweep, not with a machine to itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (gsd.train flags, what it is). "gsd" is the engine's default GSD configuration.
SETTINGS = {
    "plain-sid": (["--lambda-irl", "0", "--irl-neighbours", "0"], "plain SiD: no regulariser, i.i.d. batch"),
    "same-batch": (["--lambda-irl", "0", "--irl-neighbours", "1"],
                   "no regulariser, anchor+neighbour batch (the lambda-0 control of the neighbour runs)"),
    "nbr-0.03": (["--lambda-irl", "0.03", "--irl-neighbours", "1"], "neighbours K=1, lambda_irl 0.03"),
    "nbr-0.1": (["--lambda-irl", "0.1", "--irl-neighbours", "1"], "neighbours K=1, lambda_irl 0.1"),
    "nbr-0.3": (["--lambda-irl", "0.3", "--irl-neighbours", "1"], "neighbours K=1, lambda_irl 0.3"),
    "nbr-1": (["--lambda-irl", "1", "--irl-neighbours", "1"], "neighbours K=1, lambda_irl 1"),
    "nbr-3": (["--lambda-irl", "3", "--irl-neighbours", "1"], "neighbours K=1, lambda_irl 3"),
    "nbr-10": (["--lambda-irl", "10", "--irl-neighbours", "1"], "neighbours K=1, lambda_irl 10"),
    "same-batch3": (["--lambda-irl", "0", "--irl-neighbours", "3"],
                    "no regulariser, anchor+3-neighbour batch (the lambda-0 control of the K=3 runs)"),
    "nbr3-0.25": (["--lambda-irl", "0.25", "--irl-neighbours", "3"], "neighbours K=3, lambda_irl 0.25"),
    "nbr3-0.3": (["--lambda-irl", "0.3", "--irl-neighbours", "3"], "neighbours K=3, lambda_irl 0.3"),
    "nbr3-0.5": (["--lambda-irl", "0.5", "--irl-neighbours", "3"], "neighbours K=3, lambda_irl 0.5"),
    "nbr3R1-0.5": (["--lambda-irl", "0.5", "--irl-neighbours", "3", "--irl-radius", "1"],
                   "neighbours K=3 at radius 1, lambda_irl 0.5"),
    "nbr3R1-0.25": (["--lambda-irl", "0.25", "--irl-neighbours", "3", "--irl-radius", "1"],
                    "neighbours K=3 at radius 1, lambda_irl 0.25"),
    "nbr7-0.5": (["--lambda-irl", "0.5", "--irl-neighbours", "7"], "neighbours K=7, lambda_irl 0.5"),
    "nbr3-1": (["--lambda-irl", "1", "--irl-neighbours", "3"], "neighbours K=3, lambda_irl 1"),
    "nbr3-3": (["--lambda-irl", "3", "--irl-neighbours", "3"], "neighbours K=3, lambda_irl 3"),
    "pairs-0.1": (["--lambda-irl", "0.1", "--irl-neighbours", "0"], "random pairs, lambda_irl 0.1"),
    "pairs-0.3": (["--lambda-irl", "0.3", "--irl-neighbours", "0"], "random pairs, lambda_irl 0.3"),
    "jvp-0.1": (["--irl-estimator", "jvp", "--lambda-irl-raw", "0.1", "--irl-neighbours", "0"],
                "JVP relaxed distortion, raw weight 0.1"),
    "jvp-1": (["--irl-estimator", "jvp", "--lambda-irl-raw", "1", "--irl-neighbours", "0"],
              "JVP relaxed distortion, raw weight 1"),
}

# (key in the per-run record, label, lower is better)
METRICS = [
    ("fd", "FD", True), ("kid", "KID", True), ("precision", "precision", False), ("recall", "recall", False),
    ("ppl", "PPL", True), ("isometry_defect", "global defect", True),
    ("local_isometry_defect", "local defect", True), ("edit_success", "edit success @0.25", False),
    ("path_smoothness", "path smoothness", True),
]
# seconds per iteration go to the JSON only: runs shared the CPU with other jobs, so the cost of
# each form of the term is measured by benchmarks/test_bench_pipeline.py::test_irl_iteration_cost
TIMING = ("s_per_iter", "s / iter (shared CPU)", True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/geometry_sweep.py", description=__doc__.split("\n")[0])
    p.add_argument("--root", default="sweep-runs", help="run directories (default: %(default)s)")
    p.add_argument("--out", default=str(REPO / "results" / "digits"), help="where the table and plot go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=None, help="settings to run")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    p.add_argument("--iters", type=int, default=None, help="override the default iterations")
    p.add_argument("--ppl-samples", type=int, default=512)
    p.add_argument("--report-only", action="store_true", help="no training or evaluation; table from records")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every gsd.train call")
    return p.parse_args(argv)


def run_name(setting: str, seed: int) -> str:
    return f"{setting}-s{seed}"


def train_missing(todo: list, root: Path, args) -> None:
    """Train every (setting, seed) whose run directory has no final checkpoint, `jobs` at a time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    queue = list(todo)
    running = []
    failed = []
    while queue or running:
        while queue and len(running) < args.jobs:
            setting, seed = queue.pop(0)
            d = root / run_name(setting, seed)
            flags = SETTINGS[setting][0] + ["--dataset", "digits", "--fused", "--seed", str(seed),
                                            "--eval-samples", "0", "--no-progress"] + list(args.extra)
            if args.iters:
                flags += ["--iters", str(args.iters)]
            if (d / "config.json").exists():
                flags = ["--resume", str(d), "--eval-samples", "0", "--no-progress"]
                if args.iters:
                    flags += ["--iters", str(args.iters)]
            else:
                flags += ["--out", str(d)]
            log = open(root / f"{d.name}.train.txt", "w")
            print(f"[sweep] train {d.name}: gsd.train {' '.join(flags)}", flush=True)
            proc = subprocess.Popen([sys.executable, "-m", "gsd.train", *flags], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running.append((d.name, proc, log, time.time()))
        time.sleep(1.0)
        for item in list(running):
            name, proc, log, t0 = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"[sweep] {name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    if failed:
        raise SystemExit(f"training failed: {', '.join(failed)} (logs in {root})")


def finished(d: Path) -> bool:
    """A run is finished when its log reached the configured iterations."""
    try:
        cfg = json.loads((d / "config.json").read_text())
        last = (d / "log.jsonl").read_text().strip().splitlines()[-1]
        return int(json.loads(last)["iteration"]) >= int(cfg["iters"])
    except (OSError, ValueError, KeyError, IndexError):
        return False


def seconds_per_iter(d: Path) -> float | None:
    """Median seconds per iteration between consecutive log records of the run's own clock."""
    recs = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines() if line.strip()]
    pts = [(r["iteration"], r["time"]) for r in recs if "time" in r and "iteration" in r]
    rates = [(t1 - t0) / (i1 - i0) for (i0, t0), (i1, t1) in zip(pts, pts[1:]) if i1 > i0]
    return statistics.median(rates) if rates else None


def evaluate_runs(dirs: list, args) -> None:
    """eval.json-style and edit figures for every run without a sweep record, in this process."""
    sys.path.insert(0, str(REPO))
    import torch
    from gsd.evaluation.core import evaluate_loaded, load_run
    from gsd.evaluation.editing import edit_metrics

    torch.set_num_threads(2)
    teacher_cache: dict = {}
    for d in dirs:
        rec_path = d / "sweep_record.json"
        if rec_path.exists():
            continue
        t0 = time.time()
        run = load_run(d, device="cpu")
        res, _ = evaluate_loaded(run, ppl_samples=args.ppl_samples, seed=0, teacher_cache=teacher_cache,
                                 latency_repeats=3)
        ed = edit_metrics(d, device="cpu")
        one = res["one_step"]
        rec = {"run": d.name, "eval": res, "edit": {k: v for k, v in ed.items() if not k.startswith("_")}}
        rec["values"] = {
            "fd": one.get("fd"), "kid": one.get("kid"), "precision": one.get("precision"),
            "recall": one.get("recall"), "ppl": one.get("ppl"),
            "isometry_defect": one.get("isometry_defect", res.get("isometry_defect")),
            "local_isometry_defect": one.get("local_isometry_defect", res.get("local_isometry_defect")),
            "edit_success": ed["success_rate"].get(repr(0.25)),
            "path_smoothness": ed.get("path_smoothness"),
            "s_per_iter": seconds_per_iter(d),
        }
        rec["teacher"] = {k: res["teacher"].get(k) for k in ("fd", "kid", "precision", "recall", "ppl",
                                                              "isometry_defect", "local_isometry_defect")}
        rec["real_split_fd"] = res.get("real_split_fd")
        rec_path.write_text(json.dumps(rec, indent=1, default=str))
        print(f"[sweep] evaluated {d.name} in {time.time() - t0:.0f} s: "
              + ", ".join(f"{k} {v:.4g}" for k, v in rec["values"].items() if isinstance(v, (int, float))),
              flush=True)


def mean_se(values):
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None, 0
    m = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return m, se, len(vals)


def fmt(m, se=None):
    if m is None:
        return "-"
    s = f"{m:.4g}"
    return s + (f" ± {se:.2g}" if se is not None else "")


def report(root: Path, settings: list, seeds: list, out: Path) -> dict:
    summary = {}
    teacher = None
    floor = None
    for s in settings:
        recs = []
        for seed in seeds:
            p = root / run_name(s, seed) / "sweep_record.json"
            if p.exists():
                recs.append(json.loads(p.read_text()))
        if not recs:
            continue
        teacher = teacher or recs[0]["teacher"]
        floor = floor or recs[0].get("real_split_fd")
        summary[s] = {"seeds": [int(r["run"].rsplit("-s", 1)[1]) for r in recs],
                      "flags": " ".join(SETTINGS[s][0]), "what": SETTINGS[s][1]}
        for key, _, _ in METRICS + [TIMING]:
            m, se, n = mean_se([r["values"].get(key) for r in recs])
            summary[s][key] = {"mean": m, "stderr": se, "n": n, "per_seed": [r["values"].get(key) for r in recs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "geometry_sweep.json").write_text(json.dumps({"settings": summary, "teacher": teacher,
                                                        "real_split_fd": floor}, indent=1))
    lines = ["| setting | flags | seeds | " + " | ".join(lab for _, lab, _ in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for s, row in summary.items():
        lines.append(f"| {s} | `{row['flags']}` | {len(row['seeds'])} | "
                     + " | ".join(fmt(row[k]["mean"], row[k]["stderr"]) for k, _, _ in METRICS) + " |")
    if teacher:
        lines.append("| teacher (Heun, 35 NFE) | - | - | " + " | ".join(
            fmt(teacher.get(k)) if k in teacher else "-" for k, _, _ in METRICS) + " |")
    (out / "geometry_sweep_table.md").write_text("\n".join(lines) + "\n")
    plot(summary, out / "geometry_sweep.png", floor)
    return summary


def family(setting: str) -> str:
    """Which curve of the plot a setting belongs to (one line per estimator / neighbour count)."""
    flags = SETTINGS[setting][0]
    if "jvp" in flags:
        return "JVP estimator"
    if flags[flags.index("--lambda-irl") + 1] == "0":
        return "no regulariser (controls)"
    k = flags[flags.index("--irl-neighbours") + 1]
    if k == "0":
        return "random pairs"
    return f"neighbours K={k}" + (" R=1" if "--irl-radius" in flags else "")


def plot(summary: dict, path: Path, floor) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams: dict = {}
    for s, row in summary.items():
        fams.setdefault(family(s), []).append((s, row))
    markers = dict(zip(sorted(fams), "os^Dv<>p*h"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (ykey, ylab) in zip(axes, (("ppl", "PPL (lower = smoother)"),
                                       ("local_isometry_defect", "local isometry defect"))):
        for fam, rows in sorted(fams.items()):
            pts = sorted((r["fd"]["mean"], r[ykey]["mean"], r["fd"]["stderr"] or 0, r[ykey]["stderr"] or 0, s)
                         for s, r in rows if r["fd"]["mean"] is not None and r[ykey]["mean"] is not None)
            if not pts:
                continue
            xs, ys, xe, ye, names = zip(*pts)
            line = ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker=markers[fam], capsize=2, ms=5, lw=1,
                               ls="-" if len(pts) > 1 and "controls" not in fam else "none", label=fam)
            for x, y, n in zip(xs, ys, names):
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6.5,
                            color=line[0].get_color())
        if floor:
            ax.axvline(floor, color="grey", ls=":", lw=1, label="FD real vs real (noise floor)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FD (digits-CNN features; lower = better)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("digits: geometry vs quality per setting (mean ± s.e. over the seeds in the table; "
                 "lower left is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = args.only or list(SETTINGS)
    pairs = [(s, seed) for seed in args.seeds for s in settings]
    if not args.report_only:
        train_missing([(s, seed) for s, seed in pairs if not finished(root / run_name(s, seed))], root, args)
        evaluate_runs([root / run_name(s, seed) for s, seed in pairs], args)
    report(root, settings, args.seeds, Path(args.out))
    print((Path(args.out) / "geometry_sweep_table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
