"""`python -m gsd.fid ref|calc`: FID over image files, as EDM's fid.py and pytorch-fid compute it.

    python -m gsd.fid ref --data cifar10 --data-root DATA --dest cifar10-32x32.npz
    python -m gsd.fid ref --images real_images/ --dest ref.npz
    python -m gsd.fid calc --images samples/ --ref cifar10-32x32.npz
    python -m gsd.fid calc --images samples.npz --ref ref.npz --metrics      # + KID, precision / recall

`ref` writes reference statistics: an npz with `mu` and `sigma` of the Inception pool3 features
(EDM's layout, so EDM's own reference files work as --ref too), and with --with-features the
features themselves, which `calc --metrics` needs for KID and precision / recall. `--data`
renders one of the engine's data sets to uint8 exactly as generated images are written;
`--images` reads a folder of images (recursively) or an npz with uint8 NHWC arr_0.

Preprocessing is pytorch-fid's, from uint8 pixels: for the same PNG folders and weights file the
FID equals `pytorch_fid.fid_score.calculate_fid_given_paths`. The Inception weights come from
--fid-weights or the torch hub cache; a missing file is downloaded there from pytorch-fid's
release when the network is reachable, and is otherwise one line naming the file and where to
put it (no other feature space is ever used). Bad input (an npz of the wrong dtype, rank or
channel count, a folder of mixed image sizes, a reference without mu/sigma or of the wrong
dimension, an existing --dest) is one line and exit 2, with nothing written. The work is in
gsd.evaluation.fid_stats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from gsd.cli import add_device_arg, add_fid_weights_arg, make_parser, run_main
from gsd.argtypes import count_int
from gsd.errors import UsageError
from gsd.util import check_output_file
from gsd.evaluation.fid import FID_FEATURE_NAME, FID_PREPROCESSING, fid_weights, file_sha256, load_fid_inception, \
    uint8_features
from gsd.evaluation.fid_stats import (METRICS_MAX, dataset_images, extra_metrics, fid_against, load_reference,
                                      reference_bytes, statistics)
from gsd.fileio import atomic_write_bytes
from gsd.image_files import open_images
from gsd.util import resolve_device

__all__ = ["build_parser", "main"]


def _common(p: argparse.ArgumentParser) -> None:
    add_fid_weights_arg(p)
    add_device_arg(p)
    p.add_argument("--batch", type=count_int, default=50, help="images per Inception forward pass")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m gsd.fid", "FID over image files (EDM's fid.py, pytorch-fid's preprocessing): "
                                         "'ref' writes reference statistics, 'calc' scores images against them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{ref,calc}")
    ref = sub.add_parser("ref", help="write reference statistics (mu, sigma) of a data set or of images",
                         description="Write reference statistics: an npz with mu and sigma of the Inception pool3 "
                                     "features (EDM's layout).", formatter_class=p.formatter_class)
    src = ref.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", choices=["digits", "cifar10", "folder"], default=None,
                     help="one of the engine's data sets, rendered to uint8 as generated images are")
    src.add_argument("--images", default=None, metavar="DIR|X.npz",
                     help="a folder of images (recursive) or an npz with uint8 NHWC arr_0")
    ref.add_argument("--data-root", default=None, metavar="PATH", help="root folder of cifar10 / folder data")
    ref.add_argument("--resolution", type=count_int, default=None, help="image size for --data folder / cifar10")
    ref.add_argument("--dest", required=True, metavar="REF.npz", help="the npz to write")
    ref.add_argument("--with-features", action="store_true",
                     help="also keep the features (N x 2048 float32) for calc --metrics (KID, precision / recall)")
    _common(ref)
    calc = sub.add_parser("calc", help="FID of images against reference statistics",
                          description="Print the FID of images against reference statistics; --metrics adds KID "
                                      "and precision / recall on the same features.", formatter_class=p.formatter_class)
    calc.add_argument("--images", required=True, metavar="DIR|X.npz",
                      help="a folder of images (recursive) or an npz with uint8 NHWC arr_0")
    calc.add_argument("--ref", required=True, metavar="REF.npz", help="reference statistics (mu, sigma)")
    calc.add_argument("--metrics", action="store_true",
                      help="also KID (with its standard error) and precision / recall (k = 3), against the "
                           f"reference's features (written by ref --with-features); over at most {METRICS_MAX} images "
                           f"a side")
    _common(calc)
    return p


def _features(images, args) -> object:
    dev = resolve_device(args.device)
    weights = fid_weights(args.fid_weights)  # downloads into the hub cache when missing and online
    model = load_fid_inception(weights, dev)
    feats = uint8_features(model, images.batches(args.batch), total=images.count, progress=args.progress)
    return feats, weights


def _ref(args) -> None:
    dest = check_output_file(args.dest, "--dest")
    if not dest.endswith(".npz"):
        raise UsageError(f"--dest must name an .npz file, got {dest!r}")
    if os.path.lexists(dest):
        raise UsageError(f"--dest {dest} exists; gsd.fid does not replace it (remove it or choose another)")
    if args.images is not None and (args.data_root is not None or args.resolution is not None):
        raise UsageError("--data-root and --resolution go with --data, not --images")
    if args.images is not None:
        images = open_images(args.images)
    else:
        fid_weights(args.fid_weights)  # a missing weights file fails before the data set is read
        images = dataset_images(args.data, data_root=args.data_root, resolution=args.resolution)
    if images.count < 2:
        raise UsageError(f"reference statistics need at least 2 images, {images.path} has {images.count}")
    t0 = time.perf_counter()
    feats, weights = _features(images, args)
    mu, sigma = statistics(feats)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    atomic_write_bytes(dest, reference_bytes(mu, sigma, feats if args.with_features else None))
    print(f"wrote {dest}: mu and sigma of {images.describe()}{' and their features' if args.with_features else ''} "
          f"({FID_FEATURE_NAME}; weights {weights}; {time.perf_counter() - t0:.1f} s)")


def _calc(args) -> None:
    images = open_images(args.images)
    ref = load_reference(args.ref)
    if args.metrics and ref.features is None:
        raise UsageError(f"--metrics: {args.ref} holds only mu and sigma; KID and precision / recall need the "
                         f"reference features (write it with python -m gsd.fid ref ... --with-features)")
    if images.count < 2:
        raise UsageError(f"FID needs at least 2 images, {images.path} has {images.count}")
    feats, weights = _features(images, args)
    fid = fid_against(feats, ref)
    print(f"FID {fid:.6g}")
    if args.metrics:
        m = extra_metrics(feats, ref.features)
        print(f"KID {m['kid']:.6g} ± {m['kid_stderr']:.2g}  precision {m['precision']:.4f} ± "
              f"{m['precision_stderr']:.2g}  recall {m['recall']:.4f} ± {m['recall_stderr']:.2g}  "
              f"({m['generated_used']} generated vs {m['reference_used']} reference images)")
    print(f"protocol: {images.describe()}; reference {ref.description}; Inception weights {weights} (sha256 "
          f"{file_sha256(weights)[:16]}...); {FID_PREPROCESSING}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    (_ref if args.command == "ref" else _calc)(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
