"""Fixtures of the benchmark suites: measured device capabilities and extra_info filling."""

from __future__ import annotations

import os
import time

import pytest
import torch

from bench_utils import device_under_test, sync


# -------------------------------------------------------------- device capabilities

def _best_seconds(fn, device, repeats=5):
    """Fastest of a few synchronised runs: the device's attainable rate, not its typical one."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture(scope="session")
def device_caps():
    """Measured fp32 matmul FLOP/s and copy bandwidth of this device (the 'peak' we compare to).

    FLOP counts of the isometry loss are the useful work of the full N x N square; kernels
    that exploit its symmetry execute less, so their fraction can exceed what they execute.
    """
    device = device_under_test()
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    mm_s = _best_seconds(lambda: a @ b, device)
    src = torch.randn(64 * 2 ** 20 // 4 * (4 if device.type == "cuda" else 1), device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device)
    caps = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
        "torch_threads": torch.get_num_threads(),
        "matmul_flops_per_s": 2 * n ** 3 / mm_s,
        "copy_bytes_per_s": 2 * src.numel() * 4 / copy_s,
    }
    return caps


@pytest.fixture
def record(benchmark, device_caps):
    """Fill extra_info for one case; returns a function called with the case's numbers."""

    def _record(*, op, variant, shape, dtype, flops, bytes_moved, peak_extra_bytes):
        info = benchmark.extra_info
        info.update(op=op, variant=variant, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                    flops=flops, bytes=bytes_moved, peak_extra_bytes=peak_extra_bytes,
                    device=device_caps["device"], torch=torch.__version__)
        info["measured_matmul_flops_per_s"] = device_caps["matmul_flops_per_s"]
        info["measured_copy_bytes_per_s"] = device_caps["copy_bytes_per_s"]
        stats = getattr(benchmark, "stats", None)
        if stats is not None and stats.stats.median > 0:
            seconds = stats.stats.median
            info["flops_per_s"] = flops / seconds
            info["bytes_per_s"] = bytes_moved / seconds
            info["fraction_of_matmul_peak"] = flops / seconds / device_caps["matmul_flops_per_s"]
            info["fraction_of_copy_bandwidth"] = bytes_moved / seconds / device_caps["copy_bytes_per_s"]

    return _record
