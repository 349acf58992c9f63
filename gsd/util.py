"""Small helpers shared by every layer: devices, the cache folder, one-line messages, output
checks, memory limits and number formatting. Ground floor: imports only gsd.errors."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from gsd.errors import UsageError

__all__ = ["MAX_SEED", "resolve_device", "cache_dir", "one_line", "format_bytes", "format_value", "memory_limit_bytes",
           "check_memory", "check_creatable", "check_output_file", "check_image_output", "sampler_table"]


# Seeds: every consumer must accept them. torch.manual_seed takes < 2**64 and scikit-learn's
# random_state < 2**32; commands derive further seeds as seed * stride + offset (strides up to
# ~1e8), which stays below 2**63 for any seed in this range.
MAX_SEED = 2 ** 32 - 1


def resolve_device(name=None) -> torch.device:
    """`auto` (or None) -> cuda when available, else cpu; any other torch device name as given.
    UsageError (one line) when a CUDA device is asked for and none is available."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device name (auto, cpu, cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return dev


def cache_dir(override=None) -> Path:
    """Where trained helper networks (teachers, classifiers, feature nets) are cached:
    `override` when given, else $GSD_CACHE, else ~/.cache/gsd."""
    if override is not None:
        return Path(os.path.expanduser(os.fspath(override)))
    env = os.environ.get("GSD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gsd"


def one_line(text, limit: int | None = None) -> str:
    """`text` (or an exception) with its whitespace collapsed to single spaces, cut to `limit`."""
    out = " ".join(str(text).split())
    return out if limit is None else out[:limit]


def format_value(v, spec: str = ".4g") -> str:
    """A number for a printed or markdown table: '-' for missing, inf/nan spelled out."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover - loop always returns


def memory_limit_bytes() -> int:
    """Largest single allocation a command agrees to make: half of this machine's physical
    memory (GSD_MEMORY_LIMIT_GB overrides it), so a mistyped size is refused in one line
    instead of thrashing or meeting the OOM killer."""
    env = os.environ.get("GSD_MEMORY_LIMIT_GB")
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise UsageError(f"GSD_MEMORY_LIMIT_GB must be a number of gigabytes, got {env!r}")
        if not (gb > 0 and math.isfinite(gb)):
            raise UsageError(f"GSD_MEMORY_LIMIT_GB must be a positive number, got {env!r}")
        return int(gb * 1e9)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 10 ** 9  # unknown platform: assume a modest machine
    return total // 2


def check_memory(nbytes: float, what: str, hint: str = "") -> None:
    """Raise UsageError (one line) when `what` would need more than memory_limit_bytes()."""
    limit = memory_limit_bytes()
    if nbytes > limit:
        raise UsageError(f"{what} needs about {format_bytes(nbytes)}, more than the {format_bytes(limit)} "
                         f"limit (half this machine's memory; GSD_MEMORY_LIMIT_GB overrides it)"
                         + (f"; {hint}" if hint else ""))


_KERNEL_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


def check_creatable(path, start, flag: str) -> None:
    """Raise UsageError (one line) unless something can be created at `path`: it is not inside
    /proc, /sys or /dev, and the nearest existing folder at or above `start` is a writable
    folder on a writable file system. Nothing is created. Shared by output files
    (check_output_file) and run directories (gsd.runs.check_out_path)."""
    try:
        real = os.path.realpath(os.path.abspath(path))
    except OSError as exc:  # a link into a place we may not read (/proc/1/cwd)
        raise UsageError(f"{flag} {path}: cannot resolve it ({exc.strerror or exc})") from None
    for kernel in _KERNEL_FILE_SYSTEMS:
        if real == kernel or real.startswith(kernel + os.sep):
            raise UsageError(f"{flag} {path} is inside {kernel}, a kernel file system; choose a place on disk")
    anc = os.path.abspath(start)
    while not os.path.lexists(anc) and os.path.dirname(anc) != anc:
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        what = "a file" if os.path.exists(anc) else "a broken link"
        raise UsageError(f"{flag} {path}: {anc} is {what}, not a folder")
    try:
        read_only = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise UsageError(f"{flag} {path}: {anc} is on a read-only file system")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: folder {anc} is not writable")


def check_output_file(path, flag: str = "--out") -> str:
    """Raise UsageError (one line) unless a file can be written at `path`; returns the expanded path.

    Nothing is created. `path` must not be a folder or inside /proc, /sys or /dev; the nearest
    existing folder above it must be a writable folder (missing folders below it are created
    by the writers)."""
    path = os.path.expanduser(os.fspath(path))
    if not path:
        raise UsageError(f"{flag} is empty")
    check_creatable(path, os.path.dirname(os.path.abspath(path)), flag)
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder, expected a file name")
    return path


def check_image_output(path, flag: str = "--out", suffixes: Sequence[str] | None = None) -> str:
    """check_output_file, the file name's extension is an image format PIL writes (or one of
    `suffixes` when given, e.g. ('.png',)), and an existing file there is an image: an image
    output replaces an old image, never anything else."""
    path = check_output_file(path, flag)
    ext = os.path.splitext(path)[1].lower()
    from PIL import Image

    if suffixes is not None:
        if ext not in suffixes:
            raise UsageError(f"{flag} must name a {' or '.join(suffixes)} file, got {path!r}")
    else:
        fmt = Image.registered_extensions().get(ext)
        if fmt is None or fmt not in Image.SAVE:
            raise UsageError(f"{flag} {path}: {ext or 'no extension'} is not an image format that can be written "
                             f"(use .png)")
    if os.path.lexists(path):
        if not os.path.isfile(path) or os.path.islink(path):
            raise UsageError(f"{flag} {path} exists and is not a regular file; refusing to replace it")
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception:  # noqa: BLE001 - PIL raises many types for what is not an image
            raise UsageError(f"{flag} {path} exists and is not an image; refusing to overwrite it (choose another "
                             f"name or remove it)") from None
    return path


def sampler_table(samplers, cols: Sequence[str], names: dict) -> list[str]:
    """Aligned text lines (header, rule, one row per sampler) of metric dicts.

    samplers: (label, metrics) pairs; cols: the metric keys shown, headed by names[key];
    "modes_covered" is shown as covered/total."""
    rows = [["sampler"] + [names[c] for c in cols]]
    for label, m in samplers:
        rows.append([label] + [format_value(f"{m.get('modes_covered')}/{m.get('num_modes')}"
                                            if c == "modes_covered" else m.get(c)) for c in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
