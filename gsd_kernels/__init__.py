"""Fused ops for Geometric Score Distillation (docs/definitions.md §2).

    isometry_loss(x, z, *, weighting="global", bandwidth=None, scale="optimal", groups=None, backend="auto")
    sid_generator_loss(x_g, y_real, y_fake, *, alpha=1.2, backend="auto")
    fake_score_loss(y_fake, x, sigma, *, sigma_data=0.5, backend="auto")
    available_backends(device)
    fused_backend(device)                       the backend `--fused` runs, or a ValueError saying why none can
    resolved_backends(device, backend="auto")   {op: backend} that actually runs

Backends: "reference" (plain PyTorch, the oracle), "cpu" (C++/OpenMP), "cuda" (CUDA C++),
"triton", and "auto" (the fastest available for the input's device).
"""

from .backends import BACKENDS, available_backends, fused_backend, resolved_backends
from .ops import fake_score_loss, isometry_loss, sid_generator_loss

__all__ = ["isometry_loss", "sid_generator_loss", "fake_score_loss", "available_backends",
           "fused_backend", "resolved_backends", "BACKENDS"]
__version__ = "0.1.0"
