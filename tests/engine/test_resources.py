"""Special files, exhausted resources and settings that did nothing (issue 26, classes 3 and 4):
each ends in a correct value or in one line with exit 2, never in a hang, a traceback or a
silently different run."""

import io
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import gsd_kernels
from gsd import runs, sample, train
from gsd.distillation.run import run as distill_run
from gsd.errors import TrainingStopped
from gsd.cli import run_main
from gsd.data import DataError, load_dataset
from cli_checks import assert_one_line_error
from test_run_reliability import FAST, REPO, base_args, cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _short_run(tmp_path, capsys, name="run", *extra, iters=4):
    out = tmp_path / name
    code, err, _ = cli(base_args(tmp_path, out, "--ckpt-every", "2", *extra, iters=iters), capsys)
    assert code == 0, err
    return out


# ------------------------------------------------------------------------------ special files

@pytest.mark.parametrize("name", ["config.json", "checkpoints/latest.json"])
@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_special_files_in_a_run_directory_are_one_line(tmp_path, capsys, name, kind):
    out = _short_run(tmp_path, capsys)
    path = out / name
    path.unlink()
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)
    # in a child with a deadline: a hang is a failure, not a stuck suite
    p = subprocess.run([sys.executable, "-m", "gsd.train", "--resume", str(out), "--iters", "6", *FAST],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    if name == "config.json":
        assert_one_line_error(p.returncode, p.stderr, "config.json", "not a regular file")
    else:  # latest.json unreadable: the newest complete checkpoint is found without it
        assert p.returncode == 0, p.stderr
        assert "latest.json is missing or damaged" in p.stderr


def test_a_pipe_named_as_an_image_is_refused_not_read(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(DataError, match="pipe.png is not a regular file"):
        load_dataset("folder", data_root=str(tmp_path), resolution=8)


def test_out_through_a_link_we_may_not_follow_is_one_line(tmp_path, capsys):
    link = tmp_path / "proc_link"
    link.symlink_to("/proc/1/cwd")
    code, err, _ = cli(base_args(tmp_path, link), capsys)
    assert_one_line_error(code, err, str(link))
    code, err, _ = cli(["--resume", str(link), *FAST], capsys)
    assert_one_line_error(code, err, str(link))


def test_log_that_is_a_folder_is_one_line_on_resume(tmp_path, capsys):
    out = _short_run(tmp_path, capsys)
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").mkdir()
    code, err, _ = cli(["--resume", str(out), "--iters", "6", *FAST], capsys)
    assert_one_line_error(code, err, "log.jsonl", "not a regular file")


def test_a_thin_png_costs_no_more_memory_than_its_pixels(tmp_path):
    """A 1 x 300000 PNG at --resolution 32: resized whole it was a 32 x 9.6M float image (1.4 GB)."""
    Image.fromarray(np.full((1, 300_000, 3), 200, np.uint8)).save(tmp_path / "thin.png")
    code = ("import resource, sys; from gsd.data import load_dataset; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "ds = load_dataset('folder', data_root=sys.argv[1], resolution=32); "
            "print(ds.data.shape[-1], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res, grown_mib = map(int, p.stdout.split())
    assert res == 32 and grown_mib < 100, p.stdout


# ------------------------------------------------------------------------------ out of space

def _mount_tmpfs(path, size):
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(params=["tmpfs", "write-layer"])
def small_disk(tmp_path, monkeypatch, request):
    """A 200 KB file system: a real tmpfs where this machine lets us mount one, and the write
    layer (gsd.fileio) refusing writes past 200 KB as a full disk does (also where no tmpfs can
    be mounted)."""
    mnt = tmp_path / "small"
    if request.param == "tmpfs" and _mount_tmpfs(mnt, "200k"):
        yield mnt, "tmpfs"
        subprocess.run(["umount", str(mnt)], check=False)
        return
    import errno
    from gsd import fileio
    mnt.mkdir(exist_ok=True)
    used = {"bytes": 0}
    real = fileio._write_file

    def full(tmp, data):
        used["bytes"] += len(data)
        if used["bytes"] > 200_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        real(tmp, data)
    monkeypatch.setattr(fileio, "_write_file", full)
    yield mnt, "write-layer"


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, small_disk):
    mnt, how = small_disk
    out = mnt / "run"
    code, err, _ = cli(base_args(tmp_path, out, "--ckpt-every", "10", iters=200), capsys)
    assert_one_line_error(code, err, "No space left on device", "is intact")
    step = runs.latest_step(out)
    assert step is not None, how
    weights, state = runs.load_checkpoint(out, step)  # intact: digests, values
    assert state["step"] == step
    names = [p.name for p in (out / runs.CKPT_DIR).iterdir()]
    assert not [n for n in names if ".tmp" in n], names
    assert runs.complete_steps(out) == [step]
    # resuming in place on the file system that is still full: one line again, the checkpoint intact
    code, err, _ = cli(["--resume", str(out), *FAST], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert runs.load_checkpoint(out, step)[1]["step"] == step


# ------------------------------------------------------------------------------ sizes that were bombs

def test_a_sampler_step_count_no_sampler_takes_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:  # argparse's exit
        run_main(sample.main, ["--steps", "1000000000", "--out", str(tmp_path / "x.png")])
    assert_one_line_error(info.value.code, capsys.readouterr().err, "--steps", "10000")


def test_more_regression_pairs_than_bounded_are_refused_before_loading(tmp_path, capsys):
    code, err, _ = cli(base_args(tmp_path, tmp_path / "r", "--lambda-regress", "1", "--regress-pairs", "100000000"),
                       capsys)
    assert_one_line_error(code, err, "--regress-pairs", "1048576")
    assert not (tmp_path / "r").exists()


def test_sample_never_overwrites_a_file_that_is_not_an_image(tmp_path, capsys):
    precious = tmp_path / "precious.png"
    precious.write_text("my notes")
    code = run_main(sample.main, ["--out", str(precious), "--num", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "not an image" in err and len(err.strip().splitlines()) == 1
    assert precious.read_text() == "my notes"


def test_a_fraction_alpha_is_taken_as_its_float():
    x, yr, yf = (torch.randn(5, 7, dtype=torch.float64) for _ in range(3))
    for backend in gsd_kernels.available_backends("cpu"):
        want = gsd_kernels.sid_generator_loss(x, yr, yf, alpha=1.2, backend=backend)
        got = gsd_kernels.sid_generator_loss(x, yr, yf, alpha=Fraction(6, 5), backend=backend)
        assert float(got) == pytest.approx(float(want), rel=1e-12), backend


# ------------------------------------------------------------------------------ settings that did nothing

def test_a_radius_float32_cannot_resolve_is_refused(tmp_path, capsys):
    code, err, _ = cli(base_args(tmp_path, tmp_path / "r", "--lambda-irl", "0.25", "--irl-neighbours", "3",
                                 "--irl-radius", "1e-12"), capsys)
    assert_one_line_error(code, err, "--irl-radius", "float32 rounding")
    assert not (tmp_path / "r").exists()


def test_radius_with_the_jacobian_estimator_is_refused(tmp_path, capsys):
    code, err, _ = cli(base_args(tmp_path, tmp_path / "r", "--irl-estimator", "jvp", "--lambda-irl-raw", "0.1",
                                 "--irl-radius", "0.3"), capsys)
    assert_one_line_error(code, err, "--irl-estimator jvp", "--irl-radius")


@pytest.mark.parametrize("flag,value", [("--lambda-irl", "3.4e38"), ("--lambda-sid", "3.4e38"), ("--alpha", "1e20"),
                                        ("--lambda-irl-raw", "1e30"), ("--lambda-regress", "1e30")])
def test_weights_that_can_only_overflow_are_refused(tmp_path, capsys, flag, value):
    code, err, _ = cli(base_args(tmp_path, tmp_path / "r", flag, value), capsys)
    assert_one_line_error(code, err, flag, "overflow")


def test_a_run_whose_gradients_are_all_zeroed_does_not_end_well(tmp_path):
    """Every generator gradient non-finite (zeroed) on every iteration of a 5-iteration run:
    each counts as bad, and the run ends with one line, keeping nothing of those iterations."""
    import gsd.distill
    real = gsd.distill.sanitize_grads

    def poisoned(params):
        params = list(params)
        for p in params:
            if p.grad is not None:
                p.grad.fill_(float("inf"))
        return real(params)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gsd.distill, "sanitize_grads", poisoned)
        cfg = dict(dataset="gmm", teacher=str(tmp_path / "t.safetensors"), exact_teacher=True, batch=16, iters=5,
                   eval_samples=0, progress=False, device="cpu", out=str(tmp_path / "z"), log_every=1)
        from factories import tiny_mlp
        from gsd.models.checkpoint import save_denoiser
        save_denoiser(cfg["teacher"], tiny_mlp(seed=5))
        with pytest.raises(TrainingStopped, match="gradient value"):
            distill_run(cfg)
    assert runs.latest_step(tmp_path / "z") is None


# ------------------------------------------------------------------------------ image folders

def test_transparent_pixels_are_composited_onto_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "clear_red.png")
    half = np.zeros((8, 8, 4), np.uint8)
    half[..., 2], half[..., 3] = 255, 128  # blue at ~50% opacity
    Image.fromarray(half, mode="RGBA").save(tmp_path / "half_blue.png")
    ds = load_dataset("folder", data_root=str(tmp_path), resolution=8)
    clear, blue = ds.data[0], ds.data[1]
    assert torch.allclose(clear, torch.ones_like(clear))  # white, not red
    want = torch.tensor([127 / 255 * 255, 127 / 255 * 255, 255.0]) / 127.5 - 1  # 255 * (1 - 128/255) on R, G
    assert torch.allclose(blue.mean((1, 2)), want, atol=0.02)


def test_exif_orientation_is_honoured(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[:8] = 255  # white top half as stored
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 3  # rotate 180 on display: the white half is at the bottom
    pil.save(tmp_path / "rot.png", exif=exif.tobytes())
    x = load_dataset("folder", data_root=str(tmp_path), resolution=16).data[0]
    assert x[:, 12:].mean() > 0.9 and x[:, :4].mean() < -0.9


def test_a_32_bit_tiff_of_8_bit_values_is_read_at_its_range(tmp_path):
    values = np.arange(64, dtype=np.int32).reshape(8, 8) * 4  # 0..252
    Image.fromarray(values, mode="I").save(tmp_path / "deep.tif")
    x = load_dataset("folder", data_root=str(tmp_path), resolution=8).data[0]
    want = torch.from_numpy(values.astype(np.float32)) / 127.5 - 1
    assert torch.allclose(x[0], want, atol=1e-5)


def test_hidden_folders_are_skipped_as_hidden_files_are(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / ".git").mkdir()
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / ".git" / "icon.png")
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / ".hidden.png")
    ds = load_dataset("folder", data_root=str(tmp_path), resolution=8)
    assert ds.data.shape[0] == 1 and ds.data.max() < -0.99
