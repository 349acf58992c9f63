"""`--dataset shapes`: rendered images of one shape with known factors (docs/definitions.md §3.5).

Each image is a grey shape on a black background, anti-aliased by 4 x 4 supersampling per pixel.
Its factors are continuous (position x and y, scale, rotation, brightness) and discrete (the
kind: square, ellipse, triangle). Every continuous factor lies in an interval with no wrap:
rotation spans [0, pi/4], less than half the period of every kind's symmetry (square pi/2,
ellipse pi, triangle 2 pi/3), so distinct factor vectors give distinct images and the factor
space of one kind is a box: one connected manifold. `render` maps any factor vectors to images,
for the data set and for the metrics alike.
"""

from __future__ import annotations

import math

import torch

__all__ = ["KINDS", "FACTORS", "FACTOR_RANGES", "MAX_KINDS", "DEFAULT_RESOLUTION", "RESOLUTIONS",
           "TRAIN_IMAGES", "SUPERSAMPLE", "render", "sample_factors", "normalise", "denormalise"]

KINDS = ("square", "ellipse", "triangle")
MAX_KINDS = len(KINDS)
# continuous factors, in this order, with their ranges (units: fractions of the image side,
# radians, intensity)
FACTORS = ("x", "y", "scale", "rotation", "brightness")
FACTOR_RANGES = {
    "x": (0.3, 0.7),            # centre, as a fraction of the image width
    "y": (0.3, 0.7),
    "scale": (0.12, 0.24),      # half the shape's size, as a fraction of the image side
    "rotation": (0.0, math.pi / 4),
    "brightness": (0.4, 1.0),   # the shape's grey level; the background is 0
}
DEFAULT_RESOLUTION = 16
RESOLUTIONS = (8, 32)           # the supported range of --resolution
TRAIN_IMAGES = 20_000
SUPERSAMPLE = 4                 # sub-pixel samples per pixel side


def normalise(factors: torch.Tensor) -> torch.Tensor:
    """Continuous factors (N, 5) mapped to [0, 1] each by their ranges."""
    lo = torch.tensor([FACTOR_RANGES[f][0] for f in FACTORS], dtype=factors.dtype, device=factors.device)
    hi = torch.tensor([FACTOR_RANGES[f][1] for f in FACTORS], dtype=factors.dtype, device=factors.device)
    return (factors - lo) / (hi - lo)


def denormalise(unit: torch.Tensor) -> torch.Tensor:
    lo = torch.tensor([FACTOR_RANGES[f][0] for f in FACTORS], dtype=unit.dtype, device=unit.device)
    hi = torch.tensor([FACTOR_RANGES[f][1] for f in FACTORS], dtype=unit.dtype, device=unit.device)
    return lo + unit * (hi - lo)


def sample_factors(n: int, kinds: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(continuous factors (n, 5) float64, kinds (n,) int64 in [0, kinds)), uniform in the box."""
    unit = torch.rand(n, len(FACTORS), generator=generator, dtype=torch.float64)
    kind = torch.randint(0, kinds, (n,), generator=generator)
    return denormalise(unit), kind


def _inside(u: torch.Tensor, v: torch.Tensor, kind: int) -> torch.Tensor:
    """Whether local points (u, v) (in units of the shape's half size) lie in a shape of `kind`."""
    if kind == 0:  # square
        return (u.abs() <= 1) & (v.abs() <= 1)
    if kind == 1:  # ellipse 2:1, about the square's area
        return u * u + (2 * v) * (2 * v) <= 1.3
    r = 1.3        # equilateral triangle of circumradius 1.3, pointing up: three half-planes
    return (v >= -r / 2) & (math.sqrt(3) * u + v <= r) & (-math.sqrt(3) * u + v <= r)


def render(factors: torch.Tensor, kind: torch.Tensor, resolution: int = DEFAULT_RESOLUTION,
           chunk: int = 4096) -> torch.Tensor:
    """Images (n, 1, R, R) float32 in [-1, 1] of the continuous factors (n, 5) and kinds (n,):
    -1 + 2 brightness * (the pixel's covered fraction)."""
    n = factors.shape[0]
    s = SUPERSAMPLE
    # sub-pixel sample positions in [0, 1) image coordinates (x right, y down)
    grid = (torch.arange(resolution * s, dtype=torch.float32) + 0.5) / (resolution * s)
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    out = torch.empty(n, 1, resolution, resolution)
    factors = factors.to(torch.float32)
    for k in range(MAX_KINDS):
        rows = (kind == k).nonzero().squeeze(1)
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            cx, cy, sc, rot, bright = (factors[idx, i, None, None] for i in range(5))
            dx, dy = gx[None] - cx, gy[None] - cy
            cos, sin = torch.cos(rot), torch.sin(rot)
            u = (cos * dx + sin * dy) / sc
            v = (cos * dy - sin * dx) / sc
            cover = _inside(u, v, k).to(torch.float32).reshape(-1, resolution, s, resolution, s).mean((2, 4))
            out[idx, 0] = -1.0 + 2.0 * bright * cover
    return out
