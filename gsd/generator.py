"""The one-step generator as a module and as a file (docs/definitions.md §3.9).

    G = load_generator("runs/cifar10-sid")        # a run directory (its EMA generator)
    G = load_generator("G.safetensors")           # a file written by python -m gsd.export
    G = load_generator("sid.pkl", trust_pickle=True, sigma_init=2.5)   # an official SiD/SiDA snapshot
    x = G(eps, class_labels)                      # D(sigma_init eps; sigma_init): images in [-1, 1]
    u8 = G.images_for_seeds(range(64))            # uint8 NHWC, exactly what gsd.generate writes

Every command that loads a run's generator (gsd.generate, gsd.export, gsd.evaluate, gsd.edit,
the benchmarks) goes through `load_generator`, so a checkpoint's layout (`ema.` and
`generator.` prefixes, `checkpoint_state`) is read here and nowhere else. Nothing from a file
runs: run directories and exports are safetensors (an export is checked like a teacher file:
header against its declared architecture before anything is allocated, finite weights,
float32), pickles go through the restricted unpickler behind --trust-pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gsd import runs
from gsd.errors import UsageError
from gsd.image_files import to_uint8
from gsd.models.networks import ARCHITECTURES, EDMPrecond
from gsd.models.checkpoint import check_state_dict, load_denoiser, read_denoiser_metadata, save_denoiser, to_float32_state
from gsd.sampling.seeds import BLOCK, LABEL_RULES, block_latents, block_seeds, blocked_forward, blocks_of, \
    labels_for_seeds
from gsd.teachers.edm_pickle import load_edm_pickle
from gsd.teachers.loading import PICKLE_SUFFIXES, load_run_teacher
from gsd.util import one_line, resolve_device

__all__ = ["GENERATOR_KIND", "EXPORT_VERSION", "SID_SIGMA_INIT", "OneStepGenerator", "load_generator",
           "export_generator", "save_generator", "checkpoint_state", "check_finite", "source_kind", "config_digest"]

GENERATOR_KIND = "one-step generator"   # gsd_extra["kind"] of an exported file
EXPORT_VERSION = 1
SID_SIGMA_INIT = 2.5                    # SiD's init_sigma: what its generators were trained with


def checkpoint_state(weights: dict, *, raw: bool = False, what: str = "checkpoint") -> dict:
    """The generator's tensors in a run checkpoint: the EMA copy (`ema.` prefix) or, with raw,
    G itself (`generator.`). The one place that knows the checkpoint layout."""
    prefix = "generator." if raw else "ema."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not state:
        raise UsageError(f"{what} holds no {prefix[:-1]} tensors (not a gsd.train checkpoint)")
    return state


def config_digest(cfg: dict) -> str:
    """sha256 of a run configuration in canonical JSON: names the run an export came from."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


class OneStepGenerator(nn.Module):
    """G(eps, class_labels) = D(sigma_init eps; sigma_init, class_labels) for standard-normal eps
    of `sample_shape`: images in `value_range` = [-1, 1] (not clipped; the uint8 rule clips).

    `net` is the denoiser D (an EDMPrecond, or a diffusers teacher's wrapper); `label_dim` > 0
    for a class-conditional generator; `info` says where it came from (source, step, weights).
    `generate` / `images_for_seeds` map seeds to images by the block rule of gsd.sampling.seeds.
    """

    value_range = (-1.0, 1.0)

    def __init__(self, net: nn.Module, sigma_init: float, *, sample_shape: Sequence[int] | None = None,
                 info: dict | None = None):
        super().__init__()
        if not (isinstance(sigma_init, (int, float)) and math.isfinite(sigma_init) and sigma_init > 0):
            raise UsageError(f"sigma_init must be a finite positive number, got {sigma_init!r}")
        self.net = net.eval().requires_grad_(False)
        self.sigma_init = float(sigma_init)
        self.label_dim = int(getattr(net, "label_dim", 0) or 0)
        shape = tuple(int(s) for s in (sample_shape or getattr(net, "sample_shape", ()) or ()))
        if not shape:
            raise UsageError("the generator's sample shape is unknown")
        self.sample_shape = shape
        self.info = dict(info or {})

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3

    def forward(self, eps: torch.Tensor, class_labels=None) -> torch.Tensor:
        # the same arithmetic as gsd.distill.Distiller.generate, so a loaded run reproduces the
        # samples its training evaluated
        dev = self.device
        eps = eps.to(device=dev, dtype=torch.float32)
        sigma = torch.full((eps.shape[0],), self.sigma_init, device=dev)
        return self.net(self.sigma_init * eps, sigma, class_labels)

    # ---------------------------------------------------------------- seeds -> images

    def label_rule(self, labels=None):
        """Check a label choice against the generator: None (the default, 'random' for a
        conditional generator), a class index, or a rule of LABEL_RULES."""
        if not self.label_dim:
            if labels is not None:
                raise UsageError(f"the generator is unconditional; it takes no class (got {labels!r})")
            return None
        if labels is None:
            return "random"
        if isinstance(labels, int) and not isinstance(labels, bool):
            if not 0 <= labels < self.label_dim:
                raise UsageError(f"class {labels} is outside the generator's labels 0-{self.label_dim - 1}")
            return labels
        if labels in LABEL_RULES:
            return labels
        raise UsageError(f"labels must be a class index or one of {', '.join(LABEL_RULES)}, got {labels!r}")

    @torch.no_grad()
    def run_blocks(self, blocks: Sequence[int], labels=None) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
        """(seeds, images, labels) of every seed of the given aligned blocks (gsd.sampling.seeds):
        float32 images on the CPU, one forward pass per block."""
        rule = self.label_rule(labels)
        seeds = [s for b in blocks for s in block_seeds(b)]
        eps = block_latents(blocks, self.sample_shape, self.device)
        lab = labels_for_seeds(seeds, self.label_dim, rule)
        lab_dev = None if lab is None else lab.to(self.device)
        return seeds, blocked_forward(self, eps, lab_dev), lab

    @torch.no_grad()
    def generate(self, seeds: Sequence[int], labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, labels) for `seeds`, in their order: float32 (N, *sample_shape) on the CPU and
        the labels (None when unconditional). A seed's image depends only on the seed, the label
        rule and the generator (each block of BLOCK seeds is computed whole)."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            return torch.zeros((0, *self.sample_shape)), None
        all_seeds, x, lab = self.run_blocks(blocks_of(seeds), labels)
        where = {s: i for i, s in enumerate(all_seeds)}
        idx = torch.tensor([where[s] for s in seeds])
        return x[idx], None if lab is None else lab[idx]

    def images_for_seeds(self, seeds: Sequence[int], labels=None) -> np.ndarray:
        """uint8 (N, H, W, C) images of `seeds`: exactly the pixels gsd.generate writes."""
        if not self.is_image:
            raise UsageError(f"the generator makes samples of shape {self.sample_shape}, not images")
        x, _ = self.generate(seeds, labels)
        check_finite(x, seeds)
        return to_uint8(x)

    # ---------------------------------------------------------------- state

    def load_checkpoint_weights(self, weights: dict, *, raw: bool = False, what: str = "checkpoint") -> None:
        """Replace the weights with a run checkpoint's (`runs.load_checkpoint_weights`)."""
        state = checkpoint_state(weights, raw=raw, what=what)
        check_state_dict(self.net.state_dict(), state, f"{what} does not fit the generator's network")
        state, _ = to_float32_state(state, what)
        self.net.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=True)

    def weights_digest(self) -> str:
        """sha256 of the network's tensors and of sigma_init: what the generator computes."""
        h = hashlib.sha256(repr(self.sigma_init).encode())
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(str(tuple(v.shape)).encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


def check_finite(x: torch.Tensor, seeds: Sequence[int]) -> None:
    """UsageError naming the first seed whose image holds a non-finite value (a broken generator
    must not become arbitrary bytes on disk)."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise UsageError(f"the generator's image for seed {list(seeds)[first]} holds non-finite values "
                         f"({int(bad.sum())} of {len(x)} images in this batch); nothing more is written")


# --------------------------------------------------------------------------- loading

def source_kind(source) -> str:
    """'run', 'pickle' or 'file' for a SOURCE path; UsageError (one line) when it is none."""
    path = os.fspath(source)
    if not os.path.exists(path):
        raise UsageError(f"SOURCE {path}: no such file or folder")
    if os.path.isdir(path):
        if (Path(path) / runs.CONFIG_NAME).is_file():
            return "run"
        raise UsageError(f"SOURCE {path} is a folder but not a run directory (no {runs.CONFIG_NAME}); give a run "
                         f"directory, a generator file from python -m gsd.export, or a SiD .pkl")
    if path.lower().endswith(PICKLE_SUFFIXES):
        return "pickle"
    return "file"


def _from_run(run_dir: Path, *, step, raw: bool) -> tuple[nn.Module, float, dict]:
    """A run's generator, read under a shared lock (never while gsd.train writes the run): the
    newest intact checkpoint (a damaged or incomplete latest one falls back, with a note) or
    checkpoint `step`, checked against config.json and the run's teacher copy."""
    with runs.RunLock(run_dir, shared=True):
        cfg = runs.read_config(run_dir)
        if "sigma_init" not in cfg or "dataset" not in cfg:
            raise UsageError(f"{run_dir} is not a gsd.train run directory (config.json has no dataset/sigma_init)")
        if step is not None and int(step) not in runs.complete_steps(run_dir):
            done = runs.complete_steps(run_dir)
            raise UsageError(f"--step {step}: {run_dir} has no complete checkpoint {step} (complete: "
                             f"{', '.join(map(str, done)) or 'none'})")
        if step is None and not runs.complete_steps(run_dir):
            raise UsageError(f"{run_dir} has no complete checkpoint (nothing to load yet)")
        step, weights, state, note = runs.load_intact_checkpoint(run_dir, None if step is None else int(step))
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
        runs.check_run_matches_checkpoint(run_dir, cfg, state, step, str(run_dir))
        net = load_run_teacher(run_dir, device="cpu", config=cfg)  # G has the teacher's architecture
    what = f"checkpoint {step} of {run_dir}"
    state_dict = checkpoint_state(weights, raw=raw, what=what)
    check_state_dict(net.state_dict(), state_dict, f"{what} does not fit its teacher's network")
    state_dict, _ = to_float32_state(state_dict, what)
    net.load_state_dict(state_dict, strict=True)
    info = {"kind": "run", "source": str(run_dir), "step": int(step), "weights": "raw" if raw else "ema",
            "config": cfg, "config_sha256": config_digest(cfg), "dataset": cfg["dataset"]}
    return net, float(cfg["sigma_init"]), info


def _number(extra: dict, key: str, path: str):
    value = extra.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"generator file {path} has no usable {key} in its metadata ({value!r})")
    return value


def _from_export(path: str) -> tuple[nn.Module, float, dict]:
    try:
        meta = read_denoiser_metadata(path)
    except UsageError as exc:
        raise UsageError(f"SOURCE {path} is neither a run directory nor a generator file ({exc})") from None
    extra = meta["extra"] if isinstance(meta["extra"], dict) else {}
    if extra.get("kind") != GENERATOR_KIND:
        raise UsageError(f"{path} is a gsd denoiser (a teacher), not a one-step generator; write one from a run "
                         f"with python -m gsd.export RUN_DIR --out G.safetensors")
    if extra.get("version") != EXPORT_VERSION:
        raise UsageError(f"generator file {path} has version {extra.get('version')!r}, this gsd reads "
                         f"{EXPORT_VERSION}")
    sigma_init = _number(extra, "sigma_init", path)
    shape = extra.get("sample_shape")
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise UsageError(f"generator file {path} has no usable sample_shape in its metadata ({shape!r})")
    if list(extra.get("value_range", [])) != [-1.0, 1.0]:
        raise UsageError(f"generator file {path} declares value range {extra.get('value_range')!r}; this gsd "
                         f"makes images in [-1, 1]")
    net = load_denoiser(path)  # header checked against the config before allocation; finite; float32
    if tuple(net.sample_shape) != tuple(shape) or int(net.label_dim) != _number(extra, "label_dim", path):
        raise UsageError(f"generator file {path}: its metadata (shape {tuple(shape)}, {extra.get('label_dim')} "
                         f"classes) disagrees with its network ({tuple(net.sample_shape)}, {net.label_dim})")
    info = {"kind": "file", "source": path, **{k: extra[k] for k in ("step", "weights", "dataset",
                                                                       "run_config_sha256", "run") if k in extra}}
    return net, float(sigma_init), info


def _from_pickle(path: str, *, trust_pickle: bool, sigma_init) -> tuple[nn.Module, float, dict]:
    net = load_edm_pickle(path, trust_pickle=trust_pickle, key="ema")  # refuses without trust_pickle
    imp = dict(getattr(net, "import_info", {}) or {})
    info = {"kind": "pickle", "source": path, "weights": "ema", "source_sha256": imp.get("source_sha256"),
            "variant": imp.get("variant")}
    return net, float(SID_SIGMA_INIT if sigma_init is None else sigma_init), info


def load_generator(source, *, step: int | None = None, raw: bool = False, device="cpu",
                   trust_pickle: bool = False, sigma_init: float | None = None) -> OneStepGenerator:
    """The one-step generator in `source`: a run directory (the EMA generator of its latest
    complete checkpoint, or of `step`; G itself with raw), a file from `export_generator`, or
    an official SiD/SiDA snapshot .pkl (its 'ema' network, with trust_pickle; `sigma_init`
    defaults to SiD's 2.5 and applies to pickles only). Float32, eval mode, on `device`.
    UsageError (one line) on any problem."""
    path = os.path.expanduser(os.fspath(source))
    kind = source_kind(path)
    if sigma_init is not None and kind != "pickle":
        raise UsageError(f"--sigma-init is for SiD pickles; {path} records the sigma_init it was trained with")
    if (step is not None or raw) and kind != "run":
        raise UsageError(f"{'--step' if step is not None else '--raw'} needs a run directory; {path} holds one "
                         f"generator")
    dev = resolve_device(device)
    if kind == "run":
        net, s_init, info = _from_run(Path(path), step=step, raw=raw)
    elif kind == "pickle":
        net, s_init, info = _from_pickle(path, trust_pickle=trust_pickle, sigma_init=sigma_init)
    else:
        net, s_init, info = _from_export(path)
    net = net.to(device=dev, dtype=torch.float32)
    return OneStepGenerator(net, s_init, info=info)


def save_generator(out, net: EDMPrecond, sigma_init: float, extra: dict | None = None) -> dict:
    """Write `net` as a one-step generator file (a gsd denoiser file whose metadata says what it
    is: kind, version, sigma_init, label_dim, sample shape, value range, plus `extra`), atomically.
    Returns the metadata."""
    if not isinstance(net, EDMPrecond) or type(net.model).__name__ not in ARCHITECTURES:
        raise UsageError(f"a {type(net).__name__} network cannot be described by a gsd file (only gsd / EDM "
                         f"architectures export)")
    meta = {"kind": GENERATOR_KIND, "version": EXPORT_VERSION, "sigma_init": float(sigma_init),
            "label_dim": int(net.label_dim), "sample_shape": list(net.sample_shape), "value_range": [-1.0, 1.0],
            **(extra or {})}
    try:
        save_denoiser(out, net, extra_metadata=meta)
    except OSError as exc:
        raise UsageError(f"cannot write {out} ({exc.strerror or one_line(exc)})") from None
    return meta


def export_generator(run_dir, out, *, step: int | None = None) -> dict:
    """Write a run's EMA generator alone to `out` (a gsd denoiser safetensors file whose metadata
    says it is a one-step generator: architecture, sigma_init, label_dim, sample shape, value
    range, the step and the sha256 of the run's config.json). Returns that metadata. The caller
    checks `out` first (nothing is written when loading fails)."""
    if not (Path(run_dir) / runs.CONFIG_NAME).is_file():
        raise UsageError(f"{run_dir} is not a run directory (no {runs.CONFIG_NAME}); gsd.export writes a run's "
                         f"generator")
    gen = load_generator(run_dir, step=step)
    if not isinstance(gen.net, EDMPrecond) or type(gen.net.model).__name__ not in ARCHITECTURES:
        raise UsageError(f"{run_dir}: the generator has the architecture of a {type(gen.net).__name__} teacher, "
                         f"which a gsd file cannot describe (only gsd / EDM architectures export); use the run "
                         f"directory itself as SOURCE")
    return save_generator(out, gen.net, gen.sigma_init, {
        "weights": "ema", "step": gen.info["step"], "dataset": gen.info["dataset"],
        "run": Path(run_dir).resolve().name, "run_config_sha256": gen.info["config_sha256"], "block": BLOCK})
