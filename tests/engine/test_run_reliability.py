"""Reliability of `python -m gsd.train` run directories and runs (review of bc30146, D2 D6 D7
D9 D11) and of what `--fused` means and records (issue 10).

Every case builds its own inputs here: a tiny MLP teacher for gmm, run directories made by
short runs, and hand-damaged copies of them."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gsd_kernels
from gsd.fileio import atomic_torch_save, write_json_atomic
from gsd import runs, train
from gsd.distillation.run import run as distill_run
from gsd.errors import TrainingStopped
from gsd.config import DEFAULT_MAX_BAD_ITERS, EXPLODE_WINDOW
from gsd.cli import run_main
from gsd.distill import Distiller
from gsd.models.checkpoint import save_denoiser
from cli_checks import assert_one_line_error
from factories import as_run_from_before_digests, tiny_mlp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
FAST = ["--no-progress", "--device", "cpu", "--latency-repeats", "1", "--classifier-epochs", "1"]


def teacher_file(tmp_path, scale=None):
    path = tmp_path / ("teacher.safetensors" if scale is None else f"teacher-x{scale:g}.safetensors")
    if not path.exists():
        net = tiny_mlp(seed=5)
        if scale is not None:  # finite weights whose outputs overflow float32
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(scale)
        save_denoiser(path, net)
    return str(path)


def base_args(tmp_path, out, *extra, iters=3):
    return ["--dataset", "gmm", "--teacher", teacher_file(tmp_path), "--exact-teacher", "--batch", "16",
            "--iters", str(iters), "--eval-samples", "0", "--out", str(out), *FAST, *extra]


def cli(argv, capsys):
    try:
        code = run_main(train.main, argv)
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.err, cap.out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail loudly if a check comes after the data set / teacher are loaded."""
    import gsd.distillation.run

    def boom(*a, **k):
        raise AssertionError("the data set or teacher was loaded before the settings were checked")
    # the names gsd.distillation.run calls (imported at its top)
    for name in ("load_dataset", "load_teacher", "load_run_teacher", "get_teacher"):
        monkeypatch.setattr(gsd.distillation.run, name, boom)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GSD_CACHE", str(tmp_path / "cache"))


def ckpt_tensors(run_dir, step=None):
    w, s = runs.load_checkpoint(run_dir, step)
    flat = dict(w)

    def walk(prefix, obj):
        if torch.is_tensor(obj):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)
    walk("state", {k: v for k, v in s["distiller"].items() if k in ("opt_g", "opt_f", "rng")})
    return s["step"], flat


def assert_same_checkpoints(a, b):
    sa, ta = ckpt_tensors(a)
    sb, tb = ckpt_tensors(b)
    assert sa == sb
    assert set(ta) == set(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


# ------------------------------------------------------------------------------ A / B: --fused


def test_fused_without_a_fused_backend_stops_before_writing(tmp_path, capsys, monkeypatch, no_loading):
    def none(device):
        raise ValueError("no fused backend can run on cpu: cpu: not built (--no-fused runs the eager reference ops)")
    monkeypatch.setattr(gsd_kernels, "fused_backend", none)
    out = tmp_path / "fused-run"
    code, err, _ = cli(base_args(tmp_path, out, "--fused"), capsys)
    assert_one_line_error(code, err, "no fused backend", "--no-fused")
    assert not out.exists()


@pytest.mark.skipif("cpu" not in gsd_kernels.available_backends(torch.device("cpu")),
                    reason="the cpu extension is not built")
def test_fused_run_records_the_backends_that_ran(tmp_path, capsys):
    out = tmp_path / "fused"
    argv = base_args(tmp_path, out, "--fused", "--lambda-irl", "0.5")
    argv[argv.index("--eval-samples") + 1] = "200"
    code, err, stdout = cli(argv, capsys)
    assert code == 0, err
    want = {"isometry_loss": "cpu", "sid_generator_loss": "cpu", "fake_score_loss": "cpu"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backends"] == want and cfg["backend"] == "cpu"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backends"] == want
    assert "isometry_loss=cpu" in stdout and "fake_score_loss=cpu" in stdout
    # the Distiller got the concrete name, not "auto"
    _, state = runs.load_checkpoint(out)
    assert state["distiller"]["config"]["backend"] == "cpu"

    # a run directory written before "backends" existed (config.json without it, "auto" in
    # the checkpoint's own config) still resumes, and then records what runs now
    as_run_from_before_digests(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("backends")
    cfg["backend"] = "auto"
    write_json_atomic(out / "config.json", cfg)
    w, s = runs.load_checkpoint(out)
    s["distiller"]["config"]["backend"] = "auto"
    s.pop("run_config", None)
    atomic_torch_save(s, out / "checkpoints" / f"ckpt-{s['step']:08d}.pt")
    code, err, stdout = cli(["--resume", str(out), "--iters", "4", "--eval-samples", "0", *FAST], capsys)
    assert code == 0, err
    assert runs.latest_step(out) == 4
    assert json.loads((out / "config.json").read_text())["backends"] == want
    assert "isometry_loss=cpu" in stdout


def test_reference_run_records_reference(tmp_path, capsys):
    out = tmp_path / "ref"
    code, err, stdout = cli(base_args(tmp_path, out, "--no-fused"), capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backends"] == {"isometry_loss": "reference", "sid_generator_loss": "reference",
                               "fake_score_loss": "reference"}
    assert "sid_generator_loss=reference" in stdout


# ------------------------------------------------------------------------------ D2: Ctrl-C


def _straight(tmp_path, capsys):
    out = tmp_path / "straight"
    code, err, _ = cli(base_args(tmp_path, out, "--ckpt-every", "2", "--lambda-irl", "0.3", iters=6), capsys)
    assert code == 0, err
    return out


def test_interrupt_between_fake_and_generator_step_resumes_bit_exact(tmp_path, capsys, monkeypatch):
    straight = _straight(tmp_path, capsys)
    out = tmp_path / "interrupted"
    real = Distiller.generator_step

    def interrupted(self):
        if self.iteration == 3:  # the fake-score step of iteration 4 is applied, the generator's is not
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(Distiller, "generator_step", interrupted)
    code, err, _ = cli(base_args(tmp_path, out, "--ckpt-every", "2", "--lambda-irl", "0.3", iters=6), capsys)
    assert code == 130
    assert "interrupted" in err
    # never the half-done iteration: the newest checkpoint is a completed one
    assert runs.latest_step(out) == 2
    monkeypatch.setattr(Distiller, "generator_step", real)
    code, err, _ = cli(["--resume", str(out), *FAST], capsys)
    assert code == 0, err
    assert_same_checkpoints(straight, out)


def test_interrupt_after_adam_step_saves_no_partial_state(tmp_path, capsys, monkeypatch):
    straight = _straight(tmp_path, capsys)
    out = tmp_path / "interrupted"
    real = Distiller._update_ema

    def interrupted(self):
        if self.iteration == 2:  # Adam of iteration 3 has updated G and its moments
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(Distiller, "_update_ema", interrupted)
    code, err, _ = cli(base_args(tmp_path, out, "--ckpt-every", "2", "--lambda-irl", "0.3", iters=6), capsys)
    assert code == 130
    assert runs.latest_step(out) == 2
    monkeypatch.setattr(Distiller, "_update_ema", real)
    code, err, _ = cli(["--resume", str(out), *FAST], capsys)
    assert code == 0, err
    assert_same_checkpoints(straight, out)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_sigint_during_a_step_finishes_the_iteration_then_saves(tmp_path, capsys, monkeypatch):
    straight = _straight(tmp_path, capsys)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "sigint"
    real = Distiller.generator_step

    def signalled(self):
        if self.iteration == 2:  # a real Ctrl-C between the two steps of iteration 3
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)
    monkeypatch.setattr(Distiller, "generator_step", signalled)
    code, err, _ = cli(base_args(tmp_path, out, "--ckpt-every", "2", "--lambda-irl", "0.3", iters=6), capsys)
    assert code == 130
    assert "checkpoint of iteration 3" in err
    assert runs.latest_step(out) == 3
    monkeypatch.setattr(Distiller, "generator_step", real)
    code, err, _ = cli(["--resume", str(out), *FAST], capsys)
    assert code == 0, err
    assert_same_checkpoints(straight, out)
    # the handler was put back
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------ D6: runs that go wrong


def test_huge_lr_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "lrbig"
    code, err, _ = cli(base_args(tmp_path, out, "--lr", "1e30", "--ckpt-every", "100", iters=60), capsys)
    assert code != 0
    assert_one_line_error(code, err, "stopped", "--lr")
    log = runs.read_log(out)
    assert log and log[-1]["iteration"] < 60
    # the counters say what the ops dropped
    assert sum(r["nan_samples"] for r in log) > 0


def test_overflowing_teacher_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "ovf"
    argv = ["--dataset", "gmm", "--teacher", teacher_file(tmp_path, scale=1e12), "--no-exact-teacher", "--batch",
            "16", "--iters", "60", "--eval-samples", "0", "--out", str(out), "--lambda-regress", "0", *FAST]
    code, err, _ = cli(argv, capsys)  # (with gmm's regression term on, the pairs refuse it first: below)
    assert_one_line_error(code, err, "stopped")
    assert runs.read_log(out)[-1]["nan_samples"] > 0


def test_overflowing_teacher_pairs_are_refused_before_training(tmp_path, capsys):
    out = tmp_path / "ovf_pairs"
    argv = ["--dataset", "gmm", "--teacher", teacher_file(tmp_path, scale=1e12), "--no-exact-teacher", "--batch",
            "16", "--iters", "60", "--eval-samples", "0", "--out", str(out), "--regress-pairs", "40", *FAST]
    code, err, _ = cli(argv, capsys)
    assert_one_line_error(code, err, "--lambda-regress", "not finite")
    assert not (out / runs.CKPT_DIR).exists() or runs.latest_step(out) is None


def test_exploding_loss_stops(tmp_path, capsys):
    out = tmp_path / "explode"

    def hook(phase, x):  # from iteration 3 on the generator's samples blow up (finite)
        return x * 1e8 if hook.d.iteration >= 2 else x
    real_init = Distiller.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        hook.d = self
    import gsd.distill
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gsd.distill.Distiller, "__init__", init)
        cfg = dict(dataset="gmm", teacher=teacher_file(tmp_path), exact_teacher=True, batch=16, iters=40,
                   eval_samples=0, progress=False, device="cpu", out=str(out), log_every=1)
        with pytest.raises(TrainingStopped, match="explod"):
            distill_run(cfg, nan_hook=hook)
    its = [r["iteration"] for r in runs.read_log(out)]
    # bad once the median of the recent losses has exploded: at most half a window later
    k = DEFAULT_MAX_BAD_ITERS
    assert 2 + k <= max(its) <= 2 + k + EXPLODE_WINDOW // 2


def test_one_bad_sample_does_not_stop(tmp_path):
    def hook(phase, x):
        x = x.clone()
        x[0] = float("nan")
        return x
    out = distill_run(dict(dataset="gmm", teacher=teacher_file(tmp_path), exact_teacher=True, batch=16, iters=12,
                         eval_samples=0, progress=False, device="cpu", out=str(tmp_path / "r")), nan_hook=hook)
    assert runs.latest_step(out) == 12


def test_help_documents_the_stop_rule(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-bad-iters" in text and "non-finite" in text and "explode" in text


# ------------------------------------------------------------------------------ D7 / D9: checked first


@pytest.mark.parametrize("extra,needle", [
    (["--seed", str(10 ** 20)], "--seed"),
    (["--batch", str(10 ** 20)], "--batch"),
    (["--eval-samples", str(10 ** 20)], "--eval-samples"),
    (["--sigma-init", "1e308"], "--sigma-init"),
    (["--lr", "1e308"], "--lr"),
    (["--lr-fake", "1e308"], "--lr-fake"),
    (["--irl-bandwidth", "1e308", "--irl-weighting", "local", "--lambda-irl", "1"], "--irl-bandwidth"),
    (["--lambda-irl", "1", "--irl-bandwidth", "1"], "--irl-weighting local"),
    (["--gen-loss-scale", "1e308"], "--gen-loss-scale"),
])
def test_bad_numbers_are_one_line_before_loading(tmp_path, capsys, no_loading, extra, needle):
    out = tmp_path / "never"
    code, err, _ = cli(base_args(tmp_path, out, *extra), capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_batch_or_eval_samples_beyond_memory_is_one_line_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "1")  # the limit of every gsd command
    out = tmp_path / "never"
    for extra, needle in ((["--batch", str(2 ** 24)], "--batch"), (["--eval-samples", str(2 ** 26)], "--eval-samples")):
        code, err, _ = cli(base_args(tmp_path, out, *extra), capsys)
        assert_one_line_error(code, err, needle, "GB")
        assert not out.exists()
    code, err, _ = cli(base_args(tmp_path, out, "--batch", str(2 ** 10)), capsys)  # fits
    assert code == 0, err


def test_bad_out_is_one_line_before_loading(tmp_path, capsys, no_loading):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out in (afile / "run", "/proc/gsd-run", "/sys/gsd-run", "/proc/self/gsd-run"):
        code, err, _ = cli(base_args(tmp_path, out), capsys)
        assert_one_line_error(code, err, "--out")
    assert afile.read_text() == "not a folder"


def test_unwritable_out_is_one_line(tmp_path, capsys, no_loading, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check answer as for a user
        real_access = os.access
        monkeypatch.setattr(runs.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    try:
        code, err, _ = cli(base_args(tmp_path, ro / "run"), capsys)
        assert_one_line_error(code, err, "--out", "writable")
        assert not (ro / "run").exists()
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_real_ctrl_c_of_a_running_process_resumes_bit_exact(tmp_path, capsys):
    """SIGINT to `python -m gsd.train` at some moment of training: exit 130 with a complete
    checkpoint of the iteration it reached; --resume then ends where a straight run does."""
    import time
    iters = 400
    straight = tmp_path / "straight"
    code, err, _ = cli(base_args(tmp_path, straight, "--ckpt-every", "50", iters=iters), capsys)
    assert code == 0, err
    out = tmp_path / "sig"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "gsd.train", *base_args(tmp_path, out, "--ckpt-every", "50",
                                                                         "--log-every", "1", iters=iters)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(runs.read_log(out)) < 60:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    step = runs.latest_step(out)
    assert step is not None and 60 <= step < iters and f"checkpoint of iteration {step}" in err
    code, err, _ = cli(["--resume", str(out), *FAST], capsys)
    assert code == 0, err
    assert_same_checkpoints(straight, out)


def test_damaged_config_on_resume_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = cli(base_args(tmp_path, out), capsys)
    assert code == 0, err
    good = json.loads((out / "config.json").read_text())
    for key, bad in (("adam_betas", [0.5]), ("adam_betas", "x"), ("seed", "abc"), ("irl_bandwidth", "wide"),
                     ("batch", None), ("lr", [1])):
        write_json_atomic(out / "config.json", {**good, key: bad})
        code, err, _ = cli(["--resume", str(out), "--iters", "4", *FAST], capsys)
        assert_one_line_error(code, err, "--" + key.replace("_", "-"))
    assert runs.latest_step(out) == 3


def test_run_without_checkpoint_restarts_with_out(tmp_path, capsys, monkeypatch):
    out = tmp_path / "dead"

    def crash(self):
        raise RuntimeError("simulated crash in iteration 1")
    monkeypatch.setattr(Distiller, "step", crash)
    with pytest.raises(RuntimeError):
        run_main(train.main, base_args(tmp_path, out))
    capsys.readouterr()
    assert (out / "config.json").exists() and runs.latest_step(out) is None
    monkeypatch.undo()
    # --resume says how to go on, in one line
    code, err, _ = cli(["--resume", str(out), *FAST], capsys)
    assert_one_line_error(code, err, "no complete checkpoint", f"--out {out}")
    # --out with the same (or other) settings starts it again
    code, err, _ = cli(base_args(tmp_path, out, "--lr", "2e-4"), capsys)
    assert code == 0, err
    assert "starting it again" in err
    assert runs.latest_step(out) == 3
    assert json.loads((out / "config.json").read_text())["lr"] == 2e-4
    # a folder with other files in it is never emptied
    (out / "checkpoints" / "latest.json").unlink()
    (out / "my-notes.txt").write_text("keep")
    code, err, _ = cli(base_args(tmp_path, out), capsys)
    assert_one_line_error(code, err, "--out")
    assert (out / "my-notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------ D11


def test_leftover_temp_files_are_removed_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = cli(base_args(tmp_path, out), capsys)
    assert code == 0, err
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid  # a process that no longer runs
    leftovers = [out / "checkpoints" / f".ckpt-00000004.safetensors.tmp{dead}",
                 out / "checkpoints" / f".ckpt-00000004.pt.tmp{dead}",
                 out / "checkpoints" / f".latest.json.tmp{dead}",
                 out / f".config.json.tmp{dead}"]
    for f in leftovers:
        f.write_bytes(b"x" * 100)
    code, err, _ = cli(["--resume", str(out), "--iters", "4", *FAST], capsys)
    assert code == 0, err
    assert not [f for f in leftovers if f.exists()]
    assert runs.latest_step(out) == 4


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    straight = tmp_path / "straight"
    code, err, _ = cli(base_args(tmp_path, straight, "--ckpt-every", "2", "--keep-every", "2", iters=6), capsys)
    assert code == 0, err
    out = tmp_path / "run"
    code, err, _ = cli(base_args(tmp_path, out, "--ckpt-every", "2", "--keep-every", "2", iters=5), capsys)
    assert code == 0, err
    assert runs.latest_step(out) == 5
    (out / "checkpoints" / "ckpt-00000005.pt").unlink()
    code, err, _ = cli(["--resume", str(out), "--iters", "6", *FAST], capsys)
    assert code == 0, err
    notes = [l for l in err.splitlines() if "checkpoint" in l]
    assert len(notes) == 1 and "4" in notes[0] and "5" in notes[0]
    assert_same_checkpoints(straight, out)


def test_resume_with_fewer_iters_than_reached_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = cli(base_args(tmp_path, out, iters=4), capsys)
    assert code == 0, err
    before = (out / "config.json").read_text()
    code, err, _ = cli(["--resume", str(out), "--iters", "2", *FAST], capsys)
    assert_one_line_error(code, err, "--iters", "4")
    assert (out / "config.json").read_text() == before


def test_hand_edited_config_is_detected_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = cli(base_args(tmp_path, out), capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    for key, value in (("batch", 8), ("lr", 0.5), ("dataset", "digits"), ("lambda_irl", 0.25)):
        write_json_atomic(out / "config.json", {**cfg, key: value})
        code, err, _ = cli(["--resume", str(out), "--iters", "4", *FAST], capsys)
        assert_one_line_error(code, err, key)
    write_json_atomic(out / "config.json", cfg)
    code, err, _ = cli(["--resume", str(out), "--iters", "4", *FAST], capsys)
    assert code == 0, err


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_files_are_standard(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"fd": float("nan"), "x": [float("inf"), 1.0]})
    assert _strict_json((tmp_path / "m.json").read_text()) == {"fd": None, "x": [None, 1.0]}
    with runs.JsonlLogger(tmp_path / "log.jsonl") as log:
        log.log({"iteration": 1, "loss": float("-inf")})
    assert _strict_json((tmp_path / "log.jsonl").read_text()) == {"iteration": 1, "loss": None}

    def hook(phase, x):  # iteration 2: every generator sample is NaN -> no isometry loss that iteration
        if phase == "generator" and hook.calls == 1:
            x = torch.full_like(x, float("nan"))
        hook.calls += phase == "generator"
        return x
    hook.calls = 0
    out = distill_run(dict(dataset="gmm", teacher=teacher_file(tmp_path), exact_teacher=True, batch=16, iters=3,
                         lambda_irl=0.5, log_every=1, eval_samples=100, progress=False, device="cpu",
                         latency_repeats=1, out=str(tmp_path / "r")), nan_hook=hook)
    recs = [_strict_json(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert recs[1]["loss_irl"] is None
    _strict_json((out / "metrics.json").read_text())
    _strict_json((out / "config.json").read_text())
