"""Data sets and the exact Gaussian-mixture denoiser (gsd.data)."""

import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gsd.errors import UsageError
from gsd.data import (DataError, Dataset, GaussianMixture, GMMDenoiser, default_gmm, load_dataset)


def random_mixture(k=3, dim=2, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    means = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.2
    stds = torch.rand(k, generator=gen, dtype=torch.float64) * 0.3 + 0.15
    return GaussianMixture(means, weights, stds)


# ----------------------------------------------------------------------------------------
# Gaussian mixture

def test_gmm_denoise_matches_brute_force_posterior_mean():
    """Posterior mean by quadrature on a fine grid over x0, in float64."""
    mix = random_mixture(k=3, dim=2)
    step = 0.01
    ax = torch.arange(-4.0, 4.0, step, dtype=torch.float64)
    g0, g1 = torch.meshgrid(ax, ax, indexing="ij")
    grid = torch.stack([g0.reshape(-1), g1.reshape(-1)], 1)  # x0 candidates
    # prior density on the grid, written out per component
    prior = torch.zeros(grid.shape[0], dtype=torch.float64)
    for mu, w, s in zip(mix.means, mix.weights, mix.stds):
        prior += w * torch.exp(-((grid - mu) ** 2).sum(1) / (2 * s * s)) / (2 * math.pi * s * s)
    for sigma in [0.1, 0.5, 2.0]:
        xs = torch.randn(4, 2, dtype=torch.float64) * 1.2
        got = mix.denoise(xs, sigma)
        for x, g in zip(xs, got):
            lik = torch.exp(-((grid - x) ** 2).sum(1) / (2 * sigma * sigma))
            post = prior * lik
            ref = (post[:, None] * grid).sum(0) / post.sum()
            torch.testing.assert_close(g, ref, rtol=0, atol=2e-5)


def test_gmm_denoise_is_tweedie_and_differentiable():
    mix = random_mixture(k=4, dim=3)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    sigma = torch.exp(torch.randn(6, dtype=torch.float64))
    logp = mix.log_prob(x, sigma).sum()
    (score,) = torch.autograd.grad(logp, x)
    tweedie = x + sigma[:, None] ** 2 * score
    torch.testing.assert_close(mix.denoise(x, sigma), tweedie.detach(), rtol=1e-9, atol=1e-9)
    torch.autograd.gradcheck(lambda inp: mix.denoise(inp, sigma), (x,))


def test_gmm_log_prob_matches_explicit_density():
    mix = random_mixture(k=3, dim=2)
    x = torch.randn(5, 2, dtype=torch.float64)
    dens = torch.zeros(5, dtype=torch.float64)
    for mu, w, s in zip(mix.means, mix.weights, mix.stds):
        dens += w * torch.exp(-((x - mu) ** 2).sum(1) / (2 * s * s)) / (2 * math.pi * s * s)
    torch.testing.assert_close(mix.log_prob(x), dens.log())


def test_gmm_denoise_far_away_points_are_stable():
    mix = default_gmm()
    x = torch.tensor([[300.0, -200.0], [0.0, 0.0], [1e-3, 5.0]])
    out = mix.denoise(x, torch.tensor([0.01, 80.0, 0.002]))
    assert torch.isfinite(out).all() and out.dtype == torch.float32


def test_gmm_sampling_and_default_mixture():
    mix = default_gmm()
    assert mix.num_components == 8 and mix.dim == 2
    assert abs(mix.std() - math.sqrt(0.7 ** 2 / 2 + 0.05 ** 2)) < 1e-12
    x, ids = mix.sample(20000, generator=torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and x.shape == (20000, 2)
    assert abs(float(x.std()) - mix.std()) < 0.01
    frac = torch.bincount(ids, minlength=8).double() / 20000
    assert (frac - 0.125).abs().max() < 0.015
    resid = x.double() - mix.means[ids]
    assert abs(float(resid.std()) - 0.05) < 0.002
    # modes are well separated: nearest-mode assignment recovers the component ids
    nearest = torch.cdist(x.double(), mix.means).argmin(1)
    assert (nearest == ids).double().mean() > 0.999


def test_gmm_denoiser_module():
    mix = random_mixture(k=2, dim=2)
    den = GMMDenoiser(mix)
    assert den.sigma_data == pytest.approx(mix.std())
    x = torch.randn(5, 2)
    for sigma in [0.7, torch.tensor(0.7), torch.full((5,), 0.7), torch.full((5, 1), 0.7)]:
        torch.testing.assert_close(den(x, sigma), mix.denoise(x, 0.7))


def test_gmm_dataset():
    ds = load_dataset("gmm")
    assert isinstance(ds, Dataset)
    assert ds.sample_shape == (2,) and ds.data.shape[1] == 2 and ds.data.dtype == torch.float32
    assert ds.mixture is not None and ds.num_classes == 8 and ds.labels.shape == (ds.data.shape[0],)


# ----------------------------------------------------------------------------------------
# digits

def test_digits():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.data.shape == (1797, 1, 8, 8) and ds.data.dtype == torch.float32
    assert ds.sample_shape == (1, 8, 8) and ds.num_classes == 10
    assert float(ds.data.min()) == -1.0 and float(ds.data.max()) == 1.0
    ref = load_digits()
    i = int(torch.randint(0, 1797, ()))
    np.testing.assert_allclose(ds.data[i, 0].numpy(), ref.images[i] / 8.0 - 1.0, rtol=0, atol=1e-6)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == ref.target.tolist()
    with pytest.raises(DataError):
        load_dataset("digits", resolution=16)


def test_unknown_dataset():
    with pytest.raises(DataError) as info:
        load_dataset("imagenet")
    assert "imagenet" in str(info.value)
    assert issubclass(DataError, UsageError)


# ----------------------------------------------------------------------------------------
# cifar10 from a fake cifar-10-batches-py in the real (pickle) format

def write_fake_cifar(root, per_batch=6):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng()
    all_data, all_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        entry = {"batch_label": f"training batch {i} of 5", "labels": labels, "data": data,
                 "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]}
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        all_data.append(data)
        all_labels += labels
    test = {"batch_label": "testing batch 1 of 1", "labels": [0, 1], "data": np.zeros((2, 3072), np.uint8),
            "filenames": ["a.png", "b.png"]}
    with open(os.path.join(folder, "test_batch"), "wb") as fh:
        pickle.dump(test, fh, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, fh, protocol=2)
    return np.concatenate(all_data), all_labels, names


def test_cifar10_fake_folder_matches_torchvision(tmp_path, monkeypatch):
    import torchvision

    raw, labels, names = write_fake_cifar(str(tmp_path))
    ds = load_dataset("cifar10", data_root=str(tmp_path))
    assert ds.data.shape == (30, 3, 32, 32) and ds.sample_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.data.min() >= -1 and ds.data.max() <= 1
    assert ds.labels.tolist() == labels
    as_uint8 = ((ds.data + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(as_uint8.reshape(30, -1), torch.from_numpy(raw))
    # torchvision (md5 check bypassed: the files are fake) parses the same files identically
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    tv = torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)
    assert torch.equal(as_uint8.permute(0, 2, 3, 1), torch.from_numpy(tv.data))
    assert tv.targets == labels and tv.classes == names
    # passing the batches folder itself works too; lower resolution on request
    ds16 = load_dataset("cifar10", data_root=str(tmp_path / "cifar-10-batches-py"), resolution=16)
    assert ds16.data.shape == (30, 3, 16, 16) and ds16.sample_shape == (3, 16, 16)
    torch.testing.assert_close(ds16.data.mean((2, 3)), ds.data.mean((2, 3)), atol=1e-5, rtol=0)


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_root=str(tmp_path / "nowhere"))
    assert "nowhere" in str(info.value)
    with pytest.raises(DataError):
        load_dataset("cifar10")
    write_fake_cifar(str(tmp_path))
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_root=str(tmp_path))
    assert "data_batch_3" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_root=str(tmp_path))
    assert "data_batch_3" in str(info.value)


# ----------------------------------------------------------------------------------------
# folder

def test_folder_loader_resize_and_centre_crop(tmp_path):
    # 60x20 image: red | green | blue thirds -> the centre crop is green
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20, 0] = 255
    wide[:, 20:40, 1] = 255
    wide[:, 40:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    # 20x50 (tall) grey image in a subfolder, as JPEG; a greyscale PNG; a BMP
    (tmp_path / "sub").mkdir()
    tall = np.full((50, 20, 3), 200, np.uint8)
    tall[:15] = 0
    tall[35:] = 0
    Image.fromarray(tall).save(tmp_path / "sub" / "b_tall.JPG", quality=95)
    Image.fromarray(np.full((30, 30), 128, np.uint8), mode="L").save(tmp_path / "sub" / "c_grey.png")
    Image.fromarray(np.full((12, 12, 3), 255, np.uint8)).save(tmp_path / "d.bmp")
    (tmp_path / "notes.txt").write_text("not an image")

    ds = load_dataset("folder", data_root=str(tmp_path), resolution=20)
    assert ds.data.shape == (4, 3, 20, 20) and ds.sample_shape == (3, 20, 20)
    assert ds.labels is None and ds.num_classes == 0
    assert ds.data.min() >= -1 and ds.data.max() <= 1
    by_name = sorted(["a_wide.png", "d.bmp", os.path.join("sub", "b_tall.JPG"), os.path.join("sub", "c_grey.png")])
    wide_t = ds.data[by_name.index("a_wide.png")]
    assert torch.equal(wide_t[1], torch.ones(20, 20)) and torch.equal(wide_t[0], -torch.ones(20, 20))
    tall_t = ds.data[by_name.index(os.path.join("sub", "b_tall.JPG"))]
    assert (tall_t - (200 / 127.5 - 1)).abs().max() < 0.05  # centre rows 15..35 of the tall image
    grey_t = ds.data[by_name.index(os.path.join("sub", "c_grey.png"))]
    assert (grey_t - (128 / 127.5 - 1)).abs().max() < 0.02  # grey -> RGB, downscaled
    white_t = ds.data[by_name.index("d.bmp")]
    assert (white_t - 1).abs().max() < 0.02  # upscaled 12 -> 20

    ds8 = load_dataset("folder", data_root=str(tmp_path), resolution=8)
    assert ds8.data.shape == (4, 3, 8, 8)
    w8 = ds8.data[by_name.index("a_wide.png")]
    assert (w8[1, :, 2:6] > 0.9).all() and (w8[0, :, 2:6] < -0.9).all()  # still green in the middle
    assert load_dataset("folder", data_root=str(tmp_path)).data.shape[-1] == 32  # default resolution


def test_folder_errors(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("folder", data_root=str(tmp_path / "absent"))
    assert "absent" in str(info.value)
    with pytest.raises(DataError):
        load_dataset("folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError) as info:
        load_dataset("folder", data_root=str(empty))
    assert "no images" in str(info.value)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(empty / "ok.png")
    (empty / "broken.png").write_bytes(os.urandom(64))
    with pytest.raises(DataError) as info:
        load_dataset("folder", data_root=str(empty), resolution=8)
    assert "broken.png" in str(info.value) and "\n" not in str(info.value)
