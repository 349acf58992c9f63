"""EDM samplers (gsd.sampling.samplers), checked against closed forms and the exact GMM denoiser."""

import math

import numpy as np
import pytest
import torch

from gsd.data import GaussianMixture, GMMDenoiser
from gsd.sampling.samplers import (churn_sample, edm_sigma_steps, euler_sample, heun_nfe, heun_sample,
                          latents_for_seeds)


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()))


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((x.dtype, sigma.dtype, tuple(sigma.shape), x.shape[0], class_labels))
        return self.inner(x, sigma, class_labels)


def gaussian_denoiser(s):
    """Exact denoiser of N(0, s^2 I) data."""
    return lambda x, sigma, labels=None: x * (s * s / (s * s + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2))


def test_sigma_steps():
    for n, smin, smax, rho in [(18, 0.002, 80.0, 7.0), (5, 0.01, 10.0, 3.0), (2, 0.002, 80.0, 7.0)]:
        t = edm_sigma_steps(n, smin, smax, rho)
        assert t.dtype == torch.float64 and t.shape == (n + 1,)
        assert t[0].item() == pytest.approx(smax, rel=1e-12)
        assert t[n - 1].item() == pytest.approx(smin, rel=1e-12)
        assert t[n].item() == 0.0
        assert (t[1:] < t[:-1]).all()
        i = np.arange(n)
        ref = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        np.testing.assert_allclose(t[:-1].numpy(), ref, rtol=1e-12)


def test_nfe_counts_and_call_convention():
    mix = GaussianMixture(torch.randn(3, 2), None, 0.1)
    labels = torch.tensor([1, 0, 2, 1])
    for sampler, steps, expected in [(heun_sample, 18, 35), (heun_sample, 5, 9), (euler_sample, 18, 18),
                                     (churn_sample, 18, 35)]:
        den = Counting(GMMDenoiser(mix))
        out = sampler(den, torch.randn(4, 2), labels, num_steps=steps)
        assert len(den.calls) == expected
        assert out.shape == (4, 2) and out.dtype == torch.float32
        for x_dtype, s_dtype, s_shape, n, lab in den.calls:
            assert x_dtype == torch.float32 and s_dtype == torch.float32 and s_shape == (4,) and n == 4
            assert lab is labels
    assert heun_nfe(18) == 35 and heun_nfe(1) == 1


def test_samplers_run_without_grad():
    seen = []

    def den(x, sigma, labels=None):
        seen.append(torch.is_grad_enabled())
        return x * 0

    heun_sample(den, torch.randn(2, 3), num_steps=3)
    assert seen and not any(seen)


def test_heun_integrates_the_gaussian_ode():
    """For N(0, s^2) data the probability-flow ODE maps x(T) to x(T) sqrt(s^2/(s^2+T^2)).

    Heun's error must shrink ~4x per halving of the step (2nd order), Euler's ~2x.
    """
    s = 0.5
    lat = torch.randn(64, 1, 4, 4)
    exact = lat.double() * 80.0 * math.sqrt(s * s / (s * s + 80.0 ** 2))

    def err(sampler, steps):
        out = sampler(gaussian_denoiser(s), lat, num_steps=steps).double()
        return ((out - exact).norm() / exact.norm()).item()

    h18, h36, h72 = err(heun_sample, 18), err(heun_sample, 36), err(heun_sample, 72)
    assert h18 < 0.08
    assert 3.0 < h18 / h36 < 6.0 and 3.0 < h36 / h72 < 6.0
    e18, e36 = err(euler_sample, 18), err(euler_sample, 36)
    assert e18 > h18 and 1.7 < e18 / e36 < 2.3


def test_heun_on_exact_gmm_recovers_the_mixture():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3], dtype=torch.float64)
    angles = torch.arange(5, dtype=torch.float64) * (2 * math.pi / 5) + torch.rand((), generator=gen).item()
    means = 0.8 * torch.stack([angles.cos(), angles.sin()], 1)
    std = 0.04
    mix = GaussianMixture(means, weights, std)
    n = 2000
    lat = torch.randn(n, 2, generator=gen)
    x = heun_sample(GMMDenoiser(mix), lat).double()
    d = torch.cdist(x, means)
    nearest = d.argmin(1)
    frac = torch.bincount(nearest, minlength=5).double() / n
    sd = torch.sqrt(weights * (1 - weights) / n)
    assert ((frac - weights).abs() < 4.5 * sd + 1e-3).all(), (seed, frac.tolist())
    # distance to the nearest mode ~ |N(0, std^2 I_2)| = std sqrt(pi/2)
    mean_dist = d.min(1).values.mean().item()
    assert abs(mean_dist - std * math.sqrt(math.pi / 2)) < 0.2 * std * math.sqrt(math.pi / 2), (seed, mean_dist)
    # the deterministic sampler with 18 steps is close to a very fine solution of the same ODE
    fine = heun_sample(GMMDenoiser(mix), lat[:200], num_steps=150).double()
    assert (fine - x[:200]).norm(dim=1).median().item() < 0.02, seed


def test_churn_sampler():
    mix = GaussianMixture(torch.tensor([[0.6, 0.0], [-0.6, 0.0]]), [0.3, 0.7], 0.05)
    den = GMMDenoiser(mix)
    lat = torch.randn(6, 2)
    # no churn = Heun
    torch.testing.assert_close(churn_sample(den, lat, S_churn=0), heun_sample(den, lat), rtol=0, atol=0)
    seeds = [int(s) for s in torch.randint(0, 10**6, (6,))]
    a = churn_sample(den, latents_for_seeds(seeds, (2,)), seeds=seeds)
    sub = [seeds[4], seeds[1]]
    b = churn_sample(den, latents_for_seeds(sub, (2,)), seeds=sub)
    torch.testing.assert_close(b, a[[4, 1]], rtol=0, atol=0)  # per-seed noise: batch does not matter
    assert (a - heun_sample(den, latents_for_seeds(seeds, (2,)))).abs().max() > 1e-4
    # right mode weights
    x = churn_sample(den, torch.randn(1000, 2), generator=torch.Generator().manual_seed(fresh_seed())).double()
    frac_right = (x[:, 0] > 0).double().mean().item()
    assert abs(frac_right - 0.3) < 0.065
    assert (torch.cdist(x, mix.means).min(1).values < 0.25).double().mean() > 0.99


def test_latents_for_seeds():
    seeds = [fresh_seed() for _ in range(5)]
    z = latents_for_seeds(seeds, (3, 4, 4))
    assert z.shape == (5, 3, 4, 4) and z.dtype == torch.float32
    z2 = latents_for_seeds([seeds[3], 12345, seeds[0]], (3, 4, 4))
    assert torch.equal(z2[0], z[3]) and torch.equal(z2[2], z[0])
    assert not torch.equal(z[0], z[1])
    big = latents_for_seeds(range(400), (50,))
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02
    assert latents_for_seeds([1, 2], (2,), dtype=torch.float64).dtype == torch.float64
