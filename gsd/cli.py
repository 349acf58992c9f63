"""Command-line plumbing shared by every `gsd` command.

One definition of each flag (docs/definitions.md §3.7: the same flag means the same thing in every
command) and one way to fail: a `UsageError` becomes a one-line message on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Sequence


from gsd import parallel
from gsd.config import DATASET_DEFAULTS, DISTILL_DEFAULTS, GSD_DEFAULTS, RUN_DEFAULTS  # noqa: F401  (the flags' defaults; re-exported)
from gsd.errors import Terminated, UsageError  # noqa: F401  (UsageError re-exported: commands raise it from here)
from gsd.evaluation.metrics import ISOMETRY_SEED_OFFSET, SEED_RANGE_WHY
from gsd.sampling.seeds import LABEL_RULES, parse_seeds
from gsd.util import (  # noqa: F401  (re-exported for the commands)
    check_creatable, check_image_output, check_memory, check_output_file, format_bytes, format_value,
    memory_limit_bytes, sampler_table,
)
from gsd.util import one_line
from gsd.util import MAX_SEED  # noqa: F401  (re-exported)



def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text}")
    return value




def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")


def bounded_int(lo: int, hi: int, why: str = "") -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]; `why` (e.g. "the largest seed torch accepts")
    is added to the message when the value is out of range."""
    what = f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        value = _parse_int(text, what)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {what}{f' ({why})' if why else ''}, got {value}")
        return value

    parse.__name__ = "bounded_int"  # argparse names the type in some messages
    return parse


def seed_int(text: str) -> int:
    """argparse type for --seed: 0 <= seed <= MAX_SEED (what torch and scikit-learn accept)."""
    return bounded_int(0, MAX_SEED, "the seed range every random generator used accepts")(text)


# Counts (iterations, batch sizes, sample counts) above this are never meant: they overflow
# int64 arithmetic downstream (schedules, seeds, tensor sizes) long before they finish.
MAX_COUNT = 10 ** 12


def count_int(text: str) -> int:
    """argparse type: a positive integer up to MAX_COUNT."""
    return bounded_int(1, MAX_COUNT, "larger counts cannot be meant")(text)


def bounded_float(lo: float, hi: float, why: str = "", *, lo_open: bool = True) -> Callable[[str], float]:
    """argparse type: a finite number in (lo, hi] ([lo, hi] with lo_open=False); `why` explains hi."""
    what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not ((value > lo if lo_open else value >= lo) and value <= hi):  # NaN fails both
            raise argparse.ArgumentTypeError(f"expected {what}{f' ({why})' if why else ''}, got {text}")
        return value

    parse.__name__ = "bounded_float"
    return parse


def irl_scale(text: str):
    """`optimal` or a positive float (docs/definitions.md §2.1)."""
    if text == "optimal":
        return "optimal"
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'optimal' or a positive number, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and one line (argparse already uses 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says what the default is: a per-dataset
    default would otherwise be shown as the global fallback (e.g. 0.0 where gmm takes 10)."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, formatter_class=_DefaultsFormatter)


# Each adder defines one group of flags; commands take the groups they need.

# Shared flags: each is defined once, here, with one help text, and every command that takes
# it calls its adder (the same flag means the same thing everywhere).

def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=RUN_DEFAULTS["device"],
                   help="where to run; auto picks cuda when available")


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=RUN_DEFAULTS["cache_dir"], metavar="DIR",
                   help="cache of trained helper networks: teachers, the digits classifier (default: %(default)s = "
                        "$GSD_CACHE or ~/.cache/gsd)")


def add_trust_pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true", default=RUN_DEFAULTS["trust_pickle"],
                   help="allow reading an NVlabs EDM .pkl (only EDM's allow-listed classes are read; no code from "
                        "the file runs)")


def add_teacher_args(p: argparse.ArgumentParser) -> None:
    """--teacher and --trust-pickle: what gsd.teachers.loading.load_teacher reads."""
    p.add_argument("--teacher", default=RUN_DEFAULTS["teacher"], metavar="PATH",
                   help="teacher: a gsd .safetensors file, a diffusers UNet2DModel folder or (with "
                        "--trust-pickle) an NVlabs EDM .pkl; default: train and cache one")
    add_trust_pickle_arg(p)


def add_fid_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="pytorch-fid Inception weights (pt_inception-2015-12-05-*.pth) (default: %(default)s = look "
                        "in the torch hub cache, <torch hub dir>/checkpoints)")


def add_num_samples_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=bounded_int(2, ISOMETRY_SEED_OFFSET, SEED_RANGE_WHY), default=None,
                   help="samples per Frechet distance / FID (default: %(default)s = 1797 for digits, "
                        "4000 for gmm, 50000 for cifar10 and folder: the FID protocol's)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["digits", "gmm", "cifar10", "folder"], default=RUN_DEFAULTS["dataset"],
                   help="training data (digits and gmm are embedded; cifar10 and folder need --data-root)")
    p.add_argument("--data-root", default=RUN_DEFAULTS["data_root"], metavar="PATH",
                   help="root folder of cifar10 / folder data")
    p.add_argument("--resolution", type=positive_int, default=RUN_DEFAULTS["resolution"],
                   help="image size for --dataset folder (square, centre-cropped)")
    p.add_argument("--download", action="store_true",
                   help="allow torchvision to download cifar10 into --data-root")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    add_device_arg(p)
    p.add_argument("--seed", type=seed_int, default=RUN_DEFAULTS["seed"], help=f"random seed (0 to {MAX_SEED})")
    p.add_argument("--out", default=RUN_DEFAULTS["out"], metavar="DIR", help="output directory")


def add_distill_args(p: argparse.ArgumentParser) -> None:
    fused = p.add_mutually_exclusive_group()
    fused.add_argument("--fused", dest="fused", action="store_true", default=RUN_DEFAULTS["fused"],
                       help="run the loss ops on the fastest fused gsd_kernels backend for the device; "
                            "stop with one line where none can serve it")
    fused.add_argument("--no-fused", dest="fused", action="store_false", default=argparse.SUPPRESS,
                       help="use the reference (eager PyTorch) ops: the default, and the eager baseline")
    add_teacher_args(p)
    p.add_argument("--resume", default=RUN_DEFAULTS["resume"], metavar="DIR", help="continue the run in DIR")
    p.add_argument("--batch", type=count_int, default=RUN_DEFAULTS["batch"],
                   help="generated samples per iteration, neighbours included: with --irl-neighbours K it is "
                        "batch / (K+1) anchors x (K+1), so the SiD cost per iteration stays the same")
    p.add_argument("--iters", type=count_int, default=RUN_DEFAULTS["iters"],
                   help="distillation iterations (default depends on the dataset)")
    p.add_argument("--alpha", type=float, default=RUN_DEFAULTS["alpha"], help="SiD alpha")
    p.add_argument("--sigma-init", type=positive_float, default=RUN_DEFAULTS["sigma_init"],
                   help="noise level of the generator's input")
    p.add_argument("--tmax", type=positive_int, default=RUN_DEFAULTS["tmax"],
                   help="largest diffusion time (of 1000) in the generator step")
    p.add_argument("--lambda-sid", type=nonnegative_float, default=RUN_DEFAULTS["lambda_sid"],
                   help="weight of the SiD loss (0 turns it off)")
    p.add_argument("--lambda-irl", type=nonnegative_float, default=RUN_DEFAULTS["lambda_irl"], metavar="F",
                   help="scale-free weight of the isometric loss: on each generator micro-step its gradient at "
                        "the generator output x_g is rescaled to F x the norm of the SiD term's gradient at x_g "
                        "(lambda_sid * dL_sid/dx_g, whole micro-batch): L = lambda_sid L_sid + w L_irl with "
                        "w = F ||lambda_sid dL_sid/dx_g|| / ||dL_irl/dx_g|| (detached; 0 when the latter is 0); "
                        f"needs --lambda-sid > 0; 0 turns it off (default: {RUN_DEFAULTS['lambda_irl']:g}, and "
                        f"{DATASET_DEFAULTS['gmm']['lambda_irl']:g} for gmm)")
    p.add_argument("--lambda-irl-raw", type=nonnegative_float, default=RUN_DEFAULTS["lambda_irl_raw"], metavar="W",
                   help="raw weight of the isometric loss, L = lambda_sid L_sid + W L_irl (the papers' form; "
                        "exclusive with --lambda-irl; 0 turns it off)")
    p.add_argument("--irl-estimator", choices=["pairs", "jvp"], default=RUN_DEFAULTS["irl_estimator"],
                   help="pairs: the pair-distance isometry loss (random batch pairs, or anchor/neighbour groups "
                        "with --irl-neighbours); jvp: the relaxed distortion measure of G's Jacobian at the "
                        "anchors (Gaussian probes; takes --lambda-irl-raw, no neighbours, global weighting)")
    p.add_argument("--irl-neighbours", type=nonnegative_int, default=RUN_DEFAULTS["irl_neighbours"], metavar="K",
                   help="K > 0: each of batch/(K+1) anchor latents eps gets K neighbours eps + R u (u uniform on "
                        "the unit sphere, the anchor's class label) and the isometry loss is taken over each "
                        "anchor's group of K+1; --batch must be a multiple of K+1; 0: pairs over the whole batch (default: "
                        f"{RUN_DEFAULTS['irl_neighbours']}, and {DATASET_DEFAULTS['gmm']['irl_neighbours']} for gmm)")
    p.add_argument("--irl-radius", type=positive_float, default=RUN_DEFAULTS["irl_radius"], metavar="R",
                   help="distance of each neighbour latent from its anchor, in units of eps (R sigma_init in "
                        "z = sigma_init eps)")
    p.add_argument("--lambda-regress", type=nonnegative_float, default=RUN_DEFAULTS["lambda_regress"], metavar="MU",
                   help="weight of a regression of G onto fixed teacher pairs: L += MU * mean ||G(eps_j) - x_j||^2 "
                        "(squared error summed over the sample), x_j the teacher's 18-step Heun output for eps_j, "
                        "over a batch of pairs as large as the generator batch, drawn with replacement; 0 turns it "
                        f"off (default: {DATASET_DEFAULTS['gmm']['lambda_regress']:g} for gmm, where SiD alone stalls, "
                        f"{RUN_DEFAULTS['lambda_regress']:g} elsewhere)")
    p.add_argument("--regress-pairs", type=positive_int, default=RUN_DEFAULTS["regress_pairs"], metavar="P",
                   help="number of teacher pairs drawn before training for --lambda-regress (35 teacher calls "
                        "each; default: %(default)s)")
    p.add_argument("--regress-ratio", type=positive_int, default=RUN_DEFAULTS["regress_ratio"], metavar="K",
                   help="pairs per generated sample in each generator step of --lambda-regress (the term's batch "
                        f"is K x the generator's; default: {DATASET_DEFAULTS['gmm']['regress_ratio']} "
                        f"for gmm, {RUN_DEFAULTS['regress_ratio']} elsewhere)")
    p.add_argument("--dropout", type=unit_interval_float, default=RUN_DEFAULTS["dropout"], metavar="P",
                   help="dropout probability of the generator and the fake score, in [0, 1) (default: the "
                        "teacher's; the teacher stays as loaded)")
    p.add_argument("--irl-weighting", choices=["global", "local"], default=RUN_DEFAULTS["irl_weighting"],
                   help="pair weighting of the isometric loss")
    p.add_argument("--irl-scale", type=irl_scale, default=RUN_DEFAULTS["irl_scale"],
                   help="'optimal' (scale-invariant) or a fixed positive scale")
    p.add_argument("--lr", type=positive_float, default=RUN_DEFAULTS["lr"],
                   help="Adam learning rate of generator and fake score (default per dataset)")
    p.add_argument("--ema-halflife", type=nonnegative_float, default=RUN_DEFAULTS["ema_halflife"],
                   help="EMA half-life of the generator, in images (default per dataset; 0 = no EMA)")
    p.add_argument("--ema-rampup", type=nonnegative_float, default=RUN_DEFAULTS["ema_rampup"], metavar="RATIO",
                   help="cap the EMA half-life at RATIO x the images seen so far, so that early weights "
                        "leave the average quickly (EDM / SiD: 0.05); 0 = no cap (default: "
                        f"{DATASET_DEFAULTS['digits']['ema_rampup']:g} for digits, "
                        f"{DATASET_DEFAULTS['gmm']['ema_rampup']:g} elsewhere)")


def unit_interval_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def add_guidance_args(p: argparse.ArgumentParser) -> None:
    """Loss guidance of the stochastic (ancestral) sampler: DSG or plain loss guidance (DPS)."""
    p.add_argument("--guidance", choices=["none", "inpaint", "class"], default="none",
                   help="what the samples are guided towards: nothing, completing masked held-out "
                        "images, or a target class (digits)")
    p.add_argument("--method", choices=["dsg", "dps"], default="dsg",
                   help="dsg: spherical Gaussian constraint (Yang et al. 2024); dps: plain loss-gradient step")
    p.add_argument("--guidance-rate", type=unit_interval_float, default=0.2,
                   help="DSG guidance rate in [0, 1] (0 = unguided)")
    p.add_argument("--step-size", type=nonnegative_float, default=None,
                   help="DPS step size on the loss gradient (None: 0.5 for inpaint, 2 for class)")
    p.add_argument("--target-class", type=int, default=None, metavar="K",
                   help="class for --guidance class (None: sample i gets class i mod num_classes)")
    p.add_argument("--mask", choices=["top", "bottom", "left", "right", "center"], default=None,
                   help="HIDDEN region for --guidance inpaint (None: cycle through all five)")


def seed_list(text: str) -> list[int]:
    """argparse type of --seeds: EDM's syntax, '0-49999' or '1,5,10-20' (gsd.sampling.seeds)."""
    try:
        return parse_seeds(text, flag="")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip())


def add_generator_args(p: argparse.ArgumentParser) -> None:
    """SOURCE and how its generator is read: what gsd.generator.load_generator takes."""
    p.add_argument("source", metavar="SOURCE",
                   help="a run directory (its EMA generator), a generator file from python -m gsd.export, or an "
                        "official SiD/SiDA generator snapshot .pkl (with --trust-pickle)")
    p.add_argument("--step", type=nonnegative_int, default=None,
                   help="checkpoint of a run directory (default: %(default)s = the latest complete one)")
    p.add_argument("--raw", action="store_true",
                   help="a run's generator G itself instead of its EMA (the default, what is evaluated)")
    add_trust_pickle_arg(p)
    p.add_argument("--sigma-init", type=positive_float, default=None, metavar="S",
                   help="noise level of a SiD pickle's input, which the pickle does not record (default: %(default)s "
                        "= SiD's 2.5); runs and exported files record their own")


def add_label_args(p: argparse.ArgumentParser) -> None:
    """--class / --labels of a class-conditional generator."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class", dest="class_idx", type=nonnegative_int, default=None, metavar="C",
                   help="class of every image (class-conditional generators only)")
    g.add_argument("--labels", choices=list(LABEL_RULES), default=None,
                   help="label of each seed for a class-conditional generator: random (drawn from a stream of the "
                        "seed's own) or balanced (seed mod the number of classes) (default: %(default)s = random)")


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's main; turn UsageError into one line and exit code 2."""
    try:
        code = main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except OSError as exc:  # a file the user pointed at: unreadable, a link we may not follow, ...
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


def exit_process(code: int) -> None:
    """End a command's process with `code`. Under torchrun (WORLD_SIZE > 1) the process ends with
    os._exit after flushing the output: at interpreter finalization a worker sometimes aborted
    ("terminate called without an active exception", SIGABRT) after its work was done and its
    process group destroyed, turning a finished run into a failed torchrun. Every file the run
    writes is closed before the command returns."""
    if parallel.env_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
