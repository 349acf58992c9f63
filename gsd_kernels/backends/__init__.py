"""Which backend serves which device, and why one is not available.

Every fused backend provides the six primitives of docs/design.md; `reference` is the
direct PyTorch formula and is always available.
"""

from __future__ import annotations

import functools
import os

import torch

FUSED_BACKENDS = ("cpu", "cuda", "triton")
BACKENDS = ("auto", "reference") + FUSED_BACKENDS

# Fastest first, per device type. Interpreted Triton on CPU is a test vehicle, never "fast".
_PREFERENCE = {
    "cpu": ("cpu", "reference", "triton"),
    "cuda": ("triton", "cuda", "reference"),
}


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type


@functools.lru_cache(maxsize=None)
def _native_module():
    from . import native  # imports gsd_kernels._C
    return native


@functools.lru_cache(maxsize=None)
def _triton_module():
    from . import triton  # the package gsd_kernels.backends.triton, not triton itself
    return triton


def availability(name: str, device_type: str) -> tuple[bool, str]:
    """(available, reason-if-not) for backend `name` on a device type."""
    if name == "reference":
        return True, ""
    if name in ("cpu", "cuda"):
        if device_type != name:
            return False, f"the {name} backend runs {name.upper()} tensors only"
        try:
            native = _native_module()
        except ImportError as exc:  # extension.ExtensionUnavailable says why in one line
            return False, str(exc)
        return native.is_available(name)
    if name == "triton":
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "triton runs CPU tensors only under TRITON_INTERPRET=1"
        try:
            module = _triton_module()
        except ImportError as exc:
            return False, f"triton could not be imported ({exc})"
        return module.is_available(device_type)
    return False, f"unknown backend {name!r}"


def available_backends(device) -> list[str]:
    """Backend names usable for tensors on `device`, fastest first."""
    device_type = _device_type(device)
    order = _PREFERENCE.get(device_type, ("reference",))
    return [name for name in order if availability(name, device_type)[0]]


def resolve(name: str, device: torch.device) -> str:
    """Turn a user's backend name into a concrete one, or raise a ValueError that says why."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    device_type = device.type
    if name == "auto":
        for candidate in _PREFERENCE.get(device_type, ("reference",)):
            interpreted = candidate == "triton" and device_type == "cpu"
            if not interpreted and availability(candidate, device_type)[0]:
                return candidate
        return "reference"
    ok, reason = availability(name, device_type)
    if not ok:
        raise ValueError(f"backend {name!r} is not available for {device_type} tensors: {reason}; "
                         f"available: {available_backends(device)}")
    return name


OPS = ("isometry_loss", "sid_generator_loss", "fake_score_loss")


def fused_backend(device) -> str:
    """The fastest fused backend for `device`, or a ValueError whose one line says why none
    can serve it and how to fix that. This is what `--fused` means: never the reference."""
    device_type = _device_type(device)
    reasons = []
    for candidate in _PREFERENCE.get(device_type, ()):
        if candidate == "reference" or (candidate == "triton" and device_type == "cpu"):
            continue  # interpreted Triton on CPU is a test vehicle, not a fused backend to run
        ok, reason = availability(candidate, device_type)
        if ok:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    why = "; ".join(reasons) or f"none exists for {device_type} tensors"
    raise ValueError(f"no fused backend can run on {device_type}: {why} "
                     "(--no-fused runs the eager reference ops)")


def resolved_backends(device, backend: str = "auto") -> dict:
    """{op name: concrete backend} that `backend` resolves to on `device`, i.e. what runs.

    Every op resolves the same way today; the per-op form is what run records and
    benchmarks store, so that a future per-op choice does not change their format."""
    device = torch.device(_device_type(device)) if not isinstance(device, torch.device) else device
    name = resolve(backend, device)
    return {op: name for op in OPS}


def primitives(name: str, device_type: str):
    """The object holding the six primitives of a fused backend."""
    if name == "triton":
        return _triton_module().TRITON
    native = _native_module()
    return native.CUDA if name == "cuda" else native.CPU
