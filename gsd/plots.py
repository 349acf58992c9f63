"""PNG figures: image grids (one-step vs teacher from the same seeds) and 2-D scatters (gmm)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .runs import atomic_write_bytes

__all__ = ["image_grid", "save_grid", "save_comparison", "save_scatter_comparison", "save_samples_png"]


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1,
               pad_value: int = 255) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (rows*H', cols*W', 3) grid. Non-finite pixels are red."""
    x = images.detach().float().cpu()
    if x.ndim == 3:
        x = x[:, None]
    n, c, h, w = x.shape
    bad = ~torch.isfinite(x).all(1, keepdim=True)
    x = torch.nan_to_num(x, 0.0).clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        x = x.expand(n, 3, h, w).clone()
    elif c != 3:
        x = x[:, :3] if c > 3 else torch.cat([x, x[:, -1:].expand(n, 3 - c, h, w)], 1)
    if bad.any():
        red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
        x = torch.where(bad.expand_as(x), red.expand_as(x), x)
    if upscale > 1:
        x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
        h, w = h * upscale, w * upscale
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    arr = x.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = arr[i]
    return grid


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path, nrow: int | None = None, upscale: int | None = None) -> Path:
    """Save a grid of images in [-1, 1] as PNG (atomically)."""
    h = images.shape[-1]
    upscale = upscale or max(1, 32 // max(h, 1))
    atomic_write_bytes(path, _png_bytes(image_grid(images, nrow=nrow, upscale=upscale)))
    return Path(path)


def save_comparison(panels: Sequence[tuple[str, torch.Tensor]], path, nrow: int = 8) -> Path:
    """Side-by-side labelled grids, e.g. [("one-step (1 NFE)", a), ("teacher Heun (35 NFE)", b)]."""
    from PIL import Image, ImageDraw

    h = panels[0][1].shape[-1]
    upscale = max(1, 32 // max(h, 1))
    grids = [image_grid(imgs, nrow=nrow, upscale=upscale) for _, imgs in panels]
    title_h, gap = 16, 12
    height = max(g.shape[0] for g in grids) + title_h
    width = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x0 = 0
    for (title, _), g in zip(panels, grids):
        canvas.paste(Image.fromarray(g), (x0, title_h))
        draw.text((x0 + 2, 2), title, fill=(0, 0, 0))
        x0 += g.shape[1] + gap
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_scatter_comparison(panels: Sequence[tuple[str, torch.Tensor]], path, means=None) -> Path:
    """Scatter plots of low-dimensional samples (first two coordinates), one panel each."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    pts_all = [p[1].detach().float().cpu().reshape(len(p[1]), -1) for p in panels]
    finite = torch.cat([p[torch.isfinite(p).all(1)] for p in pts_all])
    lo, hi = (finite[:, :2].min(0).values, finite[:, :2].max(0).values) if len(finite) else (None, None)
    for ax, (title, _), pts in zip(axes[0], panels, pts_all):
        pts = pts[torch.isfinite(pts).all(1)]
        ax.scatter(pts[:, 0], pts[:, 1] if pts.shape[1] > 1 else torch.zeros(len(pts)), s=3, alpha=0.5)
        if means is not None:
            m = torch.as_tensor(means).float().cpu().reshape(len(means), -1)
            ax.scatter(m[:, 0], m[:, 1] if m.shape[1] > 1 else torch.zeros(len(m)), marker="x", c="red", s=30)
        if lo is not None:
            pad = 0.05 * float((hi - lo).max())
            ax.set_xlim(float(lo[0]) - pad, float(hi[0]) + pad)
            if pts.shape[1] > 1:
                ax.set_ylim(float(lo[1]) - pad, float(hi[1]) + pad)
        ax.set_title(title)
        ax.set_aspect("equal", adjustable="box")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_samples_png(panels: Sequence[tuple[str, torch.Tensor]], path, means=None, nrow: int = 8) -> Path:
    """Image grids for image data, scatter plots for vector data."""
    if panels[0][1].ndim == 4:
        return save_comparison(panels, path, nrow=nrow)
    return save_scatter_comparison(panels, path, means=means)
