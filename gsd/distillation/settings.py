"""Checking a run's resolved settings, once: the numbers of the run loop and the Distiller's
settings (DistillConfig.validate), before anything is loaded or written."""

from __future__ import annotations

from gsd import parallel
from gsd.distill import DistillConfig, MAX_ROWS
from gsd.errors import UsageError

__all__ = ["check_run_numbers", "distill_config", "RUN_NUMBERS"]

# the run loop's integer settings and their least values (eval_samples and batch_per_gpu are
# sample counts, bounded by what torch can index)
RUN_NUMBERS = {"iters": 0, "log_every": 1, "ckpt_every": 1, "keep_every": 0, "max_bad_iters": 0}
SAMPLE_COUNTS = ("eval_samples", "batch_per_gpu")


def check_run_numbers(cfg: dict, keys=None) -> None:
    """UsageError (one line naming the flag) unless the loop's numbers in `cfg` are usable;
    `keys`: check only these."""
    for key in SAMPLE_COUNTS:
        v = cfg.get(key)
        if (keys is None or key in keys) and v is not None and (
                not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ROWS):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer in [0, {MAX_ROWS}], got {v!r}")
    for key, low in RUN_NUMBERS.items():
        v = cfg.get(key)
        if (keys is None or key in keys) and v is not None and (
                not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= {low}, got {v!r}")


def distill_config(cfg: dict) -> DistillConfig:
    """The Distiller's settings of a resolved run config, validated (with the gradient
    accumulation this launch's world size implies): the one DistillConfig of a run."""
    dcfg = DistillConfig.from_run_config(cfg).validate()
    dcfg.accum_steps(parallel.env_world_size())
    return dcfg
