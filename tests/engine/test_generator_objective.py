"""The three named pieces of the generator objective (gsd.objective): the dropping of
non-finite rows, the batch-wide gradient norms (summed over processes under DDP) and the
scale-free weight, each against an independent float64 computation on fresh random inputs."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gsd.objective.generator import global_norms, scale_free_weight
from gsd.objective.rows import zero_dropped_rows


@pytest.mark.parametrize("shape", [(7, 3), (5, 2, 3, 3), (1, 11)])
def test_zero_dropped_rows_zeroes_values_and_gradients_of_dropped_rows_only(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    valid = torch.rand(shape[0], generator=g) < 0.6
    bad = (~valid).nonzero().flatten().tolist()
    for i, r in enumerate(bad):  # non-finite values of every kind in the dropped rows
        x[r].view(-1)[0] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    x.requires_grad_(True)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    out = zero_dropped_rows(x, valid)
    (out * w).sum().backward()
    expect = x.detach().numpy().copy()
    expect[~valid.numpy()] = 0.0
    np.testing.assert_array_equal(out.detach().numpy(), expect)
    grad = x.grad.numpy()
    assert np.isfinite(grad).all()  # a NaN row must not put NaN into the gradient
    expect_grad = w.numpy().copy()
    expect_grad[~valid.numpy()] = 0.0
    np.testing.assert_array_equal(grad, expect_grad)


def test_global_norms_in_one_process_are_the_float64_norms():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(13, 3, 5, generator=g) * 1e3
    b = torch.randn(13, 3, 5, generator=g) * 1e-4
    got = global_norms(a, b)
    ref = [math.sqrt(sum(float(v) ** 2 for v in t.double().flatten())) for t in (a, b)]
    assert got == pytest.approx(ref, rel=1e-12)
    # float32 squares of 1e20 would overflow: the sum is in float64
    big = torch.full((4, 4), 1e20)
    assert global_norms(big)[0] == pytest.approx(4 * float(big[0, 0]), rel=1e-12)


def _norms_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)  # each rank holds its own rows
        a, b = torch.randn(3 + rank, 4, generator=g), torch.randn(3 + rank, 4, generator=g)
        torch.save({"a": a, "b": b, "norms": global_norms(a, b, world=world)}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_norms_under_ddp_are_the_norms_of_the_concatenated_batch(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_norms_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    a = torch.cat([r0["a"], r1["a"]]).double()
    b = torch.cat([r0["b"], r1["b"]]).double()
    ref = (float(a.square().sum().sqrt()), float(b.square().sum().sqrt()))
    assert r0["norms"] == r1["norms"]  # every rank gets the same numbers
    assert r0["norms"] == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("f, n_sid, n_irl, floor, expect", [
    (0.5, 3.0, 2.0, 0.0, 0.75),         # F ||g_sid|| / ||g_irl||
    (0.5, 3.0, 2.0, 1.0, 0.75),         # a floor below ||g_irl|| does not bind
    (0.5, 3.0, 1e-9, 0.1, 15.0),        # near an exact isometry the floor caps the weight
    (0.5, 3.0, 0.0, 0.1, 0.0),          # no isometric gradient: no weight (not F ||g_sid|| / floor)
    (2.0, 0.0, 4.0, 0.0, 0.0),          # no SiD gradient: nothing to be relative to
])
def test_scale_free_weight_follows_its_definition(f, n_sid, n_irl, floor, expect):
    assert scale_free_weight(f, n_sid, n_irl, floor) == pytest.approx(expect, rel=1e-15)


def test_scale_free_weight_makes_the_weighted_gradient_norm_f_times_the_sid_one():
    """The definition's purpose (docs/definitions.md §3.4): ||w g_irl|| = F ||g_sid||."""
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        g_sid, g_irl = torch.randn(37, generator=g) * 10, torch.randn(37, generator=g) * 1e-3
        f = float(torch.rand((), generator=g))
        n_sid, n_irl = global_norms(g_sid, g_irl)
        w = scale_free_weight(f, n_sid, n_irl)
        assert float((w * g_irl.double()).norm()) == pytest.approx(f * float(g_sid.double().norm()), rel=1e-12)
