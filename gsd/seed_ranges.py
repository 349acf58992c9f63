"""The seed ranges of the engine: which random streams each consumer draws from, in one place,
so that no two consumers share a latent (evaluation samples, isometry latents, local isometry
anchors, regression pairs). Ground floor."""

from __future__ import annotations

__all__ = ["SEED_STRIDE", "ISOMETRY_SEED_OFFSET", "LOCAL_ISOMETRY_SEED_OFFSET", "MAX_ISOMETRY_LATENTS",
           "SEED_RANGE_WHY", "LOCAL_DIRECTION_SEED", "REAL_SPLIT_SEED", "TRUE_SEEDS", "BOOTSTRAP_SEED",
           "REGRESS_SEED_BASE"]

# Latent seeds of one evaluation with seed s: base = s * SEED_STRIDE; sample i uses base + i
# (i < ISOMETRY_SEED_OFFSET), global isometry latent i base + ISOMETRY_SEED_OFFSET + i, local
# isometry anchor i base + LOCAL_ISOMETRY_SEED_OFFSET + i (its neighbours' directions come from
# their own generator, LOCAL_DIRECTION_SEED).
SEED_STRIDE = 100_000_000
ISOMETRY_SEED_OFFSET = 10_000_000
LOCAL_ISOMETRY_SEED_OFFSET = 90_000_000
MAX_ISOMETRY_LATENTS = LOCAL_ISOMETRY_SEED_OFFSET - ISOMETRY_SEED_OFFSET
# why --num-samples / --isometry-latents are bounded (the flags' messages say it)
SEED_RANGE_WHY = ("each --seed owns 1e8 latent seeds: 1e7 for the samples, 8e7 for the isometry latents, the rest "
                  "for the local isometry anchors")
LOCAL_DIRECTION_SEED = 0x15E7
REAL_SPLIT_SEED = 0       # the permutation of the real data behind its two halves
TRUE_SEEDS = (123456, 654321)  # gmm: the reference true sample and the independent one (noise floor)
BOOTSTRAP_SEED = 2024
# The regression pairs' latents come from their own seed range, above every evaluation seed
# (seed * SEED_STRIDE + offset + i for seeds up to MAX_SEED), so that no evaluation sample is a
# training pair.
REGRESS_SEED_BASE = 2 ** 62
