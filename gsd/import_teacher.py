"""Import an external diffusion teacher.

    python -m gsd.import_teacher network-snapshot-200000.pkl --out teacher.safetensors --trust-pickle
    python -m gsd.import_teacher path/to/diffusers-folder          # check it loads (used directly)

An NVlabs EDM pickle is read without executing code from it (see `gsd.teachers.edm_pickle`) and
exported once to a gsd safetensors checkpoint; after that the pickle is not needed. A
diffusers UNet2DModel folder needs no export: `load_teacher` wraps it on the fly.

`gsd.teachers.loading.load_teacher(path)` is the one loader for a teacher given by path: a gsd
``.safetensors`` file, a diffusers folder, or (with ``trust_pickle=True``) an EDM ``.pkl``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import torch

from gsd.cli import add_trust_pickle_arg, make_parser, run_main
from gsd.errors import UsageError
from gsd.util import check_output_file
from gsd.teachers.edm_pickle import export_edm_pickle
from gsd.models.checkpoint import load_denoiser, read_denoiser_metadata
from gsd.teachers.loading import load_teacher, teacher_kind

__all__ = ["build_parser", "main", "check_out_file"]

def build_parser():
    p = make_parser("python -m gsd.import_teacher",
                    "Import an NVlabs EDM network-snapshot pickle into a gsd safetensors teacher (read "
                    "without running code from the pickle), or check that a diffusers UNet2DModel folder "
                    "loads as a teacher.")
    p.add_argument("source", metavar="SOURCE",
                   help="EDM network-snapshot-*.pkl, or a diffusers UNet2DModel / pipeline folder")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output .safetensors for an EDM pickle (default: %(default)s, i.e. SOURCE with the "
                        "suffix .safetensors)")
    add_trust_pickle_arg(p)
    p.add_argument("--no-verify", dest="verify", action="store_false", default=True,
                   help="skip the final check (verify=%(default)s: reload the written file and compare "
                        "its outputs with the imported network's)")
    return p


def _verify(net, path: str) -> float:
    """Max |difference| of the reloaded file's outputs from `net`'s on a small random batch."""
    again = load_denoiser(path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *net.sample_shape, generator=gen)
    sigma = torch.tensor([0.05, 5.0])
    labels = torch.arange(2) % net.label_dim if net.label_dim else None
    with torch.no_grad():
        return float((net(x, sigma, labels) - again(x, sigma, labels)).abs().max())


def check_out_file(out: str, flag: str = "--out") -> str:
    """Refuse, before any work, an output path that cannot be written (`gsd.util.check_output_file`:
    a folder, a path under a file, /proc, a read-only folder) or an existing file that is not a gsd
    teacher (it would be overwritten). UsageError (one line); returns the expanded path."""
    out = check_output_file(out, flag)
    if os.path.exists(out):
        try:
            read_denoiser_metadata(out)
        except UsageError:
            raise UsageError(f"{flag} {out} exists and is not a gsd teacher file; it would be overwritten "
                             f"(remove it or choose another path)") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = os.fspath(args.source)
    kind = teacher_kind(source)
    if kind == "diffusers":
        if args.out is not None:
            raise UsageError("a diffusers folder is used directly as --teacher FOLDER; --out applies to EDM "
                             "pickles only")
        net = load_teacher(source, flag="SOURCE")
        n_params = sum(p.numel() for p in net.parameters())
        print(f"diffusers teacher OK: {source} ({n_params / 1e6:.1f}M parameters, samples "
              f"{tuple(net.sample_shape)}, {net.label_dim or 'no'} classes, {net.prediction_type} prediction, "
              f"T={net.num_train_timesteps}, sigma in [{net.sigma_min:.4g}, {net.sigma_max:.4g}]); "
              f"pass it as --teacher {source}")
        return 0
    if kind != "edm-pickle":
        raise UsageError(f"{source}: expected an EDM .pkl file or a diffusers folder "
                         f"(a .safetensors teacher needs no import)")
    out = args.out or os.path.splitext(source)[0] + ".safetensors"
    if os.path.abspath(out) == os.path.abspath(source):
        raise UsageError("--out must differ from the source file")
    out = check_out_file(out)
    start = time.perf_counter()
    net, meta = export_edm_pickle(source, out, trust_pickle=args.trust_pickle)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"imported {meta['edm_class']} ({meta['variant']}, {n_params / 1e6:.1f}M parameters, samples "
          f"{tuple(net.sample_shape)}, {net.label_dim or 'no'} classes, sigma_data {net.sigma_data}) "
          f"-> {out} in {time.perf_counter() - start:.1f} s")
    if args.verify:
        diff = _verify(net, out)
        if diff != 0.0:
            raise UsageError(f"{out} does not reproduce the imported network (max |diff| {diff:.3g})")
        print("verified: the written file reproduces the imported network exactly")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
