"""Loss guidance for image teachers: inpainting and class guidance, DSG vs DPS (issue 6.3).

The samplers live in `gsd.sampling.samplers` (`guided_sample`, `dsg_step`); this module supplies
the losses on the clean estimate x0_hat = D(x_t; t), an independent guidance classifier
for digits, and the measurement reported in results.md:

- `inpaint_mask(name, shape)`: 1 = observed pixel, 0 = hidden; `name` is the HIDDEN region
  (`top`, `bottom`, `left`, `right` halves or the `center` 4x4 / half-size box).
- `inpainting_loss(reference, mask)`: ||mask * (x0_hat - y)||^2 per sample.
- `classifier_loss(classifier, targets)`: -log p(target | x0_hat) per sample.
- `guidance_classifier(...)`: a digits CNN for *guidance*, a different architecture, seed
  and training recipe (noise-augmented) from `gsd.evaluation.digits_classifier`, which is
  kept for *evaluation* only, so that guidance cannot score by fooling its own judge.

The measurement of DSG against DPS (`measure_guidance`) is evaluation: gsd.evaluation.guidance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gsd.data import load_dataset
from gsd.errors import UsageError

__all__ = ["MASK_NAMES", "inpaint_mask", "inpainting_loss", "classifier_loss", "GuidanceClassifier",
           "train_guidance_classifier", "guidance_classifier", "heldout_indices"]

MASK_NAMES = ("top", "bottom", "left", "right", "center")
GUIDANCE_CLASSIFIER_VERSION = 1


# ----------------------------------------------------------------------------------------
# Losses.

def inpaint_mask(name: str, sample_shape: Sequence[int]) -> torch.Tensor:
    """float32 mask of one sample's shape (C, H, W): 1 = observed, 0 = hidden.

    `name` names the hidden region: a half (`top`, `bottom`, `left`, `right`) or the
    central box of half the height and width (`center`).
    """
    if name not in MASK_NAMES:
        raise UsageError(f"unknown mask {name!r} (known: {', '.join(MASK_NAMES)})")
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 3:
        raise UsageError(f"inpainting needs image samples (C, H, W), got shape {shape}")
    c, h, w = shape
    m = torch.ones(shape, dtype=torch.float32)
    if name == "top":
        m[:, :h // 2] = 0
    elif name == "bottom":
        m[:, h - h // 2:] = 0
    elif name == "left":
        m[:, :, :w // 2] = 0
    elif name == "right":
        m[:, :, w - w // 2:] = 0
    else:
        m[:, h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = 0
    return m


def inpainting_loss(reference: torch.Tensor, mask: torch.Tensor):
    """loss(x0_hat) = sum over pixels of (mask * (x0_hat - reference))^2, one value per sample.

    reference (N, ...) images; mask of one sample's shape or (N, ...), 1 = observed.
    """
    reference = reference.detach()
    mask = mask.detach()

    def loss(x0: torch.Tensor) -> torch.Tensor:
        y = reference.to(x0.device, x0.dtype)
        m = mask.to(x0.device, x0.dtype)
        return (m * (x0 - y)).square().reshape(x0.shape[0], -1).sum(1)

    return loss


def classifier_loss(classifier: nn.Module, targets: torch.Tensor):
    """loss(x0_hat) = -log softmax(classifier(x0_hat))[target], one value per sample."""
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)

    def loss(x0: torch.Tensor) -> torch.Tensor:
        logits = classifier(x0)
        return -F.log_softmax(logits.float(), dim=1).gather(1, targets.to(logits.device)[:, None])[:, 0]

    return loss


# ----------------------------------------------------------------------------------------
# Guidance classifier (independent of the evaluation classifier).

class GuidanceClassifier(nn.Module):
    """Small all-convolutional digits classifier (8x8 -> 4x4 -> global pool), for guidance.

    Deliberately unlike `gsd.evaluation.digits_classifier.DigitsClassifier` (different layers, pooling, seed and
    noise-augmented training) so that its adversarial directions differ from the evaluator's.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 24):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv1(x))
        h = F.gelu(self.conv2(h))
        h = F.gelu(self.conv3(h))
        h = F.adaptive_avg_pool2d(h, 2)
        return self.head(h.flatten(1))


def heldout_indices(n: int, seed: int = 0, test_fraction: float = 0.2) -> torch.Tensor:
    """The held-out indices of the digits split used by `gsd.evaluation.metrics` (randperm with `seed`,
    first 20%): neither classifier trains on them. (The teacher saw all digits.)"""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return perm[:int(round(n * test_fraction))]


def train_guidance_classifier(data: torch.Tensor, labels: torch.Tensor, *, seed: int = 1, epochs: int = 25,
                              device="cpu", max_noise: float = 0.6):
    """Train `GuidanceClassifier` on the non-held-out digits with 1-pixel shifts and Gaussian
    noise of std ~ U(0, max_noise) (x0_hat is noisy / blurry early in sampling).
    Returns (model, accuracy on the held-out digits)."""
    test_idx = heldout_indices(len(data))
    train_mask = torch.ones(len(data), dtype=torch.bool)
    train_mask[test_idx] = False
    train_idx = train_mask.nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GuidanceClassifier(data.shape[1], int(labels.max()) + 1).to(device)
    x, y = data.to(device, torch.float32), labels.to(device, torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            xb = x[idx.to(device)]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            std = torch.rand(len(idx), 1, 1, 1, generator=g) * max_noise
            xb = xb + (std * torch.randn(xb.shape, generator=g)).to(device)
            loss = F.cross_entropy(model(xb), y[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        acc = float((model(x[test_idx.to(device)]).argmax(1) == y[test_idx.to(device)]).float().mean())
    return model, acc


def guidance_classifier(dataset=None, *, cache_dir=None, device="cpu", seed: int = 1, epochs: int = 25):
    """The cached guidance classifier for digits: (model, info); trained (~10 s CPU) on a miss."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if cache_dir is None:
        cache_dir = os.environ.get("GSD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gsd")
    path = Path(cache_dir) / f"guidance_classifier_v{GUIDANCE_CLASSIFIER_VERSION}_s{seed}_e{epochs}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            model = GuidanceClassifier(int(meta["in_channels"]), int(meta["num_classes"]))
            model.load_state_dict(load_file(str(path)))
            model.to(device).eval().requires_grad_(False)
            return model, {"test_accuracy": float(meta["test_accuracy"]), "path": str(path)}
        except Exception:  # damaged cache entry: retrain
            pass
    if dataset is None:
        dataset = load_dataset("digits")
    if dataset.labels is None or len(dataset.sample_shape) != 3:
        raise UsageError("the guidance classifier needs labelled image data")
    model, acc = train_guidance_classifier(dataset.data, dataset.labels, seed=seed, epochs=epochs, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"test_accuracy": repr(acc), "in_channels": str(dataset.data.shape[1]),
                        "num_classes": str(int(dataset.labels.max()) + 1), "seed": str(seed)})
    os.replace(tmp, path)
    return model, {"test_accuracy": acc, "path": str(path)}
