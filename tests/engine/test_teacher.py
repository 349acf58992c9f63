"""Teacher training, the teacher cache and the `python -m gsd.teacher` CLI."""

import os
import subprocess
import sys

import pytest
import torch

from gsd.cli import run_main
from gsd.errors import UsageError
from gsd.data import GMMDenoiser, load_dataset
from gsd.models.networks import build_denoiser
from gsd.models.checkpoint import load_denoiser, save_denoiser
import gsd.teacher as teacher_mod
import gsd.teachers.recipes as teacher_lib
from gsd.teacher import main
from gsd.teachers.recipes import edm_loss, get_teacher, teacher_cache_path, train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_MLP = {"arch": "MLPDenoiserNet", "sigma_data": 0.5, "label_dim": 0,
             "model": dict(dim=2, hidden=64, num_blocks=2, noise_channels=16, emb_channels=64)}
TINY_UNET = {"arch": "SongUNet", "sigma_data": 0.5, "label_dim": 0,
             "model": dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2],
                           num_blocks=1, attn_resolutions=[], dropout=0.0)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gmm():
    return load_dataset("gmm")


def test_edm_loss_formula():
    net = build_denoiser(SMALL_MLP)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    y = torch.randn(9, 2)
    sigma = torch.exp(torch.randn(9) * 1.2 - 1.2)
    noise = torch.randn(9, 2)
    got = edm_loss(net, y, sigma=sigma, noise=noise)
    d = net(y + sigma[:, None] * noise, sigma)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    ref = sum(lam[i] * ((d[i] - y[i]) ** 2).sum() for i in range(9)) / 9
    torch.testing.assert_close(got, ref)
    # the sigma distribution: ln sigma ~ N(-1.2, 1.2^2)
    seen = []
    net_stub = lambda x, s, labels=None: seen.append(s.clone()) or x  # noqa: E731
    net_stub.sigma_data = 0.5
    edm_loss(net_stub, torch.zeros(20000, 1), generator=torch.Generator().manual_seed(3))
    ln = seen[0].log()
    assert abs(ln.mean().item() + 1.2) < 0.05 and abs(ln.std().item() - 1.2) < 0.05


def test_training_decreases_loss(gmm):
    """The EDM loss on held-out (y, sigma, noise) drops well towards the exact denoiser's floor."""
    seed = int(torch.randint(0, 1000, ()))
    gen = torch.Generator().manual_seed(seed)
    y, _ = gmm.mixture.sample(4096, generator=gen)
    sigma = torch.exp(torch.randn(4096, generator=gen) * 1.2 - 1.2)
    noise = torch.randn(4096, 2, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = build_denoiser(SMALL_MLP)
    trained = train_teacher(gmm, SMALL_MLP, iters=200, batch=256, lr=2e-3, device="cpu", seed=seed, progress=False)
    exact = GMMDenoiser(gmm.mixture)
    exact.sigma_data = 0.5  # the loss weighting uses sd = 0.5 like the networks
    with torch.no_grad():
        before = edm_loss(init, y, sigma=sigma, noise=noise).item()
        after = edm_loss(trained, y, sigma=sigma, noise=noise).item()
        floor = edm_loss(exact, y, sigma=sigma, noise=noise).item()
    assert floor < after < before
    assert after - floor < 0.75 * (before - floor), (before, after, floor)
    assert not trained.training
    hist = trained.train_history
    assert hist[-1][0] == 200 and hist[-1][1] < hist[0][1]


def test_training_on_images_conditional_smoke():
    ds = load_dataset("digits")
    cfg = {**TINY_UNET, "label_dim": 10, "model": {**TINY_UNET["model"], "label_dim": 10}}
    net = train_teacher(ds, cfg, iters=3, batch=8, lr=1e-3, device="cpu", seed=0, progress=False)
    assert net.label_dim == 10 and net.sample_shape == (1, 8, 8)
    with pytest.raises(UsageError):
        train_teacher(ds, build_denoiser(SMALL_MLP).config, iters=1, batch=2, lr=1e-3, device="cpu", seed=0,
                      progress=False)


def test_cache_hit_and_key(gmm, tmp_path, monkeypatch, capsys):
    recipe = dict(iters=30, batch=64, lr=1e-3)
    first = get_teacher(gmm, cache_dir=tmp_path, seed=1, progress=False, config=SMALL_MLP, recipe=recipe)
    err = capsys.readouterr().err
    path = teacher_cache_path(gmm, SMALL_MLP, teacher_lib.full_recipe("gmm", recipe), 1, tmp_path)
    assert os.path.isfile(path) and path in err and err.count("\n") == 1
    assert os.path.dirname(path) == os.path.join(str(tmp_path), "teachers")
    assert os.path.basename(path).startswith("gmm-")

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(teacher_lib, "train_teacher", no_training)
    second = get_teacher(gmm, cache_dir=tmp_path, seed=1, progress=False, config=SMALL_MLP, recipe=recipe)
    assert "training" not in capsys.readouterr().err
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    # another seed / recipe is another cache entry
    assert teacher_cache_path(gmm, SMALL_MLP, recipe, 2, tmp_path) != teacher_cache_path(gmm, SMALL_MLP, recipe, 1,
                                                                                         tmp_path)
    assert teacher_cache_path(gmm, SMALL_MLP, {**recipe, "lr": 2e-3}, 1, tmp_path) != \
        teacher_cache_path(gmm, SMALL_MLP, recipe, 1, tmp_path)
    # $GSD_CACHE is the default cache folder
    monkeypatch.setenv("GSD_CACHE", str(tmp_path / "env"))
    assert teacher_cache_path(gmm, SMALL_MLP, recipe, 1).startswith(str(tmp_path / "env"))


def test_explicit_teacher_path_checks_dataset(gmm, tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_denoiser(path, build_denoiser(SMALL_MLP))
    net = get_teacher(gmm, teacher_path=path)
    assert net.sample_shape == (2,)
    digits = load_dataset("digits")
    with pytest.raises(UsageError) as info:
        get_teacher(digits, teacher_path=path)
    assert "mlp.safetensors" in str(info.value) and "shape" in str(info.value)
    with pytest.raises(UsageError):
        get_teacher(gmm, teacher_path=tmp_path / "nope.safetensors")


def test_cli_in_process(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code = run_main(main, ["--dataset", "gmm", "--iters", "5", "--batch", "16", "--out", str(out), "--no-progress",
                           "--device", "cpu"])
    assert code == 0 and str(out) in capsys.readouterr().out
    assert load_denoiser(out).metadata["recipe"]["iters"] == 5
    code = run_main(main, ["--dataset", "folder", "--data-root", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "none" in err
    code = run_main(main, ["--dataset", "gmm", "--out", str(tmp_path / "no" / "dir" / "t.safetensors")])
    assert code == 2


def test_cli_subprocess_error_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GSD_CACHE": str(tmp_path)}
    bad_root = subprocess.run([sys.executable, "-m", "gsd.teacher", "--dataset", "cifar10", "--data-root",
                               str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=120)
    assert bad_root.returncode == 2, bad_root.stderr
    assert len(bad_root.stderr.strip().splitlines()) == 1 and "missing" in bad_root.stderr
    assert "Traceback" not in bad_root.stderr


def test_cli_bad_flags_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        run_main(main, ["--dataset", "mnist"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mnist" in err
    helptext = teacher_mod.build_parser().format_help()
    for flag in ["--dataset", "--data-root", "--resolution", "--download", "--device", "--seed", "--out",
                 "--iters", "--batch", "--lr", "--ema-halflife", "--cache-dir", "--grid", "--no-progress"]:
        assert flag in helptext
    assert helptext.count("default") >= 12


def test_training_progress_in_a_log_is_a_few_plain_lines(gmm, capsys):
    # captured stderr is not a terminal: periodic lines, no redrawn bar (issue 10 item 4)
    train_teacher(gmm, SMALL_MLP, iters=40, batch=16, lr=1e-3, device="cpu", seed=0, progress=True, log_every=5)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert "\r" not in err
    assert 3 <= len(lines) <= 22, lines
    assert lines[0].startswith("teacher gmm: 0/40") and lines[-1].startswith("teacher gmm: 40/40")
    assert "loss=" in lines[-1]
    train_teacher(gmm, SMALL_MLP, iters=5, batch=16, lr=1e-3, device="cpu", seed=0, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- review D4 / D9: flags checked first

from cli_checks import assert_one_line_error  # noqa: E402


def _run_cli(argv, capsys):
    """(exit code, stderr) of `python -m gsd.teacher argv`, in process; argparse errors included."""
    try:
        code = run_main(main, argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    """Training must not start: every case below is refused before it."""
    def boom(*a, **k):
        raise AssertionError("training started before the flags were checked")
    monkeypatch.setattr(teacher_lib, "train_teacher", boom)
    monkeypatch.setattr(teacher_mod, "load_dataset", boom)


def test_out_refuses_an_existing_file_that_is_not_a_teacher(tmp_path, capsys, no_training):
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    code, err = _run_cli(["--dataset", "gmm", "--iters", "5", "--out", str(precious)], capsys)
    assert_one_line_error(code, err, "precious.txt", "not a gsd teacher")
    assert precious.read_text() == "precious\n"
    fake = tmp_path / "fake.safetensors"  # the right name but not ours
    fake.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    code, err = _run_cli(["--dataset", "gmm", "--iters", "5", "--out", str(fake)], capsys)
    assert_one_line_error(code, err, "fake.safetensors")
    assert fake.read_bytes().startswith(b"\x08")


def test_out_replaces_an_existing_teacher_file(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    for iters in ("3", "4"):
        code, err = _run_cli(["--dataset", "gmm", "--iters", iters, "--batch", "8", "--out", str(out),
                              "--no-progress", "--device", "cpu"], capsys)
        assert code == 0, err
        assert load_denoiser(out).metadata["recipe"]["iters"] == int(iters)


@pytest.mark.parametrize("extra, needles", [
    (["--grid", "GRID/g.png"], ["--grid", "image data set"]),                # gmm has no images
    (["--dataset", "digits", "--grid", "/proc/g.png"], ["--grid", "/proc"]),
    (["--dataset", "digits", "--grid", "GRID/g.txt"], ["--grid", ".txt"]),
    (["--dataset", "digits", "--grid", "GRID"], ["--grid", "folder"]),
    (["--out", "/proc/t.safetensors"], ["--out", "/proc"]),
    (["--out", "FILE/t.safetensors"], ["--out", "not a folder"]),
    (["--cache-dir", "FILE"], ["--cache-dir"]),
    (["--iters", str(10 ** 20)], ["--iters"]),
    (["--batch", str(10 ** 20)], ["--batch"]),
    (["--seed", str(10 ** 20)], ["--seed"]),
    (["--seed", str(2 ** 64)], ["--seed"]),
    (["--lr", "nan"], ["--lr"]),
])
def test_every_flag_is_checked_before_training(tmp_path, capsys, no_training, extra, needles):
    (tmp_path / "FILE").write_text("x")
    argv = ["--dataset", "gmm", "--iters", "5"] + [a.replace("GRID", str(tmp_path)).replace("FILE", str(tmp_path / "FILE"))
                                                    for a in extra]
    code, err = _run_cli(argv, capsys)
    assert_one_line_error(code, err, *needles)
    assert (tmp_path / "FILE").read_text() == "x"


def test_grid_is_checked_before_writing_out(tmp_path, capsys, monkeypatch):
    # the review's case: training ran, the teacher replaced --out, then --grid was refused
    def boom(*a, **k):
        raise AssertionError("trained")
    monkeypatch.setattr(teacher_lib, "train_teacher", boom)
    out = tmp_path / "t.safetensors"
    code, err = _run_cli(["--dataset", "gmm", "--no-progress", "--iters", "300", "--grid", str(tmp_path / "g.png"),
                          "--out", str(out)], capsys)
    assert_one_line_error(code, err, "--grid")
    assert not out.exists()


def test_huge_batch_is_refused_by_its_memory_estimate(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "1")
    monkeypatch.setattr(teacher_lib, "train_teacher", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    code, err = _run_cli(["--dataset", "gmm", "--batch", str(10 ** 9), "--out", str(tmp_path / "t.safetensors")],
                         capsys)
    assert_one_line_error(code, err, "GB", "--batch")


def test_diverging_lr_is_one_line_and_stops_early(tmp_path, capsys, gmm):
    code, err = _run_cli(["--dataset", "gmm", "--iters", "400", "--batch", "8", "--lr", "1e30", "--no-progress",
                          "--device", "cpu", "--out", str(tmp_path / "t.safetensors")], capsys)
    assert_one_line_error(code, err, "non-finite loss", "--lr")
    assert "iteration 50 " in err  # the first loss window, not after all 400 iterations
    assert not (tmp_path / "t.safetensors").exists()
    with pytest.raises(UsageError, match="non-finite"):
        train_teacher(gmm, SMALL_MLP, iters=60, batch=8, lr=1e30, device="cpu", progress=False, log_every=10)
    # 1e308 cannot even be applied by Adam in float32 (the review's RuntimeError traceback)
    code, err = _run_cli(["--dataset", "gmm", "--iters", "400", "--batch", "8", "--lr", "1e308", "--no-progress",
                          "--device", "cpu", "--out", str(tmp_path / "t.safetensors")], capsys)
    assert_one_line_error(code, err, "overflows float32", "--lr")
