"""S8 / T1: one close-pair tolerance everywhere, and no refine storm on a collapsed batch.

A pair is recomputed exactly when (n_i + n_j > 0) and d2 <= TOL (n_i + n_j)
(docs/design.md, "Close pairs"). Identical rows centre to exactly zero rows (constant
columns use their own value as the mean), so the predicate is false for all their pairs.
The CPU kernels count the pairs they recompute (`_C.cpu_refine_count`).
"""

import pytest
import torch

import gsd_kernels
from gsd_kernels import constants

import oracles

native = pytest.importorskip("gsd_kernels.backends.native", reason="gsd_kernels._C is not built",
                             exc_type=ImportError)
_C = native._C


def test_one_tolerance_in_python_cpp_and_triton():
    assert _C.CLOSE_PAIR_TOL_FLOAT32 == constants.CLOSE_PAIR_TOL[torch.float32]
    assert _C.CLOSE_PAIR_TOL_FLOAT64 == constants.CLOSE_PAIR_TOL[torch.float64]
    try:
        from gsd_kernels.backends import triton as triton_backend
    except ImportError:
        return  # no triton here: the C++ and Python values are the ones that run
    for dtype in (torch.float32, torch.float64):
        assert triton_backend.CLOSE_TOL[dtype] == constants.CLOSE_PAIR_TOL[dtype]


def _refined(fn):
    _C.cpu_reset_refine_count()
    out = fn()
    return out, _C.cpu_refine_count()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_rows_refine_no_pair(dtype):
    """A collapsed batch: every sample the same point (uncentred, odd N, partial tiles)."""
    n = 301
    x = (torch.randn(1, 50, dtype=torch.float64) * 3 + 7).repeat(n, 1).to(dtype).requires_grad_(True)
    z = torch.randn(n, 40, dtype=dtype, requires_grad=True)  # no close latent pairs either

    def run():
        loss = gsd_kernels.isometry_loss(x, z, weighting="local", backend="cpu")
        return loss, torch.autograd.grad(loss, (x, z))

    (loss, (gx, gz)), count = _refined(run)
    assert count == 0, f"{count} pairs refined for a batch of identical rows"
    # correct as well: every x distance is 0, so the loss is the constant 1 with zero gradient
    ref = oracles.isometry(x.detach(), z.detach(), "local")
    assert float(loss.detach()) == float(ref) == 1.0
    assert torch.all(gx == 0) and torch.all(gz == 0)


def test_identical_rows_with_distinct_latents_match_the_oracle():
    """Zero rows skip the refine and still give the oracle's value and gradients (fixed
    scale: the loss is not the degenerate constant)."""
    n = 70
    x = torch.full((n, 9), -2.5, dtype=torch.float64).requires_grad_(True)
    z = torch.randn(n, 3, dtype=torch.float64).requires_grad_(True)
    _C.cpu_reset_refine_count()
    loss = gsd_kernels.isometry_loss(x, z, scale=1.7, backend="cpu")
    gx, gz = torch.autograd.grad(loss, (x, z))
    x_refined = _C.cpu_refine_count()
    ref = oracles.isometry(x, z, scale=1.7)
    rgx, rgz = torch.autograd.grad(ref, (x, z))
    assert abs(float(loss) - float(ref)) <= 1e-12 * abs(float(ref))
    assert float((gx - rgx).norm()) <= 1e-10 * max(float(rgx.norm()), 1e-300) or float(gx.abs().max()) == 0
    assert float((gz - rgz).norm()) <= 1e-10 * float(rgz.norm())
    # only genuinely close z pairs can be refined, never the N(N-1) zero-distance x pairs
    assert x_refined < n


def test_close_but_distinct_rows_are_refined():
    """The counter works and the refine still happens where it is needed: near-duplicates."""
    base = torch.randn(20, 64, dtype=torch.float64)
    x = torch.cat([base, base + 1e-4 * torch.randn(20, 64, dtype=torch.float64)]).float()
    z = torch.randn(40, 5)
    loss, count = _refined(lambda: gsd_kernels.isometry_loss(x, z, backend="cpu"))
    assert count >= 20  # the 20 near-duplicate pairs (counted once per ordered tile visit)
    ref = oracles.isometry(x.double(), z.double())
    assert abs(float(loss) - float(ref)) <= 1e-4 * abs(float(ref))


def test_predicate_on_zero_rows_at_the_primitive():
    """All-zero centred rows (norms 0): the primitive refines nothing and returns exact zeros."""
    P = native.CPU
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(150, 40, dtype=dtype)
        z = torch.randn(150, 3, dtype=dtype)
        z = z - z.mean(0)
        h = torch.zeros((), dtype=torch.float64)
        coef = torch.tensor([0.5, -1.0, 0.25, -1.0], dtype=torch.float64)
        x_only = lambda: P.iso_forward_sums(x, x, (x * x).sum(1), (x * x).sum(1), 0, 150, 0, 150, h)
        sums, count = _refined(x_only)
        assert count == 0 and float(sums[1]) == 0.0 and float(sums[0]) == 150 * 149
        (gx, _), count = _refined(lambda: P.iso_backward_rows(
            x, z, (x * x).sum(1), (z * z).sum(1), 0, 150, 0, 150, h, coef, need_x=True, need_z=False))
        assert torch.all(gx == 0)
