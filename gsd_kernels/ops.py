"""The public ops, as `torch.library` custom ops over the backends' primitives.

Forward and backward of each op are custom ops of their own (so `torch.compile` sees
opaque calls with fake implementations), tied together with `register_autograd`. All
validation happens in the public functions at the bottom, before any kernel runs.
The primitives and the derivation of the coefficients are in docs/design.md.

No op reads a device value on the host (no `.item()`, `.tolist()`, `float(tensor)`): data
dependent scalars stay float64 device tensors, so the ops can be captured in CUDA graphs.
The isometry operands are centred and scaled by exact powers of two (fp32 data from 1e-37
to 1e37). Backends: on CUDA `auto` prefers `triton`; the `cuda` isometry kernels are the
portable FP32 SIMT fallback (no tensor cores; review estimate ~0.5x eager at N=8192,
D=d=3072), see docs/design.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, reference, validation
from ._isometry import (_apply_factor, _group_kwargs, _inv_two_h2, _iso_operands,
                        _loss_from_sums, _pair_coefficients)
from .reference import compute_dtype, flatten_rows

# ----------------------------------------------------------------------------- isometry
# The host-side arithmetic around the primitives (centring, power-of-two factors, 1/(2 h^2),
# loss and pair coefficients from the sums) is in _isometry.py, shared with distributed.py.

@torch.library.custom_op("gsd::isometry_fwd", mutates_args=())
def _isometry_fwd(x: Tensor, z: Tensor, local: bool, bandwidth: float, scale: float,
                  backend: str, groups: int = 0) -> tuple[Tensor, Tensor]:
    """groups = 0: all pairs; g >= 2: only pairs within blocks of g consecutive rows."""
    prims = backends.primitives(backend, x.device.type)
    operands, kwargs, scales = _iso_operands(prims, x, z)
    n = x.shape[0]
    inv_two_h2 = _inv_two_h2(z, local, bandwidth, scales[1], groups)
    sums = prims.iso_forward_sums(*operands, 0, n, 0, n, inv_two_h2, **kwargs, **_group_kwargs(groups))
    return _loss_from_sums(sums, scales, scale).to(x.dtype), sums


@_isometry_fwd.register_fake
def _(x, z, local, bandwidth, scale, backend, groups=0):
    return x.new_empty(()), x.new_empty((4,), dtype=torch.float64)


@torch.library.custom_op("gsd::isometry_bwd", mutates_args=())
def _isometry_bwd(grad: Tensor, x: Tensor, z: Tensor, sums: Tensor, local: bool, bandwidth: float,
                  scale: float, need_x: bool, need_z: bool, backend: str, groups: int = 0) -> tuple[Tensor, Tensor]:
    """(gx, gz); an input that needs no gradient gets an empty (0,) tensor and none of its
    work is done (no apply GEMM, no output)."""
    prims = backends.primitives(backend, x.device.type)
    operands, kwargs, scales = _iso_operands(prims, x, z)  # the forward's factors, recomputed
    coef, gmul = _pair_coefficients(sums, scales, scale, grad)
    inv_two_h2 = _inv_two_h2(z, local, bandwidth, scales[1], groups)
    n = x.shape[0]
    gx, gz = prims.iso_backward_rows(*operands, 0, n, 0, n, inv_two_h2, coef,
                                     need_x=need_x, need_z=need_z, **kwargs, **_group_kwargs(groups))
    gx = _apply_factor(gx, gmul[0]) if need_x else x.new_empty((0,))
    gz = _apply_factor(gz, gmul[1]) if need_z else z.new_empty((0,))
    return gx, gz


@_isometry_bwd.register_fake
def _(grad, x, z, sums, local, bandwidth, scale, need_x, need_z, backend, groups=0):
    return (torch.empty_like(x) if need_x else x.new_empty((0,)),
            torch.empty_like(z) if need_z else z.new_empty((0,)))


def _isometry_setup(ctx, inputs, output):
    x, z, local, bandwidth, scale, backend, *rest = inputs
    ctx.save_for_backward(x, z, output[1])
    ctx.args = (local, bandwidth, scale)
    ctx.backend = backend
    ctx.groups = rest[0] if rest else 0


def _isometry_backward(ctx, grad_loss, grad_sums):
    x, z, sums = ctx.saved_tensors
    need_x, need_z = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    gx, gz = _isometry_bwd(grad_loss, x, z, sums, *ctx.args, need_x, need_z, ctx.backend, ctx.groups)
    return (gx if need_x else None), (gz if need_z else None), None, None, None, None, None


torch.library.register_autograd("gsd::isometry_fwd", _isometry_backward, setup_context=_isometry_setup)

# ---------------------------------------------------------------------- SiD generator


@torch.library.custom_op("gsd::sid_generator_fwd", mutates_args=())
def _sid_fwd(x_g: Tensor, y_real: Tensor, y_fake: Tensor, alpha: float,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    prims = backends.primitives(backend, x_g.device.type)
    loss_n, w_n, valid_n = prims.sid_forward(x_g.contiguous(), y_real.contiguous(), y_fake.contiguous(), alpha)
    return (loss_n.sum() / x_g.shape[0]).to(x_g.dtype), w_n, valid_n


@_sid_fwd.register_fake
def _(x_g, y_real, y_fake, alpha, backend):
    n = x_g.shape[0]
    return (x_g.new_empty(()), x_g.new_empty((n,), dtype=torch.float64),
            x_g.new_empty((n,), dtype=torch.bool))


@torch.library.custom_op("gsd::sid_generator_bwd", mutates_args=())
def _sid_bwd(grad: Tensor, x_g: Tensor, y_real: Tensor, y_fake: Tensor, w_n: Tensor, valid_n: Tensor,
             alpha: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    prims = backends.primitives(backend, x_g.device.type)
    scale = grad.reshape(()).to(torch.float64) / x_g.shape[0]  # stays on the device
    return prims.sid_backward(x_g.contiguous(), y_real.contiguous(), y_fake.contiguous(), alpha,
                              w_n, valid_n, scale)


@_sid_bwd.register_fake
def _(grad, x_g, y_real, y_fake, w_n, valid_n, alpha, backend):
    return torch.empty_like(x_g), torch.empty_like(y_real), torch.empty_like(y_fake)


def _sid_setup(ctx, inputs, output):
    x_g, y_real, y_fake, alpha, backend = inputs
    ctx.save_for_backward(x_g, y_real, y_fake, output[1], output[2])
    ctx.args = (alpha, backend)


def _sid_backward(ctx, grad_loss, grad_w, grad_valid):
    x_g, y_real, y_fake, w_n, valid_n = ctx.saved_tensors
    alpha, backend = ctx.args
    g_xg, g_real, g_fake = _sid_bwd(grad_loss, x_g, y_real, y_fake, w_n, valid_n, alpha, backend)
    return g_xg, g_real, g_fake, None, None


torch.library.register_autograd("gsd::sid_generator_fwd", _sid_backward, setup_context=_sid_setup)

# ------------------------------------------------------------------------- fake score


def _masked_weight(sigma: Tensor, valid: Tensor, sigma_data: float) -> Tensor:
    lam = reference.edm_loss_weight(sigma.double(), sigma_data)
    return torch.where(valid, lam, torch.zeros_like(lam))


@torch.library.custom_op("gsd::fake_score_fwd", mutates_args=())
def _fake_fwd(y_fake: Tensor, x: Tensor, sigma: Tensor, sigma_data: float,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    prims = backends.primitives(backend, x.device.type)
    sq_n, valid_n = prims.fake_forward(y_fake.contiguous(), x.contiguous())
    loss = (_masked_weight(sigma, valid_n, sigma_data) * sq_n).sum() / x.shape[0]
    return loss.to(x.dtype), sq_n, valid_n


@_fake_fwd.register_fake
def _(y_fake, x, sigma, sigma_data, backend):
    n = x.shape[0]
    return x.new_empty(()), x.new_empty((n,), dtype=torch.float64), x.new_empty((n,), dtype=torch.bool)


@torch.library.custom_op("gsd::fake_score_bwd", mutates_args=())
def _fake_bwd(grad: Tensor, y_fake: Tensor, x: Tensor, sigma: Tensor, sq_n: Tensor, valid_n: Tensor,
              sigma_data: float, need_x: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(g_fake, g_x, g_sigma); g_x is an empty (0,) tensor when x needs no gradient (the
    generator's samples are detached when the fake score is trained)."""
    prims = backends.primitives(backend, x.device.type)
    per_sample = grad.double() / x.shape[0]
    coef_n = _masked_weight(sigma, valid_n, sigma_data) * per_sample
    g_fake, g_x = prims.fake_backward(y_fake.contiguous(), x.contiguous(), coef_n, need_x=need_x)
    if not need_x:
        g_x = x.new_empty((0,))
    # d lambda / d sigma = -2 / sigma^3 (lambda = 1/sd^2 + 1/sigma^2)
    s = sigma.double()
    g_sigma = torch.where(valid_n, -2.0 / (s * s * s) * sq_n * per_sample, torch.zeros_like(s))
    return g_fake, g_x, g_sigma.to(sigma.dtype)


@_fake_bwd.register_fake
def _(grad, y_fake, x, sigma, sq_n, valid_n, sigma_data, need_x, backend):
    return (torch.empty_like(y_fake), torch.empty_like(x) if need_x else x.new_empty((0,)),
            torch.empty_like(sigma))


def _fake_setup(ctx, inputs, output):
    y_fake, x, sigma, sigma_data, backend = inputs
    ctx.save_for_backward(y_fake, x, sigma, output[1], output[2])
    ctx.args = (sigma_data, backend)


def _fake_backward(ctx, grad_loss, grad_sq, grad_valid):
    y_fake, x, sigma, sq_n, valid_n = ctx.saved_tensors
    sigma_data, backend = ctx.args
    need_x = bool(ctx.needs_input_grad[1])
    g_fake, g_x, g_sigma = _fake_bwd(grad_loss, y_fake, x, sigma, sq_n, valid_n, sigma_data, need_x, backend)
    return g_fake, (g_x if need_x else None), g_sigma, None, None


torch.library.register_autograd("gsd::fake_score_fwd", _fake_backward, setup_context=_fake_setup)

# ------------------------------------------------------------- checks under torch.compile
# Dynamo in fullgraph mode turns any exception raised while it traces into a many-line
# `Unsupported: Observed exception`. A check that fails while tracing is therefore compiled
# into an op that raises the same one-line error when the graph runs (the failing input is
# what the graph was specialised on, so it runs only for such input).

_ERRORS = {"ValueError": ValueError, "TypeError": TypeError}


@torch.library.custom_op("gsd::raise_error", mutates_args=())
def _raise_error(like: Tensor, kind: str, message: str) -> Tensor:
    raise _ERRORS[kind](message)


@_raise_error.register_fake
def _(like, kind, message):
    return like.new_empty(())


def _failed_check(check, *args):
    """None when check(*args) passes; under torch.compile a tensor that raises its error."""
    try:
        check(*args)
    except (ValueError, TypeError) as e:
        like = next((a for a in args if isinstance(a, Tensor)), None)
        if not torch.compiler.is_compiling() or like is None:
            raise
        return _raise_error(like, type(e).__name__, str(e))
    return None


@torch.library.custom_op("gsd::checked_sigma", mutates_args=())
def _checked_sigma(sigma: Tensor) -> Tensor:
    """sigma itself, after the finite-and-positive check (which would be skipped while tracing)."""
    validation.check_sigma_values(sigma)
    return sigma.clone()


@_checked_sigma.register_fake
def _(sigma):
    return torch.empty_like(sigma)


torch.library.register_autograd("gsd::checked_sigma", lambda ctx, grad: grad)

# ------------------------------------------------------------------------ public API


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    return backends.resolve(backend, torch.device(device_type))


# Fused backends whose isometry primitives take `groups=` (pairs within blocks of rows).
GROUPED_BACKENDS = frozenset({"cpu", "cuda", "triton"})


def check_grouped_backend(name: str, groups) -> None:
    """A fused backend without grouped kernels refuses groups (never a silent fallback)."""
    if groups is not None and name != "reference" and name not in GROUPED_BACKENDS:
        raise ValueError(f"isometry_loss(groups=...) is not implemented for backend {name!r}; "
                         f"use one of {sorted(GROUPED_BACKENDS | {'reference'})}")


def isometry_loss(x, z, *, weighting="global", bandwidth=None, scale="optimal", groups=None,
                  backend="auto") -> Tensor:
    """Isometric regularisation loss between samples x (N, ...) and latents z (N, ...). docs/definitions.md §2.1.

    groups=None: all ordered pairs; groups=g: only pairs within consecutive blocks of g rows."""
    failed = _failed_check(validation.check_isometry_args, x, z, weighting, bandwidth, scale, groups)
    if failed is not None:
        return failed
    name = _resolve(backend, x.device.type)
    groups = None if groups is None else int(groups)
    # numbers as Python floats from here (a Fraction or numpy scalar passes the checks)
    bandwidth = None if bandwidth is None else float(bandwidth)
    scale = scale if isinstance(scale, str) else float(scale)
    if name == "reference":
        return reference.isometry_loss(x, z, weighting=weighting, bandwidth=bandwidth, scale=scale, groups=groups)
    check_grouped_backend(name, groups)
    dtype = compute_dtype(x, z)
    extra = (groups,) if groups is not None else ()  # all pairs: the op's call is unchanged
    loss, _ = _isometry_fwd(flatten_rows(x, dtype), flatten_rows(z, dtype), weighting == "local",
                            0.0 if bandwidth is None else float(bandwidth),
                            -1.0 if isinstance(scale, str) else float(scale), name, *extra)
    return loss


def sid_generator_loss(x_g, y_real, y_fake, *, alpha=1.2, backend="auto") -> Tensor:
    """SiD generator loss (docs/definitions.md §2.2); samples with non-finite values are dropped."""
    failed = _failed_check(validation.check_sid_args, x_g, y_real, y_fake, alpha)
    if failed is not None:
        return failed
    name = _resolve(backend, x_g.device.type)
    alpha = float(alpha)
    if name == "reference":
        return reference.sid_generator_loss(x_g, y_real, y_fake, alpha=alpha)
    dtype = compute_dtype(x_g, y_real, y_fake)
    loss, _, _ = _sid_fwd(flatten_rows(x_g, dtype), flatten_rows(y_real, dtype), flatten_rows(y_fake, dtype),
                          float(alpha), name)
    return loss


def fake_score_loss(y_fake, x, sigma, *, sigma_data=0.5, backend="auto") -> Tensor:
    """EDM denoising loss of the fake score on generated samples (docs/definitions.md §2.3)."""
    failed = _failed_check(validation.check_fake_score_args, y_fake, x, sigma, sigma_data)
    if failed is not None:
        return failed
    if torch.compiler.is_compiling() and sigma.device.type == "cpu":
        sigma = _checked_sigma(sigma)
    name = _resolve(backend, x.device.type)
    sigma_data = float(sigma_data)
    if name == "reference":
        return reference.fake_score_loss(y_fake, x, sigma, sigma_data=sigma_data)
    dtype = compute_dtype(y_fake, x)
    loss, _, _ = _fake_fwd(flatten_rows(y_fake, dtype), flatten_rows(x, dtype), sigma.reshape(x.shape[0]),
                           float(sigma_data), name)
    return loss
