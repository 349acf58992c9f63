"""C1: no host synchronisation inside the ops (docs/design.md, "No host synchronisation").

On a CUDA device: forward + backward of every op on every fused CUDA backend under
`torch.cuda.set_sync_debug_mode("error")`, which raises on any synchronising call
(`.item()`, `.tolist()`, `float(t)`, a blocking H2D copy from a Python list, ...), and once
inside a CUDA-graph capture.

On CPU (what CI runs): the same calls on the CPU backends with `Tensor.item`, `.tolist`,
`__float__`, `__int__` and `__bool__` made to raise, so that a reintroduced host read in
ops.py / distributed.py / native.py fails here too.
"""

import contextlib

import pytest
import torch

import gsd_kernels
from gsd_kernels.backends import _PREFERENCE


def _ops(device, backend, dtype=torch.float32):
    """(name, thunk) for fwd+bwd of every op and option family; inputs made beforehand."""
    n = 37
    x = torch.randn(n, 3, 5, device=device, dtype=dtype, requires_grad=True)
    z = torch.randn(n, 4, device=device, dtype=dtype, requires_grad=True)
    z_nograd = torch.randn(n, 4, device=device, dtype=dtype)
    a, b, c = (torch.randn(n, 2, 6, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    sigma = (torch.rand(n, device=device, dtype=dtype) + 0.1).requires_grad_(True)
    x_det = torch.randn(n, 2, 6, device=device, dtype=dtype)

    def iso(**kw):
        def run():
            loss = gsd_kernels.isometry_loss(x, z, backend=backend, **kw)
            loss.backward()
            return loss
        return run

    def iso_latent_without_grad():
        loss = gsd_kernels.isometry_loss(x, z_nograd, backend=backend)
        loss.backward()
        return loss

    def sid():
        loss = gsd_kernels.sid_generator_loss(a, b, c, backend=backend)
        loss.backward()
        return loss

    def fake():
        loss = gsd_kernels.fake_score_loss(a, x_det, sigma, backend=backend)
        loss.backward()
        return loss

    return [
        ("isometry optimal", iso()),
        ("isometry local", iso(weighting="local")),
        ("isometry local bandwidth", iso(weighting="local", bandwidth=1.3)),
        ("isometry fixed scale", iso(scale=0.7)),
        ("isometry z without grad", iso_latent_without_grad),
        ("sid", sid),
        ("fake score", fake),
    ]


# ---------------------------------------------------------------------------- CUDA
CUDA_FUSED = ([b for b in gsd_kernels.available_backends("cuda") if b != "reference"]
              if torch.cuda.is_available() else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_some_fused_cuda_backend_is_available():
    assert CUDA_FUSED, "a CUDA device but no fused CUDA backend: " + \
        str({b: gsd_kernels.backends.availability(b, "cuda")[1] for b in ("cuda", "triton")})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", CUDA_FUSED or ["none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_host_sync_on_cuda(backend, dtype):
    if backend == "none":
        pytest.skip("no fused CUDA backend")
    cases = _ops("cuda", backend, dtype)
    for name, run in cases:  # warm-up: JIT compiles, allocator, cuBLAS handles
        run()
    torch.cuda.synchronize()
    for name, run in _ops("cuda", backend, dtype):
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        except RuntimeError as exc:
            raise AssertionError(f"{backend} {name}: host synchronisation inside the op: {exc}") from exc
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", CUDA_FUSED or ["none"])
def test_ops_capture_in_a_cuda_graph(backend):
    """The forward and backward replay from a CUDA graph and match an eager run."""
    if backend == "none":
        pytest.skip("no fused CUDA backend")
    x = torch.randn(70, 33, device="cuda", requires_grad=True)
    z = torch.randn(70, 9, device="cuda", requires_grad=True)

    def step():
        x.grad = z.grad = None
        loss = gsd_kernels.isometry_loss(x, z, weighting="local", backend=backend)
        gx, gz = torch.autograd.grad(loss, (x, z))
        return loss, gx, gz

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            want = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- CPU
CPU_FUSED = [b for b in gsd_kernels.available_backends("cpu") if b != "reference"]


@contextlib.contextmanager
def _host_reads_forbidden(monkeypatch, allow_sigma_check=False):
    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside an op (a host sync on a GPU)")
        return raiser

    with monkeypatch.context() as m:
        if allow_sigma_check:
            # The one deliberate value check, `sigma > 0`, runs for CPU tensors only
            # (validation.check_sigma_values; on CUDA the sync-debug test covers it).
            m.setattr(gsd_kernels.validation, "check_sigma_values", lambda sigma: None, raising=False)
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            m.setattr(torch.Tensor, name, forbid(name))
        yield


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_host_reads_in_the_ops(monkeypatch, backend, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    for name, run in _ops("cpu", backend, dtype):
        with _host_reads_forbidden(monkeypatch, allow_sigma_check=True):
            loss = run()
        assert torch.isfinite(loss), name


def test_the_guard_catches_a_host_read(monkeypatch):
    """The monkeypatch really trips on the calls it is meant to catch."""
    t = torch.ones(3)
    with _host_reads_forbidden(monkeypatch):
        for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: float(t.sum()), lambda: bool(t.any())):
            with pytest.raises(AssertionError, match="inside an op"):
                read()


def test_sigma_check_is_cpu_only():
    """The sigma check reads values, so it must skip device tensors (meta stands in for CUDA)."""
    gsd_kernels.validation.check_sigma_values(torch.full((3,), -1.0, device="meta"))
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        gsd_kernels.validation.check_sigma_values(torch.tensor([1.0, -1.0]))


def test_auto_prefers_triton_over_cuda_kernels_on_cuda():
    """The CUDA isometry kernels are the portable FP32 SIMT fallback (docs/design.md)."""
    order = _PREFERENCE["cuda"]
    assert order.index("triton") < order.index("cuda") < order.index("reference")
