"""FID path (gsd.evaluation.fid) with Inception weights the test builds: a randomly initialised network of
pytorch-fid's FID-Inception layout, saved as a state dict and loaded like the real file."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from gsd import evaluate

from gsd.evaluation import fid
from gsd.cli import run_main
from gsd.errors import UsageError


def _scipy_fd(a, b):
    """pytorch-fid's formula with scipy's sqrtm (the reference).

    Few samples in 2048 dimensions: both covariances live in the span of the centred samples,
    so the formula is evaluated exactly in an orthonormal basis of that span (a D x D sqrtm
    of a singular matrix is slow and inaccurate, and changes nothing).
    """
    ca, cb = a - a.mean(0), b - b.mean(0)
    if a.shape[1] > len(a) + len(b):
        q, _ = np.linalg.qr(np.concatenate([ca, cb, (a.mean(0) - b.mean(0))[None]]).T)
        a, b = a @ q, b @ q
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # rank-deficient covariances, on purpose
def test_fid_formula_matches_references():
    from gsd.evaluation.feature_metrics import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((250, 6)) * 1.3 + 0.2
    assert fid.fid_from_features(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-8)
    assert fid.fid_from_features(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-8)
    assert fid.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    # few samples in many dimensions (the FID case on a CPU test): same value as the D x D route
    a, b = rng.standard_normal((5, 300)), rng.standard_normal((7, 300)) + 0.1
    assert fid.fid_from_features(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-7)
    assert fid.fid_from_features(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-7)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    net = fid.build_fid_inception_architecture()
    # He init keeps activations O(1) through the ~40 layers (PyTorch's default init lets them
    # shrink to ~1e-8, which would make every FID trivially ~0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fidw") / "pt_inception-2015-12-05-test.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(weights_file):
    return fid.load_fid_inception(weights_file)


def test_features_match_pytorch_fid_inception(model, monkeypatch):
    import pytorch_fid.inception as pfi

    # pytorch-fid's own wrapper around the same weights (its constructor would download them)
    monkeypatch.setattr(pfi, "fid_inception_v3", lambda: model.inception)
    ref_net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = ref_net(((x + 1) / 2).expand(-1, 3, -1, -1))[0].flatten(1)  # pytorch-fid takes [0, 1]
    got = model(x)
    assert got.shape == (2, 2048)
    assert float(got.std()) > 1e-3  # not a degenerate network
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 2048-d covariances of 4 images are singular
def test_fid_zero_for_identical_and_positive_for_shifted(model):
    g = torch.Generator().manual_seed(2)
    a = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    b = (a + 0.4).clamp(-1, 1)
    fa = fid.inception_features(model, a)
    fb = fid.inception_features(model, b)
    assert fa.dtype == np.float64 and fa.shape == (4, 2048)
    assert fid.fid_from_features(fa, fa) == pytest.approx(0.0, abs=1e-6)
    d = fid.fid_from_features(fa, fb)
    assert d > 1e-3
    assert d == pytest.approx(_scipy_fd(fa, fb), rel=1e-4)
    # 3-channel input of the same grey images gives the same features
    assert np.allclose(fid.inception_features(model, a[:1].expand(-1, 3, -1, -1)), fa[:1], rtol=1e-5, atol=1e-7)


def test_locating_weights(tmp_path, monkeypatch):
    old = torch.hub.get_dir()
    try:
        torch.hub.set_dir(str(tmp_path / "hub"))
        path, reason = fid.locate_fid_weights()
        assert path is None and "pt_inception-2015-12-05-*.pth" in reason and str(tmp_path) in reason
        ck = tmp_path / "hub" / "checkpoints"
        ck.mkdir(parents=True)
        (ck / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"x")
        path, reason = fid.locate_fid_weights()
        assert path.name == "pt_inception-2015-12-05-6726825d.pth" and reason is None
    finally:
        torch.hub.set_dir(old)
    with pytest.raises(UsageError, match="no such file"):
        fid.locate_fid_weights(tmp_path / "missing.pth")
    with pytest.raises(UsageError, match="not a file"):
        fid.locate_fid_weights(tmp_path)


def test_bad_weight_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="not a readable"):
        fid.load_fid_inception(bad)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(UsageError, match="not pytorch-fid's Inception"):
        fid.load_fid_inception(other)


def test_evaluate_cli_uses_fid_weights(weights_file, tmp_path, capsys):
    from test_evaluate import FAST, make_tiny_digits_run

    run = make_tiny_digits_run(tmp_path, tmp_path / "cache")
    code = run_main(evaluate.main, [str(run), "--fid-weights", str(weights_file), "--require-fid",
                                    "--num-samples", "2", "--ppl-samples", "4", "--cache-dir", str(tmp_path / "cache"),
                                    *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads((run / "eval.json").read_text())
    assert res["fid_unavailable"] is None and res["fid_feature"] == fid.FID_FEATURE_NAME
    assert res["fid_real_samples"] == 2
    for v in (res["fid"], res["fid_teacher"]):
        assert isinstance(v, float) and math.isfinite(v) and v >= 0
    assert res["fid"] == res["one_step"]["fid"]


def test_evaluate_fid_interval_and_inception_kid(weights_file, tmp_path, capsys):
    """Where FID runs: its bootstrap interval, and KID / precision / recall in the Inception
    space under *_inception keys when the data set has its own feature space (digits)."""
    from test_evaluate import FAST, make_tiny_digits_run

    run = make_tiny_digits_run(tmp_path, tmp_path / "cache")
    code = run_main(evaluate.main, [str(run), "--fid-weights", str(weights_file), "--num-samples", "9",
                                    "--ppl-samples", "0", "--cache-dir", str(tmp_path / "cache"), *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads((run / "eval.json").read_text())
    assert res["fid_bootstraps"] == fid.FID_BOOTSTRAPS
    for m in (res["one_step"], res["teacher"]):
        lo, hi = m["fid_ci"]
        assert 0 <= lo <= hi
        assert math.isfinite(m["kid_inception"]) and m["kid_inception_stderr"] > 0
        assert 0 <= m["precision_inception"] <= 1 and 0 <= m["recall_inception"] <= 1
        # the digits-CNN metrics keep their own keys
        assert math.isfinite(m["kid"]) and m["fd_ci"] is not None
    floor = res["noise_floor_inception"]
    assert floor["size"] == 4 and "9 real samples, 4 each" in floor["what"] and floor["fid"] >= 0
    assert "FID" in out.out
