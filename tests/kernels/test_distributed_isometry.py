"""Global-batch isometry loss on 2 gloo processes equals one process on the whole batch."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gsd_kernels
from gsd_kernels import distributed

CASES = [
    dict(weighting="global", scale="optimal"),
    dict(weighting="local", scale="optimal"),
    dict(weighting="global", scale=0.7),
    dict(weighting="local", scale=1.9),
    dict(weighting="local", bandwidth=2.0, scale="optimal"),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, x, z, out_dir):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: oracles
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = x.shape[0] // world
        results = []
        # record the collectives of the backward pass (fused: none; review S11)
        all_reduce, backward_collectives = dist.all_reduce, []

        def recording_all_reduce(tensor, *args, **kwargs):
            backward_collectives.append(tuple(tensor.shape))
            return all_reduce(tensor, *args, **kwargs)

        for kw in CASES:
            xl = x[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
            zl = z[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
            loss = distributed.isometry_loss(xl, zl, backend=backend, **kw)
            dist.all_reduce = recording_all_reduce
            try:
                gx, gz = torch.autograd.grad(loss, (xl, zl))
            finally:
                dist.all_reduce = all_reduce
            results.append((loss.detach(), gx, gz, list(backward_collectives)))
            backward_collectives.clear()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fused_cpu_backends():
    return [b for b in gsd_kernels.available_backends("cpu") if b in ("cpu", "reference")]


@pytest.mark.parametrize("backend", _fused_cpu_backends())
def test_two_gloo_ranks_match_one_process(tmp_path, backend):
    world = 2
    x = torch.randn(2 * 23, 3, 5, 5, dtype=torch.float64)   # 23 rows per rank: not a tile multiple
    z = torch.randn(2 * 23, 11, dtype=torch.float64)
    mp.start_processes(_worker, args=(world, _free_port(), backend, x, z, str(tmp_path)),
                       nprocs=world, join=True, start_method="spawn")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, kw in enumerate(CASES):
        xf = x.clone().requires_grad_(True)
        zf = z.clone().requires_grad_(True)
        loss = gsd_kernels.isometry_loss(xf, zf, backend="reference", **kw)
        gx, gz = torch.autograd.grad(loss, (xf, zf))
        for r in range(world):
            rank_loss, rank_gx, rank_gz, collectives = per_rank[r][i]
            if backend != "reference":  # symmetric backward: no (N, D) gradient all-reduce
                assert collectives == [], (kw, collectives)
            else:  # the autograd all-gather's backward does: the recorder sees it
                assert (46, 75) in collectives, collectives
            assert abs(float(rank_loss) - float(loss.detach())) <= 1e-5 * abs(float(loss.detach())), kw
            rows = slice(r * 23, (r + 1) * 23)
            for got, want in ((rank_gx, gx[rows]), (rank_gz, gz[rows])):
                assert float((got - want).norm() / want.norm()) < 1e-5, kw


def test_without_a_process_group_it_is_the_plain_loss():
    x, z = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    assert float(distributed.isometry_loss(x, z, backend="reference")) == \
        float(gsd_kernels.isometry_loss(x, z, backend="reference"))
