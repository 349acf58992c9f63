"""The README's CIFAR-10 path, every command of it as written there, run at a small scale: a tiny
CIFAR-format data set and a tiny EDM-format pickle written here, a random-valued Inception
weights file in a temporary TORCH_HOME, and a few hundred seeds. Only the scale changes (the
SCALE substitutions below); a README edit that drops, adds or breaks a step fails this test."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gsd.evaluation import fid

REPO = Path(__file__).resolve().parents[2]
HEADING = "### The CIFAR-10 path"
STEPS = ["gsd.import_teacher", "gsd.train", "gsd.export", "gsd.generate", "gsd.fid ref", "gsd.fid calc"]
# README value -> the small-scale value used here; and flags appended to each step
SCALE = {"--batch 256": "--batch 4", "--seeds 0-49999": "--seeds 0-255"}
APPEND = {"gsd.train": "--iters 2 --ckpt-every 2 --eval-samples 0 --device cpu --no-progress",
          "gsd.generate": "--device cpu --no-progress", "gsd.fid ref": "--device cpu --no-progress",
          "gsd.fid calc": "--device cpu --no-progress"}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(re.escape(HEADING) + r".*?```\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _step(cmd: str) -> str:
    words = cmd.split()
    return " ".join(words[2:4]) if words[2] == "gsd.fid" else words[2]


def test_the_readme_names_the_whole_path():
    cmds = readme_commands()
    assert [_step(c) for c in cmds] == STEPS
    assert all(c.startswith("python -m gsd.") for c in cmds)
    assert all(k in " ".join(cmds) for k in SCALE)


def _tiny_edm_pickle(folder: Path) -> None:
    """A DDPM++ network of EDM's unconditional CIFAR-10 layout (augment_dim 9), tiny, as an EDM
    snapshot pickle named like NVlabs' file."""
    import torch

    from gsd.models.networks import EDMPrecond, SongUNet
    from test_edm_import import perturb_, write_pickle

    torch.manual_seed(0)
    model = SongUNet(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=16,
                     channel_mult=[1, 1], num_blocks=1, attn_resolutions=[16], dropout=0.0)
    write_pickle(folder, perturb_(EDMPrecond(model, sigma_data=0.5, label_dim=0)),
                 name="edm-cifar10-32x32-uncond-vp.pkl")


def test_every_command_of_the_cifar10_path_runs(tmp_path):
    from test_data import write_fake_cifar
    from test_fid_files import random_inception_weights

    write_fake_cifar(str(tmp_path / "DATA"), per_batch=24)
    _tiny_edm_pickle(tmp_path)
    home = tmp_path / "torch_home"
    random_inception_weights(home / "hub" / "checkpoints" / fid.FID_WEIGHTS_NAME)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_HOME": str(home), "GSD_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    outputs = {}
    for cmd in readme_commands():
        step = _step(cmd)
        for big, small in SCALE.items():
            cmd = cmd.replace(big, small)
        argv = shlex.split(cmd) + shlex.split(APPEND.get(step, ""))
        p = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
        outputs[step] = p.stdout
    # what each step leaves behind
    assert (tmp_path / "edm-cifar10.safetensors").is_file() and (tmp_path / "cifar10-sid.safetensors").is_file()
    assert (tmp_path / "runs" / "cifar10-sid" / "checkpoints").is_dir()
    pngs = sorted((tmp_path / "samples" / "cifar10-sid").rglob("*.png"))
    assert len(pngs) == 256 and {p.parent.name for p in pngs} == {"000000"}
    with np.load(tmp_path / "refs" / "cifar10-32x32.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    assert "120 images of 32x32x3" in outputs["gsd.fid ref"]
    value = float(re.search(r"FID ([0-9.e+-]+)", outputs["gsd.fid calc"]).group(1))
    assert np.isfinite(value) and value > 0
    assert "256 images of 32x32x3" in outputs["gsd.fid calc"]
