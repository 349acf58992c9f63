"""Evaluation pieces shared by `gsd.train`, `gsd.evaluate`, `gsd.experiments`, `gsd.edit`.

Everything here is a plain function of tensors / arrays (docs/definitions.md §3.6):

- `frechet_distance`: Frechet distance between two feature sets (or their moments).
- `sliced_wasserstein`, `mmd`, `mode_coverage`: distances to a known distribution (gmm).
- `DigitsClassifier`, `digits_classifier`: a small CNN trained once on the digits data and
  cached; its penultimate layer is the feature space of the digits Frechet distance
  (reported as "Frechet distance in digits-CNN features", never as FID).
- `isometry_defect`: the optimal-scale isometry loss of a generator on held-out latents;
  `local_isometry_defect`: the same loss over anchors and their sphere neighbours only;
  `local_defect_shares`: that loss split into each neighbourhood's share.
- `measure_latency`: synchronised median wall time of a callable, warm-up excluded.
- The evaluation core, one public function per section, shared by gsd.train's end-of-run
  evaluation (`evaluate_distillation`) and gsd.evaluate (`evaluate.evaluate_loaded`):
  `evaluation_latents` / `batched` (samples), `distribution_section` (FD with its bootstrap
  interval, KID, precision / recall, noise floors; `mixture_section` for gmm, with NLL and
  mode-weight error), `geometry_section` (isometry defects), `latency_section`; and
  `summary_rows`, the text of the sample-quality table with "within noise" labels.
  KID, precision / recall and the bootstrap are in `gsd.evaluation.feature_metrics`.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gsd.data import load_dataset
from gsd.errors import UsageError
from gsd.evaluation import feature_metrics as fm
from gsd.evaluation.feature_metrics import as_numpy64, feature_moments, frechet_distance
from gsd.evaluation.feature_metrics import within_noise
from gsd.evaluation.fid import FID_FEATURE_NAME
from gsd.evaluation.ppl import float64_copy
from gsd.progress import progress_bar
from gsd.sampling.samplers import heun_nfe, heun_sample, latents_for_seeds
from gsd.sampling.seeds import BLOCK, blocked_forward
from gsd.util import cache_dir as default_cache_dir, format_value

__all__ = [
    "frechet_distance", "feature_moments", "sliced_wasserstein", "mmd", "mode_coverage",
    "DigitsClassifier", "digits_classifier", "train_digits_classifier", "classifier_features",
    "isometry_defect", "measure_latency", "default_cache_dir", "DIGITS_FEATURE_NAME", "local_isometry_defect",
    "local_defect_shares",
    "neighbour_latents", "LOCAL_ISOMETRY", "batched", "class_labels", "evaluation_latents", "one_step_samples",
    "latency_section",
    "geometry_section", "local_isometry_settings", "sample_quality", "real_noise_floor", "mixture_section",
    "mixture_metrics", "distribution_section", "FeatureSpace", "noise_verdict", "summary_rows",
    "evaluate_distillation",
]

DIGITS_FEATURE_NAME = "digits-cnn-penultimate-64"


def as_numpy64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- gmm metrics

def _quantiles(sorted_cols: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear-interpolated quantiles q of each column of an already sorted (m, P) array."""
    m = sorted_cols.shape[0]
    pos = q * (m - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, m - 1)
    frac = (pos - lo)[:, None]
    return sorted_cols[lo] * (1 - frac) + sorted_cols[hi] * frac


def sliced_wasserstein(x, y, *, num_projections: int = 256, seed: int = 0, p: int = 2) -> float:
    """Sliced p-Wasserstein distance `(E_theta W_p^p(theta.x, theta.y))^(1/p)`.

    Directions theta are uniform on the sphere (fixed `seed`, so two calls compare like
    with like). Unequal sample sizes are handled by comparing quantile functions on a
    common grid. For two Gaussians that differ by a shift m, SW_2 = ||m|| / sqrt(D).
    """
    xa, ya = as_numpy64(x), as_numpy64(y)
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"dimensions differ: {xa.shape[1]} vs {ya.shape[1]}")
    keep_x = np.isfinite(xa).all(axis=1)
    keep_y = np.isfinite(ya).all(axis=1)
    xa, ya = xa[keep_x], ya[keep_y]
    if len(xa) == 0 or len(ya) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((xa.shape[1], num_projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    px = np.sort(xa @ theta, axis=0)
    py = np.sort(ya @ theta, axis=0)
    if len(px) != len(py):
        n = max(len(px), len(py))
        q = (np.arange(n) + 0.5) / n
        px, py = _quantiles(px, q), _quantiles(py, q)
    return float(np.mean(np.abs(px - py) ** p) ** (1.0 / p))


def mmd(x, y, *, bandwidth: float | Sequence[float] | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel (sum over bandwidths if several).

    Default bandwidth: the median pairwise distance of the pooled samples.
    """
    xa = torch.as_tensor(as_numpy64(x))
    ya = torch.as_tensor(as_numpy64(y))
    n, m = len(xa), len(ya)
    if n < 2 or m < 2:
        raise ValueError("mmd needs at least 2 samples on each side")
    pooled = torch.cat([xa, ya])
    d2 = torch.cdist(pooled, pooled).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(len(pooled), dtype=torch.bool)]
        bws = [float(off.sqrt().median())]
    elif isinstance(bandwidth, (int, float)):
        bws = [float(bandwidth)]
    else:
        bws = [float(b) for b in bandwidth]
    k = sum(torch.exp(-d2 / (2 * h * h)) for h in bws)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    value = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
             + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
             - 2 * kxy.mean())
    return float(value)


def mode_coverage(samples, means, stds=None, *, weights=None, radius: float = 3.0,
                  min_fraction: float = 0.1) -> dict:
    """Which modes of a mixture a sample set covers.

    Each sample is assigned to its nearest mean in units of that mode's std (`stds`: per
    mode scalar or per-dimension, default 1). It counts for the mode only when it lies
    within `radius` stds (a "high-quality" sample). A mode is covered when it receives at
    least `min_fraction` of the samples its weight predicts (and at least one).

    Returns `{"modes_covered", "num_modes", "counts", "high_quality_fraction"}`.
    """
    xs = as_numpy64(samples)
    mu = as_numpy64(means)
    k, d = mu.shape
    if stds is None:
        sd = np.ones((k, d))
    else:
        sd = np.asarray(stds.detach().cpu() if isinstance(stds, torch.Tensor) else stds, dtype=np.float64)
        if sd.ndim == 0:
            sd = np.full((k, d), float(sd))
        elif sd.size == k:
            sd = np.repeat(sd.reshape(k, 1), d, axis=1)
        else:
            sd = np.broadcast_to(sd.reshape(-1, d), (k, d))
    w = np.full(k, 1.0 / k) if weights is None else as_numpy64(weights).reshape(-1)
    w = w / w.sum()
    finite = np.isfinite(xs).all(axis=1)
    xs = xs[finite]
    counts = np.zeros(k, dtype=np.int64)
    if len(xs):
        z = (xs[:, None, :] - mu[None]) / sd[None]
        dist = np.sqrt((z ** 2).sum(-1) / d)  # RMS per-dimension distance in stds
        nearest = dist.argmin(1)
        close = dist[np.arange(len(xs)), nearest] <= radius
        counts = np.bincount(nearest[close], minlength=k)
    n_total = len(finite)
    need = np.maximum(1.0, min_fraction * w * n_total)
    covered = int((counts >= need).sum())
    return {
        "modes_covered": covered,
        "num_modes": int(k),
        "counts": counts.tolist(),
        "high_quality_fraction": float(counts.sum() / max(n_total, 1)),
    }


# --------------------------------------------------------------------------- digits CNN

class DigitsClassifier(nn.Module):
    """Small CNN for (N, 1, 8, 8) digits in [-1, 1]; `features()` is the penultimate layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = F.avg_pool2d(h, 2)
        h = F.silu(self.conv3(h))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _split_indices(n: int, seed: int, test_fraction: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def train_digits_classifier(data: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                            epochs: int = 30, device="cpu", progress: bool = False):
    """Train the CNN on a fixed 80/20 split; returns (model, held-out accuracy)."""
    torch_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = DigitsClassifier(in_channels=data.shape[1], num_classes=int(labels.max()) + 1).to(device)
    finally:
        torch.set_rng_state(torch_state)
    train_idx, test_idx = _split_indices(len(data), seed)
    x = data.to(device, torch.float32)
    y = labels.to(device, torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed + 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    for _ in progress_bar(range(epochs), desc="digits classifier", enabled=progress, leave=False):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64].to(device)
            xb = x[idx]
            # light augmentation: random 1-pixel shifts and small noise
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            xb = xb + 0.05 * torch.randn(xb.shape, generator=g).to(device)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(x[test_idx.to(device)]).argmax(1)
        acc = float((pred == y[test_idx.to(device)]).float().mean())
    return model, acc


def digits_classifier(dataset=None, *, cache_dir=None, device="cpu", seed: int = 0,
                      progress: bool = False, epochs: int = 30):
    """The cached digits CNN: `(model, info)`; trains and caches it on first use.

    `info = {"feature": DIGITS_FEATURE_NAME, "test_accuracy": float, "path": str}`.
    `dataset` is a `gsd.data` Dataset of digits (loaded when None).
    """
    from safetensors.torch import load_file, save_file

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"digits_classifier_s{seed}_e{epochs}.safetensors"
    if path.exists():
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            state = load_file(str(path))
            model = DigitsClassifier(in_channels=int(meta.get("in_channels", 1)),
                                     num_classes=int(meta.get("num_classes", 10)))
            model.load_state_dict(state)
            model.to(device).eval()
            return model, {"feature": DIGITS_FEATURE_NAME, "test_accuracy": float(meta["test_accuracy"]),
                           "path": str(path)}
        except Exception:  # a damaged cache entry is retrained, not fatal
            pass
    if dataset is None:
        dataset = load_dataset("digits")
    if dataset.labels is None:
        raise UsageError("the digits classifier needs labelled data")
    model, acc = train_digits_classifier(dataset.data, dataset.labels, seed=seed, epochs=epochs,
                                         device=device, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"test_accuracy": repr(acc), "feature": DIGITS_FEATURE_NAME,
                                         "in_channels": str(dataset.data.shape[1]),
                                         "num_classes": str(int(dataset.labels.max()) + 1)})
    os.replace(tmp, path)
    model.eval()
    return model, {"feature": DIGITS_FEATURE_NAME, "test_accuracy": acc, "path": str(path)}


@torch.no_grad()
def classifier_features(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Penultimate features of `model` for x, in batches; returns CPU float64 (N, F)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch):
        out.append(model.features(x[i:i + batch].to(dev, torch.float32)).double().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- isometry defect

@torch.no_grad()
def isometry_defect(generator: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, *,
                    backend: str = "reference", weighting: str = "global") -> float:
    """Optimal-scale isometry loss (docs/definitions.md §2.1) of `generator` on held-out `latents`.

    0 means pairwise output distances are exactly proportional to latent distances.
    Samples with non-finite outputs are left out.
    """
    import gsd_kernels

    x = generator(latents)
    valid = torch.isfinite(x.reshape(len(x), -1)).all(1)
    if int(valid.sum()) < 2:
        return float("nan")
    x = x[valid].float()
    z = latents[valid].to(x.device, torch.float32)
    return float(gsd_kernels.isometry_loss(x, z, weighting=weighting, scale="optimal", backend=backend))


# --------------------------------------------------------------------------- local isometry defect

# Fixed settings of the evaluation's local isometry defect, independent of any training flag.
LOCAL_ISOMETRY = {"anchors": 256, "neighbours": 3, "radius": 0.5}
# Latent seeds: base + this offset + i for anchor i (the samples use base + [0, 1e7), the global
# isometry latents base + 1e7 + i, i < 8e7); the directions u come from their own generator.
LOCAL_ISOMETRY_SEED_OFFSET = 90_000_000
LOCAL_DIRECTION_SEED = 0x15E7


def neighbour_latents(anchors: torch.Tensor, *, neighbours: int = 3, radius: float = 0.5,
                      seed: int = LOCAL_DIRECTION_SEED) -> torch.Tensor:
    """(A * (K+1), ...) latents in groups of K+1 consecutive rows: each anchor, then its K
    neighbours `anchor + radius * u`, u uniform on the unit sphere of the latent's dimension
    (torch.Generator `seed`, on the CPU, so every device draws the same u)."""
    if int(neighbours) < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be finite and > 0, got {radius}")
    a = anchors.shape[0]
    flat = anchors.reshape(a, -1)
    u = torch.randn((a, int(neighbours), flat.shape[1]), generator=torch.Generator().manual_seed(int(seed)),
                    dtype=torch.float64)
    u = u / u.norm(dim=2, keepdim=True)
    z = flat.to(torch.float64)[:, None, :] + float(radius) * torch.cat([torch.zeros_like(u[:, :1]), u], 1).to(flat.device)
    return z.reshape(a * (int(neighbours) + 1), *anchors.shape[1:]).to(anchors.dtype)


@torch.no_grad()
def local_isometry_defect(generate: Callable, anchors: torch.Tensor, *, neighbours: int = 3, radius: float = 0.5,
                          labels: torch.Tensor | None = None, seed: int = LOCAL_DIRECTION_SEED,
                          backend: str = "reference", batch: int = 512) -> float:
    """The grouped optimal-scale isometry loss on held-out anchors and their neighbours.

    Each anchor z_a gets K = `neighbours` neighbours z_a + radius * u (`neighbour_latents`);
    the loss `1 - S_{delta,dz}^2 / (S_{delta,delta} S_{dz,dz})` (docs/definitions.md §2.1)
    is summed over the ordered pairs within each group of K+1 only
    (`gsd_kernels.isometry_loss(..., groups=K+1)`), so it measures how G bends space near
    each latent, not how evenly it spreads a random batch. It is scale-free, so plain eps
    latents stand for sigma_init * eps. 0: every group is mapped by an exact scaled isometry
    (one scale for all groups).

    generate(z) -> samples, or generate(z, labels) when `labels` (one per anchor) are given;
    a group's members share its anchor's label. Groups with a non-finite output are left
    out; nan when none is left.
    """
    import gsd_kernels

    k = int(neighbours)
    g = k + 1
    z = neighbour_latents(anchors, neighbours=k, radius=radius, seed=seed)
    lab = None if labels is None else labels.repeat_interleave(g)
    outs = []
    for i in range(0, len(z), batch * g):
        zz = z[i:i + batch * g]
        outs.append(generate(zz) if lab is None else generate(zz, lab[i:i + batch * g]))
    x = torch.cat(outs).reshape(len(z), -1).double()
    ok = torch.isfinite(x).reshape(-1, g, x.shape[1]).all(2).all(1)
    if not bool(ok.any()):
        return float("nan")
    keep = ok.repeat_interleave(g).to(x.device)
    return float(gsd_kernels.isometry_loss(x[keep], z.reshape(len(z), -1)[keep.to(z.device)].double().to(x.device),
                                           groups=g, weighting="global", scale="optimal", backend=backend))


def local_defect_shares(x: torch.Tensor, z: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's share of the grouped optimal-scale isometry loss (global weighting), float64 (G,).

    With the one optimal scale c = S_{delta,dz} / S_{dz,dz} of all included pairs, the loss
    1 - S_{delta,dz}^2 / (S_{delta,delta} S_{dz,dz}) equals sum over pairs (delta - c dz)^2 /
    S_{delta,delta}, so it splits into one non-negative share per group (its ordered pairs'
    residuals over S_{delta,delta}) and the shares sum to the loss: which neighbourhoods of the
    latent space carry the defect. x, z: (N, ...) rows in groups of `groups` consecutive rows.
    A reference computation (O(N g (D + d)), float64), not a training op."""
    g = int(groups)
    if g < 2 or x.shape[0] % g or x.shape[0] != z.shape[0]:
        raise ValueError(f"groups must be >= 2 and divide the {x.shape[0]} rows of x and z, got {groups}")
    xs = x.reshape(-1, g, math.prod(x.shape[1:])).double()
    zs = z.reshape(-1, g, math.prod(z.shape[1:])).double().to(xs.device)
    delta, dz = torch.cdist(xs, xs), torch.cdist(zs, zs)  # the diagonal is 0 and drops out of every sum
    s_xx, s_zz = delta.square().sum(), dz.square().sum()
    if s_xx == 0 or s_zz == 0:
        return torch.zeros(xs.shape[0], dtype=torch.float64, device=xs.device)
    c = (delta * dz).sum() / s_zz
    return (delta - c * dz).square().sum((1, 2)) / s_xx


# --------------------------------------------------------------------------- latency

def _sync(device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_latency(fn: Callable[[], object], device="cpu", warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of `fn()` in milliseconds (synchronised; warm-up calls excluded)."""
    with torch.no_grad():
        for _ in range(max(warmup, 0)):
            fn()
        _sync(device)
        times = []
        for _ in range(max(repeats, 1)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


# --------------------------------------------------------------------------- evaluation core
#
# One public function per section, used by gsd.train's end-of-run evaluation
# (`evaluate_distillation`) and by gsd.evaluate / gsd.experiments (`evaluate.evaluate_loaded`):
# the same latent seeds, the same estimators, the same latency method.

# Latent seeds of one evaluation with seed s: base = s * SEED_STRIDE; sample i uses base + i
# (i < ISOMETRY_SEED_OFFSET), global isometry latent i base + ISOMETRY_SEED_OFFSET + i, local
# isometry anchor i base + LOCAL_ISOMETRY_SEED_OFFSET + i.
ISOMETRY_SEED_OFFSET = 10_000_000
SEED_STRIDE = 100_000_000
MAX_ISOMETRY_LATENTS = LOCAL_ISOMETRY_SEED_OFFSET - ISOMETRY_SEED_OFFSET
# why --num-samples / --isometry-latents are bounded (the flags' messages say it)
SEED_RANGE_WHY = ("each --seed owns 1e8 latent seeds: 1e7 for the samples, 8e7 for the isometry latents, the rest "
                  "for the local isometry anchors")
REAL_SPLIT_SEED = 0       # the permutation of the real data behind its two halves
TRUE_SEEDS = (123456, 654321)  # gmm: the reference true sample and the independent one (noise floor)
BOOTSTRAP_SEED = 2024


def batched(fn: Callable, x: torch.Tensor, labels, batch: int = 500) -> torch.Tensor:
    """fn(x_chunk, labels_chunk) over chunks of `batch`, concatenated as float32 on the CPU."""
    out = []
    for i in range(0, len(x), batch):
        lab = None if labels is None else labels[i:i + batch]
        out.append(fn(x[i:i + batch], lab).float().cpu())
    return torch.cat(out)


_batched = batched


def class_labels(n: int, num_classes: int, device):
    """Label i % num_classes for sample i; None without classes."""
    return (torch.arange(n, device=device) % num_classes) if num_classes else None


def evaluation_latents(seed: int, num: int, shape, device, num_classes: int = 0, *, offset: int = 0):
    """(latents, labels) of an evaluation: latent i from seed `seed * SEED_STRIDE + offset + i`."""

    base = int(seed) * SEED_STRIDE + int(offset)
    return latents_for_seeds(range(base, base + num), shape, device), class_labels(num, num_classes, device)


def one_step_samples(generate: Callable, seed: int, num: int, shape, device, num_classes: int = 0) -> torch.Tensor:
    """generate(eps, labels) on the evaluation latents of `seed` (`evaluation_latents`), computed as
    gsd.generate computes seeds: whole blocks of BLOCK latents, the padding dropped. float32, CPU.
    The base seed * 1e8 is a multiple of BLOCK, so sample i is gsd.generate's image of seed
    seed * 1e8 + i (with --labels balanced where the classes divide 1e8)."""
    padded = -(-int(num) // BLOCK) * BLOCK
    eps, labels = evaluation_latents(seed, padded, shape, device, num_classes)
    return blocked_forward(generate, eps, labels)[:num]


def latency_section(fns: dict, device, *, warmup: int = 2, repeats: int = 7) -> dict:
    """Median ms per callable, repeats interleaved (a load change hits every variant alike).

    Each timed call is `measure_latency(fn, warmup=0, repeats=1)` (synchronised on CUDA);
    `warmup` untimed calls of each first."""
    with torch.no_grad():
        for _ in range(max(warmup, 0)):
            for fn in fns.values():
                fn()
    times = {k: [] for k in fns}
    for _ in range(max(repeats, 1)):
        for k, fn in fns.items():
            times[k].append(measure_latency(fn, device, warmup=0, repeats=1))
    return {k: float(statistics.median(v)) for k, v in times.items()}


LATENCY_METHOD = "median of interleaved repeats, warm-up excluded, synchronised on CUDA"


def geometry_section(generate: Callable, shape, device, num_classes: int = 0, *, seed: int = 0,
                     isometry_latents: int = 512, local: dict | None = None) -> dict:
    """Global and local isometry defects of a map generate(eps, labels) from standard-normal latents.

    `isometry_defect`: the optimal-scale loss over all pairs of `isometry_latents` held-out
    latents; `local_isometry_defect`: `local_isometry_defect` with the fixed settings
    `LOCAL_ISOMETRY` (or `local`). Seeds: see `ISOMETRY_SEED_OFFSET`."""
    loc = dict(LOCAL_ISOMETRY if local is None else local)
    z, z_lab = evaluation_latents(seed, isometry_latents, shape, device, num_classes, offset=ISOMETRY_SEED_OFFSET)
    out = {"isometry_defect": isometry_defect(lambda e: generate(e, z_lab), z, backend="reference")}
    a, a_lab = evaluation_latents(seed, loc["anchors"], shape, device, num_classes,
                                  offset=LOCAL_ISOMETRY_SEED_OFFSET)
    out["local_isometry_defect"] = local_isometry_defect(
        generate if a_lab is not None else (lambda e: generate(e, None)), a, neighbours=loc["neighbours"],
        radius=loc["radius"], labels=a_lab, seed=LOCAL_DIRECTION_SEED + int(seed))
    return out


def local_isometry_settings(seed: int = 0, local: dict | None = None) -> dict:
    """What the local isometry defect was computed with (recorded next to its values)."""
    loc = dict(LOCAL_ISOMETRY if local is None else local)
    base = int(seed) * SEED_STRIDE + LOCAL_ISOMETRY_SEED_OFFSET
    return {**loc, "anchor_seeds": [base, base + loc["anchors"] - 1],
            "direction_seed": LOCAL_DIRECTION_SEED + int(seed),
            "definition": "optimal-scale isometry loss over ordered pairs within each group of an anchor eps and "
                          "its neighbours eps + radius * u, u uniform on the unit sphere"}


def _finite_rows(f) -> bool:
    return bool(torch.isfinite(torch.as_tensor(np.asarray(f, dtype=np.float64) if not isinstance(f, torch.Tensor)
                                               else f)).all())


def sample_quality(f_gen, f_ref, *, fd: Callable | None = None, fd_key: str = "fd", bootstraps: int | None = None,
                   seed: int = BOOTSTRAP_SEED, with_kid_pr: bool = True) -> dict:
    """FD (key `fd_key`) with its bootstrap interval (`<fd_key>_ci`), and KID / precision /
    recall of generated features f_gen against reference features f_ref (gsd.evaluation.feature_metrics).

    Non-finite features leave the interval out (None); precision / recall need more than
    PR_K points on each side (None otherwise)."""

    fd = fd or frechet_distance
    nb = fm.FD_BOOTSTRAPS if bootstraps is None else int(bootstraps)
    out: dict = {fd_key: fd(f_gen, f_ref)}
    finite = _finite_rows(f_gen) and _finite_rows(f_ref)
    out[f"{fd_key}_ci"] = fm.fd_bootstrap_interval(f_gen, f_ref, num=nb, seed=seed, fd=fd) if finite and nb >= 2 \
        else None
    if with_kid_pr:
        out["kid"], out["kid_stderr"] = fm.kid(f_gen, f_ref)
        if finite and min(len(f_gen), len(f_ref)) > fm.PR_K:
            pr = fm.precision_recall(f_ref, f_gen)
            out.update(pr)
        else:
            out.update(precision=None, recall=None, precision_stderr=None, recall_stderr=None)
    return out


def real_noise_floor(f_real, num_samples: int, *, fd: Callable | None = None, fd_key: str = "fd",
                     bootstraps: int | None = None, what: str = "real") -> dict:
    """The sample-quality metrics between two disjoint random subsets of the real features.

    Each subset has min(num_samples, len // 2) points (seeded permutation REAL_SPLIT_SEED),
    so with more evaluated samples than half the real data the floor is at that half's size
    (recorded as `size`)."""
    n = len(f_real)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(REAL_SPLIT_SEED))
    half = n // 2
    h = max(min(int(num_samples), half), 0)
    out = {"what": f"{what} vs {what}: two disjoint random subsets of the {n} {what} samples, {h} each",
           "size": h}
    if h < num_samples:
        out["what"] += f" (fewer than the {num_samples} evaluated samples: half of the {what} data)"
    if h < 2:
        out["what"] += " (too few for a floor)"
        return out
    fa, fb = f_real[perm[:h].numpy()], f_real[perm[half:half + h].numpy()]
    out.update(sample_quality(fa, fb, fd=fd, fd_key=fd_key, bootstraps=bootstraps))
    return out


def mixture_section(mixture, num_samples: int, entries, *, bootstraps: int | None = None) -> dict:
    """Distances of samples to a known mixture, filled into each (metrics dict, samples) entry.

    Against a fresh true sample of the same size (fixed seed TRUE_SEEDS[0], so every caller
    compares against the same set): fd (raw coordinates) with fd_ci, kid, precision / recall,
    sliced_wasserstein, mmd, mode coverage, and the exact metrics nll (mean -log p under the
    true mixture), nll_gap (nll minus that of the true reference sample) and mode_weight_error.

    Returns {"true_sample": x, "true": nll of the reference sample, "true_vs_true": the
    older floor keys, "noise_floor": every metric for an independent exact-sampler draw
    (TRUE_SEEDS[1]) of the same size against the reference}.
    """

    true1, _ = mixture.sample(num_samples, generator=torch.Generator().manual_seed(TRUE_SEEDS[0]))
    true2, _ = mixture.sample(num_samples, generator=torch.Generator().manual_seed(TRUE_SEEDS[1]))
    n_mmd = min(num_samples, 1000)
    t_nll = fm.mixture_nll(mixture, true1)
    true = {"nll": t_nll["nll"], "nll_stderr": t_nll["nll_stderr"], "size": int(num_samples),
            "what": f"exact sampler, {num_samples} samples (seed {TRUE_SEEDS[0]}): the reference of every distance"}

    def fill(m, x):
        m.update(sample_quality(as_numpy64(x), as_numpy64(true1), bootstraps=bootstraps))
        m["sliced_wasserstein"] = sliced_wasserstein(x, true1)
        m["mmd"] = mmd(x[:n_mmd], true1[:n_mmd])
        cov = mode_coverage(x, mixture.means, mixture.stds, weights=mixture.weights)
        m["modes_covered"], m["num_modes"] = cov["modes_covered"], cov["num_modes"]
        m["high_quality_fraction"] = cov["high_quality_fraction"]
        nll = fm.mixture_nll(mixture, x)
        m["nll"], m["nll_stderr"] = nll["nll"], nll["nll_stderr"]
        m["nll_gap"] = nll["nll"] - true["nll"]
        m["mode_weight_error"] = fm.mode_weight_error(mixture, x)

    for m, x in entries:
        fill(m, x)
    floor = {"what": f"exact sampler vs truth: an independent true sample (seed {TRUE_SEEDS[1]}) against the "
                     f"reference, {num_samples} each", "size": int(num_samples)}
    fill(floor, true2)
    tvt = {k: floor[k] for k in ("fd", "sliced_wasserstein", "mmd")}
    return {"true_sample": true1, "true": true, "true_vs_true": tvt, "noise_floor": floor}


def mixture_metrics(mixture, num_samples: int, entries) -> tuple[torch.Tensor, dict]:
    """`mixture_section`'s true sample and true-vs-true floor (older interface)."""
    sec = mixture_section(mixture, num_samples, entries)
    return sec["true_sample"], sec["true_vs_true"]


def distribution_section(result: dict, dataset, space, entries, num_samples: int, *,
                         bootstraps: int | None = None) -> torch.Tensor | None:
    """Sample-quality metrics of each (metrics dict, samples) entry in the data set's feature space.

    gmm: `mixture_section` (adds result["true"], ["true_vs_true"], ["noise_floor"],
    ["mmd_samples"]); a feature space (`space.fd`): FD / KID / precision / recall against
    all real samples plus `real_split_fd` and the real-vs-real noise floor; otherwise fd =
    None. Returns the gmm reference sample (for the panels) or None."""
    result["fd_feature"] = space.fd_name or "none (no feature network for this data set; see fid)"
    if dataset.mixture is not None:
        sec = mixture_section(dataset.mixture, num_samples, entries, bootstraps=bootstraps)
        result["true_vs_true"], result["true"], result["noise_floor"] = \
            sec["true_vs_true"], sec["true"], sec["noise_floor"]
        result["mmd_samples"] = min(num_samples, 1000)
        result["kid_feature"] = result["fd_feature"]
        return sec["true_sample"]
    if space.fd is None:
        for m, _ in entries:
            m["fd"] = None
        return None
    real = dataset.data
    f_real = as_numpy64(space.fd(real))
    for m, x in entries:
        m.update(sample_quality(as_numpy64(space.fd(x)), f_real, bootstraps=bootstraps))
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(REAL_SPLIT_SEED))
    half = len(real) // 2
    result["real_split_fd"] = frechet_distance(f_real[perm[:half].numpy()], f_real[perm[half:].numpy()])
    result["noise_floor"] = real_noise_floor(f_real, num_samples, bootstraps=bootstraps)
    result["kid_feature"] = result["fd_feature"]
    result["reference_samples"] = len(real)
    result.update(space.info)
    return None


class FeatureSpace:
    """The feature spaces of one data set: for the Frechet distance / KID / precision-recall
    (`fd`, named `fd_name`) and for PPL (`ppl`, named `ppl_name`)."""

    def __init__(self, dataset, device, *, cache_dir=None, classifier_epochs: int = 30, progress: bool = False,
                 fid_model=None):

        self.dataset = dataset
        self.info: dict = {}
        self.fd = None      # x -> (N, F) float64 features, or None (no feature space)
        self.ppl = None     # float64 x -> features (None: identity)
        if dataset.mixture is not None or len(dataset.sample_shape) == 1:
            self.fd_name = "raw coordinates"
            self.fd = lambda x: x.reshape(len(x), -1).double()
            self.ppl_name = "raw coordinates (identity features)"
        elif dataset.name == "digits":
            clf, info = digits_classifier(dataset, cache_dir=cache_dir, device=device, progress=progress,
                                          epochs=classifier_epochs)
            self.fd_name = f"{info['feature']} (penultimate layer of a small CNN trained on digits; not FID)"
            self.info["classifier_test_accuracy"] = info["test_accuracy"]
            self.fd = lambda x: classifier_features(clf, x)
            clf64 = float64_copy(clf)
            self.ppl = lambda x: clf64.features(x.to(next(clf64.parameters()).device, torch.float64))
            self.ppl_name = f"{info['feature']} (digits CNN penultimate features, squared L2)"
        elif fid_model is not None:

            self.fd_name = None
            self.ppl = lambda x: fid_model(x.float()).double()
            self.ppl_name = f"{FID_FEATURE_NAME}, squared L2 (computed in float32)"
        else:
            self.fd_name = None
            self.ppl_name = "raw pixels (no feature network at hand for this data set), squared L2"


# --------------------------------------------------------------------------- summary text

# (key, label, kind): kind says how noise is judged: "se" (key_stderr), "ci" (key_ci), "floor"
_SUMMARY_METRICS = (("fd", "FD", "ci"), ("fid", "FID", "ci"), ("kid", "KID", "se"), ("precision", "precision", "se"),
                    ("recall", "recall", "se"), ("nll", "NLL", "se"), ("nll_gap", "NLL gap", "se"),
                    ("mode_weight_error", "mode-weight TV", "floor"), ("sliced_wasserstein", "sliced W2", "floor"),
                    ("mmd", "MMD^2", "floor"), ("high_quality_fraction", "high-quality frac.", "floor"))


def _stderr_of(m: dict, key: str):
    return m.get("nll_stderr" if key == "nll_gap" else f"{key}_stderr")


def _cell(m: dict, key: str, kind: str) -> str:

    v = m.get(key)
    if v is None:
        return "-"
    if kind == "ci" and m.get(f"{key}_ci"):
        lo, hi = m[f"{key}_ci"]
        return f"{format_value(v)} [{format_value(lo)}, {format_value(hi)}]"
    se = _stderr_of(m, key)
    if kind == "se" and se is not None:
        return f"{format_value(v)} ± {format_value(se)}"
    return format_value(v)


def noise_verdict(a: dict, b: dict, key: str, kind: str, floor: dict | None = None) -> str:
    """'within noise', 'differs' or '?' for metric `key` of two sections (gsd.evaluation.feature_metrics.within_noise)."""

    va, vb = a.get(key), b.get(key)
    if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
        return "?"
    if kind == "se":
        v = within_noise(va, vb, stderr_a=_stderr_of(a, key), stderr_b=_stderr_of(b, key))
    elif kind == "ci":
        v = within_noise(va, vb, ci_a=a.get(f"{key}_ci"), ci_b=b.get(f"{key}_ci"))
    else:
        f = (floor or {}).get(key)
        if key == "high_quality_fraction" and isinstance(f, (int, float)):
            f = 1.0 - f  # a true sample's shortfall from 1
        v = within_noise(va, vb, floor=f)
    return {True: "within noise", False: "differs", None: "?"}[v]


def summary_rows(metrics: dict) -> str:
    """The sample-quality part of an evaluation as text: one row per metric with the one-step
    G, the teacher, the noise floor and whether G and the teacher differ beyond noise
    (standard errors at 2 sigma, bootstrap intervals overlapping, or the noise floor's value)."""

    one, teach = metrics.get("one_step", {}), metrics.get("teacher", {})
    floor = metrics.get("noise_floor") or {}
    true = metrics.get("true") or {}
    rows = [("metric", "one-step G", "teacher", "noise floor", "G vs teacher")]
    for key, label, kind in _SUMMARY_METRICS:
        if one.get(key) is None and teach.get(key) is None:
            continue
        rows.append((label, _cell(one, key, kind), _cell(teach, key, kind), _cell(floor, key, kind),
                     noise_verdict(one, teach, key, kind, floor)))
    for key, label in (("isometry_defect", "isometry defect (global)"),
                       ("local_isometry_defect", "local isometry defect")):
        a = one.get(key, metrics.get(key))
        if a is not None:
            rows.append((label, format_value(a), format_value(teach.get(key)), "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if floor.get("what"):
        lines.append(f"noise floor: {floor['what']}")
    if true.get("nll") is not None:
        lines.append(f"true-sample NLL (reference of the NLL gap): {format_value(true['nll'])} ± "
                     f"{format_value(true.get('nll_stderr'))}")
    if metrics.get("kid_feature"):
        lines.append(f"FD / KID / precision-recall feature space: {metrics['kid_feature']}")
    loc = metrics.get("local_isometry")
    if loc:
        lines.append(f"local isometry defect: {loc['anchors']} anchors, {loc['neighbours']} neighbours at radius "
                     f"{loc['radius']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- train's end-of-run evaluation

def evaluate_distillation(generate: Callable, teacher, dataset, *, device="cpu", num_samples: int = 1000,
                          num_classes: int = 0, backend: str = "reference", cache_dir=None,
                          latency_repeats: int = 5, latency_batch: int = 64, teacher_steps: int = 18,
                          classifier_epochs: int = 30, isometry_latents: int = 512, progress: bool = False,
                          seed: int = 0, latency_warmup: int = 2, teacher_geometry: bool = False,
                          bootstraps: int | None = None, **_unused) -> tuple[dict, list]:
    """One-step generator vs the Heun teacher on the same seeds; returns (metrics, panels).

    generate(eps, class_labels) -> samples for standard-normal latents eps (e.g.
    `Distiller.generate`); teacher: the denoiser f_phi sampled with Heun (2*teacher_steps-1
    NFE). The same sections, seeds and latency method as `gsd.evaluate` with `--seed seed`
    (sample i uses latent seed seed * 1e8 + i). `teacher_geometry` adds the teacher Heun
    map's isometry defects (35 NFE per latent: off by default to keep the run short).
    `panels` are (title, samples) pairs for `gsd.evaluation.plots.save_samples_png`.
    """

    device = torch.device(device)
    shape = tuple(dataset.sample_shape)
    eps, labels = evaluation_latents(seed, num_samples, shape, device, num_classes)
    nfe_t = heun_nfe(teacher_steps)

    def teacher_map(e, l):
        return heun_sample(teacher, e, l, num_steps=teacher_steps)

    with torch.no_grad():
        x_one = one_step_samples(generate, seed, num_samples, shape, device, num_classes)
        x_teacher = batched(teacher_map, eps, labels)

    metrics: dict = {"one_step": {"nfe": 1}, "teacher": {"nfe": nfe_t}, "num_samples": num_samples}
    one, teach = metrics["one_step"], metrics["teacher"]
    space = FeatureSpace(dataset, device, cache_dir=cache_dir, classifier_epochs=classifier_epochs,
                         progress=progress)
    true1 = distribution_section(metrics, dataset, space, [(one, x_one), (teach, x_teacher)], num_samples,
                                 bootstraps=bootstraps)
    if true1 is not None:
        panels_extra, n_show = [("true mixture", true1[:2000])], 2000
    else:
        panels_extra, n_show = [], 64

    nb = min(latency_batch, num_samples)
    eps_b, lab_b = eps[:nb], None if labels is None else labels[:nb]
    lat = latency_section({"one": lambda: generate(eps_b, lab_b), "teacher": lambda: teacher_map(eps_b, lab_b)},
                          device, warmup=latency_warmup, repeats=latency_repeats)
    one["latency_ms"], teach["latency_ms"] = lat["one"], lat["teacher"]
    metrics["latency_batch"] = int(nb)
    metrics["latency_method"] = LATENCY_METHOD

    geo = geometry_section(generate, shape, device, num_classes, seed=seed, isometry_latents=isometry_latents)
    metrics["isometry_defect"] = geo["isometry_defect"]
    metrics["local_isometry_defect"] = geo["local_isometry_defect"]
    one.update(geo)
    if teacher_geometry:
        teach.update(geometry_section(teacher_map, shape, device, num_classes, seed=seed,
                                      isometry_latents=isometry_latents))
    metrics["isometry_latents"] = isometry_latents
    metrics["local_isometry"] = local_isometry_settings(seed)

    panels = [("one-step G (1 NFE)", x_one[:n_show]), (f"teacher Heun ({nfe_t} NFE)", x_teacher[:n_show])]
    panels += panels_extra
    return metrics, panels
