"""Distances between sample sets whose distribution is known in closed form (gmm): sliced
Wasserstein, MMD and mode coverage (docs/definitions.md §3.6). Frechet distance, KID and
precision / recall, which compare two feature sets, are in gsd.evaluation.feature_metrics."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from gsd.evaluation.feature_metrics import as_numpy64

__all__ = ["sliced_wasserstein", "mmd", "mode_coverage"]


def _quantiles(sorted_cols: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear-interpolated quantiles q of each column of an already sorted (m, P) array."""
    m = sorted_cols.shape[0]
    pos = q * (m - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, m - 1)
    frac = (pos - lo)[:, None]
    return sorted_cols[lo] * (1 - frac) + sorted_cols[hi] * frac

def sliced_wasserstein(x, y, *, num_projections: int = 256, seed: int = 0, p: int = 2) -> float:
    """Sliced p-Wasserstein distance `(E_theta W_p^p(theta.x, theta.y))^(1/p)`.

    Directions theta are uniform on the sphere (fixed `seed`, so two calls compare like
    with like). Unequal sample sizes are handled by comparing quantile functions on a
    common grid. For two Gaussians that differ by a shift m, SW_2 = ||m|| / sqrt(D).
    """
    xa, ya = as_numpy64(x), as_numpy64(y)
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"dimensions differ: {xa.shape[1]} vs {ya.shape[1]}")
    keep_x = np.isfinite(xa).all(axis=1)
    keep_y = np.isfinite(ya).all(axis=1)
    xa, ya = xa[keep_x], ya[keep_y]
    if len(xa) == 0 or len(ya) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((xa.shape[1], num_projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    px = np.sort(xa @ theta, axis=0)
    py = np.sort(ya @ theta, axis=0)
    if len(px) != len(py):
        n = max(len(px), len(py))
        q = (np.arange(n) + 0.5) / n
        px, py = _quantiles(px, q), _quantiles(py, q)
    return float(np.mean(np.abs(px - py) ** p) ** (1.0 / p))

def mmd(x, y, *, bandwidth: float | Sequence[float] | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel (sum over bandwidths if several).

    Default bandwidth: the median pairwise distance of the pooled samples.
    """
    xa = torch.as_tensor(as_numpy64(x))
    ya = torch.as_tensor(as_numpy64(y))
    n, m = len(xa), len(ya)
    if n < 2 or m < 2:
        raise ValueError("mmd needs at least 2 samples on each side")
    pooled = torch.cat([xa, ya])
    d2 = torch.cdist(pooled, pooled).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(len(pooled), dtype=torch.bool)]
        bws = [float(off.sqrt().median())]
    elif isinstance(bandwidth, (int, float)):
        bws = [float(bandwidth)]
    else:
        bws = [float(b) for b in bandwidth]
    k = sum(torch.exp(-d2 / (2 * h * h)) for h in bws)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    value = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
             + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
             - 2 * kxy.mean())
    return float(value)

def mode_coverage(samples, means, stds=None, *, weights=None, radius: float = 3.0,
                  min_fraction: float = 0.1) -> dict:
    """Which modes of a mixture a sample set covers.

    Each sample is assigned to its nearest mean in units of that mode's std (`stds`: per
    mode scalar or per-dimension, default 1). It counts for the mode only when it lies
    within `radius` stds (a "high-quality" sample). A mode is covered when it receives at
    least `min_fraction` of the samples its weight predicts (and at least one).

    Returns `{"modes_covered", "num_modes", "counts", "high_quality_fraction"}`.
    """
    xs = as_numpy64(samples)
    mu = as_numpy64(means)
    k, d = mu.shape
    if stds is None:
        sd = np.ones((k, d))
    else:
        sd = np.asarray(stds.detach().cpu() if isinstance(stds, torch.Tensor) else stds, dtype=np.float64)
        if sd.ndim == 0:
            sd = np.full((k, d), float(sd))
        elif sd.size == k:
            sd = np.repeat(sd.reshape(k, 1), d, axis=1)
        else:
            sd = np.broadcast_to(sd.reshape(-1, d), (k, d))
    w = np.full(k, 1.0 / k) if weights is None else as_numpy64(weights).reshape(-1)
    w = w / w.sum()
    finite = np.isfinite(xs).all(axis=1)
    xs = xs[finite]
    counts = np.zeros(k, dtype=np.int64)
    if len(xs):
        z = (xs[:, None, :] - mu[None]) / sd[None]
        dist = np.sqrt((z ** 2).sum(-1) / d)  # RMS per-dimension distance in stds
        nearest = dist.argmin(1)
        close = dist[np.arange(len(xs)), nearest] <= radius
        counts = np.bincount(nearest[close], minlength=k)
    n_total = len(finite)
    need = np.maximum(1.0, min_fraction * w * n_total)
    covered = int((counts >= need).sum())
    return {
        "modes_covered": covered,
        "num_modes": int(k),
        "counts": counts.tolist(),
        "high_quality_fraction": float(counts.sum() / max(n_total, 1)),
    }
