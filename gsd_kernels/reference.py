"""Plain-PyTorch definitions of the three ops (docs/definitions.md §2.1-2.3).

These are the oracle every fused backend is tested against (run them in float64) and the
eager baseline every speed claim is measured against. Autograd supplies the gradients.
The isometry loss here builds N x N matrices on purpose: that is what an eager
implementation does. With `groups=g` it builds one g x g block per group instead (batched
Gram matrices), never N x N.
"""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def flatten_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).to(dtype)


def pow2_factor_of(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^-e as a 0-dim float64 tensor, where magnitude = m 2^e with m in [0.5, 1).

    Multiplying data of that magnitude by it is exact and brings it to <= 1, so neither the
    squares of fp32 data ~1e20 overflow nor those of ~1e-22 lose their digits. 1 when the
    magnitude is 0 or not finite (NaN and inf then reach the loss unchanged); e is clamped so
    that the factor is a normal number of `dtype`."""
    lim = 126 if dtype == torch.float32 else 1022
    ok = torch.isfinite(magnitude) & (magnitude > 0)
    e = torch.frexp(torch.where(ok, magnitude, torch.ones_like(magnitude))).exponent.to(torch.int64)
    e = torch.where(ok, e.clamp(-lim, lim), torch.zeros_like(e))
    return torch.bitwise_left_shift(1023 - e, 52).view(torch.float64)  # the bits of 2^-e


def pow2_factor(t: torch.Tensor) -> torch.Tensor:
    """pow2_factor_of max |t| (no gradient). The fused ops use the same rule on the spread of
    each column."""
    return pow2_factor_of(t.detach().abs().amax().double(), t.dtype)


def local_bandwidth_sq(z: torch.Tensor) -> torch.Tensor:
    """Mean of ||z_i - z_j||^2 over i != j, in closed form (docs/definitions.md §2.1), without gradient."""
    # Centre first: for z = 50 + randn the uncentred form cancels away fp32's digits.
    z = z.detach()
    z = z - z.mean(0)
    n = z.shape[0]
    mean_sq_norm = (z * z).sum(1).mean()
    mean = z.mean(0)
    return (2.0 * n / (n - 1)) * (mean_sq_norm - (mean * mean).sum())


def local_bandwidth_sq_grouped(z: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of ||z_i - z_j||^2 over the included pairs (i != j in one group of `groups`
    consecutive rows), without gradient: every group has g (g - 1) ordered pairs, so this is
    the mean over groups of each group's closed form, 2g/((g-1) N) sum_i ||z_i - mean of its group||^2."""
    z = z.detach()
    n, g = z.shape[0], groups
    blocks = z.reshape(n // g, g, -1)
    centred = blocks - blocks.mean(1, keepdim=True)
    return (2.0 * g / ((g - 1) * n)) * (centred * centred).sum()


def _masked_sqrt(d2: torch.Tensor) -> torch.Tensor:
    """sqrt with derivative 0 where the distance is 0 (not `d2 > 0`: a NaN distance from a
    NaN/inf input must stay NaN)."""
    zero = d2 == 0
    return torch.where(zero, torch.zeros_like(d2), torch.sqrt(torch.where(zero, torch.ones_like(d2), d2)))


def _squared_distances(centred: torch.Tensor) -> torch.Tensor:
    """||a_i - a_j||^2 over the last two axes of centred rows (..., n, D), 0 on the diagonal.

    The squared norms are row sums, not `diagonal(gram)`: torch.compile's inductor gives wrong
    gradients for a matmul whose diagonal is read back (pytorch 2.14, see
    tests/kernels/test_ops_inductor.py). The diagonal is set to 0 explicitly, since the row sums
    and the Gram matrix round differently."""
    gram = centred @ centred.transpose(-1, -2)
    sq_norms = (centred * centred).sum(-1)
    d2 = (sq_norms[..., :, None] + sq_norms[..., None, :] - 2.0 * gram).clamp_min(0.0)
    n = d2.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=d2.device)
    return torch.where(eye, torch.zeros_like(d2), d2)


def _pair_distances(a: torch.Tensor) -> torch.Tensor:
    """||a_i - a_j|| for all pairs via the Gram matrix of the centred batch.

    Centring first keeps `||a||^2 + ||b||^2 - 2 a.b` accurate for data with a large
    common offset."""
    return _masked_sqrt(_squared_distances(a - a.mean(0, keepdim=True)))


def _group_distances(a: torch.Tensor, g: int) -> torch.Tensor:
    """||a_i - a_j|| within each group of g consecutive rows: (N/g, g, g), each group centred
    on its own mean (distances are translation invariant)."""
    blocks = a.reshape(a.shape[0] // g, g, a.shape[1])
    return _masked_sqrt(_squared_distances(blocks - blocks.mean(1, keepdim=True)))


def isometry_loss(x, z, *, weighting="global", bandwidth=None, scale="optimal", groups=None):
    """groups=None: all ordered pairs i != j; groups=g: only pairs within one block of g
    consecutive rows (docs/definitions.md §2.1); the sums below run over the pair axes either way."""
    dtype = compute_dtype(x, z)
    x2 = flatten_rows(x, dtype)
    z2 = flatten_rows(z, dtype)
    n = x2.shape[0]
    # Exact power-of-two rescaling of x and z (each its own factor): the optimal-scale loss
    # does not change, and fixed scale / bandwidth are carried into the scaled frame below.
    sx, sz = pow2_factor(x2), pow2_factor(z2)
    x2 = x2 * sx.to(dtype)
    z2 = z2 * sz.to(dtype)
    if groups is None:
        delta = _pair_distances(x2)
        dz = _pair_distances(z2)
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x2.device)
    else:
        delta = _group_distances(x2, int(groups))
        dz = _group_distances(z2, int(groups))
        off_diagonal = ~torch.eye(int(groups), dtype=torch.bool, device=x2.device)  # broadcast over groups

    if weighting == "local":
        if bandwidth is not None:
            b = (sz * float(bandwidth)).to(dtype)
            h2 = b * b
        elif groups is not None:
            h2 = local_bandwidth_sq_grouped(z2, int(groups))
        else:
            h2 = local_bandwidth_sq(z2)
        # h2 == 0 only when every latent is the same point; all dz are 0 then and the weight is moot.
        inv_two_h2 = torch.where(h2 > 0, 0.5 / torch.where(h2 > 0, h2, torch.ones_like(h2)), torch.zeros_like(h2))
        w = torch.exp(-dz.detach() ** 2 * inv_two_h2)
    else:
        w = torch.ones_like(delta)
    w = torch.where(off_diagonal, w, torch.zeros_like(w))

    if isinstance(scale, str):  # "optimal"
        s_xz = (w * delta * dz).sum()
        s_xx = (w * delta * delta).sum()
        s_zz = (w * dz * dz).sum()
        denom = s_xx * s_zz
        # 1 only when every pair is at distance 0 in x or z; NaN/inf inputs give NaN
        degenerate = denom == 0
        ratio = s_xz * s_xz / torch.where(degenerate, torch.ones_like(denom), denom)
        return torch.where(degenerate, torch.ones_like(ratio), 1.0 - ratio)
    c = (float(scale) * sx / sz).to(dtype)  # the fixed scale in the scaled frame
    # loss of the unscaled data = that of the scaled data / sx^2 (two steps: no underflow)
    inv_sx = (1.0 / sx).to(dtype)
    return (w * (delta - c * dz) ** 2).sum() / w.sum() * inv_sx * inv_sx


def _valid_rows(*rows: torch.Tensor) -> torch.Tensor:
    valid = torch.ones(rows[0].shape[0], dtype=torch.bool, device=rows[0].device)
    for r in rows:
        valid &= torch.isfinite(r).all(dim=1)
    return valid


def _zero_invalid(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # torch.where (not multiplication) so that NaN/inf neither leak into values nor gradients.
    return torch.where(valid[:, None], t, torch.zeros_like(t))


def sid_generator_loss(x_g, y_real, y_fake, *, alpha=1.2):
    dtype = compute_dtype(x_g, y_real, y_fake)
    xg, yr, yf = (flatten_rows(t, dtype) for t in (x_g, y_real, y_fake))
    n = xg.shape[0]
    valid = _valid_rows(xg, yr, yf)
    xg, yr, yf = (_zero_invalid(t, valid) for t in (xg, yr, yf))
    # One exact power-of-two factor for all three (the loss is homogeneous of degree 1 in
    # them, the weight floor scales along): no fp32 overflow of the products at |x| ~ 1e20.
    s = pow2_factor(torch.stack([xg.detach().abs().amax(), yr.detach().abs().amax(),
                                 yf.detach().abs().amax()])).to(dtype)
    xg, yr, yf = xg * s, yr * s, yf * s
    w = torch.maximum((xg - yr).abs().mean(dim=1), 1e-5 * s).detach()
    a = yr - yf
    per_sample = (a * ((yr - xg) - alpha * a)).sum(dim=1) / w / s
    return torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum() / n


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1/sigma^2 + 1/sigma_data^2,
    in the second form: no Python float is squared (1e200 ** 2 raises OverflowError)."""
    inv_sd = 1.0 / sigma_data
    inv_s = 1.0 / sigma
    return inv_s * inv_s + inv_sd * inv_sd


def fake_score_loss(y_fake, x, sigma, *, sigma_data=0.5):
    dtype = compute_dtype(y_fake, x)
    yf, x2 = flatten_rows(y_fake, dtype), flatten_rows(x, dtype)
    n = x2.shape[0]
    valid = _valid_rows(yf, x2)
    yf, x2 = _zero_invalid(yf, valid), _zero_invalid(x2, valid)
    lam = edm_loss_weight(sigma.reshape(n).to(dtype), sigma_data)
    per_sample = lam * ((yf - x2) ** 2).sum(dim=1)
    return torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum() / n
