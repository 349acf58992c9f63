"""Bad input, backend selection and torch.compile for the public ops (docs/definitions.md §2, §2.4)."""


import pytest
import torch

import gsd_kernels
from gsd_kernels import backends

from test_ops import ALL, rel_err


def _x(n=6, d=4, **kw):
    return torch.randn(n, d, **kw)


# ------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call,exc,fragment", [
    (lambda: gsd_kernels.isometry_loss(_x(1), _x(1)), ValueError, "at least 2 samples"),
    (lambda: gsd_kernels.isometry_loss(_x(5), _x(6)), ValueError, "same first dimension"),
    (lambda: gsd_kernels.isometry_loss(torch.ones(5, 3, dtype=torch.int64), _x(5)), TypeError, "floating dtype"),
    (lambda: gsd_kernels.isometry_loss(_x(5).numpy(), _x(5)), TypeError, "torch.Tensor"),
    (lambda: gsd_kernels.isometry_loss(_x(), _x(), weighting="gaussian"), ValueError, "weighting"),
    (lambda: gsd_kernels.isometry_loss(_x(), _x(), weighting="local", bandwidth=-1.0), ValueError, "bandwidth"),
    (lambda: gsd_kernels.isometry_loss(_x(), _x(), weighting="local", bandwidth=float("nan")), ValueError, "finite"),
    (lambda: gsd_kernels.isometry_loss(_x(), _x(), bandwidth=1.0), ValueError, "only applies"),
    (lambda: gsd_kernels.isometry_loss(_x(), _x(), scale="best"), ValueError, "scale"),
    (lambda: gsd_kernels.isometry_loss(_x(), _x(), scale=0.0), ValueError, "scale"),
    (lambda: gsd_kernels.isometry_loss(_x(), _x(), scale=True), ValueError, "scale"),
    (lambda: gsd_kernels.isometry_loss(_x(), _x(), backend="fastest"), ValueError, "unknown backend"),
    (lambda: gsd_kernels.isometry_loss(torch.randn(4, 0), _x(4)), ValueError, "no elements"),
    (lambda: gsd_kernels.sid_generator_loss(_x(), _x(), _x(6, 5)), ValueError, "same shape"),
    (lambda: gsd_kernels.sid_generator_loss(_x(), _x(), _x(), alpha=float("inf")), ValueError, "alpha"),
    (lambda: gsd_kernels.sid_generator_loss(_x(), _x(), torch.ones(6, 4, dtype=torch.int32)), TypeError, "y_fake"),
    (lambda: gsd_kernels.sid_generator_loss(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)),
     ValueError, "0-dim"),
    (lambda: gsd_kernels.fake_score_loss(_x(), _x(), torch.rand(5)), ValueError, "sigma must have shape"),
    (lambda: gsd_kernels.fake_score_loss(_x(), _x(), torch.rand(6, 2)), ValueError, "sigma must have shape"),
    (lambda: gsd_kernels.fake_score_loss(_x(), _x(), torch.rand(6), sigma_data=0), ValueError, "sigma_data"),
    (lambda: gsd_kernels.fake_score_loss(_x(), _x(), 0.5), TypeError, "sigma"),
    (lambda: gsd_kernels.fake_score_loss(_x(), _x(6, 3), torch.rand(6)), ValueError, "same shape"),
])
def test_bad_input_is_rejected_with_a_clear_error(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


def test_mixed_devices_are_rejected():
    meta = torch.randn(6, 4, device="meta")
    with pytest.raises(ValueError, match="one device"):
        gsd_kernels.isometry_loss(_x(), meta)
    with pytest.raises(ValueError, match="one device"):
        gsd_kernels.fake_score_loss(_x(), _x(), torch.rand(6, device="meta"))


def test_unavailable_backend_says_why_and_which_are():
    with pytest.raises(ValueError) as info:
        gsd_kernels.isometry_loss(_x(), _x(), backend="cuda")
    message = str(info.value)
    assert "CUDA tensors only" in message and "available" in message and "reference" in message


def test_errors_come_before_any_kernel(monkeypatch):
    """A bad call must not reach a primitive (nothing runs on bad input)."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")
    monkeypatch.setattr(backends, "primitives", boom)
    with pytest.raises(ValueError):
        gsd_kernels.isometry_loss(_x(1), _x(1), backend="auto")
    with pytest.raises(ValueError):
        gsd_kernels.sid_generator_loss(_x(), _x(), _x(6, 3), backend="auto")


def test_available_backends_lists_reference_and_is_ordered():
    names = gsd_kernels.available_backends("cpu")
    assert "reference" in names
    assert set(names) <= set(gsd_kernels.BACKENDS)
    if "cpu" in names:
        assert names.index("cpu") < names.index("reference")
    assert gsd_kernels.available_backends(torch.device("cpu")) == names


def test_auto_never_picks_the_triton_interpreter():
    chosen = backends.resolve("auto", torch.device("cpu"))
    assert chosen in ("cpu", "reference")
    if "cpu" in gsd_kernels.available_backends("cpu"):
        assert chosen == "cpu"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = backends.availability("triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason


# ------------------------------------------------------------------- torch.compile

COMPILE_PARAMS = [(d, b) for d, b in ALL if not (d == "cpu" and b == "triton")]


@pytest.mark.parametrize("device,backend", COMPILE_PARAMS)
def test_ops_work_under_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    x = torch.randn(17, 3, 4, device=device, requires_grad=True)
    z = torch.randn(17, 5, device=device, requires_grad=True)
    y_real = torch.randn(17, 3, 4, device=device, requires_grad=True)
    y_fake = torch.randn(17, 3, 4, device=device, requires_grad=True)
    sigma = torch.rand(17, device=device) + 0.1

    def total(x, z, y_real, y_fake, sigma):
        return (gsd_kernels.isometry_loss(x, z, weighting="local", backend=backend)
                + gsd_kernels.sid_generator_loss(x, y_real, y_fake, backend=backend)
                + gsd_kernels.fake_score_loss(y_fake, x, sigma, backend=backend))

    compiled = torch.compile(total, fullgraph=True)  # inductor, as users run it
    eager_val = total(x, z, y_real, y_fake, sigma)
    eager_grads = torch.autograd.grad(eager_val, (x, z, y_real, y_fake))
    val = compiled(x, z, y_real, y_fake, sigma)
    grads = torch.autograd.grad(val, (x, z, y_real, y_fake))
    assert rel_err(val, eager_val) < 1e-6
    for g, eg in zip(grads, eager_grads):
        assert rel_err(g, eg) < 1e-5


def test_custom_ops_pass_torch_library_opcheck():
    """The registered ops' schemas, fake impls and autograd agree (torch.library.opcheck)."""
    fused = [b for b in gsd_kernels.available_backends("cpu") if b == "cpu"]
    if not fused:
        pytest.fail("the cpu backend is not built: gsd_kernels._C is missing")
    x, z = torch.randn(9, 6, requires_grad=True), torch.randn(9, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.gsd.isometry_fwd.default, (x, z, True, 0.0, -1.0, "cpu"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    a, b, c = (torch.randn(5, 7, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.gsd.sid_generator_fwd.default, (a, b, c, 1.2, "cpu"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    sigma = (torch.rand(5) + 0.1).requires_grad_(True)
    torch.library.opcheck(torch.ops.gsd.fake_score_fwd.default, (a, b, sigma, 0.5, "cpu"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
