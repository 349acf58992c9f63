"""Launchers of the fake-score (EDM) loss primitives (``fake_forward``,
``fake_backward``); the kernels are in ``sid_kernels.py``."""

from __future__ import annotations

import torch

from . import common
from .common import (_FIN_ROWS, _FIN_SPLITS, _check_ready, _device_ctx, _device_scalars, _prep,
                     _splits, triton)

if triton is not None:
    from .sid_kernels import _fake_bwd_kernel, _fake_fin_kernel, _fake_fwd_kernel


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
                                  BLOCK=common.SID_BLOCK, FINAL=final, num_warps=4)
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
        _fake_bwd_kernel[(n, triton.cdiv(K, common.SID_BLOCK))](
            y_fake, x, c, g_fake, g_x if need_x else g_fake, K, BLOCK=common.SID_BLOCK,
            NEED_X=need_x, num_warps=4)
    return g_fake, g_x
