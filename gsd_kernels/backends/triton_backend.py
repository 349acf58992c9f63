"""The six primitives of docs/design.md as Triton kernels.

Every launcher takes and returns torch tensors; the Python layer (``gsd_kernels.ops``)
has already flattened inputs to ``(N, K)``, made them contiguous, cast fp16/bf16 to fp32
and, for the isometry loss, centred x and z and computed their squared row norms.

Host synchronisation
--------------------
None. Scalars that the Python layer holds on the device (``inv_two_h2``, the isometry
coefficients ``coef = [p, q, r, s]``, the SiD ``scale``) are passed to the kernels as
pointers and loaded there; Python floats (``alpha``) travel as kernel scalar arguments.
Triton types a Python float argument as fp32, so a float64 value is passed as three fp32
parts whose float64 sum is exact (``_split3``). Nothing is copied host-to-device or read
back, so the ops can be captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``).

Kernels
-------
Squared distances of a (row tile, column tile) block come in one of three modes, chosen
per input (x and z independently) by the launcher:

* ``MODE_DIRECT`` (dims <= ``DIRECT_MAX`` = 16): ``sum_k (x_ik - x_jk)^2`` from explicit
  differences, and the backward also sums ``a_ij (x_i - x_j)`` directly. In a few
  dimensions close pairs are common and the Gram trick would lose the digits of
  ``x_i - x_j`` that the gradient direction ``(x_i - x_j) / delta`` needs.
* ``MODE_DOT``: Gram trick ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` with ``tl.dot`` over K-chunks
  (tensor cores). Pairs that come out close (``d2 <= tol * (|x_i|^2 + |x_j|^2)`` with the
  one close-pair tolerance of every backend, ``gsd_kernels.constants``; e.g. exact
  duplicates) are recomputed from differences in the rare tiles that hold any
  (``_refine_close``), so a duplicate gets delta = 0 and coefficient 0 as the spec wants.
  Pairs of two zero rows (``|x_i|^2 + |x_j|^2 == 0``, a collapsed batch) are exact already
  and never trigger the recompute.
* ``MODE_FMA``: the Gram trick with an elementwise product-reduce instead of ``tl.dot``;
  only a fallback for targets that cannot compile a float64 ``tl.dot``.

Pair epilogue: in float64 for every input dtype. The squared distances (Gram dots in the
input dtype) are converted to float64 before the sqrt, the weight, the products
``w delta dz``, the coefficients and the per-tile sums. A fp32 sqrt has a small
*systematic* rounding bias that, summed over ~N^2 pairs, moves ``S_xz`` coherently: about
2e-4 relative error of the loss at D = d = 12288, over the 1e-4 target. It costs ~20
fp64 operations per pair against 2 (D + d) dot-product FLOPs per pair (12k at D = d = 3072).

Isometry forward (``_iso_fwd_kernel``)
    One program per (row tile, column tile) block of the pair range, pair terms in
    registers, four float64 partial sums per block to a scratch buffer ``[num_blocks, 4]``
    that torch reduces (deterministic, no N x N). When the row range equals the column
    range only the lower-triangular tiles are launched (decoded from the program id);
    off-diagonal tiles count twice, the diagonal tile once.

Grouped pairs (``groups = g``, ``_iso_grouped_fwd_kernel`` / ``_iso_grouped_bwd_kernel``)
    Row i pairs only with its own block of g rows: one program per row, distances summed
    directly from the rows in float64 (no Gram trick, no close-pair refine), O(N g (D + d)).

Isometry backward: ``gx_i = x_i * rowsum(a)_i - (A @ X)_i`` (same for z with b).
``need_x`` / ``need_z`` False skips that side entirely (no coefficient slab, no GEMM, no
output): in training the latent z needs no gradient.
    * ``max(D, d) <= SMALL_DIM`` (64): flash-attention style (``_iso_bwd_small_kernel``),
      one program per row tile holds its rows of x and z in registers, loops over the
      column tiles, recomputes the distances, forms a and b and accumulates ``A @ X``,
      ``B @ Z`` (``tl.dot``) and the row sums in registers; nothing is stored.
    * large dims (images: D = d = 3072 .. 12288): rows are processed in *slabs* of R rows:
      ``_iso_coef_kernel`` writes the coefficients a, b of the slab (R x C, input dtype)
      to scratch, ``_iso_apply_kernel`` is a GEMM ``A_slab @ X`` per (D-chunk, row tile)
      that adds the row sums on the fly. Its grid runs the D-chunk index fastest, so the
      programs that share one A row-tile run together and the tile is read from HBM once
      and from L2 afterwards. R is chosen so that the two slabs hold no more elements
      than x and z together (or 1M elements, at least one row tile).

SiD / fake-score
    Forward: grid (row, K-split); each program streams its chunk with vector loads and
    forms and sums the per-element terms in float64 (fp32 products of inputs of ~1e20
    overflow; memory bound: ~8 fp64 FLOPs per 12 bytes read is cheap on H100). With
    one split per row the kernel writes the per-row results (loss_n, w_n, valid_n /
    sq_n, valid_n) itself; with several it writes float64 partials that one small
    finishing kernel reduces per row in a fixed order (deterministic).
    Backward: elementwise, grid (row, K-block); the per-row factor is formed in the
    kernel from w_n, valid_n and the device ``scale``; invalid rows get exact zeros.

Precision of the dots (fp32 inputs on CUDA): ``DOT_PRECISION``
-------------------------------------------------------------
An explicit choice, from the environment variable ``GSD_TRITON_DOT`` at import (or by
setting ``triton_backend.DOT_PRECISION`` at run time): ``tf32x3`` (default), ``tf32`` or
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
``triton_backend.TILES``), for the large-batch tensor-core path (N >= 1024, Gram mode on
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
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as _e:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

# The one close-pair tolerance of every backend (docs/design.md, "Close pairs"); the C++
# kernels hold the same numbers and a test checks that they agree.
from ..constants import CLOSE_PAIR_TOL as CLOSE_TOL

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
                "TRITON_INTERPRET=1 was set after gsd_kernels.backends.triton_backend was "
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


if triton is not None:

    # ======================================================================== helpers
    # How a squared-distance tile is formed (a constexpr per input, chosen by the launcher):
    #   MODE_DOT    Gram trick, x_i.x_j from tl.dot (tensor cores), |x_i|^2 + |x_j|^2 - 2 x_i.x_j
    #   MODE_FMA    Gram trick with an elementwise product-reduce (float64 when tl.dot fails)
    #   MODE_DIRECT sum_k (x_ik - x_jk)^2 from explicit differences: for small dims, where
    #               close pairs are common and the Gram trick loses the digits of
    #               (x_i - x_j) that the gradient's direction (x_i - x_j) / delta needs.
    MODE_DOT: tl.constexpr = tl.constexpr(0)
    MODE_FMA: tl.constexpr = tl.constexpr(1)
    MODE_DIRECT: tl.constexpr = tl.constexpr(2)

    @triton.jit
    def _clamp0(v):
        """max(v, 0) that keeps NaN (tl.maximum may drop it): a NaN input gives a NaN loss."""
        return tl.where(v < 0, 0.0, v)

    @triton.jit
    def _sqdist_tile(a_ptr, n2_ptr, rows, rmask, cols, cmask, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     MODE: tl.constexpr, DOT_PREC: tl.constexpr, TOL: tl.constexpr):
        """[BM, BN] squared distances between rows and cols of a (row-major, ld = K)."""
        acc = tl.zeros((BM, BN), dtype=a_ptr.dtype.element_ty)
        offk = tl.arange(0, BK)
        ra = rows.to(tl.int64) * K
        cb = cols.to(tl.int64) * K
        for k0 in range(0, K, BK):
            kk = k0 + offk
            km = kk < K
            a = tl.load(a_ptr + ra[:, None] + kk[None, :],
                        mask=rmask[:, None] & km[None, :], other=0.0)  # [BM, BK]
            if MODE == MODE_DOT:
                bt = tl.load(a_ptr + cb[None, :] + kk[:, None],
                             mask=cmask[None, :] & km[:, None], other=0.0)  # [BK, BN]
                acc = tl.dot(a, bt, acc, input_precision=DOT_PREC)
            else:
                b = tl.load(a_ptr + cb[:, None] + kk[None, :],
                            mask=cmask[:, None] & km[None, :], other=0.0)  # [BN, BK]
                if MODE == MODE_DIRECT:
                    diff = a[:, None, :] - b[None, :, :]
                    acc += tl.sum(diff * diff, axis=2)
                else:
                    acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
        if MODE != MODE_DIRECT:
            n_i = tl.load(n2_ptr + rows, mask=rmask, other=0.0)
            n_j = tl.load(n2_ptr + cols, mask=cmask, other=0.0)
            acc = _clamp0(n_i[:, None] + n_j[None, :] - 2.0 * acc)
            if TOL > 0:
                acc = _refine_close(acc, a_ptr, n2_ptr, rows, rmask, cols, cmask, K, TOL,
                                    BM, BN, 8)
        return acc

    @triton.jit
    def _refine_close(d2, a_ptr, n2_ptr, rows, rmask, cols, cmask, K, TOL: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BKR: tl.constexpr):
        """Gram-trick distances of close pairs (d2 <= TOL (|a_i|^2 + |a_j|^2), i != j) are
        rounding noise: an exact duplicate comes out as d2 ~ eps |a|^2 instead of 0, and
        then a = w (p delta + q dz) / delta is huge and wrong. Tiles holding such pairs
        (rare unless the batch has near-duplicates) recompute them from differences.
        Two zero rows (norm sum 0) give d2 = 0 exactly: not 'close', nothing to redo."""
        n_i = tl.load(n2_ptr + rows, mask=rmask, other=0.0)
        n_j = tl.load(n2_ptr + cols, mask=cmask, other=0.0)
        nsum = n_i[:, None] + n_j[None, :]
        pair = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        close = pair & (nsum > 0) & (d2 <= TOL * nsum)
        if tl.sum(close.to(tl.int32)) > 0:
            exact = tl.zeros((BM, BN), dtype=a_ptr.dtype.element_ty)
            offk = tl.arange(0, BKR)
            ra = rows.to(tl.int64) * K
            cb = cols.to(tl.int64) * K
            for k0 in range(0, K, BKR):
                kk = k0 + offk
                km = kk < K
                a = tl.load(a_ptr + ra[:, None] + kk[None, :],
                            mask=rmask[:, None] & km[None, :], other=0.0)
                b = tl.load(a_ptr + cb[:, None] + kk[None, :],
                            mask=cmask[:, None] & km[None, :], other=0.0)
                diff = a[:, None, :] - b[None, :, :]
                exact += tl.sum(diff * diff, axis=2)
            d2 = tl.where(close, exact, d2)
        return d2

    @triton.jit
    def _sqdist_loaded(ar, ac, n_i, n_j, MODE: tl.constexpr, DOT_PREC: tl.constexpr):
        """Squared distances between the rows of two loaded tiles ar [BM, P], ac [BN, P]."""
        if MODE == MODE_DIRECT:
            diff = ar[:, None, :] - ac[None, :, :]
            d2 = tl.sum(diff * diff, axis=2)
        else:
            if MODE == MODE_DOT:
                dot = tl.dot(ar, tl.trans(ac), input_precision=DOT_PREC)
            else:
                dot = tl.sum(ar[:, None, :] * ac[None, :, :], axis=2)
            d2 = _clamp0(n_i[:, None] + n_j[None, :] - 2.0 * dot)
        return d2

    @triton.jit
    def _accumulate(acc, coef, ar, ac, MODE: tl.constexpr, DOT_PREC: tl.constexpr):
        """DIRECT: acc += sum_j coef_ij (a_i - a_j); otherwise acc += coef @ ac."""
        if MODE == MODE_DIRECT:
            acc += tl.sum(coef[:, :, None] * (ar[:, None, :] - ac[None, :, :]), axis=1)
        elif MODE == MODE_DOT:
            acc = tl.dot(coef, ac, acc, input_precision=DOT_PREC)
        else:
            acc += tl.sum(coef[:, :, None] * ac[None, :, :], axis=1)
        return acc

    @triton.jit
    def _pair_terms(d2, z2, inv_two_h2):
        """The pair epilogue in float64 (see the module docstring: fp32 sqrt bias)."""
        d2 = d2.to(tl.float64)
        z2 = z2.to(tl.float64)
        delta = tl.sqrt(d2)  # fp64: correctly rounded (sqrt.rn.f64)
        dz = tl.sqrt(z2)
        w = tl.exp(-z2 * inv_two_h2)  # exactly 1 when inv_two_h2 == 0
        return d2, z2, delta, dz, w

    @triton.jit
    def _coefs(d2, z2, delta, dz, w, p, q, r, s):
        """a = w (p delta + q dz) / delta, b = w (r dz + s delta) / dz (0 at 0 distance)."""
        inv_d = tl.where(d2 > 0, 1.0 / tl.where(d2 > 0, delta, 1.0), 0.0)
        inv_z = tl.where(z2 > 0, 1.0 / tl.where(z2 > 0, dz, 1.0), 0.0)
        a = w * (p * delta + q * dz) * inv_d
        b = w * (r * dz + s * delta) * inv_z
        return a, b

    # ================================================================ isometry fwd
    @triton.jit
    def _iso_fwd_kernel(x_ptr, z_ptr, xn2_ptr, zn2_ptr, h_ptr, part_ptr,
                        r0, r1, c0, c1, D, d, n_ct,
                        SYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BKX: tl.constexpr, BKZ: tl.constexpr,
                        MODE_X: tl.constexpr, MODE_Z: tl.constexpr, DOT_PREC: tl.constexpr,
                        TOL: tl.constexpr):
        pid = tl.program_id(0)
        if SYM:
            # pid enumerates the lower triangle rt >= ct: pid = rt (rt + 1) / 2 + ct
            rt = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
            rt = tl.where(rt * (rt + 1) // 2 > pid, rt - 1, rt)
            rt = tl.where((rt + 1) * (rt + 2) // 2 <= pid, rt + 1, rt)
            ct = pid - rt * (rt + 1) // 2
            wt = tl.where(rt == ct, 1.0, 2.0)
        else:
            rt = pid // n_ct
            ct = pid % n_ct
            wt = 1.0
        inv_two_h2 = tl.load(h_ptr)  # float64, on the device: no host round trip
        rows = r0 + rt * BM + tl.arange(0, BM)
        cols = c0 + ct * BN + tl.arange(0, BN)
        rmask = rows < r1
        cmask = cols < c1
        d2 = _sqdist_tile(x_ptr, xn2_ptr, rows, rmask, cols, cmask, D, BM, BN, BKX,
                          MODE_X, DOT_PREC, TOL)
        z2 = _sqdist_tile(z_ptr, zn2_ptr, rows, rmask, cols, cmask, d, BM, BN, BKZ,
                          MODE_Z, DOT_PREC, TOL)
        d2, z2, delta, dz, w = _pair_terms(d2, z2, inv_two_h2)
        valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        w = tl.where(valid, w, 0.0)
        wt = wt.to(tl.float64)
        out = part_ptr + pid.to(tl.int64) * 4
        tl.store(out + 0, tl.sum(w) * wt)
        tl.store(out + 1, tl.sum(w * d2) * wt)
        tl.store(out + 2, tl.sum(w * delta * dz) * wt)
        tl.store(out + 3, tl.sum(w * z2) * wt)

    # ====================================================== isometry bwd, small dims
    @triton.jit
    def _iso_bwd_small_kernel(x_ptr, z_ptr, xn2_ptr, zn2_ptr, h_ptr, coef_ptr, gx_ptr, gz_ptr,
                              r0, r1, c0, c1, D, d,
                              BM: tl.constexpr, BN: tl.constexpr,
                              DPX: tl.constexpr, DPZ: tl.constexpr,
                              MODE_X: tl.constexpr, MODE_Z: tl.constexpr,
                              DOT_PREC: tl.constexpr, TOL: tl.constexpr,
                              NEED_X: tl.constexpr, NEED_Z: tl.constexpr):
        """Flash style: one program per row tile, whole rows of x and z in registers."""
        rt = tl.program_id(0)
        DT = x_ptr.dtype.element_ty
        inv_two_h2 = tl.load(h_ptr)
        p = tl.load(coef_ptr + 0)
        q = tl.load(coef_ptr + 1)
        r = tl.load(coef_ptr + 2)
        s = tl.load(coef_ptr + 3)
        lr = rt * BM + tl.arange(0, BM)
        rows = r0 + lr
        rmask = rows < r1
        kx = tl.arange(0, DPX)
        kz = tl.arange(0, DPZ)
        kxm = kx < D
        kzm = kz < d
        rows64 = rows.to(tl.int64)
        xr = tl.load(x_ptr + rows64[:, None] * D + kx[None, :],
                     mask=rmask[:, None] & kxm[None, :], other=0.0)
        zr = tl.load(z_ptr + rows64[:, None] * d + kz[None, :],
                     mask=rmask[:, None] & kzm[None, :], other=0.0)
        xn2_i = tl.load(xn2_ptr + rows, mask=rmask, other=0.0)
        zn2_i = tl.load(zn2_ptr + rows, mask=rmask, other=0.0)
        accx = tl.zeros((BM, DPX), dtype=DT)
        accz = tl.zeros((BM, DPZ), dtype=DT)
        rsa = tl.zeros((BM,), dtype=tl.float64)
        rsb = tl.zeros((BM,), dtype=tl.float64)
        for cs in range(c0, c1, BN):
            cols = cs + tl.arange(0, BN)
            cmask = cols < c1
            cols64 = cols.to(tl.int64)
            xc = tl.load(x_ptr + cols64[:, None] * D + kx[None, :],
                         mask=cmask[:, None] & kxm[None, :], other=0.0)  # [BN, DPX]
            zc = tl.load(z_ptr + cols64[:, None] * d + kz[None, :],
                         mask=cmask[:, None] & kzm[None, :], other=0.0)  # [BN, DPZ]
            xn2_j = tl.load(xn2_ptr + cols, mask=cmask, other=0.0)
            zn2_j = tl.load(zn2_ptr + cols, mask=cmask, other=0.0)
            d2 = _sqdist_loaded(xr, xc, xn2_i, xn2_j, MODE_X, DOT_PREC)
            z2 = _sqdist_loaded(zr, zc, zn2_i, zn2_j, MODE_Z, DOT_PREC)
            if MODE_X != MODE_DIRECT and TOL > 0:
                d2 = _refine_close(d2, x_ptr, xn2_ptr, rows, rmask, cols, cmask, D, TOL,
                                   BM, BN, 8)
            if MODE_Z != MODE_DIRECT and TOL > 0:
                z2 = _refine_close(z2, z_ptr, zn2_ptr, rows, rmask, cols, cmask, d, TOL,
                                   BM, BN, 8)
            d2, z2, delta, dz, w = _pair_terms(d2, z2, inv_two_h2)
            a, b = _coefs(d2, z2, delta, dz, w, p, q, r, s)
            valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
            if NEED_X:
                a = tl.where(valid, a, 0.0)
                rsa += tl.sum(a, axis=1)
                accx = _accumulate(accx, a.to(DT), xr, xc, MODE_X, DOT_PREC)
            if NEED_Z:
                b = tl.where(valid, b, 0.0)
                rsb += tl.sum(b, axis=1)
                accz = _accumulate(accz, b.to(DT), zr, zc, MODE_Z, DOT_PREC)
        lr64 = lr.to(tl.int64)
        if NEED_X:
            if MODE_X == MODE_DIRECT:
                gx = accx
            else:
                gx = (xr.to(tl.float64) * rsa[:, None] - accx.to(tl.float64)).to(DT)
            tl.store(gx_ptr + lr64[:, None] * D + kx[None, :], gx,
                     mask=rmask[:, None] & kxm[None, :])
        if NEED_Z:
            if MODE_Z == MODE_DIRECT:
                gz = accz
            else:
                gz = (zr.to(tl.float64) * rsb[:, None] - accz.to(tl.float64)).to(DT)
            tl.store(gz_ptr + lr64[:, None] * d + kz[None, :], gz,
                     mask=rmask[:, None] & kzm[None, :])

    # ====================================================== isometry bwd, large dims
    @triton.jit
    def _iso_coef_kernel(x_ptr, z_ptr, xn2_ptr, zn2_ptr, h_ptr, coef_ptr, a_ptr, b_ptr,
                         row0, nrows, c0, C, D, d,
                         BM: tl.constexpr, BN: tl.constexpr,
                         BKX: tl.constexpr, BKZ: tl.constexpr,
                         MODE_X: tl.constexpr, MODE_Z: tl.constexpr, DOT_PREC: tl.constexpr,
                         TOL: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr):
        """Coefficients a, b of a slab of rows [row0, row0 + nrows) x columns [c0, c0 + C)
        (only those asked for: NEED_A / NEED_B)."""
        rt = tl.program_id(0)
        ct = tl.program_id(1)
        inv_two_h2 = tl.load(h_ptr)
        p = tl.load(coef_ptr + 0)
        q = tl.load(coef_ptr + 1)
        r = tl.load(coef_ptr + 2)
        s = tl.load(coef_ptr + 3)
        lr = rt * BM + tl.arange(0, BM)
        lc = ct * BN + tl.arange(0, BN)
        rmask = lr < nrows
        cmask = lc < C
        rows = row0 + lr
        cols = c0 + lc
        d2 = _sqdist_tile(x_ptr, xn2_ptr, rows, rmask, cols, cmask, D, BM, BN, BKX,
                          MODE_X, DOT_PREC, TOL)
        z2 = _sqdist_tile(z_ptr, zn2_ptr, rows, rmask, cols, cmask, d, BM, BN, BKZ,
                          MODE_Z, DOT_PREC, TOL)
        d2, z2, delta, dz, w = _pair_terms(d2, z2, inv_two_h2)
        a, b = _coefs(d2, z2, delta, dz, w, p, q, r, s)
        valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        off = lr.to(tl.int64)[:, None] * C + lc[None, :]
        m = rmask[:, None] & cmask[None, :]
        if NEED_A:
            tl.store(a_ptr + off, tl.where(valid, a, 0.0).to(a_ptr.dtype.element_ty), mask=m)
        if NEED_B:
            tl.store(b_ptr + off, tl.where(valid, b, 0.0).to(b_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _iso_apply_kernel(a_ptr, x_ptr, out_ptr, row0, out_row0, nrows, c0, C, K,
                          BM: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                          MODE: tl.constexpr, DOT_PREC: tl.constexpr):
        """out[out_row0 + i] = sum_j A[i, j] (x[row0 + i] - x[c0 + j]) for one D-chunk:
        x_i * rowsum(A) - A @ X (a GEMM on tensor cores), or directly for small dims.
        Grid (D-chunk, row tile), D-chunk fastest: the programs reading one A row tile
        run together, so it comes from HBM once and from L2 after that."""
        kt = tl.program_id(0)
        rt = tl.program_id(1)
        DT = x_ptr.dtype.element_ty
        lr = rt * BM + tl.arange(0, BM)
        rmask = lr < nrows
        kd = kt * BD + tl.arange(0, BD)
        kmask = kd < K
        xi_ptr = x_ptr + (row0 + lr).to(tl.int64)[:, None] * K + kd[None, :]
        xi_mask = rmask[:, None] & kmask[None, :]
        if MODE == MODE_DIRECT:  # the differences need x_i in the loop
            xi = tl.load(xi_ptr, mask=xi_mask, other=0.0)
        else:  # only the epilogue needs x_i: loaded there, not held across the GEMM
            xi = tl.zeros((BM, BD), dtype=DT)
        acc = tl.zeros((BM, BD), dtype=DT)
        rs = tl.zeros((BM,), dtype=DT)
        arow = lr.to(tl.int64) * C
        for cs in range(0, C, BC):
            lc = cs + tl.arange(0, BC)
            cm = lc < C
            a = tl.load(a_ptr + arow[:, None] + lc[None, :],
                        mask=rmask[:, None] & cm[None, :], other=0.0)  # [BM, BC]
            xc = tl.load(x_ptr + (c0 + lc).to(tl.int64)[:, None] * K + kd[None, :],
                         mask=cm[:, None] & kmask[None, :], other=0.0)  # [BC, BD]
            rs += tl.sum(a, axis=1)
            acc = _accumulate(acc, a, xi, xc, MODE, DOT_PREC)
        if MODE == MODE_DIRECT:
            g = acc
        else:
            xi = tl.load(xi_ptr, mask=xi_mask, other=0.0)
            g = xi * rs[:, None] - acc  # fp32 is enough here; fp64 made larger tiles spill
        tl.store(out_ptr + (out_row0 + lr).to(tl.int64)[:, None] * K + kd[None, :], g,
                 mask=rmask[:, None] & kmask[None, :])

    # ====================================================== isometry, grouped pairs
    # Row i pairs only with its own block of G rows, clipped to [c0, c1) (docs/design.md,
    # "Grouped pairs"). One program per row; each squared distance is summed directly from
    # the rows in float64 (no Gram trick, so no close-pair refine): O(R G (D + d)) work,
    # nothing N x N, each row owned by one program (deterministic).
    @triton.jit
    def _row_sqdist(a_ptr, i, j, K, BK: tl.constexpr):
        """sum_k (a_ik - a_jk)^2 in float64; i, j int64 row indices."""
        ai = a_ptr + i * K
        aj = a_ptr + j * K
        acc = tl.zeros([BK], dtype=tl.float64)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            m = kk < K
            u = (tl.load(ai + kk, mask=m, other=0.0) - tl.load(aj + kk, mask=m, other=0.0)).to(tl.float64)
            acc += u * u
        return tl.sum(acc)

    @triton.jit
    def _iso_grouped_fwd_kernel(x_ptr, z_ptr, h_ptr, part_ptr, r0, c0, c1, G, D, d,
                                BKX: tl.constexpr, BKZ: tl.constexpr):
        t = tl.program_id(0)
        i = r0 + t
        inv_two_h2 = tl.load(h_ptr)
        base = (i // G) * G
        lo = tl.maximum(base, c0)
        hi = tl.minimum(base + G, c1)
        s0 = tl.zeros([1], dtype=tl.float64)
        s1 = tl.zeros([1], dtype=tl.float64)
        s2 = tl.zeros([1], dtype=tl.float64)
        s3 = tl.zeros([1], dtype=tl.float64)
        i64 = i.to(tl.int64)
        for j in range(lo, hi):
            j64 = lo.to(tl.int64) + (j - lo)  # (the interpreter's loop index is a Python int)
            d2 = _row_sqdist(x_ptr, i64, j64, D, BKX)
            z2 = _row_sqdist(z_ptr, i64, j64, d, BKZ)
            d2, z2, delta, dz, w = _pair_terms(d2, z2, inv_two_h2)
            w = tl.where(j64 != i64, w, 0.0)
            s0 += w
            s1 += w * d2
            s2 += w * delta * dz
            s3 += w * z2
        out = part_ptr + t.to(tl.int64) * 4 + tl.arange(0, 1)
        tl.store(out + 0, s0)
        tl.store(out + 1, s1)
        tl.store(out + 2, s2)
        tl.store(out + 3, s3)

    @triton.jit
    def _iso_grouped_bwd_kernel(x_ptr, z_ptr, h_ptr, coef_ptr, gx_ptr, gz_ptr, r0, c0, c1, G, D, d,
                                BKX: tl.constexpr, BKZ: tl.constexpr,
                                NEED_X: tl.constexpr, NEED_Z: tl.constexpr):
        """gx_i = sum_j a_ij (x_i - x_j), gz_i = sum_j b_ij (z_i - z_j): the program adds
        each pair's term into its own output row (the same elements per thread every time)."""
        t = tl.program_id(0)
        i = r0 + t
        inv_two_h2 = tl.load(h_ptr)
        p = tl.load(coef_ptr + 0)
        q = tl.load(coef_ptr + 1)
        r = tl.load(coef_ptr + 2)
        s = tl.load(coef_ptr + 3)
        base = (i // G) * G
        lo = tl.maximum(base, c0)
        hi = tl.minimum(base + G, c1)
        xi = x_ptr + i.to(tl.int64) * D
        zi = z_ptr + i.to(tl.int64) * d
        gxi = gx_ptr + t.to(tl.int64) * D
        gzi = gz_ptr + t.to(tl.int64) * d
        if NEED_X:
            for k0 in range(0, D, BKX):
                kk = k0 + tl.arange(0, BKX)
                tl.store(gxi + kk, tl.zeros([BKX], dtype=gx_ptr.dtype.element_ty), mask=kk < D)
        if NEED_Z:
            for k0 in range(0, d, BKZ):
                kk = k0 + tl.arange(0, BKZ)
                tl.store(gzi + kk, tl.zeros([BKZ], dtype=gz_ptr.dtype.element_ty), mask=kk < d)
        i64 = i.to(tl.int64)
        for j in range(lo, hi):
            j64 = lo.to(tl.int64) + (j - lo)  # (the interpreter's loop index is a Python int)
            d2 = _row_sqdist(x_ptr, i64, j64, D, BKX)
            z2 = _row_sqdist(z_ptr, i64, j64, d, BKZ)
            d2, z2, delta, dz, w = _pair_terms(d2, z2, inv_two_h2)
            a, b = _coefs(d2, z2, delta, dz, w, p, q, r, s)
            if NEED_X:
                av = tl.where(j64 != i64, a, 0.0).to(gx_ptr.dtype.element_ty)
                xj = x_ptr + j64 * D
                for k0 in range(0, D, BKX):
                    kk = k0 + tl.arange(0, BKX)
                    m = kk < D
                    diff = tl.load(xi + kk, mask=m, other=0.0) - tl.load(xj + kk, mask=m, other=0.0)
                    g = tl.load(gxi + kk, mask=m, other=0.0) + av * diff
                    tl.store(gxi + kk, g, mask=m)
            if NEED_Z:
                bv = tl.where(j64 != i64, b, 0.0).to(gz_ptr.dtype.element_ty)
                zj = z_ptr + j64 * d
                for k0 in range(0, d, BKZ):
                    kk = k0 + tl.arange(0, BKZ)
                    m = kk < d
                    diff = tl.load(zi + kk, mask=m, other=0.0) - tl.load(zj + kk, mask=m, other=0.0)
                    g = tl.load(gzi + kk, mask=m, other=0.0) + bv * diff
                    tl.store(gzi + kk, g, mask=m)

    # ================================================================= SiD / fake
    @triton.jit
    def _finite(v):
        return tl.abs(v) < float("inf")  # False for +-inf and NaN

    @triton.jit
    def _clamp_w(w):
        """max(w, 1e-5) with 1e-5 as a float64 number (a bare literal would be fp32)."""
        return tl.maximum(w, tl.full(w.shape, 1e-5, tl.float64))

    @triton.jit
    def _sid_row_results(bad, s_abs, s_l, Kf, n, loss_ptr, w_ptr, valid_ptr):
        """loss_n, w_n, valid_n of one row from its float64 totals."""
        valid = bad == 0
        w = _clamp_w(s_abs / Kf)
        w = tl.where(valid, w, 1.0)
        tl.store(loss_ptr + n, tl.where(valid, s_l / w, 0.0))
        tl.store(w_ptr + n, w)
        tl.store(valid_ptr + n, valid)

    @triton.jit
    def _sid_fwd_kernel(g_ptr, r_ptr, f_ptr, a0, a1, a2, part_ptr, loss_ptr, w_ptr, valid_ptr,
                        K, CHUNK, NS, BLOCK: tl.constexpr, FINAL: tl.constexpr):
        n = tl.program_id(0)
        sp = tl.program_id(1)
        # float64 arithmetic per element: products of large fp32 inputs (|x| ~ 1e20) would
        # overflow fp32, and the kernel is memory bound, so the fp64 FLOPs are free
        alpha = tl.cast(a0, tl.float64) + tl.cast(a1, tl.float64) + tl.cast(a2, tl.float64)
        base = n.to(tl.int64) * K
        offs = tl.arange(0, BLOCK)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, K)
        bad = tl.zeros((BLOCK,), dtype=tl.int32)
        s_abs = tl.zeros((BLOCK,), dtype=tl.float64)
        s_l = tl.zeros((BLOCK,), dtype=tl.float64)
        for k0 in range(start, end, BLOCK):
            kk = k0 + offs
            m = kk < end
            g = tl.load(g_ptr + base + kk, mask=m, other=0.0)
            r = tl.load(r_ptr + base + kk, mask=m, other=0.0)
            f = tl.load(f_ptr + base + kk, mask=m, other=0.0)
            fin = _finite(g) & _finite(r) & _finite(f)
            bad += tl.where(fin, 0, 1)
            r = r.to(tl.float64)
            a = r - f.to(tl.float64)
            b = r - g.to(tl.float64)
            s_abs += tl.abs(b)
            s_l += a * (b - alpha * a)
        nbad = tl.sum(bad, axis=0)
        t_abs = tl.sum(s_abs, axis=0)
        t_l = tl.sum(s_l, axis=0)
        if FINAL:  # one split per row: this program has the whole row
            _sid_row_results(nbad, t_abs, t_l, tl.maximum(K, 1).to(tl.float64), n,
                             loss_ptr, w_ptr, valid_ptr)
        else:
            out = part_ptr + (n.to(tl.int64) * NS + sp) * 3
            tl.store(out + 0, nbad.to(tl.float64))
            tl.store(out + 1, t_abs)
            tl.store(out + 2, t_l)

    @triton.jit
    def _sid_fin_kernel(part_ptr, loss_ptr, w_ptr, valid_ptr, N, NS, K,
                        BR: tl.constexpr, BS: tl.constexpr):
        """Per-row totals of the float64 partials [N, NS, 3], in a fixed order."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rm = rows < N
        base = rows.to(tl.int64) * NS * 3
        bad = tl.zeros((BR,), dtype=tl.float64)
        s_abs = tl.zeros((BR,), dtype=tl.float64)
        s_l = tl.zeros((BR,), dtype=tl.float64)
        for s0 in range(0, NS, BS):
            sp = s0 + tl.arange(0, BS)
            m = rm[:, None] & (sp < NS)[None, :]
            off = base[:, None] + sp[None, :] * 3
            bad += tl.sum(tl.load(part_ptr + off, mask=m, other=0.0), axis=1)
            s_abs += tl.sum(tl.load(part_ptr + off + 1, mask=m, other=0.0), axis=1)
            s_l += tl.sum(tl.load(part_ptr + off + 2, mask=m, other=0.0), axis=1)
        Kf = tl.maximum(K, 1).to(tl.float64)
        valid = bad == 0
        w = _clamp_w(s_abs / Kf)
        w = tl.where(valid, w, 1.0)
        tl.store(loss_ptr + rows, tl.where(valid, s_l / w, 0.0), mask=rm)
        tl.store(w_ptr + rows, w, mask=rm)
        tl.store(valid_ptr + rows, valid, mask=rm)

    @triton.jit
    def _sid_bwd_kernel(g_ptr, r_ptr, f_ptr, a0, a1, a2, w_ptr, valid_ptr, scale_ptr,
                        gg_ptr, gr_ptr, gf_ptr, K, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        kb = tl.program_id(1)
        DT = g_ptr.dtype.element_ty
        alpha = tl.cast(a0, DT) + tl.cast(a1, DT) + tl.cast(a2, DT)
        # per-row factor scale / w_n (0 for invalid rows), formed here in float64
        ok = tl.load(valid_ptr + n) != 0
        c64 = tl.load(scale_ptr) / tl.load(w_ptr + n)
        c = tl.where(ok, c64, 0.0).to(DT)
        kk = kb * BLOCK + tl.arange(0, BLOCK)
        m = kk < K
        off = n.to(tl.int64) * K + kk
        g = tl.load(g_ptr + off, mask=m, other=0.0)
        r = tl.load(r_ptr + off, mask=m, other=0.0)
        f = tl.load(f_ptr + off, mask=m, other=0.0)
        a = r - f
        b = r - g
        live = c != 0  # c == 0 for invalid rows: write exact zeros, never 0 * NaN
        g_real = tl.where(live, c * (b + (1.0 - 2.0 * alpha) * a), 0.0)
        g_fake = tl.where(live, -c * (b - 2.0 * alpha * a), 0.0)
        g_xg = tl.where(live, -c * a, 0.0)
        tl.store(gg_ptr + off, g_xg, mask=m)
        tl.store(gr_ptr + off, g_real, mask=m)
        tl.store(gf_ptr + off, g_fake, mask=m)

    @triton.jit
    def _fake_fwd_kernel(y_ptr, x_ptr, part_ptr, sq_ptr, valid_ptr, K, CHUNK, NS,
                         BLOCK: tl.constexpr, FINAL: tl.constexpr):
        n = tl.program_id(0)
        sp = tl.program_id(1)
        base = n.to(tl.int64) * K
        offs = tl.arange(0, BLOCK)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, K)
        bad = tl.zeros((BLOCK,), dtype=tl.int32)
        s_sq = tl.zeros((BLOCK,), dtype=tl.float64)
        for k0 in range(start, end, BLOCK):
            kk = k0 + offs
            m = kk < end
            y = tl.load(y_ptr + base + kk, mask=m, other=0.0)
            x = tl.load(x_ptr + base + kk, mask=m, other=0.0)
            fin = _finite(y) & _finite(x)
            bad += tl.where(fin, 0, 1)
            e = y.to(tl.float64) - x.to(tl.float64)  # fp64: e * e of fp32 inputs can overflow
            s_sq += e * e
        nbad = tl.sum(bad, axis=0)
        t_sq = tl.sum(s_sq, axis=0)
        if FINAL:
            valid = nbad == 0
            tl.store(sq_ptr + n, tl.where(valid, t_sq, 0.0))
            tl.store(valid_ptr + n, valid)
        else:
            out = part_ptr + (n.to(tl.int64) * NS + sp) * 2
            tl.store(out + 0, nbad.to(tl.float64))
            tl.store(out + 1, t_sq)

    @triton.jit
    def _fake_fin_kernel(part_ptr, sq_ptr, valid_ptr, N, NS,
                         BR: tl.constexpr, BS: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rm = rows < N
        base = rows.to(tl.int64) * NS * 2
        bad = tl.zeros((BR,), dtype=tl.float64)
        s_sq = tl.zeros((BR,), dtype=tl.float64)
        for s0 in range(0, NS, BS):
            sp = s0 + tl.arange(0, BS)
            m = rm[:, None] & (sp < NS)[None, :]
            off = base[:, None] + sp[None, :] * 2
            bad += tl.sum(tl.load(part_ptr + off, mask=m, other=0.0), axis=1)
            s_sq += tl.sum(tl.load(part_ptr + off + 1, mask=m, other=0.0), axis=1)
        valid = bad == 0
        tl.store(sq_ptr + rows, tl.where(valid, s_sq, 0.0), mask=rm)
        tl.store(valid_ptr + rows, valid, mask=rm)

    @triton.jit
    def _fake_bwd_kernel(y_ptr, x_ptr, c_ptr, gy_ptr, gx_ptr, K, BLOCK: tl.constexpr,
                         NEED_X: tl.constexpr):
        n = tl.program_id(0)
        kb = tl.program_id(1)
        c = tl.load(c_ptr + n).to(y_ptr.dtype.element_ty)  # float64 coef_n on the device
        kk = kb * BLOCK + tl.arange(0, BLOCK)
        m = kk < K
        off = n.to(tl.int64) * K + kk
        y = tl.load(y_ptr + off, mask=m, other=0.0)
        x = tl.load(x_ptr + off, mask=m, other=0.0)
        gy = tl.where(c != 0, 2.0 * c * (y - x), 0.0)
        tl.store(gy_ptr + off, gy, mask=m)
        if NEED_X:
            tl.store(gx_ptr + off, -gy, mask=m)


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
        raise ValueError(f"GSD_TRITON_DOT / triton_backend.DOT_PRECISION = {DOT_PRECISION!r}: "
                         f"use one of {_DOT_CHOICES} or GRAM:APPLY, e.g. tf32:tf32x3")
    if dtype == torch.float32 and device.type == "cuda" and not _interpreting() \
            and torch.version.hip is None:
        return parts[0], parts[-1]
    return "ieee", "ieee"


def _tiles(kernel: str):
    """This kernel's entry of TILE_PRESETS[TILES] (large-batch Gram path)."""
    preset = TILE_PRESETS.get(TILES)
    if preset is None:
        raise ValueError(f"GSD_TRITON_TILES / triton_backend.TILES = {TILES!r}: use one of "
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


_DOT, _FMA, _DIRECT = 0, 1, 2  # the kernels' MODE_DOT, MODE_FMA, MODE_DIRECT


def _mode(dim: int, use_dot: bool) -> int:
    if dim <= DIRECT_MAX:
        return _DIRECT
    return _DOT if use_dot else _FMA


def _pow2(v: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(v), 1)))


def _bk(dim: int, mode: int) -> int:
    """K-chunk of a squared-distance tile: wide for tl.dot, narrow for the 3-D broadcasts."""
    if mode == _DOT:
        return 32
    if mode == _DIRECT:
        return min(8, _pow2(dim, 4))
    return 8


def _large(nr: int, modes) -> bool:
    """The tile table applies to long row ranges on the tl.dot path of both inputs."""
    return nr >= LARGE_TILE_MIN_ROWS and all(m == _DOT for m in modes)


def _fwd_cfg(nr: int, mx: int, mz: int):
    """(BM = BN, BK of tl.dot, num_warps, num_stages) of the forward. Small batches and the
    3-D broadcast modes (BM*BN*BK values: 32*32*8 = 64 per thread with 4 warps) use 32 x 32
    tiles with 4 warps, so that enough programs run and nothing spills."""
    if _large(nr, (mx, mz)):
        return _tiles("fwd")
    return 32, 32, 4, 3


def _coef_cfg(nr: int, mx: int, mz: int):
    """(BM, BN, BK of tl.dot, num_warps, num_stages) of the backward's coefficient slab."""
    if _large(nr, (mx, mz)):
        return _tiles("coef")
    return 32, 32, 32, 4, 3


def _bk_of(dim: int, mode: int, bk_dot: int) -> int:
    return bk_dot if mode == _DOT else _bk(dim, mode)


def _apply_cfg(nr: int, mode: int, dim: int, modes):
    """(BM, BC, BD, num_warps, num_stages) of the A @ X GEMM."""
    if _large(nr, modes):
        return _tiles("apply")
    if mode == _DIRECT:
        return 32, 8, _pow2(dim, 4), 4, 3
    if mode == _DOT:
        return 32, 32, 64, 4, 3
    return 32, 8, 32, 4, 3


def _iso_prepare(x, z, xn2, zn2, mean_x, mean_z):
    _check_ready(x, z, xn2, zn2)
    if mean_x is not None or mean_z is not None:
        raise ValueError("the triton primitives take centred rows and their norms, "
                         "not mean_x / mean_z")
    x = _prep(x)
    dtype, dev = x.dtype, x.device
    z = _prep(z, dtype)
    n = x.shape[0]
    if z.shape[0] != n:
        raise ValueError("x and z must have the same number of rows")
    xn2 = _prep_vec(xn2, n, dtype, dev)
    zn2 = _prep_vec(zn2, n, dtype, dev)
    return x, z, xn2, zn2


GROUPED_BK_MAX = 1024  # elements per vector step of the grouped kernels


def _grouped_bk(dim: int) -> int:
    return min(_pow2(dim, 16), GROUPED_BK_MAX)


def _iso_grouped_forward(x, z, h, r0, r1, c0, c1, groups):
    dev = x.device
    nr = r1 - r0
    part = torch.empty((nr, 4), dtype=torch.float64, device=dev)
    with _device_ctx(dev):
        _iso_grouped_fwd_kernel[(nr,)](x, z, h, part, r0, c0, c1, groups, x.shape[1], z.shape[1],
                                       BKX=_grouped_bk(x.shape[1]), BKZ=_grouped_bk(z.shape[1]),
                                       num_warps=4)
    return part.sum(0)


def _iso_grouped_backward(x, z, h, cf, r0, r1, c0, c1, groups, gx, gz):
    dummy = gx if gx is not None else gz
    with _device_ctx(x.device):
        _iso_grouped_bwd_kernel[(r1 - r0,)](
            x, z, h, cf, gx if gx is not None else dummy, gz if gz is not None else dummy,
            r0, c0, c1, groups, x.shape[1], z.shape[1],
            BKX=_grouped_bk(x.shape[1]), BKZ=_grouped_bk(z.shape[1]),
            NEED_X=gx is not None, NEED_Z=gz is not None, num_warps=4)
    return gx, gz


# ======================================================================= isometry
def iso_forward_sums(x, z, xn2, zn2, r0, r1, c0, c1, inv_two_h2, *, mean_x=None,
                     mean_z=None, groups=0):
    """[sum w, sum w delta^2, sum w delta dz, sum w dz^2] (float64 [4]) over the pairs.
    inv_two_h2: 0-dim float64 tensor on the inputs' device. groups = g >= 2: only the pairs
    with i // g == j // g (the direct grouped kernel)."""
    x, z, xn2, zn2 = _iso_prepare(x, z, xn2, zn2, mean_x, mean_z)
    dtype, dev = x.dtype, x.device
    h = _device_scalars(inv_two_h2, "inv_two_h2", 1, dev)
    r0, r1, c0, c1 = int(r0), int(r1), int(c0), int(c1)
    D, d = x.shape[1], z.shape[1]
    nr, nc = r1 - r0, c1 - c0
    if nr <= 0 or nc <= 0:
        return torch.zeros(4, dtype=torch.float64, device=dev)
    groups = int(groups)
    if groups:
        return _iso_grouped_forward(x, z, h, r0, r1, c0, c1, groups)
    sym = (r0 == c0 and r1 == c1)
    prec, _ = _dot_precisions(dtype, dev)
    tol = _close_tol(dtype)

    def launch(use_dot):
        mx, mz = _mode(D, use_dot), _mode(d, use_dot)
        BM, bkd, nw, ns = _fwd_cfg(nr, mx, mz)
        n_rt = triton.cdiv(nr, BM)
        n_ct = triton.cdiv(nc, BM)
        nprog = n_rt * (n_rt + 1) // 2 if sym else n_rt * n_ct
        part = torch.empty((nprog, 4), dtype=torch.float64, device=dev)
        with _device_ctx(dev):
            _iso_fwd_kernel[(nprog,)](
                x, z, xn2, zn2, h, part, r0, r1, c0, c1, D, d, n_ct,
                SYM=sym, BM=BM, BN=BM, BKX=_bk_of(D, mx, bkd), BKZ=_bk_of(d, mz, bkd),
                MODE_X=mx, MODE_Z=mz, DOT_PREC=prec, TOL=tol,
                num_warps=nw, num_stages=ns)
        return part

    part = _with_dot_fallback(("iso_fwd", dtype, dev.index), launch,
                              uses_dot=max(D, d) > DIRECT_MAX)
    return part.sum(0)


def iso_backward_rows(x, z, xn2, zn2, r0, r1, c0, c1, inv_two_h2, coef, *, need_x=True,
                      need_z=True, mean_x=None, mean_z=None, groups=0):
    """(gx or None, gz or None): gx_i = sum_j a_ij (x_i - x_j), gz_i = sum_j b_ij (z_i - z_j)
    for i in [r0, r1). inv_two_h2: 0-dim float64 device tensor; coef: float64 [4] device
    tensor p, q, r, s. A side that is not needed is neither computed nor allocated."""
    x, z, xn2, zn2 = _iso_prepare(x, z, xn2, zn2, mean_x, mean_z)
    dtype, dev = x.dtype, x.device
    h = _device_scalars(inv_two_h2, "inv_two_h2", 1, dev)
    cf = _device_scalars(coef, "coef", 4, dev)
    need_x, need_z = bool(need_x), bool(need_z)
    r0, r1, c0, c1 = int(r0), int(r1), int(c0), int(c1)
    D, d = x.shape[1], z.shape[1]
    nr, nc = max(r1 - r0, 0), max(c1 - c0, 0)
    empty = nr == 0 or nc == 0
    # exactly zero when no pair contributes; otherwise every row is written by a kernel
    alloc = torch.zeros if empty else torch.empty
    gx = alloc((nr, D), dtype=dtype, device=dev) if need_x else None
    gz = alloc((nr, d), dtype=dtype, device=dev) if need_z else None
    if empty or not (need_x or need_z):
        return gx, gz
    groups = int(groups)
    if groups:
        return _iso_grouped_backward(x, z, h, cf, r0, r1, c0, c1, groups, gx, gz)
    prec, aprec = _dot_precisions(dtype, dev)
    tol = _close_tol(dtype)
    uses_dot = max(D, d) > DIRECT_MAX
    dummy = gx if need_x else gz  # a pointer for the output the kernel never touches

    def launch_small(use_dot):
        mx, mz = _mode(D, use_dot), _mode(d, use_dot)
        if _FMA in (mx, mz):
            # whole rows in a 3-D product-reduce would not fit in registers
            return launch_slabs(use_dot)
        DPX = _pow2(D, 16 if mx == _DOT else 4)
        DPZ = _pow2(d, 16 if mz == _DOT else 4)
        # 3-D broadcasts of BM x BN x DP values need small tiles; 8 warps for the rest
        BM = 32 if (mx == _DOT and mz == _DOT) else 16
        with _device_ctx(dev):
            _iso_bwd_small_kernel[(triton.cdiv(nr, BM),)](
                x, z, xn2, zn2, h, cf, gx if need_x else dummy, gz if need_z else dummy,
                r0, r1, c0, c1, D, d,
                BM=BM, BN=BM, DPX=DPX, DPZ=DPZ, MODE_X=mx, MODE_Z=mz,
                DOT_PREC=prec, TOL=tol, NEED_X=need_x, NEED_Z=need_z, num_warps=8)
        return gx, gz

    def launch_slabs(use_dot):
        mx, mz = _mode(D, use_dot), _mode(d, use_dot)
        BM, BN, bkd, nw, ns = _coef_cfg(nr, mx, mz)
        nslab = int(need_x) + int(need_z)
        if SLAB_ROWS is not None:
            R = max(BM, int(SLAB_ROWS) // BM * BM)
        else:
            # the coefficient slabs hold no more elements than x and z (or 1M)
            budget = max(n_all * (D + d), 1 << 20)
            R = max(BM, (budget // (nslab * nc)) // BM * BM)
        R = min(R, triton.cdiv(nr, BM) * BM)
        A = torch.empty((R, nc), dtype=dtype, device=dev) if need_x else None
        B = torch.empty((R, nc), dtype=dtype, device=dev) if need_z else None
        slab_dummy = A if need_x else B

        with _device_ctx(dev):
            for s0 in range(0, nr, R):
                rows = min(R, nr - s0)
                _iso_coef_kernel[(triton.cdiv(rows, BM), triton.cdiv(nc, BN))](
                    x, z, xn2, zn2, h, cf, A if need_x else slab_dummy,
                    B if need_z else slab_dummy, r0 + s0, rows, c0, nc, D, d,
                    BM=BM, BN=BN, BKX=_bk_of(D, mx, bkd), BKZ=_bk_of(d, mz, bkd),
                    MODE_X=mx, MODE_Z=mz,
                    DOT_PREC=prec, TOL=tol, NEED_A=need_x, NEED_B=need_z,
                    num_warps=nw, num_stages=ns)
                for coef_slab, src, out, dim, mode in ((A, x, gx, D, mx), (B, z, gz, d, mz)):
                    if out is None or dim == 0:
                        continue
                    ABM, BC, BD, anw, ans = _apply_cfg(nr, mode, dim, (mx, mz))
                    _iso_apply_kernel[(triton.cdiv(dim, BD), triton.cdiv(rows, ABM))](
                        coef_slab, src, out, r0 + s0, s0, rows, c0, nc, dim,
                        BM=ABM, BC=BC, BD=BD, MODE=mode, DOT_PREC=aprec,
                        num_warps=anw, num_stages=ans)
        return gx, gz

    n_all = x.shape[0]
    if max(D, d) <= SMALL_DIM:
        return _with_dot_fallback(("iso_bwd_small", dtype, dev.index), launch_small,
                                  uses_dot=uses_dot)
    return _with_dot_fallback(("iso_bwd_slab", dtype, dev.index), launch_slabs,
                              uses_dot=uses_dot)


# ============================================================================ SiD
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


def sid_forward(x_g, y_real, y_fake, alpha):
    """(loss_n float64 [N], w_n float64 [N], valid_n bool [N]); alpha a Python float."""
    _check_ready(x_g, y_real, y_fake)
    x_g = _prep(x_g)
    dtype, dev = x_g.dtype, x_g.device
    y_real = _prep(y_real, dtype)
    y_fake = _prep(y_fake, dtype)
    n, K = x_g.shape
    loss = torch.empty(n, dtype=torch.float64, device=dev)
    w = torch.empty(n, dtype=torch.float64, device=dev)
    valid = torch.empty(n, dtype=torch.bool, device=dev)
    if n == 0:
        return loss, w, valid
    a0, a1, a2 = _split3(alpha)
    chunk, ns = _splits(n, K, dev)
    final = ns == 1
    part = loss if final else torch.empty((n, ns, 3), dtype=torch.float64, device=dev)
    with _device_ctx(dev):
        _sid_fwd_kernel[(n, ns)](x_g, y_real, y_fake, a0, a1, a2, part, loss, w, valid,
                                 K, chunk, ns, BLOCK=SID_BLOCK, FINAL=final, num_warps=4)
        if not final:
            _sid_fin_kernel[(triton.cdiv(n, _FIN_ROWS),)](
                part, loss, w, valid, n, ns, K, BR=_FIN_ROWS, BS=_FIN_SPLITS, num_warps=4)
    return loss, w, valid


def sid_backward(x_g, y_real, y_fake, alpha, w_n, valid_n, scale):
    """(g_xg, g_real, g_fake), each [N, K] in the input dtype. scale: 0-dim float64 device
    tensor (grad_output / N); the per-row factor scale / w_n is formed in the kernel."""
    _check_ready(x_g, y_real, y_fake)
    x_g = _prep(x_g)
    dtype, dev = x_g.dtype, x_g.device
    y_real = _prep(y_real, dtype)
    y_fake = _prep(y_fake, dtype)
    n, K = x_g.shape
    sc = _device_scalars(scale, "scale", 1, dev)
    g_xg = torch.empty_like(x_g)
    g_real = torch.empty_like(x_g)
    g_fake = torch.empty_like(x_g)
    if n == 0 or K == 0:
        return g_xg, g_real, g_fake
    w = _prep_vec(w_n, n, torch.float64, dev)
    valid = _prep_vec(valid_n, n, torch.bool, dev)
    a0, a1, a2 = _split3(alpha)
    with _device_ctx(dev):
        _sid_bwd_kernel[(n, triton.cdiv(K, SID_BLOCK))](
            x_g, y_real, y_fake, a0, a1, a2, w, valid, sc, g_xg, g_real, g_fake, K,
            BLOCK=SID_BLOCK, num_warps=4)
    return g_xg, g_real, g_fake


def fake_forward(y_fake, x):
    """(sq_n float64 [N], valid_n bool [N]); sq_n = sum_k (y_fake - x)^2, 0 if invalid."""
    _check_ready(y_fake, x)
    y_fake = _prep(y_fake)
    dtype, dev = y_fake.dtype, y_fake.device
    x = _prep(x, dtype)
    n, K = y_fake.shape
    sq = torch.empty(n, dtype=torch.float64, device=dev)
    valid = torch.empty(n, dtype=torch.bool, device=dev)
    if n == 0:
        return sq, valid
    chunk, ns = _splits(n, K, dev)
    final = ns == 1
    part = sq if final else torch.empty((n, ns, 2), dtype=torch.float64, device=dev)
    with _device_ctx(dev):
        _fake_fwd_kernel[(n, ns)](y_fake, x, part, sq, valid, K, chunk, ns,
                                  BLOCK=SID_BLOCK, FINAL=final, num_warps=4)
        if not final:
            _fake_fin_kernel[(triton.cdiv(n, _FIN_ROWS),)](
                part, sq, valid, n, ns, BR=_FIN_ROWS, BS=_FIN_SPLITS, num_warps=4)
    return sq, valid


def fake_backward(y_fake, x, coef_n, *, need_x=True):
    """(g_fake, g_x or None): g_fake = 2 coef_n (y_fake - x), g_x = -g_fake. coef_n: float64
    [N] device tensor (0 for invalid rows)."""
    _check_ready(y_fake, x)
    y_fake = _prep(y_fake)
    dtype, dev = y_fake.dtype, y_fake.device
    x = _prep(x, dtype)
    n, K = y_fake.shape
    need_x = bool(need_x)
    g_fake = torch.empty_like(y_fake)
    g_x = torch.empty_like(y_fake) if need_x else None
    if n == 0 or K == 0:
        return g_fake, g_x
    c = _device_scalars(coef_n, "coef_n", n, dev)
    with _device_ctx(dev):
        _fake_bwd_kernel[(n, triton.cdiv(K, SID_BLOCK))](
            y_fake, x, c, g_fake, g_x if need_x else g_fake, K, BLOCK=SID_BLOCK,
            NEED_X=need_x, num_warps=4)
    return g_fake, g_x


class TritonPrimitives:
    """The primitive set of docs/design.md, served by Triton kernels."""

    name = NAME
    centres_in_kernel = False  # takes centred rows and their squared norms

    @staticmethod
    def is_available(device_type) -> tuple[bool, str]:
        return is_available(device_type)

    iso_forward_sums = staticmethod(iso_forward_sums)
    iso_backward_rows = staticmethod(iso_backward_rows)
    sid_forward = staticmethod(sid_forward)
    sid_backward = staticmethod(sid_backward)
    fake_forward = staticmethod(fake_forward)
    fake_backward = staticmethod(fake_backward)


TRITON = TritonPrimitives()

__all__ = [
    "TRITON", "TritonPrimitives", "is_available", "iso_forward_sums", "iso_backward_rows",
    "sid_forward", "sid_backward", "fake_forward", "fake_backward", "DOT_PRECISION", "TILES",
    "TILE_PRESETS",
]


# ============================================================ ahead-of-time check
def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory of one kernel, from `ptxas -v` (the ptxas
    bundled with triton) on the PTX triton generated."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    m = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE)
    gpu = m.group(1) if m else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    out = {}
    for key, pat in (("regs", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                     ("spill_loads", r"(\d+) bytes spill loads"), ("stack", r"(\d+) bytes stack frame")):
        found = re.findall(pat, log)
        out[key] = max(int(v) for v in found) if found else None
    return out


def compile_variants(dtypes=("fp32", "fp64")):
    """(kernel, constexprs, dtype, num_warps, num_stages) of every variant the launchers
    can pick: all modes, every TILE_PRESETS entry, each fp32 dot precision choice."""
    out = []
    for dt in dtypes:
        tol = _close_tol(torch.float32 if dt == "fp32" else torch.float64)
        precs = ("tf32x3", "tf32", "ieee") if dt == "fp32" else ("ieee",)
        for prec in precs:
            bk = 32
            # large-batch Gram path: the preset tables
            seen = set()
            for preset in TILE_PRESETS.values():
                fbm, fbk, fnw, fns = preset["fwd"]
                key = ("fwd", preset["fwd"])
                if key not in seen:
                    seen.add(key)
                    out.append((_iso_fwd_kernel, dict(SYM=True, BM=fbm, BN=fbm, BKX=fbk, BKZ=fbk,
                                MODE_X=_DOT, MODE_Z=_DOT, DOT_PREC=prec, TOL=tol), dt, fnw, fns))
                cbm, cbn, cbk, cnw, cns = preset["coef"]
                for need in ((True, True), (True, False)):
                    key = ("coef", preset["coef"], need)
                    if key not in seen:
                        seen.add(key)
                        out.append((_iso_coef_kernel, dict(BM=cbm, BN=cbn, BKX=cbk, BKZ=cbk,
                                    MODE_X=_DOT, MODE_Z=_DOT, DOT_PREC=prec, TOL=tol,
                                    NEED_A=need[0], NEED_B=need[1]), dt, cnw, cns))
                abm, abc, abd, anw, ans = preset["apply"]
                key = ("apply", preset["apply"])
                if key not in seen:
                    seen.add(key)
                    out.append((_iso_apply_kernel, dict(BM=abm, BC=abc, BD=abd, MODE=_DOT,
                                                        DOT_PREC=prec), dt, anw, ans))
            if prec != precs[0]:
                continue  # the small-batch / small-dim variants once per dtype
            for mx, mz in ((_DOT, _DOT), (_DIRECT, _DOT), (_DOT, _DIRECT), (_FMA, _FMA),
                           (_DIRECT, _DIRECT)):
                bkx = _bk_of(3 if mx == _DIRECT else 99, mx, bk)
                bkz = _bk_of(3 if mz == _DIRECT else 99, mz, bk)
                out.append((_iso_fwd_kernel, dict(SYM=True, BM=32, BN=32, BKX=bkx, BKZ=bkz,
                            MODE_X=mx, MODE_Z=mz, DOT_PREC=prec, TOL=tol), dt, 4, 3))
                out.append((_iso_coef_kernel, dict(BM=32, BN=32, BKX=bkx, BKZ=bkz, MODE_X=mx,
                            MODE_Z=mz, DOT_PREC=prec, TOL=tol, NEED_A=True, NEED_B=True),
                            dt, 4, 3))
                if _FMA not in (mx, mz):
                    bm = 32 if (mx, mz) == (_DOT, _DOT) else 16
                    for need in ((True, True), (True, False)):
                        out.append((_iso_bwd_small_kernel,
                                    dict(BM=bm, BN=bm, DPX=64 if mx == _DOT else 16,
                                         DPZ=64 if mz == _DOT else 4, MODE_X=mx, MODE_Z=mz,
                                         DOT_PREC=prec, TOL=tol, NEED_X=need[0],
                                         NEED_Z=need[1]), dt, 8, 3))
            out.append((_iso_fwd_kernel, dict(SYM=False, BM=32, BN=32, BKX=32, BKZ=8,
                        MODE_X=_DOT, MODE_Z=_DIRECT, DOT_PREC=prec, TOL=tol), dt, 4, 3))
            for mode, bc, bd in ((_DOT, 32, 64), (_FMA, 8, 32), (_DIRECT, 8, 16)):
                out.append((_iso_apply_kernel, dict(BM=32, BC=bc, BD=bd, MODE=mode,
                                                    DOT_PREC=prec), dt, 4, 3))
            for bkx, bkz in ((1024, 16), (64, 16)):  # grouped pairs: images, small dims
                out.append((_iso_grouped_fwd_kernel, dict(BKX=bkx, BKZ=bkz), dt, 4, 3))
                for need in ((True, True), (True, False)):
                    out.append((_iso_grouped_bwd_kernel, dict(BKX=bkx, BKZ=bkz, NEED_X=need[0],
                                                              NEED_Z=need[1]), dt, 4, 3))
            for fn in (_sid_fwd_kernel, _fake_fwd_kernel):
                for final in (True, False):
                    out.append((fn, dict(BLOCK=SID_BLOCK, FINAL=final), dt, 4, 3))
            out.append((_sid_bwd_kernel, dict(BLOCK=SID_BLOCK), dt, 4, 3))
            for need in (True, False):
                out.append((_fake_bwd_kernel, dict(BLOCK=SID_BLOCK, NEED_X=need), dt, 4, 3))
            for fn in (_sid_fin_kernel, _fake_fin_kernel):
                out.append((fn, dict(BR=_FIN_ROWS, BS=_FIN_SPLITS), dt, 4, 3))
    return out


# pointer arguments that are float64 whatever the input dtype, and the bool ones
_F64_PTRS = {"h_ptr", "coef_ptr", "scale_ptr", "w_ptr", "loss_ptr", "sq_ptr", "c_ptr"}
_BOOL_PTRS = {"valid_ptr"}


def compile_check(arch: int = 90, dtypes=("fp32", "fp64"), verbose: bool = False,
                  report: bool = False, only=None):
    """Compile every kernel variant the launchers can pick for an NVIDIA target without
    a GPU (needs triton's bundled ptxas; must run without TRITON_INTERPRET). Returns a
    list of (kernel, dtype, config, error-or-None, usage) where usage holds ptxas's
    registers / spill bytes when `report` is set. `only`: a predicate on (kernel name,
    constexprs) to compile a subset."""
    if triton is None or _INTERPRET_AT_IMPORT:
        raise RuntimeError("compile_check needs triton without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", int(arch), 32)
    out = []
    for fn, consts, dt, nw, ns in compile_variants(dtypes):
        if only is not None and not only(fn.__name__, consts):
            continue
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in _F64_PTRS or name == "part_ptr":
                sig[name] = "*fp64"
            elif name in _BOOL_PTRS:
                sig[name] = "*i1"
            elif name.endswith("_ptr"):
                sig[name] = f"*{dt}"
            elif name in ("a0", "a1", "a2"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        err, usage = None, {}
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                               options={"num_warps": nw, "num_stages": ns})
            if report:
                usage = _ptxas_usage(k.asm["ptx"], arch)
                usage["smem"] = k.metadata.shared
        except Exception as e:  # report, keep going
            err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        cfg = dict(consts, num_warps=nw, num_stages=ns)
        out.append((fn.__name__, dt, cfg, err, usage))
        if verbose:
            print(out[-1], flush=True)
    return out
