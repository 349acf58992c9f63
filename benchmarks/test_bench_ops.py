"""Fused backends vs the eager reference vs torch.compile(reference), per op (docs/definitions.md §4).

    pytest benchmarks/ --benchmark-only                 # full grid for this device
    pytest benchmarks/ --benchmark-only -k isometry     # one op
    pytest benchmarks/ --benchmark-disable              # smoke: smallest size, run once

Compare variants of the same case (same op, mode, shape) within one run; the ratios are
what we report (BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import pytest
import torch

import gsd_kernels
from gsd_kernels import reference

from bench_utils import PeakMemory, device_under_test, smoke_only, sync

DEVICE = device_under_test()

ISOMETRY_SIZES = {  # (N, D, d)
    "cpu": [(256, 192, 192), (1024, 3072, 3072), (4096, 3072, 3072)],
    # (16384, 12288, 12288) is out: minutes per variant, more than a 15-minute GPU lease allows
    "cuda": [(1024, 3072, 3072), (8192, 3072, 3072)],
}
GROUPED_SIZES = {  # (N, D, d, g): anchor + neighbour groups (isometry_loss(groups=g))
    "cpu": [(1024, 3072, 3072, 4), (4096, 3072, 3072, 4)],
    "cuda": [(4096, 3072, 3072, 4), (16384, 3072, 3072, 4)],
}
ELEMENTWISE_SIZES = {  # (N, C, H, W)
    "cpu": [(64, 3, 16, 16), (256, 3, 32, 32), (1024, 3, 64, 64)],
    "cuda": [(1024, 3, 64, 64), (4096, 3, 64, 64)],
}


def _variants():
    fused = [b for b in gsd_kernels.available_backends(DEVICE) if b != "reference"
             and not (b == "triton" and DEVICE.type == "cpu")]  # interpreted Triton is not a contender
    return fused + ["reference", "compiled"]


@functools.lru_cache(maxsize=None)
def _compiled(fn_name):
    return torch.compile(getattr(reference, fn_name))


def _backends(variant):
    """{op: backend} that ran: the resolved fused/reference backend, or the compiled reference."""
    if variant == "compiled":
        return {op: "torch.compile(reference)" for op in gsd_kernels.backends.OPS}
    return gsd_kernels.resolved_backends(DEVICE, backend=variant)


def _op(op_name, variant):
    if variant == "compiled":
        return _compiled(op_name)
    return functools.partial(getattr(gsd_kernels, op_name), backend=variant)


def _sizes(table, config):
    sizes = table[DEVICE.type]
    return sizes[:1] if smoke_only(config) else sizes


def pytest_generate_tests(metafunc):
    if "iso_size" in metafunc.fixturenames:
        metafunc.parametrize("iso_size", _sizes(ISOMETRY_SIZES, metafunc.config), ids=str)
    if "grouped_size" in metafunc.fixturenames:
        metafunc.parametrize("grouped_size", _sizes(GROUPED_SIZES, metafunc.config), ids=str)
    if "elem_size" in metafunc.fixturenames:
        metafunc.parametrize("elem_size", _sizes(ELEMENTWISE_SIZES, metafunc.config), ids=str)
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", _variants())


def _run(benchmark, fn, *, rounds):
    """Warm up (compilation, autotuning) outside the timing, then time synchronised calls."""
    def timed():
        fn()
        sync(DEVICE)
    timed()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


def _rounds(work):
    return 3 if work > 2e10 else 10


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_isometry_loss(benchmark, record, iso_size, variant, mode):
    n, dx, dz = iso_size
    x = torch.randn(n, dx, device=DEVICE, requires_grad=mode != "fwd")
    z = torch.randn(n, dz, device=DEVICE, requires_grad=mode != "fwd")
    op = _op("isometry_loss", variant)

    def fn():
        loss = op(x, z)
        if mode != "fwd":
            torch.autograd.grad(loss, (x, z))

    dots = 2.0 * n * n * (dx + dz)           # one pass of all pair dot products
    flops = dots if mode == "fwd" else 3 * dots  # backward: recompute dots + A @ X
    bytes_moved = 4 * n * (dx + dz) * (1 if mode == "fwd" else 3)
    fn()
    peak = PeakMemory(DEVICE).measure(fn)
    _run(benchmark, fn, rounds=_rounds(flops))
    record(op="isometry_loss", variant=variant, shape=(n, dx, dz), dtype=x.dtype, flops=flops,
           bytes_moved=bytes_moved, peak_extra_bytes=peak, backends=_backends(variant))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_isometry_loss_grouped(benchmark, record, grouped_size, variant, mode):
    """groups=g: O(N g (D + d)) work, memory bound (every row is read g times per pass)."""
    n, dx, dz, g = grouped_size
    x = torch.randn(n, dx, device=DEVICE, requires_grad=mode != "fwd")
    z = torch.randn(n, dz, device=DEVICE, requires_grad=mode != "fwd")
    op = _op("isometry_loss", variant)

    def fn():
        loss = op(x, z, groups=g)
        if mode != "fwd":
            torch.autograd.grad(loss, (x, z))

    diffs = 3.0 * n * (g - 1) * (dx + dz)      # a difference, a square and an add per element and pair
    flops = diffs if mode == "fwd" else 3 * diffs  # backward: distances again + the a_ij (x_i - x_j) update
    bytes_moved = 4 * n * g * (dx + dz) * (1 if mode == "fwd" else 3)
    fn()
    peak = PeakMemory(DEVICE).measure(fn)
    _run(benchmark, fn, rounds=_rounds(flops))
    record(op="isometry_loss", variant=variant, shape=(n, dx, dz), dtype=x.dtype, flops=flops,
           bytes_moved=bytes_moved, peak_extra_bytes=peak, backends=_backends(variant))
    benchmark.extra_info["groups"] = g  # tells this case from the all-pairs one of the same shape


def test_sid_generator_loss(benchmark, record, elem_size, variant):
    x_g, y_real, y_fake = (torch.randn(elem_size, device=DEVICE, requires_grad=True) for _ in range(3))
    op = _op("sid_generator_loss", variant)

    def fn():
        torch.autograd.grad(op(x_g, y_real, y_fake), (x_g, y_real, y_fake))

    numel = x_g.numel()
    bytes_moved = 4 * numel * (3 + 3 + 3)  # forward reads 3; backward reads 3, writes 3
    fn()
    peak = PeakMemory(DEVICE).measure(fn)
    _run(benchmark, fn, rounds=_rounds(numel * 100))
    record(op="sid_generator_loss", variant=variant, shape=elem_size, dtype=x_g.dtype, flops=20 * numel,
           bytes_moved=bytes_moved, peak_extra_bytes=peak, backends=_backends(variant))


def test_fake_score_loss(benchmark, record, elem_size, variant):
    y_fake, x = (torch.randn(elem_size, device=DEVICE, requires_grad=True) for _ in range(2))
    sigma = torch.exp(torch.randn(elem_size[0], device=DEVICE) * 1.2 - 1.2).requires_grad_(True)
    op = _op("fake_score_loss", variant)

    def fn():
        torch.autograd.grad(op(y_fake, x, sigma), (y_fake, x, sigma))

    numel = x.numel()
    bytes_moved = 4 * numel * (2 + 2 + 2)
    fn()
    peak = PeakMemory(DEVICE).measure(fn)
    _run(benchmark, fn, rounds=_rounds(numel * 100))
    record(op="fake_score_loss", variant=variant, shape=elem_size, dtype=x.dtype, flops=8 * numel,
           bytes_moved=bytes_moved, peak_extra_bytes=peak, backends=_backends(variant))
