"""The run schema: every setting of a distillation run, declared once as a `Setting` row.

A row holds the setting's name (its flag with dashes as underscores), value type, default,
per-data-set defaults, group, what run directories written before it existed were trained
with, whether `--resume` may change it, the DistillConfig field it fills and its help text.
Everything else is derived from the rows: the flags of gsd.train and of every command that
shares them (gsd.cli.add_settings), the key sets compared on --out / --resume, the upgrade of
old config.json files, the keys evaluation requires, DistillConfig's fields and defaults
(gsd.distill), and `resolve_config`, the one place a run's settings are completed.

Ground floor (imports gsd.errors, gsd.util and gsd.argtypes only), so that gsd.train,
gsd.evaluate and gsd.experiments share it without importing each other.
"""

from __future__ import annotations

import copy
import os
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from gsd.argtypes import (
    count_int, irl_scale, nonnegative_float, nonnegative_int, positive_float, positive_int, seed_int, unit_interval_float,
)
from gsd.errors import UsageError
from gsd.util import MAX_SEED

__all__ = ["Setting", "SETTINGS", "SETTING", "VALUE_RANGES", "DISTILL_DEFAULTS", "GSD_DEFAULTS", "DATASET_DEFAULTS",
           "RUN_DEFAULTS", "TRAINING_KEYS", "RUN_KEYS", "RESUME_FREE", "CHECKPOINT_OWNED", "REQUIRED_CONFIG_KEYS",
           "DEFAULT_MAX_BAD_ITERS", "EXPLODE_FACTOR", "EXPLODE_WINDOW", "resolve_config", "upgrade_config",
           "distill_fields", "dataset_default"]

NEW = object()   # Setting.legacy: the setting has existed since the first run format
SAME = object()  # Setting.library: DistillConfig's default is the run's


@dataclass(frozen=True)
class Setting:
    """One setting of a distillation run.

    default: gsd.train's default (None: per data set, or off). per_dataset: defaults by data
    set, taken when the setting is not given. library: DistillConfig's default where it differs
    from the run's (the library's Distiller is plain SiD unless asked). field: its DistillConfig
    field ("" if it has none). legacy: the value run directories written before the setting
    existed were trained with (filled into their config.json). resume: "fixed" (a --resume that
    changes it is refused), "free" (it may change), "checkpoint" (the checkpoint's own value
    wins); late: the per-data-set default is applied where the setting is used, not in
    config.json (which keeps None). compared: "training" (describes the training: compared on --out / --resume and names
    experiment runs), "run" (compared on --out / --resume only) or "" (neither). required:
    every run's config.json holds it (evaluation refuses one without). type/flag: the argparse
    value type and extra keyword arguments; switch: "on" (--X), "off" (--no-X), "both" (--X and
    --no-X). group: the flag group (data, runtime, distill, train, hidden)."""

    name: str
    default: Any
    help: str
    group: str = "distill"
    type: Callable | None = None
    per_dataset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    library: Any = SAME
    field: str = ""
    legacy: Any = NEW
    resume: str = "fixed"
    compared: str = "training"
    required: bool = False
    switch: str = ""
    flag: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    late: bool = False   # its per-data-set default is taken where it is used (config.json keeps None)

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def library_default(self):
        return self.default if self.library is SAME else self.library


# The stop rule of a run that goes wrong (--max-bad-iters): an iteration is bad when a loss
# is non-finite, when one of its two steps dropped every sample or had every gradient value
# zeroed, or when the loss explodes: the median of |loss_fake| + |loss_gen| over the last
# EXPLODE_WINDOW iterations is above EXPLODE_FACTOR x max(1, the first loss of this start
# computed before any update: loss_fake, or loss_gen without SiD). The median ignores the spread
# that the random noise levels give single iterations. The run stops after DEFAULT_MAX_BAD_ITERS
# bad iterations in a row.
DEFAULT_MAX_BAD_ITERS = 10
EXPLODE_FACTOR = 1e4
EXPLODE_WINDOW = 10

# Valid ranges of SiD's alpha and the loss weights (docs/definitions.md §3.4; alpha > 0 besides).
# Generous margins around what is used (SiD: alpha 1.0-1.2, lambda_sid 1; GSD: lambda_irl 0.01-1):
# larger values can only overflow the generator's float32 gradients (x gen_loss_scale 100), which
# the ops then zero, so that nothing is learnt.
VALUE_RANGES = {
    "alpha": (0.0, 10.0),
    "lambda_sid": (0.0, 1e4),
    "lambda_irl": (0.0, 100.0),
    "lambda_irl_raw": (0.0, 1e4),
    "lambda_regress": (0.0, 1e4),
}

# Why each data set's defaults are what they are:
# - digits: ~0.1 s per iteration on this project's 2-core CPU with the default 0.3M-parameter
#   teacher. 2000 iterations: over seeds 0-2 the GSD run's precision and recall are then within
#   issue 13's 0.05 of the teacher's, which 800 missed (results/student_vs_teacher.md). EMA
#   ramp-up 0.2 (SiD's 0.05 elsewhere): in 2000 iterations 0.05 caps the half-life at 100
#   iterations, too short to average out G's jitter; 0.2 lowers KID and FD on seeds 0-2 at equal
#   precision and recall (results/digits/ema.md).
# - gmm: plain SiD plus a regression of G onto 16384 pairs (eps, teacher ODE output) with weight
#   10, 4 pairs per generated sample, 12000 iterations. SiD alone stalls at a high-quality fraction
#   of 0.92 with samples bridging the modes, at every recipe setting tried; the regression term
#   gives 0.98 and the teacher's sliced W2; 4 pairs per sample and 12000 iterations take the NLL
#   gap from ~3.2x to 1.56-1.76x the teacher's on seeds 0-2 (results/gmm/regress.md). A local
#   isometry of its 2-D latent plane cannot make 8 separated modes: the GSD default weight 0.25
#   drops the high-quality fraction from 0.93 to 0.27, 0.03 to 0.90, and 0.01 leaves both quality
#   and the local defect unchanged (results/gmm/irl_sweep.md).
# - shapes: digits' recipe at 1000 iterations: at 16x16 an iteration costs ~2.5x a digits one
#   (0.4 s on this project's 2-core CPU), and the whole default run (a teacher from an empty
#   cache, distillation, evaluation with the factor metrics) must fit in 10 minutes.
# - cifar10, folder: SiD's CIFAR-10 settings, sized for a GPU.
_ITERS = {"digits": 2000, "gmm": 12000, "shapes": 1000, "cifar10": 20000, "folder": 20000}
_LR = {"digits": 3e-5, "gmm": 1e-4, "shapes": 3e-5, "cifar10": 1e-5, "folder": 1e-5}
_EMA_HALFLIFE = {"digits": 20000.0, "gmm": 50000.0, "shapes": 20000.0, "cifar10": 500_000.0, "folder": 500_000.0}
_EMA_RAMPUP = {"digits": 0.2, "gmm": 0.05, "shapes": 0.2, "cifar10": 0.05, "folder": 0.05}
_BATCH = {"digits": 64, "gmm": 256, "shapes": 64, "cifar10": 64, "folder": 64}
_CKPT_EVERY = {"digits": 200, "gmm": 1000, "shapes": 200, "cifar10": 1000, "folder": 1000}
_EVAL_SAMPLES = {"digits": 1000, "gmm": 4000, "shapes": 1000, "cifar10": 2000, "folder": 2000}
# SiDA's warm-ups (G held for 100k images, the adversarial term mixed in after 200k) are 0.03% and
# 0.07% of its 300M-image CIFAR-10 runs; the same fraction of a digits, gmm or shapes run is less
# than one iteration, while 100k / 200k images would hold G for most of a 128k-image digits run
# and keep the term out of it altogether. So the small data sets start both at once.
_ADV_G_WARMUP = {"digits": 0, "gmm": 0, "shapes": 0, "cifar10": 100_000, "folder": 100_000}
_ADV_MIX_WARMUP = {"digits": 0, "gmm": 0, "shapes": 0, "cifar10": 200_000, "folder": 200_000}
# The data set whose defaults a data set without its own takes
FALLBACK_DATASET = "digits"


SETTINGS: tuple[Setting, ...] = (
    # ------------------------------------------------------------------ data
    Setting("dataset", "digits", "training data (digits, gmm and shapes are made here; cifar10 and folder need "
            "--data-root)", group="data", flag=dict(choices=["digits", "gmm", "shapes", "cifar10", "folder"]),
            required=True),
    Setting("data_root", None, "root folder of cifar10 / folder data", group="data", flag=dict(metavar="PATH")),
    Setting("resolution", None, "image size: --dataset folder (square, centre-cropped) or shapes (8-32, default 16)", group="data",
            type=positive_int),
    Setting("download", False, "allow torchvision to download cifar10 into --data-root", group="data",
            switch="on", compared=""),
    Setting("shapes_kinds", 3, "--dataset shapes: how many shape kinds (1: one square, a single connected "
            "manifold of its factors; 3: square, ellipse, triangle, as dSprites mixes three)", group="data",
            type=positive_int, legacy=3, flag=dict(metavar="K")),
    Setting("conditional", False, "class-conditional teacher and generator: both take the data set's class label "
            "(the default teacher is trained with it)", group="data", switch="on", legacy=False),
    # ------------------------------------------------------------------ runtime
    Setting("device", "auto", "where to run; auto picks cuda when available", group="runtime",
            flag=dict(choices=["auto", "cpu", "cuda"]), resume="free", compared=""),
    Setting("seed", 0, f"random seed (0 to {MAX_SEED})", group="runtime", type=seed_int, field="seed",
            required=True),
    Setting("out", None, "output directory", group="runtime", flag=dict(metavar="DIR"), resume="free", compared=""),
    # ------------------------------------------------------------------ distillation
    Setting("fused", False, "run the loss ops on the fastest fused gsd_kernels backend for the device; stop with "
            "one line where none can serve it", switch="both",
            flag=dict(no_help="use the reference (eager PyTorch) ops: the default, and the eager baseline")),
    Setting("teacher", None, "teacher: a gsd .safetensors file, a diffusers UNet2DModel folder or (with "
            "--trust-pickle) an NVlabs EDM .pkl; default: train and cache one", flag=dict(metavar="PATH")),
    Setting("trust_pickle", False, "allow reading an NVlabs EDM .pkl (only EDM's allow-listed classes are read; no "
            "code from the file runs)", switch="on", resume="free", compared=""),
    Setting("resume", None, "continue the run in DIR", flag=dict(metavar="DIR"), resume="free", compared=""),
    Setting("batch", 64, "generated samples per iteration, neighbours included: with --irl-neighbours K it is "
            "batch / (K+1) anchors x (K+1), so the SiD cost per iteration stays the same", type=count_int,
            per_dataset=_BATCH, field="batch", required=True),
    Setting("iters", None, "distillation iterations (default depends on the dataset)", type=count_int,
            per_dataset=_ITERS, resume="free", compared=""),
    Setting("alpha", 1.2, "SiD alpha", type=float, field="alpha", required=True),
    Setting("sigma_init", 2.5, "noise level of the generator's input", type=positive_float, field="sigma_init",
            required=True),
    Setting("tmax", 800, "largest diffusion time (of 1000) in the generator step", type=positive_int, field="tmax",
            required=True),
    Setting("lambda_sid", 1.0, "weight of the SiD loss (0 turns it off)", type=nonnegative_float,
            field="lambda_sid", required=True),
    Setting("lambda_irl", 0.25, "scale-free weight of the isometric loss: on each generator micro-step its "
            "gradient at the generator output x_g is rescaled to F x the norm of the SiD term's gradient at x_g "
            "(lambda_sid * dL_sid/dx_g, whole micro-batch): L = lambda_sid L_sid + w L_irl with "
            "w = F ||lambda_sid dL_sid/dx_g|| / ||dL_irl/dx_g|| (detached; 0 when the latter is 0); needs "
            "--lambda-sid > 0; 0 turns it off (default: 0.25; 1 for shapes, 0 for gmm)",
            type=nonnegative_float, per_dataset={"gmm": 0.0, "shapes": 1.0}, library=0.0, field="lambda_irl",
            required=True, flag=dict(metavar="F")),
    Setting("lambda_irl_raw", 0.0, "raw weight of the isometric loss, L = lambda_sid L_sid + W L_irl (the papers' "
            "form; exclusive with --lambda-irl; 0 turns it off)", type=nonnegative_float, field="lambda_irl_raw",
            flag=dict(metavar="W")),
    Setting("irl_estimator", "pairs", "pairs: the pair-distance isometry loss (random batch pairs, or "
            "anchor/neighbour groups with --irl-neighbours); jvp: the relaxed distortion measure of G's Jacobian at "
            "the anchors (Gaussian probes; takes --lambda-irl-raw, no neighbours, global weighting)",
            field="irl_estimator", legacy="pairs", flag=dict(choices=["pairs", "jvp"])),
    Setting("irl_neighbours", 3, "K > 0: each of batch/(K+1) anchor latents eps gets K neighbours eps + R u (u "
            "uniform on the unit sphere, the anchor's class label) and the isometry loss is taken over each "
            "anchor's group of K+1; --batch must be a multiple of K+1; 0: pairs over the whole batch (default: 3, "
            "and 0 for gmm)", type=nonnegative_int, per_dataset={"gmm": 0}, library=0, field="irl_neighbours",
            legacy=0, flag=dict(metavar="K")),
    Setting("irl_radius", 0.5, "distance of each neighbour latent from its anchor, in units of eps (R sigma_init "
            "in z = sigma_init eps)", type=positive_float, field="irl_radius", flag=dict(metavar="R")),
    Setting("lambda_regress", 0.0, "weight of a regression of G onto fixed teacher pairs: L += MU * mean "
            "||G(eps_j) - x_j||^2 (squared error summed over the sample), x_j the teacher's 18-step Heun output for "
            "eps_j, over a batch of pairs as large as the generator batch, drawn with replacement; 0 turns it off "
            "(default: 10 for gmm, where SiD alone stalls, 0 elsewhere)", type=nonnegative_float,
            per_dataset={"gmm": 10.0}, field="lambda_regress", legacy=0.0, flag=dict(metavar="MU")),
    Setting("regress_pairs", 16384, "number of teacher pairs drawn before training for --lambda-regress (35 teacher "
            "calls each; default: %(default)s)", type=positive_int, field="regress_pairs", legacy=16384,
            flag=dict(metavar="P")),
    Setting("regress_ratio", 1, "pairs per generated sample in each generator step of --lambda-regress (the "
            "term's batch is K x the generator's; default: 4 for gmm, 1 elsewhere)", type=positive_int,
            per_dataset={"gmm": 4}, field="regress_ratio", legacy=1, flag=dict(metavar="K")),
    Setting("dropout", None, "dropout probability of the generator and the fake score, in [0, 1) (default: the "
            "teacher's; the teacher stays as loaded)", type=unit_interval_float, field="dropout", legacy=None,
            flag=dict(metavar="P")),
    Setting("irl_weighting", "global", "pair weighting of the isometric loss", field="irl_weighting",
            flag=dict(choices=["global", "local"])),
    Setting("irl_scale", "optimal", "'optimal' (scale-invariant) or a fixed positive scale", type=irl_scale,
            field="irl_scale"),
    Setting("lr", None, "Adam learning rate of generator and fake score (default per dataset)", type=positive_float,
            per_dataset=_LR, library=1e-4, field="lr", required=True),
    Setting("ema_halflife", None, "EMA half-life of the generator, in images (default per dataset; 0 = no EMA)",
            type=nonnegative_float, per_dataset=_EMA_HALFLIFE, library=0.0, field="ema_halflife", required=True),
    Setting("ema_rampup", None, "cap the EMA half-life at RATIO x the images seen so far, so that early weights "
            "leave the average quickly (EDM / SiD: 0.05); 0 = no cap (default: 0.2 for digits and shapes, 0.05 "
            "elsewhere)",
            type=nonnegative_float, per_dataset=_EMA_RAMPUP, library=0.05, field="ema_rampup", legacy=0.05,
            resume="checkpoint", flag=dict(metavar="RATIO")),
    Setting("lambda_adv", 0.0, "SiDA: the fake score's encoder is also a discriminator of real against generated "
            "samples, and G's gradient is that of (1 - A) L + A L_adv (SiDA: 0.5); 0 = off (plain SiD / GSD); needs "
            "real samples", type=unit_interval_float, field="lambda_adv", legacy=0.0, flag=dict(metavar="A")),
    Setting("adv_loss_scale_g", 0.01, "SiDA's loss_scaling_G_gan: the scale of G's adversarial term",
            type=nonnegative_float, field="adv_loss_scale_g", legacy=0.01),
    Setting("adv_loss_scale_d", 1.0, "SiDA's loss_scaling_D: the scale of the discriminator's loss in the fake-score "
            "step", type=nonnegative_float, field="adv_loss_scale_d", legacy=1.0),
    Setting("adv_g_warmup", None, "SiDA: G is first stepped once more than this many images have been seen (the "
            "fake score and its discriminator train from the start; 0 = no hold; default: SiDA's 100000 for cifar10 "
            "and folder data, 0 for digits, shapes and gmm, whose runs are too short for it)", type=nonnegative_int,
            per_dataset=_ADV_G_WARMUP, library=100_000, field="adv_g_warmup", legacy=100_000,
            flag=dict(metavar="IMAGES")),
    Setting("adv_mix_warmup", None, "SiDA: the adversarial term enters G's gradient once more than this many "
            "images have been seen (0 = from the start; default: SiDA's 200000 for cifar10 and folder data, 0 for "
            "digits, shapes and gmm)", type=nonnegative_int, per_dataset=_ADV_MIX_WARMUP,
            library=200_000, field="adv_mix_warmup", legacy=200_000, flag=dict(metavar="IMAGES")),
    Setting("adv_clip", 1.0, "SiDA: the fake score's gradients are clipped by value to this", type=positive_float,
            field="adv_clip", legacy=1.0),
    Setting("init_generator", None, "SiD2A: start G (and its EMA) from this generator instead of the teacher: a run "
            "directory, a python -m gsd.export file or (with --trust-pickle) an official SiD/SiDA snapshot .pkl; "
            "the fake score still starts from the teacher", legacy=None, flag=dict(metavar="SOURCE")),
    # ------------------------------------------------------------------ gsd.train's own
    Setting("adam_betas", [0.0, 0.999], "Adam betas of generator and fake score (SiD uses 0 0.999)", group="train",
            type=float, library=(0.0, 0.999), field="betas", flag=dict(nargs=2, metavar=("B1", "B2"))),
    Setting("lr_fake", None, "learning rate of the fake score (default: --lr)", group="train", type=float,
            field="lr_fake"),
    Setting("irl_bandwidth", None, "kernel bandwidth h of --irl-weighting local (default: from the latents)",
            group="train", type=float, field="irl_bandwidth"),
    Setting("batch_per_gpu", None, "samples per process and micro-step under torchrun (default: --batch / world "
            "size); --batch / (this x world size) gradient-accumulation steps, which must be whole", group="train",
            type=positive_int, field="batch_per_rank", compared="run"),
    Setting("precision", "fp32", "autocast dtype of the network forwards (losses and optimiser stay fp32; fp16 uses "
            "a gradient scaler)", group="train", field="precision", compared="run",
            flag=dict(choices=["fp32", "bf16", "fp16"])),
    Setting("compile", False, "torch.compile the generator, fake score and teacher", group="train", switch="on",
            field="compile", resume="free", compared=""),
    Setting("grad_checkpoint", False, "gradient checkpointing: recompute the generator's and fake score's block "
            "activations in the backward pass instead of storing them (less memory, one more forward of each "
            "block)", group="train", switch="on", field="grad_checkpoint", resume="free", compared=""),
    Setting("gen_loss_scale", 100.0, "factor on the generator loss before Adam (SiD's lsg)", group="train", type=float,
            field="gen_loss_scale"),
    Setting("log_every", 10, "iterations between log.jsonl records", group="train", type=positive_int, resume="free",
            compared=""),
    Setting("max_bad_iters", DEFAULT_MAX_BAD_ITERS, "stop the run (one line, exit 2, the last checkpoint kept) after "
            "K consecutive bad iterations: a loss is non-finite, or one of the two steps dropped every sample "
            "(non-finite generator samples or network outputs) or had every gradient value zeroed, or the loss has "
            f"exploded (the median of |loss_fake| + |loss_gen| over the last {EXPLODE_WINDOW} iterations above "
            f"{EXPLODE_FACTOR:g} x max(1, the first iteration's loss_fake, or loss_gen without SiD)); 0 never stops",
            group="train", type=nonnegative_int, resume="free", compared="", flag=dict(metavar="K")),
    Setting("ckpt_every", None, "iterations between checkpoints (default per dataset)", group="train",
            type=positive_int, per_dataset=_CKPT_EVERY, resume="free", compared=""),
    Setting("keep_every", None, "keep every checkpoint whose step is a multiple of this (default 5x --ckpt-every; 0 "
            "keeps only the latest)", group="train", type=nonnegative_int, resume="free", compared=""),
    Setting("eval_samples", None, "samples per Frechet distance / sliced Wasserstein (default: 1000 for digits, 4000 "
            "for gmm, 2000 otherwise; 0 skips the evaluation)", group="train", type=nonnegative_int,
            per_dataset=_EVAL_SAMPLES, resume="free", compared="", late=True),
    Setting("cache_dir", None, "cache of trained helper networks: teachers, the digits classifier (default: "
            "%(default)s = $GSD_CACHE or ~/.cache/gsd)", group="train", resume="free", compared="",
            flag=dict(metavar="DIR")),
    # ------------------------------------------------------------------ testing / experiment knobs (hidden)
    Setting("exact_teacher", None, "", group="hidden", switch="both", required=True),
    Setting("latency_repeats", 5, "", group="hidden", type=positive_int, resume="free", compared=""),
    Setting("classifier_epochs", 30, "", group="hidden", type=positive_int, resume="free", compared=""),
    Setting("progress", True, "", group="hidden", switch="off", resume="free", compared=""),
)

SETTING: dict[str, Setting] = {s.name: s for s in SETTINGS}

# What the tables the engine used before the schema were, derived from the rows
RUN_DEFAULTS: dict[str, Any] = {s.name: copy.deepcopy(s.default) for s in SETTINGS}
DATASET_DEFAULTS: dict[str, dict] = {
    name: {s.name: s.per_dataset[name] for s in SETTINGS if name in s.per_dataset} for name in _ITERS}
TRAINING_KEYS: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.compared == "training")
RUN_KEYS: tuple[str, ...] = TRAINING_KEYS + tuple(s.name for s in SETTINGS if s.compared == "run")
RESUME_FREE: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.resume == "free") + ("eval",)
CHECKPOINT_OWNED: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.resume == "checkpoint")
# Keys every run written by this version's gsd.train carries in config.json: the required
# settings and what the run records besides (its teacher copy and backend)
REQUIRED_CONFIG_KEYS: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.required) + ("teacher_file", "backend")
# The library's defaults of the isometric and regression terms (DistillConfig(): plain SiD)
DISTILL_DEFAULTS: dict[str, Any] = {
    s.name: s.library_default for s in SETTINGS
    if s.name in ("lambda_irl", "lambda_irl_raw", "irl_neighbours", "irl_radius", "irl_estimator", "lambda_regress",
                  "regress_pairs", "regress_ratio")}
# The default RUN is GSD, not plain SiD: SiD plus the isometric term over anchor/neighbour groups
# with the scale-free weight, chosen by the 3-seed digits sweep in results/digits/geometry.md
# (`python benchmarks/geometry_sweep.py`). Data sets' own figures override it: gmm runs plain SiD
# (results/gmm/irl_sweep.md), shapes a weight of 1 (results/shapes/README.md § Defaults).
GSD_DEFAULTS: dict[str, Any] = {name: SETTING[name].default for name in ("lambda_irl", "irl_neighbours", "irl_radius")}


def distill_fields() -> list[tuple[str, Setting]]:
    """(DistillConfig field, row) of every setting the Distiller reads, in the rows' order."""
    return [(s.field, s) for s in SETTINGS if s.field]


# ----------------------------------------------------------------------------------------
# completing a run's settings


def _defaults_for(dataset: str) -> dict:
    fallback = DATASET_DEFAULTS[FALLBACK_DATASET]
    return {s.name: s.per_dataset.get(dataset, fallback.get(s.name, s.default))
            for s in SETTINGS if s.per_dataset and not s.late}


def dataset_default(name: str, dataset: str):
    """A setting's default for a data set (its own, else the fallback data set's, else the row's)."""
    s = SETTING[name]
    return s.per_dataset.get(dataset, DATASET_DEFAULTS[FALLBACK_DATASET].get(name, s.default))


def resolve_config(given: dict, explicit: dict | None = None) -> dict:
    """Fill defaults (the rows' defaults, then per data set) into a config dict, and check the keys.

    The one place a run's settings are completed: gsd.train's command line, a saved
    config.json (--resume, gsd.evaluate) and gsd.experiments' run dicts all go through it.

    `explicit`: the keys the user actually gave (default: all of `given`); a setting with
    per-data-set defaults that was not given (or, where its default is None, given as None)
    takes its data set's value.
    """
    explicit = given if explicit is None else explicit
    unknown = sorted(set(given) - set(RUN_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown config keys: {', '.join(unknown)}")
    cfg = {**copy.deepcopy(RUN_DEFAULTS), **{k: v for k, v in given.items() if k in RUN_DEFAULTS}}
    for key, value in _defaults_for(cfg["dataset"]).items():
        # a row whose default is None ("per data set") fills a None too; a concrete default (batch
        # 64, gmm's recipe) only what was not given, so that a damaged None is refused by name
        if key not in explicit or (SETTING[key].default is None and cfg.get(key) is None):
            cfg[key] = value
    _step_aside(cfg, explicit)
    if cfg.get("keep_every") is None:
        cfg["keep_every"] = 5 * cfg["ckpt_every"]
    if cfg.get("exact_teacher") is None:
        cfg["exact_teacher"] = cfg["dataset"] == "gmm" and cfg.get("teacher") is None
    if cfg["exact_teacher"] and cfg["dataset"] != "gmm":
        raise UsageError("--exact-teacher exists only for --dataset gmm")
    if cfg.get("teacher") is not None:
        cfg["teacher"] = os.path.abspath(cfg["teacher"])
    betas = cfg["adam_betas"]
    if not isinstance(betas, (list, tuple)) or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                      for b in betas):
        raise UsageError(f"--adam-betas must be two numbers, got {betas!r}")
    cfg["adam_betas"] = [float(b) for b in betas]
    return cfg


def _step_aside(cfg: dict, explicit: dict) -> None:
    """The GSD default weight is relative to the SiD gradient and comes with neighbour groups.
    Where the user chose another form of the term (a raw weight, the JVP estimator) or turned
    off the SiD term it is relative to, those defaults step aside instead of conflicting."""
    def given_number(key):
        v = cfg.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    raw, sid = given_number("lambda_irl_raw"), given_number("lambda_sid")
    jvp = cfg.get("irl_estimator") == "jvp"
    if "lambda_irl" not in explicit and ((raw is not None and raw > 0) or jvp or sid == 0):
        cfg["lambda_irl"] = 0.0
    if "irl_neighbours" not in explicit and jvp:
        cfg["irl_neighbours"] = 0


def upgrade_config(cfg: dict) -> dict:
    """A copy of a saved run configuration in today's terms: without `lambda_irl_raw`, its
    `lambda_irl` was the raw weight, so it becomes lambda_irl_raw (and lambda_irl 0); settings
    added since take the value the run was trained with (the rows' `legacy`)."""
    if not isinstance(cfg, dict) or "lambda_irl" not in cfg:
        return cfg
    out = dict(cfg)
    if "lambda_irl_raw" not in cfg:
        out["lambda_irl_raw"], out["lambda_irl"] = cfg["lambda_irl"], 0.0
    for s in SETTINGS:
        if s.legacy is not NEW:
            out.setdefault(s.name, s.legacy)
    return out
