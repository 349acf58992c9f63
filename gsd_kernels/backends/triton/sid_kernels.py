"""The SiD generator-loss and fake-score kernels (``@triton.jit``), which share the
finite-row test and the float64 clamp; as ``csrc/*/sid_*`` holds both ops. Imported only
when triton is importable (see ``sid.py`` and ``fake.py``)."""

import triton
import triton.language as tl

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
