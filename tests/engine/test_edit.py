"""gsd.edit: slerp, direction finding, edit_metrics / edit.json on a tiny run, CLI errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gsd import edit, train
from gsd.evaluation import editing
from gsd.errors import UsageError
from gsd.distillation.run import run as distill_run
from gsd.cli import run_main

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-iteration digits run on a tiny U-Net; the digits classifier (1 epoch) in a private cache."""
    from factories import tiny_unet_file

    tmp = tmp_path_factory.mktemp("edit")
    teacher = tiny_unet_file(tmp)
    out = distill_run(dict(dataset="digits", teacher=teacher, iters=3, batch=8, lambda_irl=0.5, eval_samples=0,
                         progress=False, device="cpu", out=str(tmp / "run"), cache_dir=str(tmp / "cache"),
                         classifier_epochs=1, log_every=100))
    return Path(out)


# ------------------------------------------------------------------------------- slerp

def test_slerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(5, 1, 8, 8, generator=g)
    z2 = torch.randn(5, 1, 8, 8, generator=g) * 1.7
    assert torch.equal(editing.slerp(z1, z2, 0.0), z1)
    assert torch.equal(editing.slerp(z1, z2, 1.0), z2)
    r1 = z1.flatten(1).norm(dim=1)
    r2 = z2.flatten(1).norm(dim=1)
    prev_cos = None
    for t in np.linspace(0.05, 0.95, 7):
        zt = editing.slerp(z1, z2, float(t))
        rt = zt.flatten(1).norm(dim=1)
        torch.testing.assert_close(rt, (1 - t) * r1 + t * r2, rtol=1e-5, atol=1e-5)  # norms interpolate
        cos = torch.nn.functional.cosine_similarity(zt.flatten(1), z1.flatten(1))
        if prev_cos is not None:
            assert (cos < prev_cos + 1e-6).all()  # moves monotonically away from z1
        prev_cos = cos
    # equal norms: the norm stays constant along the great circle, the midpoint bisects the angle
    z2n = z2 / r2.view(-1, 1, 1, 1) * r1.view(-1, 1, 1, 1)
    mid = editing.slerp(z1, z2n, 0.5)
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), r1, rtol=1e-5, atol=1e-5)
    c1 = torch.nn.functional.cosine_similarity(mid.flatten(1), z1.flatten(1))
    c2 = torch.nn.functional.cosine_similarity(mid.flatten(1), z2n.flatten(1))
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-5)
    # per-row t and (nearly) parallel rows
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    out = editing.slerp(z1, 2 * z1, t)
    torch.testing.assert_close(out, z1 * (1 + t).view(-1, 1, 1, 1))


# ------------------------------------------------------------------------------- directions

def test_planted_direction_is_recovered():
    rng = np.random.default_rng(0)
    d = 64
    w = rng.standard_normal(d)
    w /= np.linalg.norm(w)
    z = 2.5 * rng.standard_normal((1000, d))
    y = (z @ w > 0).astype(int)
    n, acc = editing.fit_direction(z, y)
    assert float(n @ w) > 0.9 and acc > 0.9
    assert np.linalg.norm(n) == pytest.approx(1.0)
    # one-vs-rest: class 1 is the positive side of w, class 0 the negative side
    dirs, skipped = editing.find_directions(torch.as_tensor(z), torch.as_tensor(y), [0, 1, 7])
    assert float(dirs[1]["normal"] @ w) > 0.9 and float(dirs[0]["normal"] @ w) < -0.9
    assert 7 in skipped and 7 not in dirs


def test_filtered_mean_drops_outliers():
    v = np.concatenate([np.ones(1000), [1e9]])
    assert editing.filtered_mean(v) == pytest.approx(1.0)
    assert math.isnan(editing.filtered_mean([float("nan")]))


# ------------------------------------------------------------------------------- on a run

def test_edit_metrics_and_cli_write_edit_json(tiny_run, tmp_path, capsys):
    m = editing.edit_metrics(tiny_run, num=200, alphas=(0.25, 0.5), num_edit=16, path_steps=2)
    for k in ("success_rate", "path_smoothness", "path_smoothness_random", "feature", "convention", "alphas",
              "per_class", "label_counts", "latent_norm", "lambda_irl", "checkpoint_step"):
        assert k in m, k
    assert m["lambda_irl"] == 0.5 and m["checkpoint_step"] == 3 and m["latent_dim"] == 64
    assert m["latent_norm"] == pytest.approx(2.5 * 8)
    assert set(m["success_rate"]) == {"0.25", "0.5"}
    assert all(v is None or 0 <= v <= 1 for v in m["success_rate"].values())
    assert sum(m["label_counts"]) == 200 and "digits-cnn" in m["feature"]
    assert m["path_smoothness_random"] >= 0
    json.dumps(m)  # JSON-able

    out = tmp_path / "edits"
    code = run_main(edit.main, [str(tiny_run), "--num", "200", "--num-edit", "16", "--path-steps", "2",
                                "--alphas", "0.25", "0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    saved = json.loads((out / "edit.json").read_text())
    assert saved["success_rate"].keys() == m["success_rate"].keys() and "files" in saved
    assert (out / "interp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in saved["files"]:
        assert (out / f).exists()
    assert "edit success rate" in printed and "path smoothness" in printed


def _one_line(code, err, needle):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def test_cli_errors_exit_2_one_line(tiny_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"hello": 1}))
    cases = [
        ([str(tmp_path / "missing")], "missing"),
        ([str(tmp_path)], "not a gsd run"),          # no config.json
        ([str(foreign)], "not a gsd.train run"),
        ([str(tiny_run), "--target-class", "12"], "--target-class 12"),
        ([str(tiny_run), "--target-class", "-1"], "--target-class -1"),
        ([str(tiny_run), "--alphas", "0"], "--alphas"),
    ]
    for argv, needle in cases:
        try:
            code = run_main(edit.main, argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        _one_line(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "missing").exists()


def test_cli_subprocess_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "gsd.edit", str(tmp_path / "nope")], env=env, capture_output=True,
                       text=True, timeout=120)
    _one_line(p.returncode, p.stderr, "nope")


def test_huge_numbers_and_bad_out_are_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    # review D9: --alphas 1e308 and --seed 1e20 were tracebacks (OverflowError, scikit-learn)
    (tmp_path / "FILE").write_text("x")
    from gsd.evaluation import editing

    # the library's name (edit_metrics calls it there): the checks come before any loading
    monkeypatch.setattr(editing, "load_generator", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cases = [
        (["--alphas", "1e308"], "--alphas"),
        (["--alphas", "0.1", "inf"], "--alphas"),
        (["--alphas", "nan"], "--alphas"),
        (["--alphas", "101"], "--alphas"),
        (["--seed", str(10 ** 20)], "--seed"),
        (["--seed", str(2 ** 32)], "--seed"),
        (["--num", str(10 ** 20)], "--num"),
        (["--path-steps", str(10 ** 20)], "--path-steps"),
        (["--out", "/proc/edits"], "/proc"),
        (["--out", str(tmp_path / "FILE" / "sub")], "--out"),
    ]
    for argv, needle in cases:
        try:
            code = run_main(edit.main, [str(tiny_run), *argv])
        except SystemExit as exc:
            code = exc.code
        _one_line(code, capsys.readouterr().err, needle)
    with pytest.raises(UsageError, match="alphas"):
        editing.edit_metrics(tiny_run, alphas=[1e308])
    with pytest.raises(UsageError, match="seed"):
        editing.edit_metrics(tiny_run, seed=10 ** 20)


def test_sizes_beyond_memory_are_one_line(tiny_run, capsys, monkeypatch):
    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "0.01")
    try:
        code = run_main(edit.main, [str(tiny_run), "--num-edit", "100000", "--path-steps", "100"])
    except SystemExit as exc:
        code = exc.code
    _one_line(code, capsys.readouterr().err, "GB")
