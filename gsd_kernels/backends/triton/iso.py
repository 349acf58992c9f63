"""Launchers of the isometry primitives (``iso_forward_sums``, ``iso_backward_rows``,
grouped pairs included) and their mode / tile choice; the kernels are in
``iso_kernels.py``."""

from __future__ import annotations

import torch

from . import common
from .common import (_check_ready, _close_tol, _device_ctx, _device_scalars, _dot_precisions,
                     _prep, _prep_vec, _tiles, _with_dot_fallback, triton)

if triton is not None:
    from .iso_kernels import (_iso_apply_kernel, _iso_bwd_small_kernel, _iso_coef_kernel,
                              _iso_fwd_kernel, _iso_grouped_bwd_kernel,
                              _iso_grouped_fwd_kernel)


_DOT, _FMA, _DIRECT = 0, 1, 2  # the kernels' MODE_DOT, MODE_FMA, MODE_DIRECT


def _mode(dim: int, use_dot: bool) -> int:
    if dim <= common.DIRECT_MAX:
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
    return nr >= common.LARGE_TILE_MIN_ROWS and all(m == _DOT for m in modes)


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
                              uses_dot=max(D, d) > common.DIRECT_MAX)
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
    uses_dot = max(D, d) > common.DIRECT_MAX
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
        if common.SLAB_ROWS is not None:
            R = max(BM, int(common.SLAB_ROWS) // BM * BM)
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
    if max(D, d) <= common.SMALL_DIM:
        return _with_dot_fallback(("iso_bwd_small", dtype, dev.index), launch_small,
                                  uses_dot=uses_dot)
    return _with_dot_fallback(("iso_bwd_slab", dtype, dev.index), launch_slabs,
                              uses_dot=uses_dot)
