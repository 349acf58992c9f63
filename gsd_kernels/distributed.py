"""The isometry loss over a global batch split across processes (docs/definitions.md §3.4).

Each rank holds its own samples `x_local`, `z_local`. The batch is all-gathered; each rank
computes the four weighted pair sums of its own rows against all columns (so the N^2 work
is split, not repeated); the sums are all-reduced and every rank evaluates the same global
loss. Backward needs no communication: the pair sums are symmetric in (i, j), so the
gradient of row i is 2 * sum_j d f(i, j) / d x_i, which the rank owning row i computes
with one row-block primitive call (no (N, D) gradient is all-reduced).

    from gsd_kernels.distributed import isometry_loss
    loss = isometry_loss(x_local, z_local, weighting="global", scale="optimal", backend="auto")

With `groups=g` (pairs only within blocks of g consecutive rows) and a per-rank row count
that is a multiple of g, every group lies within one rank: nothing is gathered. The ranks
all-reduce two scalars for a common power-of-two frame (the largest spread of x and of z),
one for the closed-form local bandwidth, and the four pair sums of their own rows; the
backward again needs no communication.

Without an initialised process group this is the ordinary `isometry_loss`. Under
DistributedDataParallel, which averages gradients over ranks, multiply the loss by the
world size to get the gradient of the global loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference, validation
from ._isometry import _apply_factor, _inv_two_h2, _iso_operands, _loss_from_sums
from .ops import _resolve
from .reference import compute_dtype, flatten_rows, pow2_factor_of

# (group, rows per rank) already checked to be equal on every rank: the check reads a
# gathered value on the host, which is done once, not on every step.
_CHECKED_SIZES: set = set()


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

def _rows_coefficients(grad_sums: Tensor) -> Tensor:
    """p, q, r, s of the row-block backward, on the device.

    sums = [W, S_xx, S_xz, S_zz]: dS_xx/d delta = 2 w delta, dS_xz/d delta = w dz, the same
    for dz; W carries no gradient (weights are constants). The factor 2: row i's gradient
    collects the pairs (i, j) and (j, i) of the symmetric global sum."""
    _, g_xx, g_xz, g_zz = grad_sums.to(torch.float64).unbind()
    return 2.0 * torch.stack([2.0 * g_xx, g_xz, 2.0 * g_zz, g_xz])


@torch.library.custom_op("gsd::isometry_rows_fwd", mutates_args=())
def _rows_fwd(x_local: Tensor, z_local: Tensor, x: Tensor, z: Tensor, r0: int, r1: int, local: bool,
              bandwidth: float, backend: str) -> tuple[Tensor, Tensor]:
    """(pair sums of the scaled rows [r0, r1) against all columns, factors (sx, sz)).

    x, z: the gathered batch (no gradient); x_local, z_local: this rank's rows of it, the
    inputs that receive the gradient."""
    prims = ops.backends.primitives(backend, x.device.type)
    operands, kwargs, scales = _iso_operands(prims, x, z)
    inv_two_h2 = _inv_two_h2(z, local, bandwidth, scales[1])
    n = x.shape[0]
    return prims.iso_forward_sums(*operands, r0, r1, 0, n, inv_two_h2, **kwargs), scales


@_rows_fwd.register_fake
def _(x_local, z_local, x, z, r0, r1, local, bandwidth, backend):
    return x.new_empty((4,), dtype=torch.float64), x.new_empty((2,), dtype=torch.float64)


@torch.library.custom_op("gsd::isometry_rows_bwd", mutates_args=())
def _rows_bwd(grad_sums: Tensor, x: Tensor, z: Tensor, r0: int, r1: int, local: bool, bandwidth: float,
              need_x: bool, need_z: bool, backend: str) -> tuple[Tensor, Tensor]:
    prims = ops.backends.primitives(backend, x.device.type)
    operands, kwargs, scales = _iso_operands(prims, x, z)
    inv_two_h2 = _inv_two_h2(z, local, bandwidth, scales[1])
    n = x.shape[0]
    gx, gz = prims.iso_backward_rows(*operands, r0, r1, 0, n, inv_two_h2, _rows_coefficients(grad_sums),
                                     need_x=need_x, need_z=need_z, **kwargs)
    # gradients of the scaled operands -> of x and z (the sums are those of x * sx, z * sz)
    gx = _apply_factor(gx, scales[0]) if need_x else x.new_empty((0,))
    gz = _apply_factor(gz, scales[1]) if need_z else z.new_empty((0,))
    return gx, gz


@_rows_bwd.register_fake
def _(grad_sums, x, z, r0, r1, local, bandwidth, need_x, need_z, backend):
    rows = r1 - r0
    return (x.new_empty((rows, x.shape[1])) if need_x else x.new_empty((0,)),
            z.new_empty((rows, z.shape[1])) if need_z else z.new_empty((0,)))


def _rows_setup(ctx, inputs, output):
    x_local, z_local, x, z, r0, r1, local, bandwidth, backend = inputs
    ctx.save_for_backward(x, z)
    ctx.args = (r0, r1, local, bandwidth)
    ctx.backend = backend
    ctx.shapes = (x_local.shape, z_local.shape)


def _rows_backward(ctx, grad_sums, grad_scales):
    x, z = ctx.saved_tensors
    need_x, need_z = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    gx, gz = _rows_bwd(grad_sums, x, z, *ctx.args, need_x, need_z, ctx.backend)
    gx = gx.reshape(ctx.shapes[0]) if need_x else None
    gz = gz.reshape(ctx.shapes[1]) if need_z else None
    return gx, gz, None, None, None, None, None, None, None


torch.library.register_autograd("gsd::isometry_rows_fwd", _rows_backward, setup_context=_rows_setup)


def _gather(local: Tensor, group) -> Tensor:
    """all_gather without autograd (the fused path routes gradients to the local rows)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def _reference_row_sums(x: Tensor, z: Tensor, r0: int, r1: int, inv_two_h2: Tensor) -> Tensor:
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


# -------------------------------------------------- grouped pairs: no gather at all

def _spread(t: Tensor) -> Tensor:
    """max_k (max_i t_ik - min_i t_ik) of this rank's rows, float64 (no gradient)."""
    t = t.detach()
    return (t.amax(0).double() - t.amin(0).double()).amax()


def _grouped_operands(prims, x: Tensor, z: Tensor, sx: Tensor, sz: Tensor):
    """Operands of the grouped primitives in the common frame x * sx, z * sz. The grouped
    kernels use differences of rows only, so each rank may centre on its own means."""
    mean_x, mean_z = x.mean(0), z.mean(0)
    if getattr(prims, "centres_in_kernel", False):
        return (x, z, None, None), {"mean_x": mean_x, "mean_z": mean_z, "scale_x": sx, "scale_z": sz}
    xc = (x - mean_x).mul_(sx.to(x.dtype))
    zc = (z - mean_z).mul_(sz.to(z.dtype))
    return (xc, zc, (xc * xc).sum(1), (zc * zc).sum(1)), {}


@torch.library.custom_op("gsd::isometry_grouped_rows_fwd", mutates_args=())
def _grouped_rows_fwd(x: Tensor, z: Tensor, scales: Tensor, inv_two_h2: Tensor, groups: int,
                      backend: str) -> Tensor:
    """Pair sums of this rank's rows (all its groups) in the frame x * sx, z * sz."""
    prims = ops.backends.primitives(backend, x.device.type)
    operands, kwargs = _grouped_operands(prims, x, z, scales[0], scales[1])
    n = x.shape[0]
    return prims.iso_forward_sums(*operands, 0, n, 0, n, inv_two_h2, groups=groups, **kwargs)


@_grouped_rows_fwd.register_fake
def _(x, z, scales, inv_two_h2, groups, backend):
    return x.new_empty((4,), dtype=torch.float64)


@torch.library.custom_op("gsd::isometry_grouped_rows_bwd", mutates_args=())
def _grouped_rows_bwd(grad_sums: Tensor, x: Tensor, z: Tensor, scales: Tensor, inv_two_h2: Tensor,
                      groups: int, need_x: bool, need_z: bool, backend: str) -> tuple[Tensor, Tensor]:
    prims = ops.backends.primitives(backend, x.device.type)
    operands, kwargs = _grouped_operands(prims, x, z, scales[0], scales[1])
    n = x.shape[0]
    gx, gz = prims.iso_backward_rows(*operands, 0, n, 0, n, inv_two_h2, _rows_coefficients(grad_sums),
                                     need_x=need_x, need_z=need_z, groups=groups, **kwargs)
    gx = _apply_factor(gx, scales[0]) if need_x else x.new_empty((0,))
    gz = _apply_factor(gz, scales[1]) if need_z else z.new_empty((0,))
    return gx, gz


@_grouped_rows_bwd.register_fake
def _(grad_sums, x, z, scales, inv_two_h2, groups, need_x, need_z, backend):
    return (torch.empty_like(x) if need_x else x.new_empty((0,)),
            torch.empty_like(z) if need_z else z.new_empty((0,)))


def _grouped_setup(ctx, inputs, output):
    x, z, scales, inv_two_h2, groups, backend = inputs
    ctx.save_for_backward(x, z, scales, inv_two_h2)
    ctx.args = (groups,)
    ctx.backend = backend


def _grouped_backward(ctx, grad_sums):
    x, z, scales, inv_two_h2 = ctx.saved_tensors
    need_x, need_z = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    gx, gz = _grouped_rows_bwd(grad_sums, x, z, scales, inv_two_h2, *ctx.args, need_x, need_z, ctx.backend)
    return (gx if need_x else None), (gz if need_z else None), None, None, None, None


torch.library.register_autograd("gsd::isometry_grouped_rows_fwd", _grouped_backward,
                                setup_context=_grouped_setup)


def _reference_grouped_sums(x: Tensor, z: Tensor, groups: int, inv_two_h2: Tensor) -> Tensor:
    """Eager PyTorch pair sums of this rank's groups (g x g blocks, autograd)."""
    delta = reference._group_distances(x, groups)
    dz = reference._group_distances(z, groups)
    off = ~torch.eye(groups, dtype=torch.bool, device=x.device)
    w = torch.where(off, torch.exp(-dz.detach() ** 2 * inv_two_h2), torch.zeros_like(dz))
    return torch.stack([w.sum(), (w * delta * delta).sum(), (w * delta * dz).sum(), (w * dz * dz).sum()]).double()


def _grouped_loss(x_rows: Tensor, z_rows: Tensor, weighting, bandwidth, fixed: float, groups: int,
                  name: str, world: int, group) -> Tensor:
    """The grouped loss of the global batch from this rank's whole groups, without a gather."""
    n_global = x_rows.shape[0] * world
    local = weighting == "local"
    if name == "reference":
        scales = torch.ones(2, dtype=torch.float64, device=x_rows.device)
    else:
        spreads = torch.stack([_spread(x_rows), _spread(z_rows)])
        dist.all_reduce(spreads, op=dist.ReduceOp.MAX, group=group)  # one frame on every rank
        scales = torch.stack([pow2_factor_of(spreads[0], x_rows.dtype), pow2_factor_of(spreads[1], z_rows.dtype)])
    if local and bandwidth is None:
        # h^2 = 2g / ((g - 1) N) sum_i ||z'_i - mean of its group||^2 over all ranks
        zs = z_rows.detach().double() * scales[1]
        blocks = zs.reshape(-1, groups, zs.shape[1])
        sq = ((blocks - blocks.mean(1, keepdim=True)) ** 2).sum()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
        h2 = (2.0 * groups / ((groups - 1) * n_global)) * sq
        positive = h2 > 0
        inv_two_h2 = torch.where(positive, 0.5 / torch.where(positive, h2, torch.ones_like(h2)), torch.zeros_like(h2))
    else:
        inv_two_h2 = _inv_two_h2(z_rows, local, 0.0 if bandwidth is None else float(bandwidth), scales[1])
    if name == "reference":
        local_sums = _reference_grouped_sums(x_rows, z_rows, groups, inv_two_h2)
    else:
        local_sums = _grouped_rows_fwd(x_rows, z_rows, scales, inv_two_h2, groups, name)
    sums = _all_reduce_constant_grad(local_sums, group)
    return _loss_from_sums(sums, scales, fixed)


# ------------------------------------------------------------------------ public API

def isometry_loss(x_local, z_local, *, weighting="global", bandwidth=None, scale="optimal", groups=None,
                  backend="auto", group=None) -> Tensor:
    """Global-batch isometry loss from this rank's samples; same value on every rank.

    groups=g: pairs only within blocks of g consecutive rows of the global batch; each
    rank's row count must be a multiple of g (then no group spans two ranks)."""
    if not _distributed(group):
        return ops.isometry_loss(x_local, z_local, weighting=weighting, bandwidth=bandwidth,
                                 scale=scale, groups=groups, backend=backend)
    validation.check_tensor("x_local", x_local)
    validation.check_tensor("z_local", z_local)
    if x_local.shape[0] != z_local.shape[0]:
        raise ValueError(f"x_local and z_local must have the same first dimension, "
                         f"got {x_local.shape[0]} and {z_local.shape[0]}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = x_local.shape[0]
    key = (id(group), rows)
    if key not in _CHECKED_SIZES:
        # on the samples' device: NCCL only moves CUDA tensors
        sizes = [torch.zeros((), dtype=torch.int64, device=x_local.device) for _ in range(world)]
        dist.all_gather(sizes, torch.full((), rows, dtype=torch.int64, device=x_local.device), group=group)
        if len({int(s) for s in sizes}) != 1:
            raise ValueError(f"every rank must hold the same number of samples, got {[int(s) for s in sizes]}")
        _CHECKED_SIZES.add(key)
    if groups is not None:
        validation.check_groups(groups, rows * world)
        if rows % groups != 0:  # then N = world * rows is a multiple of g too
            raise ValueError(f"groups = {groups} must divide each rank's number of samples ({rows}), "
                             "so that no group spans two ranks")
        validation.check_isometry_args(x_local, z_local, weighting, bandwidth, scale, groups)

    dtype = compute_dtype(x_local, z_local)
    x_rows, z_rows = flatten_rows(x_local, dtype), flatten_rows(z_local, dtype)
    local = weighting == "local"
    bw = 0.0 if bandwidth is None else float(bandwidth)
    fixed = -1.0 if isinstance(scale, str) else float(scale)
    r0, r1 = rank * rows, (rank + 1) * rows
    name = _resolve(backend, x_rows.device.type)
    if groups is not None:
        ops.check_grouped_backend(name, groups)
        return _grouped_loss(x_rows, z_rows, weighting, bandwidth, fixed, int(groups), name, world,
                             group).to(dtype)
    if name == "reference":
        x = _AllGather.apply(x_rows, group)
        z = _AllGather.apply(z_rows, group)
        validation.check_isometry_args(x, z, weighting, bandwidth, scale)
        ones = torch.ones(2, dtype=torch.float64, device=x.device)
        local_sums = _reference_row_sums(x, z, r0, r1, _inv_two_h2(z, local, bw, ones[1]))
        scales = ones
    else:
        x, z = _gather(x_rows.detach(), group), _gather(z_rows.detach(), group)
        validation.check_isometry_args(x, z, weighting, bandwidth, scale)
        local_sums, scales = _rows_fwd(x_rows, z_rows, x, z, r0, r1, local, bw, name)
    sums = _all_reduce_constant_grad(local_sums, group)
    return _loss_from_sums(sums, scales, fixed).to(dtype)


__all__ = ["isometry_loss"]
