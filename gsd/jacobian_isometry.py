"""Jacobian isometry baseline: the relaxed distortion measure of IRVAE (Lee et al. 2022) as used
by Hahm et al. (ICML 2024, "Isometric Representation Learning for Disentangled Latent Space of
Diffusion Models"), estimated with Jacobian-vector products at anchor latents.

For a map G from latents z (d numbers per sample) to outputs x, with Jacobian J(z) = dG/dz and
A(z) = J(z)^T J(z):

    L = E_{z,u}[ ||J(z)^T J(z) u||^2 ] / ( E_{z,u}[ ||J(z) u||^2 ] )^2,      u ~ N(0, I_d)

Both expectations are batch means over the anchors and the probes (the mean of the numerators
divided by the square of the mean of the denominators; not a mean of per-anchor ratios).

- In expectation over u, ||A u||^2 -> tr(A^2) and ||J u||^2 -> tr(A), so L estimates
  E_z tr(A^2) / (E_z tr A)^2 >= E_z (tr A)^2 / d / (E_z tr A)^2 >= 1/d (Cauchy-Schwarz twice).
  The minimum 1/d is reached exactly when A(z) = c I with ONE c for every z: a local isometry
  up to a single global scale. A scale that varies with z, or an anisotropic J, raises L.
- L does not change when G's output or its latent is rescaled (numerator and denominator are
  both of degree 4 in J), so it does not matter whether fn takes eps or z = sigma_init * eps.
- Normalised form: `d * L - 1` (`normalize=True`), >= 0 in expectation and 0 for an isometry
  up to a global scale. It is a ratio of sample means, so one estimate is biased and can be
  slightly below 0; the training term can use L itself (the factor d only rescales the weight).

API
---
    relaxed_distortion(fn, z, *, probes=1, generator=None, method="double_backward",
                       create_graph=True, normalize=False) -> 0-dim tensor
    distortion_terms(fn, z, *, probes=1, generator=None, method="double_backward", create_graph=True)
        -> (num, den), each (n,): per anchor, the mean over probes of ||J^T J u||^2 and ||J u||^2
           (L = num.mean() / den.mean()**2; lets the caller drop rows or all-reduce the means)
    jacobian_products(fn, z, u, *, method="double_backward", create_graph=True) -> (y, Ju, J^T J u)
    normalized_distortion(L, latent_dim) -> latent_dim * L - 1

- fn maps a (n, *latent_shape) tensor to (n, *out_shape) outputs, ROW BY ROW: output row i may
  depend only on input row i (true of the EDM networks: group norm, attention and dropout act
  per sample; not of batch norm). fn is a closure with everything else fixed, e.g. for the
  distiller's generator `fn = lambda t: net(t, sigma, labels)` with z = sigma_init * eps,
  sigma a (n,) tensor of sigma_init and labels the anchors' n labels. fn is called once per
  probe, always with n rows in the anchors' order, so the closure's labels line up.
- z: (n, *latent_shape) floating anchors, n >= 1 (the caller chooses n: cost control). z is
  detached: the result is differentiable w.r.t. the parameters fn uses (the training term),
  not w.r.t. z.
- probes: the number P >= 1 of Gaussian probes per anchor, drawn with torch.randn(generator=
  generator) in z's dtype and device; or a (P, n, *latent_shape) tensor of probes to use as is.
- method="double_backward" (default): J u = d/dv <J^T v, u> with two reverse passes on ONE
  forward pass, then J^T (J u) by a vector-Jacobian product of the same pass.
  method="jvp": J u by forward-mode AD (torch.func.jvp), then the same vjp. Both give the same
  numbers (tested). double_backward is the default because it was 1.5x cheaper per training
  step on the digits network on CPU (see Cost) and it also runs through gradient checkpointing
  (torch.utils.checkpoint does not support forward-mode AD: the jvp route raises a ValueError
  saying so). torch.autograd.forward_ad.make_dual is not used: reverse-over-forward with it
  fails on this project's networks and on softmax in this torch (an Exp output modified in
  place). Nothing falls back silently.
- create_graph=True keeps the graph so that `loss.backward()` reaches fn's parameters;
  create_graph=False gives a detached value (evaluation, e.g. a held-out isometry defect).
  Autograd is enabled inside either way, so it may be called under torch.no_grad().
- Dropout in train mode: each call of fn is ONE forward pass, and J u (tangent or double
  backward) and the vjp are taken on that pass, so y, J u and J^T J u share the dropout masks
  (tested through <J^T J u, u> = ||J u||^2). Each probe's call draws its own masks (a
  consistent Jacobian of the network with that mask); label dropout likewise. torch.func.jvp
  draws the masks from the global RNG in another order than a plain forward, so the jvp route
  does not reproduce a plain forward's masks for the same seed (double_backward does).
- Attention: inside the call, F.scaled_dot_product_attention is restricted to its math backend
  (torch.nn.attention.sdpa_kernel): the fused kernels (flash / memory-efficient, CPU and CUDA)
  have neither forward-mode derivatives nor double backward. Same math, more memory for long
  sequences.
- Pass the plain module in fn, not a torch.compile wrapper (not tested with forward-mode AD).
  Under DDP, autograd.grad w.r.t. z does not touch parameter gradients; the final backward is
  one ordinary backward (not tested under DDP here).
- Non-finite outputs make the result non-finite; a map with J = 0 everywhere gives 0/0 = NaN.
  Dropping a row from `distortion_terms`' means after the fact does not clean the parameter
  gradient (0 * NaN in that row's backward): call again with the finite anchors only.

Cost, one training step of the term (forward + backward to the parameters, probes=1) on the
digits default network (gsd.models.networks.default_config("digits", (1, 8, 8)), 0.31M parameters,
fresh weights), one CPU thread, shared 2-core machine (load 6-7), median of 7 interleaved
rounds, against one plain forward + backward of G on 64 samples (72.7 ms):
    double_backward: 16 anchors 244 ms (3.4x), 64 anchors 391 ms (5.4x)
    jvp:             16 anchors 394 ms (5.4x), 64 anchors 590 ms (8.1x)
The cost grows slowly with the number of anchors on this small network (per-op overhead
dominates), so few anchors buy little; lazy regularisation (every k-th step) cuts it in k.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["relaxed_distortion", "distortion_terms", "jacobian_products", "normalized_distortion",
           "METHODS"]

METHODS = ("jvp", "double_backward")


def _check_z(z) -> None:
    if not torch.is_tensor(z):
        raise ValueError(f"z must be a tensor of anchor latents, got {type(z).__name__}")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating tensor, got dtype {z.dtype}")
    if z.ndim < 2:
        raise ValueError(f"z must have shape (n, *latent_shape) with a latent of >= 1 element, got {tuple(z.shape)}")
    if z.shape[0] < 1:
        raise ValueError("z must hold at least 1 anchor, got 0")
    if z[0].numel() < 1:
        raise ValueError(f"z's latent is empty: shape {tuple(z.shape)}")


def _check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _check_output(y, z) -> None:
    if not torch.is_tensor(y) or not y.is_floating_point():
        raise ValueError("fn must return a floating tensor")
    if y.ndim < 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"fn must return one output row per anchor: got shape {tuple(y.shape)} for "
                         f"{z.shape[0]} anchors")


def jacobian_products(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, u: torch.Tensor, *,
                      method: str = "double_backward", create_graph: bool = True):
    """(y, J u, J^T J u) for y = fn(z), J the per-row Jacobian of fn at z, u shaped like z.

    One call of fn. y and J u have fn's output shape, J^T J u has z's shape. With
    create_graph=True, J u and J^T J u are differentiable w.r.t. fn's parameters.
    """
    _check_z(z)
    _check_method(method)
    if not torch.is_tensor(u) or u.shape != z.shape:
        raise ValueError(f"probe u must have z's shape {tuple(z.shape)}, got "
                         f"{tuple(u.shape) if torch.is_tensor(u) else type(u).__name__}")
    u = u.detach().to(dtype=z.dtype, device=z.device)
    z = z.detach().requires_grad_(True)
    try:
        return _products(fn, z, u, method, create_graph)
    except RuntimeError as exc:
        # the checkpoint's recomputation in the vjp does not see the forward-mode tangents
        if method == "jvp" and "torch.utils.checkpoint" in str(exc):
            raise ValueError("method='jvp' cannot run through torch.utils.checkpoint (gradient "
                             "checkpointing): use method='double_backward'") from exc
        raise


def _products(fn, z, u, method, create_graph):
    # Fused attention kernels have neither forward-mode derivatives nor double backward.
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        if method == "jvp":
            y, ju = torch.func.jvp(fn, (z,), (u,))
            _check_output(y, z)
        else:
            y = fn(z)
            _check_output(y, z)
            if not y.requires_grad:
                raise ValueError("fn's output does not depend on z (no autograd graph)")
            # <J^T v, u> is linear in v; its gradient w.r.t. v is J u.
            v = torch.zeros_like(y, requires_grad=True)
            (jtv,) = torch.autograd.grad(y, z, v, create_graph=True)
            (ju,) = torch.autograd.grad(jtv, v, u, create_graph=create_graph)
        if not y.requires_grad:
            raise ValueError("fn's output does not depend on z (no autograd graph)")
        if not create_graph:
            ju = ju.detach()
        (jtju,) = torch.autograd.grad(y, z, ju, create_graph=create_graph, retain_graph=create_graph)
    if not create_graph:
        y, jtju = y.detach(), jtju.detach()
    return y, ju, jtju


def _probes(probes, z: torch.Tensor, generator) -> torch.Tensor:
    if torch.is_tensor(probes):
        if probes.ndim != z.ndim + 1 or probes.shape[1:] != z.shape or probes.shape[0] < 1:
            raise ValueError(f"probes tensor must have shape (P >= 1, *{tuple(z.shape)}), got {tuple(probes.shape)}")
        if not probes.is_floating_point():
            raise ValueError(f"probes must be floating, got dtype {probes.dtype}")
        return probes
    if isinstance(probes, bool) or not isinstance(probes, int):
        raise ValueError(f"probes must be an int >= 1 or a tensor, got {probes!r}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    return torch.randn((probes, *z.shape), generator=generator, device=z.device, dtype=z.dtype)


def distortion_terms(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *, probes=1,
                     generator: torch.Generator | None = None, method: str = "double_backward",
                     create_graph: bool = True):
    """(num, den), each (n,): per anchor, the mean over the probes of ||J^T J u||^2 (num) and of
    ||J u||^2 (den). relaxed_distortion = num.mean() / den.mean()**2. Reductions are in float32
    (float64 for float64 inputs)."""
    _check_z(z)
    _check_method(method)
    u_all = _probes(probes, z, generator)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    num = den = None
    for u in u_all:  # one call of fn per probe: fn always sees the n anchors in order
        _, ju, jtju = jacobian_products(fn, z, u, method=method, create_graph=create_graph)
        a = jtju.to(acc).flatten(1).pow(2).sum(1)
        b = ju.to(acc).flatten(1).pow(2).sum(1)
        num = a if num is None else num + a
        den = b if den is None else den + b
    p = u_all.shape[0]
    return num / p, den / p


def normalized_distortion(value: torch.Tensor, latent_dim: int) -> torch.Tensor:
    """latent_dim * L - 1: >= 0 in expectation, 0 for a local isometry up to one global scale."""
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be an int >= 1, got {latent_dim!r}")
    return latent_dim * value - 1


def relaxed_distortion(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *, probes=1,
                       generator: torch.Generator | None = None, method: str = "double_backward",
                       create_graph: bool = True, normalize: bool = False) -> torch.Tensor:
    """L = mean ||J^T J u||^2 / (mean ||J u||^2)^2 over anchors z and Gaussian probes u (see the
    module docstring); with normalize=True, d * L - 1 with d = z[0].numel()."""
    num, den = distortion_terms(fn, z, probes=probes, generator=generator, method=method,
                                create_graph=create_graph)
    value = num.mean() / den.mean().square()
    return normalized_distortion(value, int(z[0].numel())) if normalize else value
