"""Distillation runs: `run(config) -> run_dir`, the library behind `python -m gsd.train`.

config is a dict with the flag names as keys (dashes -> underscores; gsd.config is the schema);
missing keys take the defaults. A run goes through named phases: `_prepare` resolves and
checks every setting and the run directory (or the checkpoint to resume, gsd.distillation.resume) before
anything is loaded; `_load_inputs` loads the data set and the teacher; `_build_distiller`
builds the Distiller (and restores a resumed one); `_open_run_dir` writes config.json and the
teacher copy (a new run) and opens the log; gsd.distillation.loop trains, checkpointing
atomically (gsd.runs); `_evaluate` measures the result with the shared evaluation core.
gsd.train parses the command line and calls `run`; gsd.experiments calls it in-process.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gsd.fileio import write_json_atomic
from gsd import parallel, runs
from gsd.config import DEFAULT_MAX_BAD_ITERS, RUN_KEYS, dataset_default, resolve_config
from gsd.data import GMMDenoiser, RealSamples, load_dataset
from gsd.distill import DistillConfig, Distiller
from gsd.objective.isometry import check_irl_radius
from gsd.errors import TrainingStopped, UsageError
from gsd.evaluation.assemble import evaluate_distillation
from gsd.evaluation.metrics import summary_rows
from gsd.evaluation.plots import save_samples_png
from gsd.generator import load_generator
from gsd.models.networks import ARCHITECTURES, EDMPrecond
from gsd.models.checkpoint import check_state_dict
from gsd.progress import progress_bar
from gsd.distillation.resume import ResumePoint, open_resume, restore
from gsd.distillation.settings import check_run_numbers, distill_config
from gsd.teachers.loading import check_teacher_fits, check_teacher_path, load_run_teacher, load_teacher, \
    save_run_teacher
from gsd.teachers.recipes import get_teacher
from gsd.distillation.loop import NullLogger, StopRule, TrainingLoop
from gsd.util import check_memory, format_bytes, format_value, one_line, resolve_device, sampler_table

__all__ = ["run", "summary_table", "TrainingStopped"]


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
        t_start = time.perf_counter()
        plan = _prepare(config, explicit, lock)
        inputs = _load_inputs(plan)
        distiller = _build_distiller(plan, inputs, nan_hook)
        logger = _open_run_dir(plan, inputs, distiller, lock)
        loop = TrainingLoop(distiller, plan.cfg, plan.run_dir, logger, guard=plan.guard,
                            run_state=lambda: {"run_config": _training_view(plan.cfg),
                                               "teacher_sha256": plan.teacher_sha256},
                            saved_at=distiller.iteration if plan.resume else None,
                            elapsed_before=plan.elapsed_before, device=plan.device, show=plan.show)
        train_seconds = loop.run()
        if parallel.is_main():  # rank 0 alone evaluates
            _evaluate(plan, inputs, distiller, train_seconds, time.perf_counter() - t_start)
        return plan.run_dir
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


@dataclass
class _Plan:
    """What the phases of a run share: its settings, directory, device and backends."""
    cfg: dict
    dcfg: DistillConfig
    run_dir: Path
    resume: ResumePoint | None
    device: torch.device = None
    backend: str = "reference"
    backends: dict = field(default_factory=dict)
    show: bool = False
    guard: StopRule = None
    elapsed_before: float = 0.0
    teacher_sha256: str | None = None


@dataclass
class _Inputs:
    dataset: object
    teacher_net: torch.nn.Module
    f_phi: torch.nn.Module


# ---------------------------------------------------------------------- phase: every check first

def _prepare(config, explicit, lock) -> _Plan:
    """Every setting, the run directory and the ops backend, checked before the data set or the
    teacher is loaded; then the processes (torchrun) start. The settings are resolved and
    validated once, a resumed run's included."""
    given = dict(vars(config) if isinstance(config, argparse.Namespace) else config)
    explicit = dict(given) if explicit is None else dict(explicit)
    point = None
    if given.get("resume"):
        point = open_resume(given, explicit, lambda d: lock.take(d, "--resume"))
        cfg, dcfg, run_dir = point.cfg, point.dcfg, point.run_dir
    else:
        cfg, dcfg, run_dir = _new_run_settings(given, explicit)
    plan = _Plan(cfg=cfg, dcfg=dcfg, run_dir=run_dir, resume=point)
    device = resolve_device(cfg["device"])
    plan.backend = dcfg.backend = _ops_backend(cfg, device)  # what runs is what is recorded
    _check_grouped_backend(cfg, plan.backend, device)
    # every check above depends only on the settings and the files, so all ranks agree on it;
    # from here a failure on one rank is raised on all of them (parallel.agree)
    plan.device = parallel.init(device)
    parallel.barrier()
    plan.show = bool(cfg["progress"]) and parallel.is_main()
    import gsd_kernels
    plan.backends = gsd_kernels.resolved_backends(plan.device, plan.backend)
    plan.guard = StopRule(int(cfg.get("max_bad_iters", DEFAULT_MAX_BAD_ITERS)))
    if point is not None and isinstance(point.state.get("stop_rule"), dict):
        plan.guard.load_state(point.state["stop_rule"])
    return plan


def _new_run_settings(given: dict, explicit: dict) -> tuple[dict, DistillConfig, Path]:
    cfg = resolve_config({k: v for k, v in given.items() if k != "resume"}, explicit)
    if cfg["irl_estimator"] == "jvp" and explicit.get("irl_radius") is not None:
        raise UsageError("--irl-estimator jvp cannot honour --irl-radius (it probes the Jacobian at the anchors, "
                         "with no neighbours)")
    run_dir = Path(cfg["out"]) if cfg.get("out") else runs.default_run_dir(cfg["dataset"])
    cfg["out"] = str(run_dir)
    check_run_numbers(cfg)
    dcfg = distill_config(cfg)
    if cfg["teacher"] is not None:
        check_teacher_path(cfg["teacher"], trust_pickle=bool(cfg.get("trust_pickle")))
    runs.check_out_path(run_dir)
    runs.prepare_run_dir(run_dir, _training_view(cfg), allow_restart=True)
    return cfg, dcfg, run_dir


# ---------------------------------------------------------------------- phase: data set and teacher

def _load_inputs(plan: _Plan) -> _Inputs:
    cfg, device = plan.cfg, plan.device

    def load():
        ds = load_dataset(cfg["dataset"], data_root=cfg["data_root"], resolution=cfg["resolution"],
                          download=cfg["download"], shapes_kinds=cfg["shapes_kinds"])
        if cfg["conditional"] and not ds.num_classes:
            raise UsageError(f"--conditional: --dataset {ds.name} has no class labels")
        _check_memory(cfg, ds.sample_shape, device, parallel.world_size())
        check_irl_radius(cfg["irl_radius"], cfg["irl_neighbours"], math.prod(ds.sample_shape))
        net = None
        if plan.resume:
            net = load_run_teacher(plan.run_dir, device=device, dataset=ds)
        elif cfg["teacher"] is not None:
            net = load_teacher(cfg["teacher"], dataset=ds, device=device, trust_pickle=bool(cfg.get("trust_pickle")))
            if cfg["conditional"] and not int(getattr(net, "label_dim", 0) or 0):
                raise UsageError(f"--conditional: the teacher {cfg['teacher']} is unconditional")
        if cfg["exact_teacher"] and ds.mixture is None:
            raise UsageError(f"--exact-teacher needs a dataset with a known mixture, not {ds.name}")
        return ds, net

    dataset, teacher_net = parallel.rank0_first(load)  # rank 0 first: a --download happens once
    if teacher_net is None:
        def default_teacher():
            net = get_teacher(dataset, teacher_path=None, cache_dir=cfg["cache_dir"], device=device,
                              seed=0, progress=plan.show, conditional=bool(cfg["conditional"]))
            check_teacher_fits(net, dataset, "(default teacher)")
            return net
        # rank 0 trains and caches it, the others load the cached file
        teacher_net = parallel.rank0_first(default_teacher)
    teacher_net = teacher_net.to(device).eval()
    f_phi = GMMDenoiser(dataset.mixture).to(device) if cfg["exact_teacher"] else teacher_net
    if cfg["exact_teacher"] and int(getattr(teacher_net, "label_dim", 0)):
        raise UsageError("the exact gmm teacher is unconditional; the network teacher is class-conditional")
    return _Inputs(dataset, teacher_net, f_phi)


# ---------------------------------------------------------------------- phase: the Distiller

def _build_distiller(plan: _Plan, inputs: _Inputs, nan_hook) -> Distiller:
    cfg, dcfg, teacher_net = plan.cfg, plan.dcfg, inputs.teacher_net
    conditional = int(getattr(teacher_net, "label_dim", 0) or 0) > 0
    real = RealSamples(inputs.dataset, conditional=conditional) if dcfg.adv_on else None
    if dcfg.adv_on:
        _check_encoder_logits(teacher_net)
    start = None
    if cfg["init_generator"] is not None and not plan.resume:  # SiD2A: G and its EMA from a distilled generator
        start = _initial_generator(cfg, teacher_net)
    distiller = Distiller(inputs.f_phi, dcfg, init=teacher_net, sample_shape=inputs.dataset.sample_shape,
                          device=plan.device, real_data=real, generator_init=start)
    distiller.nan_hook = nan_hook
    distiller.enable_ddp()  # DDP on G and f_psi; weights broadcast from rank 0
    if dcfg.lambda_regress > 0:
        _set_regression_pairs(distiller, plan.show)
    if plan.resume:
        plan.elapsed_before = restore(distiller, plan.resume, plan.device)
    else:
        # dropout draws from the global RNG: seeded by --seed (a resume restores its state)
        torch.manual_seed((int(cfg["seed"]) * 1_000_003 + 0x5EED + parallel.rank()) % 2 ** 63)
    return distiller


# ---------------------------------------------------------------------- phase: the run directory

def _open_run_dir(plan: _Plan, inputs: _Inputs, distiller: Distiller, lock):
    """config.json, the teacher copy and the log (rank 0); other ranks log nothing."""
    if not parallel.is_main():
        parallel.barrier()
        return NullLogger()
    if plan.resume:
        logger = _reopen(plan, distiller)
    else:
        logger = _create(plan, inputs, lock)
    parallel.barrier()
    return logger


def _reopen(plan: _Plan, distiller: Distiller):
    point, run_dir, cfg = plan.resume, plan.run_dir, plan.cfg
    plan.teacher_sha256 = point.state.get("teacher_sha256") or runs.teacher_copy_digest(
        run_dir, str(point.saved.get("teacher_file") or runs.TEACHER_NAME))  # a run from before digests
    if point.note:
        print(f"note: {point.note}", file=sys.stderr)
    runs.remove_stale_temp_files(run_dir)  # left by a kill during a write
    saved_cfg = runs.read_config(run_dir)
    if saved_cfg.get("iters") != cfg["iters"] or saved_cfg.get("backends") != plan.backends:
        saved_cfg["iters"] = cfg["iters"]
        saved_cfg["backend"] = plan.backend
        saved_cfg["backends"] = plan.backends  # what runs from here on
        write_json_atomic(run_dir / runs.CONFIG_NAME, saved_cfg)
    return runs.JsonlLogger(run_dir / runs.LOG_NAME, truncate_after_step=distiller.iteration)


def _create(plan: _Plan, inputs: _Inputs, lock):
    run_dir, cfg = plan.run_dir, plan.cfg
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {run_dir}: cannot create it ({exc.strerror or exc})") from None
    lock.take(run_dir, "--out")
    # again under the lock: another process may have started a run here since the checks
    runs.prepare_run_dir(run_dir, _training_view(cfg), allow_restart=True)
    if runs.restartable(run_dir):  # a crash or kill before its first checkpoint: nothing to keep
        runs.clear_dead_run(run_dir)
        print(f"note: --out {run_dir} held a run with no complete checkpoint; starting it again", file=sys.stderr)
    runs.remove_stale_temp_files(run_dir)
    teacher_file = save_run_teacher(inputs.teacher_net, run_dir, cfg["teacher"] or "default teacher")
    plan.teacher_sha256 = runs.teacher_copy_digest(run_dir, teacher_file)
    record = {**cfg, "run_format": runs.RUN_FORMAT, "teacher_sha256": plan.teacher_sha256,
              "backend": plan.dcfg.backend, "backends": plan.backends, "teacher_file": teacher_file,
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": parallel.world_size()}
    write_json_atomic(run_dir / runs.CONFIG_NAME, record)
    return runs.JsonlLogger(run_dir / runs.LOG_NAME)


# ---------------------------------------------------------------------- phase: the evaluation

def _evaluate(plan: _Plan, inputs: _Inputs, distiller: Distiller, train_seconds: float, wall: float) -> None:
    cfg, dcfg, dataset = plan.cfg, plan.dcfg, inputs.dataset
    n_eval = cfg["eval_samples"]
    if n_eval is None:
        n_eval = dataset_default("eval_samples", cfg["dataset"])
    if n_eval <= 0:
        print(f"ops backends: {_format_backends(plan.backends)}")
        print(f"run directory: {plan.run_dir}")
        return
    metrics, panels = evaluate_distillation(
        distiller.generate, inputs.f_phi, dataset, device=plan.device, num_samples=n_eval,
        num_classes=distiller.num_classes, cache_dir=cfg["cache_dir"], latency_repeats=cfg["latency_repeats"],
        classifier_epochs=cfg["classifier_epochs"], progress=cfg["progress"])
    metrics.update(iterations=distiller.iteration, images_seen=distiller.images_seen,
                   train_seconds=round(train_seconds, 2), nan_events=dict(distiller.totals), device=str(plan.device),
                   backend=dcfg.backend, backends=plan.backends,
                   teacher_kind="exact GMM denoiser" if cfg["exact_teacher"] else "network")
    write_json_atomic(plan.run_dir / "metrics.json", metrics)
    save_samples_png(panels, plan.run_dir / "samples.png",
                     means=dataset.mixture.means if dataset.mixture is not None else None)
    print(summary_table(metrics, plan.run_dir, wall))


# ---------------------------------------------------------------------- helpers of the phases

def _check_encoder_logits(net) -> None:
    """SiDA's discriminator is f_psi's encoder: refuse (one line) a teacher architecture without one."""
    model = getattr(net, "model", None)
    if not isinstance(net, EDMPrecond) or type(model).__name__ not in ARCHITECTURES:
        raise UsageError(f"--lambda-adv: SiDA's discriminator is the fake score's encoder, which this engine defines "
                         f"for its own architectures ({', '.join(ARCHITECTURES)}), not for a "
                         f"{type(model or net).__name__} teacher")


def _initial_generator(cfg: dict, teacher_net):
    """SiD2A: the generator --init-generator names, checked to fit the teacher's architecture,
    resolution, classes and sigma_init (gsd.generator.load_generator reads it: a run directory,
    an exported file, or an official snapshot under --trust-pickle)."""
    source = cfg["init_generator"]
    gen = load_generator(source, trust_pickle=bool(cfg.get("trust_pickle")))
    net = gen.net
    what = f"--init-generator {source}"
    if type(net) is not type(teacher_net) or type(getattr(net, "model", None)) is not type(teacher_net.model):
        raise UsageError(f"{what} is a {type(getattr(net, 'model', net)).__name__}, the teacher a "
                         f"{type(teacher_net.model).__name__}: G must have the teacher's architecture")
    if tuple(net.sample_shape) != tuple(teacher_net.sample_shape):
        raise UsageError(f"{what} makes samples of shape {tuple(net.sample_shape)}, the teacher "
                         f"{tuple(teacher_net.sample_shape)}")
    if int(net.label_dim) != int(teacher_net.label_dim):
        raise UsageError(f"{what} has {net.label_dim} classes, the teacher {teacher_net.label_dim}")
    check_state_dict(teacher_net.state_dict(), net.state_dict(), f"{what} does not fit the teacher's network")
    if abs(float(gen.sigma_init) - float(cfg["sigma_init"])) > 1e-12:
        raise UsageError(f"{what} was trained with sigma_init {gen.sigma_init:g}, this run has --sigma-init "
                         f"{cfg['sigma_init']:g}; give --sigma-init {gen.sigma_init:g}")
    return net


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
