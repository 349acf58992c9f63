"""SiDA (issue 23): the fake-score network's encoder logits, the discriminator and generator
terms and one whole SiDA iteration, against a float64 re-statement of the official formulas
(tests/oracles.py, always), and against the official functions themselves when a checkout of
mingyuanzhou/SiD's sida branch is named by GSD_SIDA_REPO (skipped without it: the official
code is not part of this repository)."""

import copy
import os
import sys

import pytest
import torch

import oracles
from gsd.adversarial import discriminator_loss, generator_adversarial_loss
from gsd.data import Dataset, GaussianMixture, RealSamples
from gsd.distill import DistillConfig, Distiller
from gsd.objective.generator import sigma_schedule
from gsd.errors import UsageError
from gsd.models.networks import DhariwalUNet, EDMPrecond, MLPDenoiserNet, NCSNppUNet, build_denoiser
from factories import tiny_mlp, tiny_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturbed(net, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def _nets():
    ncsn = NCSNppUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                      num_blocks=1, attn_resolutions=[4], dropout=0.0, embedding_type="fourier",
                      channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])
    adm = DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, model_channels=64,
                       channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    ddpm = build_denoiser({"arch": "SongUNet", "sigma_data": 0.5, "label_dim": 0,
                           "model": dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)})
    mlp = build_denoiser({"arch": "MLPDenoiserNet", "sigma_data": 0.5, "label_dim": 0,
                          "model": dict(dim=5, hidden=16, num_blocks=3, noise_channels=8, emb_channels=16)})
    return {"ddpm++": ddpm, "ncsn++": EDMPrecond(ncsn, 0.5, 0), "adm": EDMPrecond(adm, 0.5, 4), "mlp": mlp}


def _encoder_output(net, x, sigma, labels):
    """The feature map the encoder ends with, caught by a hook (not the code under test)."""
    model = net.model
    last = (list(model.enc.values())[-1] if hasattr(model, "enc") else model.blocks[model.encoder_blocks - 1])
    seen = []
    handle = last.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        net(x, sigma, labels)
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("name", ["ddpm++", "ncsn++", "adm", "mlp"])
def test_encoder_logits_are_the_channel_mean_of_the_last_encoder_features(name):
    net = _perturbed(_nets()[name].double())
    n = 5
    x = torch.randn(n, *net.sample_shape, dtype=torch.float64)
    sigma = torch.rand(n, dtype=torch.float64) + 0.3
    labels = torch.arange(n) % 4 if name == "adm" else None
    plain = net(x, sigma, labels)
    out, logits = net(x, sigma, labels, return_logits=True)
    assert torch.equal(out, plain)  # the same pass, the output unchanged
    want = _encoder_output(net, x, sigma, labels).mean(dim=1, keepdim=True)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    # decoder_rows: the output of the first rows only, the logits of every row, from one pass
    part, all_logits = net(x, sigma, labels, return_logits=True, decoder_rows=2)
    torch.testing.assert_close(part, plain[:2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(all_logits, logits, rtol=1e-12, atol=1e-12)


def test_mlp_encoder_side_is_its_first_half():
    for blocks, encoder in ((1, 1), (2, 1), (3, 2), (4, 2)):
        net = MLPDenoiserNet(dim=2, num_blocks=blocks, hidden=8, noise_channels=4, emb_channels=8)
        assert net.encoder_blocks == encoder


# ------------------------------------------------------------------------------ the two terms

def test_discriminator_term_matches_the_float64_formula():
    n = 7
    lf = torch.randn(n, 1, 3, 3, requires_grad=True)
    lr = torch.randn(n, 1, 3, 3, requires_grad=True)
    sigma = torch.rand(n) * 3 + 0.05
    keep = torch.tensor([True, True, False, True, True, True, True])
    got = discriminator_loss(lf, lr, sigma, keep)
    want = oracles.sida_discriminator(lf[keep], lr[keep], sigma[keep]) * keep.sum() / n
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    ga = torch.autograd.grad(got, (lf, lr))
    gb = torch.autograd.grad(want, (lf, lr))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-9)


def test_generator_term_matches_the_float64_formula():
    n = 6
    logits = (3 * torch.randn(n, 1, 2, 2)).requires_grad_(True)  # some beyond the +-10 clamp
    logits.data[0, 0, 0, 0] = 14.0
    x = torch.randn(n, 1, 8, 8, requires_grad=True)
    y_real = x.detach() + 0.1 * torch.randn(n, 1, 8, 8)
    keep = torch.ones(n, dtype=torch.bool)
    got = generator_adversarial_loss(logits, x, y_real, keep, loss_scale=0.01, gen_loss_scale=100.0) * 100.0
    want = oracles.sida_generator(logits, x, y_real, loss_scale=0.01)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(torch.autograd.grad(got, (logits, x), allow_unused=True),
                    torch.autograd.grad(want, (logits, x), allow_unused=True)):
        if b is None:  # the weight carries no gradient: x enters only through it
            assert a is None or float(a.abs().max()) == 0
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------ one whole iteration

def _digits_like(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return Dataset("digits", data, torch.arange(n) % 10, 10, (1, 8, 8))


def _sida(**kw):
    cfg = dict(batch=4, lr=1e-3, lambda_adv=0.5, adv_g_warmup=0, adv_mix_warmup=0, dropout=0.0, seed=3)
    cfg.update(kw)
    return Distiller(tiny_unet(1), DistillConfig(**cfg), init=tiny_unet(2),
                     real_data=RealSamples(_digits_like(), conditional=False))


def _loop_update(opt, loss, clip=None) -> float:
    """The official loop's update: backward, nan_to_num, (SiDA) clip by value, Adam. Returns the
    largest gradient entry before clipping (so a test can show the clip was active)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    largest = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
    if clip is not None:
        torch.nn.utils.clip_grad_value_(params, clip)
    opt.step()
    return largest



@pytest.fixture
def float64_default():
    """Everything in float64, the Distiller's draws included (torch's default dtype)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _assert_same_parameters(d, fake, gen):
    """f_psi and G of the Distiller equal the replayed copies after an iteration. atol 1e-4 of an
    Adam step, not float64's 1e-12: the adversarial terms compute in float32, as the official loss
    does (it casts SiD's weight factor and the BCE; gsd/adversarial.py follows), and where a
    gradient entry sits near Adam's eps that rounding is a visible share of its step."""
    lr = d.config.lr
    for a, b in zip(list(d.fake.parameters()) + list(d.generator.parameters()),
                    list(fake.parameters()) + list(gen.parameters())):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * lr)


def test_two_sida_iterations_match_the_float64_restatement_after_adam(float64_default):
    """Fake-score steps with the discriminator and generator steps with the adversarial term,
    replayed with copies of the networks, the same draws, the float64 formulas of tests/oracles.py
    and the loop's update (clip by value, Adam). Two iterations and a discriminator scale that
    pushes gradients past the clip: Adam's first step is lr * sign(g) whatever g's size."""
    d = _float64(_sida(adv_loss_scale_d=50.0))
    c = d.config
    data = d.real_data.dataset.data
    teacher, gen, fake = d.teacher, copy.deepcopy(d.generator), copy.deepcopy(d.fake)
    adam = dict(lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps)
    opt_f, opt_g = torch.optim.Adam(fake.parameters(), **adam), torch.optim.Adam(gen.parameters(), **adam)
    rng = torch.Generator()
    rng.set_state(d.rng.get_state())
    n, largest = c.batch, []
    for _ in range(2):
        out = d.step()
        # fake-score step: real samples, latents, sigma, noise, in the Distiller's order
        real = data[torch.randint(0, data.shape[0], (n,), generator=rng)]
        eps = torch.randn(n, 1, 8, 8, generator=rng)
        with torch.no_grad():
            x_g = gen.eval()(c.sigma_init * eps, torch.full((n,), c.sigma_init))
        sigma = (torch.randn(n, generator=rng) * c.p_std + c.p_mean).exp()
        noise = torch.randn(n, 1, 8, 8, generator=rng)
        fake.train()
        y_fake, logit_fake = fake(x_g + sigma[:, None, None, None] * noise, sigma, return_logits=True)
        _, logit_real = fake(real + sigma[:, None, None, None] * noise, sigma, return_logits=True)
        loss_f = oracles.fake_score(y_fake, x_g, sigma)
        loss_d = oracles.sida_discriminator(logit_fake, logit_real, sigma)
        largest.append(_loop_update(opt_f, loss_f + c.adv_loss_scale_d * loss_d, clip=c.adv_clip))
        assert out["loss_fake"] == pytest.approx(float(loss_f.detach()), rel=1e-6)
        assert out["loss_d"] == pytest.approx(float(loss_d.detach()), rel=1e-6)

        # generator step: SiDA's 0.5 L_sid + 0.5 L_gan, with the fake score just updated
        eps = torch.randn(n, 1, 8, 8, generator=rng)
        t = torch.rand(n, generator=rng) * (c.tmax / 1000.0)
        noise = torch.randn(n, 1, 8, 8, generator=rng)
        x = gen.train()(c.sigma_init * eps, torch.full((n,), c.sigma_init))
        s = sigma_schedule(t, c.sigma_min, c.sigma_max, c.rho)
        x_t = x + s[:, None, None, None] * noise
        fake.eval()
        y_real = teacher(x_t, s)
        y_fake, logits = fake(x_t, s, return_logits=True)
        total = 0.5 * c.gen_loss_scale * oracles.sid_generator(x, y_real, y_fake, alpha=c.alpha) \
            + 0.5 * oracles.sida_generator(logits, x, y_real, loss_scale=c.adv_loss_scale_g)
        _loop_update(opt_g, total)
        assert out["loss_gen"] * c.gen_loss_scale == pytest.approx(float(total.detach()), rel=1e-6)
        _assert_same_parameters(d, fake, gen)
    assert max(largest) > c.adv_clip, f"the clip was never active (largest gradient {max(largest):.3g})"


def test_the_warm_ups_hold_g_then_mix_the_term_in():
    d = _sida(adv_g_warmup=8, adv_mix_warmup=12)  # batch 4: G first steps at 12 images, mixes at 16
    before = [p.detach().clone() for p in d.generator.parameters()]
    held = [d.step() for _ in range(3)]  # images seen 0, 4, 8 before each: G held
    assert all("loss_gen" not in o and "loss_d" in o for o in held)
    assert all(torch.equal(a, b) for a, b in zip(before, d.generator.parameters()))
    o = d.step()  # 12 images seen: G steps, without the adversarial term
    assert "loss_gen" in o and "loss_adv" not in o
    o = d.step()  # 16: mixed in
    assert "loss_adv" in o and o["loss_adv"] > 0


def test_gmm_draws_its_real_samples_from_the_mixture():
    mix = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), stds=0.01)
    ds = Dataset("gmm", mix.sample(10)[0], None, 0, (2,), mix)
    real = RealSamples(ds, conditional=False)
    x, labels = real.sample(4000, torch.Generator().manual_seed(0), "cpu")
    assert labels is None and x.shape == (4000, 2)
    assert float((x[:, 0].abs() - 1).abs().max()) < 0.1 and abs(float((x[:, 0] > 0).float().mean()) - 0.5) < 0.05
    d = Distiller(tiny_mlp(seed=1), DistillConfig(batch=8, lr=1e-3, lambda_adv=0.5, adv_g_warmup=0,
                                                  adv_mix_warmup=0), init=tiny_mlp(seed=2), real_data=real)
    out = d.step()
    assert out["loss_d"] > 0 and out["loss_adv"] > 0


@pytest.mark.parametrize("kw,match", [
    (dict(lambda_adv=-0.1), "--lambda-adv"), (dict(lambda_adv=1.5), "--lambda-adv"),
    (dict(lambda_adv=float("nan")), "--lambda-adv"), (dict(adv_loss_scale_g=-1.0), "--adv-loss-scale-g"),
    (dict(adv_loss_scale_d=float("inf")), "--adv-loss-scale-d"), (dict(adv_g_warmup=-5), "--adv-g-warmup"),
    (dict(adv_clip=0.0), "--adv-clip"), (dict(lambda_adv=0.5, lambda_sid=0.0, lambda_irl_raw=1.0), "--lambda-sid 0"),
])
def test_bad_adversarial_settings_are_usage_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        DistillConfig(batch=4, **kw).validate()


def test_the_discriminator_needs_real_samples():
    with pytest.raises(UsageError, match="real samples"):
        Distiller(tiny_unet(1), DistillConfig(batch=4, lambda_adv=0.5), init=tiny_unet(2))


# ------------------------------------------------------------------------------ the official code

OFFICIAL = os.environ.get("GSD_SIDA_REPO")


@pytest.fixture(scope="module")
def official_loss():
    if not OFFICIAL:
        pytest.skip("set GSD_SIDA_REPO to a checkout of mingyuanzhou/SiD's sida branch to compare with it")
    sys.path.insert(0, OFFICIAL)
    try:
        from sida_training.sida_loss import SIDA_EDMLoss
    finally:
        sys.path.remove(OFFICIAL)
    return SIDA_EDMLoss()


def _grad_rel_err(net, ref) -> float:
    """||g - g_ref|| / ||g_ref|| over all parameters (float32 passes: elementwise ratios of
    near-zero entries say nothing)."""
    a = torch.cat([p.grad.double().flatten() for p in net.parameters()])
    b = torch.cat([p.grad.double().flatten() for p in ref.parameters()])
    err = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    print(f"relative gradient error {err:.2e}")
    return err


def _as_official(net):
    """Our network with the official networks' call: (x, sigma, labels, augment_labels, return_flag)."""
    def call(x, sigma, labels=None, augment_labels=None, return_flag="decoder"):
        if return_flag == "decoder":
            return net(x, sigma, labels)
        out, logits = net(x, sigma, labels, return_logits=True)
        return logits if return_flag == "encoder" else (out, logits)
    return call


def _float64(d):
    """The Distiller's networks in float64 (it keeps them in float32): both sides then compute
    in float64, so that the comparison sees the formulas, not float32 rounding of the SiD
    term's near-cancelling gradient (~2e-4 relative here in float32)."""
    for net in (d.generator, d.fake, d.teacher):
        net.double()
    return d


def test_fake_score_and_discriminator_equal_the_official_functions(official_loss):
    d = _float64(_sida(batch=6))
    c = d.config
    n = 6
    x_g = d.generate(torch.randn(n, 1, 8, 8, dtype=torch.float64), ema=False).double()
    real = d.real_data.dataset.data[:n].double()
    fake_ref = copy.deepcopy(d.fake)
    torch.manual_seed(11)
    loss, loss_d = official_loss.fakescore_discriminator_share_encoder_loss(
        fake_score=_as_official(fake_ref), images=x_g, real_images=real)
    ref = loss.sum() * 1.0 / n + loss_d.sum() * c.adv_loss_scale_d / n  # the loop's reductions
    ref.backward()
    torch.manual_seed(11)  # the same draws: sigma (float32, as the official code draws it), then the noise
    sigma = (torch.randn(n, 1, 1, 1) * c.p_std + c.p_mean).exp().reshape(n).double()
    noise = torch.randn_like(x_g)
    mine_f, mine_d, keep = d.fake_score_terms(x_g, sigma, noise, None, real)
    mine = mine_f * c.fake_loss_scale + mine_d * c.adv_loss_scale_d
    mine.backward()
    # 1e-6, not float64's 1e-12: the official code draws sigma and t in float32 and computes
    # lambda(sigma) and the sigma schedule from them in float32
    assert bool(keep.all()) and float(mine) == pytest.approx(float(ref), rel=1e-6)
    assert _grad_rel_err(d.fake, fake_ref) < 1e-6


def test_generator_terms_equal_the_official_functions(official_loss):
    d = _float64(_sida(batch=6))
    c = d.config
    n = 6
    eps = torch.randn(n, 1, 8, 8, dtype=torch.float64)
    gen_ref = copy.deepcopy(d.generator)
    x_ref = gen_ref(c.sigma_init * eps, torch.full((n,), c.sigma_init))
    d.fake.eval()
    torch.manual_seed(5)
    loss, loss_gan = official_loss.generator_share_encoder_loss(
        true_score=_as_official(d.teacher), fake_score=_as_official(copy.deepcopy(d.fake).eval()), images=x_ref,
        alpha=c.alpha, tmax=c.tmax)
    loss_gan = loss_gan.mean(dim=[1, 2, 3], keepdim=True) * x_ref[0].numel()
    ref = 0.5 * loss.sum() * c.gen_loss_scale / n + 0.5 * loss_gan.sum() * c.adv_loss_scale_g / n
    ref.backward()
    torch.manual_seed(5)  # the same draws: t (float32, as the official code draws it), then the noise
    t = (torch.rand(n, 1, 1, 1).reshape(n) * c.tmax / 1000).double()
    noise = torch.randn_like(x_ref)
    d.generator.zero_grad(set_to_none=True)
    mine, parts = d.generator_loss(eps, t=t, noise=noise)
    (mine * c.gen_loss_scale).backward()
    assert float(mine) * c.gen_loss_scale == pytest.approx(float(ref), rel=1e-6)
    assert _grad_rel_err(d.generator, gen_ref) < 1e-6


def _seeded_global(rng: torch.Generator, call):
    """Run `call` with torch's global generator in `rng`'s state (the official functions draw
    sigma, t and noise from the global generator), then hand the advanced state back to `rng`:
    the official code then consumes exactly the draws the Distiller made in the same order."""
    saved = torch.get_rng_state()
    torch.set_rng_state(rng.get_state())
    try:
        return call()
    finally:
        rng.set_state(torch.get_rng_state())
        torch.set_rng_state(saved)



def test_two_sida_iterations_equal_the_official_functions_after_adam(official_loss, float64_default):
    """The official loop's iteration after both warm-ups, assembled from the official functions:
    fake-score step (fakescore_discriminator_share_encoder_loss, the loop's reductions, clipping
    by value at 1, Adam), then the generator step (generator_share_encoder_loss, its per-image
    rescaling, 0.5 L_sid + 0.5 L_gan, Adam), on copies of the Distiller's networks with its draws.
    Two iterations, because Adam's first step is lr * sign(g) whatever g's scale: only the second
    sees the clipping and the relative size of the gradients. adv_loss_scale_d 50 makes the
    discriminator's gradients exceed the clip value, so the clipping is exercised. Everything in
    float64 (default dtype), draws included: in float32, Adam's g / (sqrt(v) + eps) turns the
    rounding of gradients near eps into a visible share of a step."""
    d = _float64(_sida(batch=6, adv_loss_scale_d=50.0))
    c = d.config
    assert c.adv_clip == 1.0 and c.fake_loss_scale == 1.0  # the loop's clip value and loss_scaling
    n, data = c.batch, d.real_data.dataset.data
    teacher, gen, fake = d.teacher, copy.deepcopy(d.generator), copy.deepcopy(d.fake)
    adam = dict(lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps)
    opt_f, opt_g = torch.optim.Adam(fake.parameters(), **adam), torch.optim.Adam(gen.parameters(), **adam)
    rng = torch.Generator()
    rng.set_state(d.rng.get_state())
    largest = []
    for _ in range(2):
        out = d.step()

        # fake score f_psi with the discriminator
        real = data[torch.randint(0, data.shape[0], (n,), generator=rng)]
        eps = torch.randn(n, 1, 8, 8, generator=rng)
        with torch.no_grad():
            x_g = gen.eval()(c.sigma_init * eps, torch.full((n,), c.sigma_init))
        fake.train()
        loss, loss_d = _seeded_global(rng, lambda: official_loss.fakescore_discriminator_share_encoder_loss(
            fake_score=_as_official(fake), images=x_g, real_images=real))
        loss, loss_d = loss.sum() * (1.0 / n), loss_d.sum() * (c.adv_loss_scale_d / n)
        largest.append(_loop_update(opt_f, loss + loss_d, clip=1))
        assert out["loss_d"] == pytest.approx(float(loss_d.detach()) / c.adv_loss_scale_d, rel=1e-5)

        # generator G_theta, past both warm-ups (the engine's are 0 here)
        eps = torch.randn(n, 1, 8, 8, generator=rng)
        x = gen.train()(c.sigma_init * eps, torch.full((n,), c.sigma_init))
        fake.eval()
        loss, loss_gan = _seeded_global(rng, lambda: official_loss.generator_share_encoder_loss(
            true_score=_as_official(teacher), fake_score=_as_official(fake), images=x, alpha=c.alpha,
            tmax=c.tmax))
        loss_gan = loss_gan.mean(dim=[1, 2, 3], keepdim=True) * x[0].numel()
        total = 0.5 * loss.sum() * (c.gen_loss_scale / n) + 0.5 * loss_gan.sum() * (c.adv_loss_scale_g / n)
        _loop_update(opt_g, total)
        assert out["loss_gen"] * c.gen_loss_scale == pytest.approx(float(total.detach()), rel=1e-5)
        _assert_same_parameters(d, fake, gen)
    assert max(largest) > 1.0, f"the clip was never active (largest fake-score gradient {max(largest):.3g})"
