"""Multi-process training under `torchrun` (docs/definitions.md §3.4): process group, rank helpers, DDP.

    torchrun --nproc_per_node=K -m gsd.train ...     # gloo on CPU, NCCL on GPUs

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them
(`python -m gsd.train`) everything here is a no-op and the run is one process.

Errors: a bad setting must stop every rank with the same one-line message instead of
leaving the others waiting in a collective. Checks that depend only on the settings and
the environment run before the process group exists (every rank reaches the same verdict);
`agree()` turns a failure on some ranks after initialisation into the same UsageError on
all of them.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from gsd.errors import UsageError

T = TypeVar("T")

__all__ = ["env_world_size", "env_rank", "env_local_rank", "init", "shutdown", "is_distributed", "rank",
           "world_size", "is_main", "barrier", "agree", "rank0_first", "wrap_ddp", "all_gather_objects"]


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer")


def env_world_size() -> int:
    """The world size torchrun asked for (1 without torchrun), readable before init."""
    return max(1, _env_int("WORLD_SIZE", 1))


def env_rank() -> int:
    return _env_int("RANK", 0)


def env_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init(device: torch.device, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group torchrun describes (no-op for one process); returns this rank's device.

    NCCL when `device` is CUDA (one GPU per process: cuda:LOCAL_RANK), gloo otherwise.
    """
    if env_world_size() <= 1:
        return device
    if not dist.is_available():
        raise UsageError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        local = env_local_rank()
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kw)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] for one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raises a UsageError on any rank, raise it on all ranks.

    Other exceptions on a rank become a UsageError naming that rank on the others (its own
    traceback is raised where it happened), so no rank is left waiting in a collective.
    """
    if not is_distributed():
        return fn()
    result, error, own = None, None, None
    try:
        result = fn()
    except UsageError as exc:
        error, own = ("usage", str(exc)), exc
    except Exception as exc:  # noqa: BLE001 - reported to the other ranks, re-raised here
        error, own = ("other", f"rank {rank()} failed: {type(exc).__name__}: {exc}"), exc
    errors = all_gather_objects(error)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return result
    if own is not None and error[0] == "other":
        raise own
    raise UsageError(first[1])


def rank0_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then (if it succeeded) on the other ranks: e.g. train and cache a
    teacher once, then load it everywhere. A failure anywhere is raised on every rank (`agree`)."""
    if not is_distributed():
        return fn()
    result = None
    if is_main():
        result = agree(fn)
        agree(lambda: None)
    else:
        agree(lambda: None)
        result = agree(fn)
    return result


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module` (parameters broadcast from rank 0), or `module` itself."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, output_device=device.index if ids else None, broadcast_buffers=False)
