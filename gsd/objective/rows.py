"""Non-finite rows and gradients: how every term of the Distiller drops them (gsd.distill's
docstring, "NaN handling"), and the ops library the terms call."""

from __future__ import annotations

import torch

__all__ = ["row_valid", "bcast", "zero_dropped_rows", "sanitize_grads", "kernel_ops"]


def row_valid(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the rows of x whose every value is finite."""
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(1)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row vector v shaped to broadcast against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def zero_dropped_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x with the rows that were dropped (valid False) set to 0: torch.where, so that neither
    their NaN values nor their gradients reach anything."""
    return torch.where(bcast(valid, x), x, torch.zeros_like(x))


def sanitize_grads(params) -> tuple[int, int]:
    """Zero non-finite gradient elements in place; return (how many there were, how many
    gradient elements there are)."""
    bad = total = 0
    for p in params:
        g = p.grad
        if g is None:
            continue
        total += g.numel()
        finite = torch.isfinite(g)
        if not bool(finite.all()):
            bad += int((~finite).sum())
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    return bad, total


def kernel_ops():
    """gsd_kernels, imported on first use: importing gsd.distill does not load Triton."""
    import gsd_kernels
    return gsd_kernels
