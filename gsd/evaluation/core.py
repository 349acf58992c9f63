"""The evaluation of a saved run: load it (`load_run`), compose the shared evaluation
sections of gsd.evaluation.metrics on it (`evaluate_loaded`), write eval.json (`evaluate_run`). The
library behind `python -m gsd.evaluate` (whose docstring lists the numbers) and the
evaluation step of gsd.experiments.

The run's generator is loaded by gsd.generator.load_generator, the loader of every command, and
its samples are computed as gsd.generate computes them (whole blocks of seeds); FID runs on
those samples written to uint8 and read back with pytorch-fid's preprocessing, as
`python -m gsd.fid calc` scores image files (docs/definitions.md §3.10)."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gsd import runs
from gsd.config import REQUIRED_CONFIG_KEYS, resolve_config, RUN_DEFAULTS
from gsd.data import GMMDenoiser, load_dataset
from gsd.distill import DistillConfig
from gsd.errors import UsageError
from gsd.evaluation.fid import (
    FID_BOOTSTRAPS, FID_FEATURE_NAME, FID_PREPROCESSING, fid_from_features, fid_weights as fetch_fid_weights,
    file_sha256,
    load_fid_inception, locate_fid_weights, uint8_features,
)
from gsd.evaluation.factors import factor_fidelity, factor_metrics as compute_factor_metrics, factor_regressor
from gsd.evaluation.fid_stats import Reference, extra_metrics, fid_against, load_reference, statistics
from gsd.evaluation.assemble import evaluation_sections, FeatureSpace as _Features
from gsd.evaluation.metrics import (
    batched, evaluation_latents, geometry_section, real_noise_floor, sample_quality, summary_rows,
)
from gsd.seed_ranges import ISOMETRY_SEED_OFFSET, SEED_RANGE_WHY as _SEED_RANGE_WHY, SEED_STRIDE
from gsd.generator import OneStepGenerator, load_generator
from gsd.image_files import to_uint8
from gsd.evaluation.ppl import float64_copy, heun_sample_float64, perceptual_path_length
from gsd.fileio import jsonable, write_json_atomic
from gsd.sampling.samplers import heun_nfe, heun_sample
from gsd.teachers.loading import load_run_teacher
from gsd.util import check_memory, check_output_file, format_value, resolve_device, sampler_table

__all__ = ["EVAL_FORMAT", "EVAL_NAME", "REQUIRED_CONFIG_KEYS", "LoadedRun", "load_run", "evaluate_run",
           "evaluate_loaded", "format_table", "machine_info", "default_num_samples"]

EVAL_FORMAT = "gsd-eval/1"
EVAL_NAME = "eval.json"
# Names under which a run might record a format/version (checked when present).
_FORMAT_KEYS = ("run_format", "gsd_format", "format", "format_version")

# float32 copies of the sample set held at once: latents, one-step samples, teacher samples, features
EVAL_COPIES = 4
# Data sets whose evaluation is the field's FID protocol: 50000 samples by default, and the
# Inception weights are downloaded when missing (digits and gmm have feature spaces of their own)
FID_PROTOCOL_DATASETS = ("cifar10", "folder")
FID_PROTOCOL_SAMPLES = 50_000
# Exact FID through the n x n SVD (with its bootstrap interval and the real-vs-real noise floor)
# while generated x reference samples stay below this; above it, FID from the 2048-d moments
FID_EXACT_MAX_PAIRS = 25_000_000


def default_num_samples(dataset_name: str, dataset_len: int) -> int:
    if dataset_name in FID_PROTOCOL_DATASETS:
        return FID_PROTOCOL_SAMPLES
    return {"digits": dataset_len, "gmm": 4000}.get(dataset_name, 2000)


def machine_info(device) -> dict:
    """CPU model, cores, torch version, device: what a timing depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    dev = torch.device(device)
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- loading a run

@dataclass
class LoadedRun:
    run_dir: Path
    config: dict
    step: int
    dataset: object
    generator: OneStepGenerator  # the checkpoint's EMA generator (gsd.generator.load_generator)
    teacher: torch.nn.Module   # f_phi: the network teacher or the exact gmm denoiser
    teacher_id: str            # identifies the teacher (for caching teacher-side results)
    device: torch.device
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.generator.label_dim)

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.dataset.sample_shape)


def _check_run_config(run_dir: Path, cfg: dict) -> None:
    expected = getattr(runs, "RUN_FORMAT", None)
    for key in _FORMAT_KEYS:
        if key in cfg and expected is not None and str(cfg[key]) != str(expected):
            raise UsageError(f"{run_dir} was written by another gsd version ({key} {cfg[key]!r}; this gsd reads "
                             f"{expected!r})")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise UsageError(f"{run_dir}/{runs.CONFIG_NAME} lacks {', '.join(missing)}: not a run of this gsd "
                         f"version (another version, or not written by gsd.train)")


def _network_id(net: torch.nn.Module) -> str:
    """Content hash of a network's tensors (file bytes differ between identical saves: the
    safetensors metadata order is not stable)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    cfg = getattr(net, "config", None)
    h.update(repr(cfg).encode())
    # a diffusers teacher's noise schedule is not in its state dict
    for attr in ("prediction_type", "betas"):
        value = getattr(net, attr, None)
        if value is not None:
            h.update(repr(value.tolist() if torch.is_tensor(value) else value).encode())
    return h.hexdigest()[:16]


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise UsageError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory")


def load_run(run_dir, *, step: int | None = None, device="cpu") -> LoadedRun:
    """A run's config, data set, teacher and checkpoint; UsageError (one line) on any problem.

    step None: the newest intact checkpoint (a damaged or incomplete latest one falls back,
    with a note on stderr). The checkpoint is checked against config.json and the run's teacher
    copy before anything else is loaded (gsd.generator.load_generator)."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    cfg = runs.read_config(run_dir)
    _check_run_config(run_dir, cfg)
    dev = resolve_device(device)
    known = {k: v for k, v in cfg.items() if k in RUN_DEFAULTS}
    known.pop("resume", None)
    try:
        full = resolve_config(known)
        DistillConfig.from_run_config(full)  # the settings must still make a valid distillation
    except UsageError as exc:
        raise UsageError(f"{run_dir}/{runs.CONFIG_NAME} is not usable by this gsd version ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{run_dir}/{runs.CONFIG_NAME} is not usable by this gsd version "
                         f"({type(exc).__name__}: {exc})") from None
    generator = load_generator(run_dir, step=step, device=dev)
    step = generator.info["step"]

    dataset = load_dataset(full["dataset"], data_root=full.get("data_root"), resolution=full.get("resolution"),
                           shapes_kinds=full["shapes_kinds"], download=False)
    teacher_net = load_run_teacher(run_dir, device=dev, config=cfg, dataset=dataset)  # the one fit check
    if full["exact_teacher"]:
        if dataset.mixture is None:
            raise UsageError(f"{run_dir}: exact_teacher is set but {dataset.name} has no known mixture")
        f_phi = GMMDenoiser(dataset.mixture).to(dev)
        teacher_id = "exact-gmm:" + hashlib.sha256(repr(dataset.mixture.to_dict()).encode()).hexdigest()[:16]
    else:
        f_phi = teacher_net
        teacher_id = "net:" + _network_id(teacher_net)
    if generator.sample_shape != tuple(dataset.sample_shape):
        raise UsageError(f"checkpoint {step} in {run_dir} makes samples of shape {generator.sample_shape}, its data "
                         f"set {tuple(dataset.sample_shape)}")
    teacher = f_phi.to(device=dev, dtype=torch.float32).eval().requires_grad_(False)  # as the Distiller holds it
    return LoadedRun(run_dir=run_dir, config=cfg, step=int(step), dataset=dataset, generator=generator,
                     teacher=teacher, teacher_id=teacher_id, device=dev, extra={"teacher_net": teacher_net})


# --------------------------------------------------------------------------- evaluation

def _inception_key(key: str) -> str:
    """kid -> kid_inception, kid_stderr -> kid_inception_stderr (metrics in the Inception space
    next to those of the data set's own feature space)."""
    if key.endswith("_stderr"):
        return key[:-len("_stderr")] + "_inception_stderr"
    return key + "_inception"


def _teacher_side(run: LoadedRun, eps, labels, feats: _Features, *, ppl_samples, seed, ppl_seed, isometry_latents,
                  teacher_steps) -> dict:
    """Samples and metrics that depend only on the teacher (shared between runs of one teacher)."""

    t0 = time.perf_counter()
    x = batched(lambda e, l: heun_sample(run.teacher, e, l, num_steps=teacher_steps), eps, labels)
    t64 = float64_copy(run.teacher)
    ppl = None
    if ppl_samples > 0:
        ppl = perceptual_path_length(
            lambda z, l=None: heun_sample_float64(t64, z, l, num_steps=teacher_steps), run.sample_shape,
            num=ppl_samples, features=feats.ppl, seed=ppl_seed, device=run.device, batch=128,
            num_classes=run.num_classes)
    geo = geometry_section(lambda e, l: heun_sample(run.teacher, e, l, num_steps=teacher_steps), run.sample_shape,
                           run.device, run.num_classes, seed=seed, isometry_latents=isometry_latents)
    return {"samples": x, "ppl": ppl, **geo, "seconds": time.perf_counter() - t0}


def _check_sizes(shape, num_samples: int, isometry_latents: int, latency_batch: int, ppl_samples: int) -> None:
    """One-line errors for sample counts outside the seed range or the machine's memory."""
    if num_samples < 2:
        raise UsageError(f"--num-samples must be >= 2, got {num_samples}")
    if num_samples > ISOMETRY_SEED_OFFSET:
        raise UsageError(f"--num-samples must be <= {ISOMETRY_SEED_OFFSET} ({_SEED_RANGE_WHY}), got {num_samples}")
    numel = math.prod(shape)
    check_memory(EVAL_COPIES * 4 * num_samples * numel,
                 f"evaluating --num-samples {num_samples} samples of shape {tuple(shape)}", "lower --num-samples")
    check_memory(EVAL_COPIES * 4 * max(isometry_latents, latency_batch) * numel,
                 f"--isometry-latents {isometry_latents} / --latency-batch {latency_batch}", "lower them")
    # PPL draws both ends of every pair and its interpolation weight up front, in float64
    check_memory(3 * 8 * ppl_samples * numel, f"--ppl-samples {ppl_samples} latent pairs of shape {tuple(shape)}",
                 "lower --ppl-samples")


def _fid_network(run: LoadedRun, fid_weights, require_fid: bool, dev):
    """(Inception network or None, its weights file or None, why there is none): decided before
    minutes of sampling, so that a missing file fails first. cifar10 / folder fetch the weights
    when the network is reachable, as pytorch-fid does."""
    ds, shape = run.dataset, run.sample_shape
    fid_path, reason, model = None, None, None
    if len(shape) != 3:
        reason = f"FID needs image data; {ds.name} samples have shape {shape}"
        if fid_weights is not None:
            locate_fid_weights(fid_weights)  # still refuse a --fid-weights that is not a file
    else:
        fid_path, reason = locate_fid_weights(fid_weights)  # a bad --fid-weights is an error
        if fid_path is None:
            try:
                fid_path, reason = fetch_fid_weights(None, download=ds.name in FID_PROTOCOL_DATASETS), None
            except UsageError as exc:
                reason = str(exc)  # names the file and where it goes
        if fid_path is not None:
            model = load_fid_inception(fid_path, dev)
    if model is None and require_fid:
        raise UsageError(f"--require-fid: {reason}")
    return model, fid_path, reason


def _ppl_section(result: dict, run: LoadedRun, tside: dict, feats: _Features, *, ppl_samples: int, ppl_seed: int):
    """PPL of the one-step generator (float64 copy) next to the teacher's (from `tside`)."""
    one, teach = result["one_step"], result["teacher"]
    result["ppl_feature"] = feats.ppl_name
    if ppl_samples <= 0:
        one["ppl"] = teach["ppl"] = None
        return
    g64 = float64_copy(run.generator.net)
    s = run.generator.sigma_init

    def g_fn(z, l=None):
        return g64(s * z, torch.full((z.shape[0],), s, dtype=torch.float64, device=z.device), l)

    ppl_one = perceptual_path_length(g_fn, run.sample_shape, num=ppl_samples, features=feats.ppl, seed=ppl_seed,
                                     device=run.device, batch=256, num_classes=run.num_classes)
    one["ppl"], one["ppl_stderr"] = ppl_one["ppl"], ppl_one["ppl_stderr"]
    tp = tside["ppl"]
    teach["ppl"], teach["ppl_stderr"] = tp["ppl"], tp["ppl_stderr"]
    result["ppl_settings"] = {k: ppl_one[k] for k in ("eps", "percentiles", "num_pairs")}
    result["ppl_settings"]["slerp"] = "latents z1, z2 ~ N(0, I) of the data shape (not normalised)"
    result["ppl_settings"]["num_kept"] = {"one_step": ppl_one["num_kept"], "teacher": tp["num_kept"]}


def _factor_section(result: dict, run: LoadedRun, feats: _Features, samples: dict, *, seed: int, ppl_seed: int,
                    cache_dir, progress: bool) -> None:
    """--dataset shapes: the factor metrics of the one-step generator (gsd.evaluation.factors),
    and the factor fidelity of the teacher's samples beside it."""
    ds = run.dataset
    resolution, kinds = int(ds.sample_shape[-1]), max(1, int(ds.num_classes))
    g64 = float64_copy(run.generator.net)
    s = run.generator.sigma_init

    def g_fn64(z, l=None):
        return g64(s * z, torch.full((z.shape[0],), s, dtype=torch.float64, device=z.device), l)

    regressor = getattr(feats, "regressor", None)
    out = compute_factor_metrics(run.generator, resolution=resolution, kinds=kinds, generate64=g_fn64, seed=seed,
                         ppl_seed=ppl_seed, device=run.device, cache_dir=cache_dir, num_classes=run.num_classes,
                         samples=samples["one_step"], regressor=regressor, progress=progress)
    model = regressor[0] if regressor is not None else factor_regressor(
        resolution, kinds, cache_dir=cache_dir, device=run.device)[0]
    out["teacher_factor_fidelity"] = factor_fidelity(None, model, resolution=resolution, kinds=kinds, seed=seed,
                                                     device=run.device, samples=samples["teacher"])
    result["factors"] = out


def evaluate_loaded(run: LoadedRun, *, num_samples: int | None = None, ppl_samples: int = 512, seed: int = 0,
                    fid_weights=None, require_fid: bool = False, fid_model=None, latency_batch: int = 64,
                    latency_repeats: int = 7, latency_warmup: int = 2, isometry_latents: int = 512, cache_dir=None,
                    classifier_epochs: int = 30, teacher_steps: int = 18, teacher_cache: dict | None = None,
                    progress: bool = False, features: _Features | None = None,
                    fid_ref=None, factor_metrics: bool | None = None) -> tuple[dict, dict]:
    """Every metric of a loaded run; returns (result for eval.json, {"one_step": x, "teacher": x} samples).

    factor_metrics: the factor metrics of --dataset shapes (None: for shapes runs; True on a run
    of another data set is a UsageError, raised before anything is computed).

    FID (with Inception weights from `fid_weights`, the torch hub cache, or, for the FID-protocol
    data sets cifar10 and folder, downloaded into it) is computed on the samples as uint8 images
    against `fid_ref` (reference statistics, gsd.evaluation.fid_stats) or, by default, against
    min(len(data), num_samples) real images rendered to uint8 the same way."""

    t_start = time.perf_counter()
    dev, ds, shape = run.device, run.dataset, run.sample_shape
    if num_samples is None:
        num_samples = default_num_samples(ds.name, len(ds))
    _check_sizes(shape, num_samples, isometry_latents, latency_batch, ppl_samples)
    if factor_metrics and ds.name != "shapes":
        raise UsageError(f"--factor-metrics: the factor metrics need a --dataset shapes run; {run.run_dir} is a "
                         f"{ds.name} run, whose images have no known factors")
    fid_path, fid_reason, ref = None, None, None
    if fid_model is None:
        fid_model, fid_path, fid_reason = _fid_network(run, fid_weights, require_fid, dev)
    if fid_ref is not None:
        if len(shape) != 3:
            raise UsageError(f"--fid-ref: {ds.name} samples have shape {shape}, not images")
        ref = fid_ref if isinstance(fid_ref, Reference) else load_reference(fid_ref, "--fid-ref")

    feats = features or _Features(ds, dev, cache_dir=cache_dir, classifier_epochs=classifier_epochs,
                                  progress=progress, fid_model=fid_model)
    base = int(seed) * SEED_STRIDE
    ppl_seed = 7919 + int(seed)
    key = (run.teacher_id, ds.name, num_samples, int(seed), ppl_samples, isometry_latents, teacher_steps, str(dev),
           feats.ppl_name)
    if teacher_cache is not None and key in teacher_cache:
        tside = teacher_cache[key]
    else:
        eps, labels = evaluation_latents(seed, num_samples, shape, dev, run.num_classes)
        tside = _teacher_side(run, eps, labels, feats, ppl_samples=ppl_samples, seed=seed, ppl_seed=ppl_seed,
                              isometry_latents=isometry_latents, teacher_steps=teacher_steps)
        if teacher_cache is not None:
            teacher_cache[key] = tside

    one = {"sampler": "one-step generator (EMA)", "nfe": 1}
    teach = {"sampler": f"teacher Heun, {teacher_steps} steps", "nfe": heun_nfe(teacher_steps)}
    result: dict = {
        "format": EVAL_FORMAT, "run_dir": str(run.run_dir), "step": run.step, "dataset": ds.name,
        "lambda_sid": run.config.get("lambda_sid"), "lambda_irl": run.config.get("lambda_irl"),
        "seed": int(seed), "num_samples": int(num_samples), "latent_seeds": [base, base + num_samples - 1],
        "teacher_kind": "exact GMM denoiser" if run.config.get("exact_teacher") else "network",
        "one_step": one, "teacher": teach,
        "settings": {"num_samples": int(num_samples), "ppl_samples": int(ppl_samples), "seed": int(seed),
                     "isometry_latents": int(isometry_latents), "latency_batch": int(latency_batch),
                     "latency_repeats": int(latency_repeats), "teacher_steps": int(teacher_steps),
                     "fid_weights": None if fid_weights is None else str(fid_weights)},
    }
    samples = evaluation_sections(
        result, run.generator, lambda e, l: heun_sample(run.teacher, e, l, num_steps=teacher_steps), ds, feats,
        seed=seed, num_samples=num_samples, num_classes=run.num_classes, device=dev,
        isometry_latents=isometry_latents, latency_batch=latency_batch, latency_repeats=latency_repeats,
        latency_warmup=latency_warmup, x_teacher=tside["samples"], teacher_geometry=tside)
    pairs = [(one, samples["one_step"]), (teach, samples["teacher"])]
    # FID: on the samples as uint8 images, pytorch-fid's preprocessing (as gsd.fid calc)
    if fid_model is not None:
        _fid_section(result, run, fid_model, fid_path, ref, pairs, num_samples,
                     primary=feats.fd is None and ds.mixture is None, progress=progress)
    else:
        one["fid"] = teach["fid"] = None
        result["fid"] = result["fid_teacher"] = None
        result["fid_unavailable"] = fid_reason
    _ppl_section(result, run, tside, feats, ppl_samples=ppl_samples, ppl_seed=ppl_seed)
    if ds.name == "shapes" and factor_metrics is not False:
        _factor_section(result, run, feats, samples, seed=seed, ppl_seed=ppl_seed, cache_dir=cache_dir,
                        progress=progress)
    result["machine"] = machine_info(dev)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    return result, {"one_step": samples["one_step"], "teacher": samples["teacher"]}


def _uint8_batches(x: torch.Tensor, size: int = 50):
    for i in range(0, len(x), size):
        yield to_uint8(torch.nan_to_num(x[i:i + size], nan=0.0))


def _fid_section(result: dict, run: LoadedRun, model, weights_path, ref: Reference | None, entries, num_samples: int,
                 *, primary: bool, progress: bool) -> None:
    """FID of each (metrics dict, samples) entry, as gsd.fid calc scores image files, with the
    protocol that makes the number comparable: samples, seeds, reference, weights file."""
    ds = run.dataset
    real = ds.data
    if ref is None:  # the data set rendered to uint8 as generated images are written
        n_real = min(len(real), max(num_samples, 2))
        idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(1))[:n_real]
        f_real = uint8_features(model, _uint8_batches(real[idx]), total=n_real, desc="Inception features (real)",
                                progress=progress)
        mu, sigma = statistics(f_real)
        ref = Reference(mu, sigma, f_real, description=f"{ds.name}: {n_real} of its {len(real)} images rendered to "
                                                         f"uint8 as generated images are (seeded selection 1)")
        ref_info = {"data_set": ds.name, "images": int(n_real), "of": len(real), "selection": "torch randperm seed 1",
                    "rendering": "uint8 by EDM's rule, as generated images"}
    else:
        f_real = ref.features
        ref_info = {"file": ref.path, "sha256": ref.sha256, "features": ref.count}
    exact = f_real is not None and num_samples * len(f_real) <= FID_EXACT_MAX_PAIRS
    nonfinite = {}
    for (m, x), name in zip(entries, ("one_step", "teacher")):
        nonfinite[name] = int((~torch.isfinite(x.reshape(len(x), -1)).all(1)).sum())
        f = uint8_features(model, _uint8_batches(x), total=len(x), desc=f"Inception features ({name})",
                           progress=progress)
        if exact:  # the n x n route: exact FID with its bootstrap interval, KID and precision / recall
            q = sample_quality(f, f_real, fd=fid_from_features, fd_key="fid", bootstraps=FID_BOOTSTRAPS)
        else:
            q = {"fid": fid_against(f, ref), "fid_ci": None}
            if f_real is not None:
                q.update({k: v for k, v in extra_metrics(f, f_real).items() if not k.endswith("_used")})
        m["fid"], m["fid_ci"] = q.pop("fid"), q.pop("fid_ci")
        m.update(q if primary else {_inception_key(k): v for k, v in q.items()})
    if exact:
        floor = real_noise_floor(f_real, num_samples, fd=fid_from_features, fd_key="fid", bootstraps=FID_BOOTSTRAPS)
    else:
        floor = {"what": "not computed: the FID interval and real-vs-real floor need n x n work beyond "
                         f"{FID_EXACT_MAX_PAIRS} pairs (FID itself is exact, from the 2048-d moments)"}
    one, teach = entries[0][0], entries[1][0]
    if primary:
        result["noise_floor"] = floor
        result["kid_feature"] = FID_FEATURE_NAME
    else:
        result["noise_floor_inception"] = floor
    result["fid_bootstraps"] = FID_BOOTSTRAPS if exact else 0
    result["fid"], result["fid_teacher"] = one["fid"], teach["fid"]
    result["fid_feature"] = FID_FEATURE_NAME
    result["fid_real_samples"] = None if f_real is None else int(len(f_real))
    result["fid_unavailable"] = None
    seeds = result["latent_seeds"]
    result["fid_protocol"] = {
        "num_samples": int(num_samples), "latent_seeds": seeds,
        "labels": None if not run.num_classes else f"seed mod {run.num_classes} (gsd.generate --labels balanced)",
        "generation": "gsd.generate's: the EMA generator on aligned blocks of seeds, uint8 by EDM's rule",
        "reference": ref_info, "reference_description": ref.description,
        "weights": None if weights_path is None else str(weights_path),
        "weights_sha256": None if weights_path is None else file_sha256(weights_path),
        "preprocessing": FID_PREPROCESSING, "feature": FID_FEATURE_NAME,
        "nonfinite_samples": {"count": nonfinite, "written as": "NaN as 0, +-inf clipped"},
    }


def evaluate_run(run_dir, *, device="auto", step: int | None = None, write: bool = True, **kw) -> dict:
    """Load a run, evaluate it, write RUN_DIR/eval.json (atomically); returns the result."""

    if kw.get("fid_weights") is not None:
        locate_fid_weights(kw["fid_weights"])  # a bad path fails before the run is loaded
    if kw.get("fid_ref") is not None:
        kw["fid_ref"] = load_reference(kw["fid_ref"], "--fid-ref")  # likewise a bad reference file
    _check_run_dir(Path(run_dir))
    if write:  # a run directory eval.json cannot be written to fails now, not after the evaluation
        check_output_file(Path(run_dir) / EVAL_NAME, "RUN_DIR")
    with runs.RunLock(run_dir, shared=True):  # never scores a run gsd.train is writing
        run = load_run(run_dir, step=step, device=device)
        result, _ = evaluate_loaded(run, **kw)
        if write:
            write_json_atomic(Path(run_dir) / EVAL_NAME, jsonable(result))
    return result


# --------------------------------------------------------------------------- table


def format_table(result: dict) -> str:
    one, teach = result["one_step"], result["teacher"]
    cols = ["nfe", "fd", "fid", "ppl", "isometry_defect", "local_isometry_defect", "latency_ms"]
    cols += [k for k in ("sliced_wasserstein", "mmd", "modes_covered") if k in one]
    names = {"nfe": "NFE", "fd": "FD", "fid": "FID", "ppl": "PPL", "isometry_defect": "iso. defect",
             "local_isometry_defect": "local iso. defect",
             "latency_ms": f"ms/batch {result.get('latency', {}).get('batch', '')}",
             "sliced_wasserstein": "sliced W2", "mmd": "MMD^2", "modes_covered": "modes"}
    lines = sampler_table((("one-step G (EMA)", one), (f"teacher Heun ({teach['nfe']} NFE)", teach)), cols, names)
    lines.append(f"run {result['run_dir']} at step {result['step']}, {result['num_samples']} samples, "
                 f"seed {result['seed']}")
    lines.append(f"FD feature space: {result['fd_feature']}")
    if result.get("fid_unavailable"):
        lines.append(f"FID: not computed ({result['fid_unavailable']})")
    proto = result.get("fid_protocol")
    if proto:
        sha = proto["weights_sha256"]
        lines.append(f"FID protocol: {proto['num_samples']} samples (seeds {proto['latent_seeds'][0]}.."
                     f"{proto['latent_seeds'][1]}) against {proto['reference_description']}; Inception weights "
                     f"{proto['weights']}" + (f" (sha256 {sha[:16]}...)" if sha else ""))
    lines.append(f"PPL feature space: {result['ppl_feature']}")
    lat = result.get("latency")
    if lat:
        lines.append(f"latency reduction one-step vs teacher: {100 * lat['reduction']:.1f}% "
                     f"({lat['speedup']:.1f}x) on {result['machine']['device']}")
    if "real_split_fd" in result:
        lines.append(f"FD between two halves of the real data (noise floor): {format_value(result['real_split_fd'])}")
    if "true_vs_true" in result:
        lines.append(f"true mixture vs true mixture: FD {format_value(result['true_vs_true']['fd'])}, sliced W2 "
                     f"{format_value(result['true_vs_true']['sliced_wasserstein'])}")

    lines += ["", "sample quality (value ± stderr or [95% bootstrap interval]; noise: 2 stderr, overlapping "
                  "intervals, or the noise floor):", summary_rows(result)]
    if result.get("factors"):
        lines += ["", _factor_lines(result["factors"])]
    return "\n".join(lines)


def _factor_lines(f: dict) -> str:
    """The factor metrics of a shapes run as text (normalised factor units)."""
    ppl, loc, fid, pur = f["factor_ppl"], f["local_factor_isometry"], f["factor_fidelity"], f["traversal_purity"]
    rmse = f["regressor"]["rmse_normalised"]
    return "\n".join([
        "factor metrics (normalised factor units; gsd.evaluation.factors):",
        f"  factor PPL {format_value(ppl['factor_ppl'])} ± {format_value(ppl['factor_ppl_stderr'])}, local factor "
        f"isometry defect {format_value(loc['local_factor_isometry'])} ± "
        f"{format_value(loc['local_factor_isometry_stderr'])}, traversal purity "
        f"{format_value(pur['traversal_purity'])} ± {format_value(pur['traversal_purity_stderr'])} (isotropic "
        f"{format_value(pur['isotropic_baseline'])})",
        f"  factor fidelity: mean W1 {format_value(fid['w1_mean_normalised'])} (teacher "
        f"{format_value(f['teacher_factor_fidelity']['w1_mean_normalised'])}), kind TV "
        f"{format_value(fid.get('kind_tv'))}",
        "  regressor held-out RMSE: " + ", ".join(f"{k} {format_value(v)}" for k, v in rmse.items()),
    ])
