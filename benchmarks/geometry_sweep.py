"""Distillation settings compared over seeds: what each buys in geometry and costs in quality.

    python benchmarks/geometry_sweep.py                          # the isometric term's sweep on digits
    python benchmarks/geometry_sweep.py --only plain-sid gsd --seeds 0
    python benchmarks/geometry_sweep.py --report-only            # rebuild the table from finished runs
    python benchmarks/geometry_sweep.py --study sida             # SiDA / SiD2A vs GSD vs plain SiD (digits)
    python benchmarks/geometry_sweep.py --study shapes1          # GSD on one-kind shapes (factor metrics)

A study (STUDIES) is a data set, its settings and where its results go; `geometry` (the default,
the isometric term's sweep on digits) writes OUT/geometry_sweep.*, every other study OUT/<study>.*.
A setting's flags may name another setting's run of the same seed ({run:NAME}), which is then
trained first (SiD2A starts from a GSD run). Besides the figures below, every study records
the one-step samples' FD / KID / precision / recall against the teacher's samples of another
latent set, beside the teacher's own samples against that same set (the noise floor: a student
cannot be told from its teacher below it), and shapes studies the factor metrics of
gsd.evaluation.factors.

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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (gsd.train flags, what it is). In the digits studies "gsd" is the engine's default GSD
# configuration.
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

# SiDA / SiD2A (issue 23): the official recipe's alpha 1.0 and mixing weight 0.5. SiD2A continues
# a GSD run of half the default length for the other half, so every setting sees the same images.
SIDA_SETTINGS = {
    "plain-sid": (["--lambda-irl", "0", "--irl-neighbours", "0"], "plain SiD"),
    "gsd": ([], "GSD, the engine's default"),
    "sida": (["--lambda-irl", "0", "--irl-neighbours", "0", "--lambda-adv", "0.5", "--alpha", "1.0"],
             "SiDA: plain SiD + the adversarial term (official recipe: alpha 1, mix 0.5)"),
    "gsd-sida": (["--lambda-adv", "0.5", "--alpha", "1.0"], "GSD + the adversarial term"),
    "gsd-half": (["--iters", "1000"], "GSD, half the iterations (SiD2A's start)"),
    "sid2a": (["--init-generator", "{run:gsd-half}", "--lambda-adv", "0.5", "--alpha", "1.0", "--iters", "1000"],
              "SiD2A: GSD + adversarial term from gsd-half, the other half of the images"),
}
# gmm: its default is SiD + the regression term (no isometric term)
SIDA_GMM_SETTINGS = {
    "default": ([], "gmm's default: SiD + regression"),
    "sida": (["--lambda-adv", "0.5", "--alpha", "1.0"], "gmm's default + the adversarial term"),
    "plain-sid": (["--lambda-regress", "0"], "plain SiD"),
    "plain-sida": (["--lambda-regress", "0", "--lambda-adv", "0.5", "--alpha", "1.0"], "SiDA: plain SiD + adversarial"),
}
# shapes and class-conditional digits (issue 25): GSD at digits' default weight against its
# lambda-0 control, plain SiD and a weight sweep. "gsd" names its weight because the defaults
# differ: shapes' default became nbr3-1's weight on this study's figures (results/shapes/README.md).
GEOMETRY_CONTROLS = {
    "gsd": (["--lambda-irl", "0.25"], "GSD at lambda_irl 0.25, the default on digits"),
    "same-batch": (["--lambda-irl", "0"], "no regulariser, GSD's anchor+neighbour batch"),
    "plain-sid": (["--lambda-irl", "0", "--irl-neighbours", "0"], "plain SiD"),
    "nbr3-0.1": (["--lambda-irl", "0.1"], "K=3, lambda_irl 0.1"),
    "nbr3-0.5": (["--lambda-irl", "0.5"], "K=3, lambda_irl 0.5"),
    "nbr3-1": (["--lambda-irl", "1"], "K=3, lambda_irl 1, the default on shapes"),
    "nbr3-3": (["--lambda-irl", "3"], "K=3, lambda_irl 3"),
}

# (key in the per-run record, label, lower is better)
METRICS = [
    ("fd", "FD", True), ("kid", "KID", True), ("precision", "precision", False), ("recall", "recall", False),
    ("ppl", "PPL", True), ("isometry_defect", "global defect", True),
    ("local_isometry_defect", "local defect", True), ("edit_success", "edit success @0.25", False),
    ("path_smoothness", "path smoothness", True),
]
VS_TEACHER = [("fd_vs_teacher", "FD vs teacher", True), ("kid_vs_teacher", "KID vs teacher", True),
              ("precision_vs_teacher", "precision vs teacher", False),
              ("recall_vs_teacher", "recall vs teacher", False)]
FACTOR_METRICS = [("factor_ppl", "factor PPL", True), ("local_factor_isometry", "local factor defect", True),
                  ("traversal_purity", "traversal purity", False), ("factor_w1", "factor W1", True),
                  ("kind_tv", "kind TV", True)]
GMM_METRICS = [("nll_gap", "NLL gap", True), ("sliced_wasserstein", "sliced W2", True),
               ("high_quality_fraction", "high-quality frac.", False), ("mode_weight_error", "mode-weight TV", True)]
# seconds per iteration: in the JSON, and in the table of the studies that run one job at a time
TIMING = ("s_per_iter", "s / iter (shared CPU)", True)


@dataclass
class Study:
    dataset: str
    settings: dict
    metrics: list
    flags: list = field(default_factory=list)  # given to every run of the study
    prefix: str | None = None  # output file names (default: the study's name)
    edit: bool = False  # gsd.edit's figures (labelled data sets)


STUDIES = {
    "geometry": Study("digits", SETTINGS, METRICS, prefix="geometry_sweep", edit=True),
    "sida": Study("digits", SIDA_SETTINGS, METRICS[:7] + VS_TEACHER, edit=True),
    "sida-gmm": Study("gmm", SIDA_GMM_SETTINGS, GMM_METRICS + [METRICS[0], METRICS[1]] + VS_TEACHER[:2]),
    "shapes1": Study("shapes", GEOMETRY_CONTROLS, METRICS[:7] + FACTOR_METRICS[:4], flags=["--shapes-kinds", "1"]),
    "shapes3": Study("shapes", GEOMETRY_CONTROLS, METRICS[:7] + FACTOR_METRICS, flags=["--shapes-kinds", "3"]),
    "digits-cond": Study("digits", GEOMETRY_CONTROLS, METRICS[:7] + VS_TEACHER, flags=["--conditional"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/geometry_sweep.py", description=__doc__.split("\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="geometry", help="which comparison (default: %(default)s)")
    p.add_argument("--root", default=None, help="run directories (default: sweep-runs, or sweep-runs-STUDY)")
    p.add_argument("--out", default=None, help="where the table and plot go (default: results/DATASET)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=None, help="settings to run")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    p.add_argument("--iters", type=int, default=None, help="override the default iterations")
    p.add_argument("--ppl-samples", type=int, default=512)
    p.add_argument("--report-only", action="store_true", help="no training or evaluation; table from records")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every gsd.train call")
    args = p.parse_args(argv)
    study = STUDIES[args.study]
    unknown = sorted(set(args.only or []) - set(study.settings))
    if unknown:
        p.error(f"--only: {', '.join(unknown)} not in study {args.study} ({', '.join(study.settings)})")
    args.root = args.root or ("sweep-runs" if args.study == "geometry" else f"sweep-runs-{args.study}")
    args.out = args.out or str(REPO / "results" / study.dataset)
    return args


def run_name(setting: str, seed: int) -> str:
    return f"{setting}-s{seed}"


def needs(study: Study, setting: str) -> list[str]:
    """The settings whose runs (same seed) this setting's flags name."""
    return [f[5:-1] for f in study.settings[setting][0] if f.startswith("{run:")]


def train_flags(study: Study, setting: str, seed: int, root: Path, args) -> list[str]:
    flags = [root / run_name(f[5:-1], seed) if f.startswith("{run:") else f for f in study.settings[setting][0]]
    flags = [str(f) for f in flags] + ["--dataset", study.dataset, *study.flags, "--fused", "--seed", str(seed),
                                      "--eval-samples", "0", "--no-progress"] + list(args.extra)
    if args.iters and "--iters" not in study.settings[setting][0]:
        flags += ["--iters", str(args.iters)]
    return flags


def train_missing(study: Study, todo: list, root: Path, args) -> None:
    """Train every (setting, seed) whose run directory has no final checkpoint, `jobs` at a time,
    a setting after the runs it starts from."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    queue = sorted(todo, key=lambda t: len(needs(study, t[0])))
    running, failed = [], []
    while queue or running:
        ready = [t for t in queue if all(finished(root / run_name(n, t[1])) for n in needs(study, t[0]))]
        while ready and len(running) < args.jobs:
            setting, seed = ready.pop(0)
            queue.remove((setting, seed))
            d = root / run_name(setting, seed)
            if (d / "config.json").exists() and any((d / "checkpoints").glob("*.json")):
                flags = ["--resume", str(d), "--eval-samples", "0", "--no-progress"]
                if args.iters and "--iters" not in study.settings[setting][0]:
                    flags += ["--iters", str(args.iters)]
            else:
                flags = train_flags(study, setting, seed, root, args) + ["--out", str(d)]
            log = open(root / f"{d.name}.train.txt", "w")
            print(f"[sweep] train {d.name}: gsd.train {' '.join(flags)}", flush=True)
            proc = subprocess.Popen([sys.executable, "-m", "gsd.train", *flags], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running.append((setting, seed, d.name, proc, log, time.time()))
        if not running and queue and not ready:
            raise SystemExit(f"cannot train {queue}: the runs they start from failed ({', '.join(failed)})")
        time.sleep(1.0)
        for item in list(running):
            setting, seed, name, proc, log, t0 = item
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


def versus_teacher(run, res: dict, samples: dict, feats, teacher_cache: dict) -> dict:
    """FD / KID / precision / recall of the one-step samples against the teacher's samples of
    another latent set (seed 1), and the noise floor: the teacher's own samples (seed 0, G's
    latents) against the same reference. The reference must not share G's latents: G copies the
    teacher's ODE map, so at the same latents its samples pair up with the teacher's and the FD
    falls below what two independent sample sets of one distribution give."""
    from gsd.evaluation.feature_metrics import as_numpy64
    from gsd.evaluation.metrics import batched, evaluation_latents, sample_quality
    from gsd.sampling.samplers import heun_sample

    space = feats.fd
    if space is None:
        return {}
    n = res["num_samples"]
    key = ("teacher-seed-1", run.teacher_id, n)
    if key not in teacher_cache:
        eps, labels = evaluation_latents(1, n, run.sample_shape, run.device, run.num_classes)
        teacher_cache[key] = batched(lambda e, l: heun_sample(run.teacher, e, l, num_steps=18), eps, labels)
    f_reference = as_numpy64(space(teacher_cache[key]))
    one = sample_quality(as_numpy64(space(samples["one_step"])), f_reference, bootstraps=0)
    floor = sample_quality(as_numpy64(space(samples["teacher"])), f_reference, bootstraps=0)
    return {**{f"{k}_vs_teacher": one.get(k) for k in ("fd", "kid", "precision", "recall")},
            **{f"{k}_vs_teacher_floor": floor.get(k) for k in ("fd", "kid", "precision", "recall")}}


def record_values(res: dict, ed: dict | None) -> dict:
    one = res["one_step"]
    values = {k: one.get(k) for k in ("fd", "kid", "precision", "recall", "ppl", "nll_gap", "sliced_wasserstein",
                                      "high_quality_fraction", "mode_weight_error")}
    values["isometry_defect"] = one.get("isometry_defect", res.get("isometry_defect"))
    values["local_isometry_defect"] = one.get("local_isometry_defect", res.get("local_isometry_defect"))
    if ed is not None:
        values["edit_success"] = ed["success_rate"].get(repr(0.25))
        values["path_smoothness"] = ed.get("path_smoothness")
    f = res.get("factors")
    if f:
        values.update(factor_ppl=f["factor_ppl"]["factor_ppl"],
                      local_factor_isometry=f["local_factor_isometry"]["local_factor_isometry"],
                      traversal_purity=f["traversal_purity"]["traversal_purity"],
                      factor_w1=f["factor_fidelity"]["w1_mean_normalised"], kind_tv=f["factor_fidelity"].get("kind_tv"))
    return values


def evaluate_runs(study: Study, dirs: list, args) -> None:
    """eval.json-style (and for digits edit) figures for every run without a sweep record, in this process."""
    sys.path.insert(0, str(REPO))
    import torch
    from gsd.evaluation.assemble import FeatureSpace
    from gsd.evaluation.core import evaluate_loaded, load_run
    from gsd.evaluation.editing import edit_metrics

    torch.set_num_threads(2)
    teacher_cache: dict = {}
    feats = None
    for d in dirs:
        rec_path = d / "sweep_record.json"
        if rec_path.exists():
            continue
        t0 = time.time()
        run = load_run(d, device="cpu")
        feats = feats or FeatureSpace(run.dataset, run.device)
        res, samples = evaluate_loaded(run, ppl_samples=args.ppl_samples, seed=0, teacher_cache=teacher_cache,
                                       latency_repeats=3, features=feats)
        ed = edit_metrics(d, device="cpu") if study.edit else None
        rec = {"run": d.name, "eval": res, "edit": {k: v for k, v in ed.items() if not k.startswith("_")} if ed else None}
        rec["values"] = record_values(res, ed)
        rec["values"]["s_per_iter"] = seconds_per_iter(d)
        vs = versus_teacher(run, res, samples, feats, teacher_cache)
        rec["values"].update({k: v for k, v in vs.items() if not k.endswith("_floor")})
        rec["teacher_floor"] = {k[:-len("_floor")]: v for k, v in vs.items() if k.endswith("_floor")}
        rec["teacher"] = {k: res["teacher"].get(k) for k in ("fd", "kid", "precision", "recall", "ppl",
                                                              "isometry_defect", "local_isometry_defect", "nll_gap",
                                                              "sliced_wasserstein", "high_quality_fraction",
                                                              "mode_weight_error")}
        if res.get("factors"):
            rec["teacher"]["factor_w1"] = res["factors"]["teacher_factor_fidelity"]["w1_mean_normalised"]
            rec["teacher"]["kind_tv"] = res["factors"]["teacher_factor_fidelity"].get("kind_tv")
        rec["real_split_fd"] = res.get("real_split_fd")
        rec["noise_floor"] = {k: (res.get("noise_floor") or {}).get(k) for k in ("fd", "kid", "precision", "recall")}
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


def report(study: Study, name: str, root: Path, settings: list, seeds: list, out: Path) -> dict:
    summary = {}
    teacher = floor = noise = teacher_floor = None
    metrics = study.metrics
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
        noise = noise or recs[0].get("noise_floor")
        teacher_floor = teacher_floor or recs[0].get("teacher_floor")
        summary[s] = {"seeds": [int(r["run"].rsplit("-s", 1)[1]) for r in recs],
                      "flags": " ".join(study.settings[s][0] + study.flags), "what": study.settings[s][1]}
        for key, _, _ in metrics + [TIMING]:
            m, se, n = mean_se([r["values"].get(key) for r in recs])
            summary[s][key] = {"mean": m, "stderr": se, "n": n, "per_seed": [r["values"].get(key) for r in recs]}
    out.mkdir(parents=True, exist_ok=True)
    prefix = study.prefix or name
    (out / f"{prefix}.json").write_text(json.dumps({"study": name, "dataset": study.dataset, "settings": summary,
                                                   "teacher": teacher, "real_split_fd": floor, "noise_floor": noise,
                                                   "teacher_vs_teacher": teacher_floor}, indent=1))
    lines = ["| setting | flags | seeds | " + " | ".join(lab for _, lab, _ in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for s, row in summary.items():
        lines.append(f"| {s} | `{row['flags']}` | {len(row['seeds'])} | "
                     + " | ".join(fmt(row[k]["mean"], row[k]["stderr"]) for k, _, _ in metrics) + " |")
    if teacher:
        lines.append("| teacher (Heun, 35 NFE) | - | - | " + " | ".join(
            fmt(teacher.get(k)) if k in teacher else "-" for k, _, _ in metrics) + " |")
    if noise and any(v is not None for v in noise.values()):
        lines.append("| noise floor (real vs real) | - | - | " + " | ".join(
            fmt(noise.get(k)) if k in noise else "-" for k, _, _ in metrics) + " |")
    if teacher_floor and any(k.endswith("_vs_teacher") for k, _, _ in metrics):
        lines.append("| noise floor (teacher vs teacher) | - | - | " + " | ".join(
            fmt(teacher_floor.get(k)) if k.endswith("_vs_teacher") else "-"
            for k, _, _ in metrics) + " |")
    table = out / ("geometry_sweep_table.md" if study.prefix else f"{prefix}_table.md")
    table.write_text("\n".join(lines) + "\n")
    if study is STUDIES["geometry"]:
        plot(summary, out / "geometry_sweep.png", floor)
    else:
        plot_study(study, summary, out / f"{prefix}.png", floor)
        plot_curves(study, root, list(summary), seeds, out / f"{prefix}_curves.png")
        if study.settings is GEOMETRY_CONTROLS:
            plot_weights(study, root, list(summary), seeds, out / f"{prefix}_weights.png")
    return summary


CURVE_KEYS = [("loss_sid", "SiD generator loss"), ("loss_fake", "fake-score loss"),
              ("loss_adv", "generator's adversarial loss"), ("loss_d", "discriminator loss"),
              ("irl_weight", "scale-free isometric weight w")]


def plot_curves(study: Study, root: Path, settings: list, seeds: list, path: Path, window: int = 10) -> None:
    """Training curves from each run's log.jsonl against images seen: per setting the mean over
    its seeds, smoothed over `window` log records; one panel per logged quantity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict = {}
    for s in settings:
        for seed in seeds:
            log = root / run_name(s, seed) / "log.jsonl"
            if not log.exists():
                continue
            for line in log.read_text().splitlines():
                r = json.loads(line) if line.strip() else {}
                for key, _ in CURVE_KEYS:
                    if isinstance(r.get(key), (int, float)) and "images_seen" in r:
                        curves.setdefault(key, {}).setdefault(s, {}).setdefault(r["images_seen"], []).append(r[key])
    keys = [(k, lab) for k, lab in CURVE_KEYS if k in curves]
    if not keys:
        return
    colour = {s: f"C{i}" for i, s in enumerate(settings)}  # one colour per setting in every panel
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for s, points in curves[key].items():
            xs = sorted(points)
            ys = [statistics.fmean(points[x]) for x in xs]
            smooth = [statistics.fmean(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=1, label=s, color=colour[s])
        ax.set_xlabel("images seen")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study.dataset} {' '.join(study.flags)}: training curves (mean over seeds, "
                 f"moving average of {window} log records)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


WEIGHT_PANELS = [("fd", "FD"), ("precision", "precision"), ("ppl", "PPL (pixels)"),
                 ("local_isometry_defect", "local defect (pixels)"), ("factor_ppl", "factor PPL"),
                 ("local_factor_isometry", "local factor defect")]


def weight_sweep(root: Path, settings: list, seeds: list, key: str) -> tuple[dict, dict]:
    """The isometric weight's trade-off for one figure: {lambda_irl: {seed: value}} over the runs of
    the default estimator and neighbour count (lambda_irl and K read from each run's config.json,
    so the default run is placed at its own weight and the lambda-0 control at 0), and
    {seed: value} of the runs without neighbours and without the term (plain SiD)."""
    curve: dict = {}
    plain: dict = {}
    for s in settings:
        for seed in seeds:
            d = root / run_name(s, seed)
            rec, cfg = d / "sweep_record.json", d / "config.json"
            if not (rec.exists() and cfg.exists()):
                continue
            value = json.loads(rec.read_text())["values"].get(key)
            c = json.loads(cfg.read_text())
            if value is None or c.get("lambda_irl_raw") or c.get("irl_estimator", "pairs") != "pairs":
                continue
            if c["irl_neighbours"] == 0 and c["lambda_irl"] == 0:
                plain[seed] = value
            elif c["irl_neighbours"] > 0:
                curve.setdefault(c["lambda_irl"], {})[seed] = value
    return curve, plain


def plot_weights(study: Study, root: Path, settings: list, seeds: list, path: Path) -> None:
    """Each figure against lambda_irl: the line is the first seed's sweep (every weight has it),
    dots are the other seeds, squares with bars the mean ± s.e. where a weight has several seeds;
    plain SiD's mean is the dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = {k: weight_sweep(root, settings, seeds, k) for k, _ in WEIGHT_PANELS}
    panels = [(k, lab) for k, lab in WEIGHT_PANELS if len(sweeps[k][0]) >= 3]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    first = seeds[0]
    for ax, (key, label) in zip(axes.flat, panels):
        curve, plain = sweeps[key]
        lams = sorted(curve)
        line = [(lam, curve[lam][first]) for lam in lams if first in curve[lam]]
        ax.plot(*zip(*line), "o-", color="C0", ms=4, lw=1, label=f"seed {first}")
        others = [(lam, v) for lam in lams for seed, v in curve[lam].items() if seed != first]
        if others:
            ax.plot(*zip(*others), ".", color="C0", alpha=0.45, label="other seeds")
        means = [(lam, *mean_se(list(curve[lam].values()))[:2]) for lam in lams if len(curve[lam]) >= 2]
        if means:
            xs, ms, ses = zip(*means)
            ax.errorbar(xs, ms, yerr=ses, fmt="s", color="C3", ms=5, capsize=3, label="mean ± s.e.")
        if plain:
            ax.axhline(statistics.fmean(plain.values()), color="grey", ls="--", lw=1,
                       label=f"plain SiD ({len(plain)} seeds)")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.margins(x=0.08)
        ax.set_xlabel("lambda_irl")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study.dataset} {' '.join(study.flags)}: every figure against the isometric weight "
                 "(0 = the same-batch control)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def plot_study(study: Study, summary: dict, path: Path, floor) -> None:
    """Quality against geometry per setting (mean ± s.e. over seeds): FD against PPL and against
    the local defect (pixel and, for shapes, factor space)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("ppl", "local_isometry_defect", "factor_ppl", "local_factor_isometry")
            if any(r.get(k, {}).get("mean") is not None for r in summary.values())]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for s, r in summary.items():
            if r["fd"]["mean"] is None or r[key]["mean"] is None:
                continue
            ax.errorbar(r["fd"]["mean"], r[key]["mean"], xerr=r["fd"]["stderr"] or 0, yerr=r[key]["stderr"] or 0,
                        marker="o", capsize=2, ms=5, label=s)
            ax.annotate(s, (r["fd"]["mean"], r[key]["mean"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if floor:
            ax.axvline(floor, color="grey", ls=":", lw=1, label="FD real vs real")
        ax.set_xlabel("FD (lower = better)")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study.dataset} {' '.join(study.flags)}: quality vs geometry (mean ± s.e. over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    study = STUDIES[args.study]
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = args.only or list(study.settings)
    wanted = set(settings)
    for s in list(settings):  # a setting's start runs are trained too (not reported unless asked)
        wanted.update(needs(study, s))
    pairs = [(s, seed) for seed in args.seeds for s in study.settings if s in wanted]
    if not args.report_only:
        train_missing(study, [(s, seed) for s, seed in pairs if not finished(root / run_name(s, seed))], root, args)
        evaluate_runs(study, [root / run_name(s, seed) for s, seed in pairs], args)
    report(study, args.study, root, settings, args.seeds, Path(args.out))
    prefix = study.prefix or args.study
    table = "geometry_sweep_table.md" if study.prefix else f"{prefix}_table.md"
    print((Path(args.out) / table).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
