"""Run directories: config.json, a JSONL log, atomic checkpoints, resume.

Layout of a run directory::

    config.json                 the resolved settings (written once, atomically)
    teacher.safetensors         the teacher f_phi used (so a resume / evaluation uses the same one)
    log.jsonl                   one JSON object per logged iteration (appended, flushed)
    checkpoints/
        ckpt-00000500.safetensors   network weights (generator, fake score, EMA)
        ckpt-00000500.pt            optimiser / EMA / RNG / step state (torch.save, weights_only)
        latest.json                 {"step": 500}: the newest complete checkpoint
    samples.png, metrics.json   written by the evaluation at the end

Every file is written to a temporary name in the same folder, fsync'ed and moved into
place with `os.replace`, and `latest.json` is replaced only after both halves of a
checkpoint are on disk: a crash or kill at any moment leaves the previous checkpoint
intact and `latest.json` pointing at a complete one. The temporary files a kill leaves
(`.NAME.tmpPID`) are removed by `remove_stale_temp_files` on the next start.

If `latest.json` points at a checkpoint with a missing half, `find_checkpoint` falls back
to the newest complete kept one. A run directory without any complete checkpoint holds no
training: `prepare_run_dir(..., allow_restart=True)` lets a new run take it over
(`clear_dead_run` removes its files; a folder with anything else in it is never emptied).

JSON files (config.json, metrics.json, log.jsonl) are standard JSON: a non-finite number
is written as null.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from gsd.errors import UsageError
from gsd.fileio import (  # noqa: F401  (atomic writers: re-exported, runs' API since the start)
    atomic_save_safetensors, atomic_torch_save, atomic_write_bytes, jsonable as _jsonable, write_json_atomic,
)
from gsd.util import check_creatable

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
CKPT_DIR = "checkpoints"
LATEST_NAME = "latest.json"
TEACHER_NAME = "teacher.safetensors"           # the run's copy of a gsd / imported EDM teacher
TEACHER_FOLDER_NAME = "teacher-diffusers"      # the run's copy of a diffusers teacher

__all__ = [
    "default_run_dir", "prepare_run_dir", "check_resume_dir", "diff_configs", "write_json_atomic",
    "read_config", "upgrade_config", "JsonlLogger", "read_log", "save_checkpoint", "load_checkpoint", "latest_step",
    "capture_rng_state", "restore_rng_state", "atomic_write_bytes", "atomic_torch_save",
    "atomic_save_safetensors", "find_checkpoint", "complete_steps", "check_out_path", "remove_stale_temp_files",
    "restartable", "clear_dead_run", "load_checkpoint_weights", "load_checkpoint_state",
]


# --------------------------------------------------------------------------- run directory

def default_run_dir(dataset: str, root="runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{dataset}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


# What a run written before a setting existed was trained with: config.json files (and
# checkpoints) from before the scale-free --lambda-irl had `lambda_irl` = the RAW weight and none
# of these keys. Filled in here, not from today's defaults, which may change.
LEGACY_SETTINGS = {"irl_estimator": "pairs", "irl_neighbours": 0, "dropout": None}
# Settings added after the scale-free --lambda-irl, with the value every run before them had:
# without them, resuming an older gmm run would switch its new per-dataset default on. (A run
# from before the ramp-up ratio became 0.05 had 0.1: its checkpoint's value wins on --resume,
# gsd.training.CKPT_OWNED.)
ADDED_SETTINGS = {"lambda_regress": 0.0, "regress_pairs": 16384, "regress_ratio": 1, "ema_rampup": 0.05}


def upgrade_config(cfg: dict) -> dict:
    """A copy of a saved run configuration in today's terms: without `lambda_irl_raw`, its
    `lambda_irl` was the raw weight, so it becomes lambda_irl_raw (and lambda_irl 0); keys
    added since take the values the run was trained with (LEGACY_SETTINGS, ADDED_SETTINGS)."""
    if not isinstance(cfg, dict) or "lambda_irl" not in cfg:
        return cfg
    out = dict(cfg)
    if "lambda_irl_raw" not in cfg:
        out["lambda_irl_raw"], out["lambda_irl"] = cfg["lambda_irl"], 0.0
        for key, value in LEGACY_SETTINGS.items():
            out.setdefault(key, value)
    for key, value in ADDED_SETTINGS.items():
        out.setdefault(key, value)
    return out


def read_config(run_dir) -> dict:
    """A run's config.json (upgraded to today's keys: `upgrade_config`)."""
    path = Path(run_dir) / CONFIG_NAME
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{run_dir} is not a gsd run directory (no {CONFIG_NAME})")
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}")
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} does not hold a run configuration")
    return upgrade_config(cfg)


def _norm(value):
    """Compare config values as JSON would store them (tuples -> lists, ints == floats)."""
    if isinstance(value, tuple):
        return [_norm(v) for v in value]
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def diff_configs(saved: dict, given: dict, ignore: Iterable[str] = ()) -> list[str]:
    """Keys of `given` whose value differs from `saved` (keys in `ignore` skipped)."""
    ignore = set(ignore)
    out = []
    for key in sorted(given):
        if key in ignore:
            continue
        if key not in saved:
            out.append(key)
        elif _norm(saved[key]) != _norm(given[key]):
            out.append(key)
    return out


def _describe(keys: list[str], saved: dict, given: dict) -> str:
    parts = []
    for k in keys[:4]:
        parts.append(f"{k}: run has {saved.get(k, '<unset>')!r}, given {given[k]!r}")
    more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
    return "; ".join(parts) + more


def check_out_path(out, flag: str = "--out") -> None:
    """Raise UsageError (one line) unless a run directory can be created at `out`: not a
    file, and (gsd.util.check_creatable) not in /proc, /sys or /dev, with a writable folder
    on a writable file system at or above it. Nothing is created."""
    check_creatable(out, out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out)), flag)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UsageError(f"{flag} {out} exists and is not a directory")


_TMP_RE = re.compile(r"^\..+\.tmp(\d+)$")
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.(safetensors|pt)$")
_RUN_FILES = {CONFIG_NAME, LOG_NAME, TEACHER_NAME, TEACHER_FOLDER_NAME, CKPT_DIR}


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if not 0 < pid < 2 ** 31:  # kill(0) would signal our process group
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def remove_stale_temp_files(run_dir) -> list[Path]:
    """Delete the `.NAME.tmpPID` files that a killed writer left in a run directory and its
    checkpoints/ (those of a process that still runs are kept); returns what was removed."""
    removed = []
    for d in (Path(run_dir), Path(run_dir) / CKPT_DIR):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = _TMP_RE.match(p.name)
            if m and p.is_file() and not _pid_alive(int(m.group(1))):
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def restartable(out) -> bool:
    """True for a run directory that has no complete checkpoint and holds nothing but the
    files a run writes (config, log, teacher copy, checkpoint halves, temporary files)."""
    out = Path(out)
    if not (out / CONFIG_NAME).is_file() or find_checkpoint(out)[0] is not None:
        return False
    for p in out.iterdir():
        if p.name not in _RUN_FILES and not _TMP_RE.match(p.name):
            return False
    ck = out / CKPT_DIR
    if ck.exists():
        if not ck.is_dir():
            return False
        for p in ck.iterdir():
            if not (p.is_file() and (p.name == LATEST_NAME or _CKPT_RE.match(p.name) or _TMP_RE.match(p.name))):
                return False
    return True


def clear_dead_run(out) -> None:
    """Remove the files of a `restartable` run directory (the folder itself stays)."""
    out = Path(out)
    if not restartable(out):
        raise UsageError(f"--out {out} is no longer a run without checkpoints; choose another --out")
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare_run_dir(out, config: dict, *, allow_restart: bool = False) -> Path:
    """Check that `out` may receive a new run (absent or empty); raise UsageError if not.

    allow_restart: also accept a run directory with no complete checkpoint and nothing but
    run files in it (`restartable`); the caller removes its files with `clear_dead_run`.
    Nothing is created or removed here: the caller does that once every check has passed.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
        if (out / CONFIG_NAME).exists():
            if allow_restart and restartable(out):
                return out
            try:
                saved = read_config(out)
            except UsageError:
                saved = None
            if saved is not None and not diff_configs(saved, config, ignore=("iters", "device", "out", "resume")):
                raise UsageError(f"--out {out} already holds this run; pass --resume {out} to continue it")
            raise UsageError(f"--out {out} already holds a different run; choose another --out "
                             f"or --resume {out} with its settings")
        if any(out.iterdir()):
            raise UsageError(f"--out {out} is not empty and is not a gsd run; choose another --out")
    return out


def check_resume_dir(run_dir, given: dict, ignore: Iterable[str] = ("iters", "device", "out", "resume")) -> dict:
    """Validate `--resume DIR` against the explicitly given settings; returns the saved config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: no such run directory")
    saved = read_config(run_dir)
    diff = diff_configs(saved, given, ignore=ignore)
    if diff:
        raise UsageError(f"--resume {run_dir} does not match the given flags ({_describe(diff, saved, given)})")
    if find_checkpoint(run_dir)[0] is None:
        raise UsageError(f"--resume {run_dir}: the run has no complete checkpoint to continue from; start it "
                         f"again with --out {run_dir}")
    return saved


# --------------------------------------------------------------------------- log

class JsonlLogger:
    """Append-only JSON-lines log, flushed (and fsync'ed) after every record."""

    def __init__(self, path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # a resumed run drops records written after its checkpoint (they will be redone)
            keep = [r for r in read_log(self.path) if int(r.get("iteration", -1)) <= truncate_after_step]
            atomic_write_bytes(self.path, "".join(json.dumps(_jsonable(r), allow_nan=False) + "\n"
                                                  for r in keep).encode())
        self._fh = open(self.path, "a")

    def log(self, record: dict) -> None:
        self._fh.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        self._fh.flush()
        try:
            os.fsync(self._fh.fileno())
        except OSError:
            pass

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_log(path) -> list[dict]:
    """Parsed records of a log (a torn last line from a crash is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    out = []
    if not path.exists():
        return out
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# --------------------------------------------------------------------------- RNG

def capture_rng_state(extra_generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG a run touches, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": [int(v) for v in py_state[1]],
                   "gauss": py_state[2]},
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, extra_generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch_cpu"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    for k, g in (extra_generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


# --------------------------------------------------------------------------- checkpoints

def _ckpt_paths(run_dir, step: int) -> tuple[Path, Path]:
    d = Path(run_dir) / CKPT_DIR
    return d / f"ckpt-{step:08d}.safetensors", d / f"ckpt-{step:08d}.pt"


def _recorded_step(run_dir) -> int | None:
    path = Path(run_dir) / CKPT_DIR / LATEST_NAME
    try:
        with open(path) as fh:
            return int(json.load(fh)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_step(run_dir) -> int | None:
    """The step `latest.json` names, if both halves of that checkpoint exist."""
    step = _recorded_step(run_dir)
    if step is None:
        return None
    w, s = _ckpt_paths(run_dir, step)
    return step if w.is_file() and s.is_file() else None


def complete_steps(run_dir) -> list[int]:
    """Steps of which both halves (.safetensors and .pt) exist, ascending."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    steps = set()
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and m.group(2) == "safetensors":
            w, s = _ckpt_paths(run_dir, int(m.group(1)))
            if w.is_file() and s.is_file():
                steps.add(int(m.group(1)))
    return sorted(steps)


def find_checkpoint(run_dir) -> tuple[int | None, str | None]:
    """(step, note): the latest checkpoint, or, when a half of it is missing, the newest
    complete one with a one-line note saying so; (None, None) when there is none."""
    step = latest_step(run_dir)
    if step is not None:
        return step, None
    done = complete_steps(run_dir)
    if not done:
        return None, None
    recorded = _recorded_step(run_dir)
    what = (f"the latest checkpoint ({recorded}) is incomplete" if recorded is not None
            else f"{CKPT_DIR}/{LATEST_NAME} is missing or damaged")
    return done[-1], f"{run_dir}: {what}; using checkpoint {done[-1]}, the newest complete one"


def save_checkpoint(run_dir, step: int, weights: dict[str, torch.Tensor], state: dict, *,
                    keep_every: int | None = None, metadata: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and point `latest.json` at it.

    The previous latest checkpoint is deleted afterwards unless its step is a multiple of
    `keep_every` (periodic checkpoints are kept).
    """
    d = Path(run_dir) / CKPT_DIR
    d.mkdir(parents=True, exist_ok=True)
    previous = find_checkpoint(run_dir)[0]
    wpath, spath = _ckpt_paths(run_dir, step)
    atomic_save_safetensors(weights, wpath, metadata={"step": step, **(metadata or {})})
    atomic_torch_save({"step": step, **state}, spath)
    write_json_atomic(d / LATEST_NAME, {"step": step, "time": time.time()})
    if previous is not None and previous != step and not (keep_every and previous % keep_every == 0):
        for p in _ckpt_paths(run_dir, previous):
            try:
                p.unlink()
            except OSError:
                pass
    return wpath


def load_checkpoint_weights(run_dir, step: int, map_location="cpu") -> dict:
    """The network weights of checkpoint `step` (one-line UsageError when unreadable)."""
    from safetensors.torch import load_file

    wpath, _ = _ckpt_paths(run_dir, step)
    try:
        return load_file(str(wpath), device=str(map_location))
    except Exception as exc:  # noqa: BLE001 - damaged files become a one-line error
        raise UsageError(f"cannot read checkpoint {step} in {run_dir}: {exc}".splitlines()[0])


def load_checkpoint_state(run_dir, step: int, map_location="cpu") -> dict:
    """The training state of checkpoint `step`, loaded with weights_only (one-line UsageError)."""
    _, spath = _ckpt_paths(run_dir, step)
    try:
        state = torch.load(spath, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged files become a one-line error
        raise UsageError(f"cannot read checkpoint {step} in {run_dir}: {exc}".splitlines()[0])
    if not isinstance(state, dict):
        raise UsageError(f"cannot read checkpoint {step} in {run_dir}: it holds no training state")
    return state


def load_checkpoint(run_dir, step: int | None = None, map_location="cpu") -> tuple[dict, dict]:
    """(weights, state) of checkpoint `step` (default: latest). State loads with weights_only."""
    if step is None:
        step = latest_step(run_dir)
        if step is None:
            raise UsageError(f"{run_dir} has no complete checkpoint")
    return load_checkpoint_weights(run_dir, step, map_location), load_checkpoint_state(run_dir, step, map_location)
