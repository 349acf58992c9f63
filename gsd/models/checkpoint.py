"""The denoiser file format: a `.safetensors` file whose metadata holds the network's config
(`gsd_format` "gsd-denoiser/1", `gsd_config`, optional `gsd_extra`). `save_denoiser` writes it
atomically; `load_denoiser` checks the config against the file's tensors (a cheap block
count, then the names and shapes of a build on the meta device) before allocating anything,
and loads float32 whatever the file stores. The checks are shared with the other readers of
network files (gsd.teachers, gsd.generator): `check_state_dict`, `to_float32_state`,
`min_tensor_count`, `build_on_meta`."""

from __future__ import annotations

import inspect
import json
import os
import sys

import torch

from gsd.errors import UsageError
from gsd.fileio import atomic_write_bytes
from gsd.models.networks import ARCHITECTURES, EDMPrecond, FORMAT_NAME, FORMAT_VERSION, build_denoiser
from gsd.util import one_line as _one_line

__all__ = ["save_denoiser", "load_denoiser", "read_denoiser_metadata", "check_state_dict", "to_float32_state",
           "note_float32_cast", "min_tensor_count", "build_on_meta"]


def min_tensor_count(arch, model_kwargs) -> int:
    """A cheap lower bound on the number of tensors a network of this config holds, from its block
    counts alone (nothing is built). Loaders compare it with the tensors a file really holds
    before building anything, so that a few bytes of config (num_blocks 10**7) cannot make them
    build without bound. 0 when the arguments are not usable (the constructor then says why)."""
    cls = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    if cls is None or not isinstance(model_kwargs, dict):
        return 0
    params = inspect.signature(cls).parameters

    def arg(name):
        if name in model_kwargs:
            return model_kwargs[name]
        return params[name].default if name in params else None

    blocks = arg("num_blocks")
    if isinstance(blocks, bool) or not isinstance(blocks, int):
        return 0
    if "channel_mult" in params:
        mult = arg("channel_mult")
        if not isinstance(mult, (list, tuple)):
            return 0
        # per level num_blocks encoder and num_blocks + 1 decoder blocks of >= 8 tensors each
        return 8 * len(mult) * (2 * blocks + 1)
    return 10 * blocks  # MLP blocks: two norms, three linear layers


def build_on_meta(build):
    """`build()` on the meta device: the module tree and tensor shapes without any memory."""
    with torch.device("meta"):
        return build()


def save_denoiser(path, net: EDMPrecond, extra_metadata: dict | None = None) -> str:
    """Write `net` as safetensors with its config (and `extra_metadata`) in the metadata.

    Atomic (gsd.fileio.atomic_write_bytes). Returns the path.
    """
    from safetensors.torch import save as st_save

    path = os.fspath(path)
    for _ in range(3):  # unwrap DistributedDataParallel / torch.compile wrappers
        if isinstance(net, EDMPrecond):
            break
        net = getattr(net, "module", None) or getattr(net, "_orig_mod", None) or net
    metadata = {"gsd_format": f"{FORMAT_NAME}/{FORMAT_VERSION}", "gsd_config": json.dumps(net.config)}
    if extra_metadata:
        metadata["gsd_extra"] = json.dumps(extra_metadata, default=str)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    blob = st_save(tensors, metadata=metadata)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, blob)
    return path


def _read_metadata(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise UsageError(f"denoiser file {path} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"denoiser file {path} is a directory, expected a .safetensors file")
    try:
        with safe_open(path, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for bad files
        raise UsageError(f"denoiser file {path} is not a readable safetensors file ({_one_line(exc)})") from None


def read_denoiser_metadata(path) -> dict:
    """{'config': dict, 'extra': dict} from a denoiser file's metadata (UsageError if not ours)."""
    path = os.fspath(path)
    meta = _read_metadata(path)
    if "gsd_config" not in meta or not str(meta.get("gsd_format", "")).startswith(FORMAT_NAME + "/"):
        raise UsageError(f"denoiser file {path} is not a gsd denoiser checkpoint (no gsd config in its metadata)")
    version = meta["gsd_format"].split("/", 1)[1]
    if version != str(FORMAT_VERSION):
        raise UsageError(f"denoiser file {path} has format version {version}, this gsd reads {FORMAT_VERSION}")
    try:
        config = json.loads(meta["gsd_config"])
        extra = json.loads(meta["gsd_extra"]) if "gsd_extra" in meta else {}
    except ValueError as exc:
        raise UsageError(f"denoiser file {path} has a corrupt config ({_one_line(exc)})") from None
    return {"config": config, "extra": extra}


def _shape_of(value) -> tuple:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def check_state_dict(expected: dict, state: dict, problem: str) -> None:
    """Raise a one-line UsageError starting with `problem` unless `state` has exactly the
    tensor names and shapes of `expected` (a module's state_dict). Values may be tensors or
    shapes (tuples), so that a file's header can be checked before its data is read."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise UsageError(f"{problem}: {'; '.join(parts)}")
    for key, ref in expected.items():
        if _shape_of(state[key]) != _shape_of(ref):
            raise UsageError(f"{problem}: {key} has shape {_shape_of(state[key])}, expected {_shape_of(ref)}")


def _read_header(path: str) -> dict:
    """{name: (shape, safetensors dtype string)} of a safetensors file, without reading the data."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            out = {}
            for key in fh.keys():
                view = fh.get_slice(key)
                out[key] = (tuple(view.get_shape()), str(view.get_dtype()))
            return out
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise UsageError(f"denoiser file {path} is not a readable safetensors file ({_one_line(exc)})") from None


def to_float32_state(tensors: dict, what: str) -> tuple[dict, list]:
    """Every tensor as float32, refusing non-float and non-finite values (checked after the cast:
    float64 1e300 becomes inf). Returns (state, sorted names of the other dtypes the file used).
    The teacher file's storage precision must not become the training precision."""
    state, others = {}, set()
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise UsageError(f"{what} has non-float values in {key} ({value.dtype})")
        if value.dtype != torch.float32:
            others.add(str(value.dtype).replace("torch.", ""))
        v32 = value.to(torch.float32)
        if not torch.isfinite(v32).all():
            raise UsageError(f"{what} has non-finite values in {key}"
                             + (" once converted to float32" if torch.isfinite(value).all() else ""))
        state[key] = v32
    return state, sorted(others)


def note_float32_cast(others: list, what: str) -> None:
    if others:
        print(f"note: {what} stores {', '.join(others)} weights; loaded as float32", file=sys.stderr, flush=True)


def load_denoiser(path, device="cpu") -> EDMPrecond:
    """Rebuild and load a denoiser written by `save_denoiser`; UsageError (one line) on any problem.

    The config in the metadata is checked against the tensors in the file (a cheap block count,
    then names and shapes of a build on the meta device) before anything is allocated. The
    network is float32 whatever dtype the file stores (a note says so), in eval mode, and has
    `.metadata` (the extra metadata dict).
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    info = read_denoiser_metadata(path)
    config = info["config"]
    header = _read_header(path)
    problem = f"denoiser file {path} does not match its config"
    try:
        if not isinstance(config, dict):
            raise ValueError("denoiser config must be a dict")
        bound = min_tensor_count(config.get("arch"), config.get("model"))
        if bound > len(header):
            raise UsageError(f"{problem}: the config asks for at least {bound} tensors, the file holds "
                             f"{len(header)}")
        net = build_on_meta(lambda: build_denoiser(config))
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
        raise UsageError(f"denoiser file {path} has an unusable config ({_one_line(exc)})") from None
    expected = net.state_dict()
    check_state_dict(expected, {k: shape for k, (shape, _) in header.items()}, problem)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"denoiser file {path} is not a readable safetensors file ({_one_line(exc)})") from None
    state, others = to_float32_state(tensors, f"denoiser file {path}")
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    note_float32_cast(others, f"denoiser file {path}")
    net.metadata = info["extra"]
    return net.to(device).eval()
