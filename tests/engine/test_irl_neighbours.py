"""Neighbour latents (--irl-neighbours K, --irl-radius R), the scale-free --lambda-irl and the
raw --lambda-irl-raw (issue 12): construction of the groups, the x_g-gradient ratio, raw mode
and K = 0 against the code before the change, the command line (one-line errors, config.json,
--resume checks, old run directories)."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gsd_kernels
from gsd.fileio import atomic_torch_save
from gsd import runs, train
from factories import as_run_from_before_digests
from gsd.cli import run_main
from gsd.errors import UsageError
from gsd.distill import DistillConfig, Distiller
from gsd.objective.generator import sigma_schedule
from cli_checks import assert_one_line_error
from factories import tiny_mlp, tiny_unet
from factories import tiny_mlp_file
from test_train_cli import FAST, run_cli_inprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]


def make(teacher=None, init=None, **kw):
    cfg = DistillConfig(**{"batch": 8, "lr": 1e-3, **kw})
    return Distiller(teacher if teacher is not None else tiny_mlp(seed=1), cfg,
                     init=init if init is not None else tiny_mlp(seed=2))


def grads(net):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


# ------------------------------------------------------------------ neighbour construction

@pytest.mark.parametrize("k,r", [(1, 0.5), (3, 0.07), (2, 2.0)])
def test_neighbours_lie_at_radius_r_and_share_the_label(k, r):
    d = Distiller(tiny_unet(1), DistillConfig(batch=4 * (k + 1), lr=1e-3, irl_neighbours=k, irl_radius=r),
                  init=tiny_unet(2), num_classes=5)
    n = 5 * (k + 1)  # any multiple of K+1
    eps, labels = d._generator_latents(n)
    assert eps.shape == (n, 1, 8, 8) and labels.shape == (n,)
    groups = eps.reshape(5, k + 1, -1).double()
    dist = torch.linalg.vector_norm(groups[:, 1:] - groups[:, :1], dim=-1)
    torch.testing.assert_close(dist, torch.full_like(dist, r), rtol=2e-6, atol=0)
    lab = labels.reshape(5, k + 1)
    assert torch.equal(lab, lab[:, :1].expand_as(lab))
    if k > 1:  # the neighbours of one anchor go in different directions
        assert (torch.linalg.vector_norm(groups[:, 1] - groups[:, 2], dim=-1) > 0.1 * r).all()


def test_neighbour_directions_are_uniform_on_the_sphere():
    d = make(batch=2, irl_neighbours=1, irl_radius=1.0)
    d.sample_shape = (3,)
    eps, _ = d._generator_latents(2 * 20000)
    u = (eps[1::2] - eps[0::2]).double()
    # mean 0, second moments I/3 (uniform on S^2), up to sampling error (~0.004 here)
    assert u.mean(0).abs().max() < 0.02
    torch.testing.assert_close(u.T @ u / len(u), torch.eye(3, dtype=torch.float64) / 3, atol=0.015, rtol=0)


def test_no_neighbours_draws_exactly_the_old_latents():
    d = make()
    state = d.rng.get_state()
    a, la = d._generator_latents(8)
    d.rng.set_state(state)
    b, lb = d._latents(8)
    assert torch.equal(a, b) and la is None and lb is None


class _Spy:
    """Records the calls of gsd_kernels.isometry_loss and hands them on."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.real = gsd_kernels.isometry_loss
        monkeypatch.setattr(gsd_kernels, "isometry_loss", self)

    def __call__(self, x, z, **kw):
        self.calls.append((x.detach().clone(), z.detach().clone(), kw))
        return self.real(x, z, **kw)


def test_groups_are_passed_and_the_loss_is_the_grouped_one(monkeypatch):
    spy = _Spy(monkeypatch)
    d = make(batch=8, irl_neighbours=1, irl_radius=0.5, lambda_irl_raw=0.3)
    eps, _ = d._generator_latents(8)
    loss, parts = d.generator_loss(eps)
    (x, z, kw), = spy.calls
    assert kw["groups"] == 2 and x.shape == (8, 2)
    torch.testing.assert_close(z, 2.5 * eps)
    # float64 oracle of the grouped loss (scale "optimal", global weighting): one pair per group
    x_ref = copy.deepcopy(d.generator)(2.5 * eps, torch.full((8,), 2.5)).detach().double()
    delta = torch.linalg.vector_norm(x_ref[0::2] - x_ref[1::2], dim=1)
    dz = torch.linalg.vector_norm((2.5 * eps[0::2] - 2.5 * eps[1::2]).double(), dim=1)
    want = 1 - (delta * dz).sum() ** 2 / ((delta ** 2).sum() * (dz ** 2).sum())
    assert parts["loss_irl"] == pytest.approx(float(want), rel=1e-4)
    torch.testing.assert_close(dz, torch.full_like(dz, 0.5 * 2.5))  # R sigma_init in z-space

    spy.calls.clear()
    d0 = make(batch=8, lambda_irl_raw=0.3)
    d0.generator_loss(d0._generator_latents(8)[0])
    (_, _, kw0), = spy.calls
    assert kw0.get("groups") is None  # K = 0: random-batch pairs


def test_a_dropped_row_drops_its_whole_group(monkeypatch):
    spy = _Spy(monkeypatch)
    d = make(batch=12, irl_neighbours=2, lambda_irl=0.2)

    def hook(phase, x):
        if phase == "generator":
            hook.x = x.detach().clone()
            x = x.clone()
            x[4] = float("nan")  # row 4 belongs to the group of rows 3, 4, 5
        return x
    d.nan_hook = hook
    out = d.step()
    (x, z, kw), = spy.calls
    keep = [0, 1, 2, 6, 7, 8, 9, 10, 11]
    assert kw["groups"] == 3 and torch.equal(x, hook.x[keep])
    assert out["nan_samples"] == 1 and math.isfinite(out["loss_irl"]) and math.isfinite(out["irl_weight"])
    for net in (d.generator, d.fake):
        assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------ scale-free weight

def _independent_terms(d, eps, t, noise, groups):
    """lambda_sid L_sid and L_irl on a copy of G, differentiated separately (no Distiller code)."""
    c = d.config
    gen = copy.deepcopy(d.generator)
    x = gen(c.sigma_init * eps, torch.full((eps.shape[0],), c.sigma_init))
    sigma = sigma_schedule(t, c.sigma_min, c.sigma_max, c.rho)
    x_t = x + sigma[:, None] * noise
    l_sid = gsd_kernels.sid_generator_loss(x, d.teacher(x_t, sigma), d.fake(x_t, sigma), alpha=c.alpha,
                                           backend="reference")
    l_irl = gsd_kernels.isometry_loss(x, c.sigma_init * eps, groups=groups, backend="reference")
    g_sid, = torch.autograd.grad(c.lambda_sid * l_sid, x, retain_graph=True)
    g_irl, = torch.autograd.grad(l_irl, x, retain_graph=True)
    return gen, x, l_sid, l_irl, g_sid, g_irl


@pytest.mark.parametrize("lam_sid,f,k", [(1.0, 0.1, 1), (2.0, 0.7, 0), (0.5, 3.0, 3)])
def test_scale_free_gradient_at_x_g_is_f_times_the_sid_gradient(lam_sid, f, k):
    d = make(batch=8, lambda_sid=lam_sid, lambda_irl=f, irl_neighbours=k)
    eps, _ = d._generator_latents(8)
    t = torch.rand(8) * 0.8
    noise = torch.randn(8, 2)
    captured = {}

    def hook(phase, x):
        x.register_hook(lambda g: captured.setdefault("g", g.detach().clone()))
        return x
    d.nan_hook = hook
    d.generator.zero_grad(set_to_none=True)
    loss, parts = d.generator_loss(eps, t=t, noise=noise)
    loss.backward()
    got = grads(d.generator)

    gen, x, l_sid, l_irl, g_sid, g_irl = _independent_terms(d, eps, t, noise, k + 1 if k else None)
    g_iso = captured["g"] - g_sid  # what the Distiller added for the isometric term
    ratio = torch.linalg.vector_norm(g_iso.double()) / torch.linalg.vector_norm(g_sid.double())
    assert float(ratio) == pytest.approx(f, rel=1e-5)
    w = f * float(torch.linalg.vector_norm(g_sid.double()) / torch.linalg.vector_norm(g_irl.double()))
    torch.testing.assert_close(g_iso, w * g_irl, rtol=1e-4, atol=1e-7)
    assert parts["irl_weight"] == pytest.approx(w, rel=1e-5)
    assert parts["irl_gnorm_sid"] == pytest.approx(float(torch.linalg.vector_norm(g_sid.double())), rel=1e-5)
    assert parts["loss_gen"] == pytest.approx(float((lam_sid * l_sid + w * l_irl).detach()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(parts["loss_gen"], rel=1e-5)
    # the generator's parameter gradient is that of lambda_sid L_sid + w L_irl, w held fixed
    gen.zero_grad(set_to_none=True)
    (lam_sid * l_sid + w * l_irl).backward()
    for a, b in zip(got, grads(gen)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_scale_free_weight_is_zero_when_the_isometry_gradient_is_zero():
    d = make(lambda_irl=0.5)
    d.nan_hook = lambda phase, x: x * 0 + 1.0  # every sample the same point: L_irl = 1, zero gradient
    d.generator.zero_grad(set_to_none=True)
    loss, parts = d.generator_loss(d._generator_latents(8)[0])
    loss.backward()
    assert parts["irl_weight"] == 0.0 and parts["irl_gnorm_irl"] == 0.0 and parts["irl_gnorm_sid"] > 0
    assert all(torch.isfinite(g).all() for g in grads(d.generator))


def test_raw_weight_reproduces_the_papers_loss():
    d = make(batch=8, lambda_sid=1.5, lambda_irl_raw=0.4, irl_neighbours=1)
    eps, _ = d._generator_latents(8)
    t, noise = torch.rand(8) * 0.8, torch.randn(8, 2)
    d.generator.zero_grad(set_to_none=True)
    loss, parts = d.generator_loss(eps, t=t, noise=noise)
    loss.backward()
    assert "irl_weight" not in parts
    gen, x, l_sid, l_irl, _, _ = _independent_terms(d, eps, t, noise, 2)
    want = 1.5 * l_sid + 0.4 * l_irl
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    gen.zero_grad(set_to_none=True)
    want.backward()
    for a, b in zip(grads(d.generator), grads(gen)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# Losses of three iterations of the code before --irl-neighbours and the scale-free weight
# (commit 9887195, where --lambda-irl was the raw weight): tiny_mlp(1) teacher, tiny_mlp(2)
# init, batch 8, lr 1e-3, seed 5. Columns: loss_fake, loss_sid, loss_irl, loss_gen.
OLD_LOSSES = {
    0.0: [(2.7046031951904297, -1.624094843864441, None, -1.624094843864441),
          (2.7146847248077393, -0.9128830432891846, None, -0.9128830432891846),
          (2.715261220932007, -1.1612437963485718, None, -1.1612437963485718)],
    0.3: [(2.7046031951904297, -1.624094843864441, 0.06601983308792114, -1.6042888939380646),
          (2.7161383628845215, -0.9119938611984253, 0.2794536352157593, -0.8281577706336976),
          (2.7054874897003174, -1.1638902425765991, 0.3467240333557129, -1.0598730325698853)],
}


@pytest.mark.parametrize("raw", [0.0, 0.3])
def test_no_neighbours_with_the_raw_weight_against_the_float64_oracle(raw):
    """The K = 0 raw-weight generator loss, written out in float64 from tests/oracles.py (no
    gsd_kernels, no Distiller code) on the same networks and draws."""
    import oracles
    d = make(batch=8, lambda_irl_raw=raw, seed=5)
    eps, _ = d._generator_latents(8)
    t, noise = torch.rand(8) * 0.8, torch.randn(8, 2)
    loss, parts = d.generator_loss(eps, t=t, noise=noise)
    c = d.config
    with torch.no_grad():
        x = d.generator(c.sigma_init * eps, torch.full((8,), c.sigma_init))
        sigma = sigma_schedule(t, c.sigma_min, c.sigma_max, c.rho)
        x_t = x + sigma[:, None] * noise
        y_real, y_fake = d.teacher(x_t, sigma), d.fake(x_t, sigma)
    want_sid = oracles.sid_generator(x.double(), y_real.double(), y_fake.double(), alpha=c.alpha)
    assert parts["loss_sid"] == pytest.approx(float(want_sid), rel=1e-5)
    want = c.lambda_sid * want_sid
    if raw:
        want_irl = oracles.isometry(x.double(), (c.sigma_init * eps).double())
        assert parts["loss_irl"] == pytest.approx(float(want_irl), rel=1e-5)
        want = want + raw * want_irl
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("raw", [0.0, 0.3])
def test_no_neighbours_with_the_raw_weight_is_the_old_training(raw, monkeypatch):
    spy = _Spy(monkeypatch)
    d = make(batch=8, lambda_irl_raw=raw, seed=5)
    outs = [d.step() for _ in range(3)]
    for out, (fake, sid, irl, gen) in zip(outs, OLD_LOSSES[raw]):
        assert out["loss_fake"] == pytest.approx(fake, rel=1e-5, abs=1e-7)
        assert out["loss_sid"] == pytest.approx(sid, rel=1e-5, abs=1e-7)
        assert out["loss_gen"] == pytest.approx(gen, rel=1e-5, abs=1e-7)
        if irl is not None:
            assert out["loss_irl"] == pytest.approx(irl, rel=1e-5, abs=1e-7)
    assert all(kw.get("groups") is None for _, _, kw in spy.calls) and len(spy.calls) == (3 if raw else 0)


def test_scale_free_with_fp16_scaler_and_accumulation_matches_fp32():
    """The x-gradients are taken at the GradScaler's scale and unscaled; accumulation averages
    the micro-steps: the fp16 step's gradient is close to the fp32 one."""
    got = {}
    for precision in ("fp32", "fp16"):
        d = make(batch=8, batch_per_rank=4, lambda_irl=0.5, irl_neighbours=1, precision=precision, seed=3)
        assert d.accum == 2
        if precision == "fp16":  # a scale that does not overflow: the x-gradients are unscaled
            d.scaler_g = torch.amp.GradScaler("cpu", init_scale=16.0)
        d.opt_g.step = lambda: None  # keep the gradients
        out = d.generator_step()
        assert math.isfinite(out["irl_weight"]) and out["irl_weight"] > 0 and out["nan_grads"] == 0
        got[precision] = (torch.cat([p.grad.flatten() for p in d.generator.parameters()]), out)
    a, b = got["fp32"][0], got["fp16"][0]
    assert float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)) < 5e-2
    assert got["fp16"][1]["irl_weight"] == pytest.approx(got["fp32"][1]["irl_weight"], rel=5e-2)

    # the default scale 65536 overflows in the first step here: the step is skipped, the loss
    # stays finite (no bad iteration), and no weight is reported for it
    d = make(batch=8, lambda_irl=0.5, irl_neighbours=1, precision="fp16", seed=3)
    before = [p.detach().clone() for p in d.generator.parameters()]
    out = d.generator_step()
    assert out["nan_grads"] > 0  # seeded: this step does overflow
    assert math.isfinite(out["loss_gen"]) and "irl_weight" not in out
    assert all(torch.equal(p0, p) for p0, p in zip(before, d.generator.parameters()))
    assert d.scaler_g.get_scale() < 65536.0

    # accumulation: the step's gradient is the mean of the two micro-steps' (each with its own w)
    cfg = dict(batch=8, batch_per_rank=4, lambda_irl=0.5, irl_neighbours=1, seed=3)
    d, ref = make(**cfg), make(**cfg)
    ref.rng.set_state(d.rng.get_state())
    d.opt_g.step = lambda: None
    d.generator_step()
    ref.generator.zero_grad(set_to_none=True)
    for _ in range(2):
        eps, labels = ref._generator_latents(4)
        loss, _ = ref.generator_loss(eps, labels)
        (loss * ref.config.gen_loss_scale / 2).backward()
    for a, b in zip(grads(d.generator), grads(ref.generator)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ settings

@pytest.mark.parametrize("kw,match", [
    (dict(irl_neighbours=-1), "irl-neighbours"),
    (dict(irl_neighbours=1, irl_radius=0.0), "irl-radius"),
    (dict(irl_neighbours=1, irl_radius=float("nan")), "irl-radius"),
    (dict(irl_neighbours=1, irl_radius=float("inf")), "irl-radius"),
    (dict(batch=9, irl_neighbours=1), "multiple"),
    (dict(lambda_irl=0.1, lambda_irl_raw=0.1), "one of them"),
    (dict(lambda_sid=0.0, lambda_irl=0.1), "--lambda-irl-raw"),
    (dict(lambda_irl_raw=float("nan")), "lambda-irl-raw"),
])
def test_bad_settings_are_usage_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        DistillConfig(**{"batch": 8, **kw}).validate()


def test_micro_batch_must_hold_whole_groups():
    with pytest.raises(UsageError, match="micro-step"):
        DistillConfig(batch=12, batch_per_rank=4, irl_neighbours=2).validate().accum_steps(1)
    with pytest.raises(UsageError, match="micro-step"):
        DistillConfig(batch=12, irl_neighbours=1).validate().accum_steps(4)  # 3 rows per rank
    assert DistillConfig(batch=12, irl_neighbours=2).validate().accum_steps(2) == 1  # 6 per rank
    assert DistillConfig(batch=12, batch_per_rank=6, irl_neighbours=2).validate().accum_steps(1) == 2
    # neighbours without the regulariser: the "same batch, no isometric term" control
    DistillConfig(batch=8, irl_neighbours=3, lambda_irl=0.0).validate()


def test_bad_command_lines_fail_in_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--irl-neighbours", "-1"], ["--irl-neighbours"]),
        (["--irl-radius", "0"], ["--irl-radius"]),
        (["--irl-radius", "nan"], ["--irl-radius"]),
        (["--irl-neighbours", "1", "--batch", "9"], ["multiple"]),
        (["--irl-neighbours", "2", "--batch", "12", "--batch-per-gpu", "4"], ["--irl-neighbours + 1"]),
        (["--lambda-irl", "0.1", "--lambda-irl-raw", "1"], ["one of them"]),
        (["--lambda-sid", "0", "--lambda-irl", "0.1"], ["--lambda-irl-raw"]),
        (["--dropout", "1"], ["--dropout"]),
        (["--dropout", "-0.1"], ["--dropout"]),
        (["--irl-estimator", "jvp", "--lambda-irl", "0.1"], ["jvp", "--lambda-irl-raw"]),
        (["--irl-estimator", "jvp", "--lambda-irl-raw", "1", "--irl-neighbours", "1"], ["jvp", "neighbours"]),
        (["--irl-estimator", "jvp", "--lambda-irl-raw", "1", "--irl-weighting", "local"], ["jvp", "local"]),
        (["--irl-estimator", "jvp", "--lambda-irl-raw", "1", "--irl-scale", "2"], ["jvp", "--irl-scale"]),
        (["--irl-estimator", "jvp", "--lambda-irl-raw", "1", "--irl-weighting", "local", "--irl-bandwidth", "1"],
         ["jvp"]),
    ]
    for argv, needles in cases:
        code, err = run_cli_inprocess([*argv, "--out", str(out), *FAST], capsys)
        assert_one_line_error(code, err, *needles)
        assert not out.exists()


def test_subprocess_one_line_errors(tmp_path):
    import os
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GSD_CACHE": str(tmp_path / "cache")}
    for argv, needle in ((["--irl-neighbours", "3", "--batch", "10"], "multiple of --irl-neighbours + 1"),
                         (["--lambda-irl", "1", "--lambda-irl-raw", "1"], "one of them")):
        p = subprocess.run([sys.executable, "-m", "gsd.train", *argv, "--out", str(tmp_path / "o"), "--no-progress"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert_one_line_error(p.returncode, p.stderr, needle)
    assert not (tmp_path / "o").exists()


def _gmm_argv(tmp_path, out, *extra):
    return ["--dataset", "gmm", "--teacher", tiny_mlp_file(tmp_path), "--exact-teacher", "--iters", "2",
            "--batch", "8", "--eval-samples", "0", "--log-every", "1", "--ckpt-every", "2", "--out", str(out),
            "--lambda-regress", "0", *extra, *FAST]  # the isometric term alone (gmm's regression: test_regression_term)


def test_config_records_log_and_resume_checks(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_main(train.main, _gmm_argv(tmp_path, out, "--lambda-irl", "0.1", "--irl-neighbours", "1",
                                          "--irl-radius", "0.3", "--dropout", "0.2"))
    err = capsys.readouterr().err
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["irl_neighbours"], cfg["irl_radius"], cfg["lambda_irl"], cfg["lambda_irl_raw"],
            cfg["irl_estimator"], cfg["dropout"]) == (1, 0.3, 0.1, 0.0, "pairs", 0.2)
    log = runs.read_log(out)
    assert all(r["irl_weight"] > 0 and r["irl_gnorm_sid"] > 0 and r["irl_gnorm_irl"] > 0 for r in log)
    for flag, value, key in (("--irl-neighbours", "3", "irl_neighbours"), ("--irl-radius", "0.7", "irl_radius"),
                             ("--lambda-irl-raw", "0.1", "lambda_irl_raw"), ("--dropout", "0.1", "dropout"),
                             ("--irl-estimator", "jvp", "irl_estimator")):
        code, err = run_cli_inprocess(["--resume", str(out), flag, value, *FAST], capsys)
        assert_one_line_error(code, err, key)
    code = run_main(train.main, ["--resume", str(out), "--iters", "3", "--irl-neighbours", "1", "--eval-samples", "0",
                                 *FAST])
    assert code == 0, capsys.readouterr().err
    assert runs.latest_step(out) == 3


def _make_old_run(run_dir: Path, raw: float) -> None:
    """Rewrite a run directory as the code before the scale-free weight wrote it: `lambda_irl`
    is the raw weight, none of the new keys, EMA ramp-up ratio 0.1 in the checkpoint."""
    new_keys = ("lambda_irl_raw", "irl_estimator", "irl_neighbours", "irl_radius", "dropout", "lambda_regress",
                "regress_pairs", "regress_ratio", "ema_rampup")
    as_run_from_before_digests(run_dir)
    with open(run_dir / "config.json") as fh:
        cfg = json.load(fh)
    cfg = {k: v for k, v in cfg.items() if k not in new_keys}
    cfg["lambda_irl"] = raw
    (run_dir / "config.json").write_text(json.dumps(cfg))
    step = runs.latest_step(run_dir)
    state = runs.load_checkpoint_state(run_dir, step)
    dc = {k: v for k, v in state["distiller"]["config"].items() if k not in new_keys}
    dc.update(lambda_irl=raw, ema_rampup=0.1)
    state["distiller"]["config"] = dc
    rc = {k: v for k, v in state["run_config"].items() if k not in new_keys}
    rc["lambda_irl"] = raw
    state["run_config"] = rc
    state.pop("step", None)
    atomic_torch_save({"step": step, **state}, run_dir / runs.CKPT_DIR / f"ckpt-{step:08d}.pt")


def test_old_run_resumes_with_its_lambda_irl_as_the_raw_weight(tmp_path, capsys):
    out = tmp_path / "old"
    code = run_main(train.main, _gmm_argv(tmp_path, out, "--lambda-irl-raw", "0.5"))
    assert code == 0, capsys.readouterr().err
    _make_old_run(out, 0.5)
    assert runs.read_config(out)["lambda_irl_raw"] == 0.5 and runs.read_config(out)["lambda_irl"] == 0.0
    # the old meaning given again on the command line is refused: it names the raw flag now
    code, err = run_cli_inprocess(["--resume", str(out), "--lambda-irl", "0.5", *FAST], capsys)
    assert_one_line_error(code, err, "lambda_irl")
    code = run_main(train.main, ["--resume", str(out), "--iters", "4", "--log-every", "1", "--eval-samples", "0",
                                 *FAST])
    assert code == 0, capsys.readouterr().err
    log = runs.read_log(out)
    new = [r for r in log if r["iteration"] > 2]
    assert [r["iteration"] for r in new] == [3, 4]
    for r in new:  # the raw weight, as the run was trained: no scale-free record
        assert "irl_weight" not in r
        assert r["loss_gen"] == pytest.approx(r["loss_sid"] + 0.5 * r["loss_irl"], rel=1e-5)
    state = runs.load_checkpoint_state(out, 4)
    assert state["distiller"]["config"]["ema_rampup"] == 0.1  # a resumed run keeps its ramp-up
    assert state["distiller"]["config"]["lambda_irl_raw"] == 0.5
    saved = json.loads((out / "config.json").read_text())
    assert saved["lambda_irl_raw"] == 0.5 and saved["lambda_irl"] == 0.0


def test_old_irl_only_run_is_still_usable_by_evaluate(tmp_path, capsys):
    """An old `--lambda-sid 0 --lambda-irl 0.5` run (raw) must not meet today's rule that the
    scale-free weight needs SiD."""
    from gsd.evaluation.core import load_run

    out = tmp_path / "old_nosid"
    code = run_main(train.main, _gmm_argv(tmp_path, out, "--lambda-sid", "0", "--lambda-irl-raw", "0.5"))
    assert code == 0, capsys.readouterr().err
    _make_old_run(out, 0.5)
    run = load_run(out)
    assert run.step == 2


# ------------------------------------------------------------------ --irl-estimator jvp

def test_jvp_term_is_the_relaxed_distortion_of_g_at_the_anchors():
    from gsd.jacobian_isometry import relaxed_distortion

    d = Distiller(tiny_unet(1), DistillConfig(batch=3, lr=1e-3, lambda_sid=0.0, lambda_irl_raw=0.7,
                                              irl_estimator="jvp"), init=tiny_unet(2))
    eps, _ = d._generator_latents(3)
    rng = torch.Generator().manual_seed(0)
    rng.set_state(d.rng.get_state())
    u = torch.randn((1, 3, 1, 8, 8), generator=rng)  # the probe the term draws next from the run's stream
    d.generator.zero_grad(set_to_none=True)
    loss, parts = d.generator_loss(eps)
    loss.backward()
    gen = copy.deepcopy(d.generator)
    gen.zero_grad(set_to_none=True)
    sigma = torch.full((3,), 2.5)
    want = 0.7 * relaxed_distortion(lambda z: gen(z, sigma), 2.5 * eps, probes=u, method="double_backward")
    want.backward()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert parts["loss_irl"] == pytest.approx(float(want.detach()) / 0.7, rel=1e-5)
    a, b = (torch.cat([g.flatten() for g in grads(net)]).double() for net in (d.generator, gen))
    assert float(torch.linalg.vector_norm(a - b)) <= 1e-4 * float(torch.linalg.vector_norm(b))
    assert float(torch.linalg.vector_norm(b)) > 0


def test_jvp_term_leaves_non_finite_anchors_out_of_the_graph(monkeypatch):
    """An anchor whose Jacobian terms come out non-finite: the term and the parameter gradients
    equal those of the batch without that anchor (same probes), with no NaN to zero. Dropping
    the anchor from the mean after the pass kept its graph, whose backward multiplied 0 by inf."""
    import gsd.objective.isometry
    from gsd.jacobian_isometry import distortion_terms

    d = Distiller(tiny_unet(1), DistillConfig(batch=3, lr=1e-3, lambda_sid=0.0, lambda_irl_raw=0.7,
                                              irl_estimator="jvp"), init=tiny_unet(2))
    eps, _ = d._generator_latents(3)
    bad_row = (2.5 * eps[1]).clone()

    def overflowing(fn, z, **kw):  # the anchor equal to bad_row overflows inside its graph
        num, den = distortion_terms(fn, z, **kw)
        hit = (z.flatten(1) == bad_row.flatten()).all(1)
        return num * torch.where(hit, torch.tensor(float("inf")), torch.tensor(1.0)), den
    monkeypatch.setattr(gsd.objective.isometry, "distortion_terms", overflowing)
    rng = torch.Generator().manual_seed(0)
    rng.set_state(d.rng.get_state())
    u = torch.randn((1, 3, 1, 8, 8), generator=rng)
    d.generator.zero_grad(set_to_none=True)
    loss, parts = d.generator_loss(eps)
    loss.backward()
    got = torch.cat([g.flatten() for g in grads(d.generator)])
    assert torch.isfinite(got).all()

    from gsd.jacobian_isometry import relaxed_distortion
    gen = copy.deepcopy(d.generator)
    gen.zero_grad(set_to_none=True)
    keep = torch.tensor([0, 2])
    want = 0.7 * relaxed_distortion(lambda z: gen(z, torch.full((2,), 2.5)), 2.5 * eps[keep], probes=u[:, keep],
                                    method="double_backward")
    want.backward()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    ref = torch.cat([g.flatten() for g in grads(gen)])
    assert float(torch.linalg.vector_norm(got.double() - ref.double())) <= 1e-4 * float(torch.linalg.vector_norm(ref))


def test_jvp_refuses_layer_norm_networks():
    """torch's layer_norm has a wrong third derivative, which the Jacobian term's gradient needs."""
    def third_order(norm):
        z, u = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

        def f(w):
            zz = z.clone().requires_grad_(True)
            y = norm(zz @ w)
            v = torch.zeros_like(y, requires_grad=True)
            jtv, = torch.autograd.grad(y, zz, v, create_graph=True)
            ju, = torch.autograd.grad(jtv, v, u, create_graph=True)
            jtju, = torch.autograd.grad(y, zz, ju, create_graph=True)
            return jtju.square().sum()
        w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
        return torch.autograd.gradcheck(f, (w,), raise_exception=False)

    by_hand = lambda h: (h - h.mean(1, keepdim=True)) / (h.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert third_order(by_hand)
    if third_order(lambda h: torch.nn.functional.layer_norm(h, (6,))):
        pytest.skip("this torch computes layer_norm's third derivative correctly: the refusal can go")
    with pytest.raises(UsageError, match="LayerNorm"):
        make(lambda_irl_raw=1.0, irl_estimator="jvp")  # the MLP denoiser uses LayerNorm


def test_jvp_digits_run_two_iterations(tmp_path, capsys):
    from factories import tiny_unet_file

    out = tmp_path / "jvp"
    code = run_main(train.main, ["--teacher", tiny_unet_file(tmp_path), "--iters", "2", "--batch", "4",
                                 "--irl-estimator", "jvp", "--lambda-irl-raw", "1", "--eval-samples", "0",
                                 "--log-every", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                                 *FAST])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["irl_estimator"] == "jvp" and cfg["lambda_irl_raw"] == 1.0
    log = runs.read_log(out)
    assert [r["iteration"] for r in log] == [1, 2] and all(math.isfinite(r["loss_irl"]) for r in log)


# Two processes with neighbour groups (one global-batch loss and one weight on every rank):
# tests/engine/test_ddp.py::test_ddp_generator_gradient_equals_single_process_global_batch.


def test_a_backend_without_groups_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    def no_groups(x, z, *, groups=None, **kw):
        if groups is not None:
            raise ValueError("isometry_loss(groups=...) is not implemented for backend 'x'")
        raise AssertionError("only the grouped probe is expected here")
    monkeypatch.setattr(gsd_kernels, "isometry_loss", no_groups)
    out = tmp_path / "never"
    code, err = run_cli_inprocess(["--irl-neighbours", "1", "--lambda-irl", "0.1", "--out", str(out), *FAST], capsys)
    assert_one_line_error(code, err, "--irl-neighbours 1", "not implemented")
    assert not out.exists()


class _Isometry(torch.nn.Module):
    """G(z) = A z with A a scaled orthogonal matrix: an exact isometry of the latent."""

    def __init__(self, dim, scale=0.3):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(dim, dim))
        self.a = torch.nn.Parameter(scale * q)
        self.sample_shape = (dim,)
        self.label_dim = 0

    def forward(self, x, sigma, labels=None):
        return x @ self.a.T


@pytest.mark.parametrize("k", [0, 3])
def test_scale_free_weight_has_a_floor_where_g_is_an_exact_isometry(k):
    """An exact isometry leaves only rounding noise in the isometric gradient: w is capped by the
    floor, so the term pushes (far) less than F x the SiD gradient's norm; a G that is not an
    isometry keeps the scale-free rule exactly (the floor does not bind)."""
    f = 0.5
    for iso, binds in ((True, True), (False, False)):
        d = make(batch=16, lambda_irl=f, irl_neighbours=k, irl_radius=0.5)
        if iso:
            d.generator = _Isometry(2)
            d._g_train = d.generator
            d._build_calls()
        eps, _ = d._generator_latents(16)
        _, parts = d.generator_loss(eps)
        pushed = parts["irl_weight"] * parts["irl_gnorm_irl"]
        if binds:
            assert parts["irl_floored"] == 1.0 and pushed < 1e-2 * f * parts["irl_gnorm_sid"]
        else:
            assert parts["irl_floored"] == 0.0
            assert pushed == pytest.approx(f * parts["irl_gnorm_sid"], rel=1e-6)
