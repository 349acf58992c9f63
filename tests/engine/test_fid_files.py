"""`python -m gsd.fid ref|calc` against pytorch-fid's own functions on the same files, with a
random-valued weights file in pytorch-fid's layout inside a temporary TORCH_HOME (pytorch-fid
finds it there and downloads nothing); the weights download; the one-line refusals."""

import io
import os
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_checks import assert_one_line_error
from gsd import fid as fid_cmd
from gsd import generate
from gsd.cli import run_main
from gsd.errors import UsageError
from gsd.evaluation import fid
from gsd.evaluation.fid_stats import dataset_images
from test_generator import image_net, write_generator_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_inception_weights(path: Path) -> Path:
    """pytorch-fid's FID-Inception layout with random values (He init: activations stay O(1))."""
    torch.manual_seed(0)
    net = fid.build_fid_inception_architecture()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def torch_home(tmp_path_factory, monkeypatch):
    """A TORCH_HOME whose hub cache holds the weights under pytorch-fid's file name."""
    home = tmp_path_factory.getbasetemp() / "torch_home"
    weights = home / "hub" / "checkpoints" / fid.FID_WEIGHTS_NAME
    if not weights.exists():
        random_inception_weights(weights)
    monkeypatch.setenv("TORCH_HOME", str(home))
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(home / "hub"))
    yield weights
    torch.hub.set_dir(old)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "th" / "hub"))
    yield tmp_path / "th" / "hub" / "checkpoints"
    torch.hub.set_dir(old)


def _run(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _fid(argv, capsys):
    return _run(lambda a: run_main(fid_cmd.main, a), [*argv, "--device", "cpu", "--no-progress"], capsys)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A: greyscale 8x8 PNGs from a generator; B: RGB 8x8 PNGs from another, and the same as an npz;
    both written by gsd.generate."""
    root = tmp_path_factory.mktemp("fidimg")
    grey = write_generator_file(root / "grey.safetensors", image_net(channels=1, seed=1))
    rgb = write_generator_file(root / "rgb.safetensors", image_net(channels=3, seed=2))
    for argv in ([grey, "--seeds", "0-11", "--out", str(root / "A")],
                 [rgb, "--seeds", "100-113", "--out", str(root / "B")],
                 [rgb, "--seeds", "100-113", "--out", str(root / "B.npz")]):
        assert run_main(generate.main, [*argv, "--device", "cpu", "--no-progress"]) == 0
    return root


def _value(text, name):
    return float(re.search(rf"{name} ([-0-9.e+]+)", text).group(1))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 2048-d covariances of 12 images are singular
@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # inside pytorch-fid's sqrtm call
def test_fid_equals_pytorch_fid_on_the_same_png_folders(folders, torch_home, tmp_path, capsys):
    from pytorch_fid.fid_score import calculate_activation_statistics, calculate_fid_given_paths
    from pytorch_fid.inception import InceptionV3

    a, b = folders / "A", folders / "B"
    code, _, err = _fid(["ref", "--images", str(a), "--dest", str(tmp_path / "refs" / "a.npz")], capsys)
    assert code == 0, err
    code, out, err = _fid(["calc", "--images", str(b), "--ref", str(tmp_path / "refs" / "a.npz")], capsys)
    assert code == 0, err
    ours = _value(out, "FID")
    reference = calculate_fid_given_paths([str(b), str(a)], batch_size=50, device="cpu", dims=2048, num_workers=0)
    assert ours > 1e-3 and ours == pytest.approx(reference, rel=1e-4)
    # the reference statistics themselves are pytorch-fid's
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    mu, sigma = calculate_activation_statistics(sorted(str(p) for p in a.glob("*.png")), model, 50, 2048, "cpu", 0)
    with np.load(tmp_path / "refs" / "a.npz") as ref:
        assert sorted(ref.files) == ["mu", "sigma"]
        np.testing.assert_allclose(ref["mu"], mu, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-3, atol=1e-6)
    # the same images as an npz score the same; the protocol names the weights file's sha256
    code, out_npz, err = _fid(["calc", "--images", str(folders / "B.npz"), "--ref", str(tmp_path / "refs" / "a.npz")],
                              capsys)
    assert code == 0, err
    assert _value(out_npz, "FID") == pytest.approx(ours, rel=1e-9)
    import hashlib
    assert hashlib.sha256(torch_home.read_bytes()).hexdigest()[:16] in out_npz


def _kid_reference(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out with numpy."""
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    n, m = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def _coverage(query, ref, k=3):
    """Fraction of query points within some ref point's k-NN radius (brute force)."""
    d_ref = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))
    radii = np.sort(d_ref, axis=1)[:, k]
    d = np.sqrt(((query[:, None] - ref[None]) ** 2).sum(-1))
    return float((d <= radii[None]).any(1).mean())


def test_metrics_are_kid_and_precision_recall_of_pytorch_fid_features(folders, torch_home, tmp_path, capsys):
    from pytorch_fid.fid_score import get_activations
    from pytorch_fid.inception import InceptionV3

    a, b = folders / "A", folders / "B"
    code, _, err = _fid(["ref", "--images", str(a), "--dest", str(tmp_path / "a.npz"), "--with-features"], capsys)
    assert code == 0, err
    code, out, err = _fid(["calc", "--images", str(b), "--ref", str(tmp_path / "a.npz"), "--metrics"], capsys)
    assert code == 0, err
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    fa = get_activations(sorted(str(p) for p in a.glob("*.png")), model, 50, 2048, "cpu", 0)
    fb = get_activations(sorted(str(p) for p in b.glob("*.png")), model, 50, 2048, "cpu", 0)
    assert _value(out, "KID") == pytest.approx(_kid_reference(fb, fa), rel=1e-3, abs=1e-6)
    assert re.search(r"KID [-0-9.e+]+ ± [0-9.e+-]+", out)
    assert _value(out, "precision") == pytest.approx(_coverage(fb, fa), abs=1e-4)
    assert _value(out, "recall") == pytest.approx(_coverage(fa, fb), abs=1e-4)
    # without kept features --metrics is refused in one line
    code, _, err = _fid(["ref", "--images", str(a), "--dest", str(tmp_path / "plain.npz")], capsys)
    assert code == 0, err
    code, _, err = _fid(["calc", "--images", str(b), "--ref", str(tmp_path / "plain.npz"), "--metrics"], capsys)
    assert_one_line_error(code, err, "--with-features")


def test_data_sets_are_rendered_to_their_own_bytes(tmp_path):
    from test_data import write_fake_cifar

    raw, _, _ = write_fake_cifar(str(tmp_path))
    images = dataset_images("cifar10", data_root=str(tmp_path))
    arr = np.concatenate(list(images.batches(7)))
    assert arr.dtype == np.uint8 and arr.shape == (30, 32, 32, 3)
    assert np.array_equal(arr, raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    digits = np.concatenate(list(dataset_images("digits").batches(5000)))
    from sklearn.datasets import load_digits
    expected = np.floor(load_digits().images * (127.5 / 8) + 0.5).astype(np.uint8)  # (v/8 - 1) * 127.5 + 128
    assert np.array_equal(digits[..., 0], expected)


def _write_npz(path, arr, key="arr_0"):
    np.savez(path, **{key: arr})
    return str(path)


def test_bad_input_is_one_line_and_writes_nothing(folders, torch_home, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = [
        (_write_npz(bad / "f.npz", np.zeros((4, 8, 8, 3), np.float32)), "dtype float32"),
        (_write_npz(bad / "r.npz", np.zeros((4, 8, 8), np.uint8)), "rank 3"),
        (_write_npz(bad / "c.npz", np.zeros((4, 8, 8, 4), np.uint8)), "4 channels"),
        (_write_npz(bad / "k.npz", np.zeros((4, 8, 8, 3), np.uint8), key="images"), "no arr_0"),
        (str(bad / "missing"), "no such file"),
    ]
    mixed = bad / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (9, 8)).save(mixed / "b.png")
    cases.append((str(mixed), "mixes image sizes"))
    (bad / "notes.txt").write_text("x")
    cases.append((str(bad / "notes.txt"), "neither a folder of images nor an .npz"))
    before = sorted(p.name for p in bad.iterdir())
    for images, needle in cases:
        code, _, err = _fid(["ref", "--images", images, "--dest", str(tmp_path / "out.npz")], capsys)
        assert_one_line_error(code, err, needle)
    ref_no_mu = _write_npz(bad / "nomu.npz", np.zeros(2048), key="m")
    np.savez(bad / "dim.npz", mu=np.zeros(64), sigma=np.eye(64))
    for ref, needle in ((ref_no_mu, "no mu or sigma"), (str(bad / "dim.npz"), "(2048,) and (2048, 2048)")):
        code, _, err = _fid(["calc", "--images", str(folders / "B"), "--ref", ref], capsys)
        assert_one_line_error(code, err, needle)
    (tmp_path / "taken.npz").write_bytes(b"keep")
    code, _, err = _fid(["ref", "--images", str(folders / "A"), "--dest", str(tmp_path / "taken.npz")], capsys)
    assert_one_line_error(code, err, "exists")
    assert (tmp_path / "taken.npz").read_bytes() == b"keep"
    assert not (tmp_path / "out.npz").exists()
    assert sorted(p.name for p in bad.iterdir()) == sorted(before + ["dim.npz", "nomu.npz"])


def test_missing_weights_are_downloaded_into_the_hub_cache_or_named_in_one_line(
        folders, empty_torch_home, tmp_path, capsys, monkeypatch):
    dest = empty_torch_home / fid.FID_WEIGHTS_NAME

    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fid.urllib.request, "urlopen", offline)
    code, _, err = _fid(["ref", "--images", str(folders / "A"), "--dest", str(tmp_path / "a.npz")], capsys)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert fid.FID_WEIGHTS_NAME in lines[0] and str(empty_torch_home) in lines[0] and "--fid-weights" in lines[0]
    assert not (tmp_path / "a.npz").exists() and not dest.exists()
    monkeypatch.undo()
    # where the network answers, the file lands in the hub cache (a file:// URL stands for it here),
    # after being checked: a page of garbage is refused and not kept
    monkeypatch.setenv("TORCH_HOME", str(empty_torch_home.parents[1]))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>rate limited</html>")
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL", garbage.as_uri())
    with pytest.raises(UsageError, match="not usable"):
        fid.fid_weights(None)
    assert not dest.exists() and not list(empty_torch_home.glob(".*tmp*"))
    good = random_inception_weights(tmp_path / "served" / fid.FID_WEIGHTS_NAME)
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL", good.as_uri())
    code, out, err = _fid(["ref", "--images", str(folders / "A"), "--dest", str(tmp_path / "a.npz")], capsys)
    assert code == 0, err
    assert dest.read_bytes() == good.read_bytes() and "downloading" in err
    # an explicit --fid-weights that does not exist is an error, not a download
    code, _, err = _fid(["calc", "--images", str(folders / "A"), "--ref", str(tmp_path / "a.npz"), "--fid-weights",
                         str(tmp_path / "nope.pth")], capsys)
    assert_one_line_error(code, err, "no such file")


def test_evaluate_scores_gsd_generates_images_as_fid_calc_does(folders, torch_home, tmp_path, capsys):
    """gsd.evaluate's FID is `gsd.fid calc` over gsd.generate's PNGs of the evaluation seeds, and
    eval.json names the protocol: samples, seeds, reference file and weights file (sha256)."""
    import hashlib
    import json

    from gsd import evaluate
    from test_evaluate import FAST, make_tiny_digits_run

    run = make_tiny_digits_run(tmp_path, tmp_path / "cache")
    ref = tmp_path / "ref.npz"
    assert _fid(["ref", "--images", str(folders / "A"), "--dest", str(ref)], capsys)[0] == 0
    code, out, err = _run(lambda a: run_main(evaluate.main, a),
                          [str(run), "--fid-ref", str(ref), "--num-samples", "10", "--ppl-samples", "0",
                           "--cache-dir", str(tmp_path / "cache"), *FAST], capsys)
    assert code == 0, err
    res = json.loads((run / "eval.json").read_text())
    proto = res["fid_protocol"]
    assert proto["num_samples"] == 10 and proto["latent_seeds"] == [0, 9]
    assert proto["reference"]["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert proto["weights_sha256"] == hashlib.sha256(torch_home.read_bytes()).hexdigest()
    assert "FID protocol: 10 samples" in out
    assert _run(lambda a: run_main(generate.main, a), [str(run), "--seeds", "0-9", "--out", str(tmp_path / "png"),
                                                       "--device", "cpu", "--no-progress"], capsys)[0] == 0
    code, out, err = _fid(["calc", "--images", str(tmp_path / "png"), "--ref", str(ref)], capsys)
    assert code == 0, err
    assert res["fid"] == pytest.approx(_value(out, "FID"), rel=1e-6)
    # a reference of the wrong kind is refused before the run is evaluated
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    code, _, err = _run(lambda a: run_main(evaluate.main, a), [str(run), "--fid-ref", str(tmp_path / "bad.npz"),
                                                               *FAST], capsys)
    assert_one_line_error(code, err, "--fid-ref", "sigma")
