"""PNG figures: image grids (one-step vs teacher from the same seeds), 2-D scatters (gmm), and the
study's figures (loss curves, FD over training, latency bars, samples; gsd.study)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gsd.errors import UsageError
from gsd.fileio import atomic_write_bytes
from gsd.util import check_memory

__all__ = ["image_grid", "save_grid", "save_comparison", "save_scatter_comparison", "save_samples_png",
           "grid_layout", "check_grid_size", "save_image_grid", "plot_losses", "plot_fd_curves", "plot_latency",
           "plot_samples"]


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


# ----------------------------------------------------------------------------------------
# Sample grids (gsd.teacher --grid, gsd.sample): 1-pixel white gaps, grayscale or RGB as the images.

def grid_layout(n: int, h: int, w: int, nrow: int | None = None) -> tuple[int, int, int, int]:
    """(images per row, rows, height, width) of save_image_grid's grid of n h x w images, before scaling."""
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    return nrow, ncol, ncol * (h + 1) + 1, nrow * (w + 1) + 1


def max_grid_pixels() -> int:
    """Largest grid written: PIL refuses to open images above twice its MAX_IMAGE_PIXELS
    (its decompression-bomb check), so a larger PNG could not even be read back."""
    from PIL import Image

    return 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def check_grid_size(n: int, sample_shape, nrow: int | None = None, scale: int = 1, what: str = "the grid") -> None:
    """UsageError (one line) when save_image_grid(n images, nrow, scale) would be too big to read
    back or to hold in memory."""
    c, h, w = (int(v) for v in sample_shape)
    _, _, gh, gw = grid_layout(n, h, w, nrow)
    height, width = gh * scale, gw * scale
    limit = max_grid_pixels()
    if height * width > limit:
        raise UsageError(f"{what} would be {width} x {height} pixels, more than the {limit} pixels image readers "
                         f"(PIL) accept; lower --num or --scale")
    check_memory(c * gh * gw * 4 + c * height * width, what)


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None, scale: int = 1) -> str:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid (1-pixel gaps)."""
    from PIL import Image

    images = images.detach().to("cpu", torch.float32).clamp(-1, 1)
    n, c, h, w = images.shape
    nrow, ncol, gh, gw = grid_layout(n, h, w, nrow)
    grid = torch.full((c, gh, gw), 1.0)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    arr = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    img.save(path)
    return path


# --------------------------------------------------------------------------- the study's figures (gsd.study)

def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_losses(logs: dict, path: Path):
    plt = _plt()
    keys = ["loss_sid", "loss_irl", "loss_fake"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, recs in logs.items():
            pts = [(r["iteration"], r[key]) for r in recs if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        if key == "loss_fake":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("training losses (log.jsonl, averaged over each logging interval)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_fd_curves(curves: dict, teacher_fd, label: str, path: Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, curve in curves.items():
        if curve:
            ax.plot([c["iteration"] for c in curve], [c["fd"] for c in curve], marker="o", ms=3, label=name)
    if teacher_fd is not None:
        ax.axhline(teacher_fd, color="k", ls="--", lw=1, label="teacher Heun (35 NFE)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("FD")
    ax.set_yscale("log")
    ax.set_title(f"FD over training ({label.split(' (')[0]})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_latency(results: dict, path: Path):
    plt = _plt()
    first = next(iter(results.values()))
    names = [f"teacher Heun\n({first['teacher']['nfe']} NFE)"] + [f"{v}\n(1 NFE)" for v in results]
    vals = [first["teacher"]["latency_ms"]] + [r["one_step"]["latency_ms"] for r in results.values()]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bars = ax.bar(names, vals, color=["#888"] + ["#2a7"] * len(results))
    for b, val in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, val, f"{val:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"ms per batch of {first['latency']['batch']} (median)")
    ax.set_title(f"inference latency on {first['machine']['device']} ({first['machine']['cpu']})", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_samples(samples: dict, dataset, path: Path):

    first = next(iter(samples.values()))
    n = 64 if first["teacher"].ndim == 4 else 2000
    panels = [("teacher Heun (35 NFE)", first["teacher"][:n])]
    panels += [(f"{v} (1 NFE)", s["one_step"][:n]) for v, s in samples.items()]
    save_samples_png(panels, path, means=dataset.mixture.means if dataset.mixture is not None else None)
