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


def _matmul_rate(device, n, dtype, tf32=False):
    """FLOP/s of an n x n x n matmul of random `dtype` operands (TF32 tensor cores when
    `tf32`, else plain fp32 SIMT for float32), best of a few synchronised runs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        return 2 * n ** 3 / _best_seconds(lambda: a @ b, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="session")
def device_caps():
    """Measured matmul FLOP/s and copy bandwidth of this device (the ceilings we compare to).

    Three matmul rates, because the kernels use different units: fp32 SIMT (cuBLAS SGEMM, the
    eager reference's default), TF32 tensor cores (what the fused Triton isometry kernels
    run, tf32 or tf32x3), bf16 tensor cores (the ceiling of a bf16 training step). A fused
    kernel's fraction is reported against the TF32 rate on CUDA: against SGEMM a tensor-core
    kernel can show a fraction above 1. FLOP counts of the isometry loss are the useful work
    of the full N x N square; kernels that exploit its symmetry execute less.
    """
    device = device_under_test()
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024  # GPU: 1.1 TFLOP per product, milliseconds even in bf16
    fp32 = _matmul_rate(device, n, torch.float32)
    tf32 = _matmul_rate(device, n, torch.float32, tf32=True) if cuda else None
    bf16 = _matmul_rate(device, n if cuda else 512, torch.bfloat16)
    src = torch.randn(64 * 2 ** 20 // 4 * (4 if cuda else 1), device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device)
    caps = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu x{os.cpu_count()}",
        "torch_threads": torch.get_num_threads(),
        "matmul_fp32_flops_per_s": fp32,
        "matmul_tf32_flops_per_s": tf32,
        "matmul_bf16_flops_per_s": bf16,
        "copy_bytes_per_s": 2 * src.numel() * 4 / copy_s,
    }
    # what a fused kernel's FLOP/s is compared to: tensor cores (TF32) on CUDA, fp32 on CPU
    caps["matmul_peak_name"] = "tf32" if cuda else "fp32"
    caps["matmul_peak_flops_per_s"] = tf32 if cuda else fp32
    return caps


@pytest.fixture
def record(benchmark, device_caps):
    """Fill extra_info for one case; returns a function called with the case's numbers."""

    def _record(*, op, variant, shape, dtype, flops, bytes_moved, peak_extra_bytes, backends):
        """backends: {op name: concrete backend} of what ran (gsd_kernels.resolved_backends)."""
        info = benchmark.extra_info
        info.update(op=op, variant=variant, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                    flops=flops, bytes=bytes_moved, peak_extra_bytes=peak_extra_bytes,
                    device=device_caps["device"], torch=torch.__version__, backends=dict(backends))
        for unit in ("fp32", "tf32", "bf16"):
            info[f"measured_matmul_{unit}_flops_per_s"] = device_caps[f"matmul_{unit}_flops_per_s"]
        info["matmul_peak_name"] = device_caps["matmul_peak_name"]
        info["measured_copy_bytes_per_s"] = device_caps["copy_bytes_per_s"]
        stats = getattr(benchmark, "stats", None)
        if stats is not None and stats.stats.median > 0:
            seconds = stats.stats.median
            info["flops_per_s"] = flops / seconds
            info["bytes_per_s"] = bytes_moved / seconds
            for unit in ("fp32", "tf32", "bf16"):
                rate = device_caps[f"matmul_{unit}_flops_per_s"]
                if rate:
                    info[f"fraction_of_{unit}_matmul"] = flops / seconds / rate
            info["fraction_of_matmul_peak"] = flops / seconds / device_caps["matmul_peak_flops_per_s"]
            info["fraction_of_copy_bandwidth"] = bytes_moved / seconds / device_caps["copy_bytes_per_s"]

    return _record
