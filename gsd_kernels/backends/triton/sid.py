"""Launchers of the SiD generator-loss primitives (``sid_forward``, ``sid_backward``);
the kernels are in ``sid_kernels.py``."""

from __future__ import annotations

import torch

from . import common
from .common import (_FIN_ROWS, _FIN_SPLITS, _check_ready, _device_ctx, _device_scalars, _prep,
                     _prep_vec, _split3, _splits, triton)

if triton is not None:
    from .sid_kernels import _sid_bwd_kernel, _sid_fin_kernel, _sid_fwd_kernel


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
                                 K, chunk, ns, BLOCK=common.SID_BLOCK, FINAL=final, num_warps=4)
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
        _sid_bwd_kernel[(n, triton.cdiv(K, common.SID_BLOCK))](
            x_g, y_real, y_fake, a0, a1, a2, w, valid, sc, g_xg, g_real, g_fake, K,
            BLOCK=common.SID_BLOCK, num_warps=4)
    return g_xg, g_real, g_fake
