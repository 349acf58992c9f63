"""Data sets (docs/definitions.md §3.5): digits, gmm, shapes, cifar10, folder.

Images are float32 (N, C, H, W) in [-1, 1]; the Gaussian mixture is float32 (N, dim).
`GaussianMixture` also gives the exact EDM denoiser of the mixture (posterior mean of
x0 given x0 + sigma * eps), which makes `gmm` a data set with a perfect teacher.
"""

from __future__ import annotations

import math
import os
import stat
import pickle
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from gsd.errors import DataError
from gsd.util import one_line

DATASETS = ("digits", "gmm", "shapes", "cifar10", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
GMM_TRAIN_SAMPLES = 20_000


# ----------------------------------------------------------------------------------------
# Gaussian mixture with its exact denoiser.

class GaussianMixture:
    """Isotropic Gaussian mixture: sum_k w_k N(mu_k, s_k^2 I).

    means (K, dim), weights (K,) (normalised here), stds (K,) > 0. Stored in float64.
    """

    def __init__(self, means, weights=None, stds=0.05):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError("means must be (K, dim)")
        k = means.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        if stds.numel() == 1:
            stds = stds.expand(k).clone()
        if weights.shape != (k,) or stds.shape != (k,):
            raise ValueError("weights and stds need one entry per component")
        if (weights < 0).any() or weights.sum() <= 0 or (stds <= 0).any():
            raise ValueError("weights must be >= 0 (not all 0) and stds > 0")
        self.means = means
        self.weights = weights / weights.sum()
        self.stds = stds

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def std(self) -> float:
        """Per-coordinate standard deviation of the mixture (averaged over coordinates)."""
        mu = self.mean()
        second = (self.weights * ((self.means - mu) ** 2).sum(1)).sum() / self.dim + \
            (self.weights * self.stds ** 2).sum()
        return float(second.sqrt())

    def to_dict(self) -> dict:
        return {"means": self.means.tolist(), "weights": self.weights.tolist(), "stds": self.stds.tolist()}

    def sample(self, n: int, generator: torch.Generator | None = None):
        """(x float32 (n, dim), component ids int64 (n,)) drawn with `generator` (CPU)."""
        ids = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[ids] + self.stds[ids, None] * noise
        return x.to(torch.float32), ids

    def _log_resp(self, x64: torch.Tensor, var: torch.Tensor):
        """Unnormalised log responsibilities (n, K) for noisy points with total variance var (n, K)."""
        means = self.means.to(x64.device)
        sq = ((x64[:, None, :] - means[None]) ** 2).sum(2)  # (n, K), no cancellation
        d = self.dim
        return (self.weights.to(x64.device).log()[None] - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var))

    def _var(self, sigma, n: int, device) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(n)
        if sigma.numel() != n:
            raise ValueError(f"sigma has {sigma.numel()} elements for {n} points")
        return self.stds.to(device)[None] ** 2 + sigma[:, None] ** 2, sigma

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log density (float64, (n,)) of the mixture convolved with N(0, sigma^2 I)."""
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        var, _ = self._var(sigma, x64.shape[0], x64.device)
        return torch.logsumexp(self._log_resp(x64, var), dim=1)

    def responsibilities(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        var, _ = self._var(sigma, x64.shape[0], x64.device)
        return torch.softmax(self._log_resp(x64, var), dim=1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x0 | x0 + sigma eps = x], exact; float64 inside, returned in x's dtype.

        sigma: float, 0-dim or with one element per point. Differentiable w.r.t. x.
        """
        shape, dtype = x.shape, x.dtype
        x64 = x.reshape(shape[0], -1).to(torch.float64)
        var, _ = self._var(sigma, x64.shape[0], x64.device)
        resp = torch.softmax(self._log_resp(x64, var), dim=1)  # (n, K)
        means = self.means.to(x64.device)
        shrink = self.stds.to(x64.device)[None] ** 2 / var  # (n, K): s_k^2 / (s_k^2 + sigma^2)
        # sum_k r_k [mu_k + shrink_k (x - mu_k)] = sum_k r_k (1 - shrink_k) mu_k + (sum_k r_k shrink_k) x
        out = (resp * (1 - shrink)) @ means + (resp * shrink).sum(1, keepdim=True) * x64
        out_dtype = dtype if dtype.is_floating_point else torch.float32
        return out.to(out_dtype).reshape(shape)


def default_gmm(num_modes: int = 8, radius: float = 0.7, std: float = 0.05) -> GaussianMixture:
    """8 equal-weight modes on a circle of radius 0.7 in 2-D, std 0.05 each.

    Per-coordinate std of the data: sqrt(0.7^2/2 + 0.05^2) = 0.4975 (sigma_data 0.5 fits);
    neighbouring modes are 2 * 0.7 * sin(pi/8) = 0.536 apart, i.e. ~10.7 component stds.
    """
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, None, std)


class GMMDenoiser(nn.Module):
    """The exact EDM denoiser of a `GaussianMixture`: forward(x, sigma, class_labels=None)."""

    def __init__(self, mixture: GaussianMixture, sigma_data: float | None = None):
        super().__init__()
        self.mixture = mixture
        self.sigma_data = float(mixture.std() if sigma_data is None else sigma_data)
        self.label_dim = 0
        self.sample_shape = (mixture.dim,)

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        if torch.is_tensor(sigma):
            sigma = sigma.reshape(-1)
        return self.mixture.denoise(x, sigma)


# ----------------------------------------------------------------------------------------
# The data set container and loaders.

@dataclass
class Dataset:
    name: str
    data: torch.Tensor
    labels: Optional[torch.Tensor]
    num_classes: int
    sample_shape: tuple
    mixture: Optional[GaussianMixture] = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.data.shape[0]


def _check_resolution(name: str, resolution, native: int | None):
    if resolution is not None and resolution != native:
        raise DataError(f"--resolution {resolution} is not supported for --dataset {name}"
                        + (f" (its images are {native}x{native})" if native else ""))


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)  # (1797, 8, 8), 0..16
    data = (images / 8.0 - 1.0).unsqueeze(1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return Dataset("digits", data, labels, 10, (1, 8, 8), None, {"source": "sklearn.datasets.load_digits"})


def load_gmm(num_samples: int = GMM_TRAIN_SAMPLES, seed: int = 0) -> Dataset:
    mixture = default_gmm()
    gen = torch.Generator().manual_seed(seed)
    x, ids = mixture.sample(num_samples, generator=gen)
    return Dataset("gmm", x, ids, mixture.num_components, (mixture.dim,), mixture,
                   {"std": mixture.std()})


SHAPES_SEED = 0  # the fixed training set of --dataset shapes


def check_shapes_settings(resolution, kinds) -> tuple[int, int]:
    """(resolution, kinds) of --dataset shapes, refused in one line outside the renderer's range."""
    from gsd.shapes import DEFAULT_RESOLUTION, MAX_KINDS, RESOLUTIONS
    res = DEFAULT_RESOLUTION if resolution is None else resolution
    if isinstance(res, bool) or not isinstance(res, (int, np.integer)) or not RESOLUTIONS[0] <= res <= RESOLUTIONS[1]:
        raise DataError(f"--resolution {res!r} is outside --dataset shapes' range [{RESOLUTIONS[0]}, {RESOLUTIONS[1]}]")
    if isinstance(kinds, bool) or not isinstance(kinds, (int, np.integer)) or not 1 <= kinds <= MAX_KINDS:
        raise DataError(f"--shapes-kinds must be an integer in [1, {MAX_KINDS}] (the renderer's kinds), got {kinds!r}")
    return int(res), int(kinds)


def load_shapes(resolution=None, kinds: int = 3) -> Dataset:
    """The rendered shapes (gsd.shapes): TRAIN_IMAGES images of a fixed seed, grey, their
    factors in info["factors"] (continuous, (N, 5)) and the kind as the class label (none for
    one kind)."""
    from gsd.shapes import TRAIN_IMAGES, render, sample_factors
    res, kinds = check_shapes_settings(resolution, kinds)
    factors, kind = sample_factors(TRAIN_IMAGES, kinds, torch.Generator().manual_seed(SHAPES_SEED))
    data = render(factors, kind, res)
    labels, classes = (kind, kinds) if kinds > 1 else (None, 0)
    return Dataset("shapes", data, labels, classes, (1, res, res), None,
                   {"factors": factors, "kinds": kinds, "kind": kind})


# ----------------------------------------------------------------------------------------
# CIFAR-10 python batches are pickles. A plain pickle.load would run whatever the file asks
# for, so they are read by an unpickler that knows only what those batches hold: dicts,
# lists, str/bytes, ints, floats and numeric numpy arrays. Arrays are rebuilt here from their
# dtype string, shape and raw bytes; numpy's own reconstruction code is never handed to the
# unpickler.

class _CifarRefused(DataError):
    """The file references something a CIFAR batch does not contain (nothing from it ran)."""


class _Frozen(type):
    # BUILD with slot state would otherwise set attributes on the stand-in classes themselves
    def __setattr__(cls, name, value):
        raise _CifarRefused(f"the pickle tried to set {name!r} on {cls.__name__}")


class _DType(metaclass=_Frozen):
    """numpy.dtype(spec, align, copy) + BUILD(state): only the spec and the byte order are kept."""

    __slots__ = ("spec", "byteorder")

    def __init__(self, spec, *_flags):
        if not isinstance(spec, str):
            raise _CifarRefused("numpy.dtype with a non-string spec")
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "byteorder", "=")
        self.resolve()  # refuse non-numeric dtypes at once

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            object.__setattr__(self, "byteorder", state[1])

    def __setattr__(self, name, value):
        raise _CifarRefused("the pickle tried to modify a dtype")

    def resolve(self) -> np.dtype:
        try:
            dt = np.dtype(self.spec)
        except TypeError:
            raise _CifarRefused(f"numpy dtype {self.spec!r}") from None
        if dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
            raise _CifarRefused(f"numpy dtype {dt} (only numeric dtypes are allowed)")
        return dt.newbyteorder(self.byteorder) if self.byteorder in "<>" else dt


def _make_array(raw, dtype, shape, fortran: bool) -> np.ndarray:
    if not isinstance(dtype, _DType):
        raise _CifarRefused(f"numpy array with a dtype of type {type(dtype).__name__}")
    dt = dtype.resolve()
    if isinstance(raw, str):  # Python 2 pickles read with encoding='latin1'
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise _CifarRefused(f"numpy array data of type {type(raw).__name__}")
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _CifarRefused(f"numpy array with shape {shape!r}")
    count = math.prod(shape)
    if count * dt.itemsize != len(raw):
        raise _CifarRefused(f"numpy array of shape {shape} and dtype {dt} with {len(raw)} bytes of data")
    return np.frombuffer(bytes(raw), dtype=dt, count=count).reshape(shape, order="F" if fortran else "C")


class _ArrayStub(metaclass=_Frozen):
    """What numpy's _reconstruct(ndarray, shape, typecode) returns; BUILD(state) fills it in."""

    __slots__ = ("array",)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _CifarRefused("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        object.__setattr__(self, "array", _make_array(raw, dtype, shape, bool(fortran)))

    def __setattr__(self, name, value):
        raise _CifarRefused("the pickle tried to modify an array")


class _NDArrayMarker(metaclass=_Frozen):
    """Inert stand-in for numpy.ndarray: only an argument of _reconstruct."""

    __slots__ = ()


_NDARRAY = _NDArrayMarker()


def _np_reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:  # an ndarray subclass would bring its own __setstate__
        raise _CifarRefused("numpy _reconstruct of something other than a plain ndarray")
    return _ArrayStub()


def _np_frombuffer(buf, dtype, shape, order="C"):
    return _make_array(buf, dtype, tuple(shape) if isinstance(shape, (tuple, list)) else shape, order == "F")


def _codecs_encode(text, encoding="utf-8"):
    # protocols 0-2 store bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _CifarRefused("_codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


# The globals numpy's array pickles reference: numpy.core.* (numpy 1.x, and the original
# CIFAR files written by Python 2) and numpy._core.* (numpy 2.x); _frombuffer is protocol 5.
_CIFAR_GLOBALS = {
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
    "numpy.core.numeric._frombuffer": _np_frombuffer,
    "numpy._core.numeric._frombuffer": _np_frombuffer,
    "numpy.ndarray": _NDARRAY,
    "numpy.dtype": _DType,
    "_codecs.encode": _codecs_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        path = f"{module}.{name}"
        if path in _CIFAR_GLOBALS:
            return _CIFAR_GLOBALS[path]
        raise _CifarRefused(f"refusing to load {path}: CIFAR batches hold only lists, strings and numeric "
                            f"arrays (nothing from the file was run)")

    def persistent_load(self, pid):
        raise _CifarRefused("refusing a persistent id: CIFAR batches have none (nothing from the file was run)")


def _finish(obj, depth: int = 0):
    """Replace the array stubs by their arrays (CIFAR batches nest two levels deep)."""
    if depth > 50:
        raise _CifarRefused("nesting too deep for a CIFAR batch")
    if isinstance(obj, _ArrayStub):
        try:
            return obj.array
        except AttributeError:
            raise _CifarRefused("numpy array without its data") from None
    if isinstance(obj, dict):
        return {k: _finish(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finish(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finish(v, depth + 1) for v in obj)
    if isinstance(obj, (_DType, _NDArrayMarker)) or callable(obj):
        raise _CifarRefused(f"a stray {type(obj).__name__} in the data")
    return obj


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = _finish(_CifarUnpickler(fh, encoding="latin1").load())
    except _CifarRefused as exc:
        raise DataError(f"CIFAR-10 file {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure is a damaged file
        raise DataError(f"cannot read CIFAR-10 file {path}: {type(exc).__name__}: "
                        f"{one_line(exc)}") from None
    if not isinstance(data, dict):
        raise DataError(f"CIFAR-10 file {path} holds a {type(data).__name__}, expected a dict")
    return data


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_image_resolution(resolution, count: int, what: str) -> int:
    """The resolution as an int, refused (with the reason) when not positive or when `count`
    float32 RGB images of that size would not fit in this machine's memory."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise DataError(f"--resolution must be an integer, got {resolution!r}")
    res = int(resolution)
    if res < 1:
        raise DataError(f"--resolution must be positive, got {res}")
    need = count * 3 * res * res * 4
    total = _memory_bytes()
    if total is not None and need > total:
        raise DataError(f"--resolution {res}: {count} {what} at 3x{res}x{res} would take {need / 1e9:.1f} GB as "
                        f"float32, more than this machine's {total / 1e9:.1f} GB of memory")
    return res


def _check_root(root: str, what: str, hint: str = "") -> None:
    if not os.path.exists(root):
        raise DataError(f"{what} {root} does not exist{hint}")
    if not os.path.isdir(root):
        raise DataError(f"{what} {root} is not a directory")


def _cifar_folder(root: str) -> str:
    for cand in (os.path.join(root, CIFAR10_DIR), root):
        if all(os.path.isfile(os.path.join(cand, f)) for f in CIFAR10_TRAIN_FILES):
            return cand
    return os.path.join(root, CIFAR10_DIR)


def _resize_images(data: torch.Tensor, resolution: int) -> torch.Tensor:
    if data.shape[-1] == resolution:
        return data
    size = data.shape[-1]
    out = []
    for chunk in data.split(2048):
        if size % resolution == 0:  # integer downscale: box filter (keeps every block's mean)
            out.append(torch.nn.functional.interpolate(chunk, size=(resolution, resolution), mode="area"))
        else:
            out.append(torch.nn.functional.interpolate(chunk, size=(resolution, resolution), mode="bicubic",
                                                       antialias=True, align_corners=False))
    return torch.cat(out).clamp_(-1, 1)


def load_cifar10(data_root, resolution=None, download: bool = False) -> Dataset:
    """CIFAR-10 train split from `data_root` (which holds cifar-10-batches-py/, or is it)."""
    if data_root is None:
        raise DataError("--dataset cifar10 needs --data-root (the folder holding cifar-10-batches-py)")
    root = os.path.expanduser(os.fspath(data_root))
    if download:
        try:
            import torchvision

            torchvision.datasets.CIFAR10(root, train=True, download=True)
        except Exception as exc:
            raise DataError(f"could not download CIFAR-10 into {root}: {one_line(exc)}") from None
    _check_root(root, "CIFAR-10 root", " (pass --download to fetch it)")
    folder = _cifar_folder(root)
    missing = [f for f in CIFAR10_TRAIN_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"CIFAR-10 not found under {root}: missing {', '.join(missing)} in {folder} "
                        "(pass --download to fetch it)")
    if resolution is not None:
        _check_image_resolution(resolution, 1, "image")  # the cheap checks before reading anything
    arrays, labels = [], []
    for name in CIFAR10_TRAIN_FILES:
        entry = _unpickle(os.path.join(folder, name))
        try:
            data = np.asarray(entry["data"], dtype=np.uint8)
            lab = entry["labels"] if "labels" in entry else entry["fine_labels"]
            arrays.append(data.reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in lab)
        except Exception as exc:
            raise DataError(f"CIFAR-10 file {os.path.join(folder, name)} is malformed "
                            f"({one_line(exc)})") from None
    data = torch.from_numpy(np.concatenate(arrays)).to(torch.float32) / 127.5 - 1.0
    if data.shape[0] != len(labels):
        raise DataError(f"CIFAR-10 under {folder} has {data.shape[0]} images but {len(labels)} labels")
    label_names = None
    meta_path = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta_path):
        label_names = _unpickle(meta_path).get("label_names")
    res = 32 if resolution is None else _check_image_resolution(resolution, data.shape[0], "CIFAR-10 images")
    data = _resize_images(data, res)
    return Dataset("cifar10", data.contiguous(), torch.tensor(labels, dtype=torch.int64), 10, (3, res, res), None,
                   {"root": folder, "label_names": label_names})


class RealSamples:
    """Real samples for SiDA's discriminator: a data set's samples drawn uniformly with
    replacement, or, for a data set with a known mixture (gmm), fresh draws from it. All
    randomness comes from the caller's generator (the run's own, so --resume draws the same)."""

    def __init__(self, dataset: Dataset, conditional: bool):
        if conditional and (dataset.labels is None or not dataset.num_classes):
            raise DataError(f"--dataset {dataset.name} has no labels for a class-conditional generator")
        self.dataset = dataset
        self.conditional = conditional

    def sample(self, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x (n, *sample_shape) float32, labels (n,) int64 or None) on `device`."""
        ds = self.dataset
        dev = generator.device
        if ds.mixture is not None:
            m = ds.mixture
            ids = torch.multinomial(m.weights.to(dev), n, replacement=True, generator=generator)
            noise = torch.randn(n, m.dim, generator=generator, device=dev, dtype=torch.float64)
            x = m.means.to(dev)[ids] + m.stds.to(dev)[ids, None] * noise
            return x.to(device=device, dtype=torch.float32), None
        idx = torch.randint(0, len(ds), (n,), generator=generator, device=dev).cpu()
        labels = ds.labels[idx].to(device) if self.conditional else None
        return ds.data[idx].to(device=device, dtype=torch.float32), labels


def _list_images(root: str) -> list[str]:
    """Image files under root, sorted per folder; hidden files and hidden folders (names starting
    with '.', e.g. .git/) are skipped. Symbolic links are followed, but every real folder and
    every real file is taken once: a link loop (self -> .) or two links to the same place would
    otherwise repeat images (or, with two loops, never end). Anything named as an image that is
    not a regular file (a pipe, which would block the reader forever, or a device) is refused."""
    found, seen_dirs, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in seen_dirs)
        for fname in sorted(filenames):
            if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                path = os.path.join(dirpath, fname)
                try:
                    regular = stat.S_ISREG(os.stat(path).st_mode)
                except OSError as exc:
                    raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
                if not regular:
                    raise DataError(f"image folder {root}: {path} is not a regular file (a pipe or a device); "
                                    f"move it out of the folder")
                real_file = os.path.realpath(path)
                if real_file not in seen_files:
                    seen_files.add(real_file)
                    found.append(path)
    return found


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# transparent pixels are composited onto this background (docs/definitions.md §3.5)
ALPHA_BACKGROUND = (255, 255, 255)


def _to_rgb_or_grey_float(img, path: str):
    """An 8-bit RGB image, or a float image of values in [0, 255] for deeper integer images."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 65535:
            raise DataError(f"image {path} has integer values outside 0..65535 (unsupported)")
        # a declared 16-bit image keeps its scale; a 32-bit container says nothing of the depth of
        # its values, so its range decides: up to 255 it holds 8-bit values, else 16-bit ones
        full = 255.0 if img.mode == "I" and high <= 255 else 65535.0
        return Image.fromarray((values * (255.0 / full)).astype(np.float32), mode="F")
    if img.mode == "F":
        raise DataError(f"image {path} is a floating-point image (mode F): its value range is unknown, "
                        f"convert it to 8 or 16 bits")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _load_image(path: str, resolution: int) -> np.ndarray:
    """(R, R, 3) float32 in [0, 255]: EXIF orientation applied, transparency composited onto
    ALPHA_BACKGROUND, the centred square of the shorter side resampled to R x R.

    16-bit greyscale images keep their full range (scaled by 255/65535); converting them to
    8-bit RGB the plain way would clip every value above 255 to white. The square is resampled
    straight from the source (PIL's resize box), so a long thin image costs no more memory than
    its own pixels (resizing it whole first made a 1x300000 PNG take 1.4 GB at R = 32)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.draft("RGB", (resolution, resolution))  # cheap JPEG downscale, never below target
            img = ImageOps.exif_transpose(img)
            img = _to_rgb_or_grey_float(img, path)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            box = (left, top, left + side, top + side)
            if side == resolution:
                img = img.crop(box)
            else:
                img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
            out = np.asarray(img, dtype=np.float32)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"cannot read image {path}: out of memory at resolution {resolution}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {one_line(exc)}") from None
    if out.ndim == 2:  # the 16-bit path is single-channel: grey -> RGB
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.clip(out, 0.0, 255.0)  # bicubic overshoot in the float path


def load_folder(data_root, resolution=None) -> Dataset:
    """Every image under `data_root` (recursive), RGB, shorter side resized, centre-cropped."""
    if data_root is None:
        raise DataError("--dataset folder needs --data-root (a folder of images)")
    root = os.path.expanduser(os.fspath(data_root))
    _check_root(root, "image folder")
    if resolution is not None:
        _check_image_resolution(resolution, 1, "image")  # the cheap checks before walking the folder
    files = _list_images(root)
    if not files:
        raise DataError(f"image folder {root} holds no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    res = 32 if resolution is None else _check_image_resolution(resolution, len(files), "images")
    data = torch.empty(len(files), 3, res, res)
    for i, path in enumerate(files):
        data[i] = torch.from_numpy(_load_image(path, res)).permute(2, 0, 1) / 127.5 - 1.0
    return Dataset("folder", data, None, 0, (3, res, res), None, {"root": root, "files": len(files)})


def load_dataset(name: str, data_root=None, resolution=None, download: bool = False, shapes_kinds: int = 3) -> Dataset:
    """Load a data set by name (docs/definitions.md §3.5); DataError with a one-line message on failure."""
    if name == "shapes":
        return load_shapes(resolution, shapes_kinds)
    if name == "digits":
        _check_resolution(name, resolution, 8)
        return load_digits()
    if name == "gmm":
        _check_resolution(name, resolution, None)
        return load_gmm()
    if name == "cifar10":
        return load_cifar10(data_root, resolution, download)
    if name == "folder":
        return load_folder(data_root, resolution)
    raise DataError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
