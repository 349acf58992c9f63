"""isometry_loss(groups=g): pairs only within blocks of g consecutive rows (docs/definitions.md §2.1).

Every backend is checked against the float64 oracle of tests/oracles.py (a masked N x N,
written independently of gsd_kernels) on fresh random inputs at awkward sizes, with a
large common offset; plus bad input, the no-N x N property of the grouped reference, the
custom op's fake implementation / opcheck, torch.compile, and the issue-12 measurement
that grouped pairs see a high-frequency wiggle that random pairs do not.
"""

import math
import os

import pytest
import torch

import gsd_kernels
from gsd_kernels import _isometry, ops, reference

import oracles

FP32_TOL = 1e-4
FP64_TOL = 1e-9

# (N, D, d, g): N = 2; odd N with g = 3 and 5; one group holding the whole batch; D, d off every tile
SIZES = [(2, 37, 5, 2), (15, 37, 5, 3), (15, 37, 5, 5), (12, 37, 5, 12), (70, 131, 9, 7)]
WEIGHTINGS = ["global", "local"]
SCALES = ["optimal", 0.7]


def _cpu_backends():
    names = ["reference"] + [b for b in gsd_kernels.available_backends("cpu") if b != "reference"]
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in names:
        names.append("triton")
    return [b for b in names if b == "reference" or b in ops.GROUPED_BACKENDS]


def _inputs(n, d_x, d_z, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = 50.0 + torch.randn(n, d_x, generator=gen, dtype=torch.float64)  # large common offset
    z = torch.randn(n, d_z, generator=gen, dtype=torch.float64)
    return x.to(dtype), z.to(dtype)


def _value_and_grads(fn, x, z):
    x = x.detach().clone().requires_grad_(True)
    z = z.detach().clone().requires_grad_(True)
    out = fn(x, z)
    gx, gz = torch.autograd.grad(out, (x, z))
    return out.detach().double(), gx.double(), gz.double()


def _check(got, want, tol, floor):
    """Relative error below tol; `floor` is an absolute scale for values exactly 0 in exact
    arithmetic (N = 2 with the optimal scale: one pair is always isometric up to scale)."""
    for a, b in zip(got, want):
        err = float((a - b).norm())
        assert err < tol * max(float(b.norm()), floor), (err, float(b.norm()))


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n,d_x,d_z,g", SIZES)
def test_grouped_loss_and_gradients_match_float64_oracle(backend, weighting, scale, n, d_x, d_z, g):
    dtype = torch.float64 if backend == "reference" else torch.float32
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    x, z = _inputs(n, d_x, d_z, dtype, seed=1000 * n + 10 * g + d_z)
    got = _value_and_grads(lambda a, b: gsd_kernels.isometry_loss(
        a, b, weighting=weighting, scale=scale, groups=g, backend=backend), x, z)
    want = _value_and_grads(lambda a, b: oracles.isometry(
        a, b, weighting=weighting, scale=scale, groups=g), x.double(), z.double())
    floor = 1e-2 if (n == g == 2 and scale == "optimal") else 1e-30
    _check(got, want, tol, floor)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_grouped_fixed_bandwidth_matches_oracle(backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    x, z = _inputs(15, 37, 5, dtype, seed=7)
    got = _value_and_grads(lambda a, b: gsd_kernels.isometry_loss(
        a, b, weighting="local", bandwidth=1.3, groups=5, backend=backend), x, z)
    want = _value_and_grads(lambda a, b: oracles.isometry(
        a, b, weighting="local", bandwidth=1.3, groups=5), x.double(), z.double())
    _check(got, want, tol, 1e-30)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_one_group_of_all_rows_equals_all_pairs(backend, weighting):
    dtype = torch.float64 if backend == "reference" else torch.float32
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    x, z = _inputs(12, 37, 5, dtype, seed=3)
    grouped = _value_and_grads(lambda a, b: gsd_kernels.isometry_loss(
        a, b, weighting=weighting, groups=12, backend=backend), x, z)
    plain = _value_and_grads(lambda a, b: gsd_kernels.isometry_loss(
        a, b, weighting=weighting, backend=backend), x, z)
    _check(grouped, plain, tol, 1e-30)


def test_grouped_bandwidth_is_the_mean_over_included_pairs():
    x, z = _inputs(15, 4, 5, torch.float64, seed=11)
    n, g = 15, 3
    block = torch.arange(n) // g
    mask = (block[:, None] == block[None, :]) & ~torch.eye(n, dtype=torch.bool)
    dz2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    want = dz2[mask].mean()
    assert abs(float(reference.local_bandwidth_sq_grouped(z, g)) - float(want)) < 1e-12 * float(want)
    got = _isometry._local_h2_grouped(z, torch.tensor(1.0, dtype=torch.float64), g)
    assert abs(float(got) - float(want)) < 1e-12 * float(want)


def test_grouped_reference_never_builds_n_by_n():
    """N = 65536 rows: an N x N float32 matrix alone would be 16 GiB; the grouped reference
    builds (N/g, g, g) blocks and finishes in well under a second."""
    n, g = 65536, 4
    x, z = _inputs(n, 3, 2, torch.float32, seed=5)
    x.requires_grad_(True)
    loss = gsd_kernels.isometry_loss(x, z, weighting="local", groups=g, backend="reference")
    (gx,) = torch.autograd.grad(loss, (x,))
    assert torch.isfinite(loss) and torch.isfinite(gx).all()
    # and it still is the grouped loss: the first 64 rows alone are 16 whole groups
    small = oracles.isometry(x[:64].detach(), z[:64], groups=g)
    part = gsd_kernels.isometry_loss(x[:64].detach(), z[:64], groups=g, backend="reference")
    assert abs(float(part) - float(small)) < FP32_TOL * float(small)


@pytest.mark.parametrize("groups,message", [
    (1, "groups must be >= 2"),
    (0, "groups must be >= 2"),
    (-3, "groups must be >= 2"),
    (4, "must divide the number of samples N = 15"),
    (30, "must divide the number of samples N = 15"),
    (True, "groups must be None or an int"),
    (3.0, "groups must be None or an int"),
    ("3", "groups must be None or an int"),
])
def test_bad_groups_raise_one_line_value_error(groups, message, monkeypatch):
    x, z = _inputs(15, 4, 3, torch.float32, seed=0)
    # raised before any work: no backend is even resolved
    monkeypatch.setattr(ops, "_resolve", lambda *a: pytest.fail("resolved a backend before validating"))
    with pytest.raises(ValueError, match=message) as info:
        gsd_kernels.isometry_loss(x, z, groups=groups)
    assert "\n" not in str(info.value)


def _fused_primitives():
    from gsd_kernels import backends
    out = []
    for name in _cpu_backends():
        if name != "reference":
            out.append((name, backends.primitives(name, "cpu")))
    return out


@pytest.mark.parametrize("name,prims", _fused_primitives(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_primitives_on_row_and_column_ranges(name, prims, dtype):
    """The primitives with groups on a row range against a column range (what a distributed
    rank runs): pairs (i, j), i in [r0, r1), j in [c0, c1), i != j, i // g == j // g, against
    a float64 masked N x N; both gradients of the row range."""
    n, g, (r0, r1), (c0, c1) = 70, 7, (12, 40), (5, 63)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(n, 37, generator=gen, dtype=torch.float64)
    z = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    h, coef = 0.3, [0.7, -1.3, 0.4, 0.9]
    xc, zc = (x - x.mean(0)).to(dtype), (z - z.mean(0)).to(dtype)
    hs = torch.tensor(h, dtype=torch.float64)
    cf = torch.tensor(coef, dtype=torch.float64)
    sums = prims.iso_forward_sums(xc, zc, (xc * xc).sum(1), (zc * zc).sum(1), r0, r1, c0, c1, hs, groups=g)
    gx, gz = prims.iso_backward_rows(xc, zc, (xc * xc).sum(1), (zc * zc).sum(1), r0, r1, c0, c1, hs, cf,
                                     need_x=True, need_z=True, groups=g)

    dx = oracles._safe_norm(x[:, None] - x[None])
    dz = oracles._safe_norm(z[:, None] - z[None])
    idx = torch.arange(n)
    mask = (idx[:, None] // g == idx[None, :] // g) & (idx[:, None] != idx[None, :])
    mask &= ((idx >= r0) & (idx < r1))[:, None] & ((idx >= c0) & (idx < c1))[None, :]
    w = torch.exp(-dz.detach() ** 2 * h) * mask
    want = torch.stack([w.sum(), (w * dx * dx).sum(), (w * dx * dz).sum(), (w * dz * dz).sum()])
    tol = FP32_TOL if dtype == torch.float32 else FP64_TOL
    assert float((sums - want).norm()) < tol * float(want.norm())
    # gx_i = sum_j a_ij (x_i - x_j) is the derivative in x_i alone (columns held fixed) of
    # sum_ij w (p delta + q dz) delta + w (r dz + s delta) dz, the brackets held constant
    p, q, r, s = coef
    xr2 = x.clone().requires_grad_(True)
    zr2 = z.clone().requires_grad_(True)
    dx2 = oracles._safe_norm(xr2[:, None] - x[None])
    dz2 = oracles._safe_norm(zr2[:, None] - z[None])
    seed2 = (w * (p * dx + q * dz) * dx2 + w * (r * dz + s * dx) * dz2).sum()
    gxr, gzr = torch.autograd.grad(seed2, (xr2, zr2))
    for got, ref in ((gx, gxr[r0:r1]), (gz, gzr[r0:r1])):
        assert float((got.double() - ref).norm()) < tol * float(ref.norm())


def test_grouped_triton_kernels_compile_for_sm90():
    """Without a GPU: the grouped Triton kernels compile for sm_90 (frontend, lowering, ptxas)."""
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from gsd_kernels.backends import triton as tb\n"
            "res = tb.compile_check(90, only=lambda n, c: 'grouped' in n)\n"
            "bad = [r for r in res if r[3]]\n"
            "print(len(res), bad)\n"
            "raise SystemExit(1 if bad or len(res) != 12 else 0)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in (res.stderr + res.stdout) and "No such file" in res.stderr:
        pytest.skip("no ptxas bundled with triton")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_grouped_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the op with groups."""
    if "cpu" not in ops.GROUPED_BACKENDS or "cpu" not in gsd_kernels.available_backends("cpu"):
        pytest.fail("the cpu backend is not built: gsd_kernels._C is missing")
    x, z = torch.randn(9, 6, requires_grad=True), torch.randn(9, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.gsd.isometry_fwd.default, (x, z, True, 0.0, -1.0, "cpu", 3),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    grad = torch.ones((), dtype=torch.float32)
    sums = torch.ones(4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.gsd.isometry_bwd.default,
                          (grad, x.detach(), z.detach(), sums, True, 0.0, -1.0, True, False, "cpu", 3),
                          test_utils=("test_schema", "test_faketensor"))


def test_grouped_op_under_fake_tensors_allocates_nothing_n_by_n():
    """The fake implementation gives the shapes without running a kernel (meta tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, z = torch.empty(4096, 3072), torch.empty(4096, 8)
        loss, sums = ops._isometry_fwd(x, z, False, 0.0, -1.0, "cpu", 4)
        gx, gz = ops._isometry_bwd(loss, x, z, sums, False, 0.0, -1.0, True, False, "cpu", 4)
    assert loss.shape == () and sums.shape == (4,) and gx.shape == (4096, 3072) and gz.shape == (0,)


@pytest.mark.parametrize("backend", [b for b in _cpu_backends() if b != "triton"])
def test_grouped_loss_under_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x = torch.randn(18, 3, 4, requires_grad=True)
    z = torch.randn(18, 5, requires_grad=True)

    def loss(x, z):
        return gsd_kernels.isometry_loss(x, z, weighting="local", groups=6, backend=backend)

    compiled = torch.compile(loss, fullgraph=True)  # inductor, as users run it
    eager = loss(x, z)
    eager_grads = torch.autograd.grad(eager, (x, z))
    val = compiled(x, z)
    grads = torch.autograd.grad(val, (x, z))
    assert abs(val.item() - eager.item()) < 1e-6 * abs(eager.item())
    for g, e in zip(grads, eager_grads):
        assert float((g - e).norm()) < 1e-5 * float(e.norm())


# ------------------------------------------------------------------ distributed, 2 gloo ranks

DIST_CASES = [
    dict(weighting="global", scale="optimal"),
    dict(weighting="local", scale="optimal"),
    dict(weighting="local", scale=1.9),
    dict(weighting="local", bandwidth=2.0, scale="optimal"),
]


def _dist_worker(rank, world, port, backend, x, z, groups, out_dir):
    import torch.distributed as dist
    from gsd_kernels import distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = x.shape[0] // world
        gathers = []
        real_gather = dist.all_gather

        def recording_gather(*args, **kwargs):
            gathers.append("all_gather")
            return real_gather(*args, **kwargs)

        dist.all_gather = recording_gather
        results = []
        for kw in DIST_CASES:
            xl = x[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
            zl = z[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
            gathers.clear()
            loss = distributed.isometry_loss(xl, zl, groups=groups, backend=backend, **kw)
            gx, gz = torch.autograd.grad(loss, (xl, zl))
            # the one all_gather allowed is the first call's check of equal row counts
            results.append((loss.detach(), gx, gz, [g for g in gathers]))
        try:
            # g = 10 divides the global N = 10 but not a rank's 5 rows: a group would span ranks
            distributed.isometry_loss(x[:5], z[:5], groups=2 * 5, backend=backend)
            results.append("no error")
        except ValueError as err:
            results.append(str(err))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [b for b in _cpu_backends() if b in ("cpu", "reference")])
def test_grouped_loss_on_two_gloo_ranks_matches_one_process(tmp_path, backend):
    import socket
    import torch.multiprocessing as mp
    world, rows, g = 2, 15, 5
    gen = torch.Generator().manual_seed(31)
    x = 50.0 + torch.randn(world * rows, 3, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(world * rows, 6, generator=gen, dtype=torch.float64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dist_worker, args=(world, port, backend, x, z, g, str(tmp_path)),
                       nprocs=world, join=True, start_method="spawn")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, kw in enumerate(DIST_CASES):
        want = _value_and_grads(lambda a, b: oracles.isometry(a, b, groups=g, **kw), x, z)
        for r in range(world):
            loss, gx, gz, gathers = per_rank[r][i]
            assert gathers == ([] if i > 0 else gathers[:1]), gathers  # nothing gathered
            rs = slice(r * rows, (r + 1) * rows)
            _check((loss.double(), gx.double(), gz.double()), (want[0], want[1][rs], want[2][rs]), 1e-9, 1e-30)
    for r in range(world):
        assert "must divide each rank's number of samples (5)" in per_rank[r][-1]


# ------------------------------------------------- issue 12 item 6: what each form can see

def _wiggled_isometry(seed, d=3072, n_dirs=64, a=0.62, w=4.0):
    """G(z) = z Q + a sum_k sin(w z.v_k) u_k: Q orthogonal (4 Householder reflections), v_k
    random unit latent directions, u_k orthonormal output directions. a = 0.62 moves the
    distances of random latent pairs by ~0.2% (checked below); w = 4 makes the wiggle's
    wavelength ~1.6 latent units, so it bends space on the scale of a neighbourhood."""
    gen = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    reflect = torch.nn.functional.normalize(normal(4, d), dim=1)
    v = torch.nn.functional.normalize(normal(n_dirs, d), dim=1)
    u = torch.linalg.qr(normal(d, n_dirs)).Q.T  # (n_dirs, d), orthonormal rows

    def G(z):
        x = z.clone()
        for r in reflect:
            x = x - 2.0 * (x @ r)[:, None] * r[None]
        return x + a * torch.sin(w * (z @ v.T)) @ u

    z_random = normal(64, d)
    anchors = normal(16, d)
    offsets = 0.5 * torch.nn.functional.normalize(normal(16, 3, d), dim=2)  # radius 0.5, uniform directions
    z_groups = torch.cat([anchors[:, None], anchors[:, None] + offsets], 1).reshape(64, d)  # groups of 4
    return G, z_random, z_groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_pairs_see_a_wiggle_that_random_pairs_do_not(seed):
    """d = 3072: random latents are almost equidistant, so random pairs barely see a small
    high-frequency wiggle of an isometry; anchor + neighbour groups see how it bends space
    (issue 12 measured ~34x; here 30x-67x over 8 seeds, asserted >= 10x)."""
    G, z_random, z_groups = _wiggled_isometry(seed)
    x_random = G(z_random)
    dz, dx = torch.pdist(z_random), torch.pdist(x_random)
    change = float(((dx - dz) / dz).abs().mean())
    assert 0.001 < change < 0.004, change  # the calibration: ~0.2% on random pairs
    random_pairs = float(gsd_kernels.isometry_loss(x_random, z_random, backend="reference"))
    grouped = float(gsd_kernels.isometry_loss(G(z_groups), z_groups, groups=4, backend="reference"))
    assert random_pairs > 0
    assert grouped >= 10.0 * random_pairs, (grouped, random_pairs, grouped / random_pairs)
    # without the wiggle (a = 0) G is an exact isometry and both forms are ~0: the gap is the
    # wiggle's, not an artefact of how the latents were sampled
    G0, _, _ = _wiggled_isometry(seed, a=0.0)
    for z, groups in ((z_random, None), (z_groups, 4)):
        assert float(gsd_kernels.isometry_loss(G0(z), z, groups=groups, backend="reference")) < 1e-12


def test_a_backend_without_grouped_kernels_refuses_groups(monkeypatch):
    """No silent fallback: a fused backend that lacks grouped kernels raises, it never runs
    the reference or the all-pairs kernels instead."""
    if "cpu" not in gsd_kernels.available_backends("cpu"):
        pytest.fail("the cpu backend is not built: gsd_kernels._C is missing")
    monkeypatch.setattr(ops, "GROUPED_BACKENDS", frozenset())
    x, z = _inputs(8, 4, 3, torch.float32, seed=2)
    with pytest.raises(ValueError, match=r"isometry_loss\(groups=\.\.\.\) is not implemented for backend .cpu."):
        gsd_kernels.isometry_loss(x, z, groups=4, backend="cpu")
    gsd_kernels.isometry_loss(x, z, backend="cpu")  # all pairs still run


def _cuda_backends():
    if not torch.cuda.is_available():
        return []
    return [b for b in gsd_kernels.available_backends("cuda") if b in ops.GROUPED_BACKENDS]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n,d_x,d_z,g", SIZES + [(4100, 3072, 77, 4)])
def test_grouped_cuda_kernels_match_float64_oracle(backend, weighting, scale, n, d_x, d_z, g):
    """The cuda and triton grouped kernels on a GPU (CPU-only machines run them only as a
    compile check): fp32 against the float64 reference (itself checked against the oracle
    above), including rows longer than one vector step (D = 3072)."""
    x, z = _inputs(n, d_x, d_z, torch.float32, seed=n + g)
    got = _value_and_grads(lambda a, b: gsd_kernels.isometry_loss(
        a, b, weighting=weighting, scale=scale, groups=g, backend=backend), x.cuda(), z.cuda())
    want = _value_and_grads(lambda a, b: gsd_kernels.isometry_loss(
        a, b, weighting=weighting, scale=scale, groups=g, backend="reference"), x.double().cuda(), z.double().cuda())
    floor = 1e-2 if (n == g == 2 and scale == "optimal") else 1e-30
    _check(got, want, FP32_TOL, floor)


def test_grouped_cpu_kernels_do_not_depend_on_the_thread_count():
    """Each row is one task and the row sums are reduced in order: bit-identical results."""
    if "cpu" not in gsd_kernels.available_backends("cpu"):
        pytest.fail("the cpu backend is not built: gsd_kernels._C is missing")
    x, z = _inputs(60, 37, 5, torch.float32, seed=4)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(_value_and_grads(lambda a, b: gsd_kernels.isometry_loss(
                a, b, weighting="local", groups=6, backend="cpu"), x, z))
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("magnitude", [1e20, 1e-30])
def test_grouped_loss_at_extreme_magnitudes(backend, magnitude):
    """fp32 data ~1e20 (squares overflow fp32) and ~1e-30 (squares underflow): the exact
    power-of-two frame keeps the optimal-scale loss and its gradients at full accuracy."""
    x, z = _inputs(15, 37, 5, torch.float64, seed=9)
    x = (x - 50.0) * magnitude
    dtype = torch.float64 if backend == "reference" else torch.float32
    got = _value_and_grads(lambda a, b: gsd_kernels.isometry_loss(a, b, weighting="local", groups=5,
                                                                  backend=backend), x.to(dtype), z.to(dtype))
    want = _value_and_grads(lambda a, b: oracles.isometry(a, b, weighting="local", groups=5),
                            x.to(dtype).double(), z.to(dtype).double())
    assert all(torch.isfinite(t).all() for t in got)
    _check(got, want, FP64_TOL if dtype == torch.float64 else FP32_TOL, 1e-300)
