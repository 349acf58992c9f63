"""SiDA and SiD2A through `python -m gsd.train` (issue 23): the flags reach config.json and the
loss log, --resume refuses to change them, --init-generator starts G from another generator
and refuses one that does not fit, and bad values end in one line with nothing written."""

import json
import pickle

import pytest
import torch

from gsd import runs
from gsd.generator import load_generator
from gsd.models.checkpoint import save_denoiser
from cli_checks import assert_one_line_error
from factories import tiny_mlp, tiny_unet
from test_run_reliability import FAST, base_args, cli, teacher_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADV = ["--lambda-adv", "0.5", "--adv-g-warmup", "16", "--adv-mix-warmup", "32", "--alpha", "1.0"]


def _digits_args(tmp_path, out, teacher, *extra, iters=3):
    return ["--teacher", str(teacher), "--batch", "8", "--iters", str(iters), "--eval-samples", "0",
            "--lambda-irl", "0", "--irl-neighbours", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            *FAST, *extra]


def _unet_teacher(tmp_path, name="unet.safetensors"):
    path = tmp_path / name
    if not path.exists():
        save_denoiser(path, tiny_unet())
    return path


def _tiny_unet_with(label_dim=0, **model):
    """tiny_unet's network with other settings (a generator that does not fit its teacher)."""
    from gsd.models.networks import build_denoiser
    cfg = json.loads(json.dumps(tiny_unet().config))
    cfg["model"].update(model)
    cfg["label_dim"] = cfg["model"]["label_dim"] = label_dim
    return build_denoiser(cfg)


def test_sida_on_digits_records_its_settings_and_logs_the_discriminator(tmp_path, capsys):
    out = tmp_path / "sida"
    code, err, _ = cli(_digits_args(tmp_path, out, _unet_teacher(tmp_path), *ADV, "--adv-clip", "0.5", iters=6),
                       capsys)
    assert code == 0, err
    cfg = runs.read_config(out)
    assert (cfg["lambda_adv"], cfg["adv_g_warmup"], cfg["adv_mix_warmup"], cfg["adv_clip"]) == (0.5, 16, 32, 0.5)
    assert cfg["adv_loss_scale_g"] == 0.01 and cfg["adv_loss_scale_d"] == 1.0
    log = runs.read_log(out)
    assert all("loss_d" in r and r["loss_d"] == r["loss_d"] for r in log)  # finite discriminator loss each time
    # G is held for the first 16 images (2 iterations of 8), then stepped: its weights moved
    _, state = runs.load_checkpoint(out)
    assert state["distiller"]["images_seen"] == 48
    # --resume may not change what the adversarial term is
    code, err, _ = cli(["--resume", str(out), "--iters", "8", "--lambda-adv", "0.3", *FAST], capsys)
    assert_one_line_error(code, err, "lambda_adv: run has 0.5, given 0.3")


def test_sida_on_gmm_draws_real_samples_from_the_mixture(tmp_path, capsys):
    out = tmp_path / "gmm-sida"
    code, err, _ = cli(base_args(tmp_path, out, *ADV, iters=4), capsys)
    assert code == 0, err
    assert runs.read_config(out)["lambda_adv"] == 0.5 and all("loss_d" in r for r in runs.read_log(out))


@pytest.mark.parametrize("flags, needle", [
    (["--lambda-adv", "-0.1"], "--lambda-adv"),
    (["--lambda-adv", "1.5"], "--lambda-adv"),
    (["--lambda-adv", "nan"], "--lambda-adv"),
    (["--adv-loss-scale-g", "-1"], "--adv-loss-scale-g"),
    (["--adv-loss-scale-d", "inf"], "--adv-loss-scale-d"),
    (["--adv-clip", "0"], "--adv-clip"),
    (["--adv-g-warmup", "-5"], "--adv-g-warmup"),
    (["--lambda-adv", "0.5", "--lambda-sid", "0", "--lambda-irl-raw", "1"], "--lambda-adv"),
])
def test_bad_adversarial_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, needle):
    out = tmp_path / "r"
    code, err, _ = cli(base_args(tmp_path, out, *flags), capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_init_generator_starts_g_and_its_ema_from_the_source(tmp_path, capsys):
    """SiD2A: G and its EMA start from the source run's EMA generator, f_psi from the teacher;
    with a zero learning rate nothing moves, so the new run's generator is the source's."""
    teacher = _unet_teacher(tmp_path)
    src = tmp_path / "src"
    assert cli(_digits_args(tmp_path, src, teacher, iters=4), capsys)[0] == 0
    out = tmp_path / "sid2a"
    code, err, _ = cli(_digits_args(tmp_path, out, teacher, *ADV, "--init-generator", str(src), "--lr", "1e-30",
                                    iters=2), capsys)
    assert code == 0, err
    assert runs.read_config(out)["init_generator"] == str(src)
    a, b = load_generator(src), load_generator(out)
    eps = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(eps), a(eps), rtol=1e-5, atol=1e-6)
        teacher_out = load_generator(out, raw=True)
        torch.testing.assert_close(teacher_out(eps), a(eps), rtol=1e-5, atol=1e-6)
    weights, _ = runs.load_checkpoint(out)
    fake = {k[len("fake."):]: v for k, v in weights.items() if k.startswith("fake.")}
    from gsd.models.checkpoint import load_denoiser
    t = load_denoiser(teacher).state_dict()
    moved = max(float((fake[k] - t[k]).abs().max()) for k in t)
    assert moved < 1e-20  # f_psi started from the teacher (and lr 1e-30 left it there)


@pytest.mark.parametrize("case", ["architecture", "resolution", "labels", "sigma_init"])
def test_init_generator_that_does_not_fit_is_refused(tmp_path, capsys, case):
    teacher = _unet_teacher(tmp_path)
    other = {"architecture": lambda: tiny_mlp(dim=64, seed=1), "resolution": lambda: _tiny_unet_with(img_resolution=16),
             "labels": lambda: _tiny_unet_with(label_dim=3), "sigma_init": lambda: None}[case]()
    src = tmp_path / f"src-{case}"
    if case == "sigma_init":
        assert cli(_digits_args(tmp_path, src, teacher, iters=2), capsys)[0] == 0
        extra = ["--sigma-init", "1.5"]
    else:
        # a run of another teacher, exported by the engine as a generator file
        from gsd.generator import save_generator
        src = tmp_path / f"{case}.safetensors"
        save_generator(src, other, 2.5)
        extra = []
    out = tmp_path / "r"
    code, err, _ = cli(_digits_args(tmp_path, out, teacher, "--init-generator", str(src), *extra), capsys)
    assert_one_line_error(code, err, "--init-generator")
    assert not out.exists()


def test_init_generator_pickle_needs_trust_pickle(tmp_path, capsys):
    snap = tmp_path / "network-snapshot.pkl"
    snap.write_bytes(pickle.dumps({"G_ema": None}))
    out = tmp_path / "r"
    code, err, _ = cli(_digits_args(tmp_path, out, _unet_teacher(tmp_path), "--init-generator", str(snap)), capsys)
    assert_one_line_error(code, err, "--trust-pickle")
    assert not out.exists()
