"""Perceptual path length (docs/definitions.md §3.6).

    PPL = E[ d(G(slerp(z1, z2; t)), G(slerp(z1, z2; t + eps))) / eps^2 ],
    z1, z2 ~ N(0, I), t ~ U(0, 1), eps = 1e-4,

with d the squared Euclidean distance between features `phi(.)` of the two outputs (a
named feature network: the digits CNN's penultimate layer for digits, raw coordinates for
gmm) and the mean taken over the values between the 1st and 99th percentile (StyleGAN's
filter). `slerp(a, b; t) = (sin((1-t) theta) a + sin(t theta) b) / sin(theta)` with theta the
angle between a and b (the latents themselves, not normalised: Gaussian latents of the
same norm stay on that sphere).

For a linear generator G(z) = A z with identity features, the integrand tends to
`||A z'(t)||^2` as eps -> 0, `z'(t) = theta (-cos((1-t) theta) z1 + cos(t theta) z2) / sin(theta)`;
when ||z1|| = ||z2|| = r that is `theta^2 r^2 ||A u||^2` for a unit tangent u (the test
checks this closed form).

Everything is computed in float64 (networks are copied and cast), so that the eps = 1e-4
finite difference is not swamped by float32 rounding; the teacher's Heun sampler is
re-run here in float64 (`heun_sample_float64`, the same steps as `gsd.sampling.samplers.heun_sample`)
so that the 35-NFE map from latent to image is differentiated as precisely as G.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
from gsd.sampling.samplers import ode_sample

__all__ = ["slerp", "slerp_velocity", "path_length_samples", "perceptual_path_length", "heun_sample_float64",
           "float64_copy", "PPL_EPS"]

PPL_EPS = 1e-4


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.reshape(len(a), -1) * b.reshape(len(b), -1)).sum(1)


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na = a.reshape(len(a), -1).norm(dim=1)
    nb = b.reshape(len(b), -1).norm(dim=1)
    cos = (_flat_dot(a, b) / (na * nb)).clamp(-1.0, 1.0)
    return torch.arccos(cos)


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per row; t of shape (N,). Falls back to lerp for parallel rows."""
    theta = _angle(a, b)
    s = torch.sin(theta)
    small = s < 1e-12
    s_safe = torch.where(small, torch.ones_like(s), s)
    wa = torch.where(small, 1 - t, torch.sin((1 - t) * theta) / s_safe)
    wb = torch.where(small, t, torch.sin(t * theta) / s_safe)
    return _bc(wa, a) * a + _bc(wb, b) * b


def slerp_velocity(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d slerp(a, b; t) / dt (closed form, for tests)."""
    theta = _angle(a, b)
    s = torch.sin(theta)
    wa = -theta * torch.cos((1 - t) * theta) / s
    wb = theta * torch.cos(t * theta) / s
    return _bc(wa, a) * a + _bc(wb, b) * b


def path_length_samples(generator: Callable[[torch.Tensor], torch.Tensor], z1: torch.Tensor, z2: torch.Tensor,
                        t: torch.Tensor, *, eps: float = PPL_EPS,
                        features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        batch: int = 256, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair values d(phi(G(slerp(t))), phi(G(slerp(t + eps)))) / eps^2 (float64, (N,)).

    generator(z) -> outputs for a batch of latents (it receives both ends of a pair in one
    call, first half t, second half t + eps); features(x) -> (N, F) (default: flatten).
    With `class_labels` (one per pair), generator(z, labels) gets the pair's label at both ends.
    """
    z1 = z1.double()
    z2 = z2.double()
    t = t.double().reshape(-1)
    out = []
    for i in range(0, len(z1), batch):
        a, b, tt = z1[i:i + batch], z2[i:i + batch], t[i:i + batch]
        za = slerp(a, b, tt)
        zb = slerp(a, b, tt + eps)
        with torch.no_grad():
            if class_labels is None:
                x = generator(torch.cat([za, zb]))
            else:
                lab = class_labels[i:i + batch]
                x = generator(torch.cat([za, zb]), torch.cat([lab, lab]))
            f = features(x) if features is not None else x
            f = f.reshape(len(f), -1).double()
        n = len(a)
        out.append(((f[:n] - f[n:]) ** 2).sum(1).cpu() / (eps * eps))
    return torch.cat(out)


def perceptual_path_length(generator: Callable[[torch.Tensor], torch.Tensor], latent_shape, *, num: int = 512,
                           eps: float = PPL_EPS, features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           seed: int = 0, device="cpu", batch: int = 256,
                           percentiles: tuple[float, float] = (1.0, 99.0), num_classes: int = 0) -> dict:
    """PPL of `generator` over `num` random (z1, z2, t) draws (seeded; float64 latents).

    num_classes > 0: pair i uses class label i % num_classes, and generator(z, labels) is called.

    Returns `{"ppl", "ppl_stderr", "num_pairs", "num_kept", "eps", "percentiles", "ppl_unfiltered"}`;
    the filtered mean keeps values v with p_lo <= v <= p_hi.
    """
    g = torch.Generator().manual_seed(int(seed))
    shape = tuple(int(s) for s in latent_shape)
    z1 = torch.randn((num, *shape), generator=g, dtype=torch.float64)
    z2 = torch.randn((num, *shape), generator=g, dtype=torch.float64)
    t = torch.rand(num, generator=g, dtype=torch.float64)
    dev = torch.device(device)
    if num_classes:
        labels = torch.arange(num, device=dev) % int(num_classes)
        gen = lambda z, lab: generator(z.to(dev), lab)  # noqa: E731
    else:
        labels = None
        gen = lambda z: generator(z.to(dev))  # noqa: E731
    vals = path_length_samples(gen, z1, z2, t, eps=eps, features=features, batch=batch,
                               class_labels=labels).numpy()
    finite = np.isfinite(vals)
    v = vals[finite]
    if len(v) == 0:
        return {"ppl": float("nan"), "ppl_stderr": float("nan"), "num_pairs": int(num), "num_kept": 0,
                "eps": eps, "percentiles": list(percentiles), "ppl_unfiltered": float("nan")}
    lo, hi = np.percentile(v, percentiles[0]), np.percentile(v, percentiles[1])
    kept = v[(v >= lo) & (v <= hi)]
    stderr = float(kept.std(ddof=1) / math.sqrt(len(kept))) if len(kept) > 1 else float("nan")
    return {"ppl": float(kept.mean()), "ppl_stderr": stderr, "num_pairs": int(num), "num_kept": int(len(kept)),
            "num_nonfinite": int((~finite).sum()), "eps": eps, "percentiles": list(percentiles),
            "ppl_unfiltered": float(v.mean())}


def float64_copy(net: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode float64 copy of a network (for the finite differences of PPL)."""
    return copy.deepcopy(net).double().eval().requires_grad_(False)


@torch.no_grad()
def heun_sample_float64(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                        sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic Heun sampler (`gsd.sampling.samplers.heun_sample`'s steps), with the
    denoiser evaluated in float64 (give it a float64 network, e.g. `float64_copy`)."""

    return ode_sample(denoiser, latents, class_labels, num_steps=num_steps, sigma_min=sigma_min,
                      sigma_max=sigma_max, rho=rho, heun=True, eval_dtype=torch.float64)
