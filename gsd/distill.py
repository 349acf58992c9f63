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
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

from gsd import parallel
from gsd.adversarial import discriminator_loss, generator_adversarial_loss
from gsd.config import DISTILL_DEFAULTS, VALUE_RANGES
from gsd.errors import UsageError
from gsd.jacobian_isometry import distortion_terms
from gsd.models.networks import set_dropout, set_gradient_checkpointing
from gsd.sampling.samplers import teacher_ode_pairs
from gsd_kernels.reference import local_bandwidth_sq, local_bandwidth_sq_grouped

__all__ = ["DistillConfig", "Distiller", "sigma_schedule", "ema_beta", "check_irl_radius"]


@dataclass
class DistillConfig:
    alpha: float = 1.2
    sigma_init: float = 2.5
    tmax: int = 800
    lambda_sid: float = 1.0
    lambda_irl: float = DISTILL_DEFAULTS["lambda_irl"]          # scale-free weight (see generator_loss)
    lambda_irl_raw: float = DISTILL_DEFAULTS["lambda_irl_raw"]  # raw weight: L = lambda_sid L_sid + W L_irl
    irl_estimator: str = DISTILL_DEFAULTS["irl_estimator"]      # "pairs" or "jvp"
    irl_neighbours: int = DISTILL_DEFAULTS["irl_neighbours"]    # K neighbours per anchor (0: random pairs)
    irl_radius: float = DISTILL_DEFAULTS["irl_radius"]          # neighbour distance in eps units
    lambda_regress: float = DISTILL_DEFAULTS["lambda_regress"]  # weight of the teacher-pair regression term
    regress_pairs: int = DISTILL_DEFAULTS["regress_pairs"]      # pairs it draws from (set_regression_pairs)
    regress_ratio: int = DISTILL_DEFAULTS["regress_ratio"]      # pairs per generated sample in a generator step
    # SiDA (docs/definitions.md §3.8): f_psi's encoder as discriminator; lambda_adv mixes its
    # term into G's gradient, (1 - lambda_adv) L + lambda_adv L_adv (SiDA: 0.5); 0 = off
    lambda_adv: float = 0.0
    adv_loss_scale_g: float = 0.01        # SiDA's loss_scaling_G_gan
    adv_loss_scale_d: float = 1.0         # SiDA's loss_scaling_D
    adv_g_warmup: int = 100_000           # images seen before G is first stepped
    adv_mix_warmup: int = 200_000         # images seen before the adversarial term enters G's gradient
    adv_clip: float = 1.0                 # f_psi's gradients are clipped by value to this
    dropout: float | None = None          # dropout of G and f_psi (None: the init network's)
    irl_weighting: str = "global"
    irl_bandwidth: float | None = None
    irl_scale: str | float = "optimal"
    batch: int = 64
    lr: float = 1e-4
    lr_fake: float | None = None          # default: lr
    betas: tuple = (0.0, 0.999)
    adam_eps: float = 1e-8
    ema_halflife: float = 0.0             # in images; 0 = no EMA (ema_generator is the generator's copy)
    # half-life <= ema_rampup * images seen (EDM's and SiD's ramp-up ratio 0.05); 0 (or None, as
    # checkpoints from before the flag may hold) = no ramp-up
    ema_rampup: float | None = 0.05
    gen_loss_scale: float = 100.0         # SiD's lsg
    fake_loss_scale: float = 1.0
    backend: str = "reference"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    seed: int = 0
    batch_per_rank: int | None = None     # samples per process and micro-step (default: batch / world)
    precision: str = "fp32"               # autocast of the network forwards: fp32 (off), bf16, fp16
    compile: bool = False                 # torch.compile the three networks
    grad_checkpoint: bool = False         # gradient checkpointing in G and f_psi

    def validate(self) -> "DistillConfig":
        """Raise UsageError (one line) for impossible values (also for wrong types, as from a
        damaged config.json)."""
        def finite(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def f32(v):  # a factor the networks / Adam turn into a float32 must fit in one
            return finite(v) and abs(v) <= _F32_MAX

        for name, (low, high) in VALUE_RANGES.items():
            v = getattr(self, name)
            if not finite(v) or not low <= v <= high or (name == "alpha" and v == 0):
                span = f"({low:g}, {high:g}] (SiD uses 1.0-1.2)" if name == "alpha" else f"[{low:g}, {high:g}]"
                why = "; larger values only overflow the generator's gradients" if finite(v) and v > high else ""
                raise UsageError(f"--{name.replace('_', '-')} must be a number in {span}, got {v!r}{why}")
        if self.lambda_irl > 0 and self.lambda_irl_raw > 0:
            raise UsageError("--lambda-irl (scale-free) and --lambda-irl-raw (raw) are two definitions of one "
                             "weight: give one of them")
        if self.lambda_sid == 0 and self.lambda_irl == 0 and self.lambda_irl_raw == 0:
            raise UsageError("--lambda-sid and --lambda-irl are both 0: nothing to train")
        if self.lambda_irl > 0 and self.lambda_sid == 0:
            raise UsageError("--lambda-irl is relative to the SiD gradient, which --lambda-sid 0 turns off; "
                             "weight the isometric loss with --lambda-irl-raw instead")
        k = self.irl_neighbours
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < MAX_ROWS:
            raise UsageError(f"--irl-neighbours must be an integer >= 0, got {k!r}")
        if not f32(self.irl_radius) or self.irl_radius <= 0:
            raise UsageError(f"--irl-radius must be a finite number > 0, got {self.irl_radius!r}")
        p = self.regress_pairs
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= MAX_REGRESS_PAIRS:
            raise UsageError(f"--regress-pairs must be an integer in [1, {MAX_REGRESS_PAIRS}], got {p!r} (35 teacher "
                             f"calls each, computed before training)")
        r = self.regress_ratio
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 1024:
            raise UsageError(f"--regress-ratio must be an integer in [1, 1024], got {r!r}")
        if not finite(self.lambda_adv) or not 0 <= self.lambda_adv <= 1:
            raise UsageError(f"--lambda-adv (a mixing weight) must be a number in [0, 1], got {self.lambda_adv!r}")
        if self.lambda_adv > 0 and self.lambda_sid == 0:
            raise UsageError("--lambda-adv needs the fake-score network, which --lambda-sid 0 does not train")
        for name in ("adv_loss_scale_g", "adv_loss_scale_d"):
            v = getattr(self, name)
            if not finite(v) or not 0 <= v <= 1e4:
                raise UsageError(f"--{name.replace('_', '-')} must be a number in [0, 10000], got {v!r}")
        for name in ("adv_g_warmup", "adv_mix_warmup"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2 ** 62:
                raise UsageError(f"--{name.replace('_', '-')} must be a number of images >= 0, got {v!r}")
        if not finite(self.adv_clip) or not 0 < self.adv_clip <= 1e6:
            raise UsageError(f"--adv-clip must be a number in (0, 1e6], got {self.adv_clip!r}")
        if self.dropout is not None and not (finite(self.dropout) and 0 <= self.dropout < 1):
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
        if not finite(self.sigma_min) or not finite(self.sigma_max) or not (0 < self.sigma_min < self.sigma_max):
            raise UsageError("need 0 < sigma_min < sigma_max")
        if not finite(self.sigma_init) or not 0 < self.sigma_init <= self.sigma_max:
            raise UsageError(f"--sigma-init must lie in (0, {self.sigma_max:g}] (the teacher's noise levels), "
                             f"got {self.sigma_init}")
        if not (isinstance(self.tmax, int) and 1 <= self.tmax <= 1000):
            raise UsageError(f"--tmax must be an integer in [1, 1000], got {self.tmax}")
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
        for name in ("lr", "lr_fake"):
            v = getattr(self, name)
            if v is not None and (not f32(v) or v <= 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a number > 0 that fits a float32 "
                                 f"(<= 3.4e38), got {v!r}")
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(finite(b) for b in betas)
                or not all(0 <= b < 1 for b in betas)):
            raise UsageError(f"--adam-betas (adam_betas) must be two numbers in [0, 1), got {betas!r}")
        if not finite(self.ema_halflife) or self.ema_halflife < 0:
            raise UsageError(f"--ema-halflife must be >= 0 images, got {self.ema_halflife}")
        if self.ema_rampup is not None and (not finite(self.ema_rampup) or self.ema_rampup < 0):
            raise UsageError(f"--ema-rampup must be a finite number >= 0 (0 = no ramp-up), got {self.ema_rampup!r}")
        if self.irl_weighting not in ("global", "local"):
            raise UsageError(f"--irl-weighting must be global or local, got {self.irl_weighting!r}")
        if self.irl_scale != "optimal" and not (f32(self.irl_scale) and self.irl_scale > 0):
            raise UsageError(f"--irl-scale must be 'optimal' or a number > 0, got {self.irl_scale!r}")
        if self.irl_bandwidth is not None:
            # the squared bandwidth must be a float32 too
            if not finite(self.irl_bandwidth) or not 0 < self.irl_bandwidth <= 1.8e19:
                raise UsageError(f"--irl-bandwidth must be a number in (0, 1.8e19], got {self.irl_bandwidth!r}")
            if self.irl_weighting != "local":
                raise UsageError("--irl-bandwidth is the kernel width of --irl-weighting local; the weighting is "
                                 f"{self.irl_weighting}: add --irl-weighting local or drop --irl-bandwidth")
        for name in ("gen_loss_scale", "fake_loss_scale"):
            v = getattr(self, name)
            if not f32(v) or v <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a number > 0 that fits a float32, got {v!r}")
        if self.precision not in _AMP_DTYPES:
            raise UsageError(f"--precision must be one of {', '.join(_AMP_DTYPES)}, got {self.precision!r}")
        return self

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
        """The DistillConfig of a resolved run config (gsd.config.resolve_config): the one mapping
        from flag names to field names. Three fields keep their own names, because checkpoints
        store this dataclass: adam_betas -> betas, batch_per_gpu -> batch_per_rank, and fused ->
        backend (`backend`: the concrete ops backend; default "auto" with --fused, else
        "reference")."""
        if backend is None:
            backend = "auto" if cfg["fused"] else "reference"
        same = ("alpha", "sigma_init", "tmax", "lambda_sid", "lambda_irl", "lambda_irl_raw", "irl_estimator",
                "irl_neighbours", "irl_radius", "lambda_regress", "regress_pairs", "regress_ratio", "dropout",
                "irl_weighting", "irl_bandwidth", "irl_scale", "batch", "lr", "lr_fake", "ema_halflife", "ema_rampup",
                "gen_loss_scale", "seed")
        return cls(**{k: cfg[k] for k in same}, betas=tuple(cfg["adam_betas"]), backend=backend,
                   batch_per_rank=cfg.get("batch_per_gpu"), precision=cfg.get("precision", "fp32"),
                   compile=bool(cfg.get("compile", False)), grad_checkpoint=bool(cfg.get("grad_checkpoint", False)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_F32_MAX = float(torch.finfo(torch.float32).max)
MAX_ROWS = 2 ** 31 - 1   # largest batch / sample count: torch indexes rows with int32 in places
# 64x the default 16384: 36M teacher calls before the first iteration; 1e8 pairs were hours of
# silent work before the run directory existed
MAX_REGRESS_PAIRS = 2 ** 20
# The regression pairs' latents come from their own seed range, far from the evaluation's latent
# seeds (gsd.evaluation.metrics.evaluation_latents), so that no evaluation sample is a training pair.
REGRESS_SEED_BASE = 2 ** 62


def sigma_schedule(t: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM's rho-schedule as a function of t in [0, 1]: sigma(0) = sigma_min, sigma(1) = sigma_max."""
    a = sigma_max ** (1.0 / rho)
    b = sigma_min ** (1.0 / rho)
    return (a + (1.0 - t) * (b - a)) ** rho


def ema_beta(batch: int, halflife_images: float) -> float:
    """Per-iteration EMA decay for a half-life given in images (0 -> no averaging)."""
    if halflife_images <= 0:
        return 0.0
    return 0.5 ** (batch / halflife_images)


# The scale-free weight's floor on the isometric gradient's norm, in units of sqrt(N) / delta
# (Distiller._irl_gradient_floor). An exact linear isometry gives 1e-9 (float64 kernels) to
# 6e-8 (the float32 reference) in these units, one perturbed by 1e-3 (L ~ 2e-8) ~5e-6, maps with
# the isometry loss of trained generators (L ~ 1e-4 - 1e-2) 3e-4 - 3e-3: the floor binds only
# near an exact isometry.
IRL_GRADIENT_FLOOR = 1e-5

# A neighbour eps + R u differs from its anchor eps by R/sqrt(D) per component on average; below
# ~1000 float32 rounding steps (of unit-sized values) that difference, and G's response to it,
# is rounding noise, and at R = 1e-12 the neighbours round to their anchors: the term's loss is 1
# and its weight 0, a plain SiD run that calls itself GSD.
MIN_IRL_RADIUS_PER_SQRT_DIM = 1e3 * float(torch.finfo(torch.float32).eps)


def check_irl_radius(radius: float, neighbours: int, dim: int) -> None:
    """UsageError unless neighbours at distance `radius` in a `dim`-dimensional latent resolve in float32."""
    low = MIN_IRL_RADIUS_PER_SQRT_DIM * math.sqrt(dim)
    if neighbours > 0 and radius < low:
        raise UsageError(f"--irl-radius {radius:g} is below {low:.3g} (1.2e-4 x sqrt of the latent dimension {dim}): "
                         f"the neighbours would differ from their anchors only by float32 rounding")


def _sanitize_grads(params) -> tuple[int, int]:
    """Zero non-finite gradient elements in place; return (how many there were, how many
    gradient elements there are)."""
    bad = total = 0
    for p in params:
        g = p.grad
        if g is None:
            continue
        total += g.numel()
        finite = torch.isfinite(g)
        if not bool(finite.all()):
            bad += int((~finite).sum())
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    return bad, total


def _row_valid(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class Distiller:
    """SiD + IRL distillation state: generator, fake score, EMA, optimisers, RNG, counters.

    teacher: f_phi, any module `forward(x, sigma, class_labels=None)` (e.g. `EDMPrecond`,
    or gsd.data.GMMDenoiser for an exact teacher). init: the network whose weights G and
    f_psi start from (default: the teacher; must be an `EDMPrecond`-like trainable net).
    sample_shape: the data shape (default `init.sample_shape`). num_classes: > 0 draws a
    random class label per sample for conditional networks (default `init.label_dim`).

    `nan_hook(phase, x_g) -> x_g` (phase "fake" or "generator") may alter generator
    samples before they are used: tests use it to inject NaN.
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig, *, init: nn.Module | None = None,
                 sample_shape=None, num_classes: int | None = None, device="cpu", real_data=None):
        self.config = config.validate()
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
        self.generator = copy.deepcopy(init).to(device=self.device, dtype=torch.float32).train().requires_grad_(True)
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

    def draw_regression_pairs(self, progress=None) -> None:
        """Draw config.regress_pairs pairs with the teacher's 18-step Heun sampler (35 teacher calls
        each) and set them: latents from seed REGRESS_SEED_BASE + config.seed, so every rank and
        every resume of a run draws the same pairs and none is an evaluation latent. `progress`:
        a gsd.progress bar advanced by the pairs done. UsageError when the teacher's outputs are
        not finite (an overflowing teacher)."""
        c = self.config
        eps, x, labels = teacher_ode_pairs(self.teacher, c.regress_pairs, self.sample_shape,
                                           seed=REGRESS_SEED_BASE + int(c.seed), num_classes=self.num_classes,
                                           device=self.device, progress=progress)
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).sum())
        if bad:
            raise UsageError(f"--lambda-regress: the teacher's ODE outputs are not finite for {bad} of "
                             f"{c.regress_pairs} regression pairs (the teacher overflows); check the teacher, or "
                             f"turn the term off with --lambda-regress 0")
        self.set_regression_pairs(eps, x, labels)

    def set_regression_pairs(self, eps: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """The pairs of the regression term (config.lambda_regress > 0): latents eps (P, *sample_shape)
        and the teacher's outputs x for them (same shape), with class labels (P,) for a
        conditional generator. P must be config.regress_pairs; every value finite."""
        shape = (self.config.regress_pairs, *self.sample_shape)
        if tuple(eps.shape) != shape or tuple(x.shape) != shape:
            raise ValueError(f"regression pairs must both have shape {shape}, got {tuple(eps.shape)} and {tuple(x.shape)}")
        if not (torch.isfinite(eps).all() and torch.isfinite(x).all()):
            raise ValueError("regression pairs hold non-finite values")
        if (labels is None) != (self.num_classes == 0) or (labels is not None and tuple(labels.shape) != shape[:1]):
            raise ValueError(f"regression pairs need {'no labels' if self.num_classes == 0 else 'one label per pair'} "
                             f"for a generator with {self.num_classes} classes")
        put = (lambda t: None if t is None else t.detach().to(self.device))
        self.regression_pairs = (put(eps).float(), put(x).float(), put(labels))

    # ------------------------------------------------------------------ sampling helpers

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng, device=self.device)

    def _latents(self, n: int):
        eps = self._randn(n, *self.sample_shape)
        labels = None
        if self.num_classes > 0:
            labels = torch.randint(0, self.num_classes, (n,), generator=self.rng, device=self.device)
        return eps, labels

    def _generator_latents(self, n: int):
        """Latents of the generator step. K = irl_neighbours = 0: n independent latents (the
        same draws as `_latents`). K > 0: n / (K+1) anchors eps, each followed by its K
        neighbours eps + R u_k, u_k uniform on the unit sphere of dimension prod(sample_shape),
        with the anchor's class label (rows a(K+1) .. a(K+1)+K are anchor a's group)."""
        k = self.config.irl_neighbours
        if k == 0:
            return self._latents(n)
        g = k + 1
        anchors, labels = self._latents(n // g)
        flat = anchors.reshape(n // g, 1, -1)
        u = self._randn(n // g, k, flat.shape[-1])
        u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        eps = torch.cat([flat, flat + self.config.irl_radius * u], dim=1).reshape(n, *self.sample_shape)
        if labels is not None:
            labels = labels.repeat_interleave(g)
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

    def _no_sync(self, net: nn.Module, last: bool):
        import contextlib
        return contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()

    def fake_score_step(self) -> dict:
        c = self.config
        n = self.micro_batch
        self.fake.train().requires_grad_(True)
        # SiD's recipe: the fake score learns from the samples G gives at sampling time (dropout
        # off); generator_step puts G back in train mode
        self.generator.eval()
        self.opt_f.zero_grad(set_to_none=True)
        loss_sum, d_sum, dropped = 0.0, 0.0, None
        for k in range(self.accum):
            # independent latents: the neighbour groups serve only the generator's isometry term
            real = None
            if c.adv_on:  # SiDA: real samples, whose labels the generated ones take
                real, real_labels = self.real_data.sample(n, self.rng, self.device)
                eps, labels = self._randn(n, *self.sample_shape), real_labels
            else:
                eps, labels = self._latents(n)
            with torch.no_grad():
                x_g = self._gen(self._call_g, eps, labels)
            x_g = self._apply_hook("fake", x_g)
            sigma = (self._randn(n) * c.p_std + c.p_mean).exp()
            noise = self._randn(n, *self.sample_shape)
            with self._no_sync(self._f_train, k == self.accum - 1):
                loss, loss_d, keep = self.fake_score_terms(x_g, sigma, noise, labels, real)
                total = loss * c.fake_loss_scale + (0 if loss_d is None else loss_d * c.adv_loss_scale_d)
                self.scaler_f.scale(total / self.accum).backward()
            loss_sum += float(loss.detach())
            d_sum += 0.0 if loss_d is None else float(loss_d.detach())
            d = n - keep.sum()
            dropped = d if dropped is None else dropped + d
        self.scaler_f.unscale_(self.opt_f)
        bad_grads, n_grads = _sanitize_grads(self.fake.parameters())
        if c.adv_on:  # SiDA clips f_psi's gradients by value once the discriminator trains it
            torch.nn.utils.clip_grad_value_(self.fake.parameters(), c.adv_clip)
        self.scaler_f.step(self.opt_f)  # fp16: a step whose gradients overflowed is skipped
        self.scaler_f.update()
        out = {"loss_fake": loss_sum / self.accum, "nan_samples": int(dropped), "nan_grads": bad_grads,
               "rows": n * self.accum, "grads": n_grads}
        if c.adv_on:
            out["loss_d"] = d_sum / self.accum
        return out

    def fake_score_terms(self, x_g: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None,
                         real: torch.Tensor | None = None):
        """(fake-score loss, discriminator loss or None, kept rows) of one micro-batch: f_psi
        denoises x_g + sigma noise; with `real` (SiDA) its encoder also scores real + sigma noise
        (the same sigma and noise) in the same pass, which decodes the generated rows only."""
        c = self.config
        n = x_g.shape[0]
        valid = _row_valid(x_g)
        x_in = torch.where(_bcast(valid, x_g), x_g, torch.zeros_like(x_g))
        x_noisy = x_in + _bcast(sigma, x_in) * noise
        if real is None:
            y_fake = self._net(self._call_f_train, x_noisy, sigma, labels)
            loss_d = None
        else:
            both = torch.cat([x_noisy, real + _bcast(sigma, real) * noise])
            y_fake, logits = self._net(self._call_f_train, both, torch.cat([sigma, sigma]),
                                       None if labels is None else torch.cat([labels, labels]),
                                       return_logits=True, decoder_rows=n)
            logit_fake, logit_real = logits[:n], logits[n:]
        loss = _ops().fake_score_loss(y_fake, x_g, sigma, sigma_data=c.sigma_data, backend=c.backend)
        # the rows the op dropped: non-finite x_g or non-finite f_psi output (and, with SiDA, logits)
        keep = valid & _row_valid(y_fake.detach())
        if real is not None:
            keep = keep & _row_valid(logit_fake.detach()) & _row_valid(logit_real.detach())
            loss_d = discriminator_loss(logit_fake, logit_real, sigma, keep, sigma_data=c.sigma_data)
        return loss, loss_d, keep

    def generator_loss(self, eps: torch.Tensor, labels=None, *, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The generator objective for given latents (draws t and the noise from self.rng
        unless given: `t` in [0, tmax/1000), `noise` like the samples).

        Returns (L, parts); L.backward() gives the generator's gradient (before gen_loss_scale):

        - raw weight W = lambda_irl_raw (or no isometric term): L = lambda_sid L_sid + W L_irl;
        - scale-free weight F = lambda_irl: the two terms are evaluated on detached copies of
          x_g and differentiated once each (the SiD backward passes through teacher and f_psi
          once, as a plain backward would): g_sid = lambda_sid dL_sid/dx_g, g_irl = dL_irl/dx_g,
          w = F ||g_sid|| / ||g_irl|| (a detached scalar; 0 when g_irl = 0), and L is a
          surrogate whose gradient through G is g_sid + w g_irl, i.e. that of lambda_sid L_sid
          + w L_irl, and whose value is that loss. parts gets irl_weight (w), irl_gnorm_sid
          (||g_sid||) and irl_gnorm_irl (||g_irl||). Norms are over the whole micro-batch; under
          DDP the squared norms are summed over ranks, so every rank uses the same w.

        Under DDP, L is what this rank back-propagates: its local SiD mean plus the isometry
        term, which is world x the global-batch loss (DDP averages gradients over ranks; with
        neighbour groups it is each rank's own grouped loss, see below); parts["loss_gen"] is
        the unweighted-by-world value. With irl_neighbours = K > 0 the isometry loss is taken
        over the groups of K+1 rows (anchor + neighbours); a group that holds a dropped
        (non-finite) row is dropped from it whole.
        """
        c = self.config
        n = eps.shape[0]
        reg = self._regression_batch(n * c.regress_ratio) if c.lambda_regress > 0 else None
        if reg is None:
            x_g = self._gen(self._call_g_train, eps, labels)
        else:
            # one pass of G over both batches: a second forward would trip DDP's one-backward bookkeeping
            eps_r, target_r, labels_r = reg
            both = self._gen(self._call_g_train, torch.cat([eps, eps_r]),
                             None if labels is None else torch.cat([labels, labels_r]))
            x_g = both[:n]
        x_g = self._apply_hook("generator", x_g)
        valid = _row_valid(x_g)
        scale_free = c.lambda_irl > 0
        # scale-free: each term sees its own detached copy of x_g, so that its x_g-gradient can be
        # measured before the combination goes back through G once
        x_sid = x_g.detach().requires_grad_(True) if scale_free else x_g
        x_irl = x_g.detach().requires_grad_(True) if scale_free else x_g
        used = valid  # rows that entered some loss: x_g finite and, for SiD, finite network outputs
        parts: dict = {}
        l_sid = l_adv = None
        mix = c.lambda_adv if self.adversarial_mixing else 0.0  # SiDA: (1 - mix) L + mix L_adv
        if c.lambda_sid > 0:
            x_in = torch.where(_bcast(valid, x_sid), x_sid, torch.zeros_like(x_sid))
            self.fake.eval().requires_grad_(False)
            if t is None:
                t = torch.rand(n, generator=self.rng, device=self.device) * (c.tmax / 1000.0)
            sigma = sigma_schedule(t, c.sigma_min, c.sigma_max, c.rho)
            if noise is None:
                noise = self._randn(n, *self.sample_shape)
            x_t = x_in + _bcast(sigma, x_in) * noise
            y_real = self._net(self._call_teacher, x_t, sigma, labels)
            if mix:  # the discriminator's logits come with f_psi's denoising, in one pass
                y_fake, logits = self._net(self._call_f, x_t, sigma, labels, return_logits=True)
            else:
                y_fake = self._net(self._call_f, x_t, sigma, labels)
            l_sid = _ops().sid_generator_loss(x_sid, y_real, y_fake, alpha=c.alpha, backend=c.backend)
            used = valid & _row_valid(y_real.detach()) & _row_valid(y_fake.detach())
            parts["loss_sid"] = float(l_sid.detach())
            if mix:
                used = used & _row_valid(logits.detach())
                l_adv = generator_adversarial_loss(logits, x_sid, y_real, used, loss_scale=c.adv_loss_scale_g,
                                                   gen_loss_scale=c.gen_loss_scale)
                parts["loss_adv"] = float(l_adv.detach())
        l_irl, factor = (self._irl_term(x_irl, eps, labels, valid, parts) if c.irl_on else (None, 1))
        parts["nan_samples"] = int(n - used.sum())
        l_reg = None if reg is None else self._regress_term(both[n:], target_r, parts)
        reg_value = c.lambda_regress * parts["loss_regress"] if l_reg is not None else 0.0
        sid_value = parts.get("loss_sid", 0.0)
        irl_value = parts.get("loss_irl", 0.0) if l_irl is not None else 0.0

        adv_value = parts.get("loss_adv", 0.0) if l_adv is not None else 0.0
        if not scale_free:
            # under DDP every rank must back-propagate through G, even if all its terms drop out
            x_in = torch.where(_bcast(valid, x_g), x_g, torch.zeros_like(x_g))
            total = (x_in * 0).sum() if self.world > 1 else x_g.new_zeros(())
            if l_sid is not None:
                total = total + c.lambda_sid * l_sid
            if l_irl is not None:
                total = total + (c.lambda_irl_raw * factor) * l_irl
            if l_reg is not None:
                total = total + c.lambda_regress * l_reg
            value = c.lambda_sid * sid_value + c.lambda_irl_raw * irl_value + reg_value
            if mix:
                total = (1 - mix) * total + (mix * l_adv if l_adv is not None else 0.0)
                value = (1 - mix) * value + mix * adv_value
            parts["loss_gen"] = value
            return total, parts

        # fp16: the x-gradients pass through the autocast networks, so they are taken at the
        # GradScaler's scale (and unscaled here); an overflow shows as inf in the combined
        # gradient, which makes the scaler skip the step as usual
        amp_scale = (float(self.scaler_g.get_scale()) * c.gen_loss_scale / self.accum
                     if self.scaler_g.is_enabled() else 1.0)
        keep = _bcast(valid, x_g)

        def x_grad(loss, x, weight, retain=False):
            if loss is None or not loss.requires_grad:
                return torch.zeros_like(x_g)
            (g,) = torch.autograd.grad(loss * (weight * amp_scale), x, allow_unused=True, retain_graph=retain)
            if g is None:
                return torch.zeros_like(x_g)
            g = g / amp_scale if amp_scale != 1.0 else g
            return torch.where(keep, g, torch.zeros_like(g))  # dropped rows take no part

        g_sid = x_grad(l_sid, x_sid, c.lambda_sid, retain=l_adv is not None)  # the adversarial term shares f_psi's pass
        g_irl = x_grad(l_irl, x_irl, float(factor))
        sq = torch.stack([g_sid.double().square().sum(), g_irl.double().square().sum()])
        if self.world > 1:
            torch.distributed.all_reduce(sq)
        n_sid, n_irl = float(sq[0].sqrt()), float(sq[1].sqrt())
        if math.isfinite(n_sid) and math.isfinite(n_irl):
            floor = self._irl_gradient_floor(x_irl.detach(), valid, factor)
            m = c.lambda_irl * n_sid / max(n_irl, floor) if n_irl > 0 else 0.0
            parts["irl_floored"] = float(0 < n_irl < floor)
            # m is the weight of L_irl in lambda_sid L_sid + m L_irl, in one process and under DDP
            # alike: there each rank's SiD gradient is that of its local mean (world x its share
            # of the global mean's), and g_irl that of world x the global loss (factor), so the
            # ratio is unchanged. The norms are reported in the one-process frame.
            w = m
            parts.update(irl_weight=m, irl_gnorm_sid=n_sid / self.world, irl_gnorm_irl=n_irl / factor)
        else:
            # an overflowing x-gradient (fp16): no weight this step; the NaN it leaves in the
            # generator's gradient makes the scaler skip the step (counted in nan_grads); the loss
            # value reported is the SiD term's
            m, w = float("nan"), 0.0
        g = (g_sid + m * g_irl).detach()
        value = c.lambda_sid * sid_value + w * irl_value
        if mix:  # SiDA's mixture: the scale-free weight stays relative to the SiD term alone
            g = (1 - mix) * g + mix * x_grad(l_adv, x_sid, 1.0).detach()
            value = (1 - mix) * value + mix * adv_value
        x_in = torch.where(keep, x_g, torch.zeros_like(x_g))
        surrogate = (x_in * g).sum()
        parts["loss_gen"] = value + (1 - mix) * reg_value
        total = surrogate - surrogate.detach() + value
        if l_reg is not None:  # its own value and gradient; the scale-free weight is not relative to it
            total = total + ((1 - mix) * c.lambda_regress) * l_reg
        return total, parts

    def _irl_gradient_floor(self, x: torch.Tensor, valid: torch.Tensor, factor: float) -> float:
        """The least norm the scale-free weight divides the isometric x-gradient's by:
        IRL_GRADIENT_FLOOR sqrt(N) / delta, delta the RMS distance of the pairs the loss compares
        (its own length scale; the norm of a gradient of a [0, 1]-valued loss of distances scales
        as sqrt(N) / delta), in the frame of the factor the term is back-propagated with. Where G
        is already an exact isometry the gradient is rounding noise, and dividing by its norm
        made w explode (36-79) and push that noise at F x the SiD gradient's norm."""
        k = self.config.irl_neighbours
        keep = valid.reshape(-1, k + 1).all(1).repeat_interleave(k + 1) if k > 0 else valid  # whole groups
        rows = x if bool(keep.all()) else x[keep]
        if rows.shape[0] < 2:
            return 0.0
        rows = rows.reshape(rows.shape[0], -1).double()
        d2 = local_bandwidth_sq_grouped(rows, k + 1) if k > 0 else local_bandwidth_sq(rows)
        if not float(d2) > 0:
            return 0.0
        n = rows.shape[0] * self.world
        return float(factor) * IRL_GRADIENT_FLOOR * math.sqrt(n) / math.sqrt(float(d2))

    def _regression_batch(self, n: int):
        """n pairs (eps, teacher output, labels) drawn with replacement from the regression pairs."""
        if self.regression_pairs is None:
            raise RuntimeError("lambda_regress > 0: call set_regression_pairs before training")
        eps, x, labels = self.regression_pairs
        idx = torch.randint(0, eps.shape[0], (n,), generator=self.rng, device=self.device)
        return eps[idx], x[idx], None if labels is None else labels[idx]

    def _regress_term(self, x_r: torch.Tensor, target: torch.Tensor, parts: dict):
        """Mean over the rows with a finite G output of ||x_r - target||^2 (summed over the
        sample's dimensions); sets parts["loss_regress"]. None when no row is finite."""
        keep = _row_valid(x_r)
        if not bool(keep.any()):
            parts["loss_regress"] = float("nan")
            return None
        err = (x_r[keep].float() - target[keep]).flatten(1).square().sum(1).mean()
        parts["loss_regress"] = float(err.detach())
        return err

    def _no_rank_dropped(self, dropped: int) -> bool:
        """Whether no process dropped a row of this micro-batch (the same answer on every rank)."""
        bad = torch.tensor([dropped], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(bad)
        return int(bad) == 0

    def _irl_term(self, x: torch.Tensor, eps: torch.Tensor, labels, valid: torch.Tensor, parts: dict):
        """The isometry loss of the generator step (sets parts["loss_irl"]); returns (loss or
        None when too few rows are left, factor): the loss is back-propagated with weight x
        factor (the world size for the global-batch loss under DDP, else 1)."""
        c = self.config
        n = x.shape[0]
        if c.irl_estimator == "jvp":
            return self._jvp_term(eps, labels, valid, parts), 1
        z = c.sigma_init * eps
        k = c.irl_neighbours
        kw = dict(weighting=c.irl_weighting, bandwidth=c.irl_bandwidth, scale=c.irl_scale, backend=c.backend)
        # groups never straddle ranks (accum_steps checks that the micro-batch is a multiple of
        # K+1), so under DDP the global batch's loss (random pairs or groups) comes from the
        # distributed op: one optimal scale for the whole batch, as in one process
        groups = k + 1 if k > 0 else None
        # rows that may enter the loss: finite ones; with groups a dropped row drops its group
        keep = valid.reshape(n // groups, groups).all(1).repeat_interleave(groups) if groups else valid
        # the global-batch loss needs the same rows on every rank: in an iteration where some
        # rank dropped one, every rank takes the loss of its own kept rows instead
        if self.world > 1 and self._no_rank_dropped(n - int(keep.sum())):
            from gsd_kernels.distributed import isometry_loss as dist_isometry_loss
            l_irl = dist_isometry_loss(x, z, groups=groups, **kw)
            parts["loss_irl"] = float(l_irl.detach())
            return l_irl, self.world
        if int(keep.sum()) < (groups or 2):
            parts["loss_irl"] = float("nan")
            return None, 1
        x_v, z_v = (x, z) if bool(keep.all()) else (x[keep], z[keep])
        l_irl = _ops().isometry_loss(x_v, z_v, groups=groups, **kw)
        parts["loss_irl"] = float(l_irl.detach())
        return l_irl, 1

    def _jvp_term(self, eps: torch.Tensor, labels, valid: torch.Tensor, parts: dict):
        """--irl-estimator jvp: the relaxed distortion measure of G's Jacobian at the anchors
        (every latent of the micro-batch, one Gaussian probe each, drawn from the run's RNG),
        gsd.jacobian_isometry. It is a separate pass through G (a forward, and vector-Jacobian
        products with a graph for the double backward), in float32 without autocast, through the
        plain module (not the compiled or DDP wrapper).

        Anchors whose x_g was dropped are left out before the pass, and anchors whose terms come
        out non-finite are left out by a pass without them (with the same probes): dropping them
        from the mean afterwards would keep their graph, whose backward puts NaN into the
        parameter gradients."""

        c = self.config
        z = c.sigma_init * eps
        # the probes as distortion_terms would draw them, kept for a pass over fewer anchors
        u = torch.randn((1, *z.shape), generator=self.rng, device=z.device, dtype=z.dtype)
        keep = valid.clone()
        while True:
            rows = keep.nonzero().squeeze(1)
            if rows.numel() == 0:
                parts["loss_irl"] = float("nan")
                return None
            sigma = torch.full((rows.numel(),), c.sigma_init, device=eps.device)
            sub_labels = None if labels is None else labels[rows]

            def fn(t):
                return self.generator(t, sigma, sub_labels)

            # the double-backward route: about 1.5x cheaper than forward-mode AD on the digits network,
            # it runs through gradient checkpointing, and it draws dropout masks as a plain forward does
            num, den = distortion_terms(fn, z[rows], probes=u[:, rows], method="double_backward")
            finite = torch.isfinite(num) & torch.isfinite(den)
            if bool(finite.all()):
                break
            keep[rows[~finite]] = False
        l_irl = num.mean() / den.mean() ** 2
        parts["loss_irl"] = float(l_irl.detach())
        return l_irl

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
        bad_grads, n_grads = _sanitize_grads(self.generator.parameters())
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
            # the same counters on every rank: samples summed, (averaged, hence identical) gradients max
            counts = torch.tensor([nan_samples, nan_grads, *f_rows, *g_rows], dtype=torch.int64, device=self.device)
            s_max = counts.clone()
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(s_max, op=torch.distributed.ReduceOp.MAX)
            nan_samples, nan_grads = int(counts[0]), int(s_max[1])
            f_rows, g_rows = [int(v) for v in counts[2:4]], [int(v) for v in counts[4:6]]
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


def _ops():
    import gsd_kernels
    return gsd_kernels
