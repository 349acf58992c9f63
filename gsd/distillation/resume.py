"""Resuming a run: `open_resume` checks a `--resume DIR` against its config.json and its newest
intact checkpoint, and `restore` puts the checkpoint back into a Distiller.

What is checked, in one line each, before the data set or the teacher is loaded: the flags
given against config.json (only the settings a resume may change may differ), the world size,
config.json against the checkpoint's own copy of the settings (a hand edit would silently
change the run), the teacher copy against the digest the run recorded, the checkpoint's
integrity (gsd.runs), and --iters against the iteration reached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gsd import parallel, runs
from gsd.config import CHECKPOINT_OWNED, RESUME_FREE, RUN_DEFAULTS, RUN_KEYS, distill_fields, resolve_config, \
    upgrade_config
from gsd.distill import DistillConfig
from gsd.errors import UsageError
from gsd.distillation.settings import check_run_numbers, distill_config
from gsd.util import one_line

__all__ = ["ResumePoint", "open_resume", "restore", "check_against_checkpoint", "CKPT_FREE"]

# DistillConfig fields that may differ from a checkpoint's own copy on --resume: the concrete
# backend, and the fields of settings a resume may change
CKPT_FREE = ("backend",) + tuple(name for name, row in distill_fields() if row.name in RESUME_FREE)


@dataclass
class ResumePoint:
    """A run to continue: its directory, config.json (`saved`, upgraded), the resolved settings
    with the flags a resume may change applied (`cfg`), its validated DistillConfig (`dcfg`,
    with the settings its checkpoint owns), and the checkpoint to continue from."""
    run_dir: Path
    saved: dict
    cfg: dict
    dcfg: DistillConfig
    step: int
    weights: dict
    state: dict
    note: str | None


def open_resume(given: dict, explicit: dict, take_lock) -> ResumePoint:
    """Check `--resume DIR` (given["resume"]) and load its newest intact checkpoint;
    `take_lock(run_dir)` locks the directory before the checkpoint is read."""
    run_dir = Path(given["resume"])
    if given.get("out") and Path(given["out"]).resolve() != run_dir.resolve():
        raise UsageError(f"--out {given['out']} differs from --resume {run_dir}; give one of them")
    explicit = dict(explicit)
    if explicit.get("teacher") is not None:
        explicit["teacher"] = os.path.abspath(explicit["teacher"])
    saved = runs.check_resume_dir(run_dir, {k: v for k, v in explicit.items() if k in RUN_KEYS}, ignore=RESUME_FREE)
    _check_world(run_dir, saved.get("world_size", 1))
    cfg = _damaged_if_not(run_dir, lambda: _saved_settings(run_dir, saved))
    changed = [k for k in RESUME_FREE if k in given and given[k] is not None and k not in ("resume", "out")]
    for key in changed:  # the flags a resume may change, checked as given
        cfg[key] = given[key]
    check_run_numbers(cfg, keys=changed)
    dcfg = _damaged_if_not(run_dir, lambda: distill_config(cfg))
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--resume {run_dir} is not writable")
    take_lock(run_dir)  # before reading the checkpoint another process may be writing
    step, weights, state, note = runs.load_intact_checkpoint(run_dir)
    if cfg["iters"] < step:
        raise UsageError(f"--resume {run_dir} --iters {cfg['iters']}: the run has already reached iteration "
                         f"{step}; give --iters {step} or more")
    check_against_checkpoint(cfg, state, run_dir, step)
    runs.check_run_matches_checkpoint(run_dir, saved, state, step, f"--resume {run_dir}")
    for key in CHECKPOINT_OWNED:  # e.g. a run started before the ramp-up ratio was 0.05 goes on with 0.1
        setattr(dcfg, key, state["distiller"]["config"].get(key, getattr(dcfg, key)))
    return ResumePoint(run_dir, saved, cfg, dcfg, step, weights, state, note)


def _check_world(run_dir: Path, saved_world) -> None:
    if not isinstance(saved_world, int) or saved_world != parallel.env_world_size():
        raise UsageError(f"--resume {run_dir} was trained with {saved_world} process(es), this launch has "
                         f"{parallel.env_world_size()}; resume it with the same world size"
                         + (" (plain python, no torchrun)" if saved_world == 1
                            else f" (torchrun --nproc_per_node={saved_world} on one node)"))


def _saved_settings(run_dir: Path, saved: dict) -> dict:
    cfg = resolve_config({k: v for k, v in saved.items() if k in RUN_DEFAULTS})
    cfg["resume"] = None
    cfg["out"] = str(run_dir)
    check_run_numbers(cfg)
    return cfg


def _damaged_if_not(run_dir: Path, check):
    """check(); what it refuses in config.json is one line that says the file is damaged."""
    try:
        return check()
    except UsageError as exc:
        raise UsageError(f"--resume {run_dir}: its {runs.CONFIG_NAME} is damaged: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise UsageError(f"--resume {run_dir}: its {runs.CONFIG_NAME} is damaged ({type(exc).__name__}: "
                         f"{one_line(exc)})") from None


def check_against_checkpoint(cfg: dict, state: dict, run_dir, step: int) -> None:
    """config.json must say what the checkpoint was trained with: compare the Distiller's
    settings with the checkpoint's own copy, and the run settings with its `run_config`."""
    dist = state.get("distiller") if isinstance(state, dict) else None
    saved = dist.get("config") if isinstance(dist, dict) else None
    if not isinstance(saved, dict):
        raise UsageError(f"--resume {run_dir}: checkpoint {step} holds no settings; it is damaged")
    now = DistillConfig.from_run_config(cfg).to_dict()
    saved = upgrade_config(saved)  # a checkpoint from before the scale-free --lambda-irl
    diff = [(k, now[k], saved[k]) for k in now
            if k in saved and k not in CKPT_FREE + CHECKPOINT_OWNED and runs._norm(saved[k]) != runs._norm(now[k])]
    run_cfg = state.get("run_config")  # written since this check exists: data set, teacher, ...
    if isinstance(run_cfg, dict):
        run_cfg = upgrade_config(run_cfg)
        names = {k for k, _, _ in diff} | {"adam_betas", "batch_per_gpu"}  # those two are in DistillConfig too
        diff += [(k, cfg.get(k), run_cfg[k]) for k in RUN_KEYS
                 if k in run_cfg and k not in names and runs._norm(run_cfg[k]) != runs._norm(cfg.get(k))]
    if diff:
        what = "; ".join(f"{k}: {runs.CONFIG_NAME} has {a!r}, the checkpoint {b!r}" for k, a, b in diff[:4])
        raise UsageError(f"--resume {run_dir}: {runs.CONFIG_NAME} does not match checkpoint {step} ({what}); "
                         f"it was edited: put back the checkpoint's values")


def restore(distiller, point: ResumePoint, device) -> float:
    """The checkpoint's weights, optimiser, counters and RNG streams into `distiller`; returns
    the training seconds it had taken."""
    state = point.state
    saved_world = int(state["distiller"].get("world_size", 1))
    world = parallel.world_size()

    def check_world():
        if saved_world != world:
            raise UsageError(f"--resume {point.run_dir}: its checkpoint was written by {saved_world} process(es), "
                             f"this launch has {world}")
    parallel.agree(check_world)
    distiller.load_weights({k: v.to(device) for k, v in point.weights.items()})
    point.weights = {}  # the Distiller holds them now
    distiller.load_training_state(state["distiller"])
    if "rng_ranks" in state:  # each rank continues its own sampling stream
        distiller.rng.set_state(state["rng_ranks"][parallel.rank()].cpu())
    runs.restore_rng_state(state["rng"])
    return float(state.get("elapsed", 0.0))
