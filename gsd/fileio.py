"""Atomic file writes and JSON sanitising, shared by run directories, checkpoints, figures and
evaluation results. A reader sees the old file or the new one, never a part. Ground floor."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_write_bytes", "write_json_atomic", "atomic_torch_save", "atomic_save_safetensors", "jsonable"]


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


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_json_atomic(path, obj) -> None:
    """Standard JSON (non-finite numbers become null), replaced atomically."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_torch_save(obj, path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata={k: str(v) for k, v in (metadata or {}).items()}))


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
