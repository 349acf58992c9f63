"""How fast `python -m gsd.generate` writes images, against the generator's bare forward passes.

    python benchmarks/generation_speed.py                       # 32x32, --batch 256, 1024 images, CPU
    python benchmarks/generation_speed.py --network edm --images 512 --device cuda

The generator is a randomly initialised 32x32 RGB network: the engine's default CIFAR-10 U-Net
(7.0M parameters, `--network default`) or EDM's DDPM++ (55.7M, `--network edm`). Three timings
of the same N images (seeds 0..N-1), interleaved, median of --repeats:

- forward: the bare forward passes gsd.generate runs, G on aligned blocks of 16 latents (the
  block rule of gsd.sampling.seeds), latents drawn beforehand, nothing written;
- forward@batch: bare forward passes of --batch latents per call, the literal "batch 256";
- generate: `gsd.generation.generate_images` writing one PNG per seed into an empty folder on
  disk, everything included (latents, labels, uint8, PNG encoding, atomic writes, manifest).

It reports images/s of each and the ratio generate / forward: the overhead of turning forward
passes into files (the target is <= 1.3 at 32x32, batch 256, on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gsd.evaluation.core import machine_info  # noqa: E402
from gsd.generation import check_outputs, generate_images  # noqa: E402
from gsd.generator import load_generator, save_generator  # noqa: E402
from gsd.models.networks import build_denoiser, count_parameters, default_config, edm_ddpmpp_config  # noqa: E402
from gsd.sampling.seeds import BLOCK, block_latents, blocked_forward, blocks_of  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", choices=["default", "edm"], default="default")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). On a shared 2-core machine use 1: with 2, a descheduled "
                        "OpenMP thread stalls every small kernel and the timings swing by 10x")
    p.add_argument("--workdir", default=None, help="where the PNG folders go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = default_config("cifar10", (3, 32, 32)) if args.network == "default" else edm_ddpmpp_config(augment_dim=0)
    cfg["model"]["dropout"] = 0.0
    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gsd-genbench-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "G.safetensors"
    save_generator(path, build_denoiser(cfg), 2.5)
    G = load_generator(path, device=args.device)
    dev = G.device
    seeds = list(range(args.images))
    eps_blocks = block_latents(blocks_of(seeds), G.sample_shape, dev)
    eps = eps_blocks[:args.images]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def forward():
        blocked_forward(G, eps_blocks)
        sync()

    @torch.no_grad()
    def forward_batch():
        for i in range(0, len(eps), args.batch):
            G(eps[i:i + args.batch])
        sync()

    counter = {"k": 0}

    def generate():
        counter["k"] += 1
        out = work / f"png{counter['k']}"
        generate_images(path, seeds, check_outputs(str(out), None), batch=args.batch, device=args.device,
                        progress=False)
        shutil.rmtree(out)

    fns = {"forward": forward, "forward@batch": forward_batch, "generate": generate}
    with torch.no_grad():
        G(eps[:BLOCK])  # warm-up
        G(eps[:args.batch])
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"network": args.network, "parameters": count_parameters(G.net), "images": args.images,
           "batch": args.batch, "block": BLOCK, "repeats": args.repeats, "seconds": times,
           "images_per_s": {k: args.images / v for k, v in med.items()},
           "generate_over_forward": med["generate"] / med["forward"],
           "generate_over_forward_at_batch": med["generate"] / med["forward@batch"],
           "machine": machine_info(dev),
           "command": "python benchmarks/generation_speed.py " + " ".join(argv or sys.argv[1:])}
    print(f"{args.network} network ({res['parameters'] / 1e6:.1f}M parameters), {args.images} images of 3x32x32, "
          f"--batch {args.batch}, median of {args.repeats} interleaved repeats on {dev}:")
    for k in fns:
        print(f"  {k:<14} {med[k]:8.2f} s  {res['images_per_s'][k]:8.1f} images/s")
    print(f"  generate / forward (same blocks): {res['generate_over_forward']:.3f}x;  generate / forward@batch "
          f"{args.batch}: {res['generate_over_forward_at_batch']:.3f}x")
    print(f"  machine: {json.dumps(res['machine'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
