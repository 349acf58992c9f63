"""Import an external diffusion teacher.

    python -m gsd.import_teacher network-snapshot-200000.pkl --out teacher.safetensors --trust-pickle
    python -m gsd.import_teacher path/to/diffusers-folder          # check it loads (used directly)

An NVlabs EDM pickle is read without executing code from it (see `gsd.edm_import`) and
exported once to a gsd safetensors checkpoint; after that the pickle is not needed. A
diffusers UNet2DModel folder needs no export: `load_teacher_any` wraps it on the fly.

`load_teacher_any(path)` is the one loader for a teacher given by path: a gsd ``.safetensors``
file, a diffusers folder, or (with ``trust_pickle=True``) an EDM ``.pkl``. A run directory keeps
its own copy of the teacher (`save_run_teacher` / `load_run_teacher`): a gsd ``.safetensors``
file, or a diffusers folder for a diffusers teacher (its architecture is diffusers').
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from gsd.cli import UsageError, check_output_file, make_parser, run_main
from gsd.runs import TEACHER_FOLDER_NAME, TEACHER_NAME

__all__ = ["load_teacher_any", "teacher_kind", "check_teacher_path", "save_run_teacher", "load_run_teacher",
           "build_parser", "main"]

PICKLE_SUFFIXES = (".pkl", ".pickle")


def teacher_kind(path) -> str:
    """'diffusers', 'edm-pickle' or 'safetensors' (by the path; UsageError if it does not exist)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"teacher {path} does not exist")
    if os.path.isdir(path):
        return "diffusers"
    if path.lower().endswith(PICKLE_SUFFIXES):
        return "edm-pickle"
    return "safetensors"


def check_teacher_path(path, *, trust_pickle: bool = False, flag: str = "--teacher") -> str:
    """The teacher kind of `path`, after the checks that need no loading: it exists, a pickle is
    allowed, a folder looks like a diffusers model. UsageError (one line) otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or folder")
    kind = teacher_kind(path)
    if kind == "edm-pickle" and not trust_pickle:
        raise UsageError(f"{flag} {path} is a pickle: pass --trust-pickle to read it (only EDM's allow-listed "
                         f"classes are read, no code from the file runs), or export it once with "
                         f"python -m gsd.import_teacher {path} --trust-pickle")
    if kind == "diffusers":
        from gsd.diffusers_teacher import is_diffusers_folder

        if not is_diffusers_folder(path):
            raise UsageError(f"{flag} {path} is a folder but not a diffusers UNet2DModel or pipeline folder "
                             f"(no config.json / model_index.json)")
    return kind


def load_teacher_any(path, *, device="cpu", trust_pickle: bool = False):
    """A teacher denoiser (eval mode, on `device`) from a gsd .safetensors file, a diffusers
    folder (`gsd.diffusers_teacher.DiffusersTeacher`) or an EDM .pkl (needs trust_pickle=True).

    Every returned network has forward(x, sigma, class_labels=None), ``sigma_data``,
    ``label_dim`` and ``sample_shape``. UsageError (one line) on any problem.
    """
    import gsd.edm_import as edm_import

    path = os.fspath(path)
    kind = teacher_kind(path)
    if kind == "diffusers":
        from gsd.diffusers_teacher import load_diffusers_teacher

        return load_diffusers_teacher(path, device=device)
    if kind == "edm-pickle":
        return edm_import.load_edm_pickle(path, trust_pickle=trust_pickle).to(device).eval()
    from gsd.networks import load_denoiser

    return load_denoiser(path, device=device)


def save_run_teacher(net, run_dir, source: str | None = None) -> str:
    """Write the run directory's copy of the teacher, atomically; returns its name in run_dir
    (what config.json records as ``teacher_file``)."""
    from gsd.diffusers_teacher import DiffusersTeacher, save_diffusers_teacher
    from gsd.networks import save_denoiser

    run_dir = Path(run_dir)
    if isinstance(net, DiffusersTeacher):
        final, tmp = run_dir / TEACHER_FOLDER_NAME, run_dir / (TEACHER_FOLDER_NAME + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_diffusers_teacher(net, tmp)
        # a folder cannot be replaced in one rename: remove a stale one first (a crash here leaves
        # the .partial folder, which a new run rewrites)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return TEACHER_FOLDER_NAME
    save_denoiser(run_dir / TEACHER_NAME, net, extra_metadata={"source": source or "unknown"})
    return TEACHER_NAME


def load_run_teacher(run_dir, *, device="cpu", config: dict | None = None):
    """The teacher copy a run directory holds (config.json's ``teacher_file``; runs written before
    that key existed hold teacher.safetensors)."""
    run_dir = Path(run_dir)
    if config is None:
        from gsd.runs import read_config

        config = read_config(run_dir)
    name = str(config.get("teacher_file") or TEACHER_NAME)
    path = run_dir / name
    if not path.exists():
        raise UsageError(f"{run_dir} is missing its teacher copy {name}")
    return load_teacher_any(path, device=device)


def build_parser():
    p = make_parser("python -m gsd.import_teacher",
                    "Import an NVlabs EDM network-snapshot pickle into a gsd safetensors teacher (read "
                    "without running code from the pickle), or check that a diffusers UNet2DModel folder "
                    "loads as a teacher.")
    p.add_argument("source", metavar="SOURCE",
                   help="EDM network-snapshot-*.pkl, or a diffusers UNet2DModel / pipeline folder")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output .safetensors for an EDM pickle (default: %(default)s, i.e. SOURCE with the "
                        "suffix .safetensors)")
    p.add_argument("--trust-pickle", action="store_true", default=False,
                   help="allow reading the pickle (only EDM's allow-listed classes are read; no code "
                        "from the file is executed)")
    p.add_argument("--no-verify", dest="verify", action="store_false", default=True,
                   help="skip the final check (verify=%(default)s: reload the written file and compare "
                        "its outputs with the imported network's)")
    return p


def _verify(net, path: str) -> float:
    """Max |difference| of the reloaded file's outputs from `net`'s on a small random batch."""
    from gsd.networks import load_denoiser

    again = load_denoiser(path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *net.sample_shape, generator=gen)
    sigma = torch.tensor([0.05, 5.0])
    labels = torch.arange(2) % net.label_dim if net.label_dim else None
    with torch.no_grad():
        return float((net(x, sigma, labels) - again(x, sigma, labels)).abs().max())


def check_out_file(out: str, flag: str = "--out") -> str:
    """Refuse, before any work, an output path that cannot be written (`gsd.cli.check_output_file`:
    a folder, a path under a file, /proc, a read-only folder) or an existing file that is not a gsd
    teacher (it would be overwritten). UsageError (one line); returns the expanded path."""
    out = check_output_file(out, flag)
    if os.path.exists(out):
        from gsd.networks import read_denoiser_metadata

        try:
            read_denoiser_metadata(out)
        except UsageError:
            raise UsageError(f"{flag} {out} exists and is not a gsd teacher file; it would be overwritten "
                             f"(remove it or choose another path)") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = os.fspath(args.source)
    kind = teacher_kind(source)
    if kind == "diffusers":
        if args.out is not None:
            raise UsageError("a diffusers folder is used directly as --teacher FOLDER; --out applies to EDM "
                             "pickles only")
        net = load_teacher_any(source)
        n_params = sum(p.numel() for p in net.parameters())
        print(f"diffusers teacher OK: {source} ({n_params / 1e6:.1f}M parameters, samples "
              f"{tuple(net.sample_shape)}, {net.label_dim or 'no'} classes, {net.prediction_type} prediction, "
              f"T={net.num_train_timesteps}, sigma in [{net.sigma_min:.4g}, {net.sigma_max:.4g}]); "
              f"pass it as --teacher {source}")
        return 0
    if kind != "edm-pickle":
        raise UsageError(f"{source}: expected an EDM .pkl file or a diffusers folder "
                         f"(a .safetensors teacher needs no import)")
    from gsd.edm_import import export_edm_pickle

    out = args.out or os.path.splitext(source)[0] + ".safetensors"
    if os.path.abspath(out) == os.path.abspath(source):
        raise UsageError("--out must differ from the source file")
    out = check_out_file(out)
    start = time.perf_counter()
    net, meta = export_edm_pickle(source, out, trust_pickle=args.trust_pickle)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"imported {meta['edm_class']} ({meta['variant']}, {n_params / 1e6:.1f}M parameters, samples "
          f"{tuple(net.sample_shape)}, {net.label_dim or 'no'} classes, sigma_data {net.sigma_data}) "
          f"-> {out} in {time.perf_counter() - start:.1f} s")
    if args.verify:
        diff = _verify(net, out)
        if diff != 0.0:
            raise UsageError(f"{out} does not reproduce the imported network (max |diff| {diff:.3g})")
        print("verified: the written file reproduces the imported network exactly")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
