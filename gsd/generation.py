"""The library behind `python -m gsd.generate`: a one-step generator's images by seed, to a folder
of PNGs, an npz and/or a grid (docs/definitions.md §3.9).

- `check_outputs` checks every output path before anything is loaded; `generate_images` does
  the work. Nothing is written until the generator is loaded and the request fits it.
- A folder gets one `{seed:06d}.png` per seed (1000 per subfolder with subdirs) and
  `gsd-generate.json`, which says what generated it. Each PNG is written atomically, so an
  interrupted generation leaves complete files only; `resume` checks the manifest against the
  generator and settings, removes the temporary files a killed writer left, and computes
  the seeds whose file is missing. A seed's image depends only on the seed (the block rule of
  gsd.sampling.seeds), so resumed files match uninterrupted ones byte for byte.
- An npz (arr_0 uint8 NHWC, arr_1 labels of a conditional generator) and a grid are written
  once, atomically, at the end.
- Under torchrun each process takes every WORLD-th block of seeds; the files are those of one
  process. PNG encoding and file writes run on worker threads while the next step computes.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gsd import parallel
from gsd.errors import UsageError
from gsd.evaluation.plots import check_grid_size
from gsd.fileio import atomic_write_bytes, write_json_atomic
from gsd.generator import OneStepGenerator, check_finite, load_generator
from gsd.image_files import grid_uint8, npz_bytes, png_bytes, seed_file_name, to_uint8
from gsd.progress import progress_bar
from gsd.sampling.seeds import BLOCK, blocks_of, seeds_text
from gsd.util import check_creatable, check_image_output, check_memory, check_output_file, one_line, resolve_device

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "WRITER_THREADS", "Outputs", "check_outputs", "generate_images"]

MANIFEST_NAME = "gsd-generate.json"
MANIFEST_FORMAT = "gsd-generate/1"
WRITER_THREADS = 2          # PNG encoding and fsync release the GIL: two keep up with a GPU at 32x32
# settings a resumed folder must share with the generation that started it (seeds may differ:
# a seed's image does not depend on the others)
RESUME_KEYS = ("format", "generator_sha256", "sigma_init", "labels", "subdirs", "block", "device_type",
               "image_shape")
_TMP_RE = re.compile(r"^\..+\.tmp(\d+)$")


@dataclass
class Outputs:
    folder: str | None = None   # PNG folder
    npz: str | None = None
    grid: str | None = None
    subdirs: bool = False
    resume: bool = False


def check_outputs(out: str | None, grid: str | None, *, subdirs: bool = False, resume: bool = False) -> Outputs:
    """The output request, checked before anything is loaded (UsageError, one line): --out is a
    folder (absent, empty, or with resume a folder this command generated) or a new .npz file;
    --grid a new .png file (replaced on resume)."""
    if out is None and grid is None:
        raise UsageError("nothing to write: give --out DIR|X.npz and/or --grid X.png")
    res = Outputs(subdirs=subdirs, resume=resume)
    if out is not None:
        out = os.path.expanduser(out)
        if out.lower().endswith(".npz"):
            if resume:
                raise UsageError(f"--resume continues a PNG folder; --out {out} is an npz, which is written in one "
                                 f"piece at the end")
            if subdirs:
                raise UsageError("--subdirs arranges a PNG folder; --out is an .npz file")
            check_output_file(out, "--out")
            if os.path.lexists(out):
                raise UsageError(f"--out {out} exists; gsd.generate does not replace it (remove it or choose another)")
            res.npz = out
        else:
            check_creatable(out, out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out)), "--out")
            if os.path.lexists(out) and not os.path.isdir(out):
                raise UsageError(f"--out {out} exists and is not a folder (an npz output must end in .npz)")
            if os.path.isdir(out) and any(os.scandir(out)):
                if not resume:
                    raise UsageError(f"--out {out} is not empty; pass --resume to continue the generation in it, "
                                     f"or choose another --out")
                if not (Path(out) / MANIFEST_NAME).is_file():
                    raise UsageError(f"--resume: {out} holds no {MANIFEST_NAME}, so it was not written by "
                                     f"gsd.generate; choose another --out")
            res.folder = out
    elif subdirs or resume:
        raise UsageError(f"{'--subdirs' if subdirs else '--resume'} needs an --out folder")
    if grid is not None:
        grid = check_image_output(grid, "--grid", suffixes=(".png",))
        if os.path.lexists(grid) and not resume:
            raise UsageError(f"--grid {grid} exists; gsd.generate does not replace it (remove it or choose another)")
        res.grid = grid
    return res


def _manifest(gen: OneStepGenerator, seeds, rule, outs: Outputs, device) -> dict:
    src = {k: v for k, v in gen.info.items() if k in ("kind", "source", "step", "weights", "run_config_sha256",
                                                       "config_sha256", "source_sha256")}
    return {"format": MANIFEST_FORMAT, "source": src, "generator_sha256": gen.weights_digest(),
            "sigma_init": gen.sigma_init, "seeds": seeds_text(seeds), "labels": rule, "subdirs": outs.subdirs,
            "block": BLOCK, "device_type": torch.device(device).type, "image_shape": list(gen.sample_shape),
            "file_names": "{seed:06d}.png" + (" in {seed - seed % 1000:06d}/" if outs.subdirs else "")}


def _check_resume(folder: str, manifest: dict) -> None:
    path = Path(folder) / MANIFEST_NAME
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume: cannot read {path} ({one_line(exc, 120)})") from None
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {path} does not hold a generation's settings")
    diff = [k for k in RESUME_KEYS if saved.get(k) != manifest[k]]
    if diff:
        k = diff[0]
        what = {"generator_sha256": "another generator (or other weights)",
                "device_type": f"a {saved.get(k)} device (another device rounds differently)"}.get(
            k, f"{k} {saved.get(k)!r} (now {manifest[k]!r})")
        raise UsageError(f"--resume: {folder} was generated with {what}; continue it with the same settings, "
                         f"or choose another --out")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if not 0 < pid < 2 ** 31:
        return False
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def remove_stale_temp_files(folder: str) -> int:
    """Delete the `.NAME.tmpPID` files a killed writer left (those of live processes stay)."""
    removed = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            m = _TMP_RE.match(name)
            if m and not _pid_alive(int(m.group(1))):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except OSError:
                    pass
    return removed


class _Writer:
    """PNG files written on worker threads, at most two steps in flight (memory stays bounded);
    a failed write is raised in the caller as one line."""

    def __init__(self, threads: int = WRITER_THREADS):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gsd-png")
        self.pending: list = []
        self.made: set = set()

    def _one(self, path: str, image: np.ndarray) -> None:
        atomic_write_bytes(path, png_bytes(image))

    def submit(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        futures = []
        for path, image in items:
            parent = os.path.dirname(path)
            if parent not in self.made:
                os.makedirs(parent, exist_ok=True)
                self.made.add(parent)
            futures.append(self.pool.submit(self._one, path, image))
        self.wait(keep=1)
        self.pending.append(futures)

    def wait(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            for f in self.pending.pop(0):
                try:
                    f.result()
                except OSError as exc:
                    raise UsageError(f"cannot write {exc.filename or 'a PNG'}: {exc.strerror or one_line(exc)}") \
                        from None

    def close(self, finish: bool = True) -> None:
        """finish: write what was handed over (after Ctrl-C: those images are computed already);
        otherwise (a failed write) drop the writes not started. A started write always ends
        whole, so no half-written file is left."""
        self.pool.shutdown(wait=True, cancel_futures=not finish)


def generate_images(source, seeds: Sequence[int], outs: Outputs, *, labels=None, batch: int = 256,
                    device="auto", step: int | None = None, raw: bool = False, trust_pickle: bool = False,
                    sigma_init: float | None = None, progress: bool = True) -> dict:
    """Generate `seeds` with the generator in `source` (gsd.generator.load_generator) into `outs`
    (from `check_outputs`). labels: None, a class index or a label rule (gsd.sampling.seeds).
    batch: images per step (whole blocks of BLOCK seeds; a seed's image does not depend on it).
    Under torchrun every process calls this with the same arguments. Returns a summary."""
    t0 = time.perf_counter()
    seeds = [int(s) for s in seeds]
    owns_group = not parallel.is_distributed()
    dev = parallel.init(resolve_device(device))
    try:
        return _generate(source, seeds, outs, labels=labels, batch=batch, device=dev, step=step, raw=raw,
                         trust_pickle=trust_pickle, sigma_init=sigma_init, progress=progress, t0=t0)
    finally:
        if owns_group:
            parallel.shutdown()


def _load_checked(source, seeds, outs: Outputs, *, labels, device, step, raw, trust_pickle, sigma_init):
    """The generator, its label rule and the folder's manifest, every check done before a file is written."""
    gen = load_generator(source, step=step, raw=raw, device=device, trust_pickle=trust_pickle, sigma_init=sigma_init)
    if not gen.is_image or gen.sample_shape[0] not in (1, 3):
        raise UsageError(f"{source} makes samples of shape {gen.sample_shape}, not images with 1 or 3 channels")
    rule = gen.label_rule(labels)
    c, h, w = gen.sample_shape
    if outs.npz or outs.grid:
        check_memory(2 * len(seeds) * c * h * w * max(parallel.world_size(), 1), f"{len(seeds)} images of "
                     f"{w}x{h}x{c} in memory for the npz / grid", "generate fewer seeds per call, or write a PNG folder")
    if outs.grid:
        check_grid_size(len(seeds), gen.sample_shape, what=f"the grid of {len(seeds)} images")
    manifest = _manifest(gen, seeds, rule, outs, device)
    if outs.folder and outs.resume and (Path(outs.folder) / MANIFEST_NAME).is_file():
        _check_resume(outs.folder, manifest)
    return gen, rule, manifest


def _missing(seeds, outs: Outputs) -> tuple[list, set]:
    """(seeds to compute, in order; seeds to write): every seed for an npz / grid, the missing
    files of a folder."""
    def absent(s):
        return not os.path.exists(os.path.join(outs.folder, seed_file_name(s, outs.subdirs)))
    keep_images = bool(outs.npz or outs.grid)
    todo = [s for s in seeds if absent(s)] if outs.folder and not keep_images else list(seeds)
    write_set = set(todo) if not outs.folder else {s for s in todo if absent(s)}
    return todo, write_set


def _compute_blocks(gen, rule, blocks, per_step: int, todo_set: set, write_set: set, outs: Outputs, bar):
    """This rank's blocks: PNG files written as they come, images kept for an npz / grid.
    No collective in here: a rank that fails reports it to the others through parallel.agree."""
    keep_images = bool(outs.npz or outs.grid)
    writer = _Writer() if outs.folder else None
    kept: dict[int, tuple[np.ndarray, int | None]] = {}
    written, failed = 0, None
    try:
        for i in range(0, len(blocks), per_step):
            block_seeds, x, lab = gen.run_blocks(blocks[i:i + per_step], rule)
            rows = [j for j, s in enumerate(block_seeds) if s in todo_set]
            sel = [block_seeds[j] for j in rows]
            x = x[rows]
            check_finite(x, sel)
            u8 = to_uint8(x)
            if writer is not None:
                items = [(os.path.join(outs.folder, seed_file_name(s, outs.subdirs)), u8[k])
                         for k, s in enumerate(sel) if s in write_set]
                writer.submit(items)
                written += len(items)
            if keep_images:
                for k, s in enumerate(sel):
                    kept[s] = (u8[k], None if lab is None else int(lab[rows[k]]))
            bar.update(len(sel))
        if writer is not None:
            writer.wait()
    except BaseException as exc:
        failed = exc
        raise
    finally:
        if writer is not None:
            writer.close(finish=failed is None or isinstance(failed, KeyboardInterrupt))
        bar.close()
    return kept, written


def _write_collected(gen, seeds, kept: dict, outs: Outputs) -> None:
    """The npz and / or grid of every seed, in the order given (main process)."""
    images = np.stack([kept[s][0] for s in seeds])
    lab_arr = None if gen.label_dim == 0 else np.array([kept[s][1] for s in seeds], dtype=np.int64)
    if outs.npz:
        os.makedirs(os.path.dirname(os.path.abspath(outs.npz)), exist_ok=True)
        atomic_write_bytes(outs.npz, npz_bytes(images, lab_arr))
    if outs.grid:
        os.makedirs(os.path.dirname(os.path.abspath(outs.grid)), exist_ok=True)
        atomic_write_bytes(outs.grid, png_bytes(grid_uint8(images)))


def _generate(source, seeds, outs: Outputs, *, labels, batch, device, step, raw, trust_pickle, sigma_init, progress,
              t0) -> dict:
    rank, world = parallel.rank(), parallel.world_size()
    gen, rule, manifest = parallel.agree(lambda: _load_checked(
        source, seeds, outs, labels=labels, device=device, step=step, raw=raw, trust_pickle=trust_pickle,
        sigma_init=sigma_init))

    if outs.folder and parallel.is_main():
        os.makedirs(outs.folder, exist_ok=True)
        remove_stale_temp_files(outs.folder)
        write_json_atomic(Path(outs.folder) / MANIFEST_NAME, manifest)
    parallel.barrier()

    keep_images = bool(outs.npz or outs.grid)
    todo, write_set = _missing(seeds, outs)
    todo_set = set(todo)
    parallel.barrier()  # every rank has listed the folder before any rank writes to it
    blocks = blocks_of(todo)[rank::world]
    per_step = max(1, -(-int(batch) // BLOCK))
    mine = sum(1 for b in blocks for s in range(b * BLOCK, (b + 1) * BLOCK) if s in todo_set)
    bar = progress_bar(total=mine, desc="generate" + (f" (rank {rank} of {world})" if world > 1 else ""),
                       enabled=progress and parallel.is_main())
    kept, written = parallel.agree(lambda: _compute_blocks(gen, rule, blocks, per_step, todo_set, write_set, outs,
                                                           bar))
    if keep_images:
        parts = parallel.all_gather_objects(kept)
        kept = {k: v for part in parts for k, v in part.items()}
    written = sum(parallel.all_gather_objects(written))
    if parallel.is_main() and keep_images:
        _write_collected(gen, seeds, kept, outs)
    parallel.barrier()
    return {"seeds": len(seeds), "written": written, "skipped": len(seeds) - len(write_set) if outs.folder else 0,
            "seconds": time.perf_counter() - t0, "generator": gen.info, "labels": rule, "world": world,
            "image_shape": gen.sample_shape, "outputs": outs, "rank": rank}
