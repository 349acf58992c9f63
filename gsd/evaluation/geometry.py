"""Geometry of a generator's latent space: the isometry defect over held-out latents, the local
defect over anchors and their sphere neighbours, and that loss split into each neighbourhood's
share (docs/definitions.md §3.6)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from gsd.seed_ranges import LOCAL_DIRECTION_SEED

__all__ = ["isometry_defect", "LOCAL_ISOMETRY", "neighbour_latents", "local_isometry_defect", "local_defect_shares"]


@torch.no_grad()
def isometry_defect(generator: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, *,
                    backend: str = "reference", weighting: str = "global") -> float:
    """Optimal-scale isometry loss (docs/definitions.md §2.1) of `generator` on held-out `latents`.

    0 means pairwise output distances are exactly proportional to latent distances.
    Samples with non-finite outputs are left out.
    """
    import gsd_kernels

    x = generator(latents)
    valid = torch.isfinite(x.reshape(len(x), -1)).all(1)
    if int(valid.sum()) < 2:
        return float("nan")
    x = x[valid].float()
    z = latents[valid].to(x.device, torch.float32)
    return float(gsd_kernels.isometry_loss(x, z, weighting=weighting, scale="optimal", backend=backend))

# Fixed settings of the evaluation's local isometry defect, independent of any training flag.
LOCAL_ISOMETRY = {"anchors": 256, "neighbours": 3, "radius": 0.5}

def neighbour_latents(anchors: torch.Tensor, *, neighbours: int = 3, radius: float = 0.5,
                      seed: int = LOCAL_DIRECTION_SEED) -> torch.Tensor:
    """(A * (K+1), ...) latents in groups of K+1 consecutive rows: each anchor, then its K
    neighbours `anchor + radius * u`, u uniform on the unit sphere of the latent's dimension
    (torch.Generator `seed`, on the CPU, so every device draws the same u)."""
    if int(neighbours) < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be finite and > 0, got {radius}")
    a = anchors.shape[0]
    flat = anchors.reshape(a, -1)
    u = torch.randn((a, int(neighbours), flat.shape[1]), generator=torch.Generator().manual_seed(int(seed)),
                    dtype=torch.float64)
    u = u / u.norm(dim=2, keepdim=True)
    z = flat.to(torch.float64)[:, None, :] + float(radius) * torch.cat([torch.zeros_like(u[:, :1]), u], 1).to(flat.device)
    return z.reshape(a * (int(neighbours) + 1), *anchors.shape[1:]).to(anchors.dtype)


@torch.no_grad()
def local_isometry_defect(generate: Callable, anchors: torch.Tensor, *, neighbours: int = 3, radius: float = 0.5,
                          labels: torch.Tensor | None = None, seed: int = LOCAL_DIRECTION_SEED,
                          backend: str = "reference", batch: int = 512) -> float:
    """The grouped optimal-scale isometry loss on held-out anchors and their neighbours.

    Each anchor z_a gets K = `neighbours` neighbours z_a + radius * u (`neighbour_latents`);
    the loss `1 - S_{delta,dz}^2 / (S_{delta,delta} S_{dz,dz})` (docs/definitions.md §2.1)
    is summed over the ordered pairs within each group of K+1 only
    (`gsd_kernels.isometry_loss(..., groups=K+1)`), so it measures how G bends space near
    each latent, not how evenly it spreads a random batch. It is scale-free, so plain eps
    latents stand for sigma_init * eps. 0: every group is mapped by an exact scaled isometry
    (one scale for all groups).

    generate(z) -> samples, or generate(z, labels) when `labels` (one per anchor) are given;
    a group's members share its anchor's label. Groups with a non-finite output are left
    out; nan when none is left.
    """
    import gsd_kernels

    k = int(neighbours)
    g = k + 1
    z = neighbour_latents(anchors, neighbours=k, radius=radius, seed=seed)
    lab = None if labels is None else labels.repeat_interleave(g)
    outs = []
    for i in range(0, len(z), batch * g):
        zz = z[i:i + batch * g]
        outs.append(generate(zz) if lab is None else generate(zz, lab[i:i + batch * g]))
    x = torch.cat(outs).reshape(len(z), -1).double()
    ok = torch.isfinite(x).reshape(-1, g, x.shape[1]).all(2).all(1)
    if not bool(ok.any()):
        return float("nan")
    keep = ok.repeat_interleave(g).to(x.device)
    return float(gsd_kernels.isometry_loss(x[keep], z.reshape(len(z), -1)[keep.to(z.device)].double().to(x.device),
                                           groups=g, weighting="global", scale="optimal", backend=backend))

def local_defect_shares(x: torch.Tensor, z: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's share of the grouped optimal-scale isometry loss (global weighting), float64 (G,).

    With the one optimal scale c = S_{delta,dz} / S_{dz,dz} of all included pairs, the loss
    1 - S_{delta,dz}^2 / (S_{delta,delta} S_{dz,dz}) equals sum over pairs (delta - c dz)^2 /
    S_{delta,delta}, so it splits into one non-negative share per group (its ordered pairs'
    residuals over S_{delta,delta}) and the shares sum to the loss: which neighbourhoods of the
    latent space carry the defect. x, z: (N, ...) rows in groups of `groups` consecutive rows.
    A reference computation (O(N g (D + d)), float64), not a training op."""
    g = int(groups)
    if g < 2 or x.shape[0] % g or x.shape[0] != z.shape[0]:
        raise ValueError(f"groups must be >= 2 and divide the {x.shape[0]} rows of x and z, got {groups}")
    xs = x.reshape(-1, g, math.prod(x.shape[1:])).double()
    zs = z.reshape(-1, g, math.prod(z.shape[1:])).double().to(xs.device)
    delta, dz = torch.cdist(xs, xs), torch.cdist(zs, zs)  # the diagonal is 0 and drops out of every sum
    s_xx, s_zz = delta.square().sum(), dz.square().sum()
    if s_xx == 0 or s_zz == 0:
        return torch.zeros(xs.shape[0], dtype=torch.float64, device=xs.device)
    c = (delta * dz).sum() / s_zz
    return (delta - c * dz).square().sum((1, 2)) / s_xx
