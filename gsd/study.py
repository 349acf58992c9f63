"""The paper's tables on the embedded data, end to end: the library of `python -m gsd.experiments`
(whose docstring describes the study to a user).

`run_experiments(args)` plans four distillation runs from one teacher and one seed (`VARIANTS`:
full GSD, without the isometric term, plain SiD, without the SiD term), trains or reuses them
(`plan_runs`, `train_all`: in-process, or `python -m gsd.train --settings-json` subprocesses
that receive the resolved settings), evaluates them with gsd.evaluation.core (`evaluate_all`),
adds the guidance and editing sections, and writes ROOT/results.md (`write_results`) with the
figures of gsd.evaluation.plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import gsd_kernels

from gsd import runs
from gsd.config import DATASET_DEFAULTS, TRAINING_KEYS, resolve_config
from gsd.data import load_dataset
from gsd.distillation.run import run as train_run
from gsd.errors import UsageError
from gsd.evaluation.core import EVAL_FORMAT, EVAL_NAME, default_num_samples, evaluate_loaded, load_run, machine_info
from gsd.evaluation.digits_classifier import digits_classifier
from gsd.evaluation.editing import edit_metrics
from gsd.evaluation.feature_metrics import frechet_distance
from gsd.evaluation.fid import locate_fid_weights
from gsd.evaluation.guidance import format_guidance_table, measure_guidance
from gsd.evaluation.assemble import FeatureSpace
from gsd.evaluation.metrics import batched, class_labels
from gsd.evaluation.plots import plot_fd_curves, plot_latency, plot_losses, plot_samples
from gsd.fileio import atomic_write_bytes, jsonable, write_json_atomic
from gsd.sampling.samplers import heun_sample, latents_for_seeds
from gsd.seed_ranges import SEED_STRIDE
from gsd.teachers.loading import load_run_teacher, load_teacher
from gsd.teachers.recipes import get_teacher
from gsd.util import format_value as fmt  # short: results.md formats dozens of numbers inline
from gsd.util import one_line, resolve_device

__all__ = ["VARIANTS", "RESULTS_NAME", "sizes", "plan_runs", "train_all", "evaluate_all", "guidance_section",
           "edit_section", "write_results", "run_experiments"]

# name -> (settings, description); None means "the command's --lambda-irl / --irl-neighbours value"
VARIANTS = {
    "full": (dict(lambda_sid=1.0, lambda_irl=None, lambda_irl_raw=0.0, irl_neighbours=None),
             "full loss (SiD + isometric)"),
    "no-irl": (dict(lambda_sid=1.0, lambda_irl=0.0, lambda_irl_raw=0.0, irl_neighbours=None),
               "without the isometric loss (--lambda-irl 0)"),
    "plain-sid": (dict(lambda_sid=1.0, lambda_irl=0.0, lambda_irl_raw=0.0, irl_neighbours=0),
                  "plain SiD (--lambda-irl 0 --irl-neighbours 0)"),
    "no-sid": (dict(lambda_sid=0.0, lambda_irl=0.0, lambda_irl_raw=1.0, irl_neighbours=None),
               "without the distillation loss (--lambda-sid 0 --lambda-irl-raw 1)"),
}
RESULTS_NAME = "results.md"


# --------------------------------------------------------------------------- sizes

def sizes(args) -> dict:
    """Iterations, batch and evaluation sizes for the chosen --scale (or --tiny)."""
    dd = DATASET_DEFAULTS[args.dataset]
    if args.tiny:
        return dict(iters=args.iters or 3, batch=8, ckpt_every=1, log_every=1, num_samples=64, ppl_samples=8,
                    isometry_latents=16, latency_repeats=1, latency_batch=16, latency_warmup=1,
                    classifier_epochs=1, guidance_num=8)
    s = float(args.scale)
    iters = args.iters or max(1, int(round(dd["iters"] * s)))
    batch = dd["batch"] * (max(1, min(4, int(round(s)))) if s >= 1 else 1)
    return dict(iters=iters, batch=batch, ckpt_every=max(1, iters // 6), log_every=10,
                num_samples=args.num_samples, ppl_samples=args.ppl_samples or min(10_000, int(512 * max(1.0, s))),
                isometry_latents=512, latency_repeats=args.latency_repeats, latency_batch=64, latency_warmup=2,
                classifier_epochs=30,
                guidance_num=int(200 * max(1.0, s)))


def _run_config(args, sz: dict, variant: str) -> dict:
    v = VARIANTS[variant][0]
    neighbours = args.irl_neighbours if v["irl_neighbours"] is None else v["irl_neighbours"]
    return dict(dataset=args.dataset, teacher=os.path.abspath(args.teacher) if args.teacher else None,
                seed=args.seed, batch=sz["batch"], iters=sz["iters"], lambda_sid=v["lambda_sid"],
                lambda_irl=args.lambda_irl if v["lambda_irl"] is None else v["lambda_irl"],
                lambda_irl_raw=v["lambda_irl_raw"], irl_neighbours=neighbours, irl_radius=args.irl_radius,
                fused=not args.no_fused, trust_pickle=bool(args.teacher and args.trust_pickle),
                device=args.device, ckpt_every=sz["ckpt_every"], keep_every=sz["ckpt_every"], eval_samples=0,
                log_every=sz["log_every"], progress=False, cache_dir=args.cache_dir,
                classifier_epochs=sz["classifier_epochs"])


def _training_view(cfg: dict) -> dict:
    full = resolve_config({k: v for k, v in cfg.items() if k != "out"})
    view = {k: full[k] for k in TRAINING_KEYS if k in full}
    view["iters"] = full["iters"]
    return view


def _run_dir(root: Path, cfg: dict, variant: str) -> Path:
    view = _training_view(cfg)
    digest = hashlib.sha256(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return root / f"{cfg['dataset']}-{variant}-{digest}"


def _find_matching(root: Path, cfg: dict, variant: str, iters: int) -> Path | None:
    """A run folder under root with the same training settings (most advanced first), or None."""
    view = {k: v for k, v in _training_view(cfg).items() if k != "iters"}
    best, best_step = None, -1
    for c in sorted(root.glob(f"{cfg['dataset']}-{variant}-*/{runs.CONFIG_NAME}")):
        if ".stale-" in c.parent.name:
            continue
        try:
            saved = runs.read_config(c.parent)
        except UsageError:
            continue
        if runs.diff_configs(saved, view):
            continue
        step = runs.latest_step(c.parent)
        if step is not None and step <= iters and step > best_step:
            best, best_step = c.parent, step
    return best


def plan_runs(args, sz: dict, root: Path) -> dict:
    """{variant: (config, run_dir, status)} with status 'done', 'resume' or 'new'."""
    plan = {}
    for variant in VARIANTS:
        cfg = _run_config(args, sz, variant)
        d = _run_dir(root, cfg, variant)
        if not d.exists():
            # the name's hash depends on gsd.train's list of training keys; a run written before
            # that list changed is still reused when its saved settings match
            d = _find_matching(root, cfg, variant, sz["iters"]) or d
        cfg["out"] = str(d)
        status = "new"
        if (d / runs.CONFIG_NAME).exists():
            saved = runs.read_config(d)
            view = _training_view(cfg)
            same = not runs.diff_configs(saved, {k: v for k, v in view.items() if k != "iters"})
            step = runs.latest_step(d)
            if same and step is not None and step >= sz["iters"]:
                status = "done"
            elif same and step is not None:
                status = "resume"
            else:  # an aborted start (no checkpoint) or a foreign folder: set it aside, never delete
                aside = d.with_name(f"{d.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
                d.rename(aside)
                print(f"set aside unusable {d} -> {aside}", file=sys.stderr)
        elif d.exists() and any(d.iterdir()):
            aside = d.with_name(f"{d.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            d.rename(aside)
        plan[variant] = (cfg, d, status)
    return plan


# --------------------------------------------------------------------------- training

def _settings_file(root: Path, d: Path, settings: dict) -> Path:
    """A run's resolved settings as JSON, for `python -m gsd.train --settings-json` (the same
    dict the in-process path hands to gsd.distillation.run.run, not flags rebuilt from it)."""
    path = root / f"{d.name}.settings.json"
    write_json_atomic(path, settings)
    return path


def _resume_settings(cfg: dict, d: Path) -> dict:
    """What a resumed run is given: only settings a --resume may change."""
    return {"resume": str(d), "iters": cfg["iters"], "eval_samples": 0, "progress": False, "device": cfg["device"]}


def train_all(plan: dict, *, jobs: int, threads_per_job: int | None, root: Path) -> dict:
    """Train / resume the runs that need it; returns {variant: wall seconds of this invocation}."""
    todo = [(v, cfg, d, st) for v, (cfg, d, st) in plan.items() if st != "done"]
    walls = {v: 0.0 for v in plan}
    if not todo:
        return walls
    if jobs <= 1:
        for v, cfg, d, st in todo:
            t0 = time.perf_counter()
            print(f"[experiments] training {v} -> {d} ({'resume' if st == 'resume' else 'new'})", flush=True)
            train_run(_resume_settings(cfg, d) if st == "resume" else cfg)
            walls[v] = time.perf_counter() - t0
        return walls
    # parallel subprocesses (`python -m gsd.train`), heaviest (SiD) runs first
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads_per_job:
        env["OMP_NUM_THREADS"] = str(threads_per_job)
        env["MKL_NUM_THREADS"] = str(threads_per_job)
    todo.sort(key=lambda r: -plan[r[0]][0]["lambda_sid"])
    running: list = []
    failures = []
    while todo or running:
        while todo and len(running) < jobs:
            v, cfg, d, st = todo.pop(0)
            settings = (_resume_settings(cfg, d) if st == "resume" else {**cfg, "out": str(d)})
            argv = ["--settings-json", str(_settings_file(root, d, settings))]
            log = open(root / f"{d.name}.train.txt", "w")
            print(f"[experiments] training {v} -> {d} (subprocess)", flush=True)
            proc = subprocess.Popen([sys.executable, "-m", "gsd.train", *argv], stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=repo)
            running.append((v, proc, log, time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            v, proc, log, t0 = item
            if proc.poll() is not None:
                log.close()
                walls[v] = time.perf_counter() - t0
                running.remove(item)
                if proc.returncode != 0:
                    failures.append((v, proc.returncode, log.name))
    if failures:
        v, code, name = failures[0]
        tail = ""
        try:
            tail = Path(name).read_text().strip().splitlines()[-1]
        except (OSError, IndexError):
            pass
        raise UsageError(f"training {v} failed (exit {code}; see {name}): {tail}")
    return walls


# --------------------------------------------------------------------------- evaluation

def _eval_matches(path: Path, step: int, settings: dict) -> dict | None:

    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("format") != EVAL_FORMAT or saved.get("step") != step or saved.get("settings") != settings:
        return None
    return saved


@torch.no_grad()
def _grid_samples(run, seed: int, n: int = 64) -> dict:
    """The first n samples of the evaluation latents, one-step and teacher (for the figure)."""

    if len(run.sample_shape) == 1:
        n = 2000
    eps = latents_for_seeds(range(seed * SEED_STRIDE, seed * SEED_STRIDE + n), run.sample_shape, run.device)
    lab = class_labels(n, run.num_classes, run.device)
    return {"one_step": run.generator(eps, lab).float().cpu(),
            "teacher": heun_sample(run.teacher, eps, lab).float().cpu()}


@torch.no_grad()
def fd_curve(run, feats, *, num_samples: int, seed: int) -> list[dict]:
    """FD of the EMA generator at step 0 (the teacher copy) and at every kept checkpoint."""

    if feats.fd is None and run.dataset.mixture is None:
        return []
    ds = run.dataset
    dev = run.device
    eps = latents_for_seeds(range(seed * SEED_STRIDE, seed * SEED_STRIDE + num_samples), ds.sample_shape, dev)
    labels = class_labels(num_samples, run.num_classes, dev)
    if ds.mixture is not None:
        ref = ds.mixture.sample(num_samples, generator=torch.Generator().manual_seed(123456))[0]
        fd = lambda x: frechet_distance(x, ref)  # noqa: E731
    else:
        f_real = feats.fd(ds.data)
        fd = lambda x: frechet_distance(feats.fd(x), f_real)  # noqa: E731
    s = float(run.generator.sigma_init)
    net0 = run.extra["teacher_net"]
    g0 = lambda e, l: net0(s * e, torch.full((e.shape[0],), s, device=e.device), l)  # noqa: E731
    out = [{"iteration": 0, "fd": fd(batched(g0, eps, labels))}]
    gen = run.generator
    for st in runs.complete_steps(run.run_dir):
        weights, _ = runs.load_checkpoint(run.run_dir, st)
        gen.load_checkpoint_weights({k: v.to(dev) for k, v in weights.items()})
        out.append({"iteration": st, "fd": fd(batched(lambda e, l: gen(e, l), eps, labels))})
    # leave the generator at the evaluated (latest) checkpoint
    weights, _ = runs.load_checkpoint(run.run_dir, run.step)
    gen.load_checkpoint_weights({k: v.to(dev) for k, v in weights.items()})
    return out


def evaluate_all(plan: dict, args, sz: dict, root: Path) -> tuple[dict, dict, dict]:
    """(eval results, samples, fd curves) per variant; reuses matching eval.json files."""

    results, samples, curves = {}, {}, {}
    teacher_cache: dict = {}
    feats = None
    for v, (cfg, d, _st) in plan.items():
        run = load_run(d, device=args.device)
        if feats is None:
            feats = FeatureSpace(run.dataset, run.device, cache_dir=args.cache_dir,
                              classifier_epochs=sz["classifier_epochs"])
        settings_kw = dict(num_samples=sz["num_samples"], ppl_samples=sz["ppl_samples"], seed=args.seed,
                           isometry_latents=sz["isometry_latents"], latency_repeats=sz["latency_repeats"],
                           latency_batch=sz["latency_batch"], latency_warmup=sz["latency_warmup"],
                           classifier_epochs=sz["classifier_epochs"], fid_weights=args.fid_weights,
                           cache_dir=args.cache_dir)
        settings = {"num_samples": sz["num_samples"], "ppl_samples": sz["ppl_samples"], "seed": int(args.seed),
                    "isometry_latents": sz["isometry_latents"], "latency_batch": sz["latency_batch"],
                    "latency_repeats": sz["latency_repeats"], "teacher_steps": 18,
                    "fid_weights": None if args.fid_weights is None else str(args.fid_weights)}
        saved = None if args.re_evaluate else _eval_matches(d / EVAL_NAME, run.step, settings)
        if saved is not None and (saved.get("fid") is not None or args.fid_weights is None):
            print(f"[experiments] reusing {d.name}/{EVAL_NAME}", flush=True)
            res, smp = saved, _grid_samples(run, args.seed, min(64, sz["num_samples"]))
            res["reused"] = True
        else:
            print(f"[experiments] evaluating {v} ({d.name})", flush=True)
            res, smp = evaluate_loaded(run, teacher_cache=teacher_cache, features=feats, **settings_kw)
            write_json_atomic(d / EVAL_NAME, jsonable(res))
        results[v], samples[v] = res, smp
        logged = [{"iteration": int(r["iteration"]), "fd": float(r["fd"])} for r in runs.read_log(d)
                  if isinstance(r.get("fd"), (int, float)) and "iteration" in r]
        if logged:  # the training log carries a periodic FD: use it as is
            curves[v] = logged
            continue
        curve_file = d / "fd_curve.json"
        key = {"num_samples": res["num_samples"], "seed": args.seed, "step": run.step}
        curve = None
        try:
            saved = json.loads(curve_file.read_text())
            if saved.get("key") == key:
                curve = saved["curve"]
        except (OSError, ValueError, KeyError):
            pass
        if curve is None:
            curve = fd_curve(run, feats, num_samples=res["num_samples"], seed=args.seed)
            write_json_atomic(curve_file, jsonable({"key": key, "curve": curve}))
        curves[v] = curve
    return results, samples, curves


# --------------------------------------------------------------------------- extras (other modules)

def guidance_section(teacher, dataset, *, num: int, steps: int, seed: int, device, cache_dir=None) -> tuple[str, str]:
    """(status, markdown) of the DSG guidance table from gsd.evaluation.guidance, or why it is missing."""
    t0 = time.perf_counter()
    try:
        result = measure_guidance(teacher, dataset, num=num, steps=steps, seed=seed, device=device,
                                  cache_dir=cache_dir)
        table = format_guidance_table(result)
    except Exception as exc:  # noqa: BLE001 - another module's failure must not sink the tables
        msg = one_line(exc, 300)
        return "failed", f"_Failed: gsd.evaluation.guidance.measure_guidance raised {type(exc).__name__}: {msg}._"
    return "ok", (f"`gsd.evaluation.guidance.measure_guidance(teacher, dataset, num={num}, steps={steps}, seed={seed})` "
                  f"({time.perf_counter() - t0:.1f} s):\n\n{table}")


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def edit_section(run_dirs: dict, *, device, seed: int, num: int | None = None) -> tuple[str, str]:
    """(status, markdown) of gsd.edit.edit_metrics for each run, or why it is missing."""
    rows, cols = {}, []
    t0 = time.perf_counter()
    for name, d in run_dirs.items():
        try:
            kw = dict(device=device, seed=seed)
            if num is not None:
                kw.update(num=num)
            res = edit_metrics(d, **kw)
        except Exception as exc:  # noqa: BLE001
            msg = one_line(exc, 300)
            return "failed", f"_Failed: gsd.edit.edit_metrics({d}) raised {type(exc).__name__}: {msg}._"
        flat = _flatten(res) if isinstance(res, dict) else {"result": res}
        # the headline numbers only: per-class detail and long descriptions stay in gsd.edit's output
        flat = {k: v for k, v in flat.items() if not k.startswith(("per_class.", "_"))
                and (isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 60))}
        rows[name] = flat
        for k in flat:
            if k not in cols:
                cols.append(k)
    lines = ["| metric | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for k in cols:
        lines.append(f"| {k} | " + " | ".join(fmt(rows[n].get(k)) for n in rows) + " |")
    return "ok", (f"`gsd.edit.edit_metrics(run_dir)` per run ({time.perf_counter() - t0:.1f} s):\n\n"
                  + "\n".join(lines))












# --------------------------------------------------------------------------- results.md

def _pm(v, se):
    if v is None:
        return "-"
    return f"{fmt(v)} ± {fmt(se, '.2g')}" if se is not None and isinstance(se, float) and math.isfinite(se) \
        else fmt(v)


def _train_stats(d: Path) -> dict:
    log = runs.read_log(d)
    if not log:
        return {"train_seconds": None, "iters": 0}
    last = log[-1]
    sec = float(last.get("time", 0.0))
    it = int(last.get("iteration", 0))
    return {"train_seconds": sec, "iters": it, "sec_per_iter": sec / it if it else None}


def _compare(a, sa, b, sb, what: str, lower_name: str, other_name: str) -> str:
    """A plain sentence on whether `a` (lower_name) is lower than `b` (other_name), with noise."""
    if a is None or b is None:
        return f"{what}: not available"
    noise = None
    if sa is not None and sb is not None and math.isfinite(sa) and math.isfinite(sb):
        noise = 2 * math.sqrt(sa * sa + sb * sb)
    rel = (a - b) / abs(b) if b else float("nan")
    if noise is not None and abs(a - b) <= noise:
        return (f"{what}: {lower_name} {fmt(a)} vs {other_name} {fmt(b)}: the difference is within two standard "
                f"errors, i.e. the isometric loss did NOT measurably lower it at this sample size")
    if a == b:
        return f"{what}: {lower_name} {fmt(a)} vs {other_name} {fmt(b)}: identical"
    if a < b:
        return f"{what}: {lower_name} {fmt(a)} vs {other_name} {fmt(b)} ({100 * rel:+.1f}%): lower with the isometric loss"
    return (f"{what}: {lower_name} {fmt(a)} vs {other_name} {fmt(b)} ({100 * rel:+.1f}%): the isometric loss did "
            f"NOT lower it in this run.")


def _setup_lines(args, sz, full: dict, machine: dict, timings: dict) -> list[str]:
    """The title, the command, and the Setup section (machine, data, settings, estimators)."""
    lat = full["latency"]
    L = []
    L.append(f"# GSD experiments: {args.dataset}\n")
    L.append(f"Generated by `python -m gsd.experiments {' '.join(sys.argv[1:]) if args.argv is None else ' '.join(args.argv)}`"
             f" on {time.strftime('%Y-%m-%d %H:%M:%S')}; total wall time {timings['total']:.0f} s "
             f"(training {timings['train']:.0f} s, evaluation {timings['eval']:.0f} s, extras {timings['extras']:.0f} s, "
             f"teacher/classifier preparation {timings['prepare']:.0f} s).\n")
    L.append("## Setup\n")
    L.append(f"- machine: {machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
             f"(threads {machine['torch_threads']}), device `{machine['device']}`"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
             + f"; 1-min load average {machine.get('load_average_start', '?')} at the start, "
               f"{machine.get('load_average_end', '?')} at the end (a load above the core count means other "
               f"processes shared the CPU and every time below is inflated).")
    L.append(f"- data: `{args.dataset}`; teacher: {'`' + args.teacher + '`' if args.teacher else 'the default cached teacher (gsd.teacher.get_teacher, seed 0)'}"
             f" ({full['teacher_kind']}).")
    L.append(f"- distillation: {sz['iters']} iterations, batch {sz['batch']}, seed {args.seed}, "
             f"{'fused ops' if not args.no_fused else 'reference ops'}, other settings gsd.train's defaults; "
             f"full loss uses --lambda-irl {args.lambda_irl} --irl-neighbours {args.irl_neighbours} "
             f"--irl-radius {args.irl_radius}; scale {args.scale}{' (tiny test size)' if args.tiny else ''}; "
             f"{args.jobs} training job(s) in parallel.")
    L.append(f"- evaluation: {full['num_samples']} samples per FD (latent seeds {full['latent_seeds'][0]}..{full['latent_seeds'][1]},"
             f" the same for every run and for the teacher); FD feature space: {full['fd_feature']}.")
    if full.get("ppl_settings"):
        ps = full["ppl_settings"]
        L.append(f"- PPL: {ps['num_pairs']} latent pairs, eps {ps['eps']}, percentile filter {ps['percentiles']}, "
                 f"features: {full['ppl_feature']}; computed in float64; ± is one standard error.")
    L.append(f"- isometry defect: optimal-scale isometry loss on {full['isometry_latents']} held-out latents "
             f"(0 = pairwise distances exactly proportional).")
    L.append(f"- latency: batch {lat['batch']}, {lat['method']}, {lat['repeats']} repeats.")
    if full.get("fid_unavailable"):
        L.append(f"- FID: **not computed**: {full['fid_unavailable']}. The FD above is in a classifier's feature "
                 f"space and is not FID.")
    else:
        L.append(f"- FID: {full.get('fid_feature')}, {full.get('fid_real_samples')} real images.")
    L.append("")
    return L


def _table1_lines(full: dict) -> list[str]:
    """Table 1: the teacher's multi-step sampler against the one-step generator."""
    t, one, lat = full["teacher"], full["one_step"], full["latency"]
    L = []
    L.append("## Table 1: multi-step teacher (MSA) vs GSD one-step\n")
    has_fid = one.get("fid") is not None
    head = "| sampler | NFE | FD | " + ("FID | " if has_fid else "") + "PPL | inference time (ms / batch of " \
        f"{lat['batch']}) |"
    L.append(head)
    L.append("|---|---|---|" + ("---|" if has_fid else "") + "---|---|")
    for label, m in (("MSA: teacher Heun, 18 steps", t), ("GSD one-step (full loss)", one)):
        L.append(f"| {label} | {m['nfe']} | {fmt(m['fd'])} | " + (f"{fmt(m.get('fid'))} | " if has_fid else "")
                 + f"{_pm(m.get('ppl'), m.get('ppl_stderr'))} | {fmt(m['latency_ms'], '.1f')} |")
    red = lat["reduction"]
    L.append("")
    L.append(f"Inference time reduction of the one-step generator vs the 35-NFE teacher at batch {lat['batch']}: "
             f"**{100 * red:.1f}%** ({lat['speedup']:.1f}x faster; target >= 95%: "
             f"{'met' if red >= 0.95 else 'NOT met'}).")
    if "real_split_fd" in full:
        L.append(f"Noise floor: FD between two halves of the real data = {fmt(full['real_split_fd'])}.")
    if "true_vs_true" in full:
        L.append(f"Noise floor: true mixture vs an independent true sample: FD {fmt(full['true_vs_true']['fd'])}, "
                 f"sliced W2 {fmt(full['true_vs_true']['sliced_wasserstein'])}.")
    L.append("")
    return L


def _table2_lines(args, plan: dict, results: dict) -> tuple[list[str], dict]:
    """Table 2, the loss ablation; returns (lines, training statistics per run)."""
    t, one = results["full"]["teacher"], results["full"]["one_step"]
    L = []
    L.append("## Table 2: loss ablation\n")
    gm = "sliced_wasserstein" in one
    L.append("| run | lambda_sid | lambda_irl (F) | lambda_irl_raw | neighbours K | FD | KID | PPL | isometry defect "
             "| local isometry defect | " + ("sliced W2 | MMD^2 | modes | " if gm else "")
             + "train time (s) | s / iter | one-step ms |")
    L.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if gm else "") + "---|---|---|")
    stats = {}
    for v, r in results.items():
        st = _train_stats(plan[v][1])
        stats[v] = st
        cfg = plan[v][0]
        o = r["one_step"]
        L.append(f"| {VARIANTS[v][1]} | {fmt(cfg['lambda_sid'])} | {fmt(cfg['lambda_irl'])} | "
                 f"{fmt(cfg['lambda_irl_raw'])} | {cfg['irl_neighbours']} | {fmt(o.get('fd'))} | "
                 f"{_pm(o.get('kid'), o.get('kid_stderr'))} | {_pm(o.get('ppl'), o.get('ppl_stderr'))} | "
                 f"{fmt(r['isometry_defect'])} | {fmt(o.get('local_isometry_defect'))} | "
                 + (f"{fmt(o['sliced_wasserstein'])} | {fmt(o['mmd'])} | {o['modes_covered']}/{o['num_modes']} | "
                    if gm else "")
                 + f"{fmt(st['train_seconds'], '.0f')} | {fmt(st.get('sec_per_iter'), '.3f')} | "
                   f"{fmt(o['latency_ms'], '.1f')} |")
    L.append(f"| (teacher Heun, for reference) | - | - | - | - | {fmt(t.get('fd'))} | "
             f"{_pm(t.get('kid'), t.get('kid_stderr'))} | {_pm(t.get('ppl'), t.get('ppl_stderr'))} | "
             f"{fmt(t.get('isometry_defect'))} | {fmt(t.get('local_isometry_defect'))} | "
             + (f"{fmt(t['sliced_wasserstein'])} | {fmt(t['mmd'])} | {t['modes_covered']}/{t['num_modes']} | " if gm else "")
             + f"- | - | {fmt(t['latency_ms'], '.1f')} |")
    L.append("")
    L.append("Train time is the distillation loop's own clock from log.jsonl (checkpointing included, "
             "evaluation excluded)" + (", with runs trained in parallel processes" if args.jobs > 1 else "") + ". "
             "lambda_irl is the scale-free weight (the isometric gradient at the generator output as a fraction "
             "of the SiD gradient's norm); lambda_irl_raw the raw weight of the loss. The local isometry defect "
             "is the isometry loss over held-out anchors and their sphere neighbours only.")
    L.append("")
    return L, stats


def _ablation_lines(results: dict, curves: dict) -> list[str]:
    """What the ablation shows, read off the numbers in plain sentences."""
    full, noirl, nosid, plain = results["full"], results["no-irl"], results["no-sid"], results["plain-sid"]
    one, t = full["one_step"], full["teacher"]
    L = []
    L.append("### What the ablation shows (read off the numbers above, not tuned; one seed)\n")
    for other, name in ((noirl, "without IRL"), (plain, "plain SiD")):
        L.append("- " + _compare(one.get("ppl"), one.get("ppl_stderr"), other["one_step"].get("ppl"),
                                 other["one_step"].get("ppl_stderr"), "PPL", "full loss", name) + ".")
        for key, what in (("isometry_defect", "Isometry defect"), ("local_isometry_defect", "Local isometry defect")):
            L.append("- " + _compare(one.get(key, full.get(key)), None, other["one_step"].get(key, other.get(key)),
                                     None, what, "full loss", name)
                     + " (one estimate on the same held-out latents for both runs, no error bar.)")
        fd_a, fd_b = one.get("fd"), other["one_step"].get("fd")
        if fd_a is not None and fd_b is not None:
            L.append(f"- FD: full loss {fmt(fd_a)} vs {name} {fmt(fd_b)} ({fd_a / fd_b:.2f}x; "
                     f"{'lower (better)' if fd_a < fd_b else 'higher (worse)' if fd_a > fd_b else 'equal'} with the "
                     f"isometric loss); teacher {fmt(t.get('fd'))}.")
    fd_c = nosid["one_step"].get("fd")
    if fd_c is not None:
        L.append(f"- Without the distillation loss the generator only learns the isometry: FD {fmt(fd_c)}, isometry "
                 f"defect {fmt(nosid['isometry_defect'])} (the teacher copy it starts from has FD "
                 f"{fmt(curves['no-sid'][0]['fd']) if curves.get('no-sid') else '-'}).")
    L.append("")
    return L


def _closing_lines(plan: dict, results: dict, stats: dict, walls: dict, extras: dict, png) -> list[str]:
    """Figures, the guidance and editing sections, and where each run came from."""
    L = []
    L.append("## Figures\n")
    for title, name in png:
        L.append(f"- {title}: ![{title}]({name})")
    L.append("")

    L.append("## DSG guidance (gsd.evaluation.guidance)\n")
    L.append(extras["guidance"][1])
    L.append("")
    L.append("## Latent editing (gsd.edit)\n")
    L.append(extras["edit"][1])
    L.append("")

    L.append("## Runs\n")
    for v, (cfg, d, st) in plan.items():
        s = stats.get(v, {})
        L.append(f"- `{v}`: `{d}` ({'reused' if st == 'done' else 'resumed' if st == 'resume' else 'trained'} "
                 f"in this invocation; {s.get('iters')} iterations; eval.json "
                 f"{'reused (same settings and step)' if results[v].get('reused') else 'written there'}; this "
                 f"invocation spent {walls.get(v, 0):.0f} s training it)")
    L.append("")
    return L


def write_results(path: Path, *, args, sz, plan, results, curves, walls, extras, machine, timings, png) -> str:
    """ROOT/results.md from the evaluated runs; returns its text."""
    table2, stats = _table2_lines(args, plan, results)
    L = (_setup_lines(args, sz, results["full"], machine, timings) + _table1_lines(results["full"]) + table2
         + _ablation_lines(results, curves) + _closing_lines(plan, results, stats, walls, extras, png))
    text = "\n".join(L) + "\n"
    atomic_write_bytes(path, text.encode())
    return text


# --------------------------------------------------------------------------- driver

def _check_inputs(args, dev) -> None:
    """One-line errors for what the runs would refuse, before anything is written."""
    if args.fid_weights is not None:
        locate_fid_weights(args.fid_weights)
    if not args.no_fused:  # the training subprocesses run gsd.train --fused
        try:
            gsd_kernels.fused_backend(dev)
        except ValueError as exc:
            raise UsageError(f"--fused training runs: {one_line(exc)}") from None
    if args.teacher is not None:  # what gsd.train accepts, with the one fit check
        load_teacher(args.teacher, dataset=load_dataset(args.dataset), device=dev, trust_pickle=args.trust_pickle)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _figures(plan: dict, results: dict, samples: dict, curves: dict, dataset, root: Path) -> list:
    """The PNGs next to results.md; returns their (title, file name) pairs."""
    logs = {v: runs.read_log(d) for v, (_c, d, _s) in plan.items()}
    plot_losses(logs, root / "loss_curves.png")
    plot_fd_curves(curves, results["full"]["teacher"]["fd"], results["full"]["fd_feature"],
                   root / "fd_over_training.png")
    plot_latency(results, root / "latency.png")
    plot_samples(samples, dataset, root / "samples.png")
    return [("loss curves", "loss_curves.png"),
            ("FD over training (EMA generator at every kept checkpoint; iteration 0 = the teacher copy)",
             "fd_over_training.png"),
            ("latency, batch 64", "latency.png"),
            ("samples from the same latents (teacher, then each run)", "samples.png")]


def _extras(args, plan: dict, sz: dict, dataset, dev) -> dict:
    """The guidance and latent-editing sections (other modules; a failure is reported, not fatal)."""
    if args.tiny or args.no_extras:
        why = "--tiny" if args.tiny else "--no-extras"
        return {"guidance": ("skipped", f"_Skipped ({why})._"), "edit": ("skipped", f"_Skipped ({why})._")}
    extras = {}
    teacher_net = load_run_teacher(plan["full"][1], device=dev)
    if args.dataset == "digits":
        extras["guidance"] = guidance_section(teacher_net, dataset, num=sz["guidance_num"], steps=30,
                                              seed=args.seed, device=dev, cache_dir=args.cache_dir)
    else:
        extras["guidance"] = ("skipped", "_Not run: the guidance table is defined for digits only._")
    extras["edit"] = edit_section({v: plan[v][1] for v in ("full", "no-irl")}, device=dev, seed=args.seed)
    return extras


def run_experiments(args) -> Path:
    """The whole study (module docstring) under args.root; returns the path of results.md."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    args.device = str(dev) if args.device == "auto" else args.device
    _check_inputs(args, dev)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    sz = sizes(args)
    dataset = load_dataset(args.dataset)
    if sz["num_samples"] is None:
        sz["num_samples"] = default_num_samples(args.dataset, len(dataset))
    machine = machine_info(dev)
    if _load_average() is not None:
        machine["load_average_start"] = _load_average()

    # teacher and classifier first (cached; trained once on a clean machine), so that parallel
    # training jobs find them and do not race to train them
    t0 = time.perf_counter()
    if args.teacher is None:
        get_teacher(dataset, cache_dir=args.cache_dir, device=dev, seed=0, progress=False)
    if args.dataset == "digits":
        digits_classifier(dataset, cache_dir=args.cache_dir, device=dev, epochs=sz["classifier_epochs"])
    t_prepare = time.perf_counter() - t0

    plan = plan_runs(args, sz, root)
    t0 = time.perf_counter()
    threads_per_job = max(1, (args.threads or os.cpu_count() or 1) // max(args.jobs, 1)) if dev.type == "cpu" else None
    walls = train_all(plan, jobs=args.jobs, threads_per_job=threads_per_job, root=root)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    results, samples, curves = evaluate_all(plan, args, sz, root)
    t_eval = time.perf_counter() - t0
    png = _figures(plan, results, samples, curves, dataset, root)
    t0 = time.perf_counter()
    extras = _extras(args, plan, sz, dataset, dev)
    t_extras = time.perf_counter() - t0

    if _load_average() is not None:
        machine["load_average_end"] = _load_average()
    timings = {"total": time.perf_counter() - t_start, "train": t_train, "eval": t_eval, "extras": t_extras,
               "prepare": t_prepare}
    out = root / RESULTS_NAME
    write_results(out, args=args, sz=sz, plan=plan, results=results, curves=curves, walls=walls, extras=extras,
                  machine=machine, timings=timings, png=png)
    summary = {"timings": timings, "machine": machine, "sizes": sz,
               "runs": {v: str(d) for v, (_c, d, _s) in plan.items()}}
    write_json_atomic(root / "experiments.json", jsonable(summary))
    print(f"[experiments] wrote {out} ({timings['total']:.0f} s)")
    return out
