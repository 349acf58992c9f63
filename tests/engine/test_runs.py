"""Run directories: atomic checkpoints, logs, RNG capture, resume checks and bit-exact resume."""

import json
import os
import random

import numpy as np
import pytest
import torch

from gsd.fileio import atomic_torch_save, write_json_atomic
from gsd import runs
from gsd.errors import UsageError


def _weights(v):
    return {"a": torch.full((3,), float(v)), "b": torch.arange(4, dtype=torch.float32) * v}


def test_checkpoints_latest_and_periodic(tmp_path):
    for step in (10, 20, 30, 40):
        runs.save_checkpoint(tmp_path, step, _weights(step), {"x": step}, keep_every=20)
    assert runs.latest_step(tmp_path) == 40
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # 10 and 30 were superseded and are not periodic; 20 is periodic; 40 is the latest
    assert "ckpt-00000010.pt" not in files and "ckpt-00000030.pt" not in files
    assert "ckpt-00000020.safetensors" in files and "ckpt-00000040.safetensors" in files
    w, s = runs.load_checkpoint(tmp_path)
    assert s["step"] == 40 and s["x"] == 40 and torch.equal(w["a"], _weights(40)["a"])
    w20, s20 = runs.load_checkpoint(tmp_path, 20)
    assert s20["x"] == 20


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    runs.save_checkpoint(tmp_path, 5, _weights(5), {"x": 5})
    real_replace = os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # weights of step 6 landed, its state file did not
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(tmp_path, 6, _weights(6), {"x": 6})
    monkeypatch.setattr(runs.os, "replace", real_replace)
    assert runs.latest_step(tmp_path) == 5
    w, s = runs.load_checkpoint(tmp_path)
    assert s["x"] == 5 and torch.equal(w["a"], _weights(5)["a"])
    # no temporary file is left behind
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


def _resign(run_dir, step):
    """Digests matching the checkpoint's files as they are now (a writer that also forged them)."""
    import hashlib
    d = run_dir / "checkpoints"
    digests = {half: hashlib.sha256((d / f"ckpt-{step:08d}.{half}").read_bytes()).hexdigest()
               for half in ("safetensors", "pt")}
    (d / f"ckpt-{step:08d}.json").write_text(json.dumps({"format": "gsd-ckpt/1", "step": step, "sha256": digests}))


def test_state_is_loaded_with_weights_only(tmp_path):
    bad = {"obj": object}  # not allowed by weights_only=True
    runs.save_checkpoint(tmp_path, 1, _weights(1), {"x": 1})
    atomic_torch_save({"step": 1, **bad}, tmp_path / "checkpoints" / "ckpt-00000001.pt")
    _resign(tmp_path, 1)  # past the digest check: weights_only itself must refuse it
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        runs.load_checkpoint(tmp_path)


def test_rng_capture_restore_roundtrip():
    g = torch.Generator().manual_seed(3)
    state = runs.capture_rng_state({"g": g})
    # the state survives torch.save / torch.load(weights_only=True)
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    runs.restore_rng_state(state, {"g": g})
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])


def test_log_truncation_and_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with runs.JsonlLogger(path) as log:
        for i in (10, 20, 30):
            log.log({"iteration": i, "loss": float("nan") if i == 30 else 1.0})
    with open(path, "a") as fh:
        fh.write('{"iteration": 4')  # torn line of a crash
    recs = runs.read_log(path)
    assert [r["iteration"] for r in recs] == [10, 20, 30] and recs[2]["loss"] is None  # standard JSON: null
    runs.JsonlLogger(path, truncate_after_step=20).close()
    assert [r["iteration"] for r in runs.read_log(path)] == [10, 20]


def test_resume_and_out_checks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "config.json", {"dataset": "gmm", "lr": 0.0002, "iters": 10, "irl_scale": "optimal"})
    with pytest.raises(UsageError, match="no complete checkpoint"):
        runs.check_resume_dir(run, {"lr": 2e-4, "iters": 99})
    runs.save_checkpoint(run, 10, _weights(1), {})
    assert runs.check_resume_dir(run, {"lr": 2e-4, "iters": 99})["dataset"] == "gmm"  # iters may grow
    with pytest.raises(UsageError, match="lr: run has 0.0002, given 0.001"):
        runs.check_resume_dir(run, {"lr": 1e-3})
    with pytest.raises(UsageError, match="not a gsd run"):
        runs.check_resume_dir(tmp_path, {})
    with pytest.raises(UsageError, match="different run"):
        runs.prepare_run_dir(run, {"dataset": "digits"})
    with pytest.raises(UsageError, match="--resume"):
        runs.prepare_run_dir(run, {"dataset": "gmm", "lr": 2e-4})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        runs.prepare_run_dir(tmp_path / "other", {})
    (tmp_path / "empty").mkdir()
    assert runs.prepare_run_dir(tmp_path / "empty", {}) == tmp_path / "empty"


def _tiny_teacher_file(tmp_path):
    from factories import tiny_mlp
    from gsd.models.checkpoint import save_denoiser

    path = tmp_path / "tiny_gmm_teacher.safetensors"
    save_denoiser(path, tiny_mlp(seed=5))
    return str(path)


def test_resume_is_bit_exact(tmp_path):
    """N iterations straight == N/2, then --resume to N (same weights, bit for bit)."""
    from gsd.distillation.run import run

    teacher = _tiny_teacher_file(tmp_path)
    base = dict(dataset="gmm", teacher=teacher, exact_teacher=True, batch=16, lambda_irl=0.5, device="cpu",
                eval_samples=0, progress=False, ckpt_every=3, log_every=1, ema_halflife=64.0)
    straight = run({**base, "iters": 6, "out": str(tmp_path / "straight")})
    half = run({**base, "iters": 3, "out": str(tmp_path / "half")})
    # consume some global randomness in between, as another program would
    torch.rand(5), np.random.rand(5), random.random()
    resumed = run({"resume": str(half), "iters": 6, "progress": False, "eval_samples": 0},
                  explicit={"iters": 6})
    assert resumed == half
    w1, s1 = runs.load_checkpoint(straight)
    w2, s2 = runs.load_checkpoint(resumed)
    assert s1["step"] == s2["step"] == 6
    assert set(w1) == set(w2)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert json.loads((resumed / "config.json").read_text())["iters"] == 6
    its = [r["iteration"] for r in runs.read_log(resumed)]
    assert its == list(range(1, 7))


def test_find_checkpoint_falls_back_to_newest_complete(tmp_path):
    for step in (2, 4, 6):
        runs.save_checkpoint(tmp_path, step, _weights(step), {"x": step}, keep_every=2)
    assert runs.find_checkpoint(tmp_path) == (6, None)
    (tmp_path / "checkpoints" / "ckpt-00000006.pt").unlink()
    step, note = runs.find_checkpoint(tmp_path)
    assert step == 4 and "6" in note and "\n" not in note
    (tmp_path / "checkpoints" / "latest.json").unlink()  # a kill before the first latest.json
    step, note = runs.find_checkpoint(tmp_path)
    assert step == 4 and "latest.json" in note
    # a new checkpoint after a fallback supersedes the one resumed from (4 is kept: periodic)
    runs.save_checkpoint(tmp_path, 5, _weights(5), {"x": 5}, keep_every=2)
    assert runs.find_checkpoint(tmp_path) == (5, None)
    assert runs.complete_steps(tmp_path) == [2, 4, 5]


def test_restartable_run_dirs(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_json_atomic(run / "config.json", {"dataset": "gmm", "run_format": runs.RUN_FORMAT})
    (run / "log.jsonl").write_text("")
    (run / "teacher.safetensors").write_bytes(b"x")
    # what a kill during the first checkpoint leaves: one half, temp files
    (run / "checkpoints" / "ckpt-00000005.safetensors").write_bytes(b"x")
    (run / "checkpoints" / ".ckpt-00000005.pt.tmp123").write_bytes(b"x")
    assert runs.restartable(run)
    assert runs.prepare_run_dir(run, {"dataset": "digits"}, allow_restart=True) == run
    with pytest.raises(UsageError, match="different run"):
        runs.prepare_run_dir(run, {"dataset": "digits"})  # only when asked for
    (run / "notes.txt").write_text("mine")
    assert not runs.restartable(run)  # never empties a folder holding other files
    with pytest.raises(UsageError):
        runs.clear_dead_run(run)
    (run / "notes.txt").unlink()
    runs.clear_dead_run(run)
    assert run.is_dir() and not any(run.iterdir())
    write_json_atomic(run / "config.json", {"dataset": "gmm"})
    runs.save_checkpoint(run, 1, _weights(1), {})
    assert not runs.restartable(run)  # a checkpoint is training worth keeping


def test_check_out_path(tmp_path):
    runs.check_out_path(tmp_path / "new" / "deeper")  # creatable: fine, nothing created
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    for bad, needle in ((tmp_path / "f" / "run", "is a file"), (tmp_path / "f", "not a directory"),
                        ("/proc/x", "/proc"), ("/sys/kernel/x", "/sys")):
        with pytest.raises(UsageError, match=needle):
            runs.check_out_path(bad)


def test_stale_temp_files_of_dead_writers_only(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    mine = tmp_path / f".config.json.tmp{os.getpid()}"
    dead = tmp_path / "checkpoints" / ".latest.json.tmp4194305"  # above Linux's largest pid
    other = tmp_path / "checkpoints" / "ckpt-00000001.pt"
    for p in (mine, dead, other):
        p.write_bytes(b"x")
    assert runs.remove_stale_temp_files(tmp_path) == [dead]
    assert mine.exists() and other.exists()
