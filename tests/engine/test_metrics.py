"""Evaluation pieces of gsd.evaluation.metrics against known answers."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from gsd.evaluation import metrics
from gsd.evaluation import distances
from gsd.evaluation import digits_classifier as digits_cnn
from gsd.evaluation import geometry
from gsd import seed_ranges
from gsd.evaluation import feature_metrics as fm


def _scipy_fd(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((600, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((500, 5)) * 1.5 + 0.3
    assert fm.frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-6, abs=1e-9)
    assert fm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_known_answer_from_moments():
    # N(m1, s1^2 I) vs N(m2, s2^2 I) in d dims: ||m1-m2||^2 + d (s1 - s2)^2
    d = 4
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = 1.0, 2.0
    fd = fm.frechet_distance((mu1, s1 ** 2 * np.eye(d)), (mu2, s2 ** 2 * np.eye(d)), moments=True)
    assert fd == pytest.approx(d * 0.25 + d * (s1 - s2) ** 2, rel=1e-12)
    # torch input works too
    x = torch.randn(3000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert fm.frechet_distance(x, x + 1.0) == pytest.approx(3.0, rel=1e-6)


def test_sliced_wasserstein_shift():
    g = torch.Generator().manual_seed(0)
    d = 3
    x = torch.randn(4000, d, generator=g, dtype=torch.float64)
    shift = torch.tensor([0.6, -0.3, 0.9], dtype=torch.float64)
    y = x + shift  # same samples shifted: SW_2 = ||m|| / sqrt(d) in expectation over directions
    sw = distances.sliced_wasserstein(x, y, num_projections=1000)
    assert sw == pytest.approx(float(shift.norm()) / math.sqrt(d), rel=0.05)
    z = torch.randn(3000, d, generator=g, dtype=torch.float64) + shift  # independent samples, unequal sizes
    assert distances.sliced_wasserstein(x, z, num_projections=500) == pytest.approx(float(shift.norm()) / math.sqrt(d),
                                                                                  rel=0.1)
    assert distances.sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)


def test_mmd_orders_distributions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 2, generator=g)
    same = torch.randn(300, 2, generator=g)
    far = torch.randn(300, 2, generator=g) + 2.0
    assert abs(distances.mmd(x, same)) < 0.02
    assert distances.mmd(x, far) > 0.2


def test_mode_coverage():
    means = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, 2] * 100)  # mode 3 never drawn
    x = means[ids] + 0.02 * torch.randn(300, 2, generator=g)
    cov = distances.mode_coverage(x, means, 0.02)
    assert cov["num_modes"] == 4 and cov["modes_covered"] == 3
    assert cov["counts"][3] == 0 and cov["high_quality_fraction"] > 0.95
    # samples far from every mode count for nothing; NaN rows are ignored
    junk = torch.cat([x, torch.full((50, 2), 0.5), torch.full((3, 2), float("nan"))])
    cov2 = distances.mode_coverage(junk, means, 0.02)
    assert cov2["modes_covered"] == 3 and cov2["high_quality_fraction"] < 300 / 353 + 1e-9
    full = means[torch.arange(400) % 4] + 0.02 * torch.randn(400, 2, generator=g)
    assert distances.mode_coverage(full, means, 0.02)["modes_covered"] == 4


def test_isometry_defect_linear_and_nonlinear():
    z = torch.randn(128, 4, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    lin = lambda e: 3.0 * e @ q[:4]  # a scaled isometry: defect 0
    assert geometry.isometry_defect(lin, z) == pytest.approx(0.0, abs=1e-5)
    bent = lambda e: torch.tanh(3 * e) ** 3
    assert geometry.isometry_defect(bent, z) > 0.01


def test_measure_latency_positive():
    ms = metrics.measure_latency(lambda: torch.randn(64, 64) @ torch.randn(64, 64), "cpu", warmup=1, repeats=3)
    assert 0 < ms < 1000


def test_digits_classifier_cached(tmp_path):
    from gsd.data import load_dataset

    ds = load_dataset("digits")
    model, info = digits_cnn.digits_classifier(ds, cache_dir=tmp_path, epochs=2)
    assert 0.5 < info["test_accuracy"] <= 1.0
    feats = digits_cnn.classifier_features(model, ds.data[:10])
    assert feats.shape == (10, 64)
    again, info2 = digits_cnn.digits_classifier(ds, cache_dir=tmp_path, epochs=2)  # from the cache
    assert info2["test_accuracy"] == info["test_accuracy"]
    assert torch.equal(digits_cnn.classifier_features(again, ds.data[:10]), feats)


def test_digits_classifier_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    from gsd.data import load_dataset

    digits_cnn.digits_classifier(load_dataset("digits"), cache_dir=tmp_path, epochs=2, progress=True)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "digits classifier" in l]
    assert "\r" not in err and 2 <= len(lines) <= 4, err
    assert lines[-1].startswith("digits classifier: 2/2")


def _grouped_loss_float64(x, z, g):
    """The optimal-scale isometry loss over ordered pairs within groups of g rows, written out."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    sdd = szz = sdz = 0.0
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j and i // g == j // g:
                a, b = np.linalg.norm(x[i] - x[j]), np.linalg.norm(z[i] - z[j])
                sdd += a * a
                szz += b * b
                sdz += a * b
    return 1.0 - sdz * sdz / (sdd * szz)


def test_neighbour_latents_are_on_the_sphere_around_each_anchor():
    a = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    z = geometry.neighbour_latents(a, neighbours=3, radius=0.5, seed=1)
    assert z.shape == (20, 1, 3, 3)
    grp = z.reshape(5, 4, -1)
    assert torch.equal(grp[:, 0], a.reshape(5, -1))
    dist = (grp[:, 1:] - grp[:, :1]).norm(dim=2)
    assert torch.allclose(dist, torch.full_like(dist, 0.5), atol=1e-6)
    assert torch.equal(z, geometry.neighbour_latents(a, neighbours=3, radius=0.5, seed=1))
    for bad in (dict(neighbours=0), dict(radius=0.0), dict(radius=float("inf"))):
        with pytest.raises(ValueError):
            geometry.neighbour_latents(a, **bad)


def test_local_isometry_defect():
    d = 6
    anchors = torch.randn(33, d, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    lin = lambda e: 2.5 * e.double() @ q[:d] + 1.0  # noqa: E731 - an exact scaled isometry
    assert geometry.local_isometry_defect(lin, anchors) == pytest.approx(0.0, abs=1e-10)
    # a local wiggle that random pairs of the whole batch barely see
    w = torch.randn(d, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    wig = lambda e: lin(e) + 0.05 * torch.sin(8.0 * e.double() @ w)  # noqa: E731
    local = geometry.local_isometry_defect(wig, anchors)
    assert local > 1e-3 and local > 10 * geometry.isometry_defect(wig, anchors)
    # against the grouped loss written out in float64
    z = geometry.neighbour_latents(anchors, neighbours=3, radius=0.5)
    assert local == pytest.approx(_grouped_loss_float64(wig(z), z, 4), rel=1e-8)
    # the same seeds give the same value; another direction seed another one
    assert geometry.local_isometry_defect(wig, anchors) == local
    assert geometry.local_isometry_defect(wig, anchors, seed=5) != local
    # labels reach the generator, one per group member; a group with a NaN output is left out
    seen = []

    def labelled(e, lab):
        seen.append(lab.clone())
        out = wig(e)
        out[lab == 0] = float("nan")
        return out

    lab = torch.arange(33) % 3
    v = geometry.local_isometry_defect(labelled, anchors, labels=lab, neighbours=2)
    assert torch.equal(torch.cat(seen), lab.repeat_interleave(3))
    keep = (lab != 0).repeat_interleave(3)
    z3 = geometry.neighbour_latents(anchors, neighbours=2, radius=0.5)
    assert v == pytest.approx(_grouped_loss_float64(wig(z3)[keep], z3[keep], 3), rel=1e-8)


@pytest.mark.parametrize("n,g,shape_x,shape_z", [(2, 2, (5,), (3,)), (21, 3, (37,), (1, 2, 3)), (28, 4, (2, 3, 3), (64,))])
def test_local_defect_shares_sum_to_the_grouped_loss(n, g, shape_x, shape_z):
    gen = torch.Generator().manual_seed(n)
    z = torch.randn(n, *shape_z, generator=gen, dtype=torch.float64)
    x = torch.randn(n, *shape_x, generator=gen, dtype=torch.float64) + 3.0  # offset: distances only
    shares = geometry.local_defect_shares(x, z, g)
    assert shares.shape == (n // g,) and shares.dtype == torch.float64 and bool((shares >= 0).all())
    assert float(shares.sum()) == pytest.approx(_grouped_loss_float64(x, z, g), rel=1e-10)
    # float32 inputs are computed in float64 too
    assert float(geometry.local_defect_shares(x.float(), z.float(), g).sum()) == pytest.approx(
        _grouped_loss_float64(x.float(), z.float(), g), rel=1e-5)


def test_local_defect_shares_find_the_distorted_neighbourhood():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))
    x = 2.0 * z @ q[:6]  # an exact scaled isometry: no group carries anything
    assert float(geometry.local_defect_shares(x, z, 4).abs().max()) < 1e-12
    x[17] += 0.5 * torch.randn(9, generator=gen, dtype=torch.float64)  # bend one neighbourhood (rows 16-19)
    shares = geometry.local_defect_shares(x, z, 4)
    assert int(shares.argmax()) == 4 and float(shares[4] / shares.sum()) > 0.5
    for bad in (1, 3, 0):
        with pytest.raises(ValueError, match="groups"):
            geometry.local_defect_shares(x, z, bad)


def test_real_noise_floor_sizes_and_values():
    from gsd.evaluation import feature_metrics as fm

    f = np.random.default_rng(0).standard_normal((23, 3))
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(seed_ranges.REAL_SPLIT_SEED)).numpy()
    floor = metrics.real_noise_floor(f, 100, bootstraps=20)
    assert floor["size"] == 11 and "fewer than the 100 evaluated" in floor["what"]
    a, b = f[perm[:11]], f[perm[11:22]]
    assert floor["fd"] == pytest.approx(fm.frechet_distance(a, b), rel=1e-12)
    assert floor["kid"] == pytest.approx(fm.kid(a, b)[0], rel=1e-12)
    assert floor["precision"] == fm.precision_recall(b, a)["precision"]  # the first half plays "generated"
    small = metrics.real_noise_floor(f, 7, bootstraps=20)
    assert small["size"] == 7 and "fewer" not in small["what"]


def test_summary_rows_label_noise():
    one = {"fd": 10.0, "fd_ci": [9.0, 11.0], "kid": 0.05, "kid_stderr": 0.01, "precision": 0.8,
           "precision_stderr": 0.01, "local_isometry_defect": 0.2}
    teach = {"fd": 10.5, "fd_ci": [9.5, 11.5], "kid": 0.01, "kid_stderr": 0.01, "precision": 0.81,
             "precision_stderr": 0.01, "local_isometry_defect": 0.1}
    m = {"one_step": one, "teacher": teach, "noise_floor": {"fd": 12.0, "what": "real vs real, 898 each"}}
    text = metrics.summary_rows(m)
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert rows["FD"].endswith("within noise")        # intervals overlap
    assert rows["KID"].endswith("differs")            # 0.04 > 2 * sqrt(2) * 0.01
    assert rows["precision"].endswith("within noise")
    assert "local isometry defect" in text and "real vs real, 898 each" in text
    assert metrics.noise_verdict({"mmd": 0.05}, {"mmd": 0.01}, "mmd", "floor", {"mmd": 0.02}) == "differs"
    assert metrics.noise_verdict({"high_quality_fraction": 0.99}, {"high_quality_fraction": 0.995},
                                 "high_quality_fraction", "floor", {"high_quality_fraction": 0.99}) == "within noise"


def test_mixture_section_sees_off_mode_mass_and_mode_weights():
    from gsd.evaluation import feature_metrics as fm
    from gsd.data import GaussianMixture

    mix = GaussianMixture([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], stds=0.05)
    g = torch.Generator().manual_seed(3)
    good, _ = mix.sample(800, generator=g)
    x, ids = mix.sample(800, generator=g)
    bad = x[ids != 3]                                   # one mode dropped ...
    bad = torch.cat([bad, torch.full((800 - len(bad), 2), 0.5)])  # ... its mass put between the modes
    one, two = {}, {}
    sec = metrics.mixture_section(mix, 800, [(one, good), (two, bad)], bootstraps=20)
    floor, true = sec["noise_floor"], sec["true"]
    assert true["nll"] == pytest.approx(fm.mixture_nll(mix, sec["true_sample"])["nll"])
    assert floor["size"] == 800 and floor["nll_gap"] == pytest.approx(floor["nll"] - true["nll"])
    # exact samples: within noise of the truth; the damaged set: far off
    assert abs(one["nll_gap"]) < 3 * math.hypot(one["nll_stderr"], true["nll_stderr"])
    assert two["nll_gap"] > 10 * math.hypot(two["nll_stderr"], true["nll_stderr"])
    assert one["mode_weight_error"] < 0.05 and two["mode_weight_error"] == pytest.approx(0.25, abs=0.04)
    assert metrics.noise_verdict(one, floor, "kid", "se") == "within noise"
    assert metrics.noise_verdict(two, floor, "kid", "se") == "differs"
    assert two["precision"] < one["precision"] - 0.1 and two["recall"] < one["recall"] - 0.1
