"""Wiring of the SiD + IRL iteration (gsd.distill) on tiny networks."""

import copy
import math

import pytest
import torch

import gsd_kernels
from gsd.errors import UsageError
from gsd.distill import DistillConfig, Distiller, ema_beta
from gsd.objective.generator import sigma_schedule
from factories import tiny_mlp, tiny_unet
from gsd.models.networks import build_denoiser


def make(cfg=None, teacher=None, init=None, **kw):
    cfg = cfg or DistillConfig(batch=8, lr=1e-3, **kw)
    teacher = teacher if teacher is not None else tiny_mlp(seed=1)
    return Distiller(teacher, cfg, init=init if init is not None else tiny_mlp(seed=2))


def grads(net):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def test_sigma_schedule_and_ema():
    t = torch.tensor([0.0, 1.0, 0.8])
    s = sigma_schedule(t, 0.002, 80.0, 7.0)
    assert s[0] == pytest.approx(0.002, rel=1e-5) and s[1] == pytest.approx(80.0, rel=1e-5)
    assert 20 < float(s[2]) < 30  # tmax = 800
    beta = ema_beta(64, 6400)
    assert beta ** 100 == pytest.approx(0.5)  # 100 iterations x 64 images = one half-life
    assert ema_beta(64, 0) == 0.0


def test_generator_gradient_is_sid_by_hand():
    """lambda_irl = 0: the generator gradient is that of the SiD formula written out here."""
    d = make(alpha=1.2, lambda_irl=0.0)
    c = d.config
    rng_copy = torch.Generator().manual_seed(0)
    rng_copy.set_state(d.rng.get_state())
    eps, _ = d._latents(c.batch)
    rng_copy.set_state(d.rng.get_state())  # the loss draws t and the noise after the latents

    d.generator.zero_grad()
    loss, parts = d.generator_loss(eps)
    (loss * c.gen_loss_scale).backward()
    got = grads(d.generator)
    # frozen: neither teacher nor fake score accumulate gradients
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.fake.parameters())

    gen = copy.deepcopy(d.generator)
    gen.zero_grad()
    x = gen(c.sigma_init * eps, torch.full((c.batch,), c.sigma_init))
    t = torch.rand(c.batch, generator=rng_copy) * c.tmax / 1000
    a, b = c.sigma_max ** (1 / c.rho), c.sigma_min ** (1 / c.rho)
    sigma = (a + (1 - t) * (b - a)) ** c.rho
    noise = torch.randn(x.shape, generator=rng_copy)
    x_t = x + sigma[:, None] * noise
    y_real = d.teacher(x_t, sigma)
    y_fake = d.fake(x_t, sigma)
    diff = y_real - y_fake
    w = (x - y_real).abs().mean(1).clamp_min(1e-5).detach()
    per = ((1 - c.alpha) * (diff ** 2).sum(1) + (diff * (y_fake - x)).sum(1)) / w
    ref_loss = per.mean()
    (100.0 * ref_loss).backward()
    want = grads(gen)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_irl_only_gradient_is_isometry_loss():
    d = make(lambda_sid=0.0, lambda_irl_raw=0.5)
    eps, _ = d._latents(d.config.batch)
    d.generator.zero_grad()
    loss, parts = d.generator_loss(eps)
    loss.backward()
    got = grads(d.generator)
    gen = copy.deepcopy(d.generator)
    gen.zero_grad()
    x = gen(2.5 * eps, torch.full((eps.shape[0],), 2.5))
    ref = 0.5 * gsd_kernels.isometry_loss(x, 2.5 * eps, backend="reference")
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for g1, g2 in zip(got, grads(gen)):
        torch.testing.assert_close(g1, g2)
    assert "loss_sid" not in parts and "loss_irl" in parts


@pytest.mark.skipif(len(gsd_kernels.available_backends(torch.device("cpu"))) < 2,
                    reason="no fused backend on CPU in this build")
def test_reference_and_fused_generator_gradients_agree():
    out = []
    for backend in ("reference", "auto"):
        d = make(DistillConfig(batch=8, lr=1e-3, lambda_irl=0.3, backend=backend))
        eps, _ = d._latents(8)
        d.generator.zero_grad()
        loss, _ = d.generator_loss(eps)
        loss.backward()
        out.append((float(loss.detach()), grads(d.generator)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-4)
    for g1, g2 in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-6)


def test_steps_train_and_ema_tracks():
    d = make(DistillConfig(batch=8, lr=1e-3, lambda_irl=0.1, ema_halflife=64))
    before = [p.detach().clone() for p in d.generator.parameters()]
    fake_before = [p.detach().clone() for p in d.fake.parameters()]
    for _ in range(3):
        out = d.step()
    assert out["iteration"] == 3 and out["images_seen"] == 24
    assert {"loss_fake", "loss_sid", "loss_irl", "loss_gen"} <= set(out)
    assert any(not torch.equal(a, p) for a, p in zip(before, d.generator.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(fake_before, d.fake.parameters()))
    # EMA lies between the start and the current weights (not equal to either)
    assert any(not torch.equal(e, p) for e, p in zip(d.ema_generator.parameters(), d.generator.parameters()))
    assert all(p.requires_grad is False for p in d.teacher.parameters())
    z = torch.randn(5, 2)
    assert d.generate(z).shape == (5, 2)


def test_state_dict_continues_bit_exactly():
    a = make(DistillConfig(batch=8, lr=1e-3, lambda_irl=0.2, ema_halflife=100))
    for _ in range(2):
        a.step()
    state = copy.deepcopy(a.state_dict())
    for _ in range(2):
        a.step()
    b = make(DistillConfig(batch=8, lr=1e-3, lambda_irl=0.2, ema_halflife=100))
    b.load_state_dict(state)
    for _ in range(2):
        b.step()
    for (k, va), (_, vb) in zip(a.weights().items(), b.weights().items()):
        assert torch.equal(va, vb), k


def test_injected_nan_is_dropped_counted_and_training_goes_on():
    d = make(DistillConfig(batch=8, lr=1e-3, lambda_irl=0.1))

    def hook(phase, x):
        if d.iteration == 1:  # second iteration: one NaN sample in both phases
            x = x.clone()
            x[3] = float("nan")
        return x

    d.nan_hook = hook
    outs = [d.step() for _ in range(3)]
    assert outs[0]["nan_samples"] == 0
    assert outs[1]["nan_samples"] == 2  # one in the fake-score step, one in the generator step
    assert math.isfinite(outs[1]["loss_gen"]) and math.isfinite(outs[1]["loss_fake"])
    assert outs[2]["nan_samples"] == 0
    assert d.totals["nan_iterations"] == 1 and d.totals["nan_samples"] == 2
    for net in (d.generator, d.fake, d.ema_generator):
        assert all(torch.isfinite(p).all() for p in net.parameters())


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def test_nonfinite_gradients_are_zeroed_and_counted():
    d = make(DistillConfig(batch=8, lr=1e-3))
    d.nan_hook = lambda phase, x: _NaNGrad.apply(x) if (phase == "generator" and d.iteration == 0) else x
    before = [p.detach().clone() for p in d.generator.parameters()]
    out = d.step()
    assert out["nan_grads"] == sum(p.numel() for p in d.generator.parameters())
    assert out["nan_samples"] == 0
    # every gradient value was zeroed: Adam (beta1 = 0) leaves the generator unchanged
    for a, p in zip(before, d.generator.parameters()):
        assert torch.isfinite(p).all() and torch.equal(a, p)
    out2 = d.step()
    assert out2["nan_grads"] == 0 and math.isfinite(out2["loss_gen"])
    assert d.totals["nan_iterations"] == 1


def test_image_generator_runs():
    t = tiny_unet(1)
    d = Distiller(t, DistillConfig(batch=4, lr=1e-4, lambda_irl=1.0), init=tiny_unet(2))
    out = d.step()
    assert math.isfinite(out["loss_gen"])
    assert d.generate(torch.randn(3, 1, 8, 8)).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("kw,match", [
    (dict(lambda_sid=0.0, lambda_irl=0.0), "both 0"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(tmax=0), "tmax"),
    (dict(tmax=1001), "tmax"),
    (dict(lambda_irl=1.0, batch=1), "batch"),
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.999)), "betas"),
])
def test_bad_config_is_usage_error(kw, match):
    cfg = DistillConfig(**{"batch": 8, **kw})
    with pytest.raises(UsageError, match=match):
        cfg.validate()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, "mixed"])
def test_networks_are_float32_whatever_the_teacher_dtype(dtype):
    """A teacher file's dtype must not become the training dtype (Adam's eps is 0 in fp16)."""
    teacher, init = tiny_mlp(seed=1), tiny_mlp(seed=2)
    for net in (teacher, init):
        if dtype == "mixed":
            net.model.fc_out.to(torch.float16)
            net.model.fc_in.to(torch.float64) if hasattr(net.model, "fc_in") else None
        else:
            net.to(dtype)
    assert {p.dtype for p in init.parameters()} != {torch.float32}
    d = Distiller(teacher, DistillConfig(batch=8, lr=1e-3, lambda_irl=0.2, ema_halflife=64), init=init)
    for _ in range(3):
        out = d.step()
    assert out["nan_samples"] == 0 and out["nan_grads"] == 0
    assert math.isfinite(out["loss_gen"]) and math.isfinite(out["loss_fake"])
    for net in (d.teacher, d.generator, d.fake, d.ema_generator):
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        assert all(torch.isfinite(p).all() for p in net.parameters())
    for opt in (d.opt_g, d.opt_f):
        for st in opt.state.values():
            assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    assert d.generate(torch.randn(3, 2)).dtype == torch.float32
    assert d.generate(torch.randn(3, 2, dtype=torch.float64)).dtype == torch.float32


class _InfRows(torch.nn.Module):
    """A denoiser whose output rows `rows` are +inf (finite weights, overflowing outputs)."""

    def __init__(self, net, rows):
        super().__init__()
        self.net, self.rows = net, rows
        self.sample_shape, self.label_dim = net.sample_shape, 0

    def forward(self, x, sigma, class_labels=None):
        y = self.net(x, sigma, class_labels)
        mask = torch.zeros(y.shape[0], 1, dtype=torch.bool)
        mask[self.rows] = True
        return torch.where(mask, torch.full_like(y, float("inf")), y)


def test_rows_the_ops_drop_are_counted():
    """y_real non-finite (an overflowing teacher): the SiD op drops those rows; they count."""
    d = make(teacher=_InfRows(tiny_mlp(seed=1), [0, 5]))
    out = d.step()
    assert out["nan_samples"] == 2 and not out["all_dropped"]
    d2 = make(teacher=_InfRows(tiny_mlp(seed=1), list(range(8))))
    out = d2.step()
    assert out["nan_samples"] == 8 and out["all_dropped"]
    assert out["loss_sid"] == 0.0  # what the op returns when it keeps no row


def test_damaged_config_values_are_usage_errors():
    for kw, match in ((dict(betas=(0.5,)), "betas"), (dict(betas="ab"), "betas"), (dict(seed="abc"), "seed"),
                      (dict(seed=2 ** 64), "seed"), (dict(batch=2 ** 40), "batch"), (dict(batch=None), "batch"),
                      (dict(lr=1e308), "lr"), (dict(sigma_init=1e308), "sigma-init"),
                      (dict(irl_bandwidth=1e308, irl_weighting="local"), "bandwidth"),
                      (dict(irl_bandwidth=1.0), "local"), (dict(gen_loss_scale=1e39), "gen-loss-scale")):
        with pytest.raises(UsageError, match=match):
            DistillConfig(**{"batch": 8, **kw}).validate()
    DistillConfig(batch=8, lr=1e30, irl_bandwidth=2.0, irl_weighting="local").validate()  # legal, if unwise


def tiny_mlp_dropout(seed=0, p=0.5):
    torch.manual_seed(seed)
    net = build_denoiser({"arch": "MLPDenoiserNet", "sigma_data": 0.5, "label_dim": 0,
                          "model": dict(dim=2, hidden=16, num_blocks=2, noise_channels=8, emb_channels=16,
                                        dropout=p)})
    with torch.no_grad():
        net.model.fc_out.weight.normal_(0, 0.3)
    return net


def test_fake_score_samples_come_from_g_in_eval_mode():
    """SiD's recipe: G.eval() (dropout off) for the fake-score step's samples, G.train() for
    the generator step."""
    d = make(teacher=tiny_mlp_dropout(1), init=tiny_mlp_dropout(2))
    seen = {}

    def hook(phase, x):
        seen[phase] = (x.detach().clone(), d.generator.training)
        return x
    d.nan_hook = hook
    rng = torch.Generator().manual_seed(0)
    rng.set_state(d.rng.get_state())
    eps = torch.randn((8, 2), generator=rng)  # the fake-score step's latents
    gen = copy.deepcopy(d.generator)
    sigma = torch.full((8,), 2.5)
    with torch.no_grad():
        want = gen.eval()(2.5 * eps, sigma)
        with_dropout = gen.train()(2.5 * eps, sigma)
    assert not torch.allclose(want, with_dropout)  # the dropout matters to these samples
    d.step()
    x_fake, training = seen["fake"]
    assert not training and torch.equal(x_fake, want)
    assert seen["generator"][1] is True and d.generator.training


def test_dropout_setting_changes_g_and_fake_score_only():
    from gsd.models.networks import _MLPBlock

    teacher = tiny_mlp_dropout(1, p=0.5)
    d = Distiller(teacher, DistillConfig(batch=8, lr=1e-3, dropout=0.05), init=teacher)
    for net, p in ((d.generator, 0.05), (d.fake, 0.05), (d.ema_generator, 0.05), (d.teacher, 0.5)):
        blocks = [m for m in net.modules() if isinstance(m, _MLPBlock)]
        assert len(blocks) == 2 and all(b.dropout == p for b in blocks)
    kept = Distiller(teacher, DistillConfig(batch=8, lr=1e-3), init=teacher)  # default: the teacher's
    assert all(m.dropout == 0.5 for m in kept.generator.modules() if isinstance(m, _MLPBlock))
    # SongUNet blocks too
    u = Distiller(tiny_unet(1), DistillConfig(batch=4, lr=1e-3, dropout=0.25), init=tiny_unet(2))
    from gsd.models.networks import UNetBlock
    assert {m.dropout for m in u.fake.modules() if isinstance(m, UNetBlock)} == {0.25}
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(UsageError, match="dropout"):
            DistillConfig(batch=8, dropout=bad).validate()


@pytest.mark.parametrize("rampup, halflife, expected", [
    (0.05, 1e9, 0.05 * 1008),   # EDM / SiD: the half-life is at most 0.05 x the images seen
    (0.2, 1e9, 0.2 * 1008),     # the digits default
    (0.2, 150.0, 150.0),        # the cap above the half-life: the half-life itself
    (0.0, 150.0, 150.0),        # 0: no ramp-up
    (None, 150.0, 150.0),       # None, as checkpoints from before the flag may hold: no ramp-up
])
def test_ema_rampup_caps_the_half_life(rampup, halflife, expected):
    assert DistillConfig().ema_rampup == 0.05  # the library default is EDM's and SiD's
    d = make(DistillConfig(batch=8, lr=1e-3, ema_halflife=halflife, ema_rampup=rampup))
    d.images_seen = 1000
    ema0 = [p.detach().clone() for p in d.ema_generator.parameters()]
    with torch.no_grad():
        for p in d.generator.parameters():
            p.add_(1.0)
    d._update_ema()
    beta = 0.5 ** (8 / expected)
    for e0, e, p in zip(ema0, d.ema_generator.parameters(), d.generator.parameters()):
        torch.testing.assert_close(e, e0 + (1 - beta) * (p - e0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.2"])
def test_ema_rampup_refuses_bad_values(bad):
    with pytest.raises(UsageError, match="--ema-rampup"):
        DistillConfig(batch=8, ema_rampup=bad).validate()
