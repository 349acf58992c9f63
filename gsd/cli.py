"""Command-line plumbing shared by every `gsd` command.

One definition of each flag (docs/definitions.md §3.7: the same flag means the same thing in every
command) and one way to fail: a `UsageError` becomes a one-line message on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence


from gsd import parallel
from gsd.argtypes import bounded_int, nonnegative_float, nonnegative_int, positive_float, unit_interval_float
from gsd.config import SETTING, SETTINGS, Setting
from gsd.errors import Terminated, UsageError
from gsd.seed_ranges import ISOMETRY_SEED_OFFSET, SEED_RANGE_WHY
from gsd.sampling.seeds import LABEL_RULES, parse_seeds
from gsd.util import one_line


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


# The flags of run settings come from their rows in gsd.config.SETTINGS (one definition each: the
# same flag means the same thing in every command); the other shared flags are defined here once.

def add_setting(p, row: Setting) -> None:
    """The flag of one run setting, from its row: its type, default, help and extra arguments."""
    extra = dict(row.flag)
    no_help = extra.pop("no_help", None)
    shown = argparse.SUPPRESS if row.group == "hidden" else row.help
    if row.switch == "on":
        p.add_argument(row.flag_name, dest=row.name, action="store_true", default=row.default, help=shown)
    elif row.switch == "off":
        p.add_argument("--no-" + row.flag_name[2:], dest=row.name, action="store_false", default=row.default,
                       help=shown)
    elif row.switch == "both":
        both = p.add_mutually_exclusive_group()
        both.add_argument(row.flag_name, dest=row.name, action="store_true", default=row.default, help=shown)
        both.add_argument("--no-" + row.flag_name[2:], dest=row.name, action="store_false",
                          default=argparse.SUPPRESS, help=argparse.SUPPRESS if no_help is None else no_help)
    else:
        p.add_argument(row.flag_name, dest=row.name, type=row.type, default=row.default, help=shown, **extra)


def add_settings(p, group: str) -> None:
    """The flags of every run setting in `group` (data, runtime, distill, train, hidden), in the rows' order."""
    for row in SETTINGS:
        if row.group == group:
            add_setting(p, row)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    add_setting(p, SETTING["device"])


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    add_setting(p, SETTING["cache_dir"])


def add_trust_pickle_arg(p: argparse.ArgumentParser) -> None:
    add_setting(p, SETTING["trust_pickle"])


def add_teacher_args(p: argparse.ArgumentParser) -> None:
    """--teacher and --trust-pickle: what gsd.teachers.loading.load_teacher reads."""
    add_setting(p, SETTING["teacher"])
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
    add_settings(p, "data")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, "runtime")


def add_distill_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, "distill")


def parse_settings(p: argparse.ArgumentParser, argv) -> dict:
    """The flags given on the command line, parsed once: {name: value} of those given only
    (a parser's defaults fill the rest where resolve_config completes a run's settings)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in p._actions if a.dest not in (argparse.SUPPRESS, "help")})
    p.parse_args(argv, namespace=ns)
    return {k: v for k, v in vars(ns).items() if v is not unset}


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
