"""`python -m gsd.train`: bad input fails in one line with exit code 2 before training; tiny
end-to-end runs on gmm and digits write config, log, checkpoints, samples.png, metrics.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsd import runs
from gsd.distillation.run import run as distill_run
from gsd.cli import run_main
from gsd.models.networks import build_denoiser
from gsd.models.checkpoint import save_denoiser
from gsd import train
from cli_checks import assert_one_line_error
from factories import tiny_mlp_file, tiny_unet_file

REPO = Path(__file__).resolve().parents[2]


FAST = ["--no-progress", "--device", "cpu", "--latency-repeats", "1", "--classifier-epochs", "1"]


def run_cli_inprocess(argv, capsys):
    try:
        code = run_main(train.main, argv)
    except SystemExit as exc:  # argparse's own errors (also exit code 2, one line)
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def test_subprocess_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GSD_CACHE": str(tmp_path / "cache")}
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    cases = [
        (["--dataset", "imagenet"], "imagenet"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path / "missing")], "missing"),
        (["--teacher", str(garbage), "--out", str(tmp_path / "o1")], "garbage.safetensors"),
    ]
    for argv, needle in cases:
        p = subprocess.run([sys.executable, "-m", "gsd.train", *argv, "--no-progress"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert_one_line_error(p.returncode, p.stderr, needle)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "runs").exists()


def test_inprocess_errors(tmp_path, capsys):
    gmm_teacher = tiny_mlp_file(tmp_path)
    out = tmp_path / "never"
    (tmp_path / "snapshot.pkl").write_bytes(b"not read without --trust-pickle")
    (tmp_path / "empty-folder").mkdir()
    cases = [
        (["--teacher", str(tmp_path / "snapshot.pkl")], ["--trust-pickle"]),
        (["--teacher", str(tmp_path / "empty-folder")], ["not a diffusers"]),
        (["--lambda-sid", "0", "--lambda-irl", "0"], ["both 0"]),
        (["--alpha", "0"], ["--alpha"]),
        (["--alpha", "-1.5"], ["--alpha"]),
        (["--tmax", "2000"], ["--tmax"]),
        (["--teacher", str(tmp_path / "nope.safetensors")], ["nope.safetensors"]),
        (["--dataset", "digits", "--teacher", gmm_teacher], ["shape"]),  # an MLP teacher for 2-D data
        (["--lr", "-1"], ["--lr"]),
        (["--irl-scale", "big"], ["--irl-scale"]),
        (["--ema-rampup", "-0.1"], ["--ema-rampup"]),
        (["--ema-rampup", "nan"], ["--ema-rampup"]),
    ]
    for argv, needles in cases:
        code, err = run_cli_inprocess([*argv, "--out", str(out), *FAST], capsys)
        assert_one_line_error(code, err, *needles)
        assert not out.exists()


def _files(d: Path):
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_gmm_end_to_end_then_out_and_resume_checks(tmp_path, capsys):
    teacher = tiny_mlp_file(tmp_path)
    out = tmp_path / "gmm_run"
    argv = ["--dataset", "gmm", "--teacher", teacher, "--exact-teacher", "--iters", "6", "--batch", "32",
            "--lambda-irl", "0.5", "--ema-rampup", "0.3", "--eval-samples", "300", "--ckpt-every", "4",
            "--out", str(out), *FAST]
    code = run_main(train.main, argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "run directory" in captured.out and str(out) in captured.out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "gmm" and cfg["lambda_irl"] == 0.5 and cfg["exact_teacher"] is True
    assert cfg["ema_rampup"] == 0.3 and runs.load_checkpoint_state(out, 6)["distiller"]["config"]["ema_rampup"] == 0.3
    log = runs.read_log(out)
    assert log[-1]["iteration"] == 6 and log[-1]["images_seen"] == 6 * 32
    assert {"time", "loss_sid", "loss_irl", "loss_fake", "nan_samples", "nan_grads"} <= set(log[-1])
    assert runs.latest_step(out) == 6
    m = json.loads((out / "metrics.json").read_text())
    assert m["one_step"]["nfe"] == 1 and m["teacher"]["nfe"] == 35
    for k in ("fd", "latency_ms", "sliced_wasserstein", "modes_covered", "num_modes"):
        assert k in m["one_step"] and k in m["teacher"]
    assert m["teacher"]["modes_covered"] == m["teacher"]["num_modes"] == 8  # exact teacher
    assert m["fd_feature"] == "raw coordinates" and 0 <= m["isometry_defect"] <= 1
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = _files(out)
    # the same --out again: refused, nothing touched
    code, err = run_cli_inprocess(argv, capsys)
    assert_one_line_error(code, err, "--resume")
    # a different run into it: refused
    code, err = run_cli_inprocess([*argv[:-len(FAST)], "--lr", "0.01", *FAST], capsys)
    assert_one_line_error(code, err, "different run")
    # --resume with a conflicting flag: refused
    code, err = run_cli_inprocess(["--resume", str(out), "--lambda-irl", "2", *FAST], capsys)
    assert_one_line_error(code, err, "lambda_irl")
    code, err = run_cli_inprocess(["--resume", str(out), "--ema-rampup", "0.05", *FAST], capsys)
    assert_one_line_error(code, err, "ema_rampup")
    code, err = run_cli_inprocess(["--resume", str(tmp_path), *FAST], capsys)
    assert_one_line_error(code, err, "not a gsd run")
    assert _files(out) == before
    # extending --iters is allowed
    code = run_main(train.main, ["--resume", str(out), "--iters", "8", "--eval-samples", "0", *FAST])
    capsys.readouterr()
    assert code == 0 and runs.latest_step(out) == 8


def test_nan_injection_is_logged(tmp_path):
    teacher = tiny_mlp_file(tmp_path)

    def hook(phase, x):
        if phase == "generator" and hook.calls == 2:
            x = x.clone()
            x[0] = float("nan")
        if phase == "generator":
            hook.calls += 1
        return x
    hook.calls = 0

    out = distill_run(dict(dataset="gmm", teacher=teacher, exact_teacher=True, iters=5, batch=16, lambda_irl=0.3,
                         log_every=100, eval_samples=0, progress=False, device="cpu", out=str(tmp_path / "r")),
                    nan_hook=hook)
    log = runs.read_log(out)
    nan_recs = [r for r in log if r["nan_samples"]]
    assert len(nan_recs) == 1 and nan_recs[0]["iteration"] == 3 and nan_recs[0]["nan_samples"] == 1
    assert nan_recs[0]["nan_events_total"] == 1
    assert log[-1]["iteration"] == 5  # training went on
    w, _ = runs.load_checkpoint(out)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_digits_end_to_end(tmp_path, capsys):
    teacher = tiny_unet_file(tmp_path)
    out = tmp_path / "digits_run"
    code = run_main(train.main, ["--teacher", teacher, "--iters", "3", "--batch", "8", "--eval-samples", "100",
                                 "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    m = json.loads((out / "metrics.json").read_text())
    assert m["fd_feature"].startswith("digits-cnn") and 0 <= m["classifier_test_accuracy"] <= 1
    assert m["one_step"]["fd"] >= 0 and m["teacher"]["fd"] >= 0
    assert m["one_step"]["latency_ms"] > 0 and m["teacher"]["latency_ms"] > 0
    # metrics.json's numbers recomputed from the saved generator outside the evaluation (scipy's
    # Frechet distance on seeds 0..99, the float64 oracle on the 512 held-out isometry latents)
    from test_evaluate import _independent_digits_metrics
    fd, defect = _independent_digits_metrics(out, tmp_path / "cache", seed=0, num=100, isometry_latents=512)
    assert m["one_step"]["fd"] == pytest.approx(fd, rel=1e-3)
    assert m["isometry_defect"] == pytest.approx(defect, rel=1e-3, abs=1e-6)
    assert (out / "samples.png").exists() and (out / "teacher.safetensors").exists()
    assert "one-step" in captured.out and "teacher" in captured.out


def test_a_run_without_eval_samples_evaluates_the_dataset_default(tmp_path):
    """No --eval-samples: the end-of-run evaluation takes the data set's default size (gmm: 4000).
    Every other test passes the flag, which hid a NameError on this path after a refactor."""
    from gsd.config import DATASET_DEFAULTS

    out = distill_run(dict(dataset="gmm", teacher=tiny_mlp_file(tmp_path), exact_teacher=True, iters=2, batch=16,
                         progress=False, device="cpu", latency_repeats=1, out=str(tmp_path / "r")))
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    assert metrics["num_samples"] == DATASET_DEFAULTS["gmm"]["eval_samples"] == 4000
    # gmm's default is plain SiD (2-D latents: a local isometry forbids the modes)
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["lambda_irl"] == 0 and cfg["irl_neighbours"] == 0


def test_the_default_digits_run_trains_the_isometric_term(tmp_path):
    out = distill_run(dict(teacher=tiny_unet_file(tmp_path), iters=2, eval_samples=0, progress=False, device="cpu",
                         out=str(tmp_path / "r")))
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["dataset"] == "digits" and cfg["lambda_irl"] > 0 and cfg["irl_neighbours"] > 0
    log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    assert log and all(r["irl_weight"] > 0 and "loss_irl" in r for r in log)
