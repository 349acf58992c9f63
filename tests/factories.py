"""The tiny networks the engine tests build, in one place (imported as `factories`: tests/ is on
sys.path through tests/conftest.py)."""

from __future__ import annotations

import torch

from gsd.models.networks import build_denoiser
from gsd.models.checkpoint import save_denoiser


def tiny_mlp(dim: int = 2, seed: int = 0):
    """An MLP denoiser for `dim`-d data (gmm), with a non-trivial output layer so that gradients
    are not all ~0."""
    torch.manual_seed(seed)
    net = build_denoiser({"arch": "MLPDenoiserNet", "sigma_data": 0.5, "label_dim": 0,
                          "model": dict(dim=dim, hidden=16, num_blocks=1, noise_channels=8, emb_channels=16)})
    with torch.no_grad():
        net.model.fc_out.weight.normal_(0, 0.3)
    return net


def tiny_unet(seed: int = 0, channels: int = 8):
    """A one-level SongUNet for 1 x 8 x 8 images (the digits shape), no attention, no dropout."""
    torch.manual_seed(seed)
    return build_denoiser({"arch": "SongUNet", "sigma_data": 0.5, "label_dim": 0,
                           "model": dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=channels,
                                         channel_mult=[1], num_blocks=1, attn_resolutions=[], channel_mult_emb=2,
                                         dropout=0.0)})


def tiny_unet_file(tmp_path, name: str = "tiny_digits.safetensors") -> str:
    """tiny_unet() saved as a gsd teacher file; returns its path."""
    path = tmp_path / name
    save_denoiser(path, tiny_unet(seed=0))
    return str(path)


def tiny_mlp_file(tmp_path, name: str = "tiny_gmm.safetensors") -> str:
    """tiny_mlp(seed=3) saved as a gsd teacher file; returns its path."""
    path = tmp_path / name
    save_denoiser(path, tiny_mlp(seed=3))
    return str(path)


def as_run_from_before_digests(run_dir) -> None:
    """Make a run directory look as one written before config.json carried `run_format` and
    `teacher_sha256` and checkpoints carried digests (tests that rewrite a checkpoint to imitate
    an older version need that version's layout, or the digests rightly refuse the rewrite)."""
    import json
    from pathlib import Path

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    for key in ("run_format", "teacher_sha256"):
        cfg.pop(key, None)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    for manifest in (run_dir / "checkpoints").glob("ckpt-*.json"):
        manifest.unlink()
