"""EDM samplers (SPEC §3.2): deterministic Heun (the multi-step baseline), Euler, and
the stochastic "churn" sampler.

The time steps and the ODE state are float64 (as in EDM); the denoiser is evaluated on
float32 inputs as `denoiser(x, sigma, class_labels)` with sigma of shape (N,).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["edm_sigma_steps", "heun_sample", "euler_sample", "churn_sample", "heun_nfe",
           "latents_for_seeds", "SeedStreams"]


def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> torch.Tensor:
    """t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N, and t_N = 0.

    float64, shape (num_steps + 1,).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    frac = i / (num_steps - 1) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    t = (hi + frac * (lo - hi)) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of the Heun sampler: an Euler step + correction per step, none
    on the last (t_N = 0) -> 2 N - 1."""
    return 2 * num_steps - 1


def _seed_to_int(seed) -> int:
    return int(seed) % (2 ** 63)


def latents_for_seeds(seeds: Sequence[int], shape: Sequence[int], device="cpu",
                      dtype=torch.float32) -> torch.Tensor:
    """Standard normal latents (len(seeds), *shape), one CPU torch.Generator per seed.

    `shape` is the shape of ONE sample. Sample i depends only on seeds[i], not on the
    batch it is drawn in.
    """
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(seeds),) + shape, dtype=torch.float32)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(_seed_to_int(seed))
        out[i] = torch.randn(shape, generator=gen)
    return out.to(device=device, dtype=dtype)


class SeedStreams:
    """One random stream per sample (CPU generators), for per-sample noise in samplers.

    The streams are derived from the seeds but differ from `latents_for_seeds`' streams, so
    that the churn noise is independent of the latents.
    """

    def __init__(self, seeds: Sequence[int], salt: int = 0x5EED):
        self.generators = [torch.Generator().manual_seed((_seed_to_int(s) * 6364136223846793005 + salt)
                                                         % (2 ** 63)) for s in seeds]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} seeds for a batch of {x.shape[0]}")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64)
                             for g in self.generators])
        return noise.to(device=x.device, dtype=x.dtype)


def _evaluate(denoiser, x: torch.Tensor, sigma: float, class_labels) -> torch.Tensor:
    sig = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
    return denoiser(x.to(torch.float32), sig, class_labels).to(torch.float64)


def _check(latents: torch.Tensor, class_labels):
    if latents.ndim < 2:
        raise ValueError(f"latents must be (N, ...), got shape {tuple(latents.shape)}")
    if class_labels is not None and torch.as_tensor(class_labels).shape[0] != latents.shape[0]:
        raise ValueError("class_labels must have one row per latent")


@torch.no_grad()
def heun_sample(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler; latents ~ N(0, I) (scaled by t_0 here).

    Returns float32 samples of the latents' shape. 2*num_steps - 1 denoiser calls.
    """
    _check(latents, class_labels)
    t = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        d_cur = (x - _evaluate(denoiser, x, t_cur, class_labels)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - _evaluate(denoiser, x_next, t_next, class_labels)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(torch.float32)


@torch.no_grad()
def euler_sample(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """First-order (Euler) probability-flow ODE sampler on the same steps; num_steps calls."""
    _check(latents, class_labels)
    t = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        d_cur = (x - _evaluate(denoiser, x, t_cur, class_labels)) / t_cur
        x = x + (t_next - t_cur) * d_cur
    return x.to(torch.float32)


@torch.no_grad()
def churn_sample(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 S_churn: float = 40.0, S_min: float = 0.05, S_max: float = 50.0, S_noise: float = 1.003,
                 seeds: Sequence[int] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's stochastic sampler (Heun with noise injection for t in [S_min, S_max]).

    Noise: per-sample streams derived from `seeds` when given (a sample then does not
    depend on the batch), else `generator` (or the global RNG).
    """
    _check(latents, class_labels)
    if seeds is not None:
        streams = SeedStreams(seeds)
        randn_like = streams.randn_like
    else:
        def randn_like(x):
            return torch.randn(x.shape, generator=generator, dtype=x.dtype,
                               device=generator.device if generator is not None else x.device).to(x.device)
    t = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * randn_like(x)
        else:
            x_hat = x
        d_cur = (x_hat - _evaluate(denoiser, x_hat, t_hat, class_labels)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - _evaluate(denoiser, x_next, t_next, class_labels)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(torch.float32)
