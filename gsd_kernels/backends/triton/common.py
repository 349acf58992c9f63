"""Pieces the Triton kernels of every op share: the triton import guard and
availability check, the tuning knobs, the dot-precision and tile settings, the launch
helpers (input preparation, device scalars, the tl.dot fallback) and the K-split of the
row-streaming SiD / fake-score kernels.

The knobs are module attributes of this module and are read at each launch: set them
here (``gsd_kernels.backends.triton.common.DOT_PRECISION = ...``), not on the package.

Precision of the dots (fp32 inputs on CUDA): ``DOT_PRECISION``
-------------------------------------------------------------
An explicit choice, from the environment variable ``GSD_TRITON_DOT`` at import (or by
setting ``common.DOT_PRECISION`` at run time): ``tf32x3`` (default), ``tf32`` or
``ieee``, or ``GRAM:APPLY`` (e.g. ``tf32:tf32x3``) to choose the Gram dots and the
backward's ``A @ X`` GEMM separately.

* ``tf32x3``: each operand split into a big and a small tf32 part, 3 MMAs per product:
  close to fp32 accuracy on tensor cores, 3x the tensor-core work of plain tf32.
* ``tf32``: one MMA per product (10-bit mantissa operands). A CPU emulation at the
  benchmark shapes (N = 1024..2048, D = d = 3072, randn and correlated data) put the
  gradient error at 2-3e-5 relative, inside the 1e-4 target; the loss error is set by
  the pair epilogue, not by the dots. That is an emulation, not a measurement:
  ``tf32x3`` stays the default until ``benchmarks/gpu_accuracy.py`` has shown plain tf32
  within 1e-4 on a GPU.
* ``ieee``: exact fp32 on CUDA cores, several times slower than tensor cores.

float64 uses ``ieee`` (fp64 MMA); if the target cannot compile it the launcher falls
back (once, cached) to ``MODE_FMA``. ROCm uses ``ieee``. Under the interpreter ``tl.dot``
is a numpy matmul in the operand dtype whatever the precision: CPU tests cannot see
tf32 rounding. Accumulation inside a tile is in the input dtype, the pair epilogue and
everything across tiles / K-splits in float64.

Tile sizes: ``TILES``
---------------------
A documented table (``TILE_PRESETS``), chosen by ``GSD_TRITON_TILES`` (or
``common.TILES``), for the large-batch tensor-core path (N >= 1024, Gram mode on
both inputs); small batches use 32 x 32 tiles so that enough programs run. ``default`` is
64 x 64 pair tiles with 8 warps; ``tall`` / ``wide`` give the backward's A @ X GEMM
128 x 64 / 64 x 128 tiles, the larger tiles that compile for sm_90 without register
spills (``compile_check(report=True)`` lists registers and spills of every preset). No autotuning: the choice stays explicit and the interpreter tests run one
configuration. Which preset is fastest is measured by ``benchmarks/gpu_accuracy.py``.

``compile_check(arch)`` compiles every kernel variant for an NVIDIA target without a
GPU (tests: ``GSD_TRITON_COMPILE_CHECK=1``).
"""

from __future__ import annotations

import os
import struct
import threading

import torch

try:  # importing this module must not fail when triton is missing
    import triton
    import triton.language  # noqa: F401  (the kernel modules need it)

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as _e:  # pragma: no cover - depends on the environment
    triton = None
    _TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

# The one close-pair tolerance of every backend (docs/design.md, "Close pairs"); the C++
# kernels hold the same numbers and a test checks that they agree.
from ...constants import CLOSE_PAIR_TOL as CLOSE_TOL

# @triton.jit picks the interpreter when the module is imported, so what counts for
# CPU tensors is the environment at import time.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"

NAME = "triton"

# ----------------------------------------------------------------------------- tuning
# Module-level knobs (tests flip them to exercise every code path on small inputs).
DIRECT_MAX = 16  # dims up to this use explicit differences instead of the Gram trick
SMALL_DIM = 64  # flash-style backward when max(D, d) <= SMALL_DIM
FORCE_NO_DOT = False  # MODE_FMA instead of MODE_DOT everywhere
SLAB_ROWS = None  # force the slab height of the large-dim backward (multiple of BM)
SID_BLOCK = 1024  # elements per vector step of the SiD / fake kernels
SID_TARGET_PROGRAMS = None  # programs to aim for in the SiD forward (None: by device)
DOT_PRECISION = os.environ.get("GSD_TRITON_DOT", "tf32x3")  # see the module docstring
TILES = os.environ.get("GSD_TRITON_TILES", "default")  # a key of TILE_PRESETS
LARGE_TILE_MIN_ROWS = 1024  # row ranges at least this long use TILE_PRESETS[TILES]

_DOT_CHOICES = ("tf32x3", "tf32", "ieee")

# Tiles of the large-batch Gram path (fp32 and fp64), per kernel:
#   fwd   (BM = BN, BK, num_warps, num_stages)   square: the forward launches a triangle
#   coef  (BM, BN, BK, num_warps, num_stages)
#   apply (BM, BC, BD, num_warps, num_stages)    BC: columns of A per step, BD: D-chunk
# Only configurations that compile for sm_90 without register spills (Triton 3.8 ptxas;
# compile_check(report=True) lists registers and spills). Larger pair tiles (128 x 64,
# 128 x 128, 8 or 16 warps) spill hundreds to thousands of bytes in the forward and coef
# kernels: two accumulators, the refine tile and the float64 epilogue live at once, so
# they need a restructured kernel, not a table entry. The apply GEMM takes 128 x 64 and
# 64 x 128 (8 warps) without spills; 128 x 128 spills with 8 and 16 warps.
TILE_PRESETS = {
    "default": {"fwd": (64, 32, 8, 3), "coef": (64, 64, 32, 8, 3), "apply": (64, 32, 64, 8, 3)},
    "tall": {"fwd": (64, 32, 8, 3), "coef": (64, 64, 32, 8, 3), "apply": (128, 32, 64, 8, 3)},
    "wide": {"fwd": (64, 32, 8, 3), "coef": (64, 64, 32, 8, 3), "apply": (64, 32, 128, 8, 3)},
}


def is_available(device_type) -> tuple[bool, str]:
    """Whether the Triton primitives can run on tensors of ``device_type``."""
    device_type = getattr(device_type, "type", device_type)
    device_type = str(device_type).split(":")[0]
    if triton is None:
        return False, f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        if _INTERPRET_AT_IMPORT:
            return True, "triton interpreter (TRITON_INTERPRET=1) on CUDA tensors"
        if torch.version.hip is not None:
            return True, "triton on ROCm"
        return True, "triton on CUDA"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if not _INTERPRET_AT_IMPORT:
            return False, (
                "TRITON_INTERPRET=1 was set after gsd_kernels.backends.triton was "
                "imported; set it before importing (triton decides at kernel definition)"
            )
        return True, "triton interpreter on CPU tensors"
    return False, f"triton backend does not support device type {device_type!r}"


def _check_ready(*tensors):
    ok, why = is_available(tensors[0].device.type)
    if not ok:
        raise RuntimeError(f"triton backend unavailable: {why}")
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError("all tensors must be on one device")


def _interpreting() -> bool:
    return _INTERPRET_AT_IMPORT


# ================================================================== launch helpers
_SUPPORTED = (torch.float32, torch.float64)
_DOT_BROKEN: set = set()  # (kernel, dtype, device index) whose tl.dot failed to compile
_DOT_LOCK = threading.Lock()


def _prep(t: torch.Tensor, dtype=None) -> torch.Tensor:
    if t.dim() != 2:
        t = t.reshape(t.shape[0], -1)
    if t.dtype not in _SUPPORTED:
        t = t.float()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _prep_vec(t, n, dtype, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a tensor of {n} values on {device}, got {type(t).__name__}")
    t = t.reshape(-1)
    if t.device != device:
        raise ValueError(f"expected a tensor on {device}, got one on {t.device}")
    if t.numel() != n:
        raise ValueError(f"expected {n} values, got {t.numel()}")
    return t.to(dtype).contiguous()


def _device_scalars(t, name: str, n: int, device: torch.device) -> torch.Tensor:
    """A float64 device tensor of n values (0-dim allowed for n = 1), read by the kernels
    through its pointer: no host round trip (a Python float here would mean a blocking
    host-to-device copy per call, and no CUDA-graph capture)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a float64 tensor on {device} (the primitives take "
                        f"device scalars), got {type(t).__name__}")
    if t.dtype != torch.float64 or t.numel() != n or t.device != device:
        raise ValueError(f"{name} must be a float64 tensor of {n} value(s) on {device}, got "
                         f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")
    return t.reshape(n).contiguous()


def _split3(value) -> tuple[float, float, float]:
    """Three fp32 values whose float64 sum is exactly `value` (a Python float): Triton
    passes a float kernel argument as fp32, and the fp64 kernels need all 53 bits."""
    if isinstance(value, torch.Tensor):  # float(tensor) would read it back: a host sync
        raise TypeError("alpha must be a Python float, not a tensor")
    v = float(value)

    def f32(u):
        try:
            return struct.unpack("f", struct.pack("f", u))[0]
        except OverflowError:
            raise ValueError(f"{value!r} is outside the float32 range of a kernel scalar") from None

    hi = f32(v)
    mid = f32(v - hi)
    lo = f32(v - hi - mid)
    return hi, mid, lo


def _close_tol(dtype) -> float:
    """Pairs with d2 <= tol (|x_i|^2 + |x_j|^2) get exact distances (see _refine_close):
    below that the Gram trick's rounding (~ sqrt(K) eps |x|^2) is no longer small against
    d2. The same number for every backend (gsd_kernels.constants)."""
    return float(CLOSE_TOL[dtype])


def _dot_precisions(dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """(Gram dots, apply GEMM) input precision of tl.dot; see DOT_PRECISION."""
    setting = str(DOT_PRECISION).strip().lower()
    parts = setting.split(":")
    if len(parts) not in (1, 2) or any(p not in _DOT_CHOICES for p in parts):
        raise ValueError(f"GSD_TRITON_DOT / common.DOT_PRECISION = {DOT_PRECISION!r}: "
                         f"use one of {_DOT_CHOICES} or GRAM:APPLY, e.g. tf32:tf32x3")
    if dtype == torch.float32 and device.type == "cuda" and not _interpreting() \
            and torch.version.hip is None:
        return parts[0], parts[-1]
    return "ieee", "ieee"


def _tiles(kernel: str):
    """This kernel's entry of TILE_PRESETS[TILES] (large-batch Gram path)."""
    preset = TILE_PRESETS.get(TILES)
    if preset is None:
        raise ValueError(f"GSD_TRITON_TILES / common.TILES = {TILES!r}: use one of "
                         f"{sorted(TILE_PRESETS)}")
    return preset[kernel]


def _device_ctx(device: torch.device):
    if device.type == "cuda" and not _interpreting():
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _with_dot_fallback(key, launch, uses_dot=True):
    """Run ``launch(use_dot)``; if a tl.dot variant fails to compile for this dtype on
    this target (e.g. float64 MMA), retry once with the elementwise path and remember."""
    if FORCE_NO_DOT or not uses_dot:
        return launch(False)
    if key in _DOT_BROKEN:
        return launch(False)
    try:
        return launch(True)
    except Exception as err:  # compilation failure of the dot variant
        if _interpreting() or key[1] != torch.float64:
            raise
        try:
            out = launch(False)
        except Exception:
            raise err
        with _DOT_LOCK:
            _DOT_BROKEN.add(key)
        return out



# ========================================================== SiD / fake K-splits
def _splits(n: int, K: int, device: torch.device):
    """(CHUNK, NS): split each row of K elements into NS chunks of CHUNK (a multiple
    of SID_BLOCK) so that about SID_TARGET_PROGRAMS programs run."""
    blk = SID_BLOCK
    nblk = max(1, triton.cdiv(K, blk))
    target = SID_TARGET_PROGRAMS
    if target is None:
        target = 1 if _interpreting() else 4 * _num_sms(device)
    ns = max(1, min(nblk, triton.cdiv(target, max(n, 1))))
    chunk = triton.cdiv(nblk, ns) * blk
    ns = triton.cdiv(max(K, 1), chunk)
    return chunk, ns


_FIN_ROWS, _FIN_SPLITS = 32, 16  # tile of the finishing kernels (rows x splits)
