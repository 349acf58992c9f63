"""D10 / D9: edge values of the ops (reliability review).

- NaN or inf in the isometry inputs gives a NaN loss, never a finite plausible value
  (before: 1.0 on every backend for NaN, 0.2025 on cpu for one inf entry);
- fp32 inputs of magnitude 1e20 / 1e30 / 1e-22 / 1e-30: the optimal-scale loss is the
  scale-invariant value of the unscaled data (exact power-of-two rescaling, docs/design.md)
  and the gradients scale as 1/s; the SiD loss scales as s (before: 1.0, NaN or 1.6% off);
- fake_score_loss rejects sigma <= 0 / non-finite (CPU tensors), and scale / bandwidth /
  sigma_data = 1e200 are a ValueError at validation, not an OverflowError or inf.

Every case on every backend available for CPU tensors (reference, cpu, and Triton under
its interpreter).
"""

import math

import pytest
import torch

import gsd_kernels

import oracles

BACKENDS = gsd_kernels.available_backends("cpu")


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ non-finite inputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x entry", "z row"])
@pytest.mark.parametrize("kw", [dict(), dict(weighting="local"), dict(scale=0.9)])
def test_nonfinite_input_gives_nan_loss(backend, bad, where, kw):
    x = torch.randn(29, 12)
    z = torch.randn(29, 4)
    if where == "x entry":
        x[5, 3] = bad
    else:
        z[11] = bad
    loss = gsd_kernels.isometry_loss(x, z, backend=backend, **kw)
    assert math.isnan(float(loss)), f"{backend}: {float(loss)} for a {bad} input"


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_batch_is_still_one(backend):
    """NaN is not 'degenerate': the exact-zero case keeps its defined value 1."""
    x = torch.full((8, 5), 3.0)
    z = torch.randn(8, 2)
    assert float(gsd_kernels.isometry_loss(x, z, backend=backend)) == 1.0


# ------------------------------------------------------------------ magnitudes
MAGNITUDES = [1e20, 1e30, 1e-22, 1e-30]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sx", MAGNITUDES)
@pytest.mark.parametrize("weighting", ["global", "local"])
def test_isometry_is_scale_invariant_in_fp32(backend, sx, weighting):
    n = 45
    base_x = torch.randn(n, 24, dtype=torch.float64)
    base_z = torch.randn(n, 6, dtype=torch.float64)
    sz = 1e-3 if sx > 1 else 1e3  # x and z scaled differently
    want, (wgx, wgz) = _grads(lambda a, b: oracles.isometry(a, b, weighting), base_x, base_z)
    x = (base_x * sx).float()
    z = (base_z * sz).float()
    got, (gx, gz) = _grads(lambda a, b: gsd_kernels.isometry_loss(a, b, weighting=weighting, backend=backend),
                           x, z)
    assert abs(float(got) - float(want)) <= 1e-4 * abs(float(want)), (float(got), float(want))
    # d L(s x) / d(s x) = (d L / d x) / s
    assert rel(gx * sx, wgx) <= 1e-4 and rel(gz * sz, wgz) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s", [1e15, 1e-15])
def test_isometry_fixed_scale_and_bandwidth_carry_the_factors(backend, s):
    """Fixed scale c and a fixed bandwidth h are in the units of the data: scaling x and z
    by s (c unchanged, h by s) scales the loss by s^2 and the gradients by s."""
    n = 33
    base_x = torch.randn(n, 10, dtype=torch.float64)
    base_z = torch.randn(n, 3, dtype=torch.float64)
    want, (wgx, wgz) = _grads(lambda a, b: oracles.isometry(a, b, "local", 1.3, 0.8), base_x, base_z)
    got, (gx, gz) = _grads(lambda a, b: gsd_kernels.isometry_loss(
        a, b, weighting="local", bandwidth=1.3 * s, scale=0.8, backend=backend), (base_x * s).float(),
        (base_z * s).float())
    assert abs(float(got) / (s * s) - float(want)) <= 1e-4 * abs(float(want))
    assert rel(gx / s, wgx) <= 1e-4 and rel(gz / s, wgz) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s", [1e20, 1e30])
def test_sid_loss_of_large_fp32_inputs(backend, s):
    n = 6
    x_g, y_real, y_fake = (torch.randn(n, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    want = oracles.sid_generator(x_g, y_real, y_fake)  # homogeneous of degree 1 (no floor hit)
    got, grads = _grads(lambda a, b, c: gsd_kernels.sid_generator_loss(a, b, c, backend=backend),
                        *((t * s).float() for t in (x_g, y_real, y_fake)))
    assert math.isfinite(float(got))
    assert abs(float(got) / s - float(want)) <= 1e-4 * abs(float(want)), (float(got), float(want) * s)
    assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma_value", [0.0, -0.5, float("nan"), float("inf")])
def test_fake_score_rejects_bad_sigma(backend, sigma_value):
    y, x = torch.randn(5, 7), torch.randn(5, 7)
    sigma = torch.rand(5) + 0.1
    sigma[3] = sigma_value
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        gsd_kernels.fake_score_loss(y, x, sigma, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [1e200, 1e-200])
def test_huge_or_tiny_scalars_are_value_errors(backend, value):
    x, z = torch.randn(6, 4), torch.randn(6, 2)
    with pytest.raises(ValueError, match="scale must be between"):
        gsd_kernels.isometry_loss(x, z, scale=value, backend=backend)
    with pytest.raises(ValueError, match="bandwidth must be between"):
        gsd_kernels.isometry_loss(x, z, weighting="local", bandwidth=value, backend=backend)
    with pytest.raises(ValueError, match="sigma_data must be between"):
        gsd_kernels.fake_score_loss(x, x, torch.ones(6), sigma_data=value, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_valid_scalars_give_finite_correct_values(backend):
    """Just inside the bounds, in float64: finite and equal to the oracle."""
    x = torch.randn(12, 5, dtype=torch.float64)
    z = torch.randn(12, 3, dtype=torch.float64)
    got = gsd_kernels.isometry_loss(x, z, scale=1e100, backend=backend)
    want = oracles.isometry(x, z, scale=1e100)
    assert math.isfinite(float(got)) and abs(float(got) / float(want) - 1) < 1e-9
    got = gsd_kernels.isometry_loss(x, z, weighting="local", bandwidth=1e100, backend=backend)
    want = oracles.isometry(x, z)  # weights exp(-dz^2 / 2e200) = 1
    assert abs(float(got) / float(want) - 1) < 1e-9
    y = torch.randn(4, 6, dtype=torch.float64)
    sigma = torch.rand(4, dtype=torch.float64) + 0.5
    got = gsd_kernels.fake_score_loss(y, x[:4, :1].expand(4, 6).contiguous(), sigma, sigma_data=1e150,
                                      backend=backend)
    want = oracles.fake_score(y, x[:4, :1].expand(4, 6), sigma, 1.0)  # 1/sd^2 -> 0 either way
    lam_ratio = 1.0  # lambda = 1/sigma^2 + 1/sd^2: the second term is 1 for sd = 1 ...
    want_inf_sd = want - lam_ratio * ((y - x[:4, :1]) ** 2).sum() / 4  # ... and 0 for sd = 1e150
    assert abs(float(got) / float(want_inf_sd) - 1) < 1e-9
