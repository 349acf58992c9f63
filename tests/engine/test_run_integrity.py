"""Nothing damaged is trained on or reported (issue 26, class 2): the run directory's lock,
restarting only directories this engine wrote, checkpoint digests and value checks with the
fall-back to the newest intact checkpoint, config.json and the teacher copy checked against
the checkpoint, and the state a resume must not lose (the stop rule, dropout's RNG, SIGTERM).

Every case damages a run directory that a short run of its own wrote."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from gsd import runs
from gsd.distillation.run import run as distill_run
from gsd.errors import TrainingStopped
from gsd.models.checkpoint import save_denoiser
from cli_checks import assert_one_line_error
from factories import tiny_mlp
from test_run_reliability import FAST, REPO, assert_same_checkpoints, base_args, cli, teacher_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _train(tmp_path, capsys, name, *extra, iters=6):
    out = tmp_path / name
    code, err, _ = cli(base_args(tmp_path, out, "--ckpt-every", "2", "--keep-every", "2", *extra, iters=iters),
                       capsys)
    assert code == 0, err
    return out


def _ckpt(run_dir, step, half):
    return run_dir / runs.CKPT_DIR / f"ckpt-{step:08d}.{half}"


def _resign(run_dir, step):
    """Digests that match the files as they are now: damage the run itself could have written."""
    import hashlib
    digests = {h: hashlib.sha256(_ckpt(run_dir, step, h).read_bytes()).hexdigest() for h in ("safetensors", "pt")}
    _ckpt(run_dir, step, "json").write_text(json.dumps({"format": runs.CKPT_FORMAT, "step": step, "sha256": digests}))


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _xor_tensor_bytes(path):
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    mid = 8 + n + (len(data) - 8 - n) // 2
    for i in range(mid, mid + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _nan_in_ema(path):
    header, body = _header(path)
    name = next(k for k in sorted(header) if k.startswith("ema.") and header[k]["dtype"] == "F32")
    start = header[name]["data_offsets"][0]
    body = bytearray(body)
    body[start:start + 4] = struct.pack("<f", float("nan"))
    _write_header(path, header, bytes(body))


def _f32_to_i32(path):
    header, body = _header(path)
    name = next(k for k in sorted(header) if k != "__metadata__")
    header[name]["dtype"] = "I32"
    _write_header(path, header, body)


def _swap_same_shape(path):
    header, body = _header(path)
    by_shape = {}
    for k, v in sorted(header.items()):
        if k != "__metadata__":
            by_shape.setdefault(tuple(v["shape"]), []).append(k)
    a, b = next(names for names in by_shape.values() if len(names) >= 2)[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    _write_header(path, header, body)


def _flip_pt_bits(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 8):
        data[i] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {  # name: (half, damage, re-sign the digests as the run itself would have)
    "xor-tensor-bytes": ("safetensors", _xor_tensor_bytes, False),
    "nan-in-ema": ("safetensors", _nan_in_ema, True),
    "f32-header-to-i32": ("safetensors", _f32_to_i32, False),
    "f32-header-to-i32-resigned": ("safetensors", _f32_to_i32, True),
    "swapped-tensors": ("safetensors", _swap_same_shape, False),
    "pt-bit-flips": ("pt", _flip_pt_bits, False),
}


# ------------------------------------------------------------------------------ damaged checkpoints

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "straight"
    code = distill_run(dict(dataset="gmm", teacher=teacher_file(tmp), exact_teacher=True, batch=16, iters=6,
                          eval_samples=0, progress=False, device="cpu", out=str(out), ckpt_every=2, keep_every=2))
    assert code == out
    return tmp, out


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_never_resumed(case, straight_run, tmp_path, capsys):
    """The latest checkpoint (6) damaged: --resume says so and continues from checkpoint 4, the
    newest intact one, ending exactly where the undamaged run ended."""
    import shutil
    src_tmp, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    half, damage, resign = DAMAGE[case]
    damage(_ckpt(out, 6, half))
    if resign:
        _resign(out, 6)
    with pytest.raises(runs.DamagedCheckpoint):
        runs.load_checkpoint(out, 6)
    code, err, _ = cli(["--resume", str(out), "--iters", "6", *FAST], capsys)
    assert code == 0, err
    assert "checkpoint 6" in err and "using checkpoint 4, the newest intact one" in err
    assert_same_checkpoints(straight, out)


def test_no_intact_checkpoint_is_one_line(straight_run, tmp_path, capsys):
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for step in runs.complete_steps(out):
        _xor_tensor_bytes(_ckpt(out, step, "safetensors"))
    code, err, _ = cli(["--resume", str(out), "--iters", "8", *FAST], capsys)
    assert_one_line_error(code, err, "no intact checkpoint", "does not match the digest")


def test_a_checkpoint_without_its_digests_is_incomplete(straight_run, tmp_path, capsys):
    """In a run that writes digests, a checkpoint whose digest file is gone is not complete."""
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    _ckpt(out, 6, "json").unlink()
    assert runs.latest_step(out) is None and runs.complete_steps(out) == [2, 4]
    code, err, _ = cli(["--resume", str(out), "--iters", "6", *FAST], capsys)
    assert code == 0, err
    assert_same_checkpoints(straight, out)


# ------------------------------------------------------------------------------ config.json, teacher copy

def test_a_replaced_teacher_copy_is_refused_on_resume(straight_run, tmp_path, capsys):
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    save_denoiser(out / runs.TEACHER_NAME, tiny_mlp(seed=6))  # same architecture, other weights
    code, err, _ = cli(["--resume", str(out), "--iters", "8", *FAST], capsys)
    assert_one_line_error(code, err, "teacher copy", "not the teacher checkpoint 6 was trained with")


def test_config_naming_another_teacher_is_refused_on_resume(straight_run, tmp_path, capsys):
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    save_denoiser(out / "other.safetensors", tiny_mlp(seed=6))
    cfg = json.loads((out / "config.json").read_text())
    cfg["teacher_file"] = "other.safetensors"
    (out / "config.json").write_text(json.dumps(cfg))
    code, err, _ = cli(["--resume", str(out), "--iters", "8", *FAST], capsys)
    assert_one_line_error(code, err, "other.safetensors", "not the teacher")


def test_config_edits_the_checkpoint_contradicts_are_refused_on_resume(straight_run, tmp_path, capsys):
    import shutil
    _, straight = straight_run
    for key, value in (("sigma_init", 5.0), ("exact_teacher", False)):
        out = tmp_path / f"run-{key}"
        shutil.copytree(straight, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg[key] = value
        (out / "config.json").write_text(json.dumps(cfg))
        code, err, _ = cli(["--resume", str(out), "--iters", "8", *FAST], capsys)
        assert_one_line_error(code, err, key, "it was edited")


@pytest.mark.parametrize("content", ["nested", "run-format"])
def test_unreadable_config_json_is_one_line(straight_run, tmp_path, capsys, content):
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    if content == "nested":
        (out / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        needle = "nested too deeply"
    else:
        cfg = json.loads((out / "config.json").read_text())
        cfg["run_format"] = "gsd-run/999"
        (out / "config.json").write_text(json.dumps(cfg))
        needle = "gsd-run/999"
    code, err, _ = cli(["--resume", str(out), "--iters", "8", *FAST], capsys)
    assert_one_line_error(code, err, needle)


# ------------------------------------------------------------------------------ --out: only our own directories

def test_out_never_empties_a_folder_that_is_not_a_run(tmp_path, capsys):
    app = tmp_path / "app"
    app.mkdir()
    (app / "config.json").write_text(json.dumps({"theme": "dark"}))
    (app / "log.jsonl").write_text('{"event": "opened"}\n')
    code, err, _ = cli(base_args(tmp_path, app), capsys)
    assert_one_line_error(code, err, str(app))
    assert json.loads((app / "config.json").read_text()) == {"theme": "dark"}
    assert (app / "log.jsonl").read_text() == '{"event": "opened"}\n'
    assert sorted(p.name for p in app.iterdir()) == ["config.json", "log.jsonl"]


# ------------------------------------------------------------------------------ the lock

def _hold_lock(run_dir):
    """Another process holding the run directory's lock; returns it once the lock is held."""
    code = ("import sys, time; from gsd import runs; runs.RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_live_lock_holder_blocks_training_and_a_dead_one_does_not(straight_run, tmp_path, capsys):
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    holder = _hold_lock(out)
    try:
        code, err, _ = cli(["--resume", str(out), "--iters", "8", *FAST], capsys)
        assert_one_line_error(code, err, "in use by another gsd process", f"pid {holder.pid}")
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        other = _hold_lock(fresh)
        code, err, _ = cli(base_args(tmp_path, fresh), capsys)
        assert_one_line_error(code, err, "in use by another gsd process")
        other.kill()
        other.wait()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the lock does not
        holder.wait()
    assert (out / runs.LOCK_NAME).exists()
    code, err, _ = cli(["--resume", str(out), "--iters", "8", *FAST], capsys)
    assert code == 0, err
    assert runs.latest_step(out) == 8


def test_two_runs_started_together_on_one_out(tmp_path):
    """One of them trains; the other stops in one line; the directory holds one run whose
    config.json and checkpoint agree."""
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "gsd.train",
                               *base_args(tmp_path, out, "--ckpt-every", "5", "--seed", str(seed), iters=40)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser_err = next(err for p, (_, err) in zip(procs, results) if p.returncode == 2)
    assert len(loser_err.strip().splitlines()) == 1
    assert "in use by another gsd process" in loser_err or "already holds" in loser_err
    cfg = runs.read_config(out)
    _, state = runs.load_checkpoint(out)
    assert state["run_config"]["seed"] == cfg["seed"] and runs.latest_step(out) == 40


# ------------------------------------------------------------------------------ what a resume keeps

def test_the_stop_rule_judges_a_resumed_run_as_the_uninterrupted_one(tmp_path, monkeypatch):
    """From the 4th iteration G's samples blow up (finite): the straight run stops; a run resumed
    from checkpoint 3 must stop at the same iteration, not take the blown-up loss as its new
    reference and train on."""
    import gsd.distill
    real_init = gsd.distill.Distiller.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        hook.d = self

    def hook(phase, x):
        return x * 1e8 if hook.d.iteration >= 3 else x

    monkeypatch.setattr(gsd.distill.Distiller, "__init__", init)

    def cfg(out, iters, **extra):
        return dict(dataset="gmm", teacher=teacher_file(tmp_path), exact_teacher=True, batch=16, iters=iters,
                    eval_samples=0, progress=False, device="cpu", out=str(out), log_every=1, ckpt_every=3, **extra)

    with pytest.raises(TrainingStopped, match="explod"):
        distill_run(cfg(tmp_path / "straight", 300), nan_hook=hook)
    stopped_at = runs.read_log(tmp_path / "straight")[-1]["iteration"]
    assert stopped_at < 300
    resumed = tmp_path / "resumed"
    distill_run(cfg(resumed, 3), nan_hook=hook)
    with pytest.raises(TrainingStopped, match="explod"):
        distill_run({"resume": str(resumed), "iters": 300, "progress": False, "device": "cpu"},
                  explicit={"resume": str(resumed), "iters": 300}, nan_hook=hook)
    assert runs.read_log(resumed)[-1]["iteration"] == stopped_at


def test_dropout_is_seeded_by_seed(tmp_path, capsys):
    a = _train(tmp_path, capsys, "a", "--dropout", "0.2", iters=4)
    b = _train(tmp_path, capsys, "b", "--dropout", "0.2", iters=4)
    assert_same_checkpoints(a, b)
    c = _train(tmp_path, capsys, "c", "--dropout", "0.2", "--seed", "1", iters=4)
    wa, wc = runs.load_checkpoint(a)[0], runs.load_checkpoint(c)[0]
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_finishes_the_iteration_saves_and_exits_143(tmp_path, capsys):
    iters = 400
    straight = tmp_path / "straight"
    code, err, _ = cli(base_args(tmp_path, straight, "--ckpt-every", "50", iters=iters), capsys)
    assert code == 0, err
    out = tmp_path / "term"
    p = subprocess.Popen([sys.executable, "-m", "gsd.train", *base_args(tmp_path, out, "--ckpt-every", "50",
                                                                         "--log-every", "1", iters=iters)],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(runs.read_log(out)) < 60:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    step = runs.latest_step(out)
    assert step is not None and 60 <= step < iters and f"checkpoint of iteration {step}" in err
    assert "SIGTERM" in err
    code, err, _ = cli(["--resume", str(out), *FAST], capsys)
    assert code == 0, err
    assert_same_checkpoints(straight, out)


# ------------------------------------------------------------------------------ the readers: evaluate, generate, export

def _evaluate(run_dir, capsys, *extra):
    from gsd.cli import run_main
    from gsd.evaluate import main as evaluate_main
    code = run_main(evaluate_main, [str(run_dir), "--num-samples", "40", "--ppl-samples", "0", "--isometry-latents",
                                    "8", "--latency-repeats", "1", "--device", "cpu", "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


@pytest.mark.parametrize("case", ["xor-tensor-bytes", "nan-in-ema", "pt-bit-flips"])
def test_evaluate_never_scores_a_damaged_checkpoint(case, straight_run, tmp_path, capsys):
    """A damaged latest checkpoint: gsd.evaluate says so and scores checkpoint 4, the newest
    intact one (eval.json's step says which); asked for the damaged one, it refuses in one line."""
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    half, damage, resign = DAMAGE[case]
    damage(_ckpt(out, 6, half))
    if resign:
        _resign(out, 6)
    code, err, _ = _evaluate(out, capsys)
    assert code == 0, err
    assert "note:" in err and "using checkpoint 4, the newest intact one" in err
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 4
    assert all(isinstance(result["one_step"][k], float) and result["one_step"][k] == result["one_step"][k]
               for k in ("fd", "isometry_defect"))  # finite numbers of the intact weights, not NaN
    (out / "eval.json").unlink()
    code, err, _ = _evaluate(out, capsys, "--step", "6")
    assert_one_line_error(code, err, "checkpoint 6")
    assert not (out / "eval.json").exists()


def test_evaluate_refuses_config_edits_the_checkpoint_contradicts(straight_run, tmp_path, capsys):
    """config.json's sigma_init or exact_teacher edited by hand: gsd.evaluate would sample G at
    the wrong noise level or switch the teacher side; it refuses in one line instead, as do
    gsd.generate and gsd.export, which load the run the same way."""
    import shutil
    from gsd.cli import run_main
    from gsd.export import main as export_main
    _, straight = straight_run
    for key, value in (("sigma_init", 5.0), ("exact_teacher", False)):
        out = tmp_path / f"run-{key}"
        shutil.copytree(straight, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg[key] = value
        (out / "config.json").write_text(json.dumps(cfg))
        code, err, _ = _evaluate(out, capsys)
        assert_one_line_error(code, err, key, "it was edited")
        assert not (out / "eval.json").exists()
        code = run_main(export_main, [str(out), "--out", str(tmp_path / f"{key}.safetensors")])
        assert_one_line_error(code, capsys.readouterr().err, key, "it was edited")


def test_evaluate_refuses_a_replaced_teacher_copy(straight_run, tmp_path, capsys):
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    save_denoiser(out / runs.TEACHER_NAME, tiny_mlp(seed=6))  # same architecture, other weights
    code, err, _ = _evaluate(out, capsys)
    assert_one_line_error(code, err, "teacher copy", "not the teacher checkpoint 6 was trained with")


def _hold_shared_lock(run_dir):
    code = ("import sys, time; from gsd import runs; runs.RunLock(sys.argv[1], shared=True).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_readers_and_the_writer_exclude_each_other(straight_run, tmp_path, capsys):
    """gsd.evaluate refuses a run that a gsd.train process holds (it would score a directory in
    the middle of being rewritten); gsd.train refuses to resume a run that an evaluation is
    reading; two readers run together."""
    import shutil
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    writer = _hold_lock(out)
    try:
        code, err, _ = _evaluate(out, capsys)
        assert_one_line_error(code, err, "being written by another gsd process", f"pid {writer.pid}")
        assert not (out / "eval.json").exists()
    finally:
        writer.kill()
        writer.wait()
    reader = _hold_shared_lock(out)
    try:
        code, err, _ = _evaluate(out, capsys)  # a second reader
        assert code == 0, err
        code, err, _ = cli(["--resume", str(out), "--iters", "8", *FAST], capsys)
        assert_one_line_error(code, err, "being read by another gsd process")
        assert runs.latest_step(out) == 6
    finally:
        reader.kill()
        reader.wait()


def test_evaluate_checks_it_can_write_eval_json_before_computing(straight_run, tmp_path, capsys, monkeypatch):
    """A run directory eval.json cannot be written to (read-only) fails in one line before any
    sample is drawn (root ignores permission bits: the check is driven through os.access)."""
    import shutil
    import gsd.evaluation.core as core
    _, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(out)
                        else real_access(p, mode, **kw))
    monkeypatch.setattr(core, "evaluate_loaded", lambda *a, **k: (_ for _ in ()).throw(AssertionError("computed")))
    code, err, _ = _evaluate(out, capsys)
    assert_one_line_error(code, err, str(out))


def test_ppl_samples_beyond_memory_are_refused_before_computing(straight_run, capsys):
    _, straight = straight_run
    code, err, _ = _evaluate(straight, capsys, "--ppl-samples", str(10 ** 12))
    assert_one_line_error(code, err, "--ppl-samples")
