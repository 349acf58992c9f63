"""The run configuration's schema: the defaults every layer reads. Ground floor (no imports
from gsd)."""

from __future__ import annotations

__all__ = ["DISTILL_DEFAULTS"]


# The defaults of the isometric regulariser, in one place (DistillConfig and the flags read
# them): flip them here once the sweeps have chosen a GSD default.
DISTILL_DEFAULTS = {
    "lambda_irl": 0.0,        # scale-free weight (see --lambda-irl); 0 = off
    "lambda_irl_raw": 0.0,    # raw weight of the paper's loss; 0 = off
    "irl_neighbours": 0,      # K neighbours per anchor latent; 0 = random-batch pairs
    "irl_radius": 0.5,        # R: neighbour distance in eps units (z-space: R * sigma_init)
    "irl_estimator": "pairs",
}
