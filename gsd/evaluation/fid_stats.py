"""FID as the field computes it, over image files (docs/definitions.md §3.10): reference statistics
(`mu`, `sigma` of Inception pool3 features, EDM's fid.py npz layout), generated images read as
uint8 from a folder or an npz, pytorch-fid's preprocessing (gsd.evaluation.fid.uint8_features),
and KID / precision / recall on the same features.

The library behind `python -m gsd.fid ref|calc` and the FID section of gsd.evaluate.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from gsd.data import load_dataset
from gsd.errors import UsageError
from gsd.evaluation import feature_metrics as fm
from gsd.evaluation.fid import file_sha256
from gsd.image_files import ImageSet, to_uint8
from gsd.util import check_memory, one_line

__all__ = ["FEATURE_DIMS", "METRICS_MAX", "Reference", "statistics", "reference_bytes", "load_reference",
           "dataset_images", "fid_against", "extra_metrics"]

FEATURE_DIMS = 2048
# KID and precision / recall cost O(n^2 F): beyond this many images a side they run on the first
# METRICS_MAX generated images and a seeded subset of the reference features (said in the output)
METRICS_MAX = 10_000
REFERENCE_SUBSET_SEED = 0


@dataclass
class Reference:
    """Reference statistics: mu (D,), sigma (D, D), and the features themselves when kept."""
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    path: str | None = None
    sha256: str | None = None
    description: str = ""

    @property
    def count(self) -> int | None:
        return None if self.features is None else len(self.features)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu and the unbiased covariance of (N, D) features in float64, as pytorch-fid and EDM."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise UsageError(f"statistics need at least 2 images, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def reference_bytes(mu, sigma, features=None) -> bytes:
    """The npz: `mu`, `sigma` (float64, EDM's layout) and, when kept, `features` (float32)."""
    buf = io.BytesIO()
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_reference(path, flag: str = "--ref") -> Reference:
    """Reference statistics from an npz with `mu` (D,) and `sigma` (D, D), D = 2048 (EDM's
    fid.py files, or `python -m gsd.fid ref`); UsageError (one line) otherwise."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file" if not os.path.exists(path) else f"{flag} {path} is not a file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise UsageError(f"{flag} {path} has no {' or '.join(missing)} (it holds "
                                 f"{', '.join(data.files) or 'nothing'}); reference statistics are an npz with mu and "
                                 f"sigma, as python -m gsd.fid ref writes")
            mu, sigma = data["mu"], data["sigma"]
            feats = data["features"] if "features" in data.files else None
    except UsageError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{flag} {path} is not a readable npz file ({one_line(exc, 160)})") from None
    d = FEATURE_DIMS
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise UsageError(f"{flag} {path}: mu has shape {mu.shape} and sigma {sigma.shape}; Inception pool3 "
                         f"statistics are ({d},) and ({d}, {d})")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)
            and np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{flag} {path}: mu and sigma must be finite floating-point arrays")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != d or not np.isfinite(feats).all()):
        raise UsageError(f"{flag} {path}: features has shape {feats.shape}; expected finite (N, {d})")
    digest = file_sha256(path)
    return Reference(mu.astype(np.float64), sigma.astype(np.float64),
                     None if feats is None else feats.astype(np.float64), path=path, sha256=digest,
                     description=f"{path} (sha256 {digest[:16]}...)")


def dataset_images(name: str, data_root=None, resolution=None) -> ImageSet:
    """An engine data set's images as uint8, by the rule generated images are written with
    (gsd.image_files.to_uint8): CIFAR-10 comes back as its own bytes."""
    ds = load_dataset(name, data_root=data_root, resolution=resolution, download=False)
    if len(ds.sample_shape) != 3 or ds.sample_shape[0] not in (1, 3):
        raise UsageError(f"--data {name} holds samples of shape {tuple(ds.sample_shape)}, not images")
    check_memory(ds.data.numel(), f"--data {name} as uint8")
    u8 = np.concatenate([to_uint8(chunk) for chunk in ds.data.split(4096)])
    c, h, w = ds.sample_shape
    return ImageSet(f"--data {name}", len(u8), h, w, c, _array=u8)


def fid_against(features: np.ndarray, ref: Reference) -> float:
    """FID of (N, 2048) features against the reference statistics (float64; the trace of the
    matrix square root from a symmetric eigenproblem, gsd.evaluation.feature_metrics)."""
    mu, sigma = statistics(features)
    return fm.frechet_distance((mu, sigma), (ref.mu, ref.sigma), moments=True)


def extra_metrics(f_gen: np.ndarray, f_ref: np.ndarray, *, max_n: int = METRICS_MAX) -> dict:
    """KID with its standard error and precision / recall (k = 3) between generated and reference
    features: over the first max_n generated and a seeded subset of max_n reference features."""
    g = np.asarray(f_gen, dtype=np.float64)[:max_n]
    r = np.asarray(f_ref, dtype=np.float64)
    if len(r) > max_n:
        r = r[np.sort(np.random.default_rng(REFERENCE_SUBSET_SEED).permutation(len(r))[:max_n])]
    if min(len(g), len(r)) <= fm.PR_K:
        raise UsageError(f"KID and precision / recall need more than {fm.PR_K} images a side, got {len(g)} generated "
                         f"and {len(r)} reference")
    kid, kid_se = fm.kid(g, r)
    out = {"kid": kid, "kid_stderr": kid_se, "generated_used": len(g), "reference_used": len(r)}
    out.update(fm.precision_recall(r, g))
    return out
