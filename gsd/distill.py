"""SiD + IRL distillation of an EDM teacher into a one-step generator (docs/definitions.md §3.3-3.4).

    G(eps) = D_theta(sigma_init * eps; sigma_init)                 one-step generator
    f_phi  = the teacher denoiser (frozen)
    f_psi  = the fake-score denoiser, trained on G's samples

One iteration (`Distiller.step`):

1. fake-score step: x_g = G(eps) without gradient and with G in eval mode (dropout off, as
   in SiD), ln sigma ~ N(p_mean, p_std^2), minimise
   fake_score_loss(f_psi(x_g + sigma n; sigma), x_g, sigma); independent latents eps;
2. generator step (G in train mode) on fresh eps: with irl_neighbours K > 0, batch/(K+1)
   anchors each followed by K neighbours eps + R u (u uniform on the unit sphere, the
   anchor's label); t ~ U(0, tmax/1000),
   sigma(t) = (smax^(1/rho) + (1-t)(smin^(1/rho) - smax^(1/rho)))^rho, x_t = x_g + sigma n,
   y_real = f_phi(x_t), y_fake = f_psi(x_t) (parameters frozen, differentiable in x_t),
   L = lambda_sid * sid_generator_loss(x_g, y_real, y_fake, alpha) + w * L_irl,
   L_irl = isometry_loss(x_g, z, groups=K+1 if K else None), z = sigma_init * eps (or, with
   irl_estimator "jvp", the relaxed distortion of G's Jacobian at the latents), where
   w = lambda_irl_raw (raw weight) or, for the scale-free lambda_irl = F,
   w = F ||lambda_sid dL_sid/dx_g|| / ||dL_irl/dx_g|| (see `generator_loss`),
   plus, with lambda_regress = mu > 0, mu * L_reg, the regression of G onto fixed teacher
   pairs (eps_j, x_j = teacher ODE output for eps_j, `set_regression_pairs`):
   L_reg = mean over a batch of pairs drawn with replacement of ||G(eps_j) - x_j||^2 (summed
   over the sample's dimensions); and Adam on `gen_loss_scale * L` (SiD's lsg = 100).

The terms live in gsd.objective, one module each, as mixins of `Distiller`: the fake-score
step (`fake_score`), the combination of the generator's terms (`generator`), the isometric
term (`isometry`), the regression pairs (`regression`). This module holds the settings
(`DistillConfig`, the distillation section of gsd.config's schema), the networks, optimisers,
EMA, the iteration and the state.

NaN handling: rows of x_g with a non-finite value are dropped from every loss (the ops
drop invalid rows; the isometry loss gets only the valid rows) and are replaced by 0 before
they enter a network, so that they cannot poison the backward pass of the other rows.
The ops also drop the rows whose network outputs (y_real, y_fake) are non-finite.
`nan_samples` counts every row dropped for either reason, per step; `all_dropped` says that
some step of the iteration kept no row at all (it trained on nothing).
Non-finite gradient elements are zeroed before Adam. Both are counted and returned by
`step()` (and so logged): a run never trains on NaN silently.

Dtypes: G, f_psi, their EMA and Adam are float32 whatever the dtype of the modules handed
in (a float16 / bfloat16 / float64 teacher file does not decide the training dtype); the
teacher is cast to float32 too (in place), as the loss ops and autocast expect.

Precision (`config.precision`): bf16 / fp16 run the network forwards under autocast and
hand fp32 outputs to the loss ops; parameters, gradients, Adam and the losses stay fp32.
fp16 scales the losses with a GradScaler: a step whose gradients overflow is skipped (its
non-finite values are counted like NaN gradients) and the scale is lowered.
`config.compile` wraps the networks' forwards in torch.compile (state dicts are unchanged).
`config.grad_checkpoint` recomputes the residual blocks of G and f_psi in their backward
passes instead of storing their activations (less memory, the same gradients).

All randomness of the iteration comes from one `torch.Generator` owned by the Distiller
(on the run's device), so `state_dict()` / `load_state_dict()` continue a run bit-exactly.

Several processes (`enable_ddp()` after `torch.distributed` is initialised, see gsd.parallel):
`config.batch` is the GLOBAL batch; each rank draws `batch_per_rank` samples per micro-step
from its own stream (seed + rank) and accumulates `accum_steps = batch / (batch_per_rank *
world)` micro-steps. G and f_psi are DistributedDataParallel (gradients averaged over ranks).
The SiD and fake-score losses are each rank's local mean; the isometry loss is the global
micro-batch loss (gsd_kernels.distributed: all-gather, row blocks) times the world size, so
that DDP's average gives the gradient of the global-batch loss. With accumulation the
isometry pairs are those within each global micro-batch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, make_dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from gsd import parallel
from gsd.config import distill_fields, VALUE_RANGES
from gsd.errors import UsageError
from gsd.models.networks import set_dropout, set_gradient_checkpointing
from gsd.objective.fake_score import FakeScoreStep
from gsd.objective.generator import GeneratorObjective
from gsd.objective.isometry import check_irl_radius, IsometryTerm
from gsd.objective.regression import RegressionTerm
from gsd.objective.rows import sanitize_grads

__all__ = ["DistillConfig", "Distiller", "ema_beta", "MAX_ROWS", "MAX_REGRESS_PAIRS"]


# The distillation's constants that no flag sets (EDM's noise schedule and weights, Adam's eps,
# the fake-score loss scale) and the concrete ops backend (from --fused): DistillConfig's fields
# besides the schema's distillation section.
ENGINE_FIELDS = (("adam_eps", 1e-8), ("fake_loss_scale", 1.0), ("backend", "reference"), ("sigma_min", 0.002),
                 ("sigma_max", 80.0), ("rho", 7.0), ("p_mean", -1.2), ("p_std", 1.2), ("sigma_data", 0.5))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fits_f32(v) -> bool:
    """A factor the networks / Adam turn into a float32 must fit in one."""
    return _finite(v) and abs(v) <= _F32_MAX


class _DistillConfigRules:
    """The checks and conversions of DistillConfig, whose fields are the schema's (below)."""

    def validate(self) -> "DistillConfig":
        """Raise UsageError (one line) for impossible values (also for wrong types, as from a
        damaged config.json)."""
        for check in (self._check_weights, self._check_terms, self._check_noise, self._check_batch,
                      self._check_optimiser, self._check_isometry_kernel, self._check_scales):
            check()
        self.validated = True  # a run validates its settings once; the Distiller does not again
        return self

    def _check_weights(self) -> None:
        """The loss weights: each in its range, and a combination that trains something."""
        for name, (low, high) in VALUE_RANGES.items():
            v = getattr(self, name)
            if not _finite(v) or not low <= v <= high or (name == "alpha" and v == 0):
                span = f"({low:g}, {high:g}] (SiD uses 1.0-1.2)" if name == "alpha" else f"[{low:g}, {high:g}]"
                why = "; larger values only overflow the generator's gradients" if _finite(v) and v > high else ""
                raise UsageError(f"--{name.replace('_', '-')} must be a number in {span}, got {v!r}{why}")
        if self.lambda_irl > 0 and self.lambda_irl_raw > 0:
            raise UsageError("--lambda-irl (scale-free) and --lambda-irl-raw (raw) are two definitions of one "
                             "weight: give one of them")
        if self.lambda_sid == 0 and self.lambda_irl == 0 and self.lambda_irl_raw == 0:
            raise UsageError("--lambda-sid and --lambda-irl are both 0: nothing to train")
        if self.lambda_irl > 0 and self.lambda_sid == 0:
            raise UsageError("--lambda-irl is relative to the SiD gradient, which --lambda-sid 0 turns off; "
                             "weight the isometric loss with --lambda-irl-raw instead")

    def _check_terms(self) -> None:
        """The isometric, regression and adversarial terms' own settings."""
        k = self.irl_neighbours
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < MAX_ROWS:
            raise UsageError(f"--irl-neighbours must be an integer >= 0, got {k!r}")
        if not _fits_f32(self.irl_radius) or self.irl_radius <= 0:
            raise UsageError(f"--irl-radius must be a finite number > 0, got {self.irl_radius!r}")
        p = self.regress_pairs
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= MAX_REGRESS_PAIRS:
            raise UsageError(f"--regress-pairs must be an integer in [1, {MAX_REGRESS_PAIRS}], got {p!r} (35 teacher "
                             f"calls each, computed before training)")
        r = self.regress_ratio
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 1024:
            raise UsageError(f"--regress-ratio must be an integer in [1, 1024], got {r!r}")
        if not _finite(self.lambda_adv) or not 0 <= self.lambda_adv <= 1:
            raise UsageError(f"--lambda-adv (a mixing weight) must be a number in [0, 1], got {self.lambda_adv!r}")
        if self.lambda_adv > 0 and self.lambda_sid == 0:
            raise UsageError("--lambda-adv needs the fake-score network, which --lambda-sid 0 does not train")
        for name in ("adv_loss_scale_g", "adv_loss_scale_d"):
            v = getattr(self, name)
            if not _finite(v) or not 0 <= v <= 1e4:
                raise UsageError(f"--{name.replace('_', '-')} must be a number in [0, 10000], got {v!r}")
        for name in ("adv_g_warmup", "adv_mix_warmup"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2 ** 62:
                raise UsageError(f"--{name.replace('_', '-')} must be a number of images >= 0, got {v!r}")
        if not _finite(self.adv_clip) or not 0 < self.adv_clip <= 1e6:
            raise UsageError(f"--adv-clip must be a number in (0, 1e6], got {self.adv_clip!r}")

    def _check_noise(self) -> None:
        """Dropout, the isometry estimator and the noise levels."""
        k = self.irl_neighbours
        if self.dropout is not None and not (_finite(self.dropout) and 0 <= self.dropout < 1):
            raise UsageError(f"--dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.irl_estimator not in ("pairs", "jvp"):
            raise UsageError(f"--irl-estimator must be pairs or jvp, got {self.irl_estimator!r}")
        if self.irl_estimator == "jvp":
            # the Jacobian term does not pass through x_g: there is no x_g-gradient to rescale
            for bad, why in ((self.lambda_irl > 0, "--lambda-irl (scale-free, measured at x_g, which the "
                              "Jacobian term does not pass through); use --lambda-irl-raw"),
                             (k > 0, "--irl-neighbours (it probes the Jacobian at the anchors)"),
                             (self.irl_weighting != "global", "--irl-weighting local"),
                             (self.irl_scale != "optimal", "a fixed --irl-scale"),
                             (self.irl_bandwidth is not None, "--irl-bandwidth")):
                if bad:
                    raise UsageError(f"--irl-estimator jvp cannot honour {why}")
        if not _finite(self.sigma_min) or not _finite(self.sigma_max) or not (0 < self.sigma_min < self.sigma_max):
            raise UsageError("need 0 < sigma_min < sigma_max")
        if not _finite(self.sigma_init) or not 0 < self.sigma_init <= self.sigma_max:
            raise UsageError(f"--sigma-init must lie in (0, {self.sigma_max:g}] (the teacher's noise levels), "
                             f"got {self.sigma_init}")
        if not (isinstance(self.tmax, int) and 1 <= self.tmax <= 1000):
            raise UsageError(f"--tmax must be an integer in [1, 1000], got {self.tmax}")

    def _check_batch(self) -> None:
        """The batch, the seed, and what the terms need of the batch."""
        k = self.irl_neighbours
        if not isinstance(self.batch, int) or isinstance(self.batch, bool) or not 1 <= self.batch <= MAX_ROWS:
            raise UsageError(f"--batch must be an integer in [1, {MAX_ROWS}], got {self.batch!r}")
        if self.lambda_regress > 0 and self.batch * (1 + self.regress_ratio) > MAX_ROWS:
            raise UsageError(f"--batch {self.batch} with --regress-ratio {self.regress_ratio} asks G for more than "
                             f"{MAX_ROWS} rows in one pass")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 63 - 1024:
            raise UsageError(f"--seed must be an integer in [0, 2^63 - 1024), got {self.seed!r}")
        if self.batch % (k + 1):
            raise UsageError(f"--batch {self.batch} is not a multiple of --irl-neighbours + 1 = {k + 1} (each "
                             f"anchor comes with its {k} neighbours)")
        if self.irl_on and self.irl_estimator == "pairs" and self.batch < 2:
            raise UsageError("--lambda-irl > 0 needs --batch >= 2 (the isometry loss is over pairs)")

    def _check_optimiser(self) -> None:
        """Learning rates, Adam's betas and the EMA."""
        for name in ("lr", "lr_fake"):
            v = getattr(self, name)
            if v is not None and (not _fits_f32(v) or v <= 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a number > 0 that fits a float32 "
                                 f"(<= 3.4e38), got {v!r}")
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_finite(b) for b in betas)
                or not all(0 <= b < 1 for b in betas)):
            raise UsageError(f"--adam-betas (adam_betas) must be two numbers in [0, 1), got {betas!r}")
        if not _finite(self.ema_halflife) or self.ema_halflife < 0:
            raise UsageError(f"--ema-halflife must be >= 0 images, got {self.ema_halflife}")
        if self.ema_rampup is not None and (not _finite(self.ema_rampup) or self.ema_rampup < 0):
            raise UsageError(f"--ema-rampup must be a finite number >= 0 (0 = no ramp-up), got {self.ema_rampup!r}")

    def _check_isometry_kernel(self) -> None:
        """The isometry loss's weighting, scale and bandwidth."""
        if self.irl_weighting not in ("global", "local"):
            raise UsageError(f"--irl-weighting must be global or local, got {self.irl_weighting!r}")
        if self.irl_scale != "optimal" and not (_fits_f32(self.irl_scale) and self.irl_scale > 0):
            raise UsageError(f"--irl-scale must be 'optimal' or a number > 0, got {self.irl_scale!r}")
        if self.irl_bandwidth is not None:
            # the squared bandwidth must be a float32 too
            if not _finite(self.irl_bandwidth) or not 0 < self.irl_bandwidth <= 1.8e19:
                raise UsageError(f"--irl-bandwidth must be a number in (0, 1.8e19], got {self.irl_bandwidth!r}")
            if self.irl_weighting != "local":
                raise UsageError("--irl-bandwidth is the kernel width of --irl-weighting local; the weighting is "
                                 f"{self.irl_weighting}: add --irl-weighting local or drop --irl-bandwidth")

    def _check_scales(self) -> None:
        """The loss scales and the precision."""
        for name in ("gen_loss_scale", "fake_loss_scale"):
            v = getattr(self, name)
            if not _fits_f32(v) or v <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a number > 0 that fits a float32, got {v!r}")
        if self.precision not in _AMP_DTYPES:
            raise UsageError(f"--precision must be one of {', '.join(_AMP_DTYPES)}, got {self.precision!r}")

    def accum_steps(self, world: int = 1) -> int:
        """Gradient-accumulation steps for `world` processes; UsageError when it does not divide."""
        world = int(world)
        if self.batch_per_rank is None:
            if self.batch % world:
                raise UsageError(f"--batch {self.batch} (the global batch) is not divisible by the world size "
                                 f"{world}; give a batch that is a multiple of {world} or set --batch-per-gpu")
            per = self.batch // world
        else:
            per = self.batch_per_rank
            if not isinstance(per, int) or per < 1:
                raise UsageError(f"--batch-per-gpu must be a positive integer, got {per}")
        if self.batch % (per * world):
            raise UsageError(f"--batch {self.batch} is not a multiple of --batch-per-gpu {per} x world size "
                             f"{world} = {per * world} (gradient accumulation needs a whole number of steps)")
        if self.irl_on and self.irl_estimator == "pairs" and per * world < 2:
            raise UsageError("--lambda-irl > 0 needs at least 2 samples per micro-batch over all processes")
        g = self.irl_neighbours + 1
        if per % g:
            # groups never straddle processes or micro-batches
            raise UsageError(f"{per} samples per process and micro-step (--batch {self.batch} / world size "
                             f"{world}, or --batch-per-gpu) is not a multiple of --irl-neighbours + 1 = {g}")
        return self.batch // (per * world)

    @property
    def adv_on(self) -> bool:
        """Whether SiDA's adversarial terms are trained (the discriminator from the first step)."""
        return self.lambda_adv > 0

    @property
    def irl_on(self) -> bool:
        """Whether the isometric term is part of the generator loss."""
        return self.lambda_irl > 0 or self.lambda_irl_raw > 0

    def local_batch(self, world: int = 1) -> int:
        return self.batch // (world * self.accum_steps(world))

    @classmethod
    def from_run_config(cls, cfg: dict, backend: str | None = None) -> "DistillConfig":
        """The DistillConfig of a resolved run config (gsd.config.resolve_config), through the
        schema's rows (each names its field; two keep names of their own because checkpoints
        store this dataclass: adam_betas -> betas, batch_per_gpu -> batch_per_rank). `backend`:
        the concrete ops backend (default "auto" with --fused, else "reference")."""
        if backend is None:
            backend = "auto" if cfg["fused"] else "reference"
        values = {}
        for name, row in distill_fields():
            v = cfg[row.name] if row.name in cfg else row.library_default
            values[name] = tuple(v) if name == "betas" else (bool(v) if row.switch else v)
        return cls(**values, backend=backend)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# DistillConfig is the distillation section of the run schema (gsd.config): a field per setting
# the Distiller reads, with the library's default (DistillConfig() is plain SiD, the building
# block), plus ENGINE_FIELDS. A new setting of the Distiller is a row in gsd.config.SETTINGS.
DistillConfig = make_dataclass(
    "DistillConfig",
    [(name, Any, dataclasses.field(default=row.library_default)) for name, row in distill_fields()]
    + [(name, Any, dataclasses.field(default=value)) for name, value in ENGINE_FIELDS],
    bases=(_DistillConfigRules,), namespace={"__module__": __name__,
                                             "__doc__": "The Distiller's settings (gsd.config's distill section)."})


_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_F32_MAX = float(torch.finfo(torch.float32).max)
MAX_ROWS = 2 ** 31 - 1   # largest batch / sample count: torch indexes rows with int32 in places
# 64x the default 16384: 36M teacher calls before the first iteration; 1e8 pairs were hours of
# silent work before the run directory existed
MAX_REGRESS_PAIRS = 2 ** 20




def ema_beta(batch: int, halflife_images: float) -> float:
    """Per-iteration EMA decay for a half-life given in images (0 -> no averaging)."""
    if halflife_images <= 0:
        return 0.0
    return 0.5 ** (batch / halflife_images)






















def _counters_over_ranks(nan_samples: int, nan_grads: int, f_rows: list, g_rows: list, device):
    """The same NaN counters on every rank: dropped samples and rows summed, zeroed gradient
    values (of averaged, hence identical, gradients) their max."""
    counts = torch.tensor([nan_samples, nan_grads, *f_rows, *g_rows], dtype=torch.int64, device=device)
    s_max = counts.clone()
    torch.distributed.all_reduce(counts)
    torch.distributed.all_reduce(s_max, op=torch.distributed.ReduceOp.MAX)
    return int(counts[0]), int(s_max[1]), [int(v) for v in counts[2:4]], [int(v) for v in counts[4:6]]


class Distiller(FakeScoreStep, GeneratorObjective, IsometryTerm, RegressionTerm):
    """SiD + IRL distillation state: generator, fake score, EMA, optimisers, RNG, counters.

    teacher: f_phi, any module `forward(x, sigma, class_labels=None)` (e.g. `EDMPrecond`,
    or gsd.data.GMMDenoiser for an exact teacher). init: the network whose weights G and
    f_psi start from (default: the teacher; must be an `EDMPrecond`-like trainable net).
    sample_shape: the data shape (default `init.sample_shape`). num_classes: > 0 draws a
    random class label per sample for conditional networks (default `init.label_dim`).
    real_data: real samples for SiDA's discriminator (gsd.data.RealSamples; needed with
    lambda_adv > 0). generator_init: where G and its EMA start instead of `init` (SiD2A: a
    distilled generator of init's architecture; f_psi still starts from init).

    `nan_hook(phase, x_g) -> x_g` (phase "fake" or "generator") may alter generator
    samples before they are used: tests use it to inject NaN.
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig, *, init: nn.Module | None = None,
                 sample_shape=None, num_classes: int | None = None, device="cpu", real_data=None,
                 generator_init: nn.Module | None = None):
        self.config = config if getattr(config, "validated", False) else config.validate()
        if config.adv_on and real_data is None:
            raise UsageError("--lambda-adv: SiDA's discriminator needs real samples, and none were given "
                             "(a data set with samples, or gmm's mixture)")
        # real samples for the discriminator: real_data.sample(n, generator, device) -> (x, labels or None)
        self.real_data = real_data
        self.device = torch.device(device)
        init = teacher if init is None else init
        self.sample_shape = tuple(sample_shape if sample_shape is not None else getattr(init, "sample_shape", ()))
        if not self.sample_shape:
            raise ValueError("sample_shape is unknown: pass it explicitly")
        check_irl_radius(config.irl_radius, config.irl_neighbours, math.prod(self.sample_shape))
        self.num_classes = int(getattr(init, "label_dim", 0) if num_classes is None else num_classes)

        # float32 whatever the modules' dtype (see the module docstring: Adam's eps is 0 in fp16)
        self.teacher = teacher.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        # G starts from the teacher (SiD), or from a distilled generator of its architecture (SiD2A)
        g_init = init if generator_init is None else generator_init
        self.generator = copy.deepcopy(g_init).to(device=self.device, dtype=torch.float32).train().requires_grad_(True)
        self.fake = copy.deepcopy(init).to(device=self.device, dtype=torch.float32).train().requires_grad_(True)
        if config.dropout is not None:  # G and f_psi only: the teacher stays as loaded
            set_dropout(self.generator, config.dropout)
            set_dropout(self.fake, config.dropout)
        if config.irl_estimator == "jvp" and config.irl_on and any(
                isinstance(m, nn.LayerNorm) for m in self.generator.modules()):
            # torch's layer_norm has a wrong third derivative (the parameter gradient of J^T J u;
            # torch.autograd.gradcheck fails on it, a hand-written layer norm and group_norm pass)
            raise UsageError(f"--irl-estimator jvp: {type(self.generator).__name__} has LayerNorm layers, whose "
                             f"Jacobian-term gradients torch computes wrongly; use a GroupNorm network (the U-Nets)")
        if config.grad_checkpoint:
            set_gradient_checkpointing(self.generator)
            set_gradient_checkpointing(self.fake)
        self.ema_generator = copy.deepcopy(self.generator).eval().requires_grad_(False)
        c = self.config
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps)
        self.opt_f = torch.optim.Adam(self.fake.parameters(), lr=c.lr_fake or c.lr, betas=tuple(c.betas),
                                      eps=c.adam_eps)
        self.rank, self.world = parallel.rank(), parallel.world_size()
        self.accum = c.accum_steps(self.world)
        self.micro_batch = c.local_batch(self.world)
        # the networks the optimisation steps call (DDP wrappers after enable_ddp(), compiled with c.compile)
        self._amp_dtype = _AMP_DTYPES[c.precision]
        fp16 = c.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_f = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self._g_train: nn.Module = self.generator
        self._f_train: nn.Module = self.fake
        self._build_calls()
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(int(c.seed) + self.rank)
        self.iteration = 0
        self.images_seen = 0
        self.totals = {"nan_samples": 0, "nan_grads": 0, "nan_iterations": 0}
        self.nan_hook: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        self.regression_pairs: tuple | None = None  # (eps, x, labels or None), see set_regression_pairs



    # ------------------------------------------------------------------ sampling helpers

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng, device=self.device)

    def _latents(self, n: int):
        eps = self._randn(n, *self.sample_shape)
        labels = None
        if self.num_classes > 0:
            labels = torch.randint(0, self.num_classes, (n,), generator=self.rng, device=self.device)
        return eps, labels


    def _build_calls(self) -> None:
        """The callables of the training steps: DDP wrappers / raw modules, compiled on request."""
        wrap = torch.compile if self.config.compile else (lambda m: m)
        self._call_g_train = wrap(self._g_train)      # generator step (gradient synchronised under DDP)
        self._call_g = wrap(self.generator)           # no-grad samples for the fake-score step
        self._call_f_train = wrap(self._f_train)      # fake-score step
        self._call_f = wrap(self.fake)                # frozen f_psi in the generator step
        self._call_teacher = wrap(self.teacher)

    def _net(self, net, x: torch.Tensor, sigma: torch.Tensor, labels=None, **kw):
        """A network forward under the run's autocast; the outputs are fp32 for the losses (kw:
        return_logits / decoder_rows of the gsd architectures, for SiDA)."""
        if self._amp_dtype is None:
            return net(x, sigma, labels, **kw)
        with torch.autocast(device_type=self.device.type, dtype=self._amp_dtype):
            out = net(x, sigma, labels, **kw)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def _gen(self, net, eps: torch.Tensor, labels=None, amp: bool = True) -> torch.Tensor:
        s = self.config.sigma_init
        sigma = torch.full((eps.shape[0],), s, device=eps.device)
        return self._net(net, s * eps, sigma, labels) if amp else net(s * eps, sigma, labels)

    @torch.no_grad()
    def generate(self, eps: torch.Tensor, class_labels=None, *, ema: bool = True) -> torch.Tensor:
        """One-step samples G(eps) for standard-normal latents eps (EMA generator by default)."""
        net = self.ema_generator if ema else self.generator
        was = net.training
        net.eval()
        try:
            return self._gen(net, eps.to(device=self.device, dtype=torch.float32), class_labels, amp=False)
        finally:
            net.train(was)

    # ------------------------------------------------------------------ one iteration

    def _apply_hook(self, phase: str, x: torch.Tensor) -> torch.Tensor:
        return x if self.nan_hook is None else self.nan_hook(phase, x)

    def enable_ddp(self) -> None:
        """Wrap G and f_psi in DistributedDataParallel (weights broadcast from rank 0; the EMA
        copy is reset to the broadcast generator). No-op without a process group."""
        if not parallel.is_distributed() or self._g_train is not self.generator:
            return
        self._g_train = parallel.wrap_ddp(self.generator, self.device)
        self._f_train = parallel.wrap_ddp(self.fake, self.device)
        self._build_calls()
        with torch.no_grad():
            for pe, p in zip(self.ema_generator.parameters(), self.generator.parameters()):
                pe.copy_(p)
            for be, b in zip(self.ema_generator.buffers(), self.generator.buffers()):
                be.copy_(b)
















    @property
    def adversarial_mixing(self) -> bool:
        """SiDA's term is in G's gradient: adversarial training on, and more than adv_mix_warmup
        images seen (SiDA's rule; 0 = from the first iteration)."""
        c = self.config
        return c.adv_on and (c.adv_mix_warmup == 0 or self.images_seen > c.adv_mix_warmup)

    @property
    def generator_held(self) -> bool:
        """SiDA does not step G until more than adv_g_warmup images were seen (0 = no hold)."""
        c = self.config
        return c.adv_on and c.adv_g_warmup > 0 and self.images_seen <= c.adv_g_warmup

    def generator_step(self) -> dict:
        c = self.config
        if self.generator_held:  # only the fake score and its discriminator learn meanwhile
            self._update_ema()
            return {"nan_samples": 0, "nan_grads": 0, "rows": 0, "grads": 0}
        self.generator.train().requires_grad_(True)
        self.opt_g.zero_grad(set_to_none=True)
        acc: dict = {}
        nan_samples = 0
        for k in range(self.accum):
            eps, labels = self._generator_latents(self.micro_batch)
            with self._no_sync(self._g_train, k == self.accum - 1):
                loss, parts = self.generator_loss(eps, labels)
                if loss.requires_grad:
                    self.scaler_g.scale(loss * (c.gen_loss_scale / self.accum)).backward()
            nan_samples += parts.pop("nan_samples")
            for key, v in parts.items():
                acc[key] = acc.get(key, 0.0) + v / self.accum
        self.scaler_g.unscale_(self.opt_g)
        bad_grads, n_grads = sanitize_grads(self.generator.parameters())
        self.scaler_g.step(self.opt_g)  # fp16: a step whose gradients overflowed is skipped
        self.scaler_g.update()
        self._update_ema()
        self.fake.train().requires_grad_(True)
        acc["nan_samples"] = nan_samples
        acc["nan_grads"] = bad_grads
        acc["rows"] = self.micro_batch * self.accum
        acc["grads"] = n_grads
        return acc

    @torch.no_grad()
    def _update_ema(self) -> None:
        c = self.config
        halflife = c.ema_halflife
        if c.ema_rampup and halflife > 0:
            halflife = min(halflife, c.ema_rampup * (self.images_seen + c.batch))
        beta = ema_beta(c.batch, halflife)
        for pe, p in zip(self.ema_generator.parameters(), self.generator.parameters()):
            if beta == 0.0:
                pe.copy_(p.detach())
            else:
                pe.lerp_(p.detach(), 1.0 - beta)
        for be, b in zip(self.ema_generator.buffers(), self.generator.buffers()):
            be.copy_(b)

    def step(self) -> dict:
        """One alternating iteration; returns losses and NaN counters of this iteration:
        nan_samples (rows dropped by either step), nan_grads (gradient values zeroed) and
        all_dropped (some step kept no row at all, over all processes)."""
        out: dict = {}
        nan_samples = nan_grads = 0
        # per step: [dropped, rows]; a step that drops every row trains on nothing
        f_rows = [0, 0]
        zeroed = False  # a step whose every gradient value was non-finite (and zeroed) learnt nothing
        if self.config.lambda_sid > 0:  # f_psi only matters to the SiD term
            f = self.fake_score_step()
            out["loss_fake"] = f["loss_fake"]
            if "loss_d" in f:
                out["loss_d"] = f["loss_d"]
            nan_samples += f["nan_samples"]
            nan_grads += f["nan_grads"]
            f_rows = [f["nan_samples"], f["rows"]]
            zeroed = 0 < f["grads"] <= f["nan_grads"] and not self.scaler_f.is_enabled()
        g = self.generator_step()
        g_grads = g.pop("grads")
        # under fp16 an overflowing step is the GradScaler's to skip (it lowers its scale), not a bad one
        zeroed = zeroed or (0 < g_grads <= g["nan_grads"] and not self.scaler_g.is_enabled())
        g_rows = [g["nan_samples"], g.pop("rows")]
        nan_samples += g.pop("nan_samples")
        nan_grads += g.pop("nan_grads")
        out.update(g)
        if self.world > 1:
            nan_samples, nan_grads, f_rows, g_rows = _counters_over_ranks(nan_samples, nan_grads, f_rows, g_rows,
                                                                          self.device)
        out["all_dropped"] = any(rows > 0 and dropped >= rows for dropped, rows in (f_rows, g_rows))
        out["all_grads_zeroed"] = zeroed  # gradients are averaged over the processes: the same on every rank
        self.iteration += 1
        self.images_seen += self.config.batch
        out["nan_samples"] = nan_samples
        out["nan_grads"] = nan_grads
        self.totals["nan_samples"] += nan_samples
        self.totals["nan_grads"] += nan_grads
        if nan_samples or nan_grads:
            self.totals["nan_iterations"] += 1
        out["iteration"] = self.iteration
        out["images_seen"] = self.images_seen
        return out

    # ------------------------------------------------------------------ state

    def weights(self) -> dict[str, torch.Tensor]:
        """Every network tensor, flat (for safetensors)."""
        out = {}
        for prefix, net in (("generator", self.generator), ("fake", self.fake), ("ema", self.ema_generator)):
            for k, v in net.state_dict().items():
                out[f"{prefix}.{k}"] = v
        return out

    def training_state(self) -> dict:
        """Everything but the weights: optimisers, RNG, counters (torch.load weights_only-safe)."""
        return {
            "opt_g": self.opt_g.state_dict(),
            "opt_f": self.opt_f.state_dict(),
            "rng": self.rng.get_state(),
            "world_size": self.world,
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_f": self.scaler_f.state_dict(),
            "iteration": self.iteration,
            "images_seen": self.images_seen,
            "totals": dict(self.totals),
            "config": self.config.to_dict(),
        }

    def state_dict(self) -> dict:
        return {"weights": self.weights(), **self.training_state()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for prefix, net in (("generator", self.generator), ("fake", self.fake), ("ema", self.ema_generator)):
            sub = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
            net.load_state_dict(sub, strict=True)

    def load_training_state(self, state: dict) -> None:
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_f.load_state_dict(state["opt_f"])
        self.rng.set_state(state["rng"].cpu())
        self.iteration = int(state["iteration"])
        self.images_seen = int(state["images_seen"])
        self.totals = {k: int(v) for k, v in state["totals"].items()}
        for name in ("scaler_g", "scaler_f"):
            if state.get(name) and getattr(self, name).is_enabled():
                getattr(self, name).load_state_dict(state[name])

    def load_state_dict(self, state: dict) -> None:
        self.load_weights(state["weights"])
        self.load_training_state(state)


