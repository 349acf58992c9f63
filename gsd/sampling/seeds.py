"""Seeds of a one-step generator: the seed-list syntax, the label of a seed, and the block rule
that makes a seed's image independent of how many images are computed with it
(docs/definitions.md §3.9).

- `parse_seeds("0-49999")`: EDM's syntax, ranges and single seeds separated by commas.
- A seed s has the latent `latents_for_seeds([s])` (one CPU torch.Generator per seed) and, for
  a class-conditional generator, a label by one of the rules of `labels_for_seeds`.
- The network never runs on an arbitrary batch: it runs on aligned blocks of `BLOCK` seeds,
  block k holding seeds k*BLOCK .. k*BLOCK + BLOCK - 1, every one of them computed. Kernels
  choose their arithmetic by shape (a batch of 7 and one of 64 round differently, which moves a
  uint8 pixel now and then), so a fixed shape with fixed contents is what makes the image of a
  seed the same whatever the batch size, the number of processes, or an interruption.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from gsd.errors import UsageError
from gsd.sampling.samplers import latents_for_seeds
from gsd.util import MAX_SEED

__all__ = ["BLOCK", "MAX_SEEDS", "LABEL_RULES", "parse_seeds", "seeds_text", "blocks_of", "block_seeds",
           "labels_for_seeds", "blocked_forward", "block_latents"]

BLOCK = 16            # seeds per forward pass; on a CPU 16 is also the fastest size per image
MAX_SEEDS = 10 ** 7   # a longer list is a typo: it would not fit a folder or an npz anyway
LABEL_RULES = ("random", "balanced")
_LABEL_SALT = 0x1AB5EED
_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """'0-49999' or '1,5,10-20' -> the seeds in order; UsageError (one line) when the list is
    empty, malformed, negative, beyond MAX_SEED, longer than MAX_SEEDS or repeats a seed."""
    text = str(text).strip()
    where = f"{flag} {text!r}" if flag else repr(text)
    if not text:
        raise UsageError(f"{flag + ': ' if flag else ''}the seed list is empty; give seeds like 0-49999 or 1,5,10-20")
    seeds: list[int] = []
    for item in text.split(","):
        item = item.strip()
        m = _ITEM.match(item)
        if m is None:
            why = "negative seeds do not exist" if item.startswith("-") else "expected N or A-B"
            raise UsageError(f"{where}: {item!r} is not a seed or a range ({why})")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise UsageError(f"{where}: the range {item!r} ends before it starts")
        if hi > MAX_SEED:
            raise UsageError(f"{where}: seed {hi} is above {MAX_SEED}, the largest seed torch accepts")
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise UsageError(f"{where} holds more than {MAX_SEEDS} seeds")
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        seen, dup = set(), None
        for s in seeds:
            if s in seen:
                dup = s
                break
            seen.add(s)
        raise UsageError(f"{where} names seed {dup} twice (each seed is one image)")
    return seeds


def seeds_text(seeds: Sequence[int]) -> str:
    """The shortest `parse_seeds` text of a seed list (ranges collapsed), for manifests."""
    parts, i = [], 0
    seeds = list(seeds)
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def blocks_of(seeds: Sequence[int]) -> list[int]:
    """The aligned blocks (k: seeds k*BLOCK ..) that hold `seeds`, in order of first use."""
    return list(dict.fromkeys(int(s) // BLOCK for s in seeds))


def block_seeds(block: int) -> list[int]:
    return list(range(block * BLOCK, (block + 1) * BLOCK))


def labels_for_seeds(seeds: Sequence[int], num_classes: int, rule) -> torch.Tensor | None:
    """The class label of each seed: None for an unconditional generator (num_classes 0);
    an int C gives C to every seed; 'balanced' gives seed % num_classes; 'random' draws one
    uniformly from a stream of the seed's own (not the latent's stream)."""
    if not num_classes:
        return None
    if isinstance(rule, bool) or rule is None:
        raise ValueError(f"a generator with {num_classes} classes needs a label rule or a class")
    if isinstance(rule, int):
        if not 0 <= rule < num_classes:
            raise ValueError(f"class {rule} is outside 0-{num_classes - 1}")
        return torch.full((len(seeds),), rule, dtype=torch.long)
    if rule == "balanced":
        return torch.tensor([int(s) % num_classes for s in seeds], dtype=torch.long)
    if rule == "random":
        out = torch.empty(len(seeds), dtype=torch.long)
        for i, s in enumerate(seeds):
            g = torch.Generator().manual_seed((int(s) * 6364136223846793005 + _LABEL_SALT) % 2 ** 63)
            out[i] = torch.randint(num_classes, (1,), generator=g)
        return out
    raise ValueError(f"unknown label rule {rule!r} (an int class, or one of {', '.join(LABEL_RULES)})")


def blocked_forward(fn: Callable, eps: torch.Tensor, labels=None) -> torch.Tensor:
    """fn(eps_block, labels_block) over consecutive blocks of BLOCK rows, concatenated as float32
    on the CPU. len(eps) must be a multiple of BLOCK: the caller pads with the block's other
    seeds, so every forward pass has the shape and contents the block rule fixes."""
    if len(eps) % BLOCK:
        raise ValueError(f"{len(eps)} latents are not whole blocks of {BLOCK}")
    out = []
    for i in range(0, len(eps), BLOCK):
        lab = None if labels is None else labels[i:i + BLOCK]
        out.append(fn(eps[i:i + BLOCK], lab).float().cpu())
    return torch.cat(out) if out else eps.new_zeros((0, *eps.shape[1:])).float().cpu()


def block_latents(blocks: Sequence[int], shape, device="cpu") -> torch.Tensor:
    """Latents of every seed of the given blocks, block after block."""
    seeds = [s for b in blocks for s in block_seeds(b)]
    return latents_for_seeds(seeds, shape, device)
