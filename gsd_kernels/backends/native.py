"""The six primitives of docs/design.md on the compiled core `gsd_kernels._C`.

`CPU` runs C++/OpenMP kernels on CPU tensors, `CUDA` runs CUDA kernels on CUDA tensors.
The compiled code sees raw pointers, sizes, scalars, a dtype code and (CUDA) the current
stream; this module allocates every output and workspace with torch. Inputs are assumed
validated by the caller (contiguous, 2-D, one floating dtype fp32/fp64, one device); only
cheap invariants are asserted here.

Isometry primitives: besides the common contract (centred x, z and their squared norms),
these take optional column means `mean_x`, `mean_z` (vectors of x's dtype); then x, z may
be uncentred and `xn2`, `zn2` may be None. The CPU kernels centre while packing and sum
the norms there (`centres_in_kernel` is True: no centred copies are made); the CUDA
kernels take centred data, so for them this module centres in PyTorch first. With the
means, optional `scale_x`, `scale_z` (0-dim float64 tensors, powers of two) make the
primitives work on `(x - mean_x) * scale_x` and `(z - mean_z) * scale_z`.

Scalars that come from tensors (`inv_two_h2`, the coefficients, the SiD `scale`) are
passed to the kernels as device pointers: nothing here reads a device value on the host.
"""

from __future__ import annotations

import contextlib

import torch

from .. import extension

_C = extension.load()  # raises ExtensionUnavailable (an ImportError) with a one-line reason

__all__ = ["CPU", "CUDA", "is_available", "NativePrimitives"]

_DTYPE_CODE = {torch.float32: _C.FLOAT32, torch.float64: _C.FLOAT64}


def _code(t: torch.Tensor) -> int:
    code = _DTYPE_CODE.get(t.dtype)
    assert code is not None, f"native kernels take float32/float64, got {t.dtype}"
    return code


def _check(device_type: str, *ts: torch.Tensor) -> None:
    first = ts[0]
    for t in ts:
        assert t.device.type == device_type, f"expected {device_type} tensors, got {t.device}"
        assert t.device == first.device, "all tensors must be on one device"
        assert t.dtype == first.dtype, "all tensors must share one dtype"
        assert t.is_contiguous(), "native kernels need contiguous tensors"


def _f64_scalar(t, device, name: str) -> torch.Tensor:
    """A 0-dim float64 tensor on `device`, as the kernels read it through a pointer.

    Callers pass device tensors (the contract); a Python number is accepted for direct use
    of the primitives (tests) and turned into a tensor without a host<->device copy."""
    if not isinstance(t, torch.Tensor):
        return torch.full((), float(t), dtype=torch.float64, device=device)
    assert t.numel() == 1 and t.device == device, f"{name} must be a 0-dim tensor on {device}"
    return t.reshape(()).to(torch.float64).contiguous()


def _f64_vector(t, n: int, device, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):  # a sequence of numbers (tests, direct use)
        return torch.stack([torch.full((), float(v), dtype=torch.float64, device=device) for v in t])
    assert t.numel() == n and t.device == device, f"{name} must hold {n} values on {device}"
    return t.reshape(n).to(torch.float64).contiguous()


def is_available(device_type: str) -> tuple[bool, str]:
    """(available, reason-if-not) of the native kernels for a device type."""
    if device_type == "cpu":
        return True, ""
    if device_type == "cuda":
        if not _C.has_cuda():
            return False, "_C was built without CUDA (no nvcc at build time, or GSD_CUDA=off)"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available to torch"
        return True, ""
    return False, f"no native kernels for device type {device_type!r}"


class NativePrimitives:
    """The six primitives for one device type ('cpu' or 'cuda')."""

    def __init__(self, device_type: str):
        assert device_type in ("cpu", "cuda")
        self.device_type = device_type
        self.name = device_type
        # The isometry primitives accept mean_x / mean_z (and xn2 = zn2 = None) and centre
        # inside the kernels, without a centred copy of x and z.
        self.centres_in_kernel = device_type == "cpu"

    # ---------------------------------------------------------------- plumbing
    def _fn(self, name: str):
        fn = getattr(_C, f"{self.device_type}_{name}", None)
        if fn is None:
            raise RuntimeError(is_available(self.device_type)[1] or f"_C has no {name}")
        return fn

    def _guard(self, t: torch.Tensor):
        """Make the tensor's GPU the current device while a CUDA kernel is launched."""
        if self.device_type == "cuda":
            return torch.cuda.device(t.device)
        return contextlib.nullcontext()

    def _last(self, t: torch.Tensor):
        """Trailing argument: OpenMP thread count (CPU) or the current stream (CUDA)."""
        if self.device_type == "cpu":
            return max(1, torch.get_num_threads())
        return torch.cuda.current_stream(t.device).cuda_stream

    def _iso_prep(self, x, z, xn2, zn2, mean_x, mean_z, r0, r1, c0, c1, inv_two_h2,
                  scale_x=None, scale_z=None, groups=0):
        """Checks; returns the kernels' pointer arguments, the operand tensors behind them
        (the caller keeps them alive until the kernel has run) and the sizes."""
        assert (mean_x is None) == (mean_z is None), "give both column means or neither"
        assert (scale_x is None) == (scale_z is None), "give both scales or neither"
        assert scale_x is None or mean_x is not None, "scale_x / scale_z go with the means"
        if mean_x is not None and not self.centres_in_kernel:
            x, z = x - mean_x, z - mean_z
            if scale_x is not None:  # powers of two: exact
                x, z = x * scale_x.to(x.dtype), z * scale_z.to(z.dtype)
            x, z = x.contiguous(), z.contiguous()
            mean_x = mean_z = scale_x = scale_z = None
        if xn2 is None or zn2 is None:
            assert xn2 is None and zn2 is None, "give both squared norms or neither"
            if not self.centres_in_kernel:
                xn2, zn2 = (x * x).sum(1), (z * z).sum(1)
        _check(self.device_type, *(t for t in (x, z, xn2, zn2, mean_x, mean_z) if t is not None))
        inv_two_h2 = _f64_scalar(inv_two_h2, x.device, "inv_two_h2")
        if scale_x is not None:
            scale_x = _f64_scalar(scale_x, x.device, "scale_x")
            scale_z = _f64_scalar(scale_z, x.device, "scale_z")
        assert x.dim() == 2 and z.dim() == 2 and x.shape[0] == z.shape[0]
        N = x.shape[0]
        if xn2 is not None:
            assert xn2.numel() == N and zn2.numel() == N
        if mean_x is not None:
            assert mean_x.numel() == x.shape[1] and mean_z.numel() == z.shape[1]
        r0, r1, c0, c1 = int(r0), int(r1), int(c0), int(c1)
        assert 0 <= r0 <= r1 <= N and 0 <= c0 <= c1 <= N, "bad pair ranges"
        groups = int(groups)
        assert groups == 0 or groups >= 2, "groups: 0 (all pairs) or >= 2"
        operands = (x, z, xn2, zn2, mean_x, mean_z, scale_x, scale_z)
        ptrs = tuple(0 if t is None else t.data_ptr() for t in operands)
        sizes = (N, x.shape[1], z.shape[1], r0, r1, c0, c1, groups)
        return ptrs, operands + (inv_two_h2,), sizes, inv_two_h2.data_ptr()

    def _workspace(self, x, N, D, d, r0, r1, c0, c1, groups, backward, last):
        code = _code(x)
        if self.device_type == "cpu":
            nbytes = _C.cpu_iso_workspace_size(N, D, d, r0, r1, c0, c1, groups, code, backward, last)
        else:
            nbytes = _C.cuda_iso_workspace_size(N, D, d, r0, r1, c0, c1, groups, code, backward)
        return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=x.device), int(nbytes)

    # ---------------------------------------------------------------- isometry
    def iso_forward_sums(self, x, z, xn2, zn2, r0, r1, c0, c1, inv_two_h2, *, mean_x=None,
                         mean_z=None, scale_x=None, scale_z=None, groups=0):
        """groups = g >= 2: only the pairs with i // g == j // g (direct O(N g (D + d)) kernels)."""
        ptrs, operands, sizes, h_ptr = self._iso_prep(x, z, xn2, zn2, mean_x, mean_z, r0, r1,
                                                      c0, c1, inv_two_h2, scale_x, scale_z, groups)
        x = operands[0]
        out = torch.zeros(4, dtype=torch.float64, device=x.device)
        last = self._last(x)
        ws, nbytes = self._workspace(x, *sizes, False, last)
        with self._guard(x):
            self._fn("iso_forward_sums")(
                *ptrs, *sizes, h_ptr, out.data_ptr(), ws.data_ptr(), nbytes, _code(x), last)
        return out

    def iso_backward_rows(self, x, z, xn2, zn2, r0, r1, c0, c1, inv_two_h2, coef, *,
                          need_x: bool, need_z: bool, mean_x=None, mean_z=None, scale_x=None,
                          scale_z=None, groups=0):
        ptrs, operands, sizes, h_ptr = self._iso_prep(x, z, xn2, zn2, mean_x, mean_z, r0, r1,
                                                      c0, c1, inv_two_h2, scale_x, scale_z, groups)
        x = operands[0]
        coef = _f64_vector(coef, 4, x.device, "coef")
        _, D, d, r0, r1, _, _, _ = sizes
        need_x, need_z = bool(need_x), bool(need_z)
        gx = torch.empty((r1 - r0, D), dtype=x.dtype, device=x.device) if need_x else None
        gz = torch.empty((r1 - r0, d), dtype=x.dtype, device=x.device) if need_z else None
        if not (need_x or need_z):
            return gx, gz
        last = self._last(x)
        ws, nbytes = self._workspace(x, *sizes, True, last)
        with self._guard(x):
            self._fn("iso_backward_rows")(
                *ptrs, *sizes, h_ptr, coef.data_ptr(), need_x, need_z,
                0 if gx is None else gx.data_ptr(), 0 if gz is None else gz.data_ptr(),
                ws.data_ptr(), nbytes, _code(x), last)
        return gx, gz

    # ---------------------------------------------------------------- SiD
    def sid_forward(self, x_g, y_real, y_fake, alpha):
        _check(self.device_type, x_g, y_real, y_fake)
        assert x_g.dim() == 2 and x_g.shape == y_real.shape == y_fake.shape
        N, K = x_g.shape
        dev = x_g.device
        loss = torch.empty(N, dtype=torch.float64, device=dev)
        w = torch.empty(N, dtype=torch.float64, device=dev)
        valid = torch.empty(N, dtype=torch.bool, device=dev)
        with self._guard(x_g):
            self._fn("sid_forward")(
                x_g.data_ptr(), y_real.data_ptr(), y_fake.data_ptr(), N, K, float(alpha),
                loss.data_ptr(), w.data_ptr(), valid.data_ptr(), _code(x_g), self._last(x_g))
        return loss, w, valid

    def sid_backward(self, x_g, y_real, y_fake, alpha, w_n, valid_n, scale):
        _check(self.device_type, x_g, y_real, y_fake)
        assert x_g.dim() == 2 and x_g.shape == y_real.shape == y_fake.shape
        N, K = x_g.shape
        w_n = w_n.to(device=x_g.device, dtype=torch.float64).contiguous()
        valid_n = valid_n.to(device=x_g.device, dtype=torch.bool).contiguous()
        assert w_n.numel() == N and valid_n.numel() == N
        scale = _f64_scalar(scale, x_g.device, "scale")
        g_xg = torch.empty_like(x_g)
        g_real = torch.empty_like(x_g)
        g_fake = torch.empty_like(x_g)
        with self._guard(x_g):
            self._fn("sid_backward")(
                x_g.data_ptr(), y_real.data_ptr(), y_fake.data_ptr(), N, K, float(alpha),
                w_n.data_ptr(), valid_n.data_ptr(), scale.data_ptr(), g_xg.data_ptr(),
                g_real.data_ptr(), g_fake.data_ptr(), _code(x_g), self._last(x_g))
        return g_xg, g_real, g_fake

    # ---------------------------------------------------------------- fake score
    def fake_forward(self, y_fake, x):
        _check(self.device_type, y_fake, x)
        assert y_fake.dim() == 2 and y_fake.shape == x.shape
        N, K = y_fake.shape
        sq = torch.empty(N, dtype=torch.float64, device=x.device)
        valid = torch.empty(N, dtype=torch.bool, device=x.device)
        with self._guard(x):
            self._fn("fake_forward")(
                y_fake.data_ptr(), x.data_ptr(), N, K, sq.data_ptr(), valid.data_ptr(),
                _code(x), self._last(x))
        return sq, valid

    def fake_backward(self, y_fake, x, coef_n, *, need_x: bool):
        _check(self.device_type, y_fake, x)
        assert y_fake.dim() == 2 and y_fake.shape == x.shape
        N, K = y_fake.shape
        coef_n = coef_n.to(device=x.device, dtype=torch.float64).contiguous()
        assert coef_n.numel() == N
        g_fake = torch.empty_like(y_fake)
        g_x = torch.empty_like(x) if need_x else None  # g_x = -g_fake: skip the write
        with self._guard(x):
            self._fn("fake_backward")(
                y_fake.data_ptr(), x.data_ptr(), N, K, coef_n.data_ptr(), g_fake.data_ptr(),
                0 if g_x is None else g_x.data_ptr(), _code(x), self._last(x))
        return g_fake, g_x

    def __repr__(self) -> str:
        return f"NativePrimitives({self.device_type!r})"


CPU = NativePrimitives("cpu")
CUDA = NativePrimitives("cuda")
