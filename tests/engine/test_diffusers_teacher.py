"""diffusers UNet2DModel teachers as EDM denoisers (gsd.teachers.diffusers_teacher, gsd.import_teacher)."""

import json
import math
import os
import shutil

import pytest
import torch

from gsd.cli import run_main
from gsd.evaluation import core as eval_core
from gsd.errors import UsageError
from gsd.teachers.diffusers_teacher import DiffusersTeacher, load_diffusers_teacher, save_diffusers_teacher, vp_betas
from gsd.import_teacher import main as import_main
from gsd.teachers.loading import load_teacher_any

diffusers = pytest.importorskip("diffusers")  # CI installs it through the `test` extra
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_unet(**kw):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=kw.pop("in_channels", 3), out_channels=kw.pop("out_channels", 3),
                       block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, **kw)
    with torch.no_grad():  # random weights everywhere (zero-initialised outputs would hide mistakes)
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet.eval()


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    tiny_unet().save_pretrained(folder)
    return folder


def with_scheduler(src, dst, **config):
    shutil.copytree(src, dst)
    if config:
        DDPMScheduler(**config).save_config(dst)
    return dst


def direct_alpha_bar(**config):
    return DDPMScheduler(**config).alphas_cumprod.to(torch.float64)


def test_epsilon_formulas_match_a_direct_computation(unet_folder):
    net = load_diffusers_teacher(unet_folder)  # no scheduler config: linear 1e-4..0.02, T=1000
    assert isinstance(net, DiffusersTeacher) and not net.training
    assert net.sigma_data == 0.5 and net.label_dim == 0 and net.sample_shape == (3, 8, 8)
    assert net.prediction_type == "epsilon"
    alpha_bar = direct_alpha_bar()
    table = ((1 - alpha_bar) / alpha_bar).sqrt()
    torch.testing.assert_close(net.sigmas, table, rtol=1e-5, atol=0)
    # Table entries give integer timesteps; a sigma between two entries interpolates ln sigma.
    mid = math.exp(0.25 * math.log(table[500]) + 0.75 * math.log(table[501]))
    sigma = torch.tensor([float(table[10]), float(table[500]), mid, float(table[999])])
    expected_t = torch.tensor([10.0, 500.0, 500.75, 999.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_to_t(sigma), expected_t, atol=1e-3, rtol=0)
    torch.testing.assert_close(net.t_to_sigma(expected_t), sigma.double(), rtol=1e-6, atol=0)
    x = torch.randn(4, 3, 8, 8) * (1 + sigma.reshape(4, 1, 1, 1))
    with torch.no_grad():
        d = net(x, sigma)
        s = sigma.reshape(4, 1, 1, 1)
        eps = net.unet(x / (1 + s ** 2).sqrt(), net.sigma_to_t(sigma).float()).sample
        # x_vp = sqrt(alpha_bar_t) x at the table entry t = 10.
        x_vp0 = alpha_bar[10].sqrt().float() * x[:1]
        eps0 = net.unet(x_vp0, torch.tensor([10])).sample
    torch.testing.assert_close(d, x - s * eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d[:1], x[:1] - sigma[0] * eps0, atol=1e-5, rtol=1e-5)
    # Out-of-range sigmas clamp the timestep; sigma = 0 returns x.
    assert net.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]
    with torch.no_grad():
        torch.testing.assert_close(net(x[:1], 0.0), x[:1])


@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.03, num_train_timesteps=500),
    dict(beta_schedule="scaled_linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
])
def test_schedules_match_diffusers(config):
    betas = vp_betas(**config)
    alpha_bar = torch.cumprod(1 - betas.float(), 0).double()  # float32, as DiffusersTeacher and diffusers do
    torch.testing.assert_close(alpha_bar, direct_alpha_bar(**config), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_prediction(unet_folder, tmp_path, prediction_type):
    folder = with_scheduler(unet_folder, tmp_path / "m", beta_schedule="squaredcos_cap_v2",
                            prediction_type=prediction_type)
    net = load_teacher_any(folder)
    assert net.prediction_type == prediction_type
    sigma = torch.tensor([0.1, 1.0, 10.0])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        d = net(x, sigma)
        s = sigma.reshape(3, 1, 1, 1)
        alpha_bar = 1 / (1 + s ** 2)
        x_vp = alpha_bar.sqrt() * x
        out = net.unet(x_vp, net.sigma_to_t(sigma).float()).sample
    expected = alpha_bar.sqrt() * x_vp - (1 - alpha_bar).sqrt() * out if prediction_type == "v_prediction" else out
    torch.testing.assert_close(d, expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_input(unet_folder):
    net = load_diffusers_teacher(unet_folder).requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    net(x, torch.tensor([0.5, 3.0])).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_class_conditional_and_learned_variance(tmp_path):
    folder = tmp_path / "cond"
    tiny_unet(num_class_embeds=3, out_channels=6).save_pretrained(folder)
    net = load_diffusers_teacher(folder)
    assert net.label_dim == 3 and net.learned_variance
    x = torch.randn(3, 3, 8, 8)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        d = net(x, 1.5, labels)
        torch.testing.assert_close(net(x, 1.5, torch.nn.functional.one_hot(labels, 3).float()), d)
        eps = net.unet(x / math.sqrt(1 + 1.5 ** 2), net.sigma_to_t(torch.tensor([1.5] * 3)).float(),
                       class_labels=labels).sample[:, :3]
    torch.testing.assert_close(d, x - 1.5 * eps, atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="class-conditional"):
        net(x, 1.5)


def write_config(folder, class_name, name="config.json", **extra):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as fh:
        json.dump({"_class_name": class_name, **extra}, fh)
    return folder


@pytest.mark.parametrize("kind", ["UNet2DConditionModel", "AutoencoderKL", "pipeline-sd", "pipeline-vae-only"])
def test_other_model_types_are_refused(tmp_path, kind):
    if kind in ("UNet2DConditionModel", "AutoencoderKL"):
        folder = write_config(tmp_path / "m", kind, in_channels=4, out_channels=4)
        expect = f"holds a {kind}, not a UNet2DModel"
    elif kind == "pipeline-sd":
        folder = write_config(tmp_path / "p", "StableDiffusionPipeline", name="model_index.json",
                              unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"])
        expect = "UNet2DConditionModel unet, not a UNet2DModel"
    else:
        folder = write_config(tmp_path / "p", "SomePipeline", name="model_index.json",
                              vae=["diffusers", "AutoencoderKL"])
        expect = "no 'unet' component"
    with pytest.raises(UsageError, match=expect) as info:
        load_teacher_any(folder)
    assert "\n" not in str(info.value)


def test_unsupported_schedulers_and_embeddings_are_refused(unet_folder, tmp_path):
    bad = with_scheduler(unet_folder, tmp_path / "a")
    write_config(bad, "DDPMScheduler", name="scheduler_config.json", prediction_type="flow")
    with pytest.raises(UsageError, match="unsupported prediction_type 'flow'"):
        load_diffusers_teacher(bad)
    write_config(bad, "ScoreSdeVeScheduler", name="scheduler_config.json")
    with pytest.raises(UsageError, match="variance-exploding"):
        load_diffusers_teacher(bad)
    folder = write_config(tmp_path / "b", "UNet2DModel", time_embedding_type="fourier")
    with pytest.raises(UsageError, match="time_embedding_type 'fourier'"):
        load_diffusers_teacher(folder)
    with pytest.raises(UsageError, match="no such file or folder"):
        load_teacher_any(tmp_path / "nothing")


def test_pipeline_folder_and_save_round_trip(unet_folder, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(unet_folder, pipe / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").save_config(pipe / "scheduler")
    write_config(pipe, "DDPMPipeline", name="model_index.json", unet=["diffusers", "UNet2DModel"],
                 scheduler=["diffusers", "DDPMScheduler"])
    net = load_teacher_any(pipe)
    assert net.prediction_type == "v_prediction"
    torch.testing.assert_close(net.betas, vp_betas(beta_schedule="scaled_linear"))
    saved = save_diffusers_teacher(net, tmp_path / "saved")
    again = load_teacher_any(saved)
    assert torch.equal(again.betas, net.betas) and again.prediction_type == "v_prediction"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x, torch.tensor([0.2, 7.0])), net(x, torch.tensor([0.2, 7.0])))


def test_cli_checks_a_folder(unet_folder, capsys):
    assert run_main(import_main, [str(unet_folder)]) == 0
    assert "diffusers teacher OK" in capsys.readouterr().out
    assert run_main(import_main, [str(unet_folder), "--out", "x.safetensors"]) == 2
    assert "used directly" in capsys.readouterr().err


def test_train_distils_a_diffusers_folder_end_to_end(tmp_path, capsys):
    """`python -m gsd.train --teacher FOLDER`: the run keeps a diffusers copy of the teacher that
    reproduces it exactly (schedule included); resume, evaluate and edit rebuild the generator
    from that copy."""
    from gsd import runs, train
    from gsd.evaluation.editing import load_generator
    from gsd.teachers.loading import load_run_teacher

    folder = tmp_path / "digits-unet"
    tiny_unet(in_channels=1, out_channels=1).save_pretrained(folder)
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_config(folder)
    out = tmp_path / "run"
    argv = ["--teacher", str(folder), "--dataset", "digits", "--iters", "2", "--batch", "4", "--ckpt-every", "2",
            "--eval-samples", "0", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert run_main(train.main, argv) == 0, capsys.readouterr().err

    cfg = runs.read_config(out)
    assert cfg["teacher_file"] == "teacher-diffusers" and (out / "teacher-diffusers" / "config.json").is_file()
    original, copy = load_teacher_any(folder), load_run_teacher(out)
    assert copy.prediction_type == "v_prediction" and torch.equal(copy.betas, original.betas)
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 2.5, 60.0])
    with torch.no_grad():
        assert torch.equal(copy(x, sigma), original(x, sigma))

    # resume continues from the copy (the original folder is no longer needed)
    shutil.rmtree(folder)
    assert run_main(train.main, ["--resume", str(out), "--iters", "3", "--no-progress", "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    assert runs.latest_step(out) == 3

    run = eval_core.load_run(out)
    gen = run.generator.net
    assert isinstance(gen, DiffusersTeacher)
    weights, _ = runs.load_checkpoint(out)
    for name, value in gen.state_dict().items():
        assert torch.equal(value, weights["ema." + name]), name
    trained = [n for n, v in gen.state_dict().items() if not torch.equal(v, copy.state_dict()[n])]
    assert trained, "the generator did not move away from the teacher"

    G, info = load_generator(out)
    eps = torch.randn(5, 1, 8, 8)
    y = G(eps)
    assert y.shape == (5, 1, 8, 8) and torch.isfinite(y).all()
    torch.testing.assert_close(y, run.generator(eps))


def test_evaluation_cache_key_sees_the_schedule(unet_folder):
    """Cached teacher evaluations are keyed by a hash of the network: a diffusers teacher's
    schedule and prediction type live outside its state dict and must still change it."""
    from gsd.evaluation.core import _network_id

    base = load_diffusers_teacher(unet_folder)
    same = load_diffusers_teacher(unet_folder)
    v_pred = DiffusersTeacher(base.unet, prediction_type="v_prediction")
    cosine = DiffusersTeacher(base.unet, betas=vp_betas(beta_schedule="squaredcos_cap_v2"))
    ids = {_network_id(n) for n in (base, v_pred, cosine)}
    assert _network_id(same) == _network_id(base) and len(ids) == 3


def test_sida_with_a_diffusers_teacher_is_refused_before_anything_is_written(tmp_path, capsys):
    """SiDA's discriminator is f_psi's encoder, defined for the engine's own architectures: a
    diffusers UNet2DModel teacher with --lambda-adv is one line, nothing written."""
    from gsd import train

    folder = tmp_path / "digits-unet"
    tiny_unet(in_channels=1, out_channels=1).save_pretrained(folder)
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_config(folder)
    out = tmp_path / "run"
    code = run_main(train.main, ["--teacher", str(folder), "--dataset", "digits", "--iters", "2", "--batch", "4",
                                 "--lambda-adv", "0.5", "--eval-samples", "0", "--no-progress", "--device", "cpu",
                                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--lambda-adv" in err and "encoder" in err, err
    assert not out.exists()
