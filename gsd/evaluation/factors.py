"""Factor metrics of `--dataset shapes` (issue 25): geometry measured against the known factors.

A shapes image is rendered from five continuous factors (x, y, scale, rotation, brightness) and
a kind (`gsd.shapes`). Every figure here is in *normalised factor units*: each factor mapped to
[0, 1] by its range (`gsd.shapes.normalise`), so a unit of x counts as much as a unit of
rotation. The kind enters only where said.

- **Factor regressor** (`factor_regressor`): a small CNN trained on freshly rendered images
  (its own seed; 20000 train + 2000 held out, at the run's resolution and number of kinds) that
  predicts the normalised factors (regression) and the kind (classification, kinds > 1). Cached
  as a safetensors file keyed by resolution, kinds, seed, epochs and a fingerprint of the
  renderer. Its held-out RMSE per factor (factor units and normalised) and kind accuracy come
  with it: no figure below is finer than that error. Its 64-d penultimate layer is the feature
  space of the shapes FD / KID / precision-recall.
- **Factor PPL** (`factor_ppl`): `gsd.evaluation.ppl.perceptual_path_length` (its slerp,
  eps = 1e-4 and 1%-99% filter) with the regressed normalised factors as the features:
  E[||f(G(slerp(t + eps))) - f(G(slerp(t)))||^2 / eps^2]. Needs a float64 generator, like pixel PPL.
- **Local factor isometry** (`local_factor_isometry`): `gsd.evaluation.geometry.local_isometry_defect`
  (the grouped optimal-scale isometry loss over an anchor and K neighbours at radius R, same
  anchors and directions as the pixel figure) on the regressed normalised factors instead of
  pixels; 0 when factor distances are one multiple of latent distances in every neighbourhood.
  Standard error: delete-one-group jackknife.
- **Factor fidelity** (`factor_fidelity`): per-factor 1-D Wasserstein-1 distance between the
  regressed factors of G's samples and of freshly rendered real images (the training
  distribution), the regressed kind frequencies and their total variation, and FD / KID /
  precision-recall in the regressor's feature space (`gsd.evaluation.metrics.sample_quality`);
  the same figures for a second real draw against the first are the noise floor.
- **Traversal purity** (`traversal_purity`): at a few anchor latents, G's top principal latent
  directions (the top right-singular vectors of G's pixel Jacobian, by autograd) and, for each,
  the share of the squared change of the normalised regressed factors, over a central step of
  +-`step` latent units along it, that falls on its largest factor.

What traversal purity measures and what it does not. It asks whether the directions in which
G's output changes most, locally, each move one ground-truth factor: 1 means every such
direction moves a single factor; 0.2 (= 1/5) is the floor, a change spread evenly over the five
factors; a direction whose factor change points in a random direction of the 5-d factor space
scores about 0.555 (`ISOTROPIC_PURITY`). It is the engine's analogue of a disentanglement score
for a latent shaped like noise, which has no axes to align with factors. It is NOT a standard
disentanglement metric (not MIG, DCI, FactorVAE or beta-VAE scores): those score fixed latent
coordinates, globally, against factors, while this is local (the directions differ from anchor
to anchor), says nothing about whether one direction moves the same factor elsewhere, ignores
the kind (reported apart as how often it changes along the step), depends on the factor ranges
through the normalisation, and inherits the regressor's error. The directions are principal in
pixel space, not factor space: a direction that changes many pixels but no factor still counts,
with a noisy purity, so the change-weighted mean and each direction's factor speed are reported
too.

Sample counts (the defaults, `FACTOR_DEFAULTS`): factor PPL 512 pairs (1024 float64 G calls),
local factor isometry 256 anchors x 4 (1024 G calls), fidelity 1000 G samples (none when the
evaluation's samples are passed in) against 1000 + 1000 rendered images, purity 8 anchors x 4
directions (8 Jacobians, each one batched backward pass of 256 rows, plus 64 G calls).
Measured on this project's 2-core CPU (one torch thread) at 16x16, with a 0.3M-parameter
SongUNet as G: PPL 5.1 s, local 1.1 s, fidelity 2.1 s (1.1 s given the samples), purity 3.2 s,
11.6 s in all; with the 5M-parameter default 16x16 network 69 s (PPL 27 s, purity 26 s), where
halving `ppl_pairs` and `purity_anchors` keeps it under a minute. Training the regressor (first
use only) takes ~37 s at 16x16.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gsd import shapes
from gsd.errors import UsageError
from gsd.evaluation.metrics import evaluation_latents, local_isometry_settings, one_step_samples, sample_quality
from gsd.evaluation.digits_classifier import classifier_features
from gsd.evaluation.geometry import LOCAL_ISOMETRY, local_isometry_defect, neighbour_latents
from gsd.seed_ranges import LOCAL_DIRECTION_SEED, LOCAL_ISOMETRY_SEED_OFFSET, SEED_STRIDE
from gsd.evaluation.ppl import PPL_EPS, float64_copy, perceptual_path_length
from gsd.fileio import atomic_save_safetensors
from gsd.progress import progress_bar
from gsd.util import cache_dir as default_cache_dir

__all__ = ["FactorRegressor", "train_factor_regressor", "factor_regressor", "regress", "regressor_features",
           "factor_ppl", "local_factor_isometry", "wasserstein_1d", "factor_fidelity", "jacobian",
           "principal_directions", "traversal_purity", "factor_metrics", "SHAPES_FEATURE_NAME", "FACTOR_DEFAULTS",
           "ISOTROPIC_PURITY", "REGRESSOR_EPOCHS", "REGRESSOR_TRAIN", "REGRESSOR_HELD_OUT", "REAL_SEEDS"]

SHAPES_FEATURE_NAME = "shapes-regressor-penultimate-64"
REGRESSOR_TRAIN = 20_000
REGRESSOR_HELD_OUT = 2_000
REGRESSOR_EPOCHS = 12
REGRESSOR_BATCH = 128
REGRESSOR_CHANNELS = 24
REGRESSOR_VERSION = 1          # bump when the network or its training changes
# the regressor's images come from their own stream, apart from the data set's and the metrics'
REGRESSOR_DATA_SEED = 0x5AC70
# fidelity: the real reference draw and the independent one of the noise floor (fixed for every run)
REAL_SEEDS = (0xFAC7, 0xFAC8)
# E[max_i g_i^2 / sum_j g_j^2] for g ~ N(0, I_5): the purity of a direction whose factor change is random
ISOTROPIC_PURITY = 0.555
NUM_FACTORS = len(shapes.FACTORS)
_RANGE = torch.tensor([shapes.FACTOR_RANGES[f][1] - shapes.FACTOR_RANGES[f][0] for f in shapes.FACTORS],
                      dtype=torch.float64)

FACTOR_DEFAULTS = {
    "ppl_pairs": 512,
    "local": dict(LOCAL_ISOMETRY),
    "fidelity_samples": 1000,
    "purity_anchors": 8,
    "purity_directions": 4,
    "purity_step": 0.5,
}


# --------------------------------------------------------------------------- regressor

class FactorRegressor(nn.Module):
    """Small CNN for (N, 1, R, R) shapes images in [-1, 1].

    `forward(x)` -> (N, 5 + kinds) raw outputs (kinds > 1) or (N, 5): the normalised factors
    (unbounded linear outputs: a sample off the factor box reads off it), then the kind logits.
    `features(x)` is the 64-d penultimate layer."""

    def __init__(self, resolution: int = shapes.DEFAULT_RESOLUTION, kinds: int = shapes.MAX_KINDS,
                 channels: int = REGRESSOR_CHANNELS, feature_dim: int = 64):
        super().__init__()
        self.resolution, self.kinds = int(resolution), int(kinds)
        c = int(channels)
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        side = -(-(-(-self.resolution // 2)) // 2)  # two stride-2 convolutions, padding 1
        self.fc = nn.Linear(2 * c * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_FACTORS + (self.kinds if self.kinds > 1 else 0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = F.silu(self.conv3(h))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def factors(self, x: torch.Tensor) -> torch.Tensor:
        """The regressed normalised factors (N, 5), in the network's dtype."""
        p = next(self.parameters())
        return self(x.to(p.device, p.dtype))[:, :NUM_FACTORS]


def _render_set(n: int, resolution: int, kinds: int, generator: torch.Generator):
    f, k = shapes.sample_factors(n, kinds, generator)
    return shapes.render(f, k, resolution), shapes.normalise(f).float(), k


def _check_shape_args(resolution: int, kinds: int) -> None:
    lo, hi = shapes.RESOLUTIONS
    if not (lo <= int(resolution) <= hi):
        raise UsageError(f"shapes resolution {resolution} is outside the supported {lo}..{hi}")
    if not (1 <= int(kinds) <= shapes.MAX_KINDS):
        raise UsageError(f"shapes kinds {kinds} is outside 1..{shapes.MAX_KINDS}")


def _held_out_errors(model: FactorRegressor, x: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> dict:
    f, kind = regress(model, x)  # on the CPU
    y, k = y.cpu(), k.cpu()
    err = (f - y.double()).pow(2).mean(0).sqrt()
    return {"rmse_normalised": {n: float(v) for n, v in zip(shapes.FACTORS, err)},
            "rmse": {n: float(v) for n, v in zip(shapes.FACTORS, err * _RANGE)},
            "kind_accuracy": float((kind == k).double().mean()) if model.kinds > 1 else None,
            "held_out": int(len(x))}


def train_factor_regressor(resolution: int = shapes.DEFAULT_RESOLUTION, kinds: int = shapes.MAX_KINDS, *,
                           seed: int = 0, epochs: int = REGRESSOR_EPOCHS, train: int = REGRESSOR_TRAIN,
                           held_out: int = REGRESSOR_HELD_OUT, device="cpu", progress: bool = False):
    """Train a `FactorRegressor` on `train` freshly rendered images; returns (model, info).

    info: held-out `rmse` per factor (factor units), `rmse_normalised`, `kind_accuracy` (None
    for one kind), `held_out`, `train_images`, `epochs`, `train_seconds`. The global torch RNG
    is left as it was."""
    _check_shape_args(resolution, kinds)
    if torch.device(device).type != "cpu":
        return _train(resolution, kinds, seed, epochs, train, held_out, device, progress)
    # One intra-op thread on the CPU: this network is too small to gain from more, and on this
    # project's shared 2-core machine two threads competing with other jobs took 483 s instead of 37 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(resolution, kinds, seed, epochs, train, held_out, device, progress)
    finally:
        torch.set_num_threads(threads)


def _train(resolution, kinds, seed, epochs, train, held_out, device, progress):
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(REGRESSOR_DATA_SEED + int(seed))
    x, y, k = _render_set(int(train) + int(held_out), resolution, kinds, g)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        model = FactorRegressor(resolution, kinds).to(device)
    finally:
        torch.set_rng_state(state)
    x, y, k = x.to(device), y.to(device), k.to(device)
    n = int(train)
    steps_per_epoch = max(n // REGRESSOR_BATCH, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(int(epochs), 1) * steps_per_epoch,
                                                pct_start=0.15)
    for _ in progress_bar(range(int(epochs)), desc="shapes factor regressor", enabled=progress, leave=False):
        model.train()
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(steps_per_epoch):
            idx = perm[s * REGRESSOR_BATCH:(s + 1) * REGRESSOR_BATCH]
            # a little pixel noise: G's samples are not exact renders
            xb = x[idx] + 0.02 * torch.randn(x[idx].shape, generator=g).to(device)
            out = model(xb)
            loss = F.mse_loss(out[:, :NUM_FACTORS], y[idx])
            if kinds > 1:
                loss = loss + 0.1 * F.cross_entropy(out[:, NUM_FACTORS:], k[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    info = _held_out_errors(model, x[n:], y[n:], k[n:])
    info.update(train_images=n, epochs=int(epochs), train_seconds=time.perf_counter() - t0)
    return model, info


def _renderer_fingerprint(resolution: int, kinds: int) -> str:
    """A short hash of what the regressor learns from: the factor box, the kinds and a few
    rendered probe images (any change to the renderer changes the cache key)."""
    h = hashlib.sha256(repr((shapes.FACTORS, sorted(shapes.FACTOR_RANGES.items()), shapes.KINDS)).encode())
    f, k = shapes.sample_factors(8, kinds, torch.Generator().manual_seed(1))
    h.update(shapes.render(f, k, resolution).numpy().tobytes())
    return h.hexdigest()[:10]


def _load_cached(path: Path, resolution: int, kinds: int, device):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    info = json.loads(meta["info"])
    if int(meta["resolution"]) != resolution or int(meta["kinds"]) != kinds:
        raise ValueError("cache entry for other settings")
    state = load_file(str(path))
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise ValueError("non-finite weights")
    model = FactorRegressor(resolution, kinds)
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False), info


def factor_regressor(resolution: int = shapes.DEFAULT_RESOLUTION, kinds: int = shapes.MAX_KINDS, *, cache_dir=None,
                     device="cpu", seed: int = 0, epochs: int = REGRESSOR_EPOCHS, progress: bool = False):
    """The cached factor regressor: `(model, info)`; trained and cached on first use.

    info: `train_factor_regressor`'s (rmse, rmse_normalised, kind_accuracy, ...) plus `feature`
    (SHAPES_FEATURE_NAME), `path` and `cached` (True when read from the cache). A damaged or
    mismatched cache entry is retrained and replaced (written atomically)."""
    resolution, kinds = int(resolution), int(kinds)
    _check_shape_args(resolution, kinds)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / (f"shapes_regressor_v{REGRESSOR_VERSION}_r{resolution}_k{kinds}_s{int(seed)}_e{int(epochs)}_"
                    f"{_renderer_fingerprint(resolution, kinds)}.safetensors")
    if path.exists():
        try:
            model, info = _load_cached(path, resolution, kinds, device)
            return model, {**info, "feature": SHAPES_FEATURE_NAME, "path": str(path), "cached": True}
        except Exception:  # a damaged cache entry is retrained, not fatal
            pass
    model, info = train_factor_regressor(resolution, kinds, seed=seed, epochs=epochs, device=device,
                                         progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), path, metadata={
        "info": json.dumps(info), "resolution": resolution, "kinds": kinds, "feature": SHAPES_FEATURE_NAME})
    return model, {**info, "feature": SHAPES_FEATURE_NAME, "path": str(path), "cached": False}


@torch.no_grad()
def regress(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised factors (N, 5) float64, kinds (N,) int64), both on the CPU; the kind is the
    argmax of the logits (0 for a one-kind regressor). Non-finite images give non-finite factors."""
    p = next(model.parameters())
    fs, ks = [], []
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch].to(p.device, p.dtype)).double().cpu()
        fs.append(out[:, :NUM_FACTORS])
        ks.append(out[:, NUM_FACTORS:].argmax(1) if out.shape[1] > NUM_FACTORS
                  else torch.zeros(len(out), dtype=torch.long))
    if not fs:
        return torch.zeros(0, NUM_FACTORS, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(fs), torch.cat(ks)


def regressor_features(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """The regressor's penultimate features (N, 64), CPU float64 (for FD / KID / precision-recall)."""
    return classifier_features(model, x, batch=batch)


# --------------------------------------------------------------------------- factor PPL

def factor_ppl(generate64: Callable, regressor: nn.Module, latent_shape, *, num: int = FACTOR_DEFAULTS["ppl_pairs"],
               seed: int = 0, eps: float = PPL_EPS, device="cpu", batch: int = 256, num_classes: int = 0,
               percentiles: tuple[float, float] = (1.0, 99.0)) -> dict:
    """PPL in normalised factor units: `perceptual_path_length` with the regressed factors as features.

    generate64(z, labels) -> images must compute in float64 when z is float64 (a `float64_copy`
    of G, as gsd.evaluate does for pixel PPL): the eps = 1e-4 difference drowns in float32
    rounding otherwise. The regressor is copied to float64 here. Give the pixel PPL's seed to
    measure the same paths.

    Returns {"factor_ppl", "factor_ppl_stderr", "factor_ppl_unfiltered", "num_pairs", "num_kept",
    "num_nonfinite", "eps", "percentiles", "seed"}."""
    reg64 = float64_copy(regressor)
    gen = generate64 if num_classes else (lambda z: generate64(z, None))
    out = perceptual_path_length(gen, latent_shape, num=num, eps=eps, features=reg64.factors, seed=seed,
                                 device=device, batch=batch, percentiles=percentiles, num_classes=num_classes)
    return {"factor_ppl": out["ppl"], "factor_ppl_stderr": out["ppl_stderr"],
            "factor_ppl_unfiltered": out["ppl_unfiltered"], "num_pairs": out["num_pairs"],
            "num_kept": out["num_kept"], "num_nonfinite": out.get("num_nonfinite", 0), "eps": out["eps"],
            "percentiles": list(out["percentiles"]), "seed": int(seed)}


# --------------------------------------------------------------------------- local factor isometry

def _group_jackknife(f: torch.Tensor, z: torch.Tensor, g: int) -> float:
    """Delete-one-group jackknife standard error of the grouped optimal-scale loss
    1 - S_{delta,dz}^2 / (S_{delta,delta} S_{dz,dz}) (global weighting), from per-group sums."""
    fs, zs = f.reshape(-1, g, f.shape[1]).double(), z.reshape(-1, g, z.shape[1]).double()
    a = fs.shape[0]
    if a < 3:
        return float("nan")
    delta, dz = torch.cdist(fs, fs), torch.cdist(zs, zs)
    sdd, sdz, szz = (delta * delta).sum((1, 2)), (delta * dz).sum((1, 2)), (dz * dz).sum((1, 2))
    tdd, tdz, tzz = sdd.sum() - sdd, sdz.sum() - sdz, szz.sum() - szz
    den = tdd * tzz
    loo = torch.where(den > 0, 1 - tdz * tdz / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
    return float(math.sqrt((a - 1) / a * float(((loo - loo.mean()) ** 2).sum())))


def local_factor_isometry(generate: Callable, regressor: nn.Module, latent_shape, *, seed: int = 0,
                          anchors: int | None = None, neighbours: int | None = None, radius: float | None = None,
                          device="cpu", num_classes: int = 0, anchor_latents: torch.Tensor | None = None,
                          batch: int = 512) -> dict:
    """The local isometry defect of the map latent -> regressed normalised factors.

    `gsd.evaluation.geometry.local_isometry_defect` (grouped optimal-scale isometry loss, groups
    of an anchor and its K neighbours at radius R) with G's pixels replaced by the regressed
    factors of G's images. Defaults: the pixel figure's fixed settings and seeds
    (`LOCAL_ISOMETRY`, anchors `evaluation_latents(seed, ..., offset=LOCAL_ISOMETRY_SEED_OFFSET)`,
    directions seed LOCAL_DIRECTION_SEED + seed), so the two figures see the same latents.
    `anchor_latents` replaces the seeded anchors.

    Returns {"local_factor_isometry", "local_factor_isometry_stderr" (delete-one-group jackknife),
    "groups_used", "kind_change_fraction" (groups whose regressed kind is not one), and the settings}."""
    loc = dict(LOCAL_ISOMETRY)
    loc.update({k: v for k, v in (("anchors", anchors), ("neighbours", neighbours), ("radius", radius))
                if v is not None})
    g = int(loc["neighbours"]) + 1
    if anchor_latents is None:
        a, labels = evaluation_latents(seed, loc["anchors"], latent_shape, device, num_classes,
                                       offset=LOCAL_ISOMETRY_SEED_OFFSET)
        settings = local_isometry_settings(seed, loc)
    else:
        a = anchor_latents.to(device)
        loc["anchors"] = len(a)
        labels = (torch.arange(len(a), device=device) % num_classes) if num_classes else None
        settings = {**loc, "anchor_seeds": None, "direction_seed": LOCAL_DIRECTION_SEED + int(seed)}
    seen_f, seen_k = [], []

    def factor_map(z, lab=None):
        f, k = regress(regressor, generate(z, lab))
        seen_f.append(f)
        seen_k.append(k)
        return f

    value = local_isometry_defect(factor_map, a, neighbours=g - 1, radius=float(loc["radius"]), labels=labels,
                                  seed=LOCAL_DIRECTION_SEED + int(seed), backend="reference", batch=batch)
    f, kind = torch.cat(seen_f), torch.cat(seen_k)
    z = neighbour_latents(a, neighbours=g - 1, radius=float(loc["radius"]),
                          seed=LOCAL_DIRECTION_SEED + int(seed)).reshape(len(f), -1).cpu()
    ok = torch.isfinite(f).reshape(-1, g, NUM_FACTORS).all(2).all(1)
    keep = ok.repeat_interleave(g)
    kg = kind.reshape(-1, g)[ok]
    return {"local_factor_isometry": value,
            "local_factor_isometry_stderr": _group_jackknife(f[keep], z[keep], g) if bool(ok.any()) else float("nan"),
            "groups_used": int(ok.sum()),
            "kind_change_fraction": float((kg != kg[:, :1]).any(1).double().mean()) if len(kg) else float("nan"),
            **settings, "units": "normalised factors (each factor's range mapped to [0, 1])"}


# --------------------------------------------------------------------------- factor fidelity

def wasserstein_1d(a, b) -> float:
    """Wasserstein-1 distance between two empirical 1-D distributions (any sizes):
    the integral of |F_a - F_b| over the merged sample points."""
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    pts = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, pts[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, pts[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(pts)))


def _factor_distances(f: torch.Tensor, k: torch.Tensor, f_ref: torch.Tensor, k_ref: torch.Tensor,
                      kinds: int) -> dict:
    w = {n: wasserstein_1d(f[:, i].numpy(), f_ref[:, i].numpy()) for i, n in enumerate(shapes.FACTORS)}
    out = {"w1_normalised": w, "w1": {n: w[n] * float(_RANGE[i]) for i, n in enumerate(shapes.FACTORS)},
           "w1_mean_normalised": float(np.mean(list(w.values())))}
    if kinds > 1:
        freq = torch.bincount(k, minlength=kinds).double() / max(len(k), 1)
        ref = torch.bincount(k_ref, minlength=kinds).double() / max(len(k_ref), 1)
        out["kind_frequencies"] = [float(v) for v in freq]
        out["kind_tv"] = float(0.5 * (freq - ref).abs().sum())
    else:
        out["kind_frequencies"], out["kind_tv"] = None, None
    return out


def factor_fidelity(generate: Callable | None, regressor: nn.Module, *, resolution: int, kinds: int,
                    num: int = FACTOR_DEFAULTS["fidelity_samples"], seed: int = 0, device="cpu", num_classes: int = 0,
                    samples: torch.Tensor | None = None, bootstraps: int | None = None) -> dict:
    """G's regressed factor distribution against the training distribution's.

    G's samples are the evaluation's (`one_step_samples(generate, seed, num, ...)`), or `samples`
    when given (then `generate` is not called). The reference is `num` images rendered from
    factors drawn as the data set draws them (fixed seed REAL_SEEDS[0]); both sides go through
    the same regressor, so its bias largely cancels. Rows with non-finite factors are left out.

    Returns {"w1_normalised": {factor: W1}, "w1" (factor units), "w1_mean_normalised",
    "kind_frequencies" (regressed, of G) and "real_kind_frequencies", "kind_tv" (None for one
    kind), "fd", "fd_ci", "kid", "kid_stderr", "precision", "recall" (+ stderrs) in the
    regressor's feature space, "num_samples", "num_nonfinite", and "noise_floor": the same
    figures for an independent rendered draw (REAL_SEEDS[1]) of the same size against the reference}."""
    shape = (1, int(resolution), int(resolution))
    if samples is None:
        samples = one_step_samples(generate, seed, num, shape, device, num_classes)
    n = len(samples)
    ref = _render_set(n, resolution, kinds, torch.Generator().manual_seed(REAL_SEEDS[0]))[0]
    other = _render_set(n, resolution, kinds, torch.Generator().manual_seed(REAL_SEEDS[1]))[0]
    f_ref, k_ref = regress(regressor, ref)
    feat_ref = regressor_features(regressor, ref)

    def side(x):
        f, k = regress(regressor, x)
        feat = regressor_features(regressor, x)
        ok = torch.isfinite(f).all(1) & torch.isfinite(feat).all(1)
        out = _factor_distances(f[ok], k[ok], f_ref, k_ref, kinds)
        out.update(sample_quality(feat[ok].numpy(), feat_ref.numpy(), bootstraps=bootstraps) if int(ok.sum()) >= 2
                   else {"fd": float("nan")})
        out.update(num_samples=int(len(x)), num_nonfinite=int((~ok).sum()))
        return out

    result = side(samples)
    if kinds > 1:
        result["real_kind_frequencies"] = [float(v) for v in torch.bincount(k_ref, minlength=kinds).double() / n]
    result["noise_floor"] = side(other)
    result["noise_floor"]["what"] = (f"rendered vs rendered: an independent draw (seed {REAL_SEEDS[1]}) against the "
                                     f"reference (seed {REAL_SEEDS[0]}), {n} each")
    result["feature"] = SHAPES_FEATURE_NAME
    result["units"] = "w1_normalised: normalised factors; w1: factor units (fractions of the side, radians, intensity)"
    return result


# --------------------------------------------------------------------------- traversal purity

def jacobian(generate: Callable, z: torch.Tensor, labels: torch.Tensor | None = None, *,
             batch: int = 256) -> torch.Tensor:
    """The Jacobian (D_out, d) of generate(z, labels) at one latent z (shape (1, *latent)), float64.

    Rows are computed `batch` at a time by one backward pass through `batch` copies of z, each
    picking one output coordinate. generate must be differentiable (no torch.no_grad inside)."""
    with torch.no_grad():
        d_out = generate(z, labels)[0].numel()
    rows = []
    for start in range(0, d_out, batch):
        idx = torch.arange(start, min(start + batch, d_out), device=z.device)
        m = len(idx)
        zr = z.detach().expand(m, *z.shape[1:]).clone().requires_grad_(True)
        lab = None if labels is None else labels.expand(m)
        with torch.enable_grad():
            out = generate(zr, lab).reshape(m, -1)
            if not out.requires_grad:
                raise ValueError("traversal purity needs a differentiable generate (it ran without autograd)")
            (grad,) = torch.autograd.grad(out[torch.arange(m, device=out.device), idx].sum(), zr)
        rows.append(grad.reshape(m, -1).detach().double().cpu())
    return torch.cat(rows)


def principal_directions(generate: Callable, z: torch.Tensor, k: int, labels: torch.Tensor | None = None, *,
                         batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (k, d), singular values (k,)): the top-k right-singular vectors of G's
    Jacobian at z (unit rows, float64; their sign is arbitrary) and their singular values."""
    _, s, vh = torch.linalg.svd(jacobian(generate, z, labels, batch=batch), full_matrices=False)
    return vh[:k], s[:k]


def traversal_purity(generate: Callable, regressor: nn.Module, latent_shape, *, seed: int = 0,
                     anchors: int = FACTOR_DEFAULTS["purity_anchors"],
                     directions: int = FACTOR_DEFAULTS["purity_directions"],
                     step: float = FACTOR_DEFAULTS["purity_step"], device="cpu", num_classes: int = 0,
                     anchor_latents: torch.Tensor | None = None, direction_vectors: torch.Tensor | None = None,
                     jacobian_batch: int = 256) -> dict:
    """How much of the factor change along each of G's top principal latent directions falls on one factor.

    Anchors: the first `anchors` of the local isometry anchors (`evaluation_latents(seed, ...,
    offset=LOCAL_ISOMETRY_SEED_OFFSET)`), or `anchor_latents`. At each, the top `directions`
    right-singular vectors v of G's Jacobian (`principal_directions`; `direction_vectors` (k, d)
    replaces them, the same at every anchor), and the central difference of the regressed
    normalised factors, c = (f(G(z + step v)) - f(G(z - step v))) / (2 step). The purity of v is
    max_i c_i^2 / sum_i c_i^2 (undefined, left out, when c = 0).

    Returns {"traversal_purity" (mean over anchors and directions), "traversal_purity_stderr"
    (over anchors, of each anchor's mean), "traversal_purity_weighted" (weighted by sum c_i^2),
    "per_direction" (mean purity of the r-th direction over anchors), "per_direction_speed"
    (mean ||c||, normalised factor units per latent unit), "per_direction_factor" (the factor most
    often the largest), "singular_values" (mean per rank), "kind_change_fraction" (steps whose
    regressed kind differs at the two ends), "isotropic_baseline", and the settings}."""
    if anchor_latents is None:
        z_all, labels = evaluation_latents(seed, anchors, latent_shape, device, num_classes,
                                           offset=LOCAL_ISOMETRY_SEED_OFFSET)
    else:
        z_all = anchor_latents.to(device)
        labels = (torch.arange(len(z_all), device=device) % num_classes) if num_classes else None
    h = float(step)
    purities, energies, dominant, singular, kind_changes = [], [], [], [], []
    for a in range(len(z_all)):
        z = z_all[a:a + 1]
        lab = None if labels is None else labels[a:a + 1]
        if direction_vectors is None:
            v, s = principal_directions(generate, z, directions, lab, batch=jacobian_batch)
            singular.append(s)
        else:
            v = direction_vectors.reshape(len(direction_vectors), -1).double()
            v = v / v.norm(dim=1, keepdim=True)
        k = len(v)
        steps = h * v.to(device, z.dtype).reshape(k, *z.shape[1:])
        with torch.no_grad():
            x = generate(torch.cat([z + steps, z - steps]), None if lab is None else lab.expand(2 * k))
        f, kind = regress(regressor, x)
        c = (f[:k] - f[k:]) / (2 * h)
        e = (c * c).sum(1)
        p = (c * c).max(1).values / e
        purities.append(torch.where(e > 0, p, torch.full_like(p, float("nan"))))
        energies.append(e)
        dominant.append((c * c).argmax(1))
        kind_changes.append(kind[:k] != kind[k:])
    p = torch.stack(purities)            # (anchors, k)
    e = torch.stack(energies)
    dom = torch.stack(dominant)
    valid = torch.isfinite(p)
    per_anchor = torch.nanmean(p, dim=1)
    per_anchor = per_anchor[torch.isfinite(per_anchor)]
    na = len(per_anchor)
    weighted = float((p[valid] * e[valid]).sum() / e[valid].sum()) if bool(valid.any()) and e[valid].sum() > 0 \
        else float("nan")
    return {"traversal_purity": float(p[valid].mean()) if bool(valid.any()) else float("nan"),
            "traversal_purity_stderr": float(per_anchor.std() / math.sqrt(na)) if na > 1 else float("nan"),
            "traversal_purity_weighted": weighted,
            "per_direction": [float(v) for v in torch.nanmean(p, dim=0)],
            "per_direction_speed": [float(v) for v in e.sqrt().mean(0)],
            "per_direction_factor": [shapes.FACTORS[int(torch.bincount(dom[:, r], minlength=NUM_FACTORS).argmax())]
                                     for r in range(dom.shape[1])],
            "singular_values": [float(v) for v in torch.stack(singular).mean(0)] if singular else None,
            "kind_change_fraction": float(torch.stack(kind_changes).double().mean()),
            "num_undefined": int((~valid).sum()),
            "isotropic_baseline": ISOTROPIC_PURITY, "anchors": int(len(z_all)), "directions": int(p.shape[1]),
            "step": h, "anchor_seeds": None if anchor_latents is not None else
            [int(seed) * SEED_STRIDE + LOCAL_ISOMETRY_SEED_OFFSET,
             int(seed) * SEED_STRIDE + LOCAL_ISOMETRY_SEED_OFFSET + int(anchors) - 1]}


# --------------------------------------------------------------------------- all of them

def factor_metrics(generate: Callable, *, resolution: int, kinds: int, generate64: Callable | None = None,
                   seed: int = 0, ppl_seed: int | None = None, device="cpu", cache_dir=None, num_classes: int = 0,
                   samples: torch.Tensor | None = None, regressor=None, progress: bool = False,
                   settings: dict | None = None, bootstraps: int | None = None) -> dict:
    """Every factor metric of one generator, with the regressor's held-out errors and the seconds each took.

    generate(eps, labels) -> images (differentiable, for traversal purity); generate64: its
    float64 version for factor PPL (default: generate, fed float64 latents). `samples`: the
    evaluation's one-step samples, reused by factor fidelity. `regressor`: a (model, info) pair
    (default: `factor_regressor(resolution, kinds, cache_dir=...)`). `settings` overrides
    FACTOR_DEFAULTS. `ppl_seed` defaults to seed (give gsd.evaluate's pixel PPL seed to share paths).

    Returns {"regressor": info, "factor_ppl": {...}, "local_factor_isometry": {...},
    "factor_fidelity": {...}, "traversal_purity": {...}, "seconds": {...}, "settings": {...}}."""
    cfg = {**FACTOR_DEFAULTS, **(settings or {})}
    shape = (1, int(resolution), int(resolution))
    seconds = {}
    t0 = time.perf_counter()
    model, info = regressor if regressor is not None else factor_regressor(resolution, kinds, cache_dir=cache_dir,
                                                                           device=device, progress=progress)
    seconds["regressor"] = time.perf_counter() - t0
    out = {"regressor": info}

    t0 = time.perf_counter()
    out["factor_ppl"] = factor_ppl(generate64 or generate, model, shape, num=cfg["ppl_pairs"],
                                   seed=seed if ppl_seed is None else ppl_seed, device=device, num_classes=num_classes)
    seconds["factor_ppl"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loc = cfg["local"]
    out["local_factor_isometry"] = local_factor_isometry(generate, model, shape, seed=seed, anchors=loc["anchors"],
                                                         neighbours=loc["neighbours"], radius=loc["radius"],
                                                         device=device, num_classes=num_classes)
    seconds["local_factor_isometry"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["factor_fidelity"] = factor_fidelity(generate, model, resolution=resolution, kinds=kinds,
                                             num=cfg["fidelity_samples"], seed=seed, device=device,
                                             num_classes=num_classes, samples=samples, bootstraps=bootstraps)
    seconds["factor_fidelity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["traversal_purity"] = traversal_purity(generate, model, shape, seed=seed, anchors=cfg["purity_anchors"],
                                               directions=cfg["purity_directions"], step=cfg["purity_step"],
                                               device=device, num_classes=num_classes)
    seconds["traversal_purity"] = time.perf_counter() - t0
    out["seconds"] = seconds
    out["settings"] = {**cfg, "local": dict(loc), "seed": int(seed),
                       "ppl_seed": int(seed if ppl_seed is None else ppl_seed)}
    return out
