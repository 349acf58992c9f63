"""The Triton primitives of docs/design.md against float64 PyTorch formulas.

Without a CUDA device the kernels run on CPU tensors under the Triton interpreter, which
has to be switched on before triton (or the backend module) is imported.
"""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from gsd_kernels.backends import triton as tb  # noqa: E402
from gsd_kernels.backends.triton import common as tb_common  # noqa: E402  (the knobs)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ok, _why = tb.is_available(DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton backend unavailable: {_why}")

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def rel(a, b):
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    nb = b.norm()
    if nb == 0:
        return a.norm().item()
    return ((a - b).norm() / nb).item()


def f64(v):
    """A float64 device scalar, as the primitives take inv_two_h2 / scale / coef."""
    return torch.tensor(v, dtype=torch.float64, device=DEVICE)


@pytest.fixture
def knobs():
    """Restore the module-level tuning knobs after a test changes them."""
    saved = {k: getattr(tb_common, k) for k in
             ("SMALL_DIM", "DIRECT_MAX", "FORCE_NO_DOT", "SLAB_ROWS", "SID_BLOCK",
              "SID_TARGET_PROGRAMS", "DOT_PRECISION", "TILES", "LARGE_TILE_MIN_ROWS")}
    yield tb_common
    for k, v in saved.items():
        setattr(tb_common, k, v)


# ------------------------------------------------------------------ isometry oracle
def prepare(x, z):
    """What the Python layer hands to the primitives: centred inputs and row norms."""
    xc = (x - x.mean(0)).contiguous()
    zc = (z - z.mean(0)).contiguous()
    return xc, zc, (xc * xc).sum(1), (zc * zc).sum(1)


def ref_pairs(x, z, r0, r1, c0, c1, inv_two_h2):
    """Explicit pairwise differences in float64 on the *uncentred* inputs."""
    X, Z = x.double().cpu(), z.double().cpu()
    dX = X[r0:r1, None, :] - X[None, c0:c1, :]
    dZ = Z[r0:r1, None, :] - Z[None, c0:c1, :]
    delta = dX.norm(dim=-1)
    dz = dZ.norm(dim=-1)
    off = torch.arange(r0, r1)[:, None] != torch.arange(c0, c1)[None, :]
    w = torch.exp(-dz**2 * inv_two_h2) * off
    return dX, dZ, delta, dz, w


def ref_sums(x, z, r0, r1, c0, c1, inv_two_h2):
    _, _, delta, dz, w = ref_pairs(x, z, r0, r1, c0, c1, inv_two_h2)
    return torch.stack([w.sum(), (w * delta**2).sum(), (w * delta * dz).sum(),
                        (w * dz**2).sum()])


def ref_rows(x, z, r0, r1, c0, c1, inv_two_h2, p, q, r, s):
    dX, dZ, delta, dz, w = ref_pairs(x, z, r0, r1, c0, c1, inv_two_h2)
    a = torch.where(delta > 0, w * (p * delta + q * dz) / torch.where(delta > 0, delta, 1.0),
                    torch.zeros_like(delta))
    b = torch.where(dz > 0, w * (r * dz + s * delta) / torch.where(dz > 0, dz, 1.0),
                    torch.zeros_like(dz))
    return (a[..., None] * dX).sum(1), (b[..., None] * dZ).sum(1)


def loss_coefs(x, z, inv_two_h2):
    """p, q, r, s of the optimal-scale loss (full square, factor 2 folded in)."""
    S = ref_sums(x, z, 0, x.shape[0], 0, x.shape[0], inv_two_h2)
    sxx, sxz, szz = S[1].item(), S[2].item(), S[3].item()
    qq = -2 * sxz / (sxx * szz)
    return (2 * 2 * sxz**2 / (sxx**2 * szz), 2 * qq, 2 * 2 * sxz**2 / (sxx * szz**2), 2 * qq)


def make(n, D, d, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) + offset
    z = torch.randn(n, d, generator=g, dtype=torch.float64) - offset
    return x.to(dtype).to(DEVICE), z.to(dtype).to(DEVICE)


def check_iso(x, z, ranges, inv_two_h2, dtype, coefs=None, need=(True, True)):
    r0, r1, c0, c1 = ranges
    xc, zc, xn2, zn2 = prepare(x, z)
    got = tb.iso_forward_sums(xc, zc, xn2, zn2, r0, r1, c0, c1, f64(inv_two_h2))
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert got.device.type == x.device.type
    want = ref_sums(x, z, r0, r1, c0, c1, inv_two_h2)
    assert rel(got, want) < TOL[dtype], (got, want)
    p, q, r, s = coefs if coefs is not None else loss_coefs(x, z, inv_two_h2)
    gx, gz = tb.iso_backward_rows(xc, zc, xn2, zn2, r0, r1, c0, c1, f64(inv_two_h2),
                                  f64([p, q, r, s]), need_x=need[0], need_z=need[1])
    wx, wz = ref_rows(x, z, r0, r1, c0, c1, inv_two_h2, p, q, r, s)
    if need[0]:
        assert gx.shape == (r1 - r0, x.shape[1]) and gx.dtype == dtype
        assert rel(gx, wx) < TOL[dtype]
    else:
        assert gx is None
    if need[1]:
        assert gz.shape == (r1 - r0, z.shape[1]) and gz.dtype == dtype
        assert rel(gz, wz) < TOL[dtype]
    else:
        assert gz is None
    return got, gx, gz


# ------------------------------------------------------------------ isometry tests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,D,d", [(2, 3, 1), (37, 1, 3), (70, 67, 3), (33, 5, 70)])
def test_iso_full_square(n, D, d, dtype):
    x, z = make(n, D, d, dtype, seed=n + D)
    # N = 2: one pair, the optimal-scale loss is identically 0, so use free coefficients
    coefs = (0.3, -0.7, 0.2, -0.5) if n == 2 else None
    check_iso(x, z, (0, n, 0, n), 0.0, dtype, coefs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_iso_rectangular_ranges(dtype):
    x, z = make(70, 67, 3, dtype, seed=1)
    check_iso(x, z, (5, 20, 0, 70), 0.0, dtype, coefs=(0.3, -0.7, 0.2, -0.5))
    # columns that do not contain the rows, and a column range inside the rows
    check_iso(x, z, (40, 70, 0, 37), 0.0, dtype, coefs=(0.3, -0.7, 0.2, -0.5))
    check_iso(x, z, (0, 70, 30, 45), 0.0, dtype, coefs=(0.3, -0.7, 0.2, -0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_iso_local_weighting(dtype):
    x, z = make(37, 3, 67, dtype, seed=2)
    zc = z.double() - z.double().mean(0)
    h2 = 2 * 37 / 36 * ((zc**2).sum(1).mean()).item()
    check_iso(x, z, (0, 37, 0, 37), 1.0 / (2 * h2), dtype)
    # a narrow bandwidth makes most weights tiny: still relative accuracy
    check_iso(x, z, (3, 30, 0, 37), 4.0 / (2 * h2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,d", [(6, 4), (40, 24)])  # explicit differences / Gram trick
def test_iso_duplicate_points(D, d, dtype):
    x, z = make(20, D, d, dtype, seed=3)
    x[7] = x[3]  # same sample from two latents: delta = 0, coefficient a = 0
    x[11] = x[3]
    z[15] = z[0]  # same latent for two samples: dz = 0, b = 0
    x[12] = x[13] + 1e-3 * x[13].abs().mean() * torch.randn_like(x[13])  # near duplicate
    got, gx, gz = check_iso(x, z, (0, 20, 0, 20), 0.0, dtype)
    assert torch.isfinite(gx).all() and torch.isfinite(gz).all()


def test_iso_large_offset_fp32():
    # x = 50 + randn: fine only because the batch is centred before the Gram trick
    x, z = make(37, 67, 5, torch.float32, seed=4, offset=50.0)
    check_iso(x, z, (0, 37, 0, 37), 0.0, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_iso_kernel_paths(dtype, knobs):
    """Every (distance mode x backward kernel) combination on one problem: Gram trick on
    tl.dot, Gram trick with the elementwise fallback, explicit differences; flash-style
    backward and the slab backward with several slabs (the last one partial)."""
    x, z = make(70, 20, 24, dtype, seed=5)
    coefs = (0.3, -0.7, 0.2, -0.5)
    full, rect = (0, 70, 0, 70), (5, 20, 0, 70)
    for direct_max, no_dot in ((16, False), (64, False), (16, True)):
        knobs.DIRECT_MAX, knobs.FORCE_NO_DOT = direct_max, no_dot
        knobs.SMALL_DIM, knobs.SLAB_ROWS = 64, None  # flash-style backward
        check_iso(x, z, full, 0.0, dtype, coefs)
        check_iso(x, z, rect, 0.2, dtype, coefs)
        knobs.SMALL_DIM, knobs.SLAB_ROWS = 0, 32  # slab backward, 3 slabs
        check_iso(x, z, full, 0.2, dtype, coefs)
        check_iso(x, z, rect, 0.0, dtype, coefs)


def test_iso_empty_and_scaling():
    x, z = make(10, 4, 4, torch.float64, seed=6)
    xc, zc, xn2, zn2 = prepare(x, z)
    h0 = f64(0.0)
    s = tb.iso_forward_sums(xc, zc, xn2, zn2, 3, 3, 0, 10, h0)
    assert torch.equal(s, torch.zeros(4, dtype=torch.float64, device=s.device))
    gx, gz = tb.iso_backward_rows(xc, zc, xn2, zn2, 3, 3, 0, 10, h0, f64([1.0] * 4))
    assert gx.shape == (0, 4) and gz.shape == (0, 4)
    # the result is linear in (p, q, r, s): a wrong coefficient wiring would show here
    g1 = tb.iso_backward_rows(xc, zc, xn2, zn2, 0, 10, 0, 10, h0, f64([1.0, 0.0, 0.0, 1.0]))
    g2 = tb.iso_backward_rows(xc, zc, xn2, zn2, 0, 10, 0, 10, h0, f64([0.0, 1.0, 1.0, 0.0]))
    g3 = tb.iso_backward_rows(xc, zc, xn2, zn2, 0, 10, 0, 10, h0, f64([2.0, 3.0, 5.0, 7.0]))
    assert rel(g3[0], 2 * g1[0] + 3 * g2[0]) < 1e-12
    assert rel(g3[1], 7 * g1[1] + 5 * g2[1]) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("small", [True, False])
def test_iso_need_flags(need, small, dtype, knobs):
    """need_x / need_z False: that gradient is None (nothing computed or allocated) and the
    other one is unchanged, in the flash-style and in the slab backward."""
    knobs.SMALL_DIM, knobs.SLAB_ROWS = (64, None) if small else (0, 32)
    x, z = make(45, 20, 24, dtype, seed=11)
    check_iso(x, z, (0, 45, 0, 45), 0.1, dtype, coefs=(0.3, -0.7, 0.2, -0.5), need=need)
    check_iso(x, z, (7, 30, 0, 45), 0.0, dtype, coefs=(0.3, -0.7, 0.2, -0.5), need=need)


@pytest.mark.parametrize("dtype", DTYPES)
def test_iso_identical_rows(dtype):
    """A collapsed batch (all samples identical): every distance is 0, the sums and the
    gradients are exactly 0, nothing is NaN."""
    x = torch.randn(1, 40, dtype=torch.float64).repeat(33, 1).to(dtype).to(DEVICE)
    z = torch.randn(33, 24, dtype=torch.float64).to(dtype).to(DEVICE)
    _, zc, _, zn2 = prepare(x, z)
    xc = x - x[:1]  # identical rows centre to exact zeros (ops.py centres them so)
    xn2 = (xc * xc).sum(1)
    s = tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 33, 0, 33, f64(0.0))
    assert s[1].item() == 0.0 and s[2].item() == 0.0 and s[0].item() == 33 * 32
    gx, gz = tb.iso_backward_rows(xc, zc, xn2, zn2, 0, 33, 0, 33, f64(0.0),
                                  f64([0.3, -0.7, 0.2, -0.5]))
    assert torch.equal(gx, torch.zeros_like(gx))
    assert torch.isfinite(gz).all()


@pytest.mark.parametrize("small", [True, False])
def test_iso_nan_propagates(small, knobs):
    """A NaN input gives NaN sums (the clamp at 0 must not turn NaN into 0)."""
    knobs.SMALL_DIM, knobs.SLAB_ROWS = (64, None) if small else (0, None)
    x, z = make(20, 40, 24, torch.float32, seed=17)
    xc, zc, xn2, zn2 = prepare(x, z)
    xc[4, 7] = float("nan")
    xn2 = (xc * xc).sum(1)
    s = tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 20, 0, 20, f64(0.0))
    assert torch.isnan(s[1]) and torch.isnan(s[2])
    gx, _ = tb.iso_backward_rows(xc, zc, xn2, zn2, 0, 20, 0, 20, f64(0.0),
                                 f64([0.3, -0.7, 0.2, -0.5]))
    assert torch.isnan(gx[4]).any()


def test_refine_predicate_needs_nonzero_norms():
    """The close-pair test d2 <= tol (|x_i|^2 + |x_j|^2) is false when the norm sum is 0:
    zero rows give d2 = 0 exactly, and a collapsed batch must not recompute all N^2 pairs
    (review S8). White-box: norms passed as 0 for rows that are not zero make the Gram
    distances max(-2 x_i.x_j, 0); a recompute would replace them by the true distances,
    so the sums tell whether the predicate fired."""
    x, z = make(20, 40, 24, torch.float64, seed=12)
    xc, zc, _, zn2 = prepare(x, z)
    x0 = xc[:1].repeat(20, 1) * torch.linspace(1, 2, 20, dtype=torch.float64)[:, None]
    zero_norms = torch.zeros(20, dtype=torch.float64, device=DEVICE)
    got = tb.iso_forward_sums(x0, zc, zero_norms, zn2, 0, 20, 0, 20, f64(0.0))
    dots = x0 @ x0.T  # all > 0 (parallel rows): Gram d2 = max(-2 dot, 0) = 0 for every pair
    assert (dots > 0).all()
    assert got[1].item() == 0.0  # no pair was recomputed from differences


def gram_sums(x, z):
    """Global-weighting sums in float64 from centred Gram matrices (no N x N x D tensor)."""
    def d2(a):
        a = a.double().cpu()
        a = a - a.mean(0)
        n2 = (a * a).sum(1)
        out = (n2[:, None] + n2[None, :] - 2 * a @ a.T).clamp_min(0)
        return out.fill_diagonal_(0)
    dx, dz = d2(x), d2(z)
    return torch.stack([torch.tensor(float(x.shape[0] * (x.shape[0] - 1)), dtype=torch.float64),
                        dx.sum(), (dx.sqrt() * dz.sqrt()).sum(), dz.sum()])


def test_iso_fp64_pair_epilogue_high_dim():
    """fp32 inputs at D = d = 12288: the loss 1 - S_xz^2 / (S_xx S_zz) is ~1e-4, so S_xz
    must be accurate to ~1e-9 relative. A fp32 sqrt of the pair distances biases it by
    ~2e-9 (review W1), L by ~1e-4 relative (8.5e-5 for these inputs, emulated in torch);
    the float64 epilogue leaves < 1e-6."""
    n, D = 64, 12288
    x, z = make(n, D, D, torch.float32, seed=13)
    xc, zc, xn2, zn2 = prepare(x, z)
    got = tb.iso_forward_sums(xc, zc, xn2, zn2, 0, n, 0, n, f64(0.0))
    want = gram_sums(x, z)

    def loss(S):
        return 1.0 - S[2].item() ** 2 / (S[1].item() * S[3].item())

    L, L0 = loss(got), loss(want)
    assert 1e-5 < L0 < 1e-3
    assert abs(L - L0) / L0 < 1e-5, (L, L0)


def test_iso_device_scalar_contract():
    """inv_two_h2 / coef are float64 device tensors: a Python float (a host copy per call)
    or another dtype is refused with a one-line error."""
    x, z = make(10, 4, 4, torch.float64, seed=6)
    xc, zc, xn2, zn2 = prepare(x, z)
    with pytest.raises(TypeError, match="inv_two_h2"):
        tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 10, 0, 10, 0.0)
    with pytest.raises(ValueError, match="inv_two_h2"):
        tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 10, 0, 10, torch.tensor(0.0, device=DEVICE))
    with pytest.raises(ValueError, match="coef"):
        tb.iso_backward_rows(xc, zc, xn2, zn2, 0, 10, 0, 10, f64(0.0), f64([1.0, 2.0]))
    with pytest.raises(ValueError, match="mean_x"):
        tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 10, 0, 10, f64(0.0), mean_x=xc.mean(0))
    with pytest.raises(TypeError, match="scale"):
        tb.sid_backward(x, x, x, 1.2, f64([1.0] * 10), torch.ones(10, dtype=torch.bool,
                        device=DEVICE), 0.5)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU torch.cuda.set_sync_debug_mode checks this "
                    "(tests/test_kernel_gpu_sync.py, benchmarks/gpu_accuracy.py)")
def test_primitives_never_read_device_values_back(monkeypatch, knobs):
    """No host synchronisation (review C1/S6): no primitive reads a tensor's value on the
    host (.item, .tolist, float(t), bool(t), ...) or builds a tensor from Python values
    (torch.tensor(..., device=cuda) is a blocking copy). On a GPU the sync-debug mode of
    benchmarks/gpu_accuracy.py checks the same; here every such call raises."""
    x, z = make(40, 30, 20, torch.float32, seed=19)
    xc, zc, xn2, zn2 = prepare(x, z)
    h, cf, sc = f64(0.1), f64([1.0, 2.0, 3.0, 4.0]), f64(0.5)

    def boom(*args, **kwargs):
        raise AssertionError("a primitive read a tensor value back to the host")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    monkeypatch.setattr(torch, "tensor", boom)
    tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 40, 0, 40, h)
    tb.iso_backward_rows(xc, zc, xn2, zn2, 0, 40, 0, 40, h, cf)
    knobs.SMALL_DIM = 0  # the slab backward too
    tb.iso_backward_rows(xc, zc, xn2, zn2, 3, 40, 0, 33, h, cf, need_x=True, need_z=False)
    loss, w, valid = tb.sid_forward(x, x + 1, x - 1, 1.2)
    tb.sid_backward(x, x + 1, x - 1, 1.2, w, valid, sc)
    tb.fake_forward(x, x + 1)
    tb.fake_backward(x, x + 1, w, need_x=False)


@pytest.mark.parametrize("preset", sorted(tb_common.TILE_PRESETS) if _ok else [])
def test_iso_tile_presets(preset, knobs):
    """Every tile preset of the large-batch path (64x64 .. 128x128 tiles) at awkward sizes:
    ragged last tiles, a partial last slab, odd N (the table is switched on for small N)."""
    knobs.TILES, knobs.LARGE_TILE_MIN_ROWS = preset, 0
    knobs.SMALL_DIM, knobs.SLAB_ROWS = 0, 128  # slab backward, two slabs for N = 131
    x, z = make(131, 40, 24, torch.float32, seed=14)
    check_iso(x, z, (0, 131, 0, 131), 0.05, torch.float32)
    check_iso(x, z, (3, 131, 0, 97), 0.0, torch.float32, coefs=(0.3, -0.7, 0.2, -0.5),
              need=(True, False))


def test_dot_precision_and_tiles_are_validated(knobs):
    x, z = make(10, 40, 24, torch.float32, seed=6)
    xc, zc, xn2, zn2 = prepare(x, z)
    knobs.DOT_PRECISION = "tf16"
    with pytest.raises(ValueError, match="GSD_TRITON_DOT"):
        tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 10, 0, 10, f64(0.0))
    for ok in ("tf32", "tf32x3", "ieee", "tf32:tf32x3"):
        knobs.DOT_PRECISION = ok
        tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 10, 0, 10, f64(0.0))
    knobs.DOT_PRECISION, knobs.TILES, knobs.LARGE_TILE_MIN_ROWS = "tf32x3", "huge", 0
    with pytest.raises(ValueError, match="GSD_TRITON_TILES"):
        tb.iso_forward_sums(xc, zc, xn2, zn2, 0, 10, 0, 10, f64(0.0))


def test_split3_is_exact():
    """A float64 Python scalar reaches the kernels as three fp32 parts summing exactly."""
    g = torch.Generator().manual_seed(15)
    vals = [1.2, 0.1, 1.0 / 3.0, -2.0 ** -40 * 3.3, 1e30 / 7] + \
        (torch.randn(200, generator=g, dtype=torch.float64) * 10).tolist()
    for v in vals:
        parts = tb_common._split3(v)
        assert all(torch.tensor(p, dtype=torch.float32).item() == p for p in parts)
        assert (parts[0] + parts[1]) + parts[2] == v


def test_sid_fp64_alpha_keeps_all_digits():
    """alpha = 1/3 is not an fp32 number: passed as one fp32 kernel argument it would move
    the float64 loss by ~1e-8 relative; the split keeps it at rounding level."""
    xg, yr, yf = make_sid(6, 300, torch.float64, seed=16)
    alpha = 1.0 / 3.0
    loss, w, valid = tb.sid_forward(xg, yr, yf, alpha)
    rl, rw, rv = ref_sid(xg, yr, yf, alpha)
    assert rel(loss, rl) < 1e-13
    grads = tb.sid_backward(xg, yr, yf, alpha, w, valid, f64(0.7))
    for got, want in zip(grads, ref_sid_grads(xg, yr, yf, alpha, rw, rv, 0.7)):
        assert rel(got, want) < 1e-13


# ------------------------------------------------------------------------ SiD oracle
def ref_sid(xg, yr, yf, alpha):
    g, r, f = xg.double().cpu(), yr.double().cpu(), yf.double().cpu()
    valid = torch.isfinite(g).all(1) & torch.isfinite(r).all(1) & torch.isfinite(f).all(1)
    g, r, f = (torch.where(valid[:, None], t, torch.zeros_like(t)) for t in (g, r, f))
    w = torch.clamp((g - r).abs().mean(1), min=1e-5)
    w = torch.where(valid, w, torch.ones_like(w))
    a, b = r - f, r - g
    loss = torch.where(valid, (a * (b - alpha * a)).sum(1) / w, torch.zeros_like(w))
    return loss, w, valid


def ref_sid_grads(xg, yr, yf, alpha, w, valid, scale):
    g, r, f = xg.double().cpu(), yr.double().cpu(), yf.double().cpu()
    c = torch.where(valid.cpu(), scale / w.double().cpu(), torch.zeros_like(w.double().cpu()))
    c = c[:, None]
    a, b = r - f, r - g
    out = (-c * a, c * (b + (1 - 2 * alpha) * a), -c * (b - 2 * alpha * a))
    return tuple(torch.where(valid.cpu()[:, None], o, torch.zeros_like(o)) for o in out)


def make_sid(n, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xg = torch.randn(n, K, generator=g, dtype=torch.float64)
    yr = xg + 0.3 * torch.randn(n, K, generator=g, dtype=torch.float64)
    yf = yr + 0.2 * torch.randn(n, K, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (xg, yr, yf)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.2, 0.5, 1.0])
@pytest.mark.parametrize("n,K", [(1, 1), (5, 67), (9, 3000)])
def test_sid(n, K, alpha, dtype):
    xg, yr, yf = make_sid(n, K, dtype, seed=K)
    loss, w, valid = tb.sid_forward(xg, yr, yf, alpha)
    assert loss.dtype == torch.float64 and w.dtype == torch.float64 and valid.dtype == torch.bool
    rl, rw, rv = ref_sid(xg, yr, yf, alpha)
    assert torch.equal(valid.cpu(), rv)
    assert rel(loss, rl) < TOL[dtype] and rel(w, rw) < TOL[dtype]
    scale = 0.37 / n
    grads = tb.sid_backward(xg, yr, yf, alpha, w, valid, f64(scale))
    for got, want in zip(grads, ref_sid_grads(xg, yr, yf, alpha, rw, rv, scale)):
        assert got.dtype == dtype and got.shape == (n, K)
        assert rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sid_nonfinite_rows(dtype, knobs):
    knobs.SID_BLOCK = 16  # several vector steps and K-splits per row
    knobs.SID_TARGET_PROGRAMS = 40
    n, K = 8, 70
    xg, yr, yf = make_sid(n, K, dtype, seed=7)
    xg[1, 5] = float("nan")
    yr[2, 69] = float("inf")
    yf[4, 0] = float("-inf")
    yf[6, 33] = float("nan")
    yr[6, 34] = float("inf")
    xg[3] = yr[3]  # w clamps to 1e-5
    loss, w, valid = tb.sid_forward(xg, yr, yf, 1.2)
    rl, rw, rv = ref_sid(xg, yr, yf, 1.2)
    assert valid.cpu().tolist() == [True, False, False, True, False, True, False, True]
    assert torch.equal(valid.cpu(), rv)
    assert torch.isfinite(loss).all() and torch.isfinite(w).all()
    assert (loss.cpu()[~rv] == 0).all() and (w.cpu()[~rv] == 1).all()
    assert w.cpu()[3].item() == pytest.approx(1e-5)
    assert rel(loss, rl) < TOL[dtype] and rel(w, rw) < TOL[dtype]
    grads = tb.sid_backward(xg, yr, yf, 1.2, w, valid, f64(0.25))
    for got, want in zip(grads, ref_sid_grads(xg, yr, yf, 1.2, rw, rv, 0.25)):
        assert torch.isfinite(got).all()
        assert (got.cpu()[~rv] == 0).all()
        assert rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_sid_and_fake_forward_of_huge_fp32_inputs(scale, knobs):
    """Per-element products of fp32 inputs of size 1e20 overflow fp32 (1e40): the forward
    kernels form and sum them in float64, so loss_n / sq_n stay finite and exact."""
    knobs.SID_BLOCK, knobs.SID_TARGET_PROGRAMS = 16, 12  # several splits: finishing kernel too
    xg, yr, yf = make_sid(5, 70, torch.float64, seed=18)
    loss, w, valid = tb.sid_forward(*(t * scale for t in (xg, yr, yf)), 1.2)
    got = tb.sid_forward(*((t * scale).float() for t in (xg, yr, yf)), 1.2)
    assert bool(got[2].all()) and torch.isfinite(got[0]).all()
    assert rel(got[0], loss) < 1e-6 and rel(got[1], w) < 1e-6
    sq, _ = tb.fake_forward((yf * scale).float(), (xg * scale).float())
    want = (((yf - xg) * scale) ** 2).sum(1)
    assert torch.isfinite(sq).all() and rel(sq, want) < 1e-6


# ---------------------------------------------------------------- fake-score tests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,K", [(1, 1), (6, 67), (4, 2500)])
def test_fake(n, K, dtype, knobs):
    knobs.SID_TARGET_PROGRAMS = 16
    g = torch.Generator().manual_seed(n * K)
    y = torch.randn(n, K, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    x = torch.randn(n, K, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    if n > 3:
        y[1, K // 2] = float("nan")
        x[3, 0] = float("inf")
    sq, valid = tb.fake_forward(y, x)
    Y, X = y.double().cpu(), x.double().cpu()
    rv = torch.isfinite(Y).all(1) & torch.isfinite(X).all(1)
    rsq = torch.where(rv, ((Y - X) ** 2).sum(1), torch.zeros(n, dtype=torch.float64))
    assert sq.dtype == torch.float64 and valid.dtype == torch.bool
    assert torch.equal(valid.cpu(), rv)
    assert torch.isfinite(sq).all()
    assert rel(sq, rsq) < TOL[dtype]
    coef = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    coef = torch.where(rv, coef, torch.zeros_like(coef))
    gf, gx = tb.fake_backward(y, x, coef.to(DEVICE))
    want = torch.where(rv[:, None], 2 * coef[:, None] * (Y - X), torch.zeros_like(Y))
    assert gf.dtype == dtype and gx.dtype == dtype
    assert torch.isfinite(gf).all() and torch.isfinite(gx).all()
    assert rel(gf, want) < TOL[dtype] and rel(gx, -want) < TOL[dtype]
    # x detached (as in training): no g_x is computed or allocated
    gf2, gx2 = tb.fake_backward(y, x, coef.to(DEVICE), need_x=False)
    assert gx2 is None and torch.equal(gf2, gf)


# ------------------------------------------------------------------- availability
def test_availability_and_object():
    ok, why = tb.is_available(DEVICE)
    assert ok and isinstance(why, str)
    ok, why = tb.is_available("mps")
    assert not ok and why
    for name in ("iso_forward_sums", "iso_backward_rows", "sid_forward", "sid_backward",
                 "fake_forward", "fake_backward"):
        assert callable(getattr(tb.TRITON, name))
    if DEVICE == "cpu":
        old = os.environ.pop("TRITON_INTERPRET")
        try:
            ok, why = tb.is_available("cpu")
            assert not ok and "TRITON_INTERPRET" in why
        finally:
            os.environ["TRITON_INTERPRET"] = old


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="the CUDA run compiles the kernels anyway")
@pytest.mark.skipif(os.environ.get("GSD_TRITON_COMPILE_CHECK") != "1",
                    reason="86 variants, ~8 minutes on 2 busy cores; set GSD_TRITON_COMPILE_CHECK=1")
def test_kernels_compile_for_sm90():
    """Without a GPU: every kernel variant the launchers pick compiles for sm_90 (Triton
    frontend, MLIR lowering and ptxas), in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from gsd_kernels.backends import triton as tb\n"
            "bad = [r for r in tb.compile_check(90) if r[3]]\n"
            "print(bad)\n"
            "raise SystemExit(1 if bad else 0)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0 and "ptxas" in (res.stderr + res.stdout) and "No such file" in res.stderr:
        pytest.skip("no ptxas bundled with triton")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
