"""Atomic file writes, bounded reads of regular files, and JSON sanitising, shared by run
directories, checkpoints, figures and evaluation results. A reader sees the old file or the new
one, never a part; a write that fails (a full disk) leaves the old file and no temporary one,
and says so in one line. Ground floor."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import torch

from gsd.errors import StorageError, UsageError

__all__ = ["atomic_write_bytes", "write_json_atomic", "atomic_torch_save", "atomic_save_safetensors", "jsonable",
           "read_regular_file", "read_json_file", "sha256_hex", "MAX_JSON_BYTES"]

# config.json, latest.json, checkpoint manifests: a few KB each; anything far larger is not ours
MAX_JSON_BYTES = 64 * 2 ** 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part.
    StorageError (one line) when the file system refuses (full, read-only, quota)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    _fsync_dir(path.parent)


def write_json_atomic(path, obj) -> None:
    """Standard JSON (non-finite numbers become null), replaced atomically."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_torch_save(obj, path) -> str:
    """torch.save, atomically; returns the sha256 of the bytes written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return sha256_hex(data)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> str:
    """A safetensors file, atomically; returns the sha256 of the bytes written."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(clean, metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, data)
    return sha256_hex(data)


def read_regular_file(path, *, max_bytes: int, what: str | None = None) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; UsageError (one line) otherwise.

    Opened without blocking and checked on the open descriptor before anything is read, so
    that a FIFO (which would block forever), a device (/dev/zero never ends) or a directory in
    the file's place ends in one line instead of a hang or a MemoryError."""
    what = what or str(path)
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UsageError(f"{what} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{what} is not a regular file")
        if info.st_size > max_bytes:
            raise UsageError(f"{what} is {info.st_size} bytes, more than the {max_bytes} such a file can hold")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise UsageError(f"{what} is more than the {max_bytes} bytes such a file can hold")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise UsageError(f"cannot read {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_json_file(path, *, max_bytes: int = MAX_JSON_BYTES, what: str | None = None):
    """A JSON file through `read_regular_file`; UsageError (one line) when it is not JSON,
    including JSON nested too deeply for the parser."""
    what = what or str(path)
    data = read_regular_file(path, max_bytes=max_bytes, what=what)
    try:
        return json.loads(data)
    except RecursionError:
        raise UsageError(f"{what} is not usable JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} is not valid JSON ({' '.join(str(exc).split())})") from None


def jsonable(obj):
    """Plain JSON values: dicts, lists, numbers, strings; tensors and numpy arrays as lists, numpy
    scalars as Python numbers, non-finite numbers as None (JSON has no NaN/inf)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; null is what every JSON reader accepts
    return obj
