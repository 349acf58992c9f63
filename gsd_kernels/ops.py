"""The public ops, as `torch.library` custom ops over the backends' primitives.

Forward and backward of each op are custom ops of their own (so `torch.compile` sees
opaque calls with fake implementations), tied together with `register_autograd`. All
validation happens in the public functions at the bottom, before any kernel runs.
The primitives and the derivation of the coefficients are in docs/design.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, reference, validation
from .reference import compute_dtype, flatten_rows

# ----------------------------------------------------------------------------- isometry


def _centred(t: Tensor) -> Tensor:
    # Distances are translation invariant, so centring is free and keeps the Gram trick exact-ish.
    return (t - t.mean(0, keepdim=True)).contiguous()


def _sq_norms(t: Tensor) -> Tensor:
    return (t * t).sum(1)


def _iso_operands(prims, x: Tensor, z: Tensor):
    """(x, z, xn2, zn2) and keyword arguments for the isometry primitives of `prims`.

    Backends whose kernels centre while packing (`centres_in_kernel`, the CPU kernels) get
    the uncentred rows and the column means, and compute the norms themselves: no centred
    (N, D) copies. The others (Triton, CUDA) get centred copies and their squared norms.
    """
    if getattr(prims, "centres_in_kernel", False):
        x, z = x.contiguous(), z.contiguous()
        return (x, z, None, None), {"mean_x": x.mean(0), "mean_z": z.mean(0)}
    xc, zc = _centred(x), _centred(z)
    return (xc, zc, _sq_norms(xc), _sq_norms(zc)), {}


_H2_CHUNK_ROWS = 1024


def _local_h2(z: Tensor) -> float:
    """The closed form of SPEC §2.1 for h^2 (as reference.local_bandwidth_sq), in float64,
    over chunks of rows so that no float64 (or centred) copy of the whole z is made."""
    z = z.detach()
    n = z.shape[0]
    chunks = [z[i:i + _H2_CHUNK_ROWS] for i in range(0, n, _H2_CHUNK_ROWS)]
    mean = sum(c.double().sum(0) for c in chunks) / n
    sq = z.new_zeros((), dtype=torch.float64)
    col = torch.zeros_like(mean)
    for chunk in chunks:
        c = chunk.double() - mean
        sq += (c * c).sum()
        col += c.sum(0)
    col /= n  # the mean of the centred rows: ~0, kept as the reference keeps it
    return float((2.0 * n / (n - 1)) * (sq / n - (col * col).sum()))


def _inv_two_h2(z: Tensor, local: bool, bandwidth: float) -> float:
    """1 / (2 h^2) for local weighting (0.0: global). z may be uncentred."""
    if not local:
        return 0.0
    h2 = bandwidth * bandwidth if bandwidth > 0 else _local_h2(z)
    return 0.5 / h2 if h2 > 0 else 0.0


def _loss_from_sums(sums: Tensor, scale: float) -> Tensor:
    w, s_xx, s_xz, s_zz = sums.unbind()
    if scale <= 0:  # optimal scale
        denom = s_xx * s_zz
        safe = denom > 0
        return torch.where(safe, 1.0 - s_xz * s_xz / torch.where(safe, denom, torch.ones_like(denom)),
                           torch.ones_like(denom))
    return (s_xx - 2.0 * scale * s_xz + scale * scale * s_zz) / w


def _pair_coefficients(sums: Tensor, scale: float, grad: float):
    """p, q, r, s of docs/design.md, with grad_output and the symmetric factor 2 folded in.

    None when the loss is the constant 1 (degenerate optimal scale): zero gradient.
    """
    w, s_xx, s_xz, s_zz = sums.tolist()
    k = 2.0 * grad
    if scale <= 0:
        if not s_xx * s_zz > 0:
            return None
        q = -2.0 * s_xz / (s_xx * s_zz)
        p = 2.0 * s_xz * s_xz / (s_xx * s_xx * s_zz)
        r = 2.0 * s_xz * s_xz / (s_xx * s_zz * s_zz)
        return k * p, k * q, k * r, k * q
    c = scale
    return k * 2.0 / w, k * -2.0 * c / w, k * 2.0 * c * c / w, k * -2.0 * c / w


@torch.library.custom_op("gsd::isometry_fwd", mutates_args=())
def _isometry_fwd(x: Tensor, z: Tensor, local: bool, bandwidth: float, scale: float,
                  backend: str) -> tuple[Tensor, Tensor]:
    prims = backends.primitives(backend, x.device.type)
    operands, means = _iso_operands(prims, x, z)
    n = x.shape[0]
    sums = prims.iso_forward_sums(*operands, 0, n, 0, n, _inv_two_h2(z, local, bandwidth), **means)
    return _loss_from_sums(sums, scale).to(x.dtype), sums


@_isometry_fwd.register_fake
def _(x, z, local, bandwidth, scale, backend):
    return x.new_empty(()), x.new_empty((4,), dtype=torch.float64)


@torch.library.custom_op("gsd::isometry_bwd", mutates_args=())
def _isometry_bwd(grad: Tensor, x: Tensor, z: Tensor, sums: Tensor, local: bool, bandwidth: float,
                  scale: float, backend: str) -> tuple[Tensor, Tensor]:
    coefficients = _pair_coefficients(sums, scale, float(grad))
    if coefficients is None:
        return torch.zeros_like(x), torch.zeros_like(z)
    prims = backends.primitives(backend, x.device.type)
    inv_two_h2 = _inv_two_h2(z, local, bandwidth)
    operands, means = _iso_operands(prims, x, z)
    n = x.shape[0]
    return prims.iso_backward_rows(*operands, 0, n, 0, n, inv_two_h2, *coefficients, **means)


@_isometry_bwd.register_fake
def _(grad, x, z, sums, local, bandwidth, scale, backend):
    return torch.empty_like(x), torch.empty_like(z)


def _isometry_setup(ctx, inputs, output):
    x, z, local, bandwidth, scale, backend = inputs
    ctx.save_for_backward(x, z, output[1])
    ctx.args = (local, bandwidth, scale, backend)


def _isometry_backward(ctx, grad_loss, grad_sums):
    x, z, sums = ctx.saved_tensors
    gx, gz = _isometry_bwd(grad_loss, x, z, sums, *ctx.args)
    return gx, gz, None, None, None, None


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
    scale = float(grad) / x_g.shape[0]
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
              sigma_data: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    prims = backends.primitives(backend, x.device.type)
    per_sample = grad.double() / x.shape[0]
    coef_n = _masked_weight(sigma, valid_n, sigma_data) * per_sample
    g_fake, g_x = prims.fake_backward(y_fake.contiguous(), x.contiguous(), coef_n)
    # d lambda / d sigma = -2 / sigma^3 (lambda = 1/sd^2 + 1/sigma^2)
    s = sigma.double()
    g_sigma = torch.where(valid_n, -2.0 / (s * s * s) * sq_n * per_sample, torch.zeros_like(s))
    return g_fake, g_x, g_sigma.to(sigma.dtype)


@_fake_bwd.register_fake
def _(grad, y_fake, x, sigma, sq_n, valid_n, sigma_data, backend):
    return torch.empty_like(y_fake), torch.empty_like(x), torch.empty_like(sigma)


def _fake_setup(ctx, inputs, output):
    y_fake, x, sigma, sigma_data, backend = inputs
    ctx.save_for_backward(y_fake, x, sigma, output[1], output[2])
    ctx.args = (sigma_data, backend)


def _fake_backward(ctx, grad_loss, grad_sq, grad_valid):
    y_fake, x, sigma, sq_n, valid_n = ctx.saved_tensors
    g_fake, g_x, g_sigma = _fake_bwd(grad_loss, y_fake, x, sigma, sq_n, valid_n, *ctx.args)
    return g_fake, g_x, g_sigma, None, None


torch.library.register_autograd("gsd::fake_score_fwd", _fake_backward, setup_context=_fake_setup)

# ------------------------------------------------------------------------ public API


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    return backends.resolve(backend, torch.device(device_type))


def isometry_loss(x, z, *, weighting="global", bandwidth=None, scale="optimal", backend="auto") -> Tensor:
    """Isometric regularisation loss between samples x (N, ...) and latents z (N, ...). SPEC §2.1."""
    validation.check_isometry_args(x, z, weighting, bandwidth, scale)
    name = _resolve(backend, x.device.type)
    if name == "reference":
        return reference.isometry_loss(x, z, weighting=weighting, bandwidth=bandwidth, scale=scale)
    dtype = compute_dtype(x, z)
    loss, _ = _isometry_fwd(flatten_rows(x, dtype), flatten_rows(z, dtype), weighting == "local",
                            0.0 if bandwidth is None else float(bandwidth),
                            -1.0 if isinstance(scale, str) else float(scale), name)
    return loss


def sid_generator_loss(x_g, y_real, y_fake, *, alpha=1.2, backend="auto") -> Tensor:
    """SiD generator loss (SPEC §2.2); samples with non-finite values are dropped."""
    validation.check_sid_args(x_g, y_real, y_fake, alpha)
    name = _resolve(backend, x_g.device.type)
    if name == "reference":
        return reference.sid_generator_loss(x_g, y_real, y_fake, alpha=alpha)
    dtype = compute_dtype(x_g, y_real, y_fake)
    loss, _, _ = _sid_fwd(flatten_rows(x_g, dtype), flatten_rows(y_real, dtype), flatten_rows(y_fake, dtype),
                          float(alpha), name)
    return loss


def fake_score_loss(y_fake, x, sigma, *, sigma_data=0.5, backend="auto") -> Tensor:
    """EDM denoising loss of the fake score on generated samples (SPEC §2.3)."""
    validation.check_fake_score_args(y_fake, x, sigma, sigma_data)
    name = _resolve(backend, x.device.type)
    if name == "reference":
        return reference.fake_score_loss(y_fake, x, sigma, sigma_data=sigma_data)
    dtype = compute_dtype(y_fake, x)
    loss, _, _ = _fake_fwd(flatten_rows(y_fake, dtype), flatten_rows(x, dtype), sigma.reshape(x.shape[0]),
                           float(sigma_data), name)
    return loss
