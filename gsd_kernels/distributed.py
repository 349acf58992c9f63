"""The isometry loss over a global batch split across processes (SPEC §3.4).

Each rank holds its own samples `x_local`, `z_local`. The batch is gathered with a
differentiable all-gather; each rank computes the four weighted pair sums of its own rows
against all columns (so the N^2 work is split, not repeated); the sums are all-reduced and
every rank evaluates the same global loss. Gradients reach each sample's owner: the
all-gather's backward sums every rank's contribution to a row.

    from gsd_kernels.distributed import isometry_loss
    loss = isometry_loss(x_local, z_local, weighting="global", scale="optimal", backend="auto")

Without an initialised process group this is the ordinary `isometry_loss`. Under
DistributedDataParallel, which averages gradients over ranks, multiply the loss by the
world size to get the gradient of the global loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, validation
from .ops import _iso_operands, _loss_from_sums, _resolve
from .reference import compute_dtype, flatten_rows


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllGather(torch.autograd.Function):
    """all_gather whose backward gives each rank the sum of all ranks' gradients of its rows."""

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)  # gloo has no reduce_scatter
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        rows = grad.shape[0] // world
        return grad[rank * rows:(rank + 1) * rows], None


def _all_reduce_constant_grad(local_sums: Tensor, group) -> Tensor:
    """Global sums whose gradient flows into this rank's own partial sums only.

    Every rank evaluates the same loss of the global sums; routing its gradient into its own
    partial sums (not all of them) makes the all-gather's backward add each pair exactly once.
    """
    total = local_sums.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return local_sums + (total - local_sums.detach())


# ------------------------------------------------------- row-block sums as custom ops

@torch.library.custom_op("gsd::isometry_rows_fwd", mutates_args=())
def _rows_fwd(x: Tensor, z: Tensor, r0: int, r1: int, inv_two_h2: float, backend: str) -> Tensor:
    prims = ops.backends.primitives(backend, x.device.type)
    operands, means = _iso_operands(prims, x, z)
    n = x.shape[0]
    return prims.iso_forward_sums(*operands, r0, r1, 0, n, inv_two_h2, **means)


@_rows_fwd.register_fake
def _(x, z, r0, r1, inv_two_h2, backend):
    return x.new_empty((4,), dtype=torch.float64)


@torch.library.custom_op("gsd::isometry_rows_bwd", mutates_args=())
def _rows_bwd(grad_sums: Tensor, x: Tensor, z: Tensor, r0: int, r1: int, inv_two_h2: float,
              backend: str) -> tuple[Tensor, Tensor]:
    # sums = [W, S_xx, S_xz, S_zz]: dS_xx/d delta = 2 w delta, dS_xz/d delta = w dz, and the
    # same for dz; W carries no gradient (weights are constants).
    _, g_xx, g_xz, g_zz = grad_sums.tolist()
    coefficients = (2.0 * g_xx, g_xz, 2.0 * g_zz, g_xz)
    prims = ops.backends.primitives(backend, x.device.type)
    operands, means = _iso_operands(prims, x, z)
    n = x.shape[0]
    # pairs (i in rows, j anywhere): d/dx_i from the row side, d/dx_j from the column side
    gx_rows, gz_rows = prims.iso_backward_rows(*operands, r0, r1, 0, n, inv_two_h2, *coefficients, **means)
    gx, gz = prims.iso_backward_rows(*operands, 0, n, r0, r1, inv_two_h2, *coefficients, **means)
    gx[r0:r1] += gx_rows
    gz[r0:r1] += gz_rows
    return gx, gz


@_rows_bwd.register_fake
def _(grad_sums, x, z, r0, r1, inv_two_h2, backend):
    return torch.empty_like(x), torch.empty_like(z)


def _rows_setup(ctx, inputs, output):
    x, z, r0, r1, inv_two_h2, backend = inputs
    ctx.save_for_backward(x, z)
    ctx.args = (r0, r1, inv_two_h2, backend)


def _rows_backward(ctx, grad_sums):
    x, z = ctx.saved_tensors
    gx, gz = _rows_bwd(grad_sums, x, z, *ctx.args)
    return gx, gz, None, None, None, None


torch.library.register_autograd("gsd::isometry_rows_fwd", _rows_backward, setup_context=_rows_setup)


def _reference_row_sums(x: Tensor, z: Tensor, r0: int, r1: int, inv_two_h2: float) -> Tensor:
    """Eager PyTorch form of the row-block sums (builds a (r1-r0) x N block)."""

    def distances(a):
        centred = a - a.mean(0, keepdim=True)
        sq = (centred * centred).sum(1)
        d2 = (sq[r0:r1, None] + sq[None, :] - 2.0 * centred[r0:r1] @ centred.T).clamp_min(0.0)
        pos = d2 > 0
        return torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), torch.zeros_like(d2))

    delta, dz = distances(x), distances(z)
    rows = torch.arange(r0, r1, device=x.device)[:, None]
    cols = torch.arange(x.shape[0], device=x.device)[None, :]
    w = torch.exp(-dz.detach() ** 2 * inv_two_h2) * (rows != cols)
    return torch.stack([w.sum(), (w * delta * delta).sum(), (w * delta * dz).sum(), (w * dz * dz).sum()]).double()


# ------------------------------------------------------------------------ public API

def isometry_loss(x_local, z_local, *, weighting="global", bandwidth=None, scale="optimal", backend="auto",
                  group=None) -> Tensor:
    """Global-batch isometry loss from this rank's samples; same value on every rank."""
    if not _distributed(group):
        return ops.isometry_loss(x_local, z_local, weighting=weighting, bandwidth=bandwidth,
                                 scale=scale, backend=backend)
    validation.check_tensor("x_local", x_local)
    validation.check_tensor("z_local", z_local)
    if x_local.shape[0] != z_local.shape[0]:
        raise ValueError(f"x_local and z_local must have the same first dimension, "
                         f"got {x_local.shape[0]} and {z_local.shape[0]}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # on the samples' device: NCCL only moves CUDA tensors
    sizes = [torch.zeros((), dtype=torch.int64, device=x_local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(x_local.shape[0], dtype=torch.int64, device=x_local.device), group=group)
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must hold the same number of samples, got {[int(s) for s in sizes]}")

    dtype = compute_dtype(x_local, z_local)
    x = _AllGather.apply(flatten_rows(x_local, dtype), group)
    z = _AllGather.apply(flatten_rows(z_local, dtype), group)
    validation.check_isometry_args(x, z, weighting, bandwidth, scale)
    name = _resolve(backend, x.device.type)

    rows = x_local.shape[0]
    r0, r1 = rank * rows, (rank + 1) * rows
    if weighting == "local":
        h2 = float(bandwidth) ** 2 if bandwidth is not None else ops._local_h2(z)
        inv_two_h2 = 0.5 / h2 if h2 > 0 else 0.0
    else:
        inv_two_h2 = 0.0
    if name == "reference":
        local_sums = _reference_row_sums(x, z, r0, r1, inv_two_h2)
    else:
        local_sums = _rows_fwd(x, z, r0, r1, inv_two_h2, name)
    sums = _all_reduce_constant_grad(local_sums, group)
    return _loss_from_sums(sums, -1.0 if isinstance(scale, str) else float(scale)).to(dtype)


__all__ = ["isometry_loss"]
