"""The shapes factor metrics (gsd.evaluation.factors) against known answers.

Two kinds of regressor: `ReadOut`, a stub that reads the factors straight from five pixels (so
the metric machinery is checked exactly against independent computations), and a real
regressor trained once per module on a reduced set (checked loosely, through the renderer).
"""

import copy
import json
import math
import os

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn

from gsd import shapes
from gsd.errors import UsageError
from gsd.evaluation import factors as fa
from gsd.evaluation.metrics import evaluation_latents, one_step_samples
from gsd.evaluation.geometry import neighbour_latents
from gsd.seed_ranges import LOCAL_DIRECTION_SEED, LOCAL_ISOMETRY_SEED_OFFSET
from gsd.evaluation.ppl import slerp_velocity
from gsd.fileio import jsonable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

R = 16


class ReadOut(nn.Module):
    """A 'regressor' whose normalised factors are the first five pixels of the image, its
    features the first eight, and (kinds > 1) its kind logits the next `kinds` pixels."""

    def __init__(self, kinds: int = 1):
        super().__init__()
        self.kinds = kinds
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))  # float64: exact comparisons

    def features(self, x):
        return x.flatten(1)[:, :8].to(self.dummy.dtype)

    def forward(self, x):
        n = 5 + (self.kinds if self.kinds > 1 else 0)
        return x.flatten(1)[:, :n].to(self.dummy.dtype)

    def factors(self, x):
        return self(x)[:, :5]


def pixels_of(values: torch.Tensor, resolution: int = 4) -> torch.Tensor:
    """(N, k) values written into the first k pixels of (N, 1, res, res) images."""
    img = torch.zeros(len(values), resolution * resolution, dtype=values.dtype)
    img[:, :values.shape[1]] = values
    return img.reshape(len(values), 1, resolution, resolution)


def render_norm(unit: torch.Tensor, kind=None, resolution: int = R) -> torch.Tensor:
    """Images of normalised factors (N, 5) (kind 0 unless given)."""
    unit = unit.double()
    kind = torch.zeros(len(unit), dtype=torch.long) if kind is None else kind
    return shapes.render(shapes.denormalise(unit), kind, resolution)


# --------------------------------------------------------------------------- the trained regressor

@pytest.fixture(scope="module")
def trained():
    # a reduced set (the cached one trains on 20000 for 12 epochs); a few seconds on one core
    torch.set_num_threads(1)
    return fa.train_factor_regressor(R, 3, seed=0, epochs=8, train=6000, held_out=1000)


def test_regressor_held_out_error_is_small_and_reported_per_factor(trained):
    model, info = trained
    assert set(info["rmse"]) == set(shapes.FACTORS) == set(info["rmse_normalised"])
    for i, f in enumerate(shapes.FACTORS):
        lo, hi = shapes.FACTOR_RANGES[f]
        assert info["rmse"][f] == pytest.approx(info["rmse_normalised"][f] * (hi - lo), rel=1e-9)
    # predicting the middle of the box would give 1/sqrt(12) = 0.29 on every factor; this reduced
    # training gets ~0.035 on x and y, ~0.08 on scale and brightness, ~0.15 on rotation (the
    # cached 20000-image regressor about half of that)
    bound = {"x": 0.06, "y": 0.06, "scale": 0.12, "rotation": 0.2, "brightness": 0.12}
    for f in shapes.FACTORS:
        assert info["rmse_normalised"][f] < bound[f], f
    assert info["kind_accuracy"] > 0.9
    assert info["held_out"] == 1000 and info["train_images"] == 6000
    # the reported error is what an independent fresh draw shows
    f, k = shapes.sample_factors(1000, 3, torch.Generator().manual_seed(99))
    pred, kind = fa.regress(model, shapes.render(f, k, R))
    rmse = (pred - shapes.normalise(f)).pow(2).mean(0).sqrt()
    for i, name in enumerate(shapes.FACTORS):
        assert float(rmse[i]) == pytest.approx(info["rmse_normalised"][name], rel=0.3, abs=0.005)
    assert float((kind == k).double().mean()) == pytest.approx(info["kind_accuracy"], abs=0.03)
    feats = fa.regressor_features(model, shapes.render(f[:10], k[:10], R))
    assert feats.shape == (10, 64) and feats.dtype == torch.float64


def test_regressor_cache_keys_reuse_damage_and_rng(tmp_path):
    state = torch.get_rng_state()
    model, info = fa.factor_regressor(8, 1, cache_dir=tmp_path, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)  # training leaves the global stream alone
    assert info["cached"] is False and info["feature"] == fa.SHAPES_FEATURE_NAME
    assert info["kind_accuracy"] is None and set(info["rmse"]) == set(shapes.FACTORS)
    path = info["path"]
    name = os.path.basename(path)
    assert "_r8_" in name and "_k1_" in name and "_s0_" in name and "_e1_" in name
    x = render_norm(torch.rand(6, 5, dtype=torch.float64), resolution=8)
    again, info2 = fa.factor_regressor(8, 1, cache_dir=tmp_path, epochs=1)
    assert info2["cached"] is True and info2["rmse"] == info["rmse"]
    assert torch.equal(fa.regressor_features(again, x), fa.regressor_features(model, x))
    # a damaged entry is retrained and replaced
    with open(path, "wb") as fh:
        fh.write(b"not a safetensors file")
    fixed, info3 = fa.factor_regressor(8, 1, cache_dir=tmp_path, epochs=1)
    assert info3["cached"] is False
    assert torch.equal(fa.regressor_features(fixed, x), fa.regressor_features(model, x))  # same seed, same net
    assert fa.factor_regressor(8, 1, cache_dir=tmp_path, epochs=1)[1]["cached"] is True
    assert sorted(os.listdir(tmp_path)) == [name]  # no temporary file left
    with pytest.raises(UsageError):
        fa.factor_regressor(40, 1, cache_dir=tmp_path)
    with pytest.raises(UsageError):
        fa.factor_regressor(16, shapes.MAX_KINDS + 1, cache_dir=tmp_path)


# --------------------------------------------------------------------------- Wasserstein

@pytest.mark.parametrize("n, m", [(50, 50), (37, 80), (1, 5)])
def test_wasserstein_1d_matches_scipy(n, m):
    rng = np.random.default_rng(n + m)
    a, b = rng.standard_normal(n), rng.standard_normal(m) * 1.5 + 0.3
    assert fa.wasserstein_1d(a, b) == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-10, abs=1e-12)
    assert fa.wasserstein_1d(a, a) == 0.0


# --------------------------------------------------------------------------- local factor isometry

def _grouped_loss(f: np.ndarray, z: np.ndarray, g: int) -> float:
    sdd = sdz = szz = 0.0
    for b in range(0, len(f), g):
        for i in range(b, b + g):
            for j in range(b, b + g):
                if i != j:
                    d, e = np.linalg.norm(f[i] - f[j]), np.linalg.norm(z[i] - z[j])
                    sdd, sdz, szz = sdd + d * d, sdz + d * e, szz + e * e
    return 1.0 - sdz * sdz / (sdd * szz)


def test_local_factor_isometry_exact_with_a_readout():
    d = 5
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    iso = lambda z, lab=None: pixels_of(0.5 + 0.1 * z.reshape(len(z), -1).double() @ q.T)  # noqa: E731
    out = fa.local_factor_isometry(iso, ReadOut(), (d,), anchors=40, neighbours=3, radius=0.5)
    assert out["local_factor_isometry"] == pytest.approx(0.0, abs=1e-10)
    assert out["groups_used"] == 40 and out["kind_change_fraction"] == 0.0

    a = torch.diag(torch.tensor([1.0, 1.0, 0.3, 0.3, 0.1], dtype=torch.float64)) @ q
    aniso = lambda z, lab=None: pixels_of(0.5 + 0.1 * z.reshape(len(z), -1).double() @ a.T)  # noqa: E731
    out = fa.local_factor_isometry(aniso, ReadOut(), (d,), anchors=40, neighbours=3, radius=0.5, seed=2)
    # independently: the same anchors and neighbours, the loss and its jackknife by brute force
    anchors = evaluation_latents(2, 40, (d,), "cpu", offset=LOCAL_ISOMETRY_SEED_OFFSET)[0]
    z = neighbour_latents(anchors, neighbours=3, radius=0.5, seed=LOCAL_DIRECTION_SEED + 2).double().numpy()
    f = 0.1 * z @ a.numpy().T
    want = _grouped_loss(f, z, 4)
    assert want > 0.05
    assert out["local_factor_isometry"] == pytest.approx(want, rel=1e-9)
    loo = np.array([_grouped_loss(np.delete(f, range(4 * i, 4 * i + 4), 0), np.delete(z, range(4 * i, 4 * i + 4), 0),
                                  4) for i in range(40)])
    se = math.sqrt(39 / 40 * ((loo - loo.mean()) ** 2).sum())
    assert out["local_factor_isometry_stderr"] == pytest.approx(se, rel=1e-9)


def test_local_factor_isometry_leaves_out_groups_with_nonfinite_factors():
    def gen(z, lab=None):
        x = pixels_of(0.1 * z.reshape(len(z), -1).double())
        x[z.reshape(len(z), -1)[:, 0] > 1.5] = float("nan")
        return x

    out = fa.local_factor_isometry(gen, ReadOut(), (5,), anchors=30, neighbours=2, radius=0.2)
    assert 0 < out["groups_used"] < 30
    assert math.isfinite(out["local_factor_isometry"]) and math.isfinite(out["local_factor_isometry_stderr"])


def test_local_factor_isometry_through_the_renderer(trained):
    # a scaled rotation of the factor box is an isometry; squeezing three factors is not
    model, _ = trained
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    anchors = 0.4 * torch.randn(24, 5, generator=torch.Generator().manual_seed(4))

    def gen_of(a):
        return lambda z, lab=None: render_norm((0.5 + 0.12 * z.double() @ a.T).clamp(0, 1))

    kw = dict(neighbours=3, radius=1.5, anchor_latents=anchors)
    iso = fa.local_factor_isometry(gen_of(q), model, (5,), **kw)
    squeeze = torch.diag(torch.tensor([1.0, 1.0, 0.1, 0.1, 0.1], dtype=torch.float64)) @ q
    aniso = fa.local_factor_isometry(gen_of(squeeze), model, (5,), **kw)
    # the regressor's error leaves ~0.04 on the isometry (exactly 0 with a read-out: above); the
    # squeeze alone gives 0.13 with a read-out, ~0.16 through the regressor
    assert iso["local_factor_isometry"] < 0.07
    assert aniso["local_factor_isometry"] > 2.5 * iso["local_factor_isometry"]
    assert aniso["local_factor_isometry"] - 2 * aniso["local_factor_isometry_stderr"] > iso["local_factor_isometry"]


# --------------------------------------------------------------------------- factor PPL

def _hand_ppl(a: torch.Tensor, shape, num: int, seed: int) -> float:
    """The eps -> 0 limit ||A z'(t)||^2 on the draws perceptual_path_length makes, 1-99% filtered."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn((num, *shape), generator=g, dtype=torch.float64)
    z2 = torch.randn((num, *shape), generator=g, dtype=torch.float64)
    t = torch.rand(num, generator=g, dtype=torch.float64)
    v = (slerp_velocity(z1, z2, t).reshape(num, -1) @ a.T).pow(2).sum(1).numpy()
    lo, hi = np.percentile(v, 1), np.percentile(v, 99)
    return float(v[(v >= lo) & (v <= hi)].mean())


def test_factor_ppl_of_a_linear_map_is_its_hand_value():
    shape = (1, 4, 4)
    a = 0.05 * torch.randn(5, 16, dtype=torch.float64)
    gen = lambda z, lab=None: pixels_of(0.5 + z.reshape(len(z), -1) @ a.T)  # noqa: E731
    out = fa.factor_ppl(gen, ReadOut(), shape, num=200, seed=5)
    assert out["factor_ppl"] == pytest.approx(_hand_ppl(a, shape, 200, 5), rel=1e-3)
    assert out["num_pairs"] == 200 and out["eps"] == 1e-4 and out["factor_ppl_stderr"] > 0


def test_factor_ppl_through_the_renderer_and_regressor(trained):
    # brightness is the one factor the renderer draws smoothly (the others move in sub-pixel steps)
    model, _ = trained
    shape = (1, 4, 4)
    a = torch.zeros(5, 16, dtype=torch.float64)
    a[4] = 0.08 * torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) / 4

    def gen(z, lab=None):
        unit = torch.full((len(z), 5), 0.5, dtype=torch.float64) + z.reshape(len(z), -1).double() @ a.T
        return render_norm(unit).double()

    out = fa.factor_ppl(gen, model, shape, num=96, seed=1)
    assert out["factor_ppl"] == pytest.approx(_hand_ppl(a, shape, 96, 1), rel=0.25)


# --------------------------------------------------------------------------- traversal purity

def test_traversal_purity_exact_with_a_readout():
    # G writes M z into the factor pixels; M's right-singular vectors are v1, v2, v3 (singular
    # values 3, 2, 1), moving x alone, y and scale equally, and y, scale, rotation as 1:1:4
    d = 16
    v, _ = torch.linalg.qr(torch.randn(d, 3, dtype=torch.float64))
    u = torch.zeros(5, 3, dtype=torch.float64)  # orthonormal columns: the factor change of each v
    u[0, 0] = 1.0
    u[1:3, 1] = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    u[1:4, 2] = torch.tensor([1.0, -1.0, 2.0]) / math.sqrt(6)
    m = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    gen = lambda z, lab=None: pixels_of(z.reshape(len(z), -1).double() @ m.T)  # noqa: E731
    out = fa.traversal_purity(gen, ReadOut(), (1, 4, 4), anchors=3, directions=3, step=0.1)
    # (the steps are float32 latents, like G's: 1e-7 of rounding)
    assert out["per_direction"] == pytest.approx([1.0, 0.5, 4 / 6], abs=1e-6)
    assert out["singular_values"] == pytest.approx([3.0, 2.0, 1.0], abs=1e-6)
    assert out["per_direction_factor"][0] == "x" and out["per_direction_factor"][2] == "rotation"
    assert out["per_direction_speed"] == pytest.approx([3.0, 2.0, 1.0], abs=1e-6)
    assert out["traversal_purity"] == pytest.approx((1.0 + 0.5 + 4 / 6) / 3, abs=1e-6)
    w = (9 * 1.0 + 4 * 0.5 + 1 * 4 / 6) / 14
    assert out["traversal_purity_weighted"] == pytest.approx(w, abs=1e-6)
    assert out["traversal_purity_stderr"] == pytest.approx(0.0, abs=1e-6) and out["kind_change_fraction"] == 0.0


def test_traversal_purity_through_the_renderer(trained):
    # The renderer is piecewise constant in its factors (supersampled coverage), so autograd sees
    # no Jacobian through it; a zero-valued linear term gives G a known one: right-singular
    # vectors e0 (x alone) and e1 (x and y equally), while the image is the rendered one.
    model, _ = trained
    d = 16
    pattern = torch.zeros(2, 1, R, R)
    pattern[0, 0, 0, 0] = 3.0
    pattern[1, 0, 0, 1] = 2.0

    def gen(z, lab=None):
        flat = z.reshape(len(z), -1)
        zd = flat.detach().double()
        unit = torch.stack([0.5 + 0.5 * zd[:, 0] + 0.5 * zd[:, 1] / math.sqrt(2), 0.5 + 0.5 * zd[:, 1] / math.sqrt(2),
                            0.5 + 0.25 * torch.tanh(zd[:, 2]), 0.5 + 0.25 * torch.tanh(zd[:, 3]),
                            0.6 + 0.2 * torch.tanh(zd[:, 4])], 1)
        kind = (zd[:, 5] > 0).long() + (zd[:, 5] > 1).long()
        linear = flat[:, :2].float() @ pattern.reshape(2, -1)
        return render_norm(unit, kind) + (linear - linear.detach()).reshape(len(z), 1, R, R)

    anchors = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(8))
    anchors[:, 0, 0, :2] = 0.0  # x = y = 0.5: the +-0.5 steps stay inside the box
    out = fa.traversal_purity(gen, model, (1, 4, 4), anchor_latents=anchors, directions=2, step=0.5)
    assert out["singular_values"] == pytest.approx([3.0, 2.0], abs=1e-5)
    assert out["per_direction"][0] > 0.9
    assert out["per_direction"][1] == pytest.approx(0.5, abs=0.1)
    assert out["per_direction_factor"][0] == "x"
    assert out["kind_change_fraction"] == 0.0


def test_jacobian_needs_autograd():
    def frozen(z, lab=None):
        with torch.no_grad():
            return z * 2

    with pytest.raises(ValueError, match="differentiable"):
        fa.jacobian(frozen, torch.randn(1, 1, 4, 4))
    j = fa.jacobian(lambda z, lab=None: torch.sin(z), torch.zeros(1, 1, 2, 2) + 0.3, batch=3)
    assert torch.allclose(j, math.cos(0.3) * torch.eye(4, dtype=torch.float64), atol=1e-6)


# --------------------------------------------------------------------------- factor fidelity

def _as_data(kinds: int, stuck_x: float | None = None):
    """A 'generator' drawing from the data distribution through its latent: u = Phi(eps) is
    uniform, so the factors are uniform in the box and the kind uniform; optionally x stuck."""
    normal = torch.distributions.Normal(0.0, 1.0)

    def gen(z, lab=None):
        u = normal.cdf(z.reshape(len(z), -1)[:, :6].double())
        unit = u[:, :5].clone()
        if stuck_x is not None:
            unit[:, 0] = stuck_x
        return render_norm(unit, (u[:, 5] * kinds).long().clamp(max=kinds - 1))
    return gen


def test_factor_fidelity_real_vs_real_and_stuck(trained):
    model, _ = trained
    kw = dict(resolution=R, kinds=3, num=400, seed=3, bootstraps=10)
    real = fa.factor_fidelity(_as_data(3), model, **kw)
    stuck = fa.factor_fidelity(_as_data(3, stuck_x=0.5), model, **kw)
    floor = real["noise_floor"]
    # data vs data: every W1 at the noise floor's scale (~1/sqrt(n)), kinds and FD too
    assert max(real["w1_normalised"].values()) < 0.06 and max(floor["w1_normalised"].values()) < 0.06
    assert real["kind_tv"] < 0.1 and real["fd"] < 3 * floor["fd"] + 0.05
    # x stuck at the middle: W1(U[0, 1], delta_0.5) = 0.25 on x, nothing on the others
    assert stuck["w1_normalised"]["x"] == pytest.approx(0.25, abs=0.05)
    assert stuck["w1_normalised"]["x"] > 5 * real["w1_normalised"]["x"]
    assert max(stuck["w1_normalised"][f] for f in shapes.FACTORS[1:]) < 0.06
    assert stuck["fd"] > 5 * real["fd"]
    lo, hi = shapes.FACTOR_RANGES["x"]
    assert stuck["w1"]["x"] == pytest.approx(stuck["w1_normalised"]["x"] * (hi - lo), rel=1e-12)
    # independently: the regressed x of both sides through scipy
    x = one_step_samples(_as_data(3, stuck_x=0.5), 3, 400, (1, R, R), "cpu")
    ref = shapes.render(*shapes.sample_factors(400, 3, torch.Generator().manual_seed(fa.REAL_SEEDS[0])), R)
    want = scipy.stats.wasserstein_distance(fa.regress(model, x)[0][:, 0].numpy(),
                                            fa.regress(model, ref)[0][:, 0].numpy())
    assert stuck["w1_normalised"]["x"] == pytest.approx(want, rel=1e-9)
    # the evaluation's own samples give the same figures without calling the generator
    again = fa.factor_fidelity(None, model, samples=x, **kw)
    assert again["w1_normalised"] == stuck["w1_normalised"] and again["fd"] == stuck["fd"]
    assert sum(stuck["kind_frequencies"]) == pytest.approx(1.0) and len(stuck["real_kind_frequencies"]) == 3


def test_factor_fidelity_one_kind_has_no_kind_figures():
    out = fa.factor_fidelity(None, ReadOut(), resolution=8, kinds=1, samples=torch.rand(50, 1, 8, 8), bootstraps=2)
    assert out["kind_frequencies"] is None and out["kind_tv"] is None and "real_kind_frequencies" not in out


# --------------------------------------------------------------------------- all of them

def test_factor_metrics_returns_plain_json_numbers(trained):
    model, info = trained
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 1, 3, padding=1), nn.Tanh())
    net64 = copy.deepcopy(net).double()
    settings = {"ppl_pairs": 16, "local": {"anchors": 8, "neighbours": 3, "radius": 0.5}, "fidelity_samples": 32,
                "purity_anchors": 2, "purity_directions": 2}
    out = fa.factor_metrics(lambda z, lab=None: net(z), generate64=lambda z, lab=None: net64(z), resolution=R,
                            kinds=3, regressor=(model, info), settings=settings, bootstraps=2)
    for key in ("factor_ppl", "local_factor_isometry", "factor_fidelity", "traversal_purity"):
        assert key in out and out["seconds"][key] >= 0
    assert math.isfinite(out["factor_ppl"]["factor_ppl"])
    assert math.isfinite(out["local_factor_isometry"]["local_factor_isometry"])
    assert 0.2 - 1e-9 <= out["traversal_purity"]["traversal_purity"] <= 1.0
    assert out["factor_fidelity"]["num_samples"] == 32
    json.dumps(jsonable(out), allow_nan=False)


# --------------------------------------------------------------------------- in gsd.evaluate

def test_evaluate_reports_the_factor_metrics_of_a_shapes_run_and_refuses_them_elsewhere(tmp_path, capsys):
    """gsd.evaluate on a --dataset shapes run adds eval.json's `factors` (each metric, the
    regressor's held-out errors, the teacher's factor fidelity beside G's) and prints them; FD is
    in the regressor's feature space. --factor-metrics on a gmm run is one line, nothing written."""
    import json
    from factories import tiny_mlp, tiny_unet
    from gsd import evaluate, train
    from gsd.cli import run_main
    from gsd.models.checkpoint import save_denoiser

    teacher = tmp_path / "t8.safetensors"
    save_denoiser(teacher, tiny_unet())
    out = tmp_path / "shapes-run"
    common = ["--iters", "2", "--batch", "8", "--eval-samples", "0", "--no-progress", "--device", "cpu"]
    assert run_main(train.main, ["--dataset", "shapes", "--resolution", "8", "--shapes-kinds", "1", "--teacher",
                                 str(teacher), "--out", str(out), *common]) == 0, capsys.readouterr().err
    ev = [str(out), "--num-samples", "64", "--ppl-samples", "0", "--isometry-latents", "8", "--latency-repeats", "1",
          "--device", "cpu", "--no-progress"]
    assert run_main(evaluate.main, ev) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    res = json.loads((out / "eval.json").read_text())
    f = res["factors"]
    assert f["regressor"]["feature"] == res["fd_feature"].split(" ")[0] and "factor regressor" in res["fd_feature"]
    for value in (f["factor_ppl"]["factor_ppl"], f["local_factor_isometry"]["local_factor_isometry"],
                  f["traversal_purity"]["traversal_purity"], f["factor_fidelity"]["w1_mean_normalised"],
                  f["teacher_factor_fidelity"]["w1_mean_normalised"]):
        assert isinstance(value, float) and math.isfinite(value)
    assert 0.2 - 1e-9 <= f["traversal_purity"]["traversal_purity"] <= 1 + 1e-9
    assert "factor PPL" in printed and "traversal purity" in printed
    (out / "eval.json").unlink()
    assert run_main(evaluate.main, [*ev, "--no-factor-metrics"]) == 0
    assert "factors" not in json.loads((out / "eval.json").read_text())

    gmm_teacher = tmp_path / "gmm.safetensors"
    save_denoiser(gmm_teacher, tiny_mlp())
    gmm = tmp_path / "gmm-run"
    assert run_main(train.main, ["--dataset", "gmm", "--exact-teacher", "--teacher", str(gmm_teacher), "--out",
                                 str(gmm), *common]) == 0
    capsys.readouterr()
    code = run_main(evaluate.main, [str(gmm), "--factor-metrics", "--num-samples", "64", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--factor-metrics" in err and "shapes" in err, err
    assert not (gmm / "eval.json").exists()
