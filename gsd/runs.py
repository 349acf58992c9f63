"""Run directories: config.json, a JSONL log, atomic checkpoints, resume.

Layout of a run directory::

    config.json                 the resolved settings (written once, atomically)
    teacher.safetensors         the teacher f_phi used (so a resume / evaluation uses the same one)
    log.jsonl                   one JSON object per logged iteration (appended, flushed)
    checkpoints/
        ckpt-00000500.safetensors   network weights (generator, fake score, EMA)
        ckpt-00000500.pt            optimiser / EMA / RNG / step state (torch.save, weights_only)
        ckpt-00000500.json          the sha256 of both halves (written after them)
        latest.json                 {"step": 500}: the newest complete checkpoint
    samples.png, metrics.json   written by the evaluation at the end
    .gsd-lock                   held (flock) by the process using the directory

Every file is written to a temporary name in the same folder, fsync'ed and moved into
place with `os.replace`, and `latest.json` is replaced only after both halves of a
checkpoint and their digests are on disk: a crash or kill at any moment leaves the previous
checkpoint intact and `latest.json` pointing at a complete one. The temporary files a kill
leaves (`.NAME.tmpPID`) are removed by `remove_stale_temp_files` on the next start.

Every load checks a checkpoint's digests, that its weights are float32 and that every float
it holds is finite (`load_checkpoint_weights`, `load_checkpoint_state`); `load_intact_checkpoint`
falls back from a damaged or incomplete latest checkpoint to the newest intact one, with a note.
A run directory without any complete checkpoint holds no training: `prepare_run_dir(...,
allow_restart=True)` lets a new run take it over (`clear_dead_run` removes its files; only a
directory whose config.json this engine wrote, holding nothing but run files, is emptied).

One process at a time uses a run directory: `RunLock` holds an exclusive flock on
`.gsd-lock`, which the kernel releases when the process ends, however it ends.

JSON files (config.json, metrics.json, log.jsonl) are standard JSON: a non-finite number
is written as null.
"""

from __future__ import annotations

import errno
import io
import json
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

from gsd.config import CHECKPOINT_OWNED, RESUME_FREE, RUN_KEYS, upgrade_config
from gsd.errors import DamagedCheckpoint, RunLocked, StorageError, UsageError
from gsd.fileio import (
    atomic_save_safetensors, atomic_torch_save, atomic_write_bytes, jsonable as _jsonable, read_json_file,
    read_regular_file, sha256_hex, write_json_atomic,
)
from gsd.util import check_creatable

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
CKPT_DIR = "checkpoints"
LATEST_NAME = "latest.json"
LOCK_NAME = ".gsd-lock"
TEACHER_NAME = "teacher.safetensors"           # the run's copy of a gsd / imported EDM teacher
TEACHER_FOLDER_NAME = "teacher-diffusers"      # the run's copy of a diffusers teacher
# config.json's "run_format": what marks a directory as written by this engine, and the version
# of its layout (checkpoint digests are required from this version on)
RUN_FORMAT = "gsd-run/1"
CKPT_FORMAT = "gsd-ckpt/1"
# Run directories written before RUN_FORMAT existed are recognised by the keys every
# gsd.train config.json has carried
_LEGACY_RUN_KEYS = ("dataset", "sigma_init", "alpha", "lambda_sid", "teacher_file", "backend", "created")
MAX_CHECKPOINT_BYTES = 2 ** 40   # a read bound, far above any network this engine trains

__all__ = [
    "default_run_dir", "prepare_run_dir", "check_resume_dir", "diff_configs", "write_json_atomic",
    "read_config", "JsonlLogger", "read_log", "save_checkpoint", "load_checkpoint", "latest_step",
    "capture_rng_state", "restore_rng_state", "atomic_write_bytes", "atomic_torch_save",
    "atomic_save_safetensors", "find_checkpoint", "complete_steps", "check_out_path", "remove_stale_temp_files",
    "restartable", "clear_dead_run", "load_checkpoint_weights", "load_checkpoint_state", "load_intact_checkpoint",
    "is_run_config", "RunLock", "RUN_FORMAT", "teacher_copy_digest", "check_run_matches_checkpoint",
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


def is_run_config(cfg) -> bool:
    """True for a config.json this engine wrote: it carries RUN_FORMAT, or (a run from before
    the marker) every key a gsd.train config.json has had."""
    if not isinstance(cfg, dict):
        return False
    if "run_format" in cfg:
        return cfg["run_format"] == RUN_FORMAT
    return all(k in cfg for k in _LEGACY_RUN_KEYS)


def read_config(run_dir) -> dict:
    """A run's config.json (upgraded to today's keys: `upgrade_config`); UsageError (one line)
    when it is missing, not a regular file, not JSON, or of another run format."""
    path = Path(run_dir) / CONFIG_NAME
    if not os.path.lexists(path):
        raise UsageError(f"{run_dir} is not a gsd run directory (no {CONFIG_NAME})")
    cfg = read_json_file(path)
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} does not hold a run configuration")
    if "run_format" in cfg and cfg["run_format"] != RUN_FORMAT:
        raise UsageError(f"{path} has run format {cfg['run_format']!r}; this gsd reads {RUN_FORMAT!r}")
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
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.(safetensors|pt|json)$")
_RUN_FILES = {CONFIG_NAME, LOG_NAME, TEACHER_NAME, TEACHER_FOLDER_NAME, CKPT_DIR, LOCK_NAME}


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


def _written_by_engine(out: Path) -> bool:
    try:
        return is_run_config(read_json_file(out / CONFIG_NAME))
    except UsageError:
        return False


def restartable(out) -> bool:
    """True for a run directory that this engine wrote (`is_run_config`), that has no complete
    checkpoint and holds nothing but the files a run writes (config, log, teacher copy,
    checkpoint halves, temporary files, the lock)."""
    out = Path(out)
    if not (out / CONFIG_NAME).is_file() or not _written_by_engine(out) or find_checkpoint(out)[0] is not None:
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
        if p.name == LOCK_NAME:  # held by the caller: a new file would be a second lock
            continue
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
        if any(p.name != LOCK_NAME for p in out.iterdir()):
            raise UsageError(f"--out {out} is not empty and is not a gsd run; choose another --out")
    return out


class RunLock:
    """A lock on a run directory for the life of one process's use of it.

    flock on `.gsd-lock`: the kernel drops it when the process exits or is killed, so a lock
    left by a dead process is never stale. A writer (gsd.train: a new run, a restart, a resume)
    takes it exclusive; a reader (gsd.evaluate, gsd.edit, gsd.generate, gsd.export) takes it
    `shared`, so that readers run together but never while a run is being written, and a
    writer never starts while a reader holds it. `acquire` raises RunLocked (one line, naming
    the holder's pid where it wrote one) while another live process holds it in a conflicting
    mode. A reader that cannot create the lock file (a read-only run directory) reads without
    one: no gsd process can be writing there."""

    def __init__(self, run_dir, what: str = "run directory", *, shared: bool = False):
        self.path = Path(run_dir) / LOCK_NAME
        self.what = what
        self.shared = shared
        self._fd = None

    def acquire(self) -> "RunLock":
        import fcntl

        if self._fd is not None:
            return self
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | nofollow, 0o644)
        except OSError as exc:
            fd = None
            if self.shared and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                try:  # a read-only run directory: lock its lock file if it has one, else read unlocked
                    fd = os.open(self.path, os.O_RDONLY | nofollow)
                except OSError:
                    return self
            if fd is None:
                raise StorageError(f"cannot lock {self.path.parent}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise StorageError(f"cannot lock {self.path.parent}: {exc.strerror or exc}") from None
            readers = not self.shared and self._only_readers(fd)
            holder = "" if readers else self._holder(fd)  # only a writer leaves its pid in the file
            os.close(fd)
            doing = ("being read by another gsd process (evaluate, edit, generate or export)" if readers
                     else "being written by another gsd process" if self.shared
                     else "in use by another gsd process")
            raise RunLocked(f"{self.what} {self.path.parent} is {doing}" + (f" (pid {holder})" if holder else "")
                            + "; wait for it to finish") from None
        if not self.shared:  # the writer's pid, for the message another process gets
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    @staticmethod
    def _only_readers(fd) -> bool:
        """Whether the processes that hold the lock hold it shared (a shared probe succeeds)."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True

    @staticmethod
    def _holder(fd) -> str:
        try:
            return os.pread(fd, 32, 0).decode().strip()
        except (OSError, UnicodeDecodeError):
            return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


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
        if os.path.lexists(self.path) and not self.path.is_file():
            raise UsageError(f"{self.path} is not a regular file; move it away")
        if truncate_after_step is not None and self.path.exists():
            # a resumed run drops records written after its checkpoint (they will be redone)
            keep = [r for r in read_log(self.path) if _record_step(r) <= truncate_after_step]
            atomic_write_bytes(self.path, "".join(json.dumps(_jsonable(r), allow_nan=False) + "\n"
                                                  for r in keep).encode())
        try:
            self._fh = open(self.path, "a")
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def log(self, record: dict) -> None:
        try:
            self._fh.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
            self._fh.flush()
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            os.fsync(self._fh.fileno())
        except OSError:
            pass

    def close(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError:  # the flush of a full disk: the records were reported when written
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


MAX_LOG_BYTES = 2 ** 34


def _record_step(record) -> int:
    try:
        return int(record.get("iteration", -1))
    except (AttributeError, TypeError, ValueError):
        return -1


def read_log(path) -> list[dict]:
    """Parsed records of a log (a torn last line from a crash, or anything that is not a JSON
    object, is skipped); UsageError (one line) when it is not a regular file."""
    path = Path(path)
    if path.is_dir() and path.name != LOG_NAME:  # a run directory
        path = path / LOG_NAME
    if not os.path.lexists(path):
        return []
    data = read_regular_file(path, max_bytes=MAX_LOG_BYTES)
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            out.append(record)
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


def _manifest_path(run_dir, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"ckpt-{step:08d}.json"


def _needs_manifest(run_dir) -> bool:
    """Runs of RUN_FORMAT write digests with every checkpoint; older runs have none."""
    try:
        cfg = read_json_file(Path(run_dir) / CONFIG_NAME)
    except UsageError:
        return True
    return not isinstance(cfg, dict) or "run_format" in cfg


def _recorded_step(run_dir) -> int | None:
    try:
        return int(read_json_file(Path(run_dir) / CKPT_DIR / LATEST_NAME)["step"])
    except (UsageError, ValueError, KeyError, TypeError, OverflowError):
        return None


def _is_complete(run_dir, step: int, needs_manifest: bool) -> bool:
    w, s = _ckpt_paths(run_dir, step)
    return w.is_file() and s.is_file() and (not needs_manifest or _manifest_path(run_dir, step).is_file())


def latest_step(run_dir) -> int | None:
    """The step `latest.json` names, if that checkpoint's files all exist."""
    step = _recorded_step(run_dir)
    if step is None or step < 0:
        return None
    return step if _is_complete(run_dir, step, _needs_manifest(run_dir)) else None


def complete_steps(run_dir) -> list[int]:
    """Steps whose files all exist (both halves, and their digests in runs of RUN_FORMAT),
    ascending. Existence only: `load_intact_checkpoint` checks the contents."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    needs = _needs_manifest(run_dir)
    steps = set()
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and m.group(2) == "safetensors" and _is_complete(run_dir, int(m.group(1)), needs):
            steps.add(int(m.group(1)))
    return sorted(steps)


def find_checkpoint(run_dir) -> tuple[int | None, str | None]:
    """(step, note): the latest checkpoint, or, when a file of it is missing, the newest
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
    """Write checkpoint `step` atomically, with the sha256 of both halves, and point
    `latest.json` at it.

    The previous latest checkpoint is deleted afterwards unless its step is a multiple of
    `keep_every` (periodic checkpoints are kept). A failed write (StorageError) leaves
    `latest.json` at the previous checkpoint and no partial file under a checkpoint's name.
    """
    d = Path(run_dir) / CKPT_DIR
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot write {d}: {exc.strerror or exc}") from None
    previous = find_checkpoint(run_dir)[0]
    wpath, spath = _ckpt_paths(run_dir, step)
    manifest = _manifest_path(run_dir, step)
    try:
        manifest.unlink()  # a rewritten step is complete again only once its new digests are on disk
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"cannot write {manifest}: {exc.strerror or exc}") from None
    try:
        digests = {"safetensors": atomic_save_safetensors(weights, wpath, metadata={"step": step, **(metadata or {})}),
                   "pt": atomic_torch_save({"step": step, **state}, spath)}
        write_json_atomic(manifest, {"format": CKPT_FORMAT, "step": step, "sha256": digests})
    except StorageError:
        for p in (wpath, spath, manifest):  # no half of this step is left to look like a checkpoint
            try:
                p.unlink()
            except OSError:
                pass
        raise
    write_json_atomic(d / LATEST_NAME, {"step": step, "time": time.time()})
    if previous is not None and previous != step and not (keep_every and previous % keep_every == 0):
        for p in (*_ckpt_paths(run_dir, previous), _manifest_path(run_dir, previous)):
            try:
                p.unlink()
            except OSError:
                pass
    return wpath


def _checked_bytes(run_dir, step: int, half: str) -> bytes:
    """A checkpoint half's bytes, checked against the digest written with it (runs from before
    digests existed have none to check)."""
    path = _ckpt_paths(run_dir, step)[0 if half == "safetensors" else 1]
    data = read_regular_file(path, max_bytes=MAX_CHECKPOINT_BYTES, what=f"checkpoint {step} in {run_dir}")
    mpath = _manifest_path(run_dir, step)
    if not os.path.lexists(mpath):
        if _needs_manifest(run_dir):
            raise DamagedCheckpoint(f"checkpoint {step} in {run_dir} has no digests ({mpath.name} is missing)")
        return data
    manifest = read_json_file(mpath, what=f"{mpath.name} in {run_dir}")
    expected = manifest.get("sha256", {}).get(half) if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != CKPT_FORMAT or not isinstance(expected, str):
        raise DamagedCheckpoint(f"checkpoint {step} in {run_dir}: {mpath.name} is damaged")
    if sha256_hex(data) != expected:
        raise DamagedCheckpoint(f"checkpoint {step} in {run_dir} is damaged: {path.name} does not match the "
                                f"digest written with it")
    return data


def _first_nonfinite(obj, prefix: str = "") -> str | None:
    """The name of the first floating tensor holding NaN or inf in a nested state, or None."""
    if isinstance(obj, torch.Tensor):
        return prefix if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _first_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if found is not None:
            return found
    return None


def load_checkpoint_weights(run_dir, step: int, map_location="cpu") -> dict:
    """The network weights of checkpoint `step`, after its integrity checks: the digest, float32
    tensors, finite values. DamagedCheckpoint / UsageError (one line) otherwise."""
    from safetensors.torch import load as load_bytes

    data = _checked_bytes(run_dir, step, "safetensors")
    try:
        weights = load_bytes(data)
    except Exception as exc:  # noqa: BLE001 - damaged files become a one-line error
        raise DamagedCheckpoint(f"cannot read checkpoint {step} in {run_dir}: {exc}".splitlines()[0]) from None
    for name, value in weights.items():
        if value.dtype != torch.float32:
            raise DamagedCheckpoint(f"checkpoint {step} in {run_dir} is damaged: {name} is {value.dtype}, "
                                    f"not float32")
    bad = _first_nonfinite(weights)
    if bad is not None:
        raise DamagedCheckpoint(f"checkpoint {step} in {run_dir} has non-finite values in {bad}")
    return {k: v.to(map_location) for k, v in weights.items()}


def load_checkpoint_state(run_dir, step: int, map_location="cpu") -> dict:
    """The training state of checkpoint `step`, loaded with weights_only after its digest is
    checked, with finite floats; DamagedCheckpoint / UsageError (one line) otherwise."""
    data = _checked_bytes(run_dir, step, "pt")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged files become a one-line error
        raise DamagedCheckpoint(f"cannot read checkpoint {step} in {run_dir}: {exc}".splitlines()[0]) from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"cannot read checkpoint {step} in {run_dir}: it holds no training state")
    bad = _first_nonfinite(state)
    if bad is not None:
        raise DamagedCheckpoint(f"checkpoint {step} in {run_dir} has non-finite values in {bad}")
    return state


def load_intact_checkpoint(run_dir, step: int | None = None, map_location="cpu") -> tuple[int, dict, dict, str | None]:
    """(step, weights, state, note) of checkpoint `step`, or with step None of the newest intact
    one: a damaged or incomplete latest checkpoint falls back to the newest checkpoint that
    passes every check, and `note` says which were skipped and why. UsageError (one line) when
    the asked-for checkpoint is damaged, or when no checkpoint is intact."""
    if step is not None:
        if not _is_complete(run_dir, step, _needs_manifest(run_dir)):
            raise UsageError(f"{run_dir} has no complete checkpoint {step} (complete: "
                             f"{', '.join(map(str, complete_steps(run_dir))) or 'none'})")
        return (step, load_checkpoint_weights(run_dir, step, map_location),
                load_checkpoint_state(run_dir, step, map_location), None)
    first, note = find_checkpoint(run_dir)
    if first is None:
        raise UsageError(f"{run_dir} has no complete checkpoint")
    skipped = [note] if note else []
    candidates = [first] + [s for s in reversed(complete_steps(run_dir)) if s < first]
    for candidate in candidates:
        try:
            weights = load_checkpoint_weights(run_dir, candidate, map_location)
            state = load_checkpoint_state(run_dir, candidate, map_location)
        except UsageError as exc:
            skipped.append(str(exc))
            continue
        if candidate != first:
            note = "; ".join(skipped) + f"; using checkpoint {candidate}, the newest intact one"
        return candidate, weights, state, note
    raise DamagedCheckpoint(f"{run_dir} has no intact checkpoint ({'; '.join(skipped)})")


def load_checkpoint(run_dir, step: int | None = None, map_location="cpu") -> tuple[dict, dict]:
    """(weights, state) of checkpoint `step` (default: the newest intact one), checked."""
    _step, weights, state, _note = load_intact_checkpoint(run_dir, step, map_location)
    return weights, state


# --------------------------------------------------------------------------- parts of one run

def teacher_copy_digest(run_dir, name: str) -> str:
    """sha256 of a run's teacher copy: the file, or for a folder (diffusers) the digests of its
    files by relative path."""
    path = Path(run_dir) / name
    if path.is_dir() and not path.is_symlink():
        h = []
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.append(f"{p.relative_to(path).as_posix()}:"
                     f"{sha256_hex(read_regular_file(p, max_bytes=MAX_CHECKPOINT_BYTES))}")
        return sha256_hex("\n".join(h).encode())
    return sha256_hex(read_regular_file(path, max_bytes=MAX_CHECKPOINT_BYTES, what=f"teacher copy {path}"))


def check_run_matches_checkpoint(run_dir, cfg: dict, state: dict, step: int, what: str) -> None:
    """UsageError (one line, starting with `what`) unless config.json (`cfg`, as read_config
    gives it) holds the settings checkpoint `step` was trained with, and the run's teacher copy
    is the file it was trained with: a hand edit (sigma_init, exact_teacher, teacher_file) or a
    replaced teacher would otherwise silently change what is trained or measured."""
    dist = state.get("distiller")
    saved = state.get("run_config")
    if not isinstance(saved, dict):  # checkpoints from before run_config: the distiller's settings
        saved = dist.get("config") if isinstance(dist, dict) else None
    if not isinstance(saved, dict):
        raise DamagedCheckpoint(f"{what}: checkpoint {step} holds no settings; it is damaged")
    saved = upgrade_config(saved)
    skip = set(RESUME_FREE) | set(CHECKPOINT_OWNED)
    diff = [k for k in RUN_KEYS if k in saved and k in cfg and k not in skip and _norm(saved[k]) != _norm(cfg[k])]
    if diff:
        shown = "; ".join(f"{k}: {CONFIG_NAME} has {cfg[k]!r}, the checkpoint {saved[k]!r}" for k in diff[:4])
        raise UsageError(f"{what}: {CONFIG_NAME} does not match checkpoint {step} ({shown}); it was edited: put "
                         f"back the checkpoint's values")
    digest = state.get("teacher_sha256")
    if digest is None:
        return  # a run from before teacher digests
    name = str(cfg.get("teacher_file") or TEACHER_NAME)
    if cfg.get("teacher_sha256") not in (None, digest):
        raise UsageError(f"{what}: {CONFIG_NAME}'s teacher_sha256 does not match checkpoint {step}'s; it was "
                         f"edited: put back the checkpoint's value")
    if not os.path.lexists(Path(run_dir) / name):
        raise UsageError(f"{what}: the teacher copy {name} is missing from {run_dir}")
    if teacher_copy_digest(run_dir, name) != digest:
        raise UsageError(f"{what}: the teacher copy {name} is not the teacher checkpoint {step} was trained with "
                         f"(its sha256 differs); put back the run's own teacher copy")
