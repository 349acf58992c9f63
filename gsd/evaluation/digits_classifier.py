"""The digits classifier: a small CNN trained once on the digits data and cached; its
penultimate layer is the feature space of the digits Frechet distance (reported as "Frechet
distance in digits-CNN features", never as FID), and its labels name a sample's class."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gsd.data import load_dataset
from gsd.errors import UsageError
from gsd.progress import progress_bar
from gsd.util import cache_dir as default_cache_dir

__all__ = ["DIGITS_FEATURE_NAME", "DigitsClassifier", "train_digits_classifier", "digits_classifier",
           "classifier_features"]


DIGITS_FEATURE_NAME = "digits-cnn-penultimate-64"

class DigitsClassifier(nn.Module):
    """Small CNN for (N, 1, 8, 8) digits in [-1, 1]; `features()` is the penultimate layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = F.avg_pool2d(h, 2)
        h = F.silu(self.conv3(h))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

def _split_indices(n: int, seed: int, test_fraction: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]

def train_digits_classifier(data: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                            epochs: int = 30, device="cpu", progress: bool = False):
    """Train the CNN on a fixed 80/20 split; returns (model, held-out accuracy)."""
    torch_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = DigitsClassifier(in_channels=data.shape[1], num_classes=int(labels.max()) + 1).to(device)
    finally:
        torch.set_rng_state(torch_state)
    train_idx, test_idx = _split_indices(len(data), seed)
    x = data.to(device, torch.float32)
    y = labels.to(device, torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed + 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    for _ in progress_bar(range(epochs), desc="digits classifier", enabled=progress, leave=False):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64].to(device)
            xb = x[idx]
            # light augmentation: random 1-pixel shifts and small noise
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            xb = xb + 0.05 * torch.randn(xb.shape, generator=g).to(device)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(x[test_idx.to(device)]).argmax(1)
        acc = float((pred == y[test_idx.to(device)]).float().mean())
    return model, acc

def digits_classifier(dataset=None, *, cache_dir=None, device="cpu", seed: int = 0,
                      progress: bool = False, epochs: int = 30):
    """The cached digits CNN: `(model, info)`; trains and caches it on first use.

    `info = {"feature": DIGITS_FEATURE_NAME, "test_accuracy": float, "path": str}`.
    `dataset` is a `gsd.data` Dataset of digits (loaded when None).
    """
    from safetensors.torch import load_file, save_file

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"digits_classifier_s{seed}_e{epochs}.safetensors"
    if path.exists():
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            state = load_file(str(path))
            model = DigitsClassifier(in_channels=int(meta.get("in_channels", 1)),
                                     num_classes=int(meta.get("num_classes", 10)))
            model.load_state_dict(state)
            model.to(device).eval()
            return model, {"feature": DIGITS_FEATURE_NAME, "test_accuracy": float(meta["test_accuracy"]),
                           "path": str(path)}
        except Exception:  # a damaged cache entry is retrained, not fatal
            pass
    if dataset is None:
        dataset = load_dataset("digits")
    if dataset.labels is None:
        raise UsageError("the digits classifier needs labelled data")
    model, acc = train_digits_classifier(dataset.data, dataset.labels, seed=seed, epochs=epochs,
                                         device=device, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"test_accuracy": repr(acc), "feature": DIGITS_FEATURE_NAME,
                                         "in_channels": str(dataset.data.shape[1]),
                                         "num_classes": str(int(dataset.labels.max()) + 1)})
    os.replace(tmp, path)
    model.eval()
    return model, {"feature": DIGITS_FEATURE_NAME, "test_accuracy": acc, "path": str(path)}


@torch.no_grad()
def classifier_features(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Penultimate features of `model` for x, in batches; returns CPU float64 (N, F)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch):
        out.append(model.features(x[i:i + batch].to(dev, torch.float32)).double().cpu())
    return torch.cat(out)
