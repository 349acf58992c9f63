"""Benchmark helpers shared by the suites (docs/definitions.md §4).

- every timed callable synchronises CUDA before it returns;
- warm-up (compilation, autotuning) happens before timing;
- inputs are random, never zeros;
- `extra_info` carries shape, dtype, backend, bytes, FLOPs, peak extra memory and the
  fraction of this device's *measured* matmul throughput and copy bandwidth (measured
  once per session, so the fractions are comparable within one run).

With `--benchmark-disable` (the CI smoke run) only the smallest size of each grid runs.
"""

from __future__ import annotations

import torch


def device_under_test() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def smoke_only(config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False))


# ----------------------------------------------------------------------- peak memory

class PeakMemory:
    """Peak memory a callable adds on top of what is live before it runs.

    CUDA: the caching allocator's peak counter. CPU: the kernel's resident-set high-water
    mark (VmHWM), reset through /proc/self/clear_refs, minus the resident set before.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def measure(self, fn) -> int:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak RSS counter
        except OSError:
            return -1
        before = self._status("VmRSS")
        fn()
        return self._status("VmHWM") - before
