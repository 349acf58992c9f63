"""The sections of an evaluation, shared by `gsd.train`'s end-of-run evaluation and `gsd.evaluate`
(both assembled by gsd.evaluation.assemble.evaluation_sections), one public function per section
(docs/definitions.md §3.6): `evaluation_latents` / `batched` / `one_step_samples` (samples),
`distribution_section` (FD with its bootstrap interval, KID, precision / recall, noise floors;
`mixture_section` for gmm, with NLL and mode-weight error), `geometry_section` (isometry
defects, gsd.evaluation.geometry), `latency_section` (`measure_latency`: a synchronised median
wall time, warm-up excluded); and `summary_rows`, the text of the sample-quality table with
"within noise" labels. The distances are in gsd.evaluation.distances and feature_metrics, the
data sets' feature spaces in gsd.evaluation.assemble.FeatureSpace, the seed ranges in
gsd.seed_ranges.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from gsd.evaluation import feature_metrics as fm
from gsd.evaluation.distances import mmd, mode_coverage, sliced_wasserstein
from gsd.evaluation.feature_metrics import as_numpy64, frechet_distance, within_noise
from gsd.evaluation.geometry import LOCAL_ISOMETRY, isometry_defect, local_isometry_defect
from gsd.sampling.samplers import latents_for_seeds
from gsd.sampling.seeds import BLOCK, blocked_forward
from gsd.seed_ranges import (
    BOOTSTRAP_SEED, ISOMETRY_SEED_OFFSET, LOCAL_DIRECTION_SEED, LOCAL_ISOMETRY_SEED_OFFSET, REAL_SPLIT_SEED, SEED_STRIDE,
    TRUE_SEEDS,
)
from gsd.util import format_value

__all__ = [
    "measure_latency", "batched", "class_labels", "evaluation_latents", "one_step_samples", "latency_section",
    "geometry_section", "local_isometry_settings", "sample_quality", "real_noise_floor", "mixture_section",
    "distribution_section", "noise_verdict", "summary_rows", "LATENCY_METHOD",
]


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


# --------------------------------------------------------------------------- the sections

def batched(fn: Callable, x: torch.Tensor, labels, batch: int = 500) -> torch.Tensor:
    """fn(x_chunk, labels_chunk) over chunks of `batch`, concatenated as float32 on the CPU."""
    out = []
    for i in range(0, len(x), batch):
        lab = None if labels is None else labels[i:i + batch]
        out.append(fn(x[i:i + batch], lab).float().cpu())
    return torch.cat(out)



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
