"""The six primitives of docs/design.md as Triton kernels.

Every launcher takes and returns torch tensors; the Python layer (``gsd_kernels.ops``)
has already flattened inputs to ``(N, K)``, made them contiguous, cast fp16/bf16 to fp32
and, for the isometry loss, centred x and z and computed their squared row norms.

Kernels
-------
Squared distances of a (row tile, column tile) block come in one of three modes, chosen
per input (x and z independently) by the launcher:

* ``MODE_DIRECT`` (dims <= ``DIRECT_MAX`` = 16): ``sum_k (x_ik - x_jk)^2`` from explicit
  differences, and the backward also sums ``a_ij (x_i - x_j)`` directly. In a few
  dimensions close pairs are common and the Gram trick would lose the digits of
  ``x_i - x_j`` that the gradient direction ``(x_i - x_j) / delta`` needs.
* ``MODE_DOT``: Gram trick ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` with ``tl.dot`` over K-chunks
  (tensor cores). Pairs that come out close (``d2 <= CLOSE_TOL * (|x_i|^2 + |x_j|^2)``,
  i.e. at the rounding-noise level of the Gram trick, e.g. exact duplicates) are
  recomputed from differences in the rare tiles that hold any (``_refine_close``), so a
  duplicate gets delta = 0 and coefficient 0 exactly as the spec wants.
* ``MODE_FMA``: the Gram trick with an elementwise product-reduce instead of ``tl.dot``;
  only a fallback for targets that cannot compile a float64 ``tl.dot``.

Isometry forward (``_iso_fwd_kernel``)
    One program per (row tile, column tile) block of the pair range, pair terms in
    registers, four partial sums per block to a scratch buffer ``[num_blocks, 4]`` that
    torch reduces in float64 (deterministic, no N x N). When the row range equals the
    column range only the lower-triangular tiles are launched (decoded from the program
    id); off-diagonal tiles count twice, the diagonal tile once (it already holds both
    (i, j) and (j, i)).

Isometry backward: ``gx_i = x_i * rowsum(a)_i - (A @ X)_i`` (same for z with b)
    * ``max(D, d) <= SMALL_DIM`` (64): flash-attention style (``_iso_bwd_small_kernel``),
      one program per row tile holds its rows of x and z in registers, loops over the
      column tiles, recomputes the distances, forms a and b and accumulates ``A @ X``,
      ``B @ Z`` (``tl.dot``) and the row sums in registers; nothing is stored.
    * large dims (images: D = d = 3072 .. 12288): an output row does not fit in
      registers, and recomputing the Gram tile for every output D-chunk would multiply
      the FLOPs by (D + d) / BD. So rows are processed in *slabs* of R rows:
      ``_iso_coef_kernel`` writes the coefficients a, b of the slab (R x C, input
      dtype) to scratch, ``_iso_apply_kernel`` is a GEMM ``A_slab @ X`` per (row tile,
      D-chunk) that adds the row sums on the fly: good parallelism even for small N.
      R is chosen so that the two slabs hold no more elements than x and z together
      (or 1M elements, at least one row tile): extra memory O(N (D + d)); for a batch
      with N <= (D + d) / 2 that can be the whole N x C block, which is then smaller
      than the inputs.

SiD / fake-score
    Forward: grid (row, K-split); each program streams its chunk with vector loads and
    writes per-split partials (non-finite count, sums) that torch reduces in float64.
    Splitting K keeps enough programs in flight for small N and large K.
    Backward: elementwise, grid (row, K-block); invalid rows get exact zeros.

Precision
---------
* fp32 on CUDA: ``tl.dot(..., input_precision="tf32x3")``. Plain tf32 (10-bit mantissa)
  gives ~5e-4 relative error per product and the Gram trick amplifies it, far beyond
  the 1e-4 target; "ieee" is exact fp32 but runs on CUDA cores (several times slower
  than tensor cores on H100). tf32x3 (each operand split into big + small tf32 parts,
  3 MMAs) gives close to fp32 accuracy on tensor cores. On ROCm: "ieee".
* fp64: ``tl.dot`` on float64 (``input_precision="ieee"``). If the target cannot compile
  it, the launcher falls back (once, cached) to ``MODE_FMA``.
* Under the interpreter ``tl.dot`` is numpy matmul in the operand dtype, whatever the
  requested precision: CPU tests cannot see tf32x3 rounding.
* Accumulation inside a tile in the input dtype, across tiles / K-splits in float64.

``compile_check(arch)`` compiles every kernel variant for an NVIDIA target without a
GPU (tests: ``GSD_TRITON_COMPILE_CHECK=1``).
"""

from __future__ import annotations

import os
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

# @triton.jit picks the interpreter when the module is imported, so what counts for
# CPU tensors is the environment at import time.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"

NAME = "triton"

# ----------------------------------------------------------------------------- tuning
# Module-level knobs (tests flip them to exercise every code path on small inputs).
DIRECT_MAX = 16  # dims up to this use explicit differences instead of the Gram trick
CLOSE_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # see _refine_close
SMALL_DIM = 64  # flash-style backward when max(D, d) <= SMALL_DIM
FORCE_NO_DOT = False  # MODE_FMA instead of MODE_DOT everywhere
SLAB_ROWS = None  # force the slab height of the large-dim backward (multiple of BM)
SID_BLOCK = 1024  # elements per vector step of the SiD / fake kernels
SID_TARGET_PROGRAMS = None  # programs to aim for in the SiD forward (None: by device)


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
            acc = tl.maximum(n_i[:, None] + n_j[None, :] - 2.0 * acc, 0.0)
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
        (rare unless the batch has near-duplicates) recompute them from differences."""
        n_i = tl.load(n2_ptr + rows, mask=rmask, other=0.0)
        n_j = tl.load(n2_ptr + cols, mask=cmask, other=0.0)
        pair = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        close = pair & (d2 <= TOL * (n_i[:, None] + n_j[None, :]))
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
            d2 = tl.maximum(n_i[:, None] + n_j[None, :] - 2.0 * dot, 0.0)
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
        delta = tl.sqrt(d2)
        dz = tl.sqrt(z2)
        w = tl.exp(-z2 * inv_two_h2)  # exactly 1 when inv_two_h2 == 0
        return delta, dz, w

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
    def _iso_fwd_kernel(x_ptr, z_ptr, xn2_ptr, zn2_ptr, prm_ptr, part_ptr,
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
        inv_two_h2 = tl.load(prm_ptr)
        rows = r0 + rt * BM + tl.arange(0, BM)
        cols = c0 + ct * BN + tl.arange(0, BN)
        rmask = rows < r1
        cmask = cols < c1
        d2 = _sqdist_tile(x_ptr, xn2_ptr, rows, rmask, cols, cmask, D, BM, BN, BKX,
                          MODE_X, DOT_PREC, TOL)
        z2 = _sqdist_tile(z_ptr, zn2_ptr, rows, rmask, cols, cmask, d, BM, BN, BKZ,
                          MODE_Z, DOT_PREC, TOL)
        delta, dz, w = _pair_terms(d2, z2, inv_two_h2)
        valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        w = tl.where(valid, w, 0.0)
        s_w = tl.sum(w)
        s_xx = tl.sum(w * d2)
        s_xz = tl.sum(w * delta * dz)
        s_zz = tl.sum(w * z2)
        out = part_ptr + pid.to(tl.int64) * 4
        tl.store(out + 0, s_w * wt)
        tl.store(out + 1, s_xx * wt)
        tl.store(out + 2, s_xz * wt)
        tl.store(out + 3, s_zz * wt)

    # ====================================================== isometry bwd, small dims
    @triton.jit
    def _iso_bwd_small_kernel(x_ptr, z_ptr, xn2_ptr, zn2_ptr, prm_ptr, gx_ptr, gz_ptr,
                              r0, r1, c0, c1, D, d,
                              BM: tl.constexpr, BN: tl.constexpr,
                              DPX: tl.constexpr, DPZ: tl.constexpr,
                              MODE_X: tl.constexpr, MODE_Z: tl.constexpr,
                              DOT_PREC: tl.constexpr, TOL: tl.constexpr):
        """Flash style: one program per row tile, whole rows of x and z in registers."""
        rt = tl.program_id(0)
        inv_two_h2 = tl.load(prm_ptr + 0)
        p = tl.load(prm_ptr + 1)
        q = tl.load(prm_ptr + 2)
        r = tl.load(prm_ptr + 3)
        s = tl.load(prm_ptr + 4)
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
        accx = tl.zeros((BM, DPX), dtype=x_ptr.dtype.element_ty)
        accz = tl.zeros((BM, DPZ), dtype=x_ptr.dtype.element_ty)
        rsa = tl.zeros((BM,), dtype=x_ptr.dtype.element_ty)
        rsb = tl.zeros((BM,), dtype=x_ptr.dtype.element_ty)
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
            delta, dz, w = _pair_terms(d2, z2, inv_two_h2)
            a, b = _coefs(d2, z2, delta, dz, w, p, q, r, s)
            valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
            a = tl.where(valid, a, 0.0)
            b = tl.where(valid, b, 0.0)
            rsa += tl.sum(a, axis=1)
            rsb += tl.sum(b, axis=1)
            accx = _accumulate(accx, a, xr, xc, MODE_X, DOT_PREC)
            accz = _accumulate(accz, b, zr, zc, MODE_Z, DOT_PREC)
        if MODE_X == MODE_DIRECT:
            gx = accx
        else:
            gx = xr * rsa[:, None] - accx
        if MODE_Z == MODE_DIRECT:
            gz = accz
        else:
            gz = zr * rsb[:, None] - accz
        lr64 = lr.to(tl.int64)
        tl.store(gx_ptr + lr64[:, None] * D + kx[None, :], gx,
                 mask=rmask[:, None] & kxm[None, :])
        tl.store(gz_ptr + lr64[:, None] * d + kz[None, :], gz,
                 mask=rmask[:, None] & kzm[None, :])

    # ====================================================== isometry bwd, large dims
    @triton.jit
    def _iso_coef_kernel(x_ptr, z_ptr, xn2_ptr, zn2_ptr, prm_ptr, a_ptr, b_ptr,
                         row0, nrows, c0, C, D, d,
                         BM: tl.constexpr, BN: tl.constexpr,
                         BKX: tl.constexpr, BKZ: tl.constexpr,
                         MODE_X: tl.constexpr, MODE_Z: tl.constexpr, DOT_PREC: tl.constexpr,
                         TOL: tl.constexpr):
        """Coefficients a, b of a slab of rows [row0, row0 + nrows) x columns [c0, c0 + C)."""
        rt = tl.program_id(0)
        ct = tl.program_id(1)
        inv_two_h2 = tl.load(prm_ptr + 0)
        p = tl.load(prm_ptr + 1)
        q = tl.load(prm_ptr + 2)
        r = tl.load(prm_ptr + 3)
        s = tl.load(prm_ptr + 4)
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
        delta, dz, w = _pair_terms(d2, z2, inv_two_h2)
        a, b = _coefs(d2, z2, delta, dz, w, p, q, r, s)
        valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        a = tl.where(valid, a, 0.0)
        b = tl.where(valid, b, 0.0)
        off = lr.to(tl.int64)[:, None] * C + lc[None, :]
        m = rmask[:, None] & cmask[None, :]
        tl.store(a_ptr + off, a, mask=m)
        tl.store(b_ptr + off, b, mask=m)

    @triton.jit
    def _iso_apply_kernel(a_ptr, x_ptr, out_ptr, row0, out_row0, nrows, c0, C, K,
                          BM: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                          MODE: tl.constexpr, DOT_PREC: tl.constexpr):
        """out[out_row0 + i] = sum_j A[i, j] (x[row0 + i] - x[c0 + j]) for one D-chunk:
        x_i * rowsum(A) - A @ X (a GEMM on tensor cores), or directly for small dims."""
        rt = tl.program_id(0)
        kt = tl.program_id(1)
        lr = rt * BM + tl.arange(0, BM)
        rmask = lr < nrows
        kd = kt * BD + tl.arange(0, BD)
        kmask = kd < K
        xi = tl.load(x_ptr + (row0 + lr).to(tl.int64)[:, None] * K + kd[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.zeros((BM, BD), dtype=x_ptr.dtype.element_ty)
        rs = tl.zeros((BM,), dtype=x_ptr.dtype.element_ty)
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
            g = xi * rs[:, None] - acc
        tl.store(out_ptr + (out_row0 + lr).to(tl.int64)[:, None] * K + kd[None, :], g,
                 mask=rmask[:, None] & kmask[None, :])

    # ================================================================= SiD / fake
    @triton.jit
    def _finite(v):
        return tl.abs(v) < float("inf")  # False for +-inf and NaN

    @triton.jit
    def _sid_fwd_kernel(g_ptr, r_ptr, f_ptr, prm_ptr, part_ptr, K, CHUNK, NS,
                        BLOCK: tl.constexpr):
        n = tl.program_id(0)
        sp = tl.program_id(1)
        alpha = tl.load(prm_ptr)
        base = n.to(tl.int64) * K
        offs = tl.arange(0, BLOCK)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, K)
        bad = tl.zeros((BLOCK,), dtype=tl.int32)
        s_abs = tl.zeros((BLOCK,), dtype=g_ptr.dtype.element_ty)
        s_l = tl.zeros((BLOCK,), dtype=g_ptr.dtype.element_ty)
        for k0 in range(start, end, BLOCK):
            kk = k0 + offs
            m = kk < end
            g = tl.load(g_ptr + base + kk, mask=m, other=0.0)
            r = tl.load(r_ptr + base + kk, mask=m, other=0.0)
            f = tl.load(f_ptr + base + kk, mask=m, other=0.0)
            fin = _finite(g) & _finite(r) & _finite(f)
            bad += tl.where(fin, 0, 1)
            a = r - f
            b = r - g
            s_abs += tl.abs(b)
            s_l += a * (b - alpha * a)
        out = part_ptr + (n.to(tl.int64) * NS + sp) * 3
        tl.store(out + 0, tl.sum(bad, axis=0).to(g_ptr.dtype.element_ty))
        tl.store(out + 1, tl.sum(s_abs, axis=0))
        tl.store(out + 2, tl.sum(s_l, axis=0))

    @triton.jit
    def _sid_bwd_kernel(g_ptr, r_ptr, f_ptr, prm_ptr, c_ptr, gg_ptr, gr_ptr, gf_ptr, K,
                        BLOCK: tl.constexpr):
        n = tl.program_id(0)
        kb = tl.program_id(1)
        alpha = tl.load(prm_ptr)
        c = tl.load(c_ptr + n)
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
    def _fake_fwd_kernel(y_ptr, x_ptr, part_ptr, K, CHUNK, NS, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        sp = tl.program_id(1)
        base = n.to(tl.int64) * K
        offs = tl.arange(0, BLOCK)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, K)
        bad = tl.zeros((BLOCK,), dtype=tl.int32)
        s_sq = tl.zeros((BLOCK,), dtype=y_ptr.dtype.element_ty)
        for k0 in range(start, end, BLOCK):
            kk = k0 + offs
            m = kk < end
            y = tl.load(y_ptr + base + kk, mask=m, other=0.0)
            x = tl.load(x_ptr + base + kk, mask=m, other=0.0)
            fin = _finite(y) & _finite(x)
            bad += tl.where(fin, 0, 1)
            e = y - x
            s_sq += e * e
        out = part_ptr + (n.to(tl.int64) * NS + sp) * 2
        tl.store(out + 0, tl.sum(bad, axis=0).to(y_ptr.dtype.element_ty))
        tl.store(out + 1, tl.sum(s_sq, axis=0))

    @triton.jit
    def _fake_bwd_kernel(y_ptr, x_ptr, c_ptr, gy_ptr, gx_ptr, K, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        kb = tl.program_id(1)
        c = tl.load(c_ptr + n)
        kk = kb * BLOCK + tl.arange(0, BLOCK)
        m = kk < K
        off = n.to(tl.int64) * K + kk
        y = tl.load(y_ptr + off, mask=m, other=0.0)
        x = tl.load(x_ptr + off, mask=m, other=0.0)
        gy = tl.where(c != 0, 2.0 * c * (y - x), 0.0)
        tl.store(gy_ptr + off, gy, mask=m)
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
        t = torch.tensor(t, dtype=torch.float64 if dtype.is_floating_point else dtype)
    t = t.to(device).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"expected {n} values, got {t.numel()}")
    return t.to(dtype).contiguous()


def _params(values, dtype, device) -> torch.Tensor:
    """Scalars travel as a small tensor of the compute dtype: a Python float argument
    would be specialised as fp32 by Triton and lose digits in the fp64 path."""
    return torch.tensor([float(v) for v in values], dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and not _interpreting() \
            and torch.version.hip is None:
        return "tf32x3"
    return "ieee"


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


def _pair_tile(nr: int, modes) -> int:
    """Row/column tile of the pair kernels. 3-D broadcast modes hold BM*BN*BK values
    (32*32*8 = 64 per thread with 4 warps); the tl.dot path can afford 64x64 tiles but
    small batches need smaller tiles to fill the SMs."""
    if any(m != _DOT for m in modes):
        return 32
    return 64 if nr >= 1024 else 32


def _close_tol(dtype) -> float:
    """Pairs with d2 <= tol (|x_i|^2 + |x_j|^2) get exact distances (see _refine_close):
    below that the Gram trick's rounding (~ sqrt(K) eps |x|^2, tf32x3 on GPU) is no
    longer small against d2."""
    return CLOSE_TOL[dtype]


def _warps(bm: int) -> int:
    """64 x 64 tiles with tf32x3 (three MMAs per product) spill with 4 warps on sm_90."""
    return 8 if bm >= 64 else 4


def _iso_prepare(x, z, xn2, zn2):
    _check_ready(x, z, xn2, zn2)
    x = _prep(x)
    dtype, dev = x.dtype, x.device
    z = _prep(z, dtype)
    n = x.shape[0]
    if z.shape[0] != n:
        raise ValueError("x and z must have the same number of rows")
    xn2 = _prep_vec(xn2, n, dtype, dev)
    zn2 = _prep_vec(zn2, n, dtype, dev)
    return x, z, xn2, zn2


# ======================================================================= isometry
def iso_forward_sums(x, z, xn2, zn2, r0, r1, c0, c1, inv_two_h2):
    """[sum w, sum w delta^2, sum w delta dz, sum w dz^2] (float64 [4]) over the pairs."""
    x, z, xn2, zn2 = _iso_prepare(x, z, xn2, zn2)
    dtype, dev = x.dtype, x.device
    r0, r1, c0, c1 = int(r0), int(r1), int(c0), int(c1)
    D, d = x.shape[1], z.shape[1]
    nr, nc = r1 - r0, c1 - c0
    if nr <= 0 or nc <= 0:
        return torch.zeros(4, dtype=torch.float64, device=dev)
    prm = _params([inv_two_h2], dtype, dev)
    sym = (r0 == c0 and r1 == c1)
    prec = _dot_precision(dtype, dev)

    def launch(use_dot):
        mx, mz = _mode(D, use_dot), _mode(d, use_dot)
        BM = BN = _pair_tile(nr, (mx, mz))
        n_rt = triton.cdiv(nr, BM)
        n_ct = triton.cdiv(nc, BN)
        nprog = n_rt * (n_rt + 1) // 2 if sym else n_rt * n_ct
        part = torch.empty((nprog, 4), dtype=dtype, device=dev)
        with _device_ctx(dev):
            _iso_fwd_kernel[(nprog,)](
                x, z, xn2, zn2, prm, part, r0, r1, c0, c1, D, d, n_ct,
                SYM=sym, BM=BM, BN=BN, BKX=_bk(D, mx), BKZ=_bk(d, mz),
                MODE_X=mx, MODE_Z=mz, DOT_PREC=prec, TOL=_close_tol(dtype),
                num_warps=_warps(BM))
        return part

    part = _with_dot_fallback(("iso_fwd", dtype, dev.index), launch,
                              uses_dot=max(D, d) > DIRECT_MAX)
    return part.to(torch.float64).sum(0)


def iso_backward_rows(x, z, xn2, zn2, r0, r1, c0, c1, inv_two_h2, p, q, r, s):
    """gx_i = sum_j a_ij (x_i - x_j), gz_i = sum_j b_ij (z_i - z_j) for i in [r0, r1)."""
    x, z, xn2, zn2 = _iso_prepare(x, z, xn2, zn2)
    dtype, dev = x.dtype, x.device
    r0, r1, c0, c1 = int(r0), int(r1), int(c0), int(c1)
    D, d = x.shape[1], z.shape[1]
    nr, nc = max(r1 - r0, 0), max(c1 - c0, 0)
    gx = torch.zeros((nr, D), dtype=dtype, device=dev)
    gz = torch.zeros((nr, d), dtype=dtype, device=dev)
    if nr == 0 or nc == 0 or (D == 0 and d == 0):
        return gx, gz
    prm = _params([inv_two_h2, p, q, r, s], dtype, dev)
    prec = _dot_precision(dtype, dev)
    uses_dot = max(D, d) > DIRECT_MAX

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
                x, z, xn2, zn2, prm, gx, gz, r0, r1, c0, c1, D, d,
                BM=BM, BN=BM, DPX=DPX, DPZ=DPZ, MODE_X=mx, MODE_Z=mz,
                DOT_PREC=prec, TOL=_close_tol(dtype), num_warps=8)
        return gx, gz

    def launch_slabs(use_dot):
        mx, mz = _mode(D, use_dot), _mode(d, use_dot)
        BM = BN = _pair_tile(nr, (mx, mz))
        if SLAB_ROWS is not None:
            R = max(BM, int(SLAB_ROWS) // BM * BM)
        else:
            # the two R x C coefficient slabs hold no more elements than x and z (or 1M)
            budget = max(n_all * (D + d), 1 << 20)
            R = max(BM, (budget // (2 * nc)) // BM * BM)
        R = min(R, triton.cdiv(nr, BM) * BM)
        A = torch.empty((R, nc), dtype=dtype, device=dev)
        B = torch.empty((R, nc), dtype=dtype, device=dev)

        def apply_cfg(mode, dim):
            if mode == _DIRECT:
                return 8, _pow2(dim, 4)  # BC, BD
            if mode == _DOT:
                return 32, 64
            return 8, 32

        with _device_ctx(dev):
            for s0 in range(0, nr, R):
                rows = min(R, nr - s0)
                _iso_coef_kernel[(triton.cdiv(rows, BM), triton.cdiv(nc, BN))](
                    x, z, xn2, zn2, prm, A, B, r0 + s0, rows, c0, nc, D, d,
                    BM=BM, BN=BN, BKX=_bk(D, mx), BKZ=_bk(d, mz), MODE_X=mx, MODE_Z=mz,
                    DOT_PREC=prec, TOL=_close_tol(dtype), num_warps=_warps(BM))
                for coef, src, out, dim, mode in ((A, x, gx, D, mx), (B, z, gz, d, mz)):
                    if dim == 0:
                        continue
                    BC, BD = apply_cfg(mode, dim)
                    _iso_apply_kernel[(triton.cdiv(rows, BM), triton.cdiv(dim, BD))](
                        coef, src, out, r0 + s0, s0, rows, c0, nc, dim,
                        BM=BM, BC=BC, BD=BD, MODE=mode, DOT_PREC=prec,
                        num_warps=_warps(BM))
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


def sid_forward(x_g, y_real, y_fake, alpha):
    """(loss_n float64 [N], w_n float64 [N], valid_n bool [N])."""
    _check_ready(x_g, y_real, y_fake)
    x_g = _prep(x_g)
    dtype, dev = x_g.dtype, x_g.device
    y_real = _prep(y_real, dtype)
    y_fake = _prep(y_fake, dtype)
    n, K = x_g.shape
    if n == 0:
        e = torch.zeros(0, dtype=torch.float64, device=dev)
        return e, e.clone(), torch.zeros(0, dtype=torch.bool, device=dev)
    prm = _params([alpha], dtype, dev)
    chunk, ns = _splits(n, K, dev)
    part = torch.empty((n, ns, 3), dtype=dtype, device=dev)
    with _device_ctx(dev):
        _sid_fwd_kernel[(n, ns)](x_g, y_real, y_fake, prm, part, K, chunk, ns,
                                 BLOCK=SID_BLOCK, num_warps=4)
    tot = part.to(torch.float64).sum(1)
    valid = tot[:, 0] == 0
    w = torch.clamp(tot[:, 1] / max(K, 1), min=1e-5)
    w = torch.where(valid, w, torch.ones_like(w))
    loss = torch.where(valid, tot[:, 2] / w, torch.zeros_like(w))
    return loss, w, valid


def sid_backward(x_g, y_real, y_fake, alpha, w_n, valid_n, scale):
    """(g_xg, g_real, g_fake), each [N, K] in the input dtype."""
    _check_ready(x_g, y_real, y_fake)
    x_g = _prep(x_g)
    dtype, dev = x_g.dtype, x_g.device
    y_real = _prep(y_real, dtype)
    y_fake = _prep(y_fake, dtype)
    n, K = x_g.shape
    g_xg = torch.empty_like(x_g)
    g_real = torch.empty_like(x_g)
    g_fake = torch.empty_like(x_g)
    if n == 0 or K == 0:
        return g_xg, g_real, g_fake
    w = _prep_vec(w_n, n, torch.float64, dev)
    valid = _prep_vec(valid_n, n, torch.bool, dev)
    if isinstance(scale, torch.Tensor):  # e.g. grad_output / N, kept on the device
        scale_t = scale.detach().to(device=dev, dtype=torch.float64).reshape(())
    else:  # a Python float is float64; torch.as_tensor would round it to float32
        scale_t = torch.tensor(float(scale), dtype=torch.float64, device=dev)
    c = torch.where(valid, scale_t / w, torch.zeros_like(w)).to(dtype).contiguous()
    prm = _params([alpha], dtype, dev)
    with _device_ctx(dev):
        _sid_bwd_kernel[(n, triton.cdiv(K, SID_BLOCK))](
            x_g, y_real, y_fake, prm, c, g_xg, g_real, g_fake, K,
            BLOCK=SID_BLOCK, num_warps=4)
    return g_xg, g_real, g_fake


def fake_forward(y_fake, x):
    """(sq_n float64 [N], valid_n bool [N]); sq_n = sum_k (y_fake - x)^2, 0 if invalid."""
    _check_ready(y_fake, x)
    y_fake = _prep(y_fake)
    dtype, dev = y_fake.dtype, y_fake.device
    x = _prep(x, dtype)
    n, K = y_fake.shape
    if n == 0:
        return (torch.zeros(0, dtype=torch.float64, device=dev),
                torch.zeros(0, dtype=torch.bool, device=dev))
    chunk, ns = _splits(n, K, dev)
    part = torch.empty((n, ns, 2), dtype=dtype, device=dev)
    with _device_ctx(dev):
        _fake_fwd_kernel[(n, ns)](y_fake, x, part, K, chunk, ns, BLOCK=SID_BLOCK, num_warps=4)
    tot = part.to(torch.float64).sum(1)
    valid = tot[:, 0] == 0
    sq = torch.where(valid, tot[:, 1], torch.zeros_like(tot[:, 1]))
    return sq, valid


def fake_backward(y_fake, x, coef_n):
    """(g_fake, g_x): g_fake = 2 coef_n (y_fake - x), g_x = -g_fake."""
    _check_ready(y_fake, x)
    y_fake = _prep(y_fake)
    dtype, dev = y_fake.dtype, y_fake.device
    x = _prep(x, dtype)
    n, K = y_fake.shape
    g_fake = torch.empty_like(y_fake)
    g_x = torch.empty_like(y_fake)
    if n == 0 or K == 0:
        return g_fake, g_x
    c = _prep_vec(coef_n, n, dtype, dev)
    with _device_ctx(dev):
        _fake_bwd_kernel[(n, triton.cdiv(K, SID_BLOCK))](
            y_fake, x, c, g_fake, g_x, K, BLOCK=SID_BLOCK, num_warps=4)
    return g_fake, g_x


class TritonPrimitives:
    """The primitive set of docs/design.md, served by Triton kernels."""

    name = NAME

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
    "sid_forward", "sid_backward", "fake_forward", "fake_backward",
]


# ============================================================ ahead-of-time check
def compile_check(arch: int = 90, dtypes=("fp32", "fp64"), verbose: bool = False):
    """Compile every kernel variant the launchers can pick for an NVIDIA target without
    a GPU (needs triton's bundled ptxas; must run without TRITON_INTERPRET). Returns a
    list of (kernel, dtype, config, error-or-None)."""
    if triton is None or _INTERPRET_AT_IMPORT:
        raise RuntimeError("compile_check needs triton without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", int(arch), 32)
    out = []

    def one(fn, consts, dt, nw):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = f"*{dt}"
            else:
                sig[name] = "i32"
        err = None
        try:
            triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                           options={"num_warps": nw})
        except Exception as e:  # report, keep going
            err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        out.append((fn.__name__, dt, dict(consts), err))
        if verbose:
            print(out[-1], flush=True)

    for dt in dtypes:
        prec = "tf32x3" if dt == "fp32" else "ieee"
        tol = _close_tol(torch.float32 if dt == "fp32" else torch.float64)
        for mx, mz in ((_DOT, _DOT), (_DIRECT, _DOT), (_DOT, _DIRECT), (_FMA, _FMA),
                       (_DIRECT, _DIRECT)):
            tiles = (32, 64) if (mx, mz) == (_DOT, _DOT) else (32,)
            bkx, bkz = _bk(3 if mx == _DIRECT else 99, mx), _bk(3 if mz == _DIRECT else 99, mz)
            for bm in tiles:
                one(_iso_fwd_kernel, dict(SYM=True, BM=bm, BN=bm, BKX=bkx, BKZ=bkz,
                                          MODE_X=mx, MODE_Z=mz, DOT_PREC=prec, TOL=tol), dt,
                    _warps(bm))
                one(_iso_coef_kernel, dict(BM=bm, BN=bm, BKX=bkx, BKZ=bkz, MODE_X=mx,
                                           MODE_Z=mz, DOT_PREC=prec, TOL=tol), dt, _warps(bm))
            if _FMA not in (mx, mz):
                bm = 32 if (mx, mz) == (_DOT, _DOT) else 16
                one(_iso_bwd_small_kernel,
                    dict(BM=bm, BN=bm, DPX=64 if mx == _DOT else 16,
                         DPZ=64 if mz == _DOT else 4, MODE_X=mx, MODE_Z=mz, DOT_PREC=prec,
                         TOL=tol),
                    dt, 8)
        one(_iso_fwd_kernel, dict(SYM=False, BM=32, BN=32, BKX=32, BKZ=8, MODE_X=_DOT,
                                  MODE_Z=_DIRECT, DOT_PREC=prec, TOL=tol), dt, 4)
        for mode, bc, bd in ((_DOT, 32, 64), (_FMA, 8, 32), (_DIRECT, 8, 16)):
            for bm in ((32, 64) if mode == _DOT else (32,)):
                one(_iso_apply_kernel, dict(BM=bm, BC=bc, BD=bd, MODE=mode, DOT_PREC=prec),
                    dt, _warps(bm))
        for fn in (_sid_fwd_kernel, _sid_bwd_kernel, _fake_fwd_kernel, _fake_bwd_kernel):
            one(fn, dict(BLOCK=SID_BLOCK), dt, 4)
    return out
