"""Loss guidance (gsd.sampling.samplers.guided_sample / dsg_step, gsd.sampling.guidance, gsd.sample CLI)."""

import math

import pytest
import torch

from gsd.data import GaussianMixture, GMMDenoiser
from gsd.sampling.samplers import (GuidanceError, ancestral_sample, ancestral_sigmas, churn_sample, dsg_step,
                          guided_sample, latents_for_seeds)


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()))


def mixture_4d(seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(6, 4, generator=g, dtype=torch.float64) * 0.5
    return GaussianMixture(means, None, 0.05)


def test_ancestral_sigmas():
    for t, s in [(80.0, 40.0), (1.0, 0.5), (0.01, 0.002), (3.0, 2.999)]:
        down, up = ancestral_sigmas(t, s)
        assert down ** 2 + up ** 2 == pytest.approx(s ** 2, rel=1e-12)
        assert down == pytest.approx(s * s / t, rel=1e-9)  # DDPM posterior (eta = 1)
        down_half, up_half = ancestral_sigmas(t, s, eta=0.5)
        assert up_half == pytest.approx(up / 2, rel=1e-12) and down_half ** 2 + up_half ** 2 == pytest.approx(s * s)
    assert ancestral_sigmas(0.002, 0.0) == (0.0, 0.0)
    assert ancestral_sigmas(1.0, 0.5, eta=0) == (0.5, 0.0)


def test_ancestral_sampler_recovers_mixture_weights():
    mix = GaussianMixture(torch.tensor([[0.6, 0.0], [-0.6, 0.0]]), [0.3, 0.7], 0.05)
    x = ancestral_sample(GMMDenoiser(mix), torch.randn(1000, 2), num_steps=30,
                         generator=torch.Generator().manual_seed(fresh_seed())).double()
    assert abs((x[:, 0] > 0).double().mean().item() - 0.3) < 0.065
    assert (torch.cdist(x, mix.means).min(1).values < 0.25).double().mean() > 0.99
    # per-seed noise: the batch does not matter
    seeds = [fresh_seed() for _ in range(5)]
    a = ancestral_sample(GMMDenoiser(mix), latents_for_seeds(seeds, (2,)), seeds=seeds)
    b = ancestral_sample(GMMDenoiser(mix), latents_for_seeds(seeds[3:], (2,)), seeds=seeds[3:])
    torch.testing.assert_close(b, a[3:], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(7, 64), (5, 1, 8, 8), (3, 3, 4, 5)])
def test_dsg_step_lands_on_the_sphere(shape):
    n = math.prod(shape[1:])
    for rate in [0.0, 0.05, 0.3, 0.7, 1.0]:
        mean = torch.randn(shape, dtype=torch.float64) * 3
        std = torch.rand(shape[0], dtype=torch.float64) * 2 + 1e-3
        noise = std.reshape(-1, *[1] * (len(shape) - 1)) * torch.randn(shape, dtype=torch.float64)
        grad = torch.randn(shape, dtype=torch.float64) * 10 ** float(torch.empty(()).uniform_(-6, 3))
        x = dsg_step(mean, noise, grad, std, rate)
        dist = (x - mean).flatten(1).norm(dim=1)
        torch.testing.assert_close(dist, math.sqrt(n) * std, rtol=1e-5, atol=0)
        if rate == 1.0:  # pure steepest descent on the sphere
            direction = (x - mean).flatten(1) / dist[:, None]
            torch.testing.assert_close(direction, -grad.flatten(1) / grad.flatten(1).norm(dim=1, keepdim=True))
    # a scalar std, a zero gradient (keeps the noise direction)
    mean, noise = torch.zeros(2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    x = dsg_step(mean, noise, torch.zeros_like(mean), 0.5, 0.5)
    torch.testing.assert_close(x, 0.5 * 4 * noise / noise.norm(dim=1, keepdim=True))


def test_dsg_steps_of_the_sampler_are_on_the_sphere_around_the_unguided_mean():
    mix = mixture_4d(fresh_seed())
    y = mix.sample(6, generator=torch.Generator().manual_seed(fresh_seed()))[0]
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss = lambda x0: (mask * (x0 - y)).square().sum(1)  # noqa: E731
    seeds = [fresh_seed() for _ in range(6)]
    trace = []
    guided_sample(GMMDenoiser(mix), latents_for_seeds(seeds, (4,)), loss, method="dsg", guidance_rate=0.3,
                  num_steps=12, seeds=seeds, trace=trace)
    assert len(trace) == 12 and sum(s["guided"] for s in trace) == 11  # not the last step (sigma_up = 0)
    for s in trace:
        if s["guided"]:
            dist = (s["x_next"] - s["mean"]).norm(dim=1)
            torch.testing.assert_close(dist, torch.full_like(dist, 2.0 * s["sigma_up"]), rtol=1e-5, atol=0)


def test_rate_zero_reproduces_the_unguided_sampler_exactly():
    mix = mixture_4d(fresh_seed())
    den = GMMDenoiser(mix)
    seeds = [fresh_seed() for _ in range(8)]
    lat = latents_for_seeds(seeds, (4,))
    y = torch.zeros(8, 4)
    loss = lambda x0: (x0 - y).square().sum(1)  # noqa: E731
    ref = ancestral_sample(den, lat, num_steps=10, seeds=seeds)
    for kw in [dict(method="dsg", guidance_rate=0.0), dict(method="none"), dict(method="dps", step_size=0.0)]:
        out = guided_sample(den, lat, loss, num_steps=10, seeds=seeds, **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert (guided_sample(den, lat, loss, method="dsg", guidance_rate=0.1, num_steps=10, seeds=seeds)
            - ref).abs().max() > 1e-3
    # churn / heun unguided are what they were
    out = guided_sample(den, lat, None, method="none", sampler="heun", num_steps=5)
    from gsd.sampling.samplers import heun_sample
    torch.testing.assert_close(out, heun_sample(den, lat, num_steps=5), rtol=0, atol=0)
    assert churn_sample(den, lat, num_steps=4, seeds=seeds).shape == lat.shape


def test_dsg_reduces_the_observed_region_error_on_a_gmm():
    seed = fresh_seed()
    mix = mixture_4d(seed)
    den = GMMDenoiser(mix)
    n = 64
    y = mix.sample(n, generator=torch.Generator().manual_seed(seed + 1))[0]
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss = lambda x0: (mask * (x0 - y)).square().sum(1)  # noqa: E731
    seeds = list(range(seed % 1000 * n, seed % 1000 * n + n))
    lat = latents_for_seeds(seeds, (4,))

    def err(x):
        return (mask * (x - y)).square().sum(1).mean().item()

    base = err(guided_sample(den, lat, loss, method="none", num_steps=20, seeds=seeds))
    dsg = err(guided_sample(den, lat, loss, method="dsg", guidance_rate=0.3, num_steps=20, seeds=seeds))
    dps = err(guided_sample(den, lat, loss, method="dps", step_size=0.1, num_steps=20, seeds=seeds))
    assert dsg < 0.3 * base, (seed, base, dsg)
    assert dps < base, (seed, base, dps)


def test_guidance_errors():
    mix = mixture_4d(0)
    den = GMMDenoiser(mix)
    lat = torch.randn(3, 4)
    loss = lambda x0: x0.square().sum(1)  # noqa: E731
    with pytest.raises(GuidanceError, match="stochastic"):
        guided_sample(den, lat, loss, method="dsg", sampler="heun")
    with pytest.raises(GuidanceError, match="stochastic"):
        guided_sample(den, lat, loss, method="dps", eta=0.0)
    with pytest.raises(GuidanceError, match="churn"):
        guided_sample(den, lat, loss, method="dsg", sampler="churn")
    with pytest.raises(GuidanceError, match="unknown guidance method"):
        guided_sample(den, lat, loss, method="cfg")
    with pytest.raises(GuidanceError, match="guidance_rate"):
        guided_sample(den, lat, loss, method="dsg", guidance_rate=1.5)
    with pytest.raises(GuidanceError, match="loss function"):
        guided_sample(den, lat, None, method="dsg")

    def frozen(x, sigma, labels=None):
        with torch.no_grad():
            return den(x, sigma)

    with pytest.raises(GuidanceError, match="differentiable"):
        guided_sample(frozen, lat, loss, method="dsg", num_steps=3)
    with pytest.raises(GuidanceError, match="one value per sample"):
        guided_sample(den, lat, lambda x0: x0.square(), method="dps", num_steps=3)


def test_inpaint_masks_and_losses():
    from gsd.sampling.guidance import MASK_NAMES, classifier_loss, inpaint_mask, inpainting_loss

    for name in MASK_NAMES:
        m = inpaint_mask(name, (1, 8, 8))
        assert m.shape == (1, 8, 8) and set(m.unique().tolist()) == {0.0, 1.0}
        assert (1 - m).sum() == (16 if name == "center" else 32)
    assert inpaint_mask("top", (1, 8, 8))[0, :4].sum() == 0
    y = torch.randn(2, 1, 8, 8)
    m = inpaint_mask("left", (1, 8, 8))
    assert torch.allclose(inpainting_loss(y, m)(y + (1 - m) * 5), torch.zeros(2))
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    out = classifier_loss(clf, torch.tensor([3, 4]))(y)
    assert out.shape == (2,) and (out > 0).all()


# ------------------------------------------------------------------------------------- CLI

def test_cli_errors_exit_2_with_one_line(capsys, tmp_path):
    from gsd.cli import run_main
    from gsd.sample import main

    with pytest.raises(SystemExit) as exc:
        run_main(main, ["--guidance", "bogus", "--out", str(tmp_path / "g.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--guidance" in err
    for argv, word in [(["--guidance", "class", "--target-class", "10"], "out of range"),
                       (["--guidance", "class", "--target-class", "-1"], "out of range"),
                       (["--guidance", "none", "--target-class", "3"], "--guidance class"),
                       (["--guidance", "inpaint"], "--out"),
                       (["--dataset", "gmm", "--guidance", "inpaint"], "image")]:
        if word != "--out":
            argv = argv + ["--out", str(tmp_path / "g.png")]
        assert run_main(main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, (argv, err)
    with pytest.raises(SystemExit) as exc:
        run_main(main, ["--guidance-rate", "2", "--out", str(tmp_path / "g.png")])
    assert exc.value.code == 2


@pytest.fixture
def tiny_teacher(tmp_path):
    from gsd.models.networks import build_denoiser, default_config
    from gsd.models.checkpoint import save_denoiser

    net = build_denoiser(default_config("digits", (1, 8, 8), 0))  # untrained: only the plumbing is tested
    path = tmp_path / "tiny.safetensors"
    save_denoiser(str(path), net)
    return str(path)


def test_cli_end_to_end_writes_png(tiny_teacher, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import gsd.sampling.guidance
    import gsd.evaluation.metrics
    from gsd.cli import run_main
    from gsd.sample import main

    out = tmp_path / "inpaint.png"
    assert run_main(main, ["--guidance", "inpaint", "--mask", "bottom", "--num", "3", "--steps", "3",
                           "--teacher", tiny_teacher, "--out", str(out), "--scale", "1"]) == 0
    img = Image.open(out)
    assert img.size == (3 * 9 + 1, 3 * 9 + 1)  # a row per sample: masked reference, result, original
    assert "MSE on the observed region" in capsys.readouterr().out

    # class guidance with stand-in classifiers (the real ones are trained and cached on first use)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).requires_grad_(False)
    import gsd.sample

    # the names gsd.sample calls (imported at its top)
    monkeypatch.setattr(gsd.sample, "guidance_classifier", lambda *a, **k: (clf, {}))
    monkeypatch.setattr(gsd.sample, "digits_classifier", lambda *a, **k: (clf, {}))
    out = tmp_path / "class.png"
    assert run_main(main, ["--guidance", "class", "--method", "dps", "--target-class", "7", "--num", "4",
                           "--steps", "3", "--teacher", tiny_teacher, "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * (2 * 9 + 1), 4 * (2 * 9 + 1))
