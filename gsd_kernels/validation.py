"""Input checks for the public ops (docs/definitions.md §2.4).

Everything here runs before any kernel and looks at metadata (shape, dtype, device) and
Python numbers, so it also works on the fake tensors of `torch.compile`. The one value
check on a tensor, `sigma > 0` of `fake_score_loss`, runs only for CPU tensors outside
`torch.compile`: on a GPU it would make the host wait for the device.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch

WEIGHTINGS = ("global", "local")

# Scalars that the ops square (scale, bandwidth, sigma_data) must have a finite, non-zero
# float64 square: beyond these bounds the formulas overflow (or underflow to 0).
SQUARE_MAX = math.sqrt(sys.float_info.max)   # ~1.34e154
SQUARE_MIN = math.sqrt(sys.float_info.min)   # ~1.49e-154


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape (N, ...), got a 0-dim tensor")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")
    return first


def check_features(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0 or t[0].numel() == 0:
        raise ValueError(f"{name} has no elements per sample (shape {tuple(t.shape)})")


def check_finite_number(name: str, value, *, positive: bool = False, squared: bool = False) -> float:
    """`squared`: the value is squared by the ops, so its magnitude must lie in
    [SQUARE_MIN, SQUARE_MAX] (a ValueError here instead of an OverflowError or inf later)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{name} must be finite, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if squared and value != 0 and not SQUARE_MIN <= abs(value) <= SQUARE_MAX:
        raise ValueError(f"{name} must be between {SQUARE_MIN:.3g} and {SQUARE_MAX:.3g} in magnitude "
                         f"(its square must be a finite float64), got {value:g}")
    return value


def check_groups(groups, n: int) -> None:
    """groups=None (all pairs) or an int g >= 2 that divides N (rows in consecutive blocks of g)."""
    if groups is None:
        return
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise ValueError(f"groups must be None or an int >= 2, got {groups!r}")
    if groups < 2:
        raise ValueError(f"groups must be >= 2 (a group needs a pair i != j), got {groups}")
    if n % groups != 0:
        raise ValueError(f"groups = {groups} must divide the number of samples N = {n}")


def check_isometry_args(x, z, weighting, bandwidth, scale, groups=None) -> None:
    check_tensor("x", x)
    check_tensor("z", z)
    check_same_device(x=x, z=z)
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"x and z must have the same first dimension N, got {x.shape[0]} and {z.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError(f"isometry_loss needs at least 2 samples (pairs i != j), got N = {x.shape[0]}")
    check_features("x", x)
    check_features("z", z)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if bandwidth is not None:
        if weighting != "local":
            raise ValueError("bandwidth only applies to weighting='local'")
        check_finite_number("bandwidth", bandwidth, positive=True, squared=True)
    if not (isinstance(scale, str) and scale == "optimal"):
        if isinstance(scale, str):
            raise ValueError(f"scale must be 'optimal' or a positive float, got {scale!r}")
        check_finite_number("scale", scale, positive=True, squared=True)
    check_groups(groups, x.shape[0])


def check_sid_args(x_g, y_real, y_fake, alpha) -> None:
    for name, t in (("x_g", x_g), ("y_real", y_real), ("y_fake", y_fake)):
        check_tensor(name, t)
    check_same_device(x_g=x_g, y_real=y_real, y_fake=y_fake)
    if not (x_g.shape == y_real.shape == y_fake.shape):
        raise ValueError("x_g, y_real and y_fake must have the same shape, got "
                         f"{tuple(x_g.shape)}, {tuple(y_real.shape)} and {tuple(y_fake.shape)}")
    check_features("x_g", x_g)
    check_finite_number("alpha", alpha)


def check_fake_score_args(y_fake, x, sigma, sigma_data) -> None:
    check_tensor("y_fake", y_fake)
    check_tensor("x", x)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"sigma must be a torch.Tensor, got {type(sigma).__name__}")
    if not sigma.is_floating_point():
        raise TypeError(f"sigma must have a floating dtype, got {sigma.dtype}")
    check_same_device(y_fake=y_fake, x=x, sigma=sigma)
    if y_fake.shape != x.shape:
        raise ValueError(f"y_fake and x must have the same shape, got {tuple(y_fake.shape)} and {tuple(x.shape)}")
    check_features("x", x)
    n = x.shape[0]
    shape_ok = sigma.dim() >= 1 and sigma.shape[0] == n and all(s == 1 for s in sigma.shape[1:])
    if not shape_ok:
        raise ValueError(f"sigma must have shape (N,) or (N, 1, ..., 1) with N = {n}, got {tuple(sigma.shape)}")
    check_finite_number("sigma_data", sigma_data, positive=True, squared=True)
    check_sigma_values(sigma)


def check_sigma_values(sigma: torch.Tensor) -> None:
    """sigma must be finite and > 0 (lambda = 1/sigma^2 + 1/sigma_data^2 and its derivative
    divide by sigma). Checked for CPU tensors only, and not while torch.compile traces: on a
    GPU reading the values would make the host wait for the device inside the op (the
    documented contract there is: the caller passes positive noise levels)."""
    if sigma.device.type != "cpu" or torch.compiler.is_compiling():
        return
    ok = torch.isfinite(sigma) & (sigma > 0)
    if not bool(ok.all()):
        bad = sigma.reshape(-1)[~ok.reshape(-1)][0]
        raise ValueError(f"sigma must be finite and > 0 for every sample, got {bad.item():g}")
