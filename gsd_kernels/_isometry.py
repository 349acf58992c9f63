"""Host-side arithmetic of the isometry loss that the single-process ops (`ops`) and the
distributed loss (`distributed`) share: centring and power-of-two scaling of the operands,
the bandwidth term 1 / (2 h^2), the loss from the four pair sums and the backward's pair
coefficients. Internal: the public API is `gsd_kernels.isometry_loss` and
`gsd_kernels.distributed.isometry_loss`."""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import pow2_factor_of

# ----------------------------------------------------------------------------- isometry
#
# No host synchronisation anywhere below: every scalar that comes from data (1/(2 h^2), the
# backward coefficients, the power-of-two factors, grad_output) stays a device tensor and
# reaches the kernels as such (docs/design.md, "Primitives"). So the ops can be captured
# in CUDA graphs, and the host never waits for the device inside them.


def _sq_norms(t: Tensor) -> Tensor:
    return (t * t).sum(1)


def _centring(t: Tensor) -> tuple[Tensor, Tensor]:
    """Column means for centring (distances are translation invariant, and centred data keep
    the Gram trick accurate) and the power-of-two factor of the centred data.

    A constant column gets its own value as the mean, so a batch of identical rows centres
    to exactly zero rows, which the close-pair rule then leaves alone (docs/design.md)."""
    lo, hi = t.amin(0), t.amax(0)  # (torch.aminmax(dim=0) is ~20x slower on CPU)
    mean = torch.where(lo == hi, lo, t.mean(0))
    spread = (hi.double() - lo.double()).amax()
    return mean, pow2_factor_of(spread, t.dtype)


def _iso_operands(prims, x: Tensor, z: Tensor):
    """(x, z, xn2, zn2), keyword arguments for the isometry primitives of `prims`, and
    the factors (sx, sz) (float64 [2]) the primitives' operands carry: they see
    x' = (x - mean_x) * sx and z' = (z - mean_z) * sz.

    Backends whose kernels centre while packing (`centres_in_kernel`, the CPU kernels) get
    the rows as given with the column means and the factors: no (N, D) copies. The others
    (Triton, CUDA) get centred, scaled copies and their squared norms.
    """
    x, z = x.contiguous(), z.contiguous()
    mean_x, sx = _centring(x)
    mean_z, sz = _centring(z)
    scales = torch.stack([sx, sz])
    if getattr(prims, "centres_in_kernel", False):
        return (x, z, None, None), {"mean_x": mean_x, "mean_z": mean_z, "scale_x": sx, "scale_z": sz}, scales
    xc = (x - mean_x).mul_(sx.to(x.dtype))
    zc = (z - mean_z).mul_(sz.to(z.dtype))
    return (xc, zc, _sq_norms(xc), _sq_norms(zc)), {}, scales


_H2_CHUNK_ROWS = 1024


def _local_h2(z: Tensor, sz: Tensor) -> Tensor:
    """h^2 of the closed form of docs/definitions.md §2.1 (as reference.local_bandwidth_sq) for the scaled
    latents z * sz, a 0-dim float64 device tensor; over chunks of rows so that no float64
    (or centred) copy of the whole z is made."""
    z = z.detach()
    n = z.shape[0]
    chunks = [z[i:i + _H2_CHUNK_ROWS] for i in range(0, n, _H2_CHUNK_ROWS)]
    mean = sum(c.double().sum(0) for c in chunks) * sz / n
    sq = z.new_zeros((), dtype=torch.float64)
    col = torch.zeros_like(mean)
    for chunk in chunks:
        c = chunk.double() * sz - mean
        sq += (c * c).sum()
        col += c.sum(0)
    col /= n  # the mean of the centred rows: ~0, kept as the reference keeps it
    return (2.0 * n / (n - 1)) * (sq / n - (col * col).sum())


def _local_h2_grouped(z: Tensor, sz: Tensor, g: int) -> Tensor:
    """h^2 over the included pairs of groups of g consecutive rows (as
    reference.local_bandwidth_sq_grouped) for the scaled latents z * sz: the mean over groups of
    each group's closed form, over chunks of whole groups in float64 (no copy of all of z)."""
    z = z.detach()
    n = z.shape[0]
    step = max(1, _H2_CHUNK_ROWS // g) * g
    sq = z.new_zeros((), dtype=torch.float64)
    for i in range(0, n, step):
        blocks = (z[i:i + step].double() * sz).reshape(-1, g, z.shape[1])
        c = blocks - blocks.mean(1, keepdim=True)
        sq += (c * c).sum()
    return (2.0 * g / ((g - 1) * n)) * sq


def _inv_two_h2(z: Tensor, local: bool, bandwidth: float, sz: Tensor, groups: int = 0) -> Tensor:
    """1 / (2 h^2) in the frame of the scaled latents z * sz (0-dim float64 on z's device;
    0: global weighting). groups > 0: the closed-form h^2 is over the included pairs only."""
    if not local:
        return torch.zeros((), dtype=torch.float64, device=z.device)
    if bandwidth > 0:
        b = sz * bandwidth
        h2 = b * b
    elif groups:
        h2 = _local_h2_grouped(z, sz, groups)
    else:
        h2 = _local_h2(z, sz)
    positive = h2 > 0
    return torch.where(positive, 0.5 / torch.where(positive, h2, torch.ones_like(h2)), torch.zeros_like(h2))


def _loss_from_sums(sums: Tensor, scales: Tensor, scale: float) -> Tensor:
    """The loss from the pair sums of the scaled operands and their factors (sx, sz).

    Optimal scale: invariant to scaling x and z separately, so the scaled sums give it
    directly. It is 1 exactly when S_xx S_zz == 0 (every pair at distance 0 in x or in z);
    NaN is not "degenerate": a NaN or inf input gives a NaN loss. Fixed scale c: in the
    scaled frame the scale is c' = c sx / sz and the loss carries a factor 1 / sx^2."""
    w, s_xx, s_xz, s_zz = sums.unbind()
    if scale <= 0:
        denom = s_xx * s_zz
        degenerate = denom == 0
        ratio = s_xz * s_xz / torch.where(degenerate, torch.ones_like(denom), denom)
        return torch.where(degenerate, torch.ones_like(denom), 1.0 - ratio)
    sx, sz = scales.unbind()
    c = scale * sx / sz
    return (s_xx - 2.0 * c * s_xz + c * c * s_zz) / w / sx / sx


def _pair_coefficients(sums: Tensor, scales: Tensor, scale: float, grad: Tensor):
    """(coef, gmul): p, q, r, s of docs/design.md for the scaled operands (float64 [4], with
    grad_output and the symmetric factor 2 folded in; zeros when the loss is the constant
    1), and the factors (float64 [2]) that turn the primitive's gradients of the scaled
    operands into those of x and z. All on the device: no host branch, no sync."""
    w, s_xx, s_xz, s_zz = sums.unbind()
    k = 2.0 * grad.reshape(()).to(torch.float64)
    if scale <= 0:
        denom = s_xx * s_zz
        ok = denom != 0
        one = torch.ones_like(denom)
        q = -2.0 * s_xz / torch.where(ok, denom, one)
        p = -q * s_xz / torch.where(ok, s_xx, one)
        r = -q * s_xz / torch.where(ok, s_zz, one)
        coef = torch.where(ok, torch.stack([p, q, r, q]) * k, torch.zeros(4, dtype=torch.float64, device=sums.device))
        return coef, scales
    sx, sz = scales.unbind()
    c = scale * sx / sz
    coef = torch.stack([2.0 / w, -2.0 * c / w, 2.0 * c * c / w, -2.0 * c / w]) * k
    # the loss is (that of c' in the scaled frame) / sx^2: d/dx = sx / sx^2 d/dx', d/dz = sz / sx^2 d/dz'
    return coef, torch.stack([1.0 / sx, sz / sx / sx])


def _apply_factor(g: Tensor, factor: Tensor) -> Tensor:
    return g.mul_(factor.to(g.dtype))


def _group_kwargs(groups: int) -> dict:
    """The primitives' `groups=` keyword only when pairs are grouped, so that the
    all-pairs calls stay exactly those of before."""
    return {"groups": groups} if groups else {}
