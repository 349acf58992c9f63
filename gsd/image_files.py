"""Images on disk as the field exchanges them (docs/definitions.md §3.9): uint8 pixels from
[-1, 1] values by EDM's rule, one PNG per seed, uint8 NHWC npz files (`arr_0`, labels in
`arr_1`), image folders. Writers are atomic (gsd.fileio); readers check what they are given
and say in one line what is wrong before any work starts."""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from gsd.errors import UsageError
from gsd.fileio import atomic_write_bytes
from gsd.util import one_line

__all__ = ["IMAGE_SUFFIXES", "to_uint8", "png_bytes", "write_png", "seed_file_name", "npz_bytes", "grid_uint8",
           "ImageSet", "open_images", "list_image_files"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) values in [-1, 1] -> (N, H, W, C) uint8: EDM's `(x * 127.5 + 128)` clipped to
    [0, 255] and truncated, the rule of EDM's generate.py. An image stored this way (a CIFAR-10
    byte v, read as v / 127.5 - 1) comes back as the same byte. Non-finite values are the
    caller's to refuse: here they would become arbitrary bytes."""
    u = (x.detach().to("cpu", torch.float32) * 127.5 + 128).clamp_(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of one (H, W, C) uint8 image: greyscale for C = 1, RGB for C = 3."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(f"PNG images are (H, W, 1 or 3) uint8, got {image.shape} {image.dtype}")
    pil = Image.fromarray(image[:, :, 0], mode="L") if image.shape[2] == 1 else Image.fromarray(image, mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, image: np.ndarray) -> None:
    """One image as a PNG, written atomically: a reader sees the whole file or none."""
    atomic_write_bytes(path, png_bytes(image))


def seed_file_name(seed: int, subdirs: bool = False) -> str:
    """`{seed:06d}.png`; with subdirs, in a folder per 1000 seeds (`001000/001234.png`), as EDM."""
    name = f"{int(seed):06d}.png"
    return f"{int(seed) - int(seed) % 1000:06d}/{name}" if subdirs else name


def npz_bytes(images: np.ndarray, labels: np.ndarray | None = None) -> bytes:
    """An npz with `arr_0` = the (N, H, W, C) uint8 images and, when given, `arr_1` = the labels
    (the layout of guided-diffusion's evaluation suite and EDM's tools)."""
    buf = io.BytesIO()
    arrays = [np.ascontiguousarray(images)] + ([] if labels is None else [np.asarray(labels, dtype=np.int64)])
    np.savez(buf, *arrays)
    return buf.getvalue()


def grid_uint8(images: np.ndarray, ncol: int | None = None) -> np.ndarray:
    """(N, H, W, C) uint8 images as one (rows, cols) grid with 1-pixel white gaps."""
    n, h, w, c = images.shape
    ncol = ncol or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / ncol))
    grid = np.full((rows * (h + 1) + 1, ncol * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    return grid


# --------------------------------------------------------------------------- reading

def list_image_files(folder) -> list[str]:
    """Image files under `folder`, recursively (EDM's --subdirs layout), sorted by relative path;
    hidden files (a writer's temporary files among them) are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.join(dirpath, name))
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


@dataclass
class ImageSet:
    """N uint8 images of one size, from a folder or an npz: `batches(k)` yields (k, H, W, C) arrays."""
    path: str
    count: int
    height: int
    width: int
    channels: int
    _array: np.ndarray | None = None
    _files: Sequence[str] = ()

    def batches(self, size: int) -> Iterator[np.ndarray]:
        for i in range(0, self.count, size):
            if self._array is not None:
                yield self._array[i:i + size]
            else:
                yield np.stack([_read_rgb(f) for f in self._files[i:i + size]])

    def describe(self) -> str:
        return f"{self.count} images of {self.width}x{self.height}x{self.channels} from {self.path}"


def _read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8: the file converted to RGB, as pytorch-fid reads images."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise UsageError(f"cannot read image {path}: {one_line(exc, 160)}") from None


def _open_npz(path: str, flag: str) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise UsageError(f"{flag} {path} has no arr_0 array (it holds {', '.join(data.files) or 'nothing'}); "
                                 f"images go in arr_0 as (N, H, W, C) uint8")
            arr = data["arr_0"]
    except UsageError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{flag} {path} is not a readable npz file ({one_line(exc, 160)})") from None
    if arr.dtype != np.uint8:
        raise UsageError(f"{flag} {path}: arr_0 has dtype {arr.dtype}, expected uint8 pixels (0-255)")
    if arr.ndim != 4:
        raise UsageError(f"{flag} {path}: arr_0 has rank {arr.ndim} (shape {arr.shape}), expected (N, H, W, C)")
    if arr.shape[3] not in (1, 3):
        raise UsageError(f"{flag} {path}: arr_0 has {arr.shape[3]} channels (shape {arr.shape}), expected NHWC "
                         f"with 1 or 3 channels")
    if min(arr.shape[1:3]) < 1 or arr.shape[0] < 1:
        raise UsageError(f"{flag} {path} holds no images (arr_0 has shape {arr.shape})")
    return ImageSet(path, int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]), int(arr.shape[3]), _array=arr)


def _open_folder(path: str, flag: str) -> ImageSet:
    from PIL import Image

    files = list_image_files(path)
    if not files:
        raise UsageError(f"{flag} {path} holds no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
    size = None
    for f in files:  # headers only: a mixed folder is refused before any image is decoded
        try:
            with Image.open(f) as img:
                this = img.size
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot read image {f}: {one_line(exc, 160)}") from None
        if size is None:
            size, first = this, f
        elif this != size:
            raise UsageError(f"{flag} {path} mixes image sizes: {os.path.relpath(first, path)} is "
                             f"{size[0]}x{size[1]}, {os.path.relpath(f, path)} is {this[0]}x{this[1]}")
    return ImageSet(path, len(files), int(size[1]), int(size[0]), 3, _files=files)


def open_images(path, flag: str = "--images") -> ImageSet:
    """A folder of images (recursive) or an npz with uint8 NHWC `arr_0`; UsageError (one line)
    for a missing path, another file type, a wrong dtype, rank or channel count, or mixed sizes."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or folder")
    if os.path.isdir(path):
        return _open_folder(path, flag)
    if Path(path).suffix.lower() != ".npz":
        raise UsageError(f"{flag} {path} is neither a folder of images nor an .npz file")
    return _open_npz(path, flag)
