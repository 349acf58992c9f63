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
from .reference import compute_dtype, flatten_rows, pow2_factor_of

# ----------------------------------------------------------------------------- isometry
#
# No host synchronisation anywhere below: every scalar that comes from data (1/(2 h^2), the
# backward coefficients, the power-of-two factors, grad_output) stays a device tensor and
# reaches the kernels as such (docs/design.md, "Primitives"). So the ops can be captured
# in CUDA graphs, and the host never waits for the device inside them.


def _sq_norms(t: Tensor) -> Tensor:
    return (t * t).sum(1)


def _centring(t: Tensor) -> tuple[Tensor, Tensor]:
    """Column means for centring (distances are translation invariant, and centred data keep
    the Gram trick accurate) and the power-of-two factor of the centred data.

    A constant column gets its own value as the mean, so a batch of identical rows centres
    to exactly zero rows, which the close-pair rule then leaves alone (docs/design.md)."""
    lo, hi = t.amin(0), t.amax(0)  # (torch.aminmax(dim=0) is ~20x slower on CPU)
    mean = torch.where(lo == hi, lo, t.mean(0))
    spread = (hi.double() - lo.double()).amax()
    return mean, pow2_factor_of(spread, t.dtype)


def _iso_operands(prims, x: Tensor, z: Tensor):
    """(x, z, xn2, zn2), keyword arguments for the isometry primitives of `prims`, and
    the factors (sx, sz) (float64 [2]) the primitives' operands carry: they see
    x' = (x - mean_x) * sx and z' = (z - mean_z) * sz.

    Backends whose kernels centre while packing (`centres_in_kernel`, the CPU kernels) get
    the rows as given with the column means and the factors: no (N, D) copies. The others
    (Triton, CUDA) get centred, scaled copies and their squared norms.
    """
    x, z = x.contiguous(), z.contiguous()
    mean_x, sx = _centring(x)
    mean_z, sz = _centring(z)
    scales = torch.stack([sx, sz])
    if getattr(prims, "centres_in_kernel", False):
        return (x, z, None, None), {"mean_x": mean_x, "mean_z": mean_z, "scale_x": sx, "scale_z": sz}, scales
    xc = (x - mean_x).mul_(sx.to(x.dtype))
    zc = (z - mean_z).mul_(sz.to(z.dtype))
    return (xc, zc, _sq_norms(xc), _sq_norms(zc)), {}, scales


_H2_CHUNK_ROWS = 1024


def _local_h2(z: Tensor, sz: Tensor) -> Tensor:
    """h^2 of the closed form of docs/definitions.md §2.1 (as reference.local_bandwidth_sq) for the scaled
    latents z * sz, a 0-dim float64 device tensor; over chunks of rows so that no float64
    (or centred) copy of the whole z is made."""
    z = z.detach()
    n = z.shape[0]
    chunks = [z[i:i + _H2_CHUNK_ROWS] for i in range(0, n, _H2_CHUNK_ROWS)]
    mean = sum(c.double().sum(0) for c in chunks) * sz / n
    sq = z.new_zeros((), dtype=torch.float64)
    col = torch.zeros_like(mean)
    for chunk in chunks:
        c = chunk.double() * sz - mean
        sq += (c * c).sum()
        col += c.sum(0)
    col /= n  # the mean of the centred rows: ~0, kept as the reference keeps it
    return (2.0 * n / (n - 1)) * (sq / n - (col * col).sum())


def _local_h2_grouped(z: Tensor, sz: Tensor, g: int) -> Tensor:
    """h^2 over the included pairs of groups of g consecutive rows (as
    reference.local_bandwidth_sq_grouped) for the scaled latents z * sz: the mean over groups of
    each group's closed form, over chunks of whole groups in float64 (no copy of all of z)."""
    z = z.detach()
    n = z.shape[0]
    step = max(1, _H2_CHUNK_ROWS // g) * g
    sq = z.new_zeros((), dtype=torch.float64)
    for i in range(0, n, step):
        blocks = (z[i:i + step].double() * sz).reshape(-1, g, z.shape[1])
        c = blocks - blocks.mean(1, keepdim=True)
        sq += (c * c).sum()
    return (2.0 * g / ((g - 1) * n)) * sq


def _inv_two_h2(z: Tensor, local: bool, bandwidth: float, sz: Tensor, groups: int = 0) -> Tensor:
    """1 / (2 h^2) in the frame of the scaled latents z * sz (0-dim float64 on z's device;
    0: global weighting). groups > 0: the closed-form h^2 is over the included pairs only."""
    if not local:
        return torch.zeros((), dtype=torch.float64, device=z.device)
    if bandwidth > 0:
        b = sz * bandwidth
        h2 = b * b
    elif groups:
        h2 = _local_h2_grouped(z, sz, groups)
    else:
        h2 = _local_h2(z, sz)
    positive = h2 > 0
    return torch.where(positive, 0.5 / torch.where(positive, h2, torch.ones_like(h2)), torch.zeros_like(h2))


def _loss_from_sums(sums: Tensor, scales: Tensor, scale: float) -> Tensor:
    """The loss from the pair sums of the scaled operands and their factors (sx, sz).

    Optimal scale: invariant to scaling x and z separately, so the scaled sums give it
    directly. It is 1 exactly when S_xx S_zz == 0 (every pair at distance 0 in x or in z);
    NaN is not "degenerate": a NaN or inf input gives a NaN loss. Fixed scale c: in the
    scaled frame the scale is c' = c sx / sz and the loss carries a factor 1 / sx^2."""
    w, s_xx, s_xz, s_zz = sums.unbind()
    if scale <= 0:
        denom = s_xx * s_zz
        degenerate = denom == 0
        ratio = s_xz * s_xz / torch.where(degenerate, torch.ones_like(denom), denom)
        return torch.where(degenerate, torch.ones_like(denom), 1.0 - ratio)
    sx, sz = scales.unbind()
    c = scale * sx / sz
    return (s_xx - 2.0 * c * s_xz + c * c * s_zz) / w / sx / sx


def _pair_coefficients(sums: Tensor, scales: Tensor, scale: float, grad: Tensor):
    """(coef, gmul): p, q, r, s of docs/design.md for the scaled operands (float64 [4], with
    grad_output and the symmetric factor 2 folded in; zeros when the loss is the constant
    1), and the factors (float64 [2]) that turn the primitive's gradients of the scaled
    operands into those of x and z. All on the device: no host branch, no sync."""
    w, s_xx, s_xz, s_zz = sums.unbind()
    k = 2.0 * grad.reshape(()).to(torch.float64)
    if scale <= 0:
        denom = s_xx * s_zz
        ok = denom != 0
        one = torch.ones_like(denom)
        q = -2.0 * s_xz / torch.where(ok, denom, one)
        p = -q * s_xz / torch.where(ok, s_xx, one)
        r = -q * s_xz / torch.where(ok, s_zz, one)
        coef = torch.where(ok, torch.stack([p, q, r, q]) * k, torch.zeros(4, dtype=torch.float64, device=sums.device))
        return coef, scales
    sx, sz = scales.unbind()
    c = scale * sx / sz
    coef = torch.stack([2.0 / w, -2.0 * c / w, 2.0 * c * c / w, -2.0 * c / w]) * k
    # the loss is (that of c' in the scaled frame) / sx^2: d/dx = sx / sx^2 d/dx', d/dz = sz / sx^2 d/dz'
    return coef, torch.stack([1.0 / sx, sz / sx / sx])


def _apply_factor(g: Tensor, factor: Tensor) -> Tensor:
    return g.mul_(factor.to(g.dtype))


def _group_kwargs(groups: int) -> dict:
    """The primitives' `groups=` keyword only when pairs are grouped, so that the
    all-pairs calls stay exactly those of before."""
    return {"groups": groups} if groups else {}


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
    validation.check_isometry_args(x, z, weighting, bandwidth, scale, groups)
    name = _resolve(backend, x.device.type)
    groups = None if groups is None else int(groups)
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
    validation.check_sid_args(x_g, y_real, y_fake, alpha)
    name = _resolve(backend, x_g.device.type)
    if name == "reference":
        return reference.sid_generator_loss(x_g, y_real, y_fake, alpha=alpha)
    dtype = compute_dtype(x_g, y_real, y_fake)
    loss, _, _ = _sid_fwd(flatten_rows(x_g, dtype), flatten_rows(y_real, dtype), flatten_rows(y_fake, dtype),
                          float(alpha), name)
    return loss


def fake_score_loss(y_fake, x, sigma, *, sigma_data=0.5, backend="auto") -> Tensor:
    """EDM denoising loss of the fake score on generated samples (docs/definitions.md §2.3)."""
    validation.check_fake_score_args(y_fake, x, sigma, sigma_data)
    name = _resolve(backend, x.device.type)
    if name == "reference":
        return reference.fake_score_loss(y_fake, x, sigma, sigma_data=sigma_data)
    dtype = compute_dtype(y_fake, x)
    loss, _, _ = _fake_fwd(flatten_rows(y_fake, dtype), flatten_rows(x, dtype), sigma.reshape(x.shape[0]),
                           float(sigma_data), name)
    return loss
