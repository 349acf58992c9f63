"""Variance-preserving diffusers U-Nets as EDM denoisers.

A DDPM-style model trained with the discrete VP schedule ``alpha_bar_i = prod_{j<=i} (1 - beta_j)``
(i = 0..T-1) sees ``x_vp = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``. Dividing by
``sqrt(alpha_bar)`` gives EDM's ``x = x0 + sigma eps`` with

    sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i),   so   x_vp = x / sqrt(1 + sigma^2).

`DiffusersTeacher` evaluates, for an EDM noise level sigma,

    t     = the continuous timestep whose log-sigma interpolates the discrete table linearly
            (t = i + (ln sigma - ln sigma_i) / (ln sigma_{i+1} - ln sigma_i)), clamped to [0, T-1]
    out   = unet(x / sqrt(1 + sigma^2), t).sample
    D(x; sigma) = x - sigma * out                                    (prediction_type 'epsilon')
                = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * out (prediction_type 'v_prediction')
                = out                                                (prediction_type 'sample')

Interpolating in ln sigma (rather than in t or in alpha_bar) is the usual choice (k-diffusion's
``sigma_to_t``): ln sigma is smooth and monotone in t, and the network's sinusoidal
timestep embedding accepts fractional timesteps. Outside [sigma_0, sigma_{T-1}] the timestep
is clamped to the end of the table while the input scaling uses the true sigma. The
alpha_bar used in the formulas is 1 / (1 + sigma^2) of the *requested* sigma, consistent with
the input scaling. alpha_bar is computed in float32 like diffusers' schedulers (so the sigma
table is the one the model was trained on; near t = 0 float32 rounding moves sigma by ~1e-4
relative), the table and the interpolation then run in float64.

Models whose U-Net predicts 2*C channels (learned variance, as in improved DDPM / ADM
exports) use the first C channels. Supported: ``UNet2DModel`` with positional timestep
embedding, optional class conditioning by ``num_class_embeds``; schedules linear,
scaled_linear, squaredcos_cap_v2 or explicit ``trained_betas``. Refused with a clear error:
other model classes (``UNet2DConditionModel``, VAEs, ...), VE / score-SDE models (Fourier
timestep embedding, ``ScoreSdeVeScheduler``), learned timestep embeddings, zero-terminal-SNR
schedules.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gsd.errors import UsageError
from gsd.util import one_line as _one_line
from gsd.models.networks import check_sigma_data
from gsd.models.checkpoint import build_on_meta, note_float32_cast

__all__ = ["DiffusersTeacher", "load_diffusers_teacher", "save_diffusers_teacher", "vp_betas",
           "is_diffusers_folder", "DEFAULT_SCHEDULE"]

DEFAULT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MAX_TRAIN_TIMESTEPS = 100_000  # real schedules have ~1000 steps; the sigma table is built in memory
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
_VE_SCHEDULERS = ("ScoreSdeVeScheduler", "KarrasVeScheduler")


def _beta(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UsageError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def vp_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
             beta_schedule: str = "linear", trained_betas=None) -> torch.Tensor:
    """The discrete beta schedule (float64, length T) of a diffusers VP scheduler config.

    The values come from a scheduler_config.json, so each is checked before use: T an integer
    in [2, MAX_TRAIN_TIMESTEPS], betas numbers in (0, 1), beta_start <= beta_end."""
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, int) or not 2 <= T <= MAX_TRAIN_TIMESTEPS:
        raise UsageError(f"num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}], got {T!r}")
    if trained_betas is not None:
        if not isinstance(trained_betas, (list, tuple)) or not 2 <= len(trained_betas) <= MAX_TRAIN_TIMESTEPS:
            raise UsageError(f"trained_betas must be a list of 2 to {MAX_TRAIN_TIMESTEPS} numbers")
        betas = torch.tensor([_beta(f"trained_betas[{i}]", b) for i, b in enumerate(trained_betas)],
                             dtype=torch.float64)
        T = betas.numel()
    else:
        if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise UsageError(f"unsupported beta_schedule {beta_schedule!r} (supported: linear, scaled_linear, "
                             f"squaredcos_cap_v2, or trained_betas)")
        if beta_schedule != "squaredcos_cap_v2":
            beta_start, beta_end = _beta("beta_start", beta_start), _beta("beta_end", beta_end)
            if beta_start > beta_end:
                # decreasing betas still give an increasing sigma table, but VP models are not
                # trained that way: almost certainly swapped values
                raise UsageError(f"beta_start {beta_start} is larger than beta_end {beta_end} (a reversed "
                                 f"schedule: swapped values?)")
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        else:
            def abar(t):
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                                 dtype=torch.float64)
    if not ((betas > 0) & (betas < 1)).all():
        raise UsageError("beta schedule has values outside (0, 1)")
    return betas


class DiffusersTeacher(nn.Module):
    """EDM denoiser D(x; sigma, class_labels) around a VP diffusers ``UNet2DModel`` (see module doc).

    Attributes like `gsd.models.networks.EDMPrecond`: ``sigma_data`` (0.5), ``label_dim``,
    ``sample_shape``, plus ``sigma_min`` / ``sigma_max`` of the discrete table.
    """

    def __init__(self, unet: nn.Module, betas: torch.Tensor | None = None, prediction_type: str = "epsilon",
                 sigma_data: float = 0.5, source: str | None = None):
        super().__init__()
        cfg = getattr(unet, "config", None)
        if cfg is None:
            raise UsageError("DiffusersTeacher needs a diffusers UNet2DModel (no .config)")
        if prediction_type not in PREDICTION_TYPES:
            raise UsageError(f"unsupported prediction_type {prediction_type!r} (supported: "
                             f"{', '.join(PREDICTION_TYPES)})")
        _check_unet_config(dict(cfg), source or "UNet2DModel")
        self.unet = unet
        self.prediction_type = prediction_type
        try:
            self.sigma_data = check_sigma_data(sigma_data)
        except ValueError as exc:
            raise UsageError(f"{source or 'diffusers teacher'}: {exc}") from None
        self.source = source
        in_ch, out_ch = int(cfg["in_channels"]), int(cfg["out_channels"])
        self.learned_variance = out_ch == 2 * in_ch
        size = cfg.get("sample_size")
        if isinstance(size, (list, tuple)):
            size = tuple(int(s) for s in size)
        else:
            size = (int(size), int(size)) if size is not None else None
        self.sample_shape = (in_ch, *size) if size is not None else ()
        self.label_dim = int(cfg.get("num_class_embeds") or 0)
        betas = vp_betas(**{k: DEFAULT_SCHEDULE[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                              "beta_schedule")}) if betas is None else betas
        betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
        self.betas = betas  # plain attribute (float64, CPU), not a buffer: .to(dtype) must not round it
        # alpha_bar in float32 as diffusers computes it (what the model saw in training), then float64.
        alpha_bar = torch.cumprod(1 - betas.to(torch.float32), 0).to(torch.float64)
        sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
        if not (torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas[1:] > sigmas[:-1]).all()):
            raise UsageError("the beta schedule does not give a finite, increasing sigma table "
                             "(zero-terminal-SNR schedules are not supported)")
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self.num_train_timesteps = int(betas.numel())
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])
        self._table_cache: dict[Any, torch.Tensor] = {}

    # -- schedule ---------------------------------------------------------------------------
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for each sigma: linear interpolation of the ln sigma table, clamped."""
        key = sigma.device
        table = self._table_cache.get(key)
        if table is None:
            table = self._table_cache.setdefault(key, self.log_sigmas.to(sigma.device))
        ls = sigma.to(torch.float64).clamp_min(1e-30).log()
        hi = torch.searchsorted(table, ls).clamp(1, table.numel() - 1)
        lo = hi - 1
        w = (ls - table[lo]) / (table[hi] - table[lo])
        return (lo.to(torch.float64) + w).clamp(0, table.numel() - 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of `sigma_to_t` on [0, T-1] (interpolates ln sigma linearly in t)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        table = self.log_sigmas.to(t.device)
        return ((1 - w) * table[lo] + w * table[lo + 1]).exp()

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    # -- denoiser ---------------------------------------------------------------------------
    def _labels(self, class_labels, n: int, device):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            raise UsageError("this diffusers model is class-conditional: pass class labels")
        labels = torch.as_tensor(class_labels, device=device)
        if labels.is_floating_point() or (labels.ndim == 2 and labels.shape[1] == self.label_dim):
            labels = labels.reshape(n, self.label_dim)
            idx = labels.argmax(dim=1)
            if not torch.equal(F.one_hot(idx, self.label_dim).to(labels.dtype), labels):
                raise ValueError("a diffusers class embedding needs one-hot labels (soft or zero labels "
                                 "cannot be represented)")
            return idx
        idx = labels.reshape(-1).long()
        if idx.numel() == 1 and n > 1:
            idx = idx.expand(n)
        if idx.numel() != n:
            raise ValueError(f"{idx.numel()} class labels for a batch of {n}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.label_dim):
            raise ValueError(f"class label out of range [0, {self.label_dim})")
        return idx

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(n)
        if sigma.numel() != n:
            raise ValueError(f"sigma has {sigma.numel()} elements for a batch of {n}")
        s = sigma.reshape(n, *([1] * (x.ndim - 1)))
        t = self.sigma_to_t(sigma)
        x_vp = x / (1 + s ** 2).sqrt()
        unet_dtype = next(self.unet.parameters()).dtype
        labels = self._labels(class_labels, n, x.device)
        out = self.unet(x_vp.to(unet_dtype), t.to(torch.float32), class_labels=labels).sample.to(dtype)
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (1 + s ** 2) - s / (1 + s ** 2).sqrt() * out
        return out


# ----------------------------------------------------------------------------------------
# Folders.

def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return data


def _check_unet_config(cfg: dict, where: str) -> None:
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise UsageError(f"{where} holds a {cls}, not a UNet2DModel: only unconditional or class-conditional "
                         f"pixel-space UNet2DModel teachers are supported")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise UsageError(f"{where}: time_embedding_type {cfg.get('time_embedding_type')!r} is not supported "
                         f"(Fourier embeddings are VE / score-SDE models; only VP models with positional "
                         f"timestep embeddings are)")
    if cfg.get("center_input_sample"):
        raise UsageError(f"{where}: center_input_sample=True models (inputs in [0, 1]) are not supported")
    if cfg.get("class_embed_type") not in (None,):
        raise UsageError(f"{where}: class_embed_type {cfg.get('class_embed_type')!r} is not supported "
                         f"(only num_class_embeds with the default embedding)")
    in_ch, out_ch = _cfg_int(cfg, "in_channels", 3, where), _cfg_int(cfg, "out_channels", 3, where)
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        for v in size:
            _cfg_int({"sample_size": v}, "sample_size", None, where, hi=MAX_SAMPLE_SIZE)
    elif size is not None:
        _cfg_int(cfg, "sample_size", None, where, hi=MAX_SAMPLE_SIZE)
    if cfg.get("num_class_embeds") is not None:
        _cfg_int(cfg, "num_class_embeds", None, where)
    layers = cfg.get("layers_per_block", 2)
    for v in (layers if isinstance(layers, (list, tuple)) else [layers]):
        _cfg_int({"layers_per_block": v}, "layers_per_block", None, where)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not value):
            raise UsageError(f"{where}: {key} must be a non-empty list, got {value!r}")
    if out_ch not in (in_ch, 2 * in_ch):
        raise UsageError(f"{where}: {out_ch} output channels for {in_ch} input channels "
                         f"(expected {in_ch}, or {2 * in_ch} with learned variance)")


MAX_SAMPLE_SIZE = 8192  # as gsd.models.networks.MAX_IMG_RESOLUTION


def _cfg_int(cfg: dict, key: str, default, where: str, lo: int = 1, hi: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UsageError(f"{where}: config.json {key} must be an integer {bounds}, got {value!r}")
    return value


_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _weight_shapes(unet_dir: str) -> tuple[dict, set]:
    """({name: shape}, {dtype names}) of the weights diffusers would load from `unet_dir`, read
    without materialising them (safetensors headers; a .bin is memory-mapped)."""
    from safetensors import safe_open

    names = [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(unet_dir, n))]
    if not names:
        raise UsageError(f"{unet_dir} has no weights file ({', '.join(WEIGHT_FILES[::2])})")
    first = os.path.join(unet_dir, names[0])
    files = [first]
    if first.endswith(".index.json"):
        weight_map = _read_json(first).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UsageError(f"{first} has no weight_map")
        files = sorted({os.path.join(unet_dir, os.path.basename(str(f))) for f in weight_map.values()})
    shapes, dtypes = {}, set()
    for f in files:
        try:
            if f.endswith(".safetensors"):
                with safe_open(f, framework="pt") as fh:
                    for key in fh.keys():
                        view = fh.get_slice(key)
                        shapes[key] = tuple(view.get_shape())
                        dtypes.add(_ST_DTYPES.get(str(view.get_dtype()), str(view.get_dtype())))
            else:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                    state = torch.load(f, map_location="cpu", weights_only=True)
                if not isinstance(state, dict):
                    raise ValueError(f"holds a {type(state).__name__}, expected a state dict")
                for key, value in state.items():
                    if not torch.is_tensor(value):
                        raise ValueError(f"{key} is a {type(value).__name__}, expected a tensor")
                    shapes[str(key)] = tuple(value.shape)
                    dtypes.add(str(value.dtype).replace("torch.", ""))
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - several libraries, many exception types
            raise UsageError(f"cannot read the weights {f} ({type(exc).__name__}: {_one_line(exc)[:300]})") from None
    return shapes, dtypes


def _check_weights_match_config(unet_cls, cfg: dict, unet_dir: str) -> set:
    """Refuse a config.json that does not describe the weights beside it, before diffusers
    builds anything: a config of a few bytes (layers_per_block 100000) would otherwise make it
    allocate without bound. A cheap block count first, then a build on the meta device."""

    shapes, dtypes = _weight_shapes(unet_dir)
    odd = sorted(d for d in dtypes if d not in ("float16", "bfloat16", "float32", "float64"))
    if odd:
        raise UsageError(f"{unet_dir}: the weights hold {', '.join(odd)} tensors, expected floating point")
    layers = cfg.get("layers_per_block", 2)
    layers = sum(layers) if isinstance(layers, (list, tuple)) else layers
    blocks = len(cfg.get("down_block_types") or ()) * layers
    if 6 * blocks > len(shapes):  # a ResnetBlock2D holds at least 6 tensors (2 norms, 2 convs, 1 linear)
        raise UsageError(f"{unet_dir}: config.json asks for {blocks} down-sampling ResNet blocks (at least "
                         f"{6 * blocks} tensors), the weights hold {len(shapes)} tensors")
    try:
        meta = build_on_meta(lambda: unet_cls.from_config(cfg))
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for a bad config
        raise UsageError(f"{unet_dir}: config.json does not describe a buildable UNet2DModel "
                         f"({type(exc).__name__}: {_one_line(exc)[:300]})") from None
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    if set(expected) == set(shapes):
        for key, shape in expected.items():
            if shapes[key] != shape:
                raise UsageError(f"{unet_dir}: the weights do not match config.json: {key} has shape "
                                 f"{shapes[key]}, expected {shape}")
    else:
        # diffusers renames some legacy attention weights on load: compare the sizes only
        want = sum(math.prod(v) for v in expected.values())
        have = sum(math.prod(v) for v in shapes.values())
        if want != have:
            raise UsageError(f"{unet_dir}: the weights do not match config.json: it describes {want} "
                             f"parameters, the weights hold {have}")
    return dtypes


def _locate(path: str) -> tuple[str, str | None]:
    """(unet folder, scheduler config file or None) of a UNet folder or a pipeline folder."""
    if not os.path.exists(path):
        raise UsageError(f"diffusers folder {path} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not a folder (a diffusers model is a folder with config.json)")
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        info = _read_json(index)
        entry = info.get("unet")
        if not entry:
            comps = ", ".join(f"{k}={v[1] if isinstance(v, list) and len(v) > 1 else v}"
                              for k, v in info.items() if not k.startswith("_"))
            raise UsageError(f"pipeline {path} ({info.get('_class_name', '?')}) has no 'unet' component "
                             f"({comps}); a UNet2DModel is needed")
        if isinstance(entry, list) and len(entry) > 1 and entry[1] != "UNet2DModel":
            raise UsageError(f"pipeline {path} has a {entry[1]} unet, not a UNet2DModel: only pixel-space "
                             f"UNet2DModel teachers are supported")
        unet_dir = os.path.join(path, "unet")
        sched = os.path.join(path, "scheduler", "scheduler_config.json")
        return unet_dir, sched if os.path.isfile(sched) else None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{path} is not a diffusers model folder (no config.json or model_index.json)")
    sched = None
    for cand in (os.path.join(path, "scheduler_config.json"), os.path.join(path, "scheduler", "scheduler_config.json")):
        if os.path.isfile(cand):
            sched = cand
            break
    return path, sched


def is_diffusers_folder(path) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "config.json"))
                                    or os.path.isfile(os.path.join(path, "model_index.json")))


def _schedule(sched_path: str | None) -> tuple[torch.Tensor, str, dict]:
    cfg = dict(DEFAULT_SCHEDULE)
    if sched_path is not None:
        raw = _read_json(sched_path)
        cls = raw.get("_class_name", "")
        if cls in _VE_SCHEDULERS:
            raise UsageError(f"{sched_path}: {cls} is a variance-exploding scheduler; only VP models are supported")
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "prediction_type"):
            if raw.get(key) is not None:
                cfg[key] = raw[key]
        if raw.get("rescale_betas_zero_snr"):
            raise UsageError(f"{sched_path}: zero-terminal-SNR schedules (rescale_betas_zero_snr) are not "
                             f"supported (sigma is infinite at the last step)")
    pred = cfg["prediction_type"]
    if pred not in PREDICTION_TYPES:
        raise UsageError(f"unsupported prediction_type {pred!r} in {sched_path} (supported: "
                         f"{', '.join(PREDICTION_TYPES)})")
    betas = vp_betas(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"],
                     cfg.get("trained_betas"))
    return betas, pred, cfg


def load_diffusers_teacher(path, device="cpu", sigma_data: float = 0.5) -> DiffusersTeacher:
    """`DiffusersTeacher` from a local folder: a UNet2DModel folder (config.json + weights, with an
    optional scheduler_config.json beside it or in scheduler/), or a pipeline folder (model_index.json,
    unet/, scheduler/). Default schedule without a scheduler config: linear 1e-4..0.02, T = 1000,
    epsilon prediction. UsageError (one line) for anything else."""
    path = os.fspath(path)
    unet_dir, sched_path = _locate(path)
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        raise UsageError(f"{unet_dir} has no config.json")
    cfg = _read_json(os.path.join(unet_dir, "config.json"))
    _check_unet_config(cfg, unet_dir)
    betas, pred, _ = _schedule(sched_path)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UsageError("diffusers teachers need the diffusers package: pip install 'gsd[diffusers]'") from None
    stored = _check_weights_match_config(UNet2DModel, cfg, unet_dir)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types
        raise UsageError(f"cannot load the UNet2DModel in {unet_dir} ({type(exc).__name__}: "
                         f"{_one_line(exc)[:300]})") from None
    _to_float32_checked(unet, unet_dir, stored)
    net = DiffusersTeacher(unet, betas=betas, prediction_type=pred, sigma_data=sigma_data, source=path)
    return net.to(device).eval()


def _to_float32_checked(unet: nn.Module, where: str, stored: set) -> None:
    """float32 whatever the weights file stores (`stored`: its dtype names; the teacher's storage
    precision must not become the training precision, and a note says so), and every weight
    finite after the cast."""
    others = sorted(set(stored) - {"float32"})
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in list(unet.parameters()) + list(unet.buffers())):
        # torch's own .to: diffusers' override warns about keep-in-fp32 modules on every cast
        nn.Module.to(unet, torch.float32)
    for name, t in list(unet.named_parameters()) + list(unet.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UsageError(f"{where}: the weights have non-finite values in {name}")
    note_float32_cast(others, where)


def save_diffusers_teacher(net: DiffusersTeacher, folder) -> str:
    """Write `net` as a folder `load_diffusers_teacher` reads back (UNet weights + config, and a
    scheduler_config.json holding the exact betas and prediction type)."""
    folder = os.fspath(folder)
    net = getattr(net, "module", None) or net
    net.unet.save_pretrained(folder)
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": net.num_train_timesteps,
             "beta_schedule": "linear", "trained_betas": [float(b) for b in net.betas],
             "prediction_type": net.prediction_type}
    with open(os.path.join(folder, "scheduler_config.json"), "w", encoding="utf-8") as fh:
        json.dump(sched, fh)
    return folder
