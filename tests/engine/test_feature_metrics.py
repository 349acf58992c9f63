"""KID, precision/recall, the FD bootstrap, the gmm exact metrics and the noise labels
(gsd.evaluation.feature_metrics) against independent float64 computations written out here."""

import math

import numpy as np
import pytest
import torch

from gsd.evaluation import feature_metrics as fm
from gsd.data import GaussianMixture


def _rng(seed):
    return np.random.default_rng(seed)


def _kid_loop(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, as an explicit double loop."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


def _jackknife_loop(x, y):
    """Delete-one jackknife standard error by recomputing the estimate with each point left out."""
    n, m = len(x), len(y)
    lx = np.array([_kid_loop(np.delete(x, i, 0), y) for i in range(n)])
    ly = np.array([_kid_loop(x, np.delete(y, j, 0)) for j in range(m)])
    var = (n - 1) / n * ((lx - lx.mean()) ** 2).sum() + (m - 1) / m * ((ly - ly.mean()) ** 2).sum()
    return math.sqrt(var)


@pytest.mark.parametrize("n,m,d,block", [(2, 2, 3, 512), (7, 5, 4, 3), (13, 9, 1, 4), (11, 11, 6, 512)])
def test_kid_matches_double_loop(n, m, d, block):
    rng = _rng(n * 100 + m)
    x = rng.standard_normal((n, d)) * 1.3 + 0.2
    y = rng.standard_normal((m, d))
    value, se = fm.kid(x, y, block=block)
    assert value == pytest.approx(_kid_loop(x, y), rel=1e-10, abs=1e-12)
    if n >= 3 and m >= 3:
        assert se == pytest.approx(_jackknife_loop(x, y), rel=1e-8)
    else:
        assert math.isnan(se)
    # torch float32 input gives the same value as its float64 copy
    v32, _ = fm.kid(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32))
    assert v32 == pytest.approx(_kid_loop(x.astype(np.float32).astype(np.float64),
                                          y.astype(np.float32).astype(np.float64)), rel=1e-9, abs=1e-12)


def test_kid_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        fm.kid(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="dimensions"):
        fm.kid(np.zeros((4, 3)), np.zeros((4, 2)))


def test_kid_same_distribution_is_within_noise_and_shift_is_not():
    rng = _rng(5)
    d = 16
    zs = []
    for rep in range(8):
        x = rng.standard_normal((301, d))
        y = rng.standard_normal((257, d))
        v, se = fm.kid(x, y)
        zs.append(v / se)
    assert max(abs(z) for z in zs) < 3.0, zs
    x = rng.standard_normal((301, d))
    y = rng.standard_normal((257, d)) + 0.4
    v, se = fm.kid(x, y)
    assert v > 5 * se and v > 0


def test_kid_stderr_matches_spread_over_repeats():
    # the jackknife standard error against the actual spread of KID over independent draws
    rng = _rng(11)
    vals, ses = [], []
    for _ in range(120):
        x = rng.standard_normal((60, 4))
        y = rng.standard_normal((50, 4)) * 1.2 + 0.3
        v, se = fm.kid(x, y)
        vals.append(v)
        ses.append(se)
    ratio = np.mean(ses) / np.std(vals, ddof=1)
    assert 0.75 < ratio < 1.4, ratio


def _pr_brute(real, fake, k=3):
    def radii(a):
        out = []
        for i in range(len(a)):
            d = sorted(float(np.linalg.norm(a[i] - a[j])) for j in range(len(a)) if j != i)
            out.append(d[k - 1])
        return out

    def cover(q, ref, rad):
        return np.mean([any(np.linalg.norm(p - ref[j]) <= rad[j] for j in range(len(ref))) for p in q])

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


@pytest.mark.parametrize("nr,nf,d,block", [(4, 5, 2, 512), (23, 17, 3, 5), (40, 31, 5, 7)])
def test_precision_recall_match_brute_force(nr, nf, d, block):
    rng = _rng(nr + nf)
    real = rng.standard_normal((nr, d))
    fake = rng.standard_normal((nf, d)) * 1.5 + 0.5
    out = fm.precision_recall(real, fake, block=block)
    p, r = _pr_brute(real, fake)
    assert out["precision"] == pytest.approx(p, abs=1e-15) and out["recall"] == pytest.approx(r, abs=1e-15)
    assert out["precision_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / nf))


def test_knn_radii_brute_force_with_duplicates():
    rng = _rng(3)
    a = rng.standard_normal((9, 2))
    a[4] = a[1]  # a duplicate: its nearest neighbour is at distance 0
    r = fm.knn_radii(a, 3, block=4).numpy()
    for i in range(9):
        d = sorted(float(np.linalg.norm(a[i] - a[j])) for j in range(9) if j != i)
        assert r[i] == pytest.approx(d[2], abs=1e-15)
    with pytest.raises(ValueError, match="more than 3"):
        fm.knn_radii(a[:3], 3)


def test_precision_recall_statistics():
    rng = _rng(8)
    d = 8
    real = rng.standard_normal((700, d))
    same = rng.standard_normal((600, d))
    out = fm.precision_recall(real, same)
    assert out["precision"] > 0.8 and out["recall"] > 0.8  # k = 3 balls miss a few points even here
    # generated points moved off the real manifold: precision falls with the shift
    ps = [fm.precision_recall(real, same + s)["precision"] for s in (0.0, 1.0, 3.0)]
    assert ps[0] > ps[1] > ps[2] and ps[2] < 0.2
    # a generator that covers only part of the data: recall falls, precision stays
    part = same[same[:, 0] > 0.5]
    out = fm.precision_recall(real, part)
    assert out["recall"] < 0.6 and out["precision"] > 0.85


def test_fd_bootstrap_interval():
    from gsd.evaluation.feature_metrics import frechet_distance

    rng = _rng(2)
    widths = []
    for n in (201, 1601):
        x = rng.standard_normal((n, 3))
        y = rng.standard_normal((n + 10, 3)) + 0.7
        lo, hi = fm.fd_bootstrap_interval(x, y, num=100, seed=1)
        fd = frechet_distance(x, y)
        assert lo <= fd <= hi
        widths.append(hi - lo)
        # seeded: the same interval again
        assert fm.fd_bootstrap_interval(x, y, num=100, seed=1) == [lo, hi]
    assert widths[1] < 0.6 * widths[0]  # ~1/sqrt(8) narrower at 8x the samples
    # the interval written out: resampled FDs, 2.5/97.5% quantiles shifted by the median excess
    x, y = rng.standard_normal((57, 3)), rng.standard_normal((41, 3)) + 0.5
    r = np.random.default_rng(7)
    vals = [frechet_distance(x[r.integers(0, 57, 57)], y[r.integers(0, 41, 41)]) for _ in range(30)]
    shift = np.median(vals) - frechet_distance(x, y)
    want = [max(np.quantile(vals, 0.025) - shift, 0.0), np.quantile(vals, 0.975) - shift]
    assert fm.fd_bootstrap_interval(x, y, num=30, seed=7) == pytest.approx(want, rel=1e-12)
    # near FD = 0 in many dimensions, resampled FDs all exceed the estimate (duplicates add
    # bias); the centred interval still contains it
    x, y = rng.standard_normal((300, 40)), rng.standard_normal((300, 40))
    fd = frechet_distance(x, y)
    lo, hi = fm.fd_bootstrap_interval(x, y, num=50, seed=0)
    assert lo <= fd <= hi
    with pytest.raises(ValueError):
        fm.fd_bootstrap_interval(np.zeros((1, 2)), np.zeros((5, 2)))


def _mixture():
    return GaussianMixture([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], weights=[0.5, 0.3, 0.2], stds=[0.1, 0.2, 0.3])


def test_mixture_nll_matches_explicit_density():
    mix = _mixture()
    rng = _rng(4)
    x = rng.standard_normal((37, 2))
    mu = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    w, s = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.2, 0.3])
    dens = np.zeros(len(x))
    for k in range(3):
        dens += w[k] * np.exp(-((x - mu[k]) ** 2).sum(1) / (2 * s[k] ** 2)) / (2 * math.pi * s[k] ** 2)
    ref = -np.log(dens)
    out = fm.mixture_nll(mix, torch.as_tensor(x))
    assert out["nll"] == pytest.approx(ref.mean(), rel=1e-10)
    assert out["nll_stderr"] == pytest.approx(ref.std(ddof=1) / math.sqrt(len(x)), rel=1e-8)
    xn = np.vstack([x, [[np.nan, 0.0]]])
    out2 = fm.mixture_nll(mix, xn)
    assert out2["num_nonfinite"] == 1 and out2["nll"] == pytest.approx(ref.mean(), rel=1e-10)


def test_mode_weight_error():
    mix = _mixture()
    true, _ = mix.sample(20000, generator=torch.Generator().manual_seed(0))
    assert fm.mode_weight_error(mix, true) < 0.02
    # every sample at mode 0: fractions (1, 0, 0) vs (0.5, 0.3, 0.2): TV 0.5
    at0 = torch.zeros(10, 2) + 0.01
    assert fm.mode_weight_error(mix, at0) == pytest.approx(0.5)
    # a NaN sample is its own bin of true weight 0
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [float("nan"), 0.0]])
    # fractions (0.5, 0.25, 0), nonfinite 0.25: 0.5 * (0 + 0.05 + 0.2 + 0.25)
    assert fm.mode_weight_error(mix, x) == pytest.approx(0.25)
    # assignment by component likelihood: a point at 0.45 from mode 0 (std 0.1) and 0.55 from
    # mode 1 (std 0.2) belongs to mode 1
    assert fm.mode_assignment(mix, torch.tensor([[0.45, 0.0]])).tolist() == [1]


def test_within_noise_rules():
    assert fm.within_noise(1.0, 1.1, stderr_a=0.05, stderr_b=0.05) is True
    assert fm.within_noise(1.0, 1.5, stderr_a=0.05, stderr_b=0.05) is False
    assert fm.within_noise(1.0, 2.0, ci_a=[0.5, 1.5], ci_b=[1.4, 2.5]) is True
    assert fm.within_noise(1.0, 2.0, ci_a=[0.5, 1.2], ci_b=[1.4, 2.5]) is False
    assert fm.within_noise(0.03, 0.02, floor=0.02) is True
    assert fm.within_noise(0.05, 0.02, floor=0.02) is False
    assert fm.within_noise(None, 0.02, floor=0.02) is None
    assert fm.within_noise(1.0, 2.0) is None
