"""S7: an input that does not require grad gets no gradient work.

The isometry backward is told `need_x` / `need_z` (from autograd's needs_input_grad) and the
fake-score backward `need_x`; the primitive returns None for that gradient and skips its
apply GEMM / output. Spied on the primitive itself, and values checked against the run
where both gradients are computed.
"""

import pytest
import torch

import gsd_kernels
from gsd_kernels import backends

FUSED = [b for b in gsd_kernels.available_backends("cpu") if b != "reference"]


class Spy:
    """Wraps one primitive of a backend's primitive object; records kwargs and results."""

    def __init__(self, monkeypatch, prims, name):
        self.calls = []
        original = getattr(prims, name)

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls.append((kwargs, out))
            return out

        monkeypatch.setattr(prims, name, wrapper)


def _prims(backend):
    return backends.primitives(backend, "cpu")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kw", [dict(), dict(weighting="local"), dict(scale=0.8)])
def test_isometry_skips_the_latent_gradient(monkeypatch, backend, kw):
    x0 = torch.randn(41, 17, dtype=torch.float64)
    z0 = torch.randn(41, 5, dtype=torch.float64)
    x, z = x0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    gsd_kernels.isometry_loss(x, z, backend=backend, **kw).backward()
    want_gx = x.grad.clone()

    spy = Spy(monkeypatch, _prims(backend), "iso_backward_rows")
    x = x0.clone().requires_grad_(True)
    z = z0.clone()  # a latent without grad, as in gsd.distill
    gsd_kernels.isometry_loss(x, z, backend=backend, **kw).backward()
    assert len(spy.calls) == 1
    kwargs, (gx, gz) = spy.calls[0]
    assert kwargs["need_x"] is True and kwargs["need_z"] is False
    assert gz is None  # not computed, not allocated
    assert z.grad is None
    assert torch.allclose(x.grad, want_gx, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", FUSED)
def test_isometry_skips_the_sample_gradient(monkeypatch, backend):
    x0 = torch.randn(30, 9, dtype=torch.float64)
    z0 = torch.randn(30, 4, dtype=torch.float64)
    x, z = x0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    gsd_kernels.isometry_loss(x, z, backend=backend).backward()
    want_gz = z.grad.clone()

    spy = Spy(monkeypatch, _prims(backend), "iso_backward_rows")
    z = z0.clone().requires_grad_(True)
    gsd_kernels.isometry_loss(x0, z, backend=backend).backward()
    kwargs, (gx, gz) = spy.calls[0]
    assert kwargs["need_x"] is False and kwargs["need_z"] is True and gx is None
    assert torch.allclose(z.grad, want_gz, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", FUSED)
def test_fake_score_skips_the_sample_gradient(monkeypatch, backend):
    y0 = torch.randn(11, 2, 7, dtype=torch.float64)
    x0 = torch.randn(11, 2, 7, dtype=torch.float64)
    sigma = torch.rand(11, dtype=torch.float64) + 0.2
    y, x = y0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    gsd_kernels.fake_score_loss(y, x, sigma, backend=backend).backward()
    want_gy, want_gx = y.grad.clone(), x.grad.clone()
    assert torch.allclose(want_gx, -want_gy)

    spy = Spy(monkeypatch, _prims(backend), "fake_backward")
    y = y0.clone().requires_grad_(True)
    gsd_kernels.fake_score_loss(y, x0, sigma, backend=backend).backward()  # x detached
    kwargs, (g_fake, g_x) = spy.calls[0]
    assert kwargs["need_x"] is False and g_x is None
    assert torch.equal(y.grad, want_gy)


def test_native_primitive_need_flags_give_the_same_rows():
    """Direct primitive call: each gradient alone equals the one computed with both."""
    native = pytest.importorskip("gsd_kernels.backends.native", exc_type=ImportError)
    P = native.CPU
    n = 133  # a partial last tile
    x = torch.randn(n, 70, dtype=torch.float32)
    z = torch.randn(n, 20, dtype=torch.float32)
    x, z = x - x.mean(0), z - z.mean(0)
    xn2, zn2 = (x * x).sum(1), (z * z).sum(1)
    h = torch.full((), 0.01, dtype=torch.float64)
    coef = torch.tensor([0.7, -1.3, 0.4, -0.9], dtype=torch.float64)
    for ranges in [(0, n, 0, n), (20, 110, 0, n)]:
        both = P.iso_backward_rows(x, z, xn2, zn2, *ranges, h, coef, need_x=True, need_z=True)
        only_x = P.iso_backward_rows(x, z, xn2, zn2, *ranges, h, coef, need_x=True, need_z=False)
        only_z = P.iso_backward_rows(x, z, xn2, zn2, *ranges, h, coef, need_x=False, need_z=True)
        none = P.iso_backward_rows(x, z, xn2, zn2, *ranges, h, coef, need_x=False, need_z=False)
        assert only_x[1] is None and only_z[0] is None and none == (None, None)
        assert torch.equal(only_x[0], both[0]) and torch.equal(only_z[1], both[1])
