"""Jacobian isometry baseline (gsd.jacobian_isometry): J u and J^T J u products against explicit
Jacobians, the relaxed distortion measure against closed forms, gradients to the parameters,
the project's EDM networks (dropout, attention, labels) and bad input."""

import math

import pytest
import torch

from gsd import jacobian_isometry as ji
from gsd.models.networks import build_denoiser, set_gradient_checkpointing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = ji.METHODS


def explicit_jacobians(fn, z):
    """(n, D, d) per-row Jacobians of a row-wise fn, by reverse-mode autograd one output at a time."""
    n = z.shape[0]
    jac = torch.autograd.functional.jacobian(fn, z)  # (n, *out, n, *lat): one forward pass
    out_numel = jac[0].numel() // (n * z[0].numel())
    jac = jac.reshape(n, out_numel, n, z[0].numel())
    return torch.stack([jac[i, :, i] for i in range(n)])


def explicit_distortion(jacs, u):
    """The measure from explicit Jacobians (n, D, d) and probes (P, n, d) in float64."""
    ju = torch.einsum("nDd,pnd->pnD", jacs, u)
    jtju = torch.einsum("nDd,pnD->pnd", jacs, ju)
    return jtju.pow(2).sum(-1).mean() / ju.pow(2).sum(-1).mean() ** 2


# ------------------------------------------------------------------ linear maps


@pytest.mark.parametrize("method", METHODS)
def test_linear_products_equal_matrix_products(method):
    n, d, D = 3, 5, 7
    W = torch.randn(D, d, dtype=torch.float64)
    z = torch.randn(n, d, dtype=torch.float64)
    u = torch.randn(n, d, dtype=torch.float64)
    y, ju, jtju = ji.jacobian_products(lambda t: t @ W.T, z, u, method=method)
    torch.testing.assert_close(y, z @ W.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ju, u @ W.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jtju, u @ (W.T @ W), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_linear_value_equals_explicit_with_same_probes(method):
    n, d, D, P = 4, 3, 6, 3
    W = torch.randn(D, d, dtype=torch.float64)
    z = torch.randn(n, d, dtype=torch.float64)
    u = torch.randn(P, n, d, dtype=torch.float64)
    got = ji.relaxed_distortion(lambda t: t @ W.T, z, probes=u, method=method)
    A = W.T @ W
    want = (u @ A).pow(2).sum(-1).mean() / (u @ W.T).pow(2).sum(-1).mean() ** 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    num, den = ji.distortion_terms(lambda t: t @ W.T, z, probes=u, method=method)
    torch.testing.assert_close(num, (u @ A).pow(2).sum(-1).mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(den, (u @ W.T).pow(2).sum(-1).mean(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_one_anchor_and_generator_draws(method):
    # n = 1 anchor with a (1, 5) latent; the probes come from the generator: the same seed gives
    # the same probes (so the same value), and the value equals the explicit formula with them
    d, D, P = 5, 3, 4
    W = torch.randn(D, d, dtype=torch.float64)
    z = torch.randn(1, 1, d, dtype=torch.float64)
    fn = lambda t: t @ W.T  # noqa: E731
    seed = int(torch.randint(0, 2**31, ()))
    got = ji.relaxed_distortion(fn, z, probes=P, generator=torch.Generator().manual_seed(seed), method=method)
    u = torch.randn((P, 1, 1, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    A = W.T @ W
    want = (u @ A).pow(2).sum(-1).mean() / (u @ W.T).pow(2).sum(-1).mean() ** 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_linear_many_probes_approach_trace_ratio():
    # tr(A^2)/tr(A)^2 with A = W^T W; M = n*P Gaussian probes. Var(u^T B u) = 2 tr(B^2) for
    # symmetric B, so the relative standard errors are sqrt(2 tr(A^4)/M)/tr(A^2) (numerator)
    # and sqrt(2 tr(A^2)/M)/tr(A) (denominator); the ratio's error is below s_num + 2 s_den
    # (first order), and the test allows 5 times that.
    n, P, d, D = 500, 8, 6, 9
    W = torch.randn(D, d, dtype=torch.float64)
    W[:, 0] *= 3.0  # clearly anisotropic
    A = W.T @ W
    tr = lambda m: torch.trace(m).item()  # noqa: E731
    want = tr(A @ A) / tr(A) ** 2
    M = n * P
    s_num = math.sqrt(2 * tr(A @ A @ A @ A) / M) / tr(A @ A)
    s_den = math.sqrt(2 * tr(A @ A) / M) / tr(A)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    z = torch.randn(n, d, dtype=torch.float64)
    got = ji.relaxed_distortion(lambda t: t @ W.T, z, probes=P, generator=g, create_graph=False).item()
    assert abs(got / want - 1) < 5 * (s_num + 2 * s_den), (got, want, s_num, s_den)
    assert want > 1.2 / d  # the anisotropic map is well above the minimum


@pytest.mark.parametrize("method", METHODS)
def test_scaled_orthogonal_map_reaches_the_minimum(method):
    # W = c Q with Q^T Q = I: ||A u||^2 = c^4 ||u||^2, ||J u||^2 = c^2 ||u||^2, so with the same
    # probes L = 1 / mean ||u||^2 exactly, whatever c (the measure has no preferred scale).
    n, d, D, P = 5, 4, 7, 2
    Q, _ = torch.linalg.qr(torch.randn(D, d, dtype=torch.float64))
    z = torch.randn(n, d, dtype=torch.float64)
    u = torch.randn(P, n, d, dtype=torch.float64)
    for c in (0.3, 1.0, 17.0):
        W = c * Q
        got = ji.relaxed_distortion(lambda t: t @ W.T, z, probes=u, method=method)
        torch.testing.assert_close(got, 1 / u.pow(2).sum(-1).mean(), rtol=1e-10, atol=0)
    # an anisotropic map is not at the minimum with the same probes
    W = Q * torch.tensor([1.0, 1.0, 1.0, 1.5], dtype=torch.float64)
    got = ji.relaxed_distortion(lambda t: t @ W.T, z, probes=u, method=method)
    assert got > 1.05 / u.pow(2).sum(-1).mean()


def test_row_dependent_scale_is_penalised():
    # J_i = c_i I: a local isometry at every anchor but with a scale that depends on z. With the
    # same probes, L = mean(c^4 |u|^2) / mean(c^2 |u|^2)^2, and in expectation (many probes)
    # d L = mean(c^4) / mean(c^2)^2 > 1.
    n, d, P = 400, 5, 4
    c = torch.rand(n, dtype=torch.float64) * 2 + 0.5
    z = torch.randn(n, d, dtype=torch.float64)
    u = torch.randn(P, n, d, dtype=torch.float64)
    fn = lambda t: c[:, None] * t  # noqa: E731
    got = ji.relaxed_distortion(fn, z, probes=u)
    uu = u.pow(2).sum(-1)
    want = (c ** 4 * uu).mean() / ((c ** 2 * uu).mean()) ** 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    normalized = ji.relaxed_distortion(fn, z, probes=u, normalize=True)
    torch.testing.assert_close(normalized, d * want - 1, rtol=1e-12, atol=1e-12)
    expected = (c ** 4).mean() / (c ** 2).mean() ** 2 - 1
    assert expected > 0.1 and abs(normalized.item() - expected.item()) < 0.35 * expected.item()


# ------------------------------------------------------------------ nonlinear MLP


def make_mlp(d, D, hidden=6):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                               torch.nn.SiLU(), torch.nn.Linear(hidden, D)).double()


@pytest.mark.parametrize("method", METHODS)
def test_mlp_products_match_autograd_jacobian(method):
    n, d, D = 3, 5, 7
    mlp = make_mlp(d, D)
    z = torch.randn(n, d, dtype=torch.float64)
    u = torch.randn(n, d, dtype=torch.float64)
    jacs = explicit_jacobians(mlp, z)
    _, ju, jtju = ji.jacobian_products(mlp, z, u, method=method)
    want_ju = torch.einsum("nDd,nd->nD", jacs, u)
    torch.testing.assert_close(ju, want_ju, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jtju, torch.einsum("nDd,nD->nd", jacs, want_ju), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_mlp_parameter_gradient_matches_explicit_and_finite_differences(method):
    n, d, D, P = 3, 4, 5, 2
    mlp = make_mlp(d, D)
    params = list(mlp.parameters())
    z = torch.randn(n, d, dtype=torch.float64)
    u = torch.randn(P, n, d, dtype=torch.float64)
    loss = ji.relaxed_distortion(mlp, z, probes=u, method=method)
    # the last bias does not change the Jacobian: its gradient is None (unused) on both routes
    grads = [torch.zeros_like(p) if g is None else g
             for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    assert params[-1].shape == (D,) and not grads[-1].any()
    # the same probes through explicit Jacobians built with create_graph
    jacs = torch.stack([torch.autograd.functional.jacobian(mlp, z[i], create_graph=True) for i in range(n)])
    ref = explicit_distortion(jacs, u)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-10, atol=0)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-8, atol=1e-12)
    # a directional finite difference that does not use autograd for the parameters
    dirs = [torch.randn_like(p) for p in params]
    h = 1e-5

    def value_at(step):
        with torch.no_grad():
            for p, v in zip(params, dirs):
                p.add_(step * v)
        try:
            return ji.relaxed_distortion(mlp, z, probes=u, method=method, create_graph=False).item()
        finally:
            with torch.no_grad():
                for p, v in zip(params, dirs):
                    p.sub_(step * v)

    fd = (value_at(h) - value_at(-h)) / (2 * h)
    analytic = sum((g * v).sum() for g, v in zip(grads, dirs)).item()
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (fd, analytic)


def test_methods_agree_and_evaluation_is_detached():
    n, d, D = 4, 3, 5
    mlp = make_mlp(d, D)
    z = torch.randn(n, d, dtype=torch.float64)
    u = torch.randn(2, n, d, dtype=torch.float64)
    a = ji.relaxed_distortion(mlp, z, probes=u, method="jvp")
    b = ji.relaxed_distortion(mlp, z, probes=u, method="double_backward")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    with torch.no_grad():  # evaluation under no_grad still works and gives a detached value
        c = ji.relaxed_distortion(mlp, z, probes=u, create_graph=False)
    assert not c.requires_grad
    torch.testing.assert_close(c, a.detach(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the project's EDM networks


def tiny_edm(res=6, channels=3, label_dim=3, dropout=0.3, attn=(3,)):
    cfg = {"arch": "SongUNet", "sigma_data": 0.5, "label_dim": label_dim,
           "model": dict(img_resolution=res, in_channels=channels, out_channels=channels, label_dim=label_dim,
                         model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=list(attn),
                         dropout=dropout, label_dropout=0.2 if label_dim else 0.0)}
    net = build_denoiser(cfg)
    with torch.no_grad():  # random weights everywhere (zero-initialised layers would hide mistakes)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.train()


def test_edm_unet_products_with_dropout_match_explicit_jacobian():
    # float64, train mode with dropout 0.3 and label dropout: the same RNG state gives the same
    # masks in the explicit Jacobian's single forward pass, so J u and J^T J u must match it.
    # (double_backward runs a plain forward; torch.func.jvp draws its masks in another order, so
    # the jvp route is checked against the explicit Jacobian without dropout, and for mask
    # consistency in test_edm_unet_dropout_mask_is_shared.)
    for method, dropout in (("double_backward", 0.3), ("jvp", 0.0)):
        net = tiny_edm(dropout=dropout).double()
        n, s = 2, 2.5
        labels = torch.tensor([0, 2])
        fn = lambda t: net(t, torch.full((t.shape[0],), s, dtype=t.dtype), labels)  # noqa: E731
        z = s * torch.randn(n, 3, 6, 6, dtype=torch.float64)
        u = torch.randn_like(z)
        seed = int(torch.randint(0, 2**31, ()))
        torch.manual_seed(seed)
        y, ju, jtju = ji.jacobian_products(fn, z, u, method=method)
        torch.manual_seed(seed)
        jacs = explicit_jacobians(fn, z)
        torch.manual_seed(seed)
        torch.testing.assert_close(y, fn(z).detach(), rtol=1e-10, atol=1e-12)
        want_ju = torch.einsum("nDd,nd->nD", jacs, u.flatten(1))
        torch.testing.assert_close(ju.flatten(1), want_ju, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(jtju.flatten(1), torch.einsum("nDd,nD->nd", jacs, want_ju),
                                   rtol=1e-9, atol=1e-11)
        if dropout:  # another mask gives another Jacobian: the dropout check above can fail
            torch.manual_seed(seed + 1)
            assert (explicit_jacobians(fn, z) - jacs).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_edm_unet_dropout_mask_is_shared(method):
    # <J2^T J1 u, u> = <J1 u, J2 u> equals ||J1 u||^2 for every u only if the tangent's Jacobian J1
    # and the vjp's J2 are the same, i.e. J u and the vjp saw the same dropout masks.
    net = tiny_edm(dropout=0.5).double()
    labels = torch.tensor([1, 0, 2])
    fn = lambda t: net(t, 2.5, labels)  # noqa: E731
    z = 2.5 * torch.randn(3, 3, 6, 6, dtype=torch.float64)
    u = torch.randn_like(z)
    _, ju, jtju = ji.jacobian_products(fn, z, u, method=method)
    torch.testing.assert_close((jtju * u).flatten(1).sum(1), ju.flatten(1).pow(2).sum(1), rtol=1e-10, atol=0)
    # the identity is sensitive to the masks: a second call draws other masks, and the first
    # call's J^T J u does not satisfy it with the second call's J u
    _, ju2, _ = ji.jacobian_products(fn, z, u, method=method)
    assert not torch.allclose((jtju * u).flatten(1).sum(1), ju2.flatten(1).pow(2).sum(1), rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_edm_unet_training_term_reaches_parameters(method):
    net = tiny_edm(res=6, channels=3, label_dim=0, dropout=0.1)  # float32, as in training
    n, s = 2, 2.5
    fn = lambda t: net(t, torch.full((t.shape[0],), s), None)  # noqa: E731
    z = s * torch.randn(n, 3, 6, 6)
    u = torch.randn(2, n, 3, 6, 6)
    seed = int(torch.randint(0, 2 ** 31, ()))
    torch.manual_seed(seed)  # the same dropout masks for the term and the explicit Jacobian
    loss = ji.relaxed_distortion(fn, z, probes=u, method=method)
    assert loss.ndim == 0 and torch.isfinite(loss)
    if method == "double_backward":  # (torch.func.jvp draws its masks in another order)
        torch.manual_seed(seed)  # one forward, hence one set of masks, per probe, in order
        num = den = 0.0
        for p in range(2):
            jacs = explicit_jacobians(fn, z).double()
            ju = torch.einsum("nDd,nd->nD", jacs, u[p].reshape(n, -1).double())
            num = num + torch.einsum("nDd,nD->nd", jacs, ju).pow(2).sum(-1).mean() / 2
            den = den + ju.pow(2).sum(-1).mean() / 2
        want = num / den ** 2
        assert abs(loss.item() - want.item()) <= 1e-4 * want.item()
    loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    # the output layer's bias does not change the Jacobian (double_backward leaves it None)
    missing = [name for name, g in grads.items() if g is None]
    assert set(missing) <= {"model.dec.6x6_aux_conv.bias"}, missing
    grads = {name: g for name, g in grads.items() if g is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    nonzero = sum(bool(g.abs().max() > 0) for g in grads.values())
    assert nonzero >= 0.9 * len(grads), (nonzero, len(grads))


@pytest.mark.parametrize("method", METHODS)
def test_edm_unet_gradient_matches_explicit_formula_float64(method):
    # the parameter gradient through the whole U-Net against autograd of the explicit-Jacobian
    # formula with the same probes (dropout off: the explicit route runs many passes)
    net = tiny_edm(res=4, channels=1, label_dim=0, dropout=0.0, attn=(2,)).double()
    n, s = 2, 2.5
    fn = lambda t: net(t, torch.full((t.shape[0],), s, dtype=t.dtype), None)  # noqa: E731
    z = s * torch.randn(n, 1, 4, 4, dtype=torch.float64)
    u = torch.randn(1, n, 16, dtype=torch.float64)
    params = [p for p in net.parameters()]
    loss = ji.relaxed_distortion(fn, z, probes=u.reshape(1, n, 1, 4, 4), method=method)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    jacs = torch.stack([torch.autograd.functional.jacobian(lambda t: fn(t[None])[0], z[i], create_graph=True)
                        .reshape(16, 16) for i in range(n)])
    ref = explicit_distortion(jacs, u)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-9, atol=0)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for p, g, r in zip(params, grads, ref_grads):  # None: a parameter that does not change J (output bias)
        torch.testing.assert_close(torch.zeros_like(p) if g is None else g, torch.zeros_like(p) if r is None else r,
                                   rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_mlp_denoiser_odd_latent(method):
    cfg = {"arch": "MLPDenoiserNet", "sigma_data": 0.5, "label_dim": 0,
           "model": dict(dim=7, label_dim=0, hidden=16, num_blocks=2, noise_channels=8, emb_channels=16,
                         dropout=0.2)}
    net = build_denoiser(cfg).double().train()
    fn = lambda t: net(t, 2.5)  # noqa: E731
    z = torch.randn(3, 7, dtype=torch.float64)
    u = torch.randn(3, 7, dtype=torch.float64)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    _, ju, jtju = ji.jacobian_products(fn, z, u, method=method)
    torch.manual_seed(seed)
    jacs = explicit_jacobians(fn, z)
    want_ju = torch.einsum("nDd,nd->nD", jacs, u)
    torch.testing.assert_close(ju, want_ju, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(jtju, torch.einsum("nDd,nD->nd", jacs, want_ju), rtol=1e-9, atol=1e-11)


def test_gradient_checkpointing_needs_double_backward():
    net = tiny_edm(label_dim=0, dropout=0.0).double()
    fn = lambda t: net(t, 2.5)  # noqa: E731
    z = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    u = torch.randn(1, 2, 3, 6, 6, dtype=torch.float64)
    # all but the output bias, which does not change J
    params = [p for name, p in net.named_parameters() if name != "model.dec.6x6_aux_conv.bias"]
    plain = ji.relaxed_distortion(fn, z, probes=u, method="double_backward")
    g_plain = torch.autograd.grad(plain, params)
    set_gradient_checkpointing(net)
    with pytest.raises(ValueError, match="double_backward"):
        ji.relaxed_distortion(fn, z, probes=u, method="jvp")
    ckpt = ji.relaxed_distortion(fn, z, probes=u, method="double_backward")
    torch.testing.assert_close(ckpt, plain, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(ckpt, params), g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(probes=0), "probes must be >= 1"),
    (dict(probes=-2), "probes must be >= 1"),
    (dict(probes=1.5), "probes must be an int"),
    (dict(probes=True), "probes must be an int"),
    (dict(probes=torch.zeros(1, 3, 2)), "probes tensor must have shape"),
    (dict(method="fd"), "method must be one of"),
])
def test_bad_arguments(kwargs, match):
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        ji.relaxed_distortion(lambda t: 2 * t, z, **kwargs)


@pytest.mark.parametrize("z, match", [
    (torch.zeros(0, 3), "at least 1 anchor"),
    (torch.zeros(2, 3, dtype=torch.int64), "floating"),
    (torch.zeros(3), "shape \\(n, \\*latent_shape\\)"),
    ([[0.0, 1.0]], "must be a tensor"),
])
def test_bad_anchors(z, match):
    with pytest.raises(ValueError, match=match):
        ji.relaxed_distortion(lambda t: 2 * t, z)


def test_bad_fn_output_and_latent_dim():
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="one output row per anchor"):
        ji.relaxed_distortion(lambda t: t[:2], z)
    with pytest.raises(ValueError, match="probe u must have"):
        ji.jacobian_products(lambda t: t, z, torch.randn(3, 3))
    with pytest.raises(ValueError, match="latent_dim"):
        ji.normalized_distortion(torch.tensor(0.5), 0)
