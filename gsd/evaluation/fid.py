"""FID with pytorch-fid's Inception weights (docs/definitions.md §3.6, §3.10).

The Inception network is built here without `pytorch_fid.inception.fid_inception_v3` (which
fetches its weights on every construction): it is torchvision's Inception-v3 architecture
(1008 classes, no aux head, no init) with the blocks that pytorch-fid patches to match
TensorFlow's FID graph replaced by pytorch-fid's own `FIDInceptionA/C/E_1/E_2` classes, then
loaded from a local state dict:

- `--fid-weights PATH`, or
- the torch hub cache, `<torch.hub.get_dir()>/checkpoints/pt_inception-2015-12-05-*.pth`
  (where pytorch-fid keeps the file), into which `fid_weights(download=True)` downloads it
  from pytorch-fid's release when it is missing, as pytorch-fid does. Offline, that is one
  line naming the file and where to put it; no other feature space is ever used instead.

Features: the 2048-d output of the final average pool ("pool3"), as pytorch-fid.
`uint8_features` is pytorch-fid's preprocessing of image files, from uint8 pixels: /255 to
[0, 1] float32 (torchvision's ToTensor), greyscale replicated to RGB, bilinear resize to
299x299 (align_corners=False), then 2x - 1. `FIDInceptionFeatures.forward` takes float
images in [-1, 1] instead (PPL's feature space): clamped, replicated to 3 channels, resized.
Frechet distance: `fid_from_features` (float64).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gsd.errors import UsageError
from gsd.progress import progress_bar
from gsd.util import one_line
from gsd.models.checkpoint import build_on_meta, check_state_dict

__all__ = ["FID_WEIGHTS_PATTERN", "FID_WEIGHTS_NAME", "FID_WEIGHTS_URL", "FID_FEATURE_NAME", "FID_BOOTSTRAPS",
           "FID_PREPROCESSING", "hub_checkpoint_dir", "locate_fid_weights", "fid_weights", "file_sha256",
           "build_fid_inception_architecture", "FIDInceptionFeatures", "load_fid_inception",
           "inception_features", "uint8_features", "fid_from_features", "compute_fid"]

FID_WEIGHTS_PATTERN = "pt_inception-2015-12-05-*.pth"
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_PREPROCESSING = ("uint8 pixels (generated images: EDM's x * 127.5 + 128, clipped, truncated); pytorch-fid's: "
                     "/255, greyscale to RGB, bilinear resize to 299x299, 2x - 1")
DOWNLOAD_TIMEOUT_S = 60
FID_FEATURE_NAME = "pytorch-fid InceptionV3 pool3 (2048-d)"
FID_RESOLUTION = 299
# Resamples of FID's bootstrap interval: each costs an SVD of an n_a x n_b matrix (seconds at
# n = 2000 on a CPU), so fewer than the 200 of the low-dimensional feature spaces; the 2.5/97.5%
# quantiles of 50 resamples are rough (interpolated between the 2nd/49th order statistics).
FID_BOOTSTRAPS = 50


def hub_checkpoint_dir() -> Path:
    """Where torch hub (and so pytorch-fid) caches downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def locate_fid_weights(explicit=None) -> tuple[Path | None, str | None]:
    """(path, None) when Inception weights are at hand, else (None, reason).

    `explicit` (the --fid-weights value) must name an existing file: UsageError otherwise
    (a mistyped path is an error, not a silent fallback to "unavailable").
    """
    if explicit is not None:
        p = Path(explicit)
        if not p.exists():
            raise UsageError(f"--fid-weights {explicit}: no such file")
        if not p.is_file():
            raise UsageError(f"--fid-weights {explicit}: not a file")
        return p, None
    pattern = hub_checkpoint_dir() / FID_WEIGHTS_PATTERN
    found = sorted(glob.glob(str(pattern)))
    found = [f for f in found if os.path.isfile(f)]
    if found:
        return Path(found[-1]), None
    return None, (f"pytorch-fid Inception weights not found: no file matches {pattern} and no --fid-weights "
                  f"was given")


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest` (a temporary name in its folder until it is checked and complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as fh:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                fh.write(chunk)
        _check_weights_file(tmp)  # an error page saved as .pth must not sit in the cache
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def fid_weights(explicit=None, *, download: bool = True) -> Path:
    """The Inception weights file: --fid-weights (must exist), else the torch hub cache, else (with
    download) pytorch-fid's release downloaded into the hub cache. UsageError (one line) naming
    the file and where it goes when none is at hand."""
    path, reason = locate_fid_weights(explicit)
    if path is not None:
        return path
    dest = hub_checkpoint_dir() / FID_WEIGHTS_NAME
    where = (f"put {FID_WEIGHTS_NAME} (from {FID_WEIGHTS_URL}) in {dest.parent}, or pass --fid-weights PATH")
    if not download:
        raise UsageError(f"{reason}: {where}")
    print(f"downloading pytorch-fid's Inception weights to {dest}", file=sys.stderr, flush=True)
    try:
        _download(FID_WEIGHTS_URL, dest)
    except UsageError as exc:
        raise UsageError(f"the downloaded Inception weights are not usable ({exc}); {where}") from None
    except (OSError, ValueError) as exc:  # URLError, timeouts and HTTP errors are OSErrors
        raise UsageError(f"pytorch-fid's Inception weights are not in {dest.parent} and cannot be downloaded "
                         f"({one_line(getattr(exc, 'reason', exc), 120)}): {where}") from None
    return dest


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def build_fid_inception_architecture() -> nn.Module:
    """pytorch-fid's FID Inception-v3 layout, randomly initialised, without downloading anything."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class FIDInceptionFeatures(nn.Module):
    """pool3 features of the FID Inception: the same layer sequence as pytorch-fid's
    `InceptionV3(output_blocks=[3])`, taking images in [-1, 1]."""

    _LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool",
               "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool",
               "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
               "Mixed_7a", "Mixed_7b", "Mixed_7c")

    def __init__(self, inception: nn.Module, resolution: int = FID_RESOLUTION):
        super().__init__()
        self.inception = inception
        self.resolution = int(resolution)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FID needs images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
        x = torch.nan_to_num(x, nan=0.0).clamp(-1.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool3(self.preprocess(x))

    def forward_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """pool3 features of (N, H, W, C) uint8 images, C = 1 or 3: pytorch-fid's preprocessing of
        image files, step for step (ToTensor's /255, resize in [0, 1], then 2x - 1)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(f"expected (N, H, W, 1 or 3) uint8 images, got {tuple(images.shape)} {images.dtype}")
        x = images.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        if x.shape[1] == 1:  # PIL's convert('RGB') of a greyscale image repeats it
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.pool3(2 * x - 1)

    def pool3(self, h: torch.Tensor) -> torch.Tensor:
        for name in self._LAYERS:
            if name == "maxpool":
                h = F.max_pool2d(h, kernel_size=3, stride=2)
            else:
                h = getattr(self.inception, name)(h)
        return F.adaptive_avg_pool2d(h, (1, 1)).flatten(1)


def _check_weights_file(path) -> dict:
    """The state dict in `path` if it is pytorch-fid's Inception; UsageError (one line) otherwise."""
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        msg = one_line(exc, 200)
        raise UsageError(f"FID weights {path} are not a readable torch state dict ({msg})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"FID weights {path} do not hold a state dict of tensors")
    net = build_on_meta(build_fid_inception_architecture)  # names and shapes only, no memory
    check_state_dict(net.state_dict(), state, f"FID weights {path} are not pytorch-fid's Inception")
    return state


def load_fid_inception(path, device="cpu") -> FIDInceptionFeatures:
    """The feature network with the state dict in `path` (pytorch-fid's .pth); UsageError on a bad file."""
    state = _check_weights_file(path)
    net = build_fid_inception_architecture()
    net.load_state_dict(state, strict=True)
    return FIDInceptionFeatures(net).to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(model: FIDInceptionFeatures, images: torch.Tensor, batch: int = 50) -> np.ndarray:
    """(N, 2048) float64 pool3 features of images in [-1, 1]."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        out.append(model(images[i:i + batch].to(dev)).double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def uint8_features(model: FIDInceptionFeatures, batches, *, total: int | None = None, desc: str = "Inception features",
                   progress: bool = False) -> np.ndarray:
    """(N, 2048) float64 pool3 features of uint8 NHWC image batches (numpy arrays), as
    pytorch-fid computes them for image files."""
    dev = next(model.parameters()).device
    out = []
    bar = progress_bar(total=total, desc=desc, enabled=progress)
    try:
        for b in batches:
            out.append(model.forward_uint8(torch.from_numpy(np.ascontiguousarray(b)).to(dev)).double().cpu())
            bar.update(len(b))
    finally:
        bar.close()
    return torch.cat(out).numpy() if out else np.zeros((0, 2048))


def fid_from_features(a, b) -> float:
    """Frechet distance between the Gaussians fitted (unbiased covariance) to two feature sets.

    `||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`, the value of
    `gsd.evaluation.feature_metrics.frechet_distance` (and of pytorch-fid up to its sqrtm round-off), computed
    through the centred samples: with `S = X^T X / (n - 1)`, the eigenvalues of `S_a S_b` are
    the squared singular values of `X_a X_b^T / sqrt((n_a - 1)(n_b - 1))`, so the trace term is
    that matrix's nuclear norm. No D x D matrix (D = 2048) is formed, so it is exact and fast
    when the sample counts are below D, and no square root of a singular matrix is needed.
    """
    xa = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    xb = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"feature dimensions differ: {xa.shape[1]} vs {xb.shape[1]}")
    na, nb = len(xa), len(xb)
    if na < 2 or nb < 2:
        raise ValueError("need at least 2 samples on each side")
    mu_a, mu_b = xa.mean(0), xb.mean(0)
    ca, cb = xa - mu_a, xb - mu_b
    tr_a = float((ca * ca).sum() / (na - 1))
    tr_b = float((cb * cb).sum() / (nb - 1))
    cross = (ca @ cb.T) / math.sqrt((na - 1) * (nb - 1))
    tr_sqrt = float(np.linalg.svd(cross, compute_uv=False).sum())
    diff = mu_a - mu_b
    return max(float(diff @ diff) + tr_a + tr_b - 2.0 * tr_sqrt, 0.0)


def compute_fid(model: FIDInceptionFeatures, images_a: torch.Tensor, images_b: torch.Tensor,
                batch: int = 50) -> float:
    """FID between two image sets (each (N, C, H, W) in [-1, 1])."""
    return fid_from_features(inception_features(model, images_a, batch), inception_features(model, images_b, batch))
