"""Float64 brute-force definitions of the ops, written independently of gsd_kernels.

They follow docs/definitions.md §2 literally (explicit pairwise differences, explicit loops over the
definition) so that they can check the reference implementation as well as the kernels.
Only for small N: they build N x N x D tensors.
"""

import torch


def _safe_norm(diff):
    sq = (diff * diff).sum(-1)
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def isometry(x, z, weighting="global", bandwidth=None, scale="optimal", groups=None):
    """groups=g: only the pairs i != j with i // g == j // g count (a masked N x N)."""
    n = x.shape[0]
    x = x.reshape(n, -1).double()
    z = z.reshape(n, -1).double()
    delta = _safe_norm(x[:, None, :] - x[None, :, :])
    dz = _safe_norm(z[:, None, :] - z[None, :, :])
    off = ~torch.eye(n, dtype=torch.bool)
    if groups is not None:
        block = torch.arange(n) // groups
        off = off & (block[:, None] == block[None, :])
    if weighting == "local":
        if bandwidth is None:
            h2 = (dz.detach() ** 2)[off].mean()
        else:
            h2 = torch.tensor(float(bandwidth) ** 2, dtype=torch.float64)
        w = torch.exp(-dz.detach() ** 2 / (2 * h2))
    else:
        w = torch.ones_like(delta)
    w = w * off
    if scale == "optimal":
        s_xz = (w * delta * dz).sum()
        s_xx = (w * delta ** 2).sum()
        s_zz = (w * dz ** 2).sum()
        if float((s_xx * s_zz).detach()) == 0.0:
            return torch.ones((), dtype=torch.float64) + 0 * (delta.sum() + dz.sum())
        return 1 - s_xz ** 2 / (s_xx * s_zz)
    return (w * (delta - scale * dz) ** 2).sum() / w.sum()


def sid_generator(x_g, y_real, y_fake, alpha=1.2):
    n = x_g.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        xg, yr, yf = (t[i].reshape(-1).double() for t in (x_g, y_real, y_fake))
        if not (torch.isfinite(xg).all() and torch.isfinite(yr).all() and torch.isfinite(yf).all()):
            continue
        w = max(float((xg - yr).abs().mean()), 1e-5)
        total = total + ((yr - yf) * ((yr - xg) - alpha * (yr - yf))).sum() / w
    return total / n


def fake_score(y_fake, x, sigma, sigma_data=0.5):
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        yf, xi = y_fake[i].reshape(-1).double(), x[i].reshape(-1).double()
        if not (torch.isfinite(yf).all() and torch.isfinite(xi).all()):
            continue
        s = sigma.reshape(-1)[i].double()
        lam = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
        total = total + lam * ((yf - xi) ** 2).sum()
    return total / n


# SiDA (docs/definitions.md §3.6), re-stated in float64 from the official code's formulas: BCE
# with logits, label 1: log(1 + e^-l) = softplus(-l); label 0: softplus(l).

def sida_discriminator(logit_fake, logit_real, sigma, sigma_data=0.5):
    """(1/n) sum_i lambda(sigma_i) (mean BCE(real, 1) + mean BCE(fake, 0)) / 2."""
    n = logit_fake.shape[0]
    lf, lr, s = logit_fake.double(), logit_real.double(), sigma.double().reshape(n)
    bce = (torch.nn.functional.softplus(-lr).mean() + torch.nn.functional.softplus(lf).mean()) / 2
    lam = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    return (lam * bce).sum() / n


def sida_generator(logits, x, y_real, loss_scale=0.01):
    """SiDA's scaled generator term: loss_scale (1/n) sum_i D mean BCE(clamp(l, -10, 10), 1) / w_i,
    w_i = max(mean |x_i - y_real_i|, 1e-5) (no gradient)."""
    n = x.shape[0]
    x64 = x.double().reshape(n, -1)
    bce = torch.nn.functional.softplus(-logits.double().clamp(-10, 10)).mean()
    w = (x64 - y_real.double().reshape(n, -1)).abs().mean(1).clamp_min(1e-5).detach()
    return loss_scale * (x64.shape[1] * bce / w).sum() / n


# The Frechet distance as pytorch-fid states it: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)),
# with scipy's matrix square root (the engine takes the trace through an SVD of the centred samples).

def frechet_scipy(a, b) -> float:
    import numpy as np
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))
