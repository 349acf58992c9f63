"""Wall-clock time of a data set's default run from an empty cache, as a newcomer runs it.

`python -m gsd.train --dataset D --fused` with a fresh GSD_CACHE (so the teacher and the
evaluation's feature network are trained too, and the run ends with its own evaluation), then
`python -m gsd.evaluate RUN` (for shapes: the factor metrics).

    python benchmarks/default_run_time.py --dataset shapes --out results/shapes/default_run_time.json

The machine's load average before and after is recorded beside the times: a figure taken while
other work shared the cores says so in its own file. Nothing of the user's cache is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO).returncode
    return time.perf_counter() - start, rc


def phases(work: Path, run_dir: Path, start_epoch: float) -> dict:
    """gsd.train's phases: the teacher recipe (until the teacher file appears in the fresh cache),
    the distillation (metrics.json's train_seconds); the rest of gsd.train is start-up, the
    evaluation's feature network and the end-of-run evaluation."""
    teachers = sorted((work / "cache" / "teachers").glob("*.safetensors"))
    metrics = run_dir / "metrics.json"
    return {"teacher_seconds": round(teachers[0].stat().st_mtime - start_epoch, 1) if teachers else None,
            "distillation_seconds": json.loads(metrics.read_text()).get("train_seconds") if metrics.exists() else None}


def run_settings(run_dir: Path) -> dict | None:
    """What the default run was (its config.json): defaults change, so the timing says which it timed."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: cfg.get(k) for k in ("iters", "batch", "lambda_irl", "irl_neighbours", "irl_radius", "shapes_kinds",
                                    "resolution", "seed") if k in cfg}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/default_run_time.py", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--out", required=True, help="JSON file for the times")
    p.add_argument("--keep", default=None, help="keep the run directory and logs here (default: a temporary one)")
    args = p.parse_args(argv)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gsd-default-run-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GSD_CACHE=str(work / "cache"))
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    run_dir = work / "run"
    load_before, start_epoch = os.getloadavg(), time.time()
    train_s, train_rc = timed([sys.executable, "-m", "gsd.train", "--dataset", args.dataset, "--fused",
                               "--no-progress", "--out", str(run_dir)], env, work / "train.log")
    eval_s, eval_rc = (timed([sys.executable, "-m", "gsd.evaluate", str(run_dir)], env, work / "evaluate.log")
                       if train_rc == 0 else (None, None))
    load_after = os.getloadavg()
    import torch

    record = {
        "command": f"python benchmarks/default_run_time.py --dataset {args.dataset} --out {args.out}",
        "dataset": args.dataset,
        "run_settings": run_settings(run_dir),
        "train_seconds": round(train_s, 1), "train_exit": train_rc,
        **phases(work, run_dir, start_epoch),
        "evaluate_seconds": None if eval_s is None else round(eval_s, 1), "evaluate_exit": eval_rc,
        "total_seconds": None if eval_s is None else round(train_s + eval_s, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    print(f"logs and run directory: {work}")
    return 0 if train_rc == 0 and eval_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
