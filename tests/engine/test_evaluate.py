"""`python -m gsd.evaluate` on tiny runs, its one-line errors, and the PPL estimator (gsd.evaluation.ppl)
against closed forms."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsd import evaluate, train
from gsd.evaluation import core as eval_core
from gsd.distillation.run import run as distill_run

from gsd.evaluation import ppl
from gsd.cli import run_main
from gsd.models.networks import build_denoiser
from gsd.models.checkpoint import save_denoiser
from cli_checks import assert_one_line_error
from factories import tiny_mlp, tiny_unet

REPO = Path(__file__).resolve().parents[2]
FAST = ["--device", "cpu", "--no-progress", "--latency-repeats", "1", "--isometry-latents", "16",
        "--classifier-epochs", "1"]


def make_tiny_digits_run(root: Path, cache: Path, name="digits_run") -> Path:
    teacher = root / "tiny_teacher.safetensors"
    if not teacher.exists():
        save_denoiser(teacher, tiny_unet())
    return distill_run(dict(teacher=str(teacher), iters=3, batch=8, lambda_irl=0.5, eval_samples=0, progress=False,
                          device="cpu", out=str(root / name), cache_dir=str(cache), ckpt_every=2, fused=True))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalruns")
    cache = root / "cache"
    digits = make_tiny_digits_run(root, cache)
    gmm_teacher = root / "tiny_gmm.safetensors"
    save_denoiser(gmm_teacher, tiny_mlp(seed=3))
    gmm = distill_run(dict(dataset="gmm", teacher=str(gmm_teacher), exact_teacher=True, iters=3, batch=16,
                         lambda_irl=0.5, eval_samples=0, progress=False, device="cpu", out=str(root / "gmm_run")))
    return {"root": root, "cache": cache, "digits": digits, "gmm": gmm}


@pytest.fixture
def no_hub_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch_home" / "hub"))
    yield
    torch.hub.set_dir(old)


def _run(argv, capsys):
    try:
        code = run_main(evaluate.main, argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- end to end

def test_evaluate_digits_writes_eval_json(tiny_runs, capsys, no_hub_weights):
    d = tiny_runs["digits"]
    code, out, err = _run([str(d), "--num-samples", "40", "--ppl-samples", "12", "--seed", "1",
                           "--cache-dir", str(tiny_runs["cache"]), *FAST], capsys)
    assert code == 0, err
    assert "one-step" in out and "teacher Heun" in out and "FID: not computed" in out
    res = json.loads((d / "eval.json").read_text())
    assert res["format"] == eval_core.EVAL_FORMAT and res["step"] == 3 and res["dataset"] == "digits"
    assert res["num_samples"] == 40 and res["seed"] == 1 and res["latent_seeds"] == [100_000_000, 100_000_039]
    assert res["fd_feature"].startswith("digits-cnn") and "not FID" in res["fd_feature"]
    assert res["ppl_feature"].startswith("digits-cnn")
    # no Inception weights here: null with the reason, never a number
    assert res["fid"] is None and res["one_step"]["fid"] is None
    assert "pt_inception-2015-12-05" in res["fid_unavailable"]
    one, teach = res["one_step"], res["teacher"]
    assert one["nfe"] == 1 and teach["nfe"] == 35
    for m in (one, teach):
        assert math.isfinite(m["fd"]) and m["fd"] >= 0
        assert math.isfinite(m["ppl"]) and m["ppl"] > 0 and m["ppl_stderr"] >= 0
        assert m["latency_ms"] > 0
        assert 0 <= m["isometry_defect"] <= 1
    assert res["isometry_defect"] == one["isometry_defect"] and res["isometry_latents"] == 16
    lat = res["latency"]
    assert lat["batch"] == 40 and lat["reduction"] < 1 and lat["speedup"] == pytest.approx(
        teach["latency_ms"] / one["latency_ms"])
    assert res["ppl_settings"]["eps"] == 1e-4 and res["ppl_settings"]["percentiles"] == [1.0, 99.0]
    assert res["ppl_settings"]["num_pairs"] == 12
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["device"] == "cpu"
    assert res["real_split_fd"] >= 0 and 0 <= res["classifier_test_accuracy"] <= 1
    # the numbers themselves, recomputed outside the evaluation: the one-step FD from the images
    # of seeds 1e8 .. 1e8+39 (scipy's sqrtm, not the engine's SVD route) and the isometry defect
    # of the 16 held-out latents (the float64 oracle)
    fd, defect = _independent_digits_metrics(d, tiny_runs["cache"], seed=1, num=40, isometry_latents=16)
    assert one["fd"] == pytest.approx(fd, rel=1e-3)
    assert one["isometry_defect"] == pytest.approx(defect, rel=1e-3, abs=1e-6)


def _independent_digits_metrics(run_dir, cache, *, seed: int, num: int, isometry_latents: int):
    from oracles import frechet_scipy, isometry
    from gsd.data import load_dataset
    from gsd.evaluation.digits_classifier import classifier_features, digits_classifier
    from gsd.generator import load_generator
    from gsd.sampling.samplers import latents_for_seeds

    G = load_generator(run_dir)
    base = seed * 100_000_000
    x, _ = G.generate(range(base, base + num))
    data = load_dataset("digits")
    clf, _ = digits_classifier(data, cache_dir=cache, epochs=1)
    fd = frechet_scipy(classifier_features(clf, x).numpy(), classifier_features(clf, data.data).numpy())
    iso_seeds = range(base + 10_000_000, base + 10_000_000 + isometry_latents)
    x_iso, _ = G.generate(iso_seeds)
    defect = float(isometry(x_iso, latents_for_seeds(iso_seeds, G.sample_shape, "cpu")))
    return fd, defect


def test_evaluate_gmm_has_distribution_metrics(tiny_runs, capsys, no_hub_weights):
    d = tiny_runs["gmm"]
    code, out, err = _run([str(d), "--num-samples", "300", "--ppl-samples", "20", *FAST], capsys)
    assert code == 0, err
    res = json.loads((d / "eval.json").read_text())
    assert res["fd_feature"] == "raw coordinates" and res["ppl_feature"].startswith("raw coordinates")
    assert res["teacher_kind"] == "exact GMM denoiser"
    assert res["fid"] is None and "image" in res["fid_unavailable"]
    for m in (res["one_step"], res["teacher"]):
        assert m["sliced_wasserstein"] >= 0 and math.isfinite(m["mmd"])
        assert m["num_modes"] == 8 and 0 <= m["modes_covered"] <= 8
    assert res["teacher"]["modes_covered"] == 8  # the exact denoiser covers every mode
    assert 0 <= res["true_vs_true"]["fd"] < 0.1  # two true samples of 300: close
    # --require-fid on non-image data: refused
    code, _, err = _run([str(d), "--require-fid", "--num-samples", "50", *FAST], capsys)
    assert_one_line_error(code, err, "--require-fid", "image")


# --------------------------------------------------------------------------- bad input

def test_bad_run_directories_fail_in_one_line(tiny_runs, tmp_path, capsys, no_hub_weights):
    src = tiny_runs["digits"]
    cases = []
    cases.append(([str(tmp_path / "nope")], ["no such run directory"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(([str(empty)], ["not a gsd run directory", "config.json"]))

    old = tmp_path / "old_version"
    shutil.copytree(src, old)
    cfg = json.loads((old / "config.json").read_text())
    for k in ("teacher_file", "exact_teacher"):
        cfg.pop(k)
    (old / "config.json").write_text(json.dumps(cfg))
    cases.append(([str(old)], ["lacks", "teacher_file", "exact_teacher", "version"]))

    no_ckpt = tmp_path / "no_ckpt"  # a run killed before its first checkpoint was written
    shutil.copytree(src, no_ckpt)
    shutil.rmtree(no_ckpt / "checkpoints")
    (no_ckpt / "checkpoints").mkdir()
    cases.append(([str(no_ckpt)], ["no complete checkpoint"]))

    no_teacher = tmp_path / "no_teacher"
    shutil.copytree(src, no_teacher)
    (no_teacher / "teacher.safetensors").unlink()
    cases.append(([str(no_teacher)], ["teacher copy teacher.safetensors is missing"]))

    other_arch = tmp_path / "other_arch"  # a teacher copy replaced by another network
    shutil.copytree(src, other_arch)
    save_denoiser(other_arch / "teacher.safetensors", tiny_unet(channels=16))
    cases.append(([str(other_arch)], ["teacher.safetensors", "sha256 differs"]))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    cases.append(([str(src), "--fid-weights", str(tmp_path / "missing.pth")], ["--fid-weights", "no such file"]))
    cases.append(([str(src), "--fid-weights", str(tmp_path)], ["--fid-weights", "not a file"]))
    cases.append(([str(src), "--fid-weights", str(garbage), "--num-samples", "4"], ["garbage.pth"]))
    cases.append(([str(src), "--require-fid", "--num-samples", "4"], ["--require-fid", "pt_inception"]))
    cases.append(([str(src), "--num-samples", "-3"], ["--num-samples"]))
    for argv, needles in cases:
        code, _, err = _run([*argv, "--cache-dir", str(tiny_runs["cache"]), *FAST], capsys)
        assert_one_line_error(code, err, *needles)


def test_subprocess_error_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "gsd.evaluate", str(tmp_path / "missing_run")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "missing_run")
    text = " ".join(evaluate.build_parser().format_help().split())
    for flag in ("--num-samples", "--device", "--seed", "--fid-weights", "--require-fid", "--ppl-samples"):
        assert flag in text
    assert "(default: 0)" in text and "(default: auto)" in text


# --------------------------------------------------------------------------- PPL

def test_slerp_basics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(5, 7, generator=g, dtype=torch.float64)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)  # equal norms
    assert torch.allclose(ppl.slerp(a, b, torch.zeros(5, dtype=torch.float64)), a, atol=1e-12)
    assert torch.allclose(ppl.slerp(a, b, torch.ones(5, dtype=torch.float64)), b, atol=1e-12)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    mid = ppl.slerp(a, b, t)
    assert torch.allclose(mid.norm(dim=1), a.norm(dim=1), rtol=1e-12)  # stays on the sphere
    # the closed-form velocity matches a central difference
    h = 1e-6
    fd = (ppl.slerp(a, b, t + h) - ppl.slerp(a, b, t - h)) / (2 * h)
    assert torch.allclose(ppl.slerp_velocity(a, b, t), fd, rtol=1e-6, atol=1e-8)


def test_ppl_of_linear_generator_matches_closed_form():
    """G(z) = A z, identity features: each sample is ||A z'(t)||^2 up to O(eps)."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 6, generator=g, dtype=torch.float64)
    z1 = torch.randn(200, 6, generator=g, dtype=torch.float64)
    z2 = torch.randn(200, 6, generator=g, dtype=torch.float64)
    t = torch.rand(200, generator=g, dtype=torch.float64)
    gen = lambda z: z @ A.T  # noqa: E731
    vals = ppl.path_length_samples(gen, z1, z2, t, eps=1e-4)
    exact = ((ppl.slerp_velocity(z1, z2, t) @ A.T) ** 2).sum(1)
    assert torch.allclose(vals, exact, rtol=2e-3)
    # equal norms r: the slerp has constant speed theta * r, so A = a I gives a^2 theta^2 r^2
    z2n = z2 / z2.norm(dim=1, keepdim=True) * z1.norm(dim=1, keepdim=True)
    theta = torch.arccos((z1 * z2n).sum(1) / (z1.norm(dim=1) * z2n.norm(dim=1)))
    vals = ppl.path_length_samples(lambda z: 3.0 * z, z1, z2n, t, eps=1e-4)
    assert torch.allclose(vals, 9.0 * theta ** 2 * z1.norm(dim=1) ** 2, rtol=2e-3)


def test_ppl_scales_quadratically_and_filters():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 5, generator=g, dtype=torch.float64)
    r1 = ppl.perceptual_path_length(lambda z: z @ A.T, (5,), num=300, seed=3)
    r2 = ppl.perceptual_path_length(lambda z: z @ (2 * A).T, (5,), num=300, seed=3)
    assert r2["ppl"] == pytest.approx(4 * r1["ppl"], rel=1e-9)
    assert r1["eps"] == 1e-4 and r1["percentiles"] == [1.0, 99.0] and r1["num_pairs"] == 300
    assert r1["num_kept"] < 300  # the 1% / 99% tails are dropped
    # same seed, same draws: deterministic
    assert ppl.perceptual_path_length(lambda z: z @ A.T, (5,), num=300, seed=3)["ppl"] == r1["ppl"]
    # features are applied before the distance: doubling the features also quadruples PPL
    r3 = ppl.perceptual_path_length(lambda z: z @ A.T, (5,), num=300, seed=3, features=lambda x: 2 * x)
    assert r3["ppl"] == pytest.approx(4 * r1["ppl"], rel=1e-9)
    # class labels reach the generator, the same one at both ends of a pair
    seen = []

    def cond(z, labels):
        seen.append(labels.clone())
        return z @ A.T + labels[:, None].double()
    r4 = ppl.perceptual_path_length(cond, (5,), num=10, seed=3, num_classes=3, batch=10)
    assert r4["ppl"] == pytest.approx(ppl.perceptual_path_length(lambda z: z @ A.T, (5,), num=10, seed=3)["ppl"],
                                      rel=1e-9)
    assert torch.equal(seen[0], torch.cat([torch.arange(10) % 3] * 2))


def test_float64_heun_matches_sampler():
    from gsd.sampling.samplers import heun_sample

    net = tiny_unet(seed=4)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = heun_sample(net, z)
    got = ppl.heun_sample_float64(ppl.float64_copy(net), z.double())
    assert got.dtype == torch.float64
    assert torch.allclose(got.float(), ref, atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------- review D9, D11

@pytest.mark.parametrize("argv, needles", [
    (["--num-samples", str(10 ** 20)], ["--num-samples"]),
    (["--num-samples", str(10 ** 7 + 1)], ["--num-samples", "1e7"]),  # would reuse the isometry latents' seeds
    (["--seed", str(10 ** 20)], ["--seed"]),
    (["--seed", str(2 ** 64)], ["--seed"]),
    (["--isometry-latents", str(10 ** 20)], ["--isometry-latents"]),
    (["--latency-batch", str(10 ** 20)], ["--latency-batch"]),
    (["--ppl-samples", str(10 ** 20)], ["--ppl-samples"]),
])
def test_huge_numbers_are_one_line_errors(tmp_path, capsys, argv, needles):
    code, _, err = _run([str(tmp_path), *argv, *FAST], capsys)
    assert_one_line_error(code, err, *needles)


def test_sample_count_beyond_memory_is_one_line(tiny_runs, capsys, no_hub_weights, monkeypatch):
    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "0.1")
    saved = tiny_runs["digits"] / "eval.json"
    before = saved.read_bytes() if saved.exists() else None
    code, _, err = _run([str(tiny_runs["digits"]), "--num-samples", str(10 ** 7), "--cache-dir",
                         str(tiny_runs["cache"]), *FAST], capsys)
    assert_one_line_error(code, err, "--num-samples 10000000", "GB", "limit")
    assert (saved.read_bytes() if saved.exists() else None) == before  # nothing written


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_eval_json_is_standard_json_with_null_for_non_finite(tmp_path, monkeypatch):
    import numpy as np

    result = {"one_step": {"fd": float("nan"), "ppl": float("inf"), "isometry_defect": np.float32("nan"),
                           "latency_ms": 1.5},
              "teacher": {"fd": -float("inf"), "curve": torch.tensor([1.0, float("nan")]),
                          "arr": np.array([2.0, np.inf])}}
    from gsd.evaluation import core as eval_core

    monkeypatch.setattr(eval_core, "load_run", lambda *a, **k: object())
    monkeypatch.setattr(eval_core, "evaluate_loaded", lambda run, **kw: (result, {}))
    eval_core.evaluate_run(tmp_path, device="cpu")
    saved = _strict_json((tmp_path / eval_core.EVAL_NAME).read_text())
    assert saved["one_step"] == {"fd": None, "ppl": None, "isometry_defect": None, "latency_ms": 1.5}
    assert saved["teacher"] == {"fd": None, "curve": [1.0, None], "arr": [2.0, None]}


# --------------------------------------------------------------------------- ranking metrics, one core

def _check_quality(m, *, gmm=False):
    assert m["fd_ci"][0] <= m["fd_ci"][1] and len(m["fd_ci"]) == 2
    assert math.isfinite(m["kid"]) and m["kid_stderr"] > 0
    for k in ("precision", "recall"):
        assert 0 <= m[k] <= 1 and m[f"{k}_stderr"] >= 0
    if gmm:
        assert math.isfinite(m["nll"]) and m["nll_stderr"] > 0 and math.isfinite(m["nll_gap"])
        assert 0 <= m["mode_weight_error"] <= 1


def test_eval_json_has_ranking_metrics_and_noise_floors(tiny_runs, capsys, no_hub_weights):
    d = tiny_runs["digits"]
    code, out, err = _run([str(d), "--num-samples", "40", "--ppl-samples", "0", "--cache-dir",
                           str(tiny_runs["cache"]), *FAST], capsys)
    assert code == 0, err
    res = json.loads((d / "eval.json").read_text())
    for m in (res["one_step"], res["teacher"]):
        _check_quality(m)
        assert 0 <= m["local_isometry_defect"] <= 1
    floor = res["noise_floor"]
    _check_quality(floor)
    assert floor["size"] == 40 and "1797 real samples, 40 each" in floor["what"]
    assert res["local_isometry_defect"] == res["one_step"]["local_isometry_defect"]
    assert res["local_isometry"]["anchors"] == 256 and res["local_isometry"]["neighbours"] == 3
    assert res["local_isometry"]["anchor_seeds"] == [90_000_000, 90_000_255]
    # the KID row's verdict, by the rule restated here: within noise when the difference is at most
    # two combined standard errors
    one, teach = res["one_step"], res["teacher"]
    within = abs(one["kid"] - teach["kid"]) <= 2 * math.hypot(one["kid_stderr"], teach["kid_stderr"])
    kid_row = next(line for line in out.splitlines() if line.startswith("KID "))
    assert kid_row.rstrip().endswith("within noise" if within else "differs"), kid_row
    assert "noise floor" in out

    g = tiny_runs["gmm"]
    code, out, err = _run([str(g), "--num-samples", "300", "--ppl-samples", "0", *FAST], capsys)
    assert code == 0, err
    res = json.loads((g / "eval.json").read_text())
    for m in (res["one_step"], res["teacher"], res["noise_floor"]):
        _check_quality(m, gmm=True)
    assert res["noise_floor"]["size"] == 300 and "exact sampler" in res["noise_floor"]["what"]
    assert res["one_step"]["nll_gap"] == pytest.approx(res["one_step"]["nll"] - res["true"]["nll"])
    # the exact teacher's samples sit near the true ones: its NLL gap is small
    assert abs(res["teacher"]["nll_gap"]) < 0.5
    assert "NLL gap" in out and "mode-weight" in out


@pytest.mark.parametrize("which", ["digits", "gmm"])
def test_train_and_evaluate_share_one_core(tiny_runs, no_hub_weights, which):
    """gsd.train's end-of-run evaluation and gsd.evaluate give the same numbers (same seeds, sections)."""
    from gsd.evaluation.assemble import evaluate_distillation

    run = eval_core.load_run(tiny_runs[which], device="cpu")
    kw = dict(num_samples=40, isometry_latents=16, cache_dir=tiny_runs["cache"], classifier_epochs=1,
              latency_repeats=1)
    res, _ = eval_core.evaluate_loaded(run, ppl_samples=0, seed=0, **kw)
    m, _ = evaluate_distillation(run.generator, run.teacher, run.dataset, device="cpu",
                                         num_classes=run.num_classes, teacher_geometry=True, **kw)
    keys = ["fd", "fd_ci", "kid", "kid_stderr", "precision", "recall", "isometry_defect", "local_isometry_defect"]
    if which == "gmm":
        keys += ["nll", "nll_gap", "mode_weight_error", "sliced_wasserstein", "mmd", "modes_covered"]
    for side in ("one_step", "teacher"):
        for k in keys:
            assert m[side][k] == res[side][k], (side, k)
    for k in ("isometry_defect", "local_isometry_defect", "noise_floor", "local_isometry", "fd_feature"):
        assert m[k] == res[k], k
    assert m["latency"]["method"] == res["latency"]["method"]
