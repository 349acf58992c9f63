"""Distillation runs: `run(config) -> run_dir`, the library behind `python -m gsd.train`.

config is a dict with the flag names as keys (dashes -> underscores; gsd.config.RUN_DEFAULTS
is the schema); missing keys take the defaults. Every setting and the run directory are
checked before the data set or the teacher is loaded; then the teacher is loaded, the
`gsd.distill.Distiller` runs the loop with atomic checkpoints (gsd.runs), and the shared
evaluation core (gsd.evaluation.metrics) measures the result. gsd.train parses the command line and
calls `run`; gsd.experiments calls it in-process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from gsd import parallel, runs
from gsd.config import (
    DATASET_DEFAULTS, DEFAULT_MAX_BAD_ITERS, EXPLODE_FACTOR, EXPLODE_WINDOW, resolve_config, RESUME_FREE, RUN_DEFAULTS,
    RUN_KEYS,
)
from gsd.data import GMMDenoiser, load_dataset
from gsd.distill import check_irl_radius, DistillConfig, Distiller, MAX_ROWS
from gsd.errors import StorageError, Terminated, TrainingStopped, UsageError
from gsd.evaluation.metrics import evaluate_distillation, summary_rows
from gsd.evaluation.plots import save_samples_png
from gsd.progress import progress_bar
from gsd.teachers.loading import (
    check_teacher_fits, check_teacher_path, load_run_teacher, load_teacher, save_run_teacher,
)
from gsd.teachers.training import get_teacher
from gsd.util import check_memory, format_bytes, format_value, one_line, resolve_device, sampler_table

__all__ = ["run", "summary_table", "TrainingStopped"]

# DistillConfig fields that may differ from a checkpoint's own copy on --resume
CKPT_FREE = ("backend", "compile", "grad_checkpoint")
# DistillConfig fields a resumed run takes from its checkpoint (runs.CKPT_OWNED)
CKPT_OWNED = runs.CKPT_OWNED

# log.jsonl keys averaged over the iterations of a record besides the losses (scale-free weight)
LOGGED_MEANS = ("irl_weight", "irl_gnorm_sid", "irl_gnorm_irl", "irl_floored")


def _validate(cfg: dict, resuming: bool = False) -> None:
    DistillConfig.from_run_config(cfg).validate().accum_steps(parallel.env_world_size())
    for key in ("eval_samples", "batch_per_gpu"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ROWS):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer in [0, {MAX_ROWS}], got {v!r}")
    for key, low in (("iters", 0), ("log_every", 1), ("ckpt_every", 1), ("keep_every", 0), ("max_bad_iters", 0)):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= {low}, got {v!r}")
    if cfg["teacher"] is not None and not resuming:  # a resumed run uses its own copy of the teacher
        check_teacher_path(cfg["teacher"], trust_pickle=bool(cfg.get("trust_pickle")))


def _training_view(cfg: dict) -> dict:
    return {k: cfg[k] for k in RUN_KEYS if k in cfg}


def run(config: dict | argparse.Namespace, *, explicit: dict | None = None, nan_hook=None) -> Path:
    """Distil, checkpoint, evaluate; returns the run directory.

    config: flag values by name (underscores); missing keys take the defaults. With
    `resume`, only the keys in `explicit` (default: every key of config) are compared with
    the saved run. `nan_hook(phase, x_g) -> x_g` is handed to the Distiller (tests).

    Under torchrun (WORLD_SIZE > 1) every rank calls this; the process group is created here
    after the settings are checked and destroyed on return (unless it existed before).
    """
    owns_group = not parallel.is_distributed()
    lock = _RunDirLock()
    try:
        return _run(config, explicit=explicit, nan_hook=nan_hook, lock=lock)
    finally:
        lock.release()
        if owns_group:
            parallel.shutdown()


class _RunDirLock:
    """The run directory's lock, taken by the process that writes it (rank 0 under torchrun)."""

    def __init__(self):
        self._lock = None

    def take(self, run_dir, what: str) -> None:
        if parallel.env_rank() == 0 and self._lock is None:
            self._lock = runs.RunLock(run_dir, what).acquire()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _run(config, *, explicit, nan_hook, lock) -> Path:
    given = dict(vars(config) if isinstance(config, argparse.Namespace) else config)
    explicit = dict(given) if explicit is None else dict(explicit)
    t_start = time.perf_counter()

    # ---------------------------------------------------------------- every check first
    # (settings, --out / --resume, the fused backend: before the data set or teacher is loaded)
    resume_dir = given.get("resume")
    ckpt_note = ckpt_state = ckpt_weights = None
    if resume_dir:
        resume_dir = Path(resume_dir)
        if given.get("out") and Path(given["out"]).resolve() != resume_dir.resolve():
            raise UsageError(f"--out {given['out']} differs from --resume {resume_dir}; give one of them")
        if "teacher" in explicit and explicit["teacher"] is not None:
            explicit["teacher"] = os.path.abspath(explicit["teacher"])
        saved = runs.check_resume_dir(resume_dir, {k: v for k, v in explicit.items() if k in RUN_KEYS},
                                      ignore=RESUME_FREE)
        saved_world = saved.get("world_size", 1)
        if not isinstance(saved_world, int) or saved_world != parallel.env_world_size():
            raise UsageError(f"--resume {resume_dir} was trained with {saved_world} process(es), this launch has "
                             f"{parallel.env_world_size()}; resume it with the same world size"
                             + (" (plain python, no torchrun)" if saved_world == 1
                                else f" (torchrun --nproc_per_node={saved_world} on one node)"))
        run_dir = resume_dir
        try:  # config.json may have been damaged by hand: one line that names the value
            cfg = resolve_config({k: v for k, v in saved.items() if k in RUN_DEFAULTS})
            cfg["resume"] = None
            cfg["out"] = str(resume_dir)
            _validate(cfg, resuming=True)
        except UsageError as exc:
            raise UsageError(f"--resume {run_dir}: its {runs.CONFIG_NAME} is damaged: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise UsageError(f"--resume {run_dir}: its {runs.CONFIG_NAME} is damaged ({type(exc).__name__}: "
                             f"{one_line(exc)})") from None
        for key in RESUME_FREE:  # then the flags a resume may change, checked as given
            if key in given and given[key] is not None and key not in ("resume", "out"):
                cfg[key] = given[key]
        _validate(cfg, resuming=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise UsageError(f"--resume {run_dir} is not writable")
        lock.take(run_dir, "--resume")  # before reading the checkpoint another process may be writing
        step, ckpt_weights, ckpt_state, ckpt_note = runs.load_intact_checkpoint(run_dir)
        if cfg["iters"] < step:
            raise UsageError(f"--resume {run_dir} --iters {cfg['iters']}: the run has already reached iteration "
                             f"{step}; give --iters {step} or more")
        _check_against_checkpoint(cfg, ckpt_state, run_dir, step)
        runs.check_run_matches_checkpoint(run_dir, saved, ckpt_state, step, f"--resume {run_dir}")
    else:
        cfg = resolve_config({k: v for k, v in given.items() if k != "resume"}, explicit)
        if cfg["irl_estimator"] == "jvp" and explicit.get("irl_radius") is not None:
            raise UsageError("--irl-estimator jvp cannot honour --irl-radius (it probes the Jacobian at the anchors, "
                             "with no neighbours)")
        run_dir = Path(cfg["out"]) if cfg.get("out") else runs.default_run_dir(cfg["dataset"])
        cfg["out"] = str(run_dir)
        _validate(cfg)
        runs.check_out_path(run_dir)
        runs.prepare_run_dir(run_dir, _training_view(cfg), allow_restart=True)
    device = resolve_device(cfg["device"])
    backend = _ops_backend(cfg, device)
    _check_grouped_backend(cfg, backend, device)

    # ---------------------------------------------------------------- processes (torchrun)
    # every check above depends only on the settings and the files, so all ranks agree on it;
    # from here a failure on one rank is raised on all of them (parallel.agree)
    device = parallel.init(device)
    parallel.barrier()
    main_rank = parallel.is_main()
    world = parallel.world_size()
    show = bool(cfg["progress"]) and main_rank
    import gsd_kernels
    backends = gsd_kernels.resolved_backends(device, backend)

    def load_inputs():
        ds = load_dataset(cfg["dataset"], data_root=cfg["data_root"], resolution=cfg["resolution"],
                          download=cfg["download"])
        _check_memory(cfg, ds.sample_shape, device, world)
        check_irl_radius(cfg["irl_radius"], cfg["irl_neighbours"], math.prod(ds.sample_shape))
        net = None
        if resume_dir:
            net = load_run_teacher(run_dir, device=device, dataset=ds)
        elif cfg["teacher"] is not None:
            net = load_teacher(cfg["teacher"], dataset=ds, device=device, trust_pickle=bool(cfg.get("trust_pickle")))
        if cfg["exact_teacher"] and ds.mixture is None:
            raise UsageError(f"--exact-teacher needs a dataset with a known mixture, not {ds.name}")
        return ds, net

    # rank 0 first: a --download happens once
    dataset, teacher_net = parallel.rank0_first(load_inputs)

    # ---------------------------------------------------------------- teacher (may train one)
    if teacher_net is None:
        def default_teacher():
            net = get_teacher(dataset, teacher_path=None, cache_dir=cfg["cache_dir"], device=device,
                              seed=0, progress=show)
            check_teacher_fits(net, dataset, "(default teacher)")
            return net
        # rank 0 trains and caches it, the others load the cached file
        teacher_net = parallel.rank0_first(default_teacher)
    teacher_net = teacher_net.to(device).eval()
    f_phi = GMMDenoiser(dataset.mixture).to(device) if cfg["exact_teacher"] else teacher_net
    if cfg["exact_teacher"] and int(getattr(teacher_net, "label_dim", 0)):
        raise UsageError("the exact gmm teacher is unconditional; the network teacher is class-conditional")

    # ---------------------------------------------------------------- run directory
    dcfg = DistillConfig.from_run_config(cfg, backend)  # the concrete backend: what runs is what is recorded
    if resume_dir:
        for key in CKPT_OWNED:
            saved_value = ckpt_state["distiller"]["config"].get(key, getattr(dcfg, key))
            setattr(dcfg, key, saved_value)
    distiller = Distiller(f_phi, dcfg, init=teacher_net, sample_shape=dataset.sample_shape, device=device)
    distiller.nan_hook = nan_hook
    distiller.enable_ddp()  # DDP on G and f_psi; weights broadcast from rank 0
    if dcfg.lambda_regress > 0:
        _set_regression_pairs(distiller, show)
    elapsed_before = 0.0
    saved_at = None
    teacher_sha256 = None
    if resume_dir:
        def check_world():
            saved_world = int(ckpt_state["distiller"].get("world_size", 1))
            if saved_world != world:
                raise UsageError(f"--resume {run_dir}: its checkpoint was written by {saved_world} process(es), "
                                 f"this launch has {world}")
        parallel.agree(check_world)
        weights, ckpt_weights = ckpt_weights, None
        state = ckpt_state
        distiller.load_weights({k: v.to(device) for k, v in weights.items()})
        distiller.load_training_state(state["distiller"])
        if "rng_ranks" in state:  # each rank continues its own sampling stream
            distiller.rng.set_state(state["rng_ranks"][parallel.rank()].cpu())
        runs.restore_rng_state(state["rng"])
        elapsed_before = float(state.get("elapsed", 0.0))
        saved_at = distiller.iteration
        if main_rank:
            teacher_sha256 = state.get("teacher_sha256") or runs.teacher_copy_digest(
                run_dir, str(saved.get("teacher_file") or runs.TEACHER_NAME))  # a run from before digests
            if ckpt_note:
                print(f"note: {ckpt_note}", file=sys.stderr)
            runs.remove_stale_temp_files(run_dir)  # left by a kill during a write
            saved_cfg = runs.read_config(run_dir)
            if saved_cfg.get("iters") != cfg["iters"] or saved_cfg.get("backends") != backends:
                saved_cfg["iters"] = cfg["iters"]
                saved_cfg["backend"] = backend
                saved_cfg["backends"] = backends  # what runs from here on
                runs.write_json_atomic(run_dir / runs.CONFIG_NAME, saved_cfg)
            logger = runs.JsonlLogger(run_dir / runs.LOG_NAME, truncate_after_step=distiller.iteration)
        else:
            logger = _NullLogger()
    elif main_rank:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {run_dir}: cannot create it ({exc.strerror or exc})") from None
        lock.take(run_dir, "--out")
        # again under the lock: another process may have started a run here since the checks
        runs.prepare_run_dir(run_dir, _training_view(cfg), allow_restart=True)
        if runs.restartable(run_dir):  # a crash or kill before its first checkpoint: nothing to keep
            runs.clear_dead_run(run_dir)
            print(f"note: --out {run_dir} held a run with no complete checkpoint; starting it again",
                  file=sys.stderr)
        runs.remove_stale_temp_files(run_dir)
        teacher_file = save_run_teacher(teacher_net, run_dir, cfg["teacher"] or "default teacher")
        teacher_sha256 = runs.teacher_copy_digest(run_dir, teacher_file)
        record = {k: v for k, v in cfg.items()}
        record["run_format"] = runs.RUN_FORMAT
        record["teacher_sha256"] = teacher_sha256
        record["backend"] = dcfg.backend
        record["backends"] = backends
        record["teacher_file"] = teacher_file
        record["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
        record["world_size"] = world
        runs.write_json_atomic(run_dir / runs.CONFIG_NAME, record)
        logger = runs.JsonlLogger(run_dir / runs.LOG_NAME)
    else:
        logger = _NullLogger()
    parallel.barrier()

    if not resume_dir:
        # dropout draws from the global RNG: seeded by --seed (a resume restores its state)
        torch.manual_seed((int(cfg["seed"]) * 1_000_003 + 0x5EED + parallel.rank()) % 2 ** 63)

    # ---------------------------------------------------------------- training loop
    guard = _StopRule(int(cfg.get("max_bad_iters", DEFAULT_MAX_BAD_ITERS)))
    if resume_dir and isinstance(ckpt_state.get("stop_rule"), dict):
        guard.load_state(ckpt_state["stop_rule"])

    def checkpoint(elapsed):
        # collective: every rank's sampling stream goes into the state; rank 0 writes it
        dstate = distiller.training_state()
        extra = {}
        if world > 1:
            extra["rng_ranks"] = [s.cpu() for s in parallel.all_gather_objects(distiller.rng.get_state())]
        if main_rank:
            state = {"distiller": dstate, "rng": runs.capture_rng_state(), "elapsed": elapsed,
                     "run_config": _training_view(cfg), "teacher_sha256": teacher_sha256,
                     "stop_rule": guard.state(), **extra}
            try:
                runs.save_checkpoint(run_dir, distiller.iteration, distiller.weights(), state,
                                     keep_every=cfg["keep_every"] or None)
            except StorageError as exc:  # say what is kept: the previous checkpoint is intact
                kept = (f"the checkpoint of iteration {saved_at} is intact; free space and --resume {run_dir}"
                        if saved_at is not None else "no checkpoint was written yet")
                raise StorageError(f"{exc}; {kept}") from None
        parallel.barrier()
        return distiller.iteration

    t_train = time.perf_counter()
    total = int(cfg["iters"])
    interrupts = _DeferredInterrupt(enabled=world == 1)
    mid_step = False
    try:
        bar = progress_bar(total=total, initial=min(distiller.iteration, total), desc=f"distil {cfg['dataset']}",
                           enabled=show, file=sys.stderr)
        acc: dict = {}
        n_acc = 0
        nan_since = {"nan_samples": 0, "nan_grads": 0}
        try:
            with interrupts:
                while distiller.iteration < total:
                    mid_step = True  # an interrupt from here to the end of step() leaves a half-done iteration
                    out = distiller.step()
                    mid_step = False
                    n_acc += 1
                    for k, v in out.items():
                        if k.startswith("loss_") or k in LOGGED_MEANS:
                            acc[k] = acc.get(k, 0.0) + v
                    nan_since["nan_samples"] += out["nan_samples"]
                    nan_since["nan_grads"] += out["nan_grads"]
                    it = distiller.iteration
                    bar.update(1)
                    bad = guard.update(out, device, world)  # the same verdict on every rank
                    nan_now = out["nan_samples"] or out["nan_grads"]
                    if it % cfg["log_every"] == 0 or it == total or nan_now or guard.stopped:  # same on every rank
                        elapsed = elapsed_before + time.perf_counter() - t_train
                        rec = {"iteration": it, "time": round(elapsed, 3), "images_seen": distiller.images_seen}
                        acc = _mean_over_ranks(acc, device)
                        rec.update({k: v / n_acc for k, v in acc.items()})
                        rec.update(nan_since)
                        rec["nan_events_total"] = distiller.totals["nan_iterations"]
                        logger.log(rec)
                        bar.set_postfix({k[5:]: f"{v / n_acc:.4g}" for k, v in acc.items() if k.startswith("loss_")},
                                        refresh=False)
                        acc, n_acc = {}, 0
                        nan_since = {"nan_samples": 0, "nan_grads": 0}
                    if nan_now and main_rank:
                        bar.write(f"iteration {it}: dropped {out['nan_samples']} non-finite samples, zeroed "
                                  f"{out['nan_grads']} non-finite gradient values")
                    if guard.stopped:
                        raise TrainingStopped(guard.message(it, saved_at, run_dir))
                    if it % cfg["ckpt_every"] == 0 and it < total and not bad:  # never checkpoint a bad iteration
                        saved_at = checkpoint(elapsed_before + time.perf_counter() - t_train)
                    if interrupts.requested:  # Ctrl-C or SIGTERM during this iteration: it is complete now
                        raise interrupts.interrupt()
        except TrainingStopped:
            bar.close()
            raise
        except KeyboardInterrupt as exc:
            bar.close()
            logger.close()
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            if world > 1:  # the other ranks may be anywhere: no collective checkpoint now
                if main_rank:
                    print(f"{what}; continue from the last checkpoint with --resume {run_dir}",
                          file=sys.stderr)
                raise
            if mid_step:
                # part of iteration k+1 is applied (a step, Adam moments, the RNG): never save that
                print(f"{what} in iteration {distiller.iteration + 1}, which is not saved; "
                      + (f"continue from the checkpoint of iteration {saved_at} with --resume {run_dir}"
                         if saved_at is not None else f"no checkpoint yet: start it again with --out {run_dir}"),
                      file=sys.stderr)
                raise
            if saved_at != distiller.iteration:
                saved_at = checkpoint(elapsed_before + time.perf_counter() - t_train)
            print(f"{what}; checkpoint of iteration {distiller.iteration} saved, continue with "
                  f"--resume {run_dir}", file=sys.stderr)
            raise
        bar.close()
        if guard.limit > 0 and guard.streak:  # it ended in bad iterations: never checkpoint, evaluate or report them
            raise TrainingStopped(guard.message(distiller.iteration, saved_at, run_dir, ended=True))
        train_seconds = elapsed_before + time.perf_counter() - t_train
        if saved_at != distiller.iteration:  # also over a damaged checkpoint of this step
            checkpoint(train_seconds)
    finally:
        logger.close()

    if not main_rank:  # rank 0 alone evaluates
        return run_dir

    # ---------------------------------------------------------------- evaluation

    n_eval = cfg["eval_samples"]
    if n_eval is None:
        n_eval = DATASET_DEFAULTS.get(cfg["dataset"], DATASET_DEFAULTS["folder"])["eval_samples"]
    if n_eval > 0:
        metrics, panels = evaluate_distillation(
            distiller.generate, f_phi, dataset, device=device, num_samples=n_eval,
            num_classes=distiller.num_classes, sigma_init=dcfg.sigma_init, backend=dcfg.backend,
            cache_dir=cfg["cache_dir"], latency_repeats=cfg["latency_repeats"],
            classifier_epochs=cfg["classifier_epochs"], progress=cfg["progress"])
        metrics["iterations"] = distiller.iteration
        metrics["images_seen"] = distiller.images_seen
        metrics["train_seconds"] = round(train_seconds, 2)
        metrics["nan_events"] = dict(distiller.totals)
        metrics["device"] = str(device)
        metrics["backend"] = dcfg.backend
        metrics["backends"] = backends
        metrics["teacher_kind"] = "exact GMM denoiser" if cfg["exact_teacher"] else "network"
        runs.write_json_atomic(run_dir / "metrics.json", metrics)
        save_samples_png(panels, run_dir / "samples.png",
                         means=dataset.mixture.means if dataset.mixture is not None else None)
        print(summary_table(metrics, run_dir, time.perf_counter() - t_start))
    else:
        print(f"ops backends: {_format_backends(backends)}")
        print(f"run directory: {run_dir}")
    return run_dir


def _set_regression_pairs(distiller, show: bool) -> None:
    """The regression term's pairs, with a progress bar (the same pairs on every rank and on --resume)."""
    count = distiller.config.regress_pairs
    t0 = time.time()
    bar = progress_bar(total=count, desc="teacher ODE pairs", enabled=show, leave=False)

    class Estimate:  # after the first chunk: how long the pairs will take, in one line
        def update(self, n):
            bar.update(n)
            if show and not getattr(self, "said", False) and n < count:
                self.said = True
                left = (time.time() - t0) / n * (count - n)
                if left > 30:
                    bar.write(f"regression pairs: {count} teacher ODE outputs, about {left / 60:.1f} min more")
    try:
        distiller.draw_regression_pairs(progress=Estimate())
    finally:
        bar.close()
    if show:
        print(f"regression pairs: {count} teacher ODE outputs in {time.time() - t0:.1f} s", flush=True)


def _ops_backend(cfg: dict, device: torch.device) -> str:
    """The concrete backend of the loss ops: the fastest fused one with --fused (a one-line
    UsageError where none can serve `device`; never a silent fallback), else "reference"."""
    if not cfg["fused"]:
        return "reference"
    import gsd_kernels
    try:
        return gsd_kernels.fused_backend(device)
    except ValueError as exc:
        raise UsageError(f"--fused: {one_line(exc)}") from None


def _check_grouped_backend(cfg: dict, backend: str, device: torch.device) -> None:
    """Neighbour groups need isometry_loss(groups=...): refuse (one line, before anything is
    written) a backend that cannot take them, instead of failing in the first iteration."""
    k = int(cfg["irl_neighbours"])
    if k == 0 or cfg["irl_estimator"] != "pairs" or not (cfg["lambda_irl"] > 0 or cfg["lambda_irl_raw"] > 0):
        return
    import gsd_kernels
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(2 * (k + 1), 3, generator=g).to(device) for _ in range(2))
    try:
        gsd_kernels.isometry_loss(x, z, weighting=cfg["irl_weighting"], groups=k + 1, backend=backend)
    except (ValueError, NotImplementedError) as exc:
        raise UsageError(f"--irl-neighbours {k}: {one_line(exc)} (run without --fused)") from None


def _format_backends(backends: dict) -> str:
    return ", ".join(f"{op}={name}" for op, name in backends.items())


def _check_against_checkpoint(cfg: dict, state: dict, run_dir, step: int) -> None:
    """config.json must say what the checkpoint was trained with (a hand edit would silently
    change the run): compare with the checkpoint's own copy of the settings."""
    dist = state.get("distiller") if isinstance(state, dict) else None
    saved = dist.get("config") if isinstance(dist, dict) else None
    if not isinstance(saved, dict):
        raise UsageError(f"--resume {run_dir}: checkpoint {step} holds no settings; it is damaged")
    now = DistillConfig.from_run_config(cfg).to_dict()
    saved = runs.upgrade_config(saved)  # a checkpoint from before the scale-free --lambda-irl
    diff = [(k, now[k], saved[k]) for k in now
            if k in saved and k not in CKPT_FREE + CKPT_OWNED and runs._norm(saved[k]) != runs._norm(now[k])]
    run_cfg = state.get("run_config")  # written since this check exists: data set, teacher, ...
    if isinstance(run_cfg, dict):
        run_cfg = runs.upgrade_config(run_cfg)
        names = {k for k, _, _ in diff} | {"adam_betas", "batch_per_gpu"}  # those two are in DistillConfig too
        diff += [(k, cfg.get(k), run_cfg[k]) for k in RUN_KEYS
                 if k in run_cfg and k not in names and runs._norm(run_cfg[k]) != runs._norm(cfg.get(k))]
    if diff:
        what = "; ".join(f"{k}: {runs.CONFIG_NAME} has {a!r}, the checkpoint {b!r}" for k, a, b in diff[:4])
        raise UsageError(f"--resume {run_dir}: {runs.CONFIG_NAME} does not match checkpoint {step} ({what}); "
                         f"it was edited: put back the checkpoint's values")


def _check_memory(cfg: dict, sample_shape, device: torch.device, world: int) -> None:
    """Refuse a batch / evaluation whose sample tensors alone cannot fit (a lower bound: ~16
    batch-sized float32 tensors per step, 4 more per regression row that G's forward carries
    (batch x regress_ratio), the regression pairs kept for the run (latent and target), 4 per
    evaluated sample). On CPU the limit is cli.check_memory's (half the machine,
    GSD_MEMORY_LIMIT_GB overrides it); on CUDA the device's memory."""

    numel = math.prod(int(d) for d in sample_shape)
    per_rank = cfg.get("batch_per_gpu") or -(-cfg["batch"] // max(1, world))
    n_eval = cfg.get("eval_samples") or 0
    regress = bool(cfg.get("lambda_regress"))
    ratio = int(cfg.get("regress_ratio") or 1) if regress else 0
    n_pairs = int(cfg.get("regress_pairs") or 0) if regress else 0
    batch_what = f"--batch {cfg['batch']}" + (f" with --regress-ratio {ratio}" if regress else "")
    needs = ((4 * numel * per_rank * (16 + 4 * ratio), batch_what,
              "use a smaller --batch (or --batch-per-gpu with gradient accumulation)"
              + (" or a smaller --regress-ratio" if regress else "")),
             (2 * 4 * numel * n_pairs, f"--regress-pairs {n_pairs}", "use fewer"),
             (4 * 4 * numel * n_eval, f"--eval-samples {n_eval}", "use fewer"))
    for nbytes, what, hint in needs:
        if device.type != "cuda":
            check_memory(nbytes, what, hint)
            continue
        try:
            total = int(torch.cuda.get_device_properties(device).total_memory)
        except (RuntimeError, AssertionError, ValueError):
            continue
        if nbytes > total:
            raise UsageError(f"{what} needs about {format_bytes(nbytes)}, more than the {format_bytes(total)} of "
                             f"{device}; {hint}")


class _StopRule:
    """The --max-bad-iters rule (see DEFAULT_MAX_BAD_ITERS): counts consecutive bad iterations."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0
        self.reference: float | None = None
        self.recent: list[float] = []
        self.reason = ""

    def update(self, out: dict, device, world: int) -> bool:
        losses = {k: float(v) for k, v in out.items() if k.startswith("loss_")}
        reason = None
        if not all(math.isfinite(v) for v in losses.values()):
            reason = "non-finite loss " + ", ".join(k for k, v in losses.items() if not math.isfinite(v))
        elif out.get("all_dropped"):
            reason = "a step dropped every sample (non-finite generator samples, teacher or fake-score outputs)"
        elif out.get("all_grads_zeroed"):
            reason = "every gradient value of a step was non-finite (zeroed: the step learnt nothing)"
        else:
            if self.reference is None:
                # computed before this start's first update (loss_gen of a SiD iteration follows
                # the fake-score step, which a diverging lr has already spoilt)
                first = losses["loss_fake"] if "loss_fake" in losses else losses.get("loss_gen", 0.0)
                self.reference = max(1.0, abs(first))
            self.recent = (self.recent + [abs(losses.get("loss_fake", 0.0)) + abs(losses.get("loss_gen", 0.0))])
            self.recent = self.recent[-EXPLODE_WINDOW:]
            size = sorted(self.recent)[len(self.recent) // 2]
            if size > EXPLODE_FACTOR * self.reference:
                reason = (f"the loss exploded (median |loss_fake| + |loss_gen| of the last {len(self.recent)} "
                          f"iterations {size:.3g} > {EXPLODE_FACTOR:g} x {self.reference:.3g} at the start)")
        bad = reason is not None
        if world > 1:  # one verdict for every rank, or some would stop and the others wait
            flag = torch.tensor([int(bad)], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = bool(flag.item())
            reason = reason or "a bad iteration on another process"
        self.streak = self.streak + 1 if bad else 0
        if bad:
            self.reason = reason
        return bad

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run judges its iterations as the
        uninterrupted run would (not against a new reference taken mid-divergence)."""
        return {"reference": self.reference, "recent": list(self.recent), "streak": self.streak}

    def load_state(self, state: dict) -> None:
        ref = state.get("reference")
        self.reference = float(ref) if isinstance(ref, (int, float)) else None
        self.recent = [float(v) for v in state.get("recent", [])][-EXPLODE_WINDOW:]
        self.streak = int(state.get("streak", 0))

    @property
    def stopped(self) -> bool:
        return self.limit > 0 and self.streak >= self.limit

    def message(self, iteration: int, saved_at, run_dir, ended: bool = False) -> str:
        kept = (f"its last checkpoint (iteration {saved_at}) is kept" if saved_at is not None
                else "it has no checkpoint")
        what = (f"training stopped at its last iteration ({iteration}): the last {self.streak} were bad and are "
                f"not saved" if ended else f"training stopped at iteration {iteration}: {self.streak} bad iterations in a row")
        return (f"{what} (the last: {self.reason}); lower --lr / --lr-fake, the loss weights, or check the teacher; "
                f"{kept} in {run_dir} (--max-bad-iters sets the rule)")


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM while training: the first one lets the current iteration
    finish (it sets `requested`, and `terminated` for SIGTERM, which batch schedulers send
    before they kill); a second one interrupts at once. Only in the main thread of a
    one-process run; the previous handlers are put back on exit."""

    def __init__(self, enabled: bool):
        import threading
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.terminated = False
        self._previous = {}

    def _handler(self, signum, frame):
        import signal
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested = True
        self.terminated = signum == signal.SIGTERM

    def interrupt(self) -> KeyboardInterrupt:
        """The exception that ends the run once the requested iteration is complete."""
        return Terminated() if self.terminated else KeyboardInterrupt()

    def __enter__(self):
        if self.enabled:
            import signal
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            import signal
            for sig, previous in self._previous.items():
                if previous is None:
                    previous = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
                signal.signal(sig, previous)
        return False


class _NullLogger:
    """The log of ranks other than 0."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _mean_over_ranks(acc: dict, device) -> dict:
    """Loss sums averaged over the processes (the same keys on every rank)."""
    if parallel.world_size() <= 1 or not acc:
        return acc
    keys = sorted(acc)
    t = torch.tensor([float(acc[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    t /= parallel.world_size()
    return dict(zip(keys, t.tolist()))


def summary_table(metrics: dict, run_dir, wall: float | None = None) -> str:
    one, teach = metrics["one_step"], metrics["teacher"]
    cols = ["nfe", "fd", "latency_ms"] + [k for k in ("sliced_wasserstein", "mmd", "modes_covered") if k in one]
    names = {"nfe": "NFE", "fd": f"FD[{metrics.get('fd_feature', '?')}]", "latency_ms": "latency ms (64)",
             "sliced_wasserstein": "sliced W2", "mmd": "MMD^2", "modes_covered": "modes"}
    lines = sampler_table((("one-step G (EMA)", one), ("teacher Heun", teach)), cols, names)
    # every sample-quality metric with its noise floor and a within-noise verdict, then geometry
    extra = ["", summary_rows(metrics), ""]
    if one.get("latency_ms") and teach.get("latency_ms"):
        extra.append(f"speed-up one-step vs teacher: {teach['latency_ms'] / one['latency_ms']:.1f}x")
    if "real_split_fd" in metrics:
        extra.append(f"FD between two halves of the real data (noise floor): {format_value(metrics['real_split_fd'])}")
    if "classifier_test_accuracy" in metrics:
        extra.append(f"feature classifier held-out accuracy: {metrics['classifier_test_accuracy']:.3f}")
    nan = metrics.get("nan_events", {})
    if nan.get("nan_iterations"):
        extra.append(f"NaN events: {nan['nan_iterations']} iterations ({nan['nan_samples']} samples dropped, "
                     f"{nan['nan_grads']} gradient values zeroed)")
    if wall is not None:
        extra.append(f"wall time: {wall:.1f} s (training {metrics.get('train_seconds', 0):.1f} s)")
    if metrics.get("backends"):
        extra.append(f"ops backends: {_format_backends(metrics['backends'])}")
    extra.append(f"run directory: {run_dir}")
    return "\n".join(lines + extra)
