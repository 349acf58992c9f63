"""Teachers given by path: one loader for every command.

`load_teacher(path, dataset=..., trust_pickle=...)` detects the kind once (a gsd
``.safetensors`` file, a diffusers UNet2DModel folder, an NVlabs EDM ``.pkl`` behind the
--trust-pickle gate), loads it and, given the data set, runs the one fit check
(`check_teacher_fits`: shape, classes, one forward pass). A run directory keeps its own copy
of the teacher (`save_run_teacher` / `load_run_teacher`): a gsd ``.safetensors`` file, or a
diffusers folder for a diffusers teacher (its architecture is diffusers').
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from gsd.teachers.diffusers_teacher import DiffusersTeacher, is_diffusers_folder, load_diffusers_teacher, save_diffusers_teacher
from gsd.teachers.edm_pickle import load_edm_pickle
from gsd.errors import UsageError
from gsd.models.checkpoint import load_denoiser, save_denoiser
from gsd.runs import TEACHER_FOLDER_NAME, TEACHER_NAME, read_config
from gsd.util import one_line

__all__ = ["load_teacher", "load_teacher_any", "check_teacher_fits", "teacher_kind", "check_teacher_path",
           "save_run_teacher", "load_run_teacher", "PICKLE_SUFFIXES"]

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
        if not is_diffusers_folder(path):
            raise UsageError(f"{flag} {path} is a folder but not a diffusers UNet2DModel or pipeline folder "
                             f"(no config.json / model_index.json)")
    return kind


def check_teacher_fits(net, dataset, what) -> None:
    """UsageError (one line) unless `net` denoises `dataset`'s samples: its sample shape, its
    classes (a conditional teacher needs as many as the data set has) and one forward pass on two
    samples with the right output shape. The one fit check every command uses."""
    shape = tuple(getattr(net, "sample_shape", ()) or ())
    if shape and shape != tuple(dataset.sample_shape):
        raise UsageError(f"--teacher {what} is for samples of shape {shape}, but --dataset {dataset.name} has "
                         f"shape {tuple(dataset.sample_shape)}")
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if label_dim and label_dim != int(dataset.num_classes or 0):
        raise UsageError(f"--teacher {what} is conditional on {label_dim} classes, --dataset {dataset.name} "
                         f"has {dataset.num_classes}")
    try:
        dev = next(net.parameters()).device
        with torch.no_grad():
            out = net(torch.zeros(2, *dataset.sample_shape, device=dev), torch.ones(2, device=dev))
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign network is the user's file
        raise UsageError(f"--teacher {what} does not run on --dataset {dataset.name} samples "
                         f"({one_line(exc, 200)})") from None
    if tuple(out.shape[1:]) != tuple(dataset.sample_shape):
        raise UsageError(f"--teacher {what} outputs shape {tuple(out.shape[1:])}, expected "
                         f"{tuple(dataset.sample_shape)}")


def load_teacher(path, *, dataset=None, device="cpu", trust_pickle: bool = False, flag: str = "--teacher"):
    """A teacher denoiser (eval mode, on `device`) from a gsd .safetensors file, a diffusers
    folder (`gsd.teachers.diffusers_teacher.DiffusersTeacher`) or an EDM .pkl (needs trust_pickle=True):
    the path checks (kind, pickle gate), loading, and with `dataset` the fit check
    (`check_teacher_fits`). The one teacher loader of every command.

    Every returned network has forward(x, sigma, class_labels=None), ``sigma_data``,
    ``label_dim`` and ``sample_shape``. UsageError (one line) on any problem.
    """
    path = os.fspath(path)
    kind = check_teacher_path(path, trust_pickle=trust_pickle, flag=flag)
    if kind == "diffusers":
        net = load_diffusers_teacher(path, device=device)
    elif kind == "edm-pickle":
        net = load_edm_pickle(path, trust_pickle=trust_pickle).to(device).eval()
    else:
        net = load_denoiser(path, device=device)
    if dataset is not None:
        check_teacher_fits(net, dataset, path)
    return net


def load_teacher_any(path, *, device="cpu", trust_pickle: bool = False):
    """`load_teacher` without a data set (kept for scripts written against the old name)."""
    return load_teacher(path, device=device, trust_pickle=trust_pickle)


def save_run_teacher(net, run_dir, source: str | None = None) -> str:
    """Write the run directory's copy of the teacher, atomically; returns its name in run_dir
    (what config.json records as ``teacher_file``)."""
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


def load_run_teacher(run_dir, *, device="cpu", config: dict | None = None, dataset=None):
    """The teacher copy a run directory holds (config.json's ``teacher_file``; runs written before
    that key existed hold teacher.safetensors); with `dataset`, fit-checked (`check_teacher_fits`)."""
    run_dir = Path(run_dir)
    if config is None:
        config = read_config(run_dir)
    name = str(config.get("teacher_file") or TEACHER_NAME)
    path = run_dir / name
    if not path.exists():
        raise UsageError(f"{run_dir} is missing its teacher copy {name}")
    net = load_teacher(path, device=device, flag="teacher copy")
    if dataset is not None:
        check_teacher_fits(net, dataset, f"copy in {run_dir}")
    return net
