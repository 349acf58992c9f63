"""The regression of G onto fixed teacher ODE pairs (--lambda-regress MU, --regress-pairs P;
issue 13): the pairs are the teacher's Heun outputs, the term's value and gradient against a
float64 recomputation, how it combines with the SiD and isometric terms, the per-dataset default,
the command line's errors, config.json and --resume, and old run directories."""

import copy
import json

import pytest
import torch

from gsd.fileio import atomic_torch_save
from gsd import runs, train
from factories import as_run_from_before_digests
from gsd.cli import run_main
from gsd.config import resolve_config
from gsd.distill import DistillConfig, Distiller
from gsd.errors import UsageError
from gsd.sampling.samplers import heun_sample, teacher_ode_pairs
from cli_checks import assert_one_line_error
from factories import tiny_mlp, tiny_mlp_file, tiny_unet
from test_train_cli import FAST, run_cli_inprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def grads(net):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


# ------------------------------------------------------------------ the pairs

def test_pairs_are_the_teachers_heun_outputs_at_any_chunking():
    teacher = tiny_mlp(seed=1)
    eps, x, labels = teacher_ode_pairs(teacher, 7, (2,), seed=11, chunk=3)
    assert labels is None and eps.shape == x.shape == (7, 2)
    torch.testing.assert_close(x, heun_sample(teacher, eps), rtol=1e-6, atol=1e-7)
    eps2, x2, _ = teacher_ode_pairs(teacher, 7, (2,), seed=11, chunk=7)
    assert torch.equal(eps, eps2)
    torch.testing.assert_close(x, x2, rtol=1e-6, atol=1e-7)
    eps3, _, _ = teacher_ode_pairs(teacher, 7, (2,), seed=12)
    assert not torch.equal(eps, eps3)  # the seed decides the latents
    assert eps.std() > 0.5 and x.abs().max() > 0  # fresh, non-trivial values


def test_conditional_pairs_carry_labels_the_teacher_was_called_with():
    torch.manual_seed(0)
    from gsd.models.networks import build_denoiser
    net = build_denoiser({"arch": "MLPDenoiserNet", "sigma_data": 0.5, "label_dim": 3,
                          "model": dict(dim=2, label_dim=3, hidden=16, num_blocks=1, noise_channels=8,
                                         emb_channels=16)})
    with torch.no_grad():
        net.model.fc_out.weight.normal_(0, 0.3)
    eps, x, labels = teacher_ode_pairs(net, 5, (2,), seed=3, num_classes=3, chunk=2)
    assert labels.shape == (5,) and labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 3
    torch.testing.assert_close(x, heun_sample(net, eps, labels), rtol=1e-6, atol=1e-7)


def test_the_distiller_draws_its_pairs_from_its_teacher_and_seed():
    def drawn(seed):
        d = Distiller(tiny_mlp(seed=1), DistillConfig(batch=4, lambda_regress=1.0, regress_pairs=9, seed=seed),
                      init=tiny_mlp(seed=2))
        d.draw_regression_pairs()
        return d
    d = drawn(4)
    eps, x, labels = d.regression_pairs
    assert eps.shape == x.shape == (9, 2) and labels is None
    torch.testing.assert_close(x, heun_sample(d.teacher, eps), rtol=1e-6, atol=1e-7)
    assert torch.equal(drawn(4).regression_pairs[0], eps)      # a resumed run draws them again
    assert not torch.equal(drawn(5).regression_pairs[0], eps)  # another seed, other pairs


def test_regression_pair_latents_are_never_evaluation_latents():
    """The pairs are drawn from seed REGRESS_SEED_BASE + --seed, above every latent seed an
    evaluation uses (seed * SEED_STRIDE + offset + i for seeds up to MAX_SEED): no evaluation
    sample is a training pair. Checked on the seed ranges and on the latents themselves."""
    from gsd.seed_ranges import REGRESS_SEED_BASE
    from gsd.evaluation.metrics import evaluation_latents
    from gsd.seed_ranges import ISOMETRY_SEED_OFFSET, LOCAL_ISOMETRY_SEED_OFFSET, SEED_STRIDE
    from gsd.util import MAX_SEED
    assert max(ISOMETRY_SEED_OFFSET, LOCAL_ISOMETRY_SEED_OFFSET) < SEED_STRIDE
    largest_evaluation_seed = MAX_SEED * SEED_STRIDE + SEED_STRIDE - 1
    assert largest_evaluation_seed < REGRESS_SEED_BASE < REGRESS_SEED_BASE + MAX_SEED < 2 ** 63
    d = Distiller(tiny_mlp(seed=1), DistillConfig(batch=4, lambda_regress=1.0, regress_pairs=512, seed=0),
                  init=tiny_mlp(seed=2))
    d.draw_regression_pairs()
    pairs = d.regression_pairs[0].reshape(512, -1)
    for offset in (0, ISOMETRY_SEED_OFFSET, LOCAL_ISOMETRY_SEED_OFFSET):
        eval_eps, _ = evaluation_latents(0, 2048, (2,), "cpu", offset=offset)
        assert float(torch.cdist(pairs.double(), eval_eps.reshape(2048, -1).double()).min()) > 0


# ------------------------------------------------------------------ the term in the generator loss

def _pair_set(d, count, seed=5):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(count, *d.sample_shape, generator=g)
    x = torch.randn(count, *d.sample_shape, generator=g) * 0.7
    return eps, x


def _reference_term(d, eps_p, x_p, idx, mu):
    """mu * mean ||G(eps_j) - x_j||^2 in float64 on a copy of G (same weights, no dropout)."""
    g64 = copy.deepcopy(d.generator).double()
    s = d.config.sigma_init
    out = g64(s * eps_p[idx].double(), torch.full((len(idx),), s, dtype=torch.float64))
    loss = mu * (out - x_p[idx].double()).flatten(1).square().sum(1).mean()
    return loss, torch.autograd.grad(loss, list(g64.parameters()))


@pytest.mark.parametrize("extra", [
    dict(),                                                 # SiD + regression, one pair per sample
    dict(regress_ratio=3),                                  # three pairs per generated sample
    dict(lambda_irl=0.3, irl_neighbours=2),                 # scale-free isometric weight: it must not see the term
    dict(lambda_irl_raw=0.7),                               # raw isometric weight over random pairs
], ids=["sid", "sid-ratio3", "scale-free-groups", "raw-pairs"])
@pytest.mark.parametrize("make_net,shape", [(tiny_mlp, (2,)), (tiny_unet, (1, 8, 8))], ids=["mlp", "unet"])
def test_term_adds_its_value_and_float64_gradient_and_nothing_else(extra, make_net, shape):
    mu, n, count = 3.7, 6, 11  # a batch of 6 (2 groups of 3), 11 pairs: no size a multiple of another
    cfg = dict(batch=n, lr=1e-3, lambda_regress=mu, regress_pairs=count, seed=3, **extra)
    d = Distiller(make_net(seed=1), DistillConfig(**cfg), init=make_net(seed=2), sample_shape=shape)
    d0 = Distiller(make_net(seed=1), DistillConfig(**{**cfg, "lambda_regress": 0.0}), init=make_net(seed=2),
                   sample_shape=shape)
    eps_p, x_p = _pair_set(d, count)
    d.set_regression_pairs(eps_p, x_p)
    eps = torch.randn(n, *shape, generator=torch.Generator().manual_seed(9))
    t = torch.rand(n, generator=torch.Generator().manual_seed(10)) * 0.8
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(11))
    # the pair indices are the term's only draw from the run's RNG: reproduce them
    ratio = extra.get("regress_ratio", 1)
    idx = torch.randint(0, count, (n * ratio,), generator=torch.Generator().set_state(d.rng.get_state()))
    assert len(set(idx.tolist())) > 1

    loss, parts = d.generator_loss(eps, t=t, noise=noise)
    loss.backward()
    loss0, parts0 = d0.generator_loss(eps, t=t, noise=noise)
    loss0.backward()
    ref, ref_grads = _reference_term(d, eps_p, x_p, idx, mu)

    ref = ref.detach()
    assert parts["loss_regress"] == pytest.approx(float(ref) / mu, rel=1e-5)
    assert parts["loss_sid"] == pytest.approx(parts0["loss_sid"], rel=1e-6)
    assert parts["loss_gen"] == pytest.approx(parts0["loss_gen"] + float(ref), rel=1e-5)
    if "irl_weight" in parts0:  # the scale-free weight is relative to the SiD gradient only
        assert parts["irl_weight"] == pytest.approx(parts0["irl_weight"], rel=1e-5)
    for g, g0, gr in zip(grads(d.generator), grads(d0.generator), ref_grads):
        torch.testing.assert_close((g - g0).double(), gr, rtol=2e-4, atol=1e-6 * float(gr.abs().max()) + 1e-12)
    assert any(gr.abs().max() > 0 for gr in ref_grads)


def test_off_draws_nothing_and_needs_no_pairs():
    d = Distiller(tiny_mlp(seed=1), DistillConfig(batch=4, lr=1e-3), init=tiny_mlp(seed=2))
    state = d.rng.get_state()
    t = torch.full((4,), 0.3)
    loss, parts = d.generator_loss(torch.randn(4, 2), t=t, noise=torch.randn(4, 2))
    assert "loss_regress" not in parts and torch.equal(d.rng.get_state(), state)


def test_training_without_pairs_is_an_error_not_a_silent_skip():
    d = Distiller(tiny_mlp(seed=1), DistillConfig(batch=4, lr=1e-3, lambda_regress=1.0, regress_pairs=8),
                  init=tiny_mlp(seed=2))
    with pytest.raises(RuntimeError, match="set_regression_pairs"):
        d.step()


def test_bad_pairs_are_refused():
    d = Distiller(tiny_mlp(seed=1), DistillConfig(batch=4, lr=1e-3, lambda_regress=1.0, regress_pairs=8),
                  init=tiny_mlp(seed=2))
    eps, x = torch.randn(8, 2), torch.randn(8, 2)
    with pytest.raises(ValueError, match="shape"):
        d.set_regression_pairs(eps[:7], x[:7])
    with pytest.raises(ValueError, match="shape"):
        d.set_regression_pairs(eps, x[:, :1])
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        d.set_regression_pairs(eps, bad)
    with pytest.raises(ValueError, match="labels"):
        d.set_regression_pairs(eps, x, torch.zeros(8, dtype=torch.int64))


@pytest.mark.parametrize("kw,match", [
    (dict(lambda_regress=-1.0), "--lambda-regress"), (dict(lambda_regress=float("nan")), "--lambda-regress"),
    (dict(regress_pairs=0), "--regress-pairs"), (dict(regress_pairs=2.5), "--regress-pairs"),
    (dict(regress_pairs=True), "--regress-pairs"),
    (dict(regress_ratio=0), "--regress-ratio"), (dict(regress_ratio=1.5), "--regress-ratio"),
    (dict(regress_ratio=True), "--regress-ratio"), (dict(regress_ratio=2000), "--regress-ratio"),
    (dict(lambda_regress=1.0, batch=2 ** 30, regress_ratio=2), "--regress-ratio"),  # > 2^31 - 1 rows in one pass
])
def test_bad_settings_are_usage_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        DistillConfig(**{"batch": 4, **kw}).validate()


# ------------------------------------------------------------------ defaults and the command line

def test_gmm_defaults_to_the_term_and_other_data_sets_do_not():
    assert resolve_config({"dataset": "gmm"})["lambda_regress"] == 10.0
    assert resolve_config({"dataset": "gmm"})["regress_ratio"] == 4
    assert resolve_config({"dataset": "digits"})["regress_ratio"] == 1
    assert resolve_config({"dataset": "gmm", "regress_ratio": 1}, explicit={"regress_ratio"})["regress_ratio"] == 1
    assert resolve_config({"dataset": "digits"})["lambda_regress"] == 0.0
    assert resolve_config({"dataset": "gmm", "lambda_regress": 0.0}, explicit={"lambda_regress"})["lambda_regress"] == 0.0
    assert resolve_config({"dataset": "digits", "lambda_regress": 2.0}, explicit={"lambda_regress"})["lambda_regress"] == 2.0


def _gmm_argv(tmp_path, out, *extra):
    return ["--dataset", "gmm", "--teacher", tiny_mlp_file(tmp_path), "--exact-teacher", "--iters", "2",
            "--batch", "8", "--eval-samples", "0", "--log-every", "1", "--ckpt-every", "2", "--out", str(out),
            "--regress-pairs", "37", *extra, *FAST]


def test_bad_command_lines_fail_in_one_line_and_write_nothing(tmp_path, capsys):
    for flags, needle in ((["--lambda-regress", "-1"], "--lambda-regress"), (["--lambda-regress", "inf"], "--lambda-regress"),
                          (["--regress-pairs", "0"], "--regress-pairs"), (["--regress-pairs", "1.5"], "--regress-pairs"),
                          (["--regress-ratio", "0"], "--regress-ratio"), (["--regress-ratio", "2.5"], "--regress-ratio")):
        out = tmp_path / "bad"
        code, err = run_cli_inprocess(_gmm_argv(tmp_path, out, *flags), capsys)
        assert_one_line_error(code, err, needle)
        assert not out.exists()


def test_memory_check_counts_the_regression_rows_and_pairs(tmp_path, capsys, monkeypatch):
    from gsd.distillation.run import _check_memory

    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "1")
    cpu = torch.device("cpu")
    big = dict(batch=2 ** 22, eval_samples=0, regress_pairs=16384, regress_ratio=8)
    # 2-D samples: the SiD step alone (16 x 4 B x 2 x 2^22 = 0.54 GB) fits, 8 regression rows per
    # sample more (+ 4 x 4 B x 2 x 8 x 2^22 = 1.07 GB) do not; the ratio counts only with the term on
    _check_memory(dict(big, lambda_regress=0.0), (2,), cpu, 1)
    _check_memory(dict(big, lambda_regress=10.0, regress_ratio=1), (2,), cpu, 1)
    with pytest.raises(UsageError, match="--regress-ratio 8"):
        _check_memory(dict(big, lambda_regress=10.0), (2,), cpu, 1)
    with pytest.raises(UsageError, match="--regress-pairs"):  # 2 x 4 B x 2 x 2^27 = 2.1 GB kept
        _check_memory(dict(big, batch=8, regress_pairs=2 ** 27, lambda_regress=10.0), (2,), cpu, 1)
    # and the command line refuses it in one line before writing anything
    out = tmp_path / "big"
    code, err = run_cli_inprocess(_gmm_argv(tmp_path, out, "--batch", str(2 ** 22), "--regress-ratio", "8"), capsys)
    assert_one_line_error(code, err, "--regress-ratio 8", "GB")
    assert not out.exists()


def test_run_records_logs_and_resumes_exactly(tmp_path, capsys):
    out, whole = tmp_path / "run", tmp_path / "whole"
    code = run_main(train.main, _gmm_argv(tmp_path, out, "--lambda-regress", "2.5", "--regress-ratio", "2"))
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["lambda_regress"], cfg["regress_pairs"], cfg["regress_ratio"]) == (2.5, 37, 2)
    log = runs.read_log(out)
    assert all(r["loss_regress"] > 0 and r["loss_gen"] == pytest.approx(r["loss_sid"] + 2.5 * r["loss_regress"], rel=1e-5)
               for r in log)
    for flag, value, key in (("--lambda-regress", "3", "lambda_regress"), ("--regress-pairs", "38", "regress_pairs"),
                             ("--regress-ratio", "1", "regress_ratio")):
        code, err = run_cli_inprocess(["--resume", str(out), flag, value, *FAST], capsys)
        assert_one_line_error(code, err, key)
    code = run_main(train.main, ["--resume", str(out), "--iters", "4", "--eval-samples", "0", *FAST])
    assert code == 0, capsys.readouterr().err
    # the resumed run draws the same pairs again: it equals one uninterrupted run
    code = run_main(train.main, _gmm_argv(tmp_path, whole, "--lambda-regress", "2.5", "--regress-ratio", "2", "--iters", "4",
                                             "--ckpt-every", "4"))
    assert code == 0, capsys.readouterr().err
    a, b = runs.load_checkpoint_weights(out, 4), runs.load_checkpoint_weights(whole, 4)
    assert a.keys() == b.keys() and any(k.startswith("generator.") for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_a_run_from_before_the_term_resumes_without_it(tmp_path, capsys):
    """config.json and checkpoints written before --lambda-regress existed have no such key; a
    gmm run among them was trained without the term and must not switch on today's default."""
    out = tmp_path / "old"
    code = run_main(train.main, _gmm_argv(tmp_path, out, "--lambda-regress", "0"))
    assert code == 0, capsys.readouterr().err
    new_keys = ("lambda_regress", "regress_pairs", "regress_ratio")
    as_run_from_before_digests(out)
    cfg = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k not in new_keys}
    (out / "config.json").write_text(json.dumps(cfg))
    state = runs.load_checkpoint_state(out, 2)
    state["distiller"]["config"] = {k: v for k, v in state["distiller"]["config"].items() if k not in new_keys}
    state["run_config"] = {k: v for k, v in state["run_config"].items() if k not in new_keys}
    state.pop("step", None)
    atomic_torch_save({"step": 2, **state}, out / runs.CKPT_DIR / "ckpt-00000002.pt")
    assert runs.read_config(out)["lambda_regress"] == 0.0
    code = run_main(train.main, ["--resume", str(out), "--iters", "3", "--log-every", "1", "--eval-samples", "0", *FAST])
    assert code == 0, capsys.readouterr().err
    assert all("loss_regress" not in r for r in runs.read_log(out))
