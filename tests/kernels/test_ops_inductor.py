"""The public ops under torch.compile with the default inductor backend, as users run them.

Every op on every backend must give the eager value and gradients when compiled, in float32
and float64, and a bad call must end in the same one-line error as in eager mode. The eager
values themselves are checked against the float64 oracle in test_ops.py; here the float64
oracle checks the compiled gradients too, so that "compiled == eager" cannot hide a shared
error.

pytorch 2.14's inductor differentiates a function that reads `diagonal(a @ b.T)` wrongly (relative
error ~1 in the gradients; the minimal reproduction is in docs/design.md): the reference backend's
distances once took their squared norms that way.
"""

import pytest
import torch

import gsd_kernels

import oracles
from test_ops import CPU_BACKENDS, rel_err

TOL = {torch.float32: 2e-4, torch.float64: 1e-9}

# each case: (name, function of (x, z, y_real, y_fake, sigma) and the backend)
CASES = [
    ("iso default", lambda t, b: gsd_kernels.isometry_loss(t[0], t[1], backend=b)),
    ("iso scale 0.7", lambda t, b: gsd_kernels.isometry_loss(t[0], t[1], scale=0.7, backend=b)),
    ("iso groups 4 local", lambda t, b: gsd_kernels.isometry_loss(t[0], t[1], groups=4, weighting="local",
                                                                  backend=b)),
    ("iso local bandwidth", lambda t, b: gsd_kernels.isometry_loss(t[0], t[1], weighting="local",
                                                                   bandwidth=1.3, backend=b)),
    ("sid", lambda t, b: gsd_kernels.sid_generator_loss(t[0], t[2], t[3], alpha=1.2, backend=b)),
    ("fake score", lambda t, b: gsd_kernels.fake_score_loss(t[3], t[0], t[4], backend=b)),
]

ORACLES = {  # float64, written out independently of gsd_kernels
    "iso default": lambda t: oracles.isometry(t[0], t[1]),
    "iso scale 0.7": lambda t: oracles.isometry(t[0], t[1], scale=0.7),
    "iso groups 4 local": lambda t: oracles.isometry(t[0], t[1], weighting="local", groups=4),
    "iso local bandwidth": lambda t: oracles.isometry(t[0], t[1], weighting="local", bandwidth=1.3),
    "sid": lambda t: oracles.sid_generator(t[0], t[2], t[3], alpha=1.2),
    "fake score": lambda t: oracles.fake_score(t[3], t[0], t[4]),
}


def _inputs(dtype, n=12):
    x = torch.randn(n, 13, dtype=dtype)
    z = torch.randn(n, 3, dtype=dtype)
    y_real = x + 0.3 * torch.randn(n, 13, dtype=dtype)
    y_fake = x + 0.3 * torch.randn(n, 13, dtype=dtype)
    sigma = (torch.rand(n, dtype=torch.float64) + 0.2).to(dtype)
    return x, z, y_real, y_fake, sigma


def _value_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_op_compiled_with_inductor_matches_eager_and_the_oracle(backend, dtype):
    """One compiled function per op, as a user compiles a loss: inductor fuses a graph of
    several losses differently, and such a graph hid the reference backend's wrong gradients."""
    tensors = _inputs(dtype)
    tol = TOL[dtype]
    for name, case in CASES:
        torch._dynamo.reset()

        def op(t):
            return case(t, backend)

        ev, eg = _value_and_grads(op, tensors)
        cv, cg = _value_and_grads(torch.compile(op, fullgraph=True), tensors)
        ov, og = _value_and_grads(ORACLES[name], [t.double() for t in tensors])
        assert rel_err(cv, ev) < tol, (name, float(cv), float(ev))
        assert rel_err(cv, ov) < tol, (name, float(cv), float(ov))
        for i, (c, e, o) in enumerate(zip(cg, eg, og)):
            if float(o.norm()) == 0:
                assert float(c.norm()) == 0 and float(e.norm()) == 0, (name, i)
                continue
            assert rel_err(c, e) < tol, (name, "input", i, rel_err(c, e))
            assert rel_err(c, o) < tol, (name, "input", i, rel_err(c, o))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_calls_under_fullgraph_compile_give_the_eager_one_line_error(backend):
    x, z, y_real, y_fake, sigma = _inputs(torch.float32, n=9)
    calls = [
        (lambda x, z, s: gsd_kernels.isometry_loss(x, z, groups=4, backend=backend), "groups = 4 must divide"),
        (lambda x, z, s: gsd_kernels.isometry_loss(x, z, weighting="gauss", backend=backend), "weighting"),
        (lambda x, z, s: gsd_kernels.isometry_loss(x[:1], z[:1], backend=backend), "at least 2 samples"),
        (lambda x, z, s: gsd_kernels.sid_generator_loss(x, x, z, backend=backend), "same shape"),
        (lambda x, z, s: gsd_kernels.fake_score_loss(x, x, -s, backend=backend), "sigma must be finite and > 0"),
    ]
    for fn, fragment in calls:
        torch._dynamo.reset()
        with pytest.raises(ValueError) as info:
            torch.compile(fn, fullgraph=True)(x, z, sigma)
        message = str(info.value)
        assert fragment in message and "\n" not in message, message


def test_a_compiled_call_that_fails_once_still_runs_good_input():
    """The raising graph is specialised on the bad input: a good call afterwards is computed."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x, z: gsd_kernels.isometry_loss(x, z, groups=4, backend="reference"),
                       fullgraph=True)
    x, z = torch.randn(9, 5), torch.randn(9, 2)
    with pytest.raises(ValueError, match="must divide"):
        fn(x, z)
    x8, z8 = torch.randn(8, 5), torch.randn(8, 2)
    assert rel_err(fn(x8, z8), oracles.isometry(x8.double(), z8.double(), groups=4)) < 1e-4

