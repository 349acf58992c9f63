"""The isometry pair kernels (``@triton.jit``): squared-distance tiles in three modes, the
forward sums, the backward's flash-style, coefficient-slab and apply kernels, and the
grouped-pair kernels. Imported only when triton is importable (see ``iso.py``); the
launchers and the docs are in ``iso.py`` and the package docstring."""

import triton
import triton.language as tl

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
