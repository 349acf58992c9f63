"""The six native primitives (gsd_kernels._C through gsd_kernels.backends.native) against
float64 PyTorch formulas written out here (explicit pairwise differences, no Gram trick),
on fresh random inputs. CPU always; CUDA when a device is present."""

import math

import pytest
import torch

native = pytest.importorskip(
    "gsd_kernels.backends.native", reason="gsd_kernels._C is not built", exc_type=ImportError
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    ),
]


def prims(device):
    if device == "cuda" and not native.is_available("cuda")[0]:
        pytest.skip(native.is_available("cuda")[1])
    return native.CUDA if device == "cuda" else native.CPU


def rel(a, b):
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    nb = b.norm().item()
    return (a - b).norm().item() / (nb if nb > 0 else 1.0)


def tol(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-10


# ---------------------------------------------------------------- isometry oracle
def iso_oracle(x, z, r0, r1, c0, c1, inv_two_h2, p, q, r, s):
    """Sums and row gradients of docs/design.md, from explicit differences in float64."""
    x = x.double().cpu()
    z = z.double().cpu()
    ex = x[r0:r1, None, :] - x[None, c0:c1, :]
    ez = z[r0:r1, None, :] - z[None, c0:c1, :]
    d2 = (ex * ex).sum(-1)
    e2 = (ez * ez).sum(-1)
    rows = torch.arange(r0, r1)[:, None]
    cols = torch.arange(c0, c1)[None, :]
    pair = (rows != cols).double()
    delta = d2.sqrt()
    dz = e2.sqrt()
    w = torch.exp(-e2 * inv_two_h2) * pair
    sums = torch.stack([w.sum(), (w * d2).sum(), (w * delta * dz).sum(), (w * e2).sum()])
    inv_d = torch.where(delta > 0, 1.0 / delta.clamp_min(1e-300), torch.zeros_like(delta))
    inv_z = torch.where(dz > 0, 1.0 / dz.clamp_min(1e-300), torch.zeros_like(dz))
    a = w * (p * delta + q * dz) * inv_d
    b = w * (r * dz + s * delta) * inv_z
    gx = (a[:, :, None] * ex).sum(1)
    gz = (b[:, :, None] * ez).sum(1)
    return sums, gx, gz


def centred(n, k, dtype, device, offset=0.0):
    t = torch.randn(n, k, dtype=torch.float64) + offset
    t = (t - t.mean(0)).to(dtype)
    return t.to(device)


def f64(v, device):
    """A 0-dim float64 tensor on the device: how the contract passes inv_two_h2 and scale."""
    return torch.full((), float(v), dtype=torch.float64, device=device)


def coef4(pqrs, device):
    return torch.tensor(pqrs, dtype=torch.float64).to(device)


def run_iso(P, x, z, ranges, inv_two_h2, pqrs=(0.7, -1.3, 0.4, -0.9), need_x=True, need_z=True):
    xn2 = (x * x).sum(1)
    zn2 = (z * z).sum(1)
    r0, r1, c0, c1 = ranges
    h = f64(inv_two_h2, x.device)
    sums = P.iso_forward_sums(x, z, xn2, zn2, r0, r1, c0, c1, h)
    gx, gz = P.iso_backward_rows(x, z, xn2, zn2, r0, r1, c0, c1, h, coef4(pqrs, x.device),
                                 need_x=need_x, need_z=need_z)
    return sums, gx, gz


ISO_CASES = [
    # N, D, d, ranges (None = full square), inv_two_h2
    (2, 3, 1, None, 0.0),
    (37, 67, 3, None, 0.0),
    (131, 300, 67, None, 0.0),
    (257, 1, 3, None, 0.0),
    (131, 67, 300, (5, 40, 0, 131), 0.0),
    (257, 300, 67, (100, 257, 0, 257), 0.0),
    (200, 33, 17, (0, 200, 60, 150), 0.0),
    (400, 20, 9, (0, 400, 0, 400), 0.0),
    (600, 7, 5, None, 0.0),
    (600, 7, 5, (50, 590, 10, 600), 0.02),
    (131, 67, 3, None, 0.05),
    (257, 3, 67, (5, 40, 0, 257), 0.01),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,D,d,ranges,h", ISO_CASES)
def test_iso_primitives(device, dtype, N, D, d, ranges, h):
    P = prims(device)
    x = centred(N, D, dtype, device)
    z = centred(N, d, dtype, device)
    ranges = ranges or (0, N, 0, N)
    if h > 0:  # scale the bandwidth to the data so that the weights are not all ~0 or ~1
        h = h * 2.0 / d
    pqrs = (0.7, -1.3, 0.4, -0.9)
    sums, gx, gz = run_iso(P, x, z, ranges, h, pqrs)
    ref_s, ref_gx, ref_gz = iso_oracle(x, z, *ranges, h, *pqrs)
    assert sums.dtype == torch.float64 and sums.shape == (4,)
    assert gx.dtype == dtype and gx.shape == (ranges[1] - ranges[0], D)
    assert gz.dtype == dtype and gz.shape == (ranges[1] - ranges[0], d)
    assert sums.device.type == device and gx.device.type == device
    for c in range(4):
        assert abs(sums[c].item() - ref_s[c].item()) <= tol(dtype) * abs(ref_s[c].item()) + 1e-12
    assert rel(gx, ref_gx) < tol(dtype)
    assert rel(gz, ref_gz) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iso_duplicates_give_zero_coefficient(device, dtype):
    P = prims(device)
    N, D, d = 41, 13, 5
    x = torch.randn(N, D, dtype=torch.float64)
    z = torch.randn(N, d, dtype=torch.float64)
    x[7] = x[3]  # delta_37 = 0: a_37 = 0
    x[20] = x[3]
    z[11] = z[30]  # dz = 0: b = 0
    x = (x - x.mean(0)).to(dtype).to(device)
    z = (z - z.mean(0)).to(dtype).to(device)
    pqrs = (1.1, 0.6, -0.3, 0.8)
    sums, gx, gz = run_iso(P, x, z, (0, N, 0, N), 0.0, pqrs)
    ref_s, ref_gx, ref_gz = iso_oracle(x, z, 0, N, 0, N, 0.0, *pqrs)
    assert torch.isfinite(gx).all() and torch.isfinite(gz).all()
    assert rel(sums, ref_s) < tol(dtype)
    assert rel(gx, ref_gx) < tol(dtype)
    assert rel(gz, ref_gz) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_iso_all_identical_points(device):
    P = prims(device)
    x = torch.zeros(9, 4, device=device)
    z = centred(9, 3, torch.float32, device)
    sums, gx, gz = run_iso(P, x, z, (0, 9, 0, 9), 0.0)
    assert sums[1].item() == 0.0 and sums[2].item() == 0.0
    assert sums[0].item() == 72.0  # 9 * 8 ordered pairs, w = 1
    assert torch.all(gx == 0)
    ref_s, _, ref_gz = iso_oracle(x, z, 0, 9, 0, 9, 0.0, 0.7, -1.3, 0.4, -0.9)
    assert rel(gz, ref_gz) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_iso_large_offset_after_centring(device):
    # The Python layer centres the batch; the kernels must then be accurate in fp32.
    P = prims(device)
    x = centred(150, 96, torch.float32, device, offset=50.0)
    z = centred(150, 24, torch.float32, device, offset=-30.0)
    sums, gx, gz = run_iso(P, x, z, (0, 150, 0, 150), 0.0)
    ref_s, ref_gx, ref_gz = iso_oracle(x, z, 0, 150, 0, 150, 0.0, 0.7, -1.3, 0.4, -0.9)
    assert rel(sums, ref_s) < 1e-4
    assert rel(gx, ref_gx) < 1e-4 and rel(gz, ref_gz) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_iso_empty_ranges(device):
    P = prims(device)
    x = centred(10, 4, torch.float64, device)
    z = centred(10, 3, torch.float64, device)
    sums, gx, gz = run_iso(P, x, z, (3, 3, 0, 10), 0.0)
    assert torch.all(sums == 0) and gx.shape == (0, 4)
    sums, gx, gz = run_iso(P, x, z, (2, 6, 4, 4), 0.0)
    assert torch.all(sums == 0) and torch.all(gx == 0) and torch.all(gz == 0)
    # A single row against itself only: no pair.
    sums, gx, gz = run_iso(P, x, z, (4, 5, 4, 5), 0.0)
    assert torch.all(sums == 0) and torch.all(gx == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_iso_row_blocks_add_up(device):
    # Distributed use: the rows of the full square, split over "ranks", give the same sums
    # and the same gradient rows as one call (up to rounding).
    P = prims(device)
    N = 230
    x = centred(N, 50, torch.float64, device)
    z = centred(N, 20, torch.float64, device)
    full_s, full_gx, full_gz = run_iso(P, x, z, (0, N, 0, N), 0.01)
    parts = [(0, 77), (77, 150), (150, N)]
    s = sum(run_iso(P, x, z, (a, b, 0, N), 0.01)[0] for a, b in parts)
    gx = torch.cat([run_iso(P, x, z, (a, b, 0, N), 0.01)[1] for a, b in parts])
    assert rel(s, full_s) < 1e-12
    assert rel(gx, full_gx) < 1e-12


# ---------------------------------------------------------------- SiD oracle
def sid_oracle(xg, yr, yf, alpha, scale):
    xg, yr, yf = (t.double().cpu() for t in (xg, yr, yf))
    valid = torch.isfinite(xg).all(1) & torch.isfinite(yr).all(1) & torch.isfinite(yf).all(1)
    w = (xg - yr).abs().mean(1).clamp_min(1e-5)
    w = torch.where(valid, w, torch.ones_like(w))
    a = yr - yf
    b = yr - xg
    loss = (a * (b - alpha * a)).sum(1) / w
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    c = torch.where(valid, scale / w, torch.zeros_like(w))[:, None]
    a = torch.where(valid[:, None], a, torch.zeros_like(a))
    b = torch.where(valid[:, None], b, torch.zeros_like(b))
    g_real = c * (b + (1 - 2 * alpha) * a)
    g_fake = -c * (b - 2 * alpha * a)
    g_xg = -c * a
    return loss, w, valid, g_xg, g_real, g_fake


def sid_inputs(N, K, dtype, device, bad_rows=()):
    xg = torch.randn(N, K, dtype=torch.float64)
    yr = xg + 0.3 * torch.randn(N, K, dtype=torch.float64)
    yf = xg + 0.3 * torch.randn(N, K, dtype=torch.float64)
    ts = [xg, yr, yf]
    for i, (row, which, val) in enumerate(bad_rows):
        ts[which][row, (7 * i) % K] = val
    return [t.to(dtype).to(device) for t in ts]


SID_CASES = [(1, 1), (2, 3), (37, 67), (5, 20000), (131, 300)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,K", SID_CASES)
@pytest.mark.parametrize("alpha", [1.2, 0.5, 1.0])
def test_sid_primitives(device, dtype, N, K, alpha):
    P = prims(device)
    xg, yr, yf = sid_inputs(N, K, dtype, device)
    scale = 0.37
    loss, w, valid = P.sid_forward(xg, yr, yf, alpha)
    g = P.sid_backward(xg, yr, yf, alpha, w, valid, f64(scale, device))
    ref = sid_oracle(xg, yr, yf, alpha, scale)
    assert loss.dtype == torch.float64 and w.dtype == torch.float64 and valid.dtype == torch.bool
    assert valid.all()
    assert rel(loss, ref[0]) < tol(dtype)
    assert rel(w, ref[1]) < tol(dtype)
    for got, want in zip(g, ref[3:]):
        assert got.dtype == dtype and got.shape == (N, K)
        assert rel(got, want) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [5, 9000])
def test_sid_invalid_rows(device, dtype, K):
    P = prims(device)
    N = 6
    bad = [(1, 0, float("nan")), (3, 1, float("inf")), (4, 2, -float("inf"))]
    xg, yr, yf = sid_inputs(N, K, dtype, device, bad)
    loss, w, valid = P.sid_forward(xg, yr, yf, 1.2)
    assert valid.cpu().tolist() == [True, False, True, False, False, True]
    assert torch.all(loss[~valid] == 0) and torch.all(w[~valid] == 1)
    g = P.sid_backward(xg, yr, yf, 1.2, w, valid, f64(0.5, device))
    ref = sid_oracle(xg, yr, yf, 1.2, 0.5)
    assert rel(loss, ref[0]) < tol(dtype)
    for got, want in zip(g, ref[3:]):
        assert torch.isfinite(got).all()
        assert torch.all(got[~valid] == 0)
        assert rel(got, want) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sid_weight_floor(device):
    P = prims(device)
    xg = torch.randn(3, 10, dtype=torch.float64, device=device)
    yr = xg.clone()
    yr[1] += 1e-9  # mean |x_g - y_real| below 1e-5
    yf = xg + 0.1
    loss, w, valid = P.sid_forward(xg, yr, yf, 1.2)
    assert torch.all(w == 1e-5)
    ref = sid_oracle(xg, yr, yf, 1.2, 1.0)
    assert rel(loss, ref[0]) < 1e-12


# ---------------------------------------------------------------- fake-score oracle
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,K", SID_CASES)
def test_fake_primitives(device, dtype, N, K):
    P = prims(device)
    yf = torch.randn(N, K, dtype=torch.float64)
    x = torch.randn(N, K, dtype=torch.float64)
    if N >= 2:
        yf[N // 2, K // 2] = float("nan")
    if N >= 5:
        x[4, 0] = float("inf")
    yf_d, x_d = yf.to(dtype).to(device), x.to(dtype).to(device)
    sq, valid = P.fake_forward(yf_d, x_d)
    ok = torch.isfinite(yf_d.double().cpu()).all(1) & torch.isfinite(x_d.double().cpu()).all(1)
    diff = yf_d.double().cpu() - x_d.double().cpu()
    want_sq = torch.where(ok, (diff * diff).sum(1), torch.zeros(N, dtype=torch.float64))
    assert sq.dtype == torch.float64 and valid.dtype == torch.bool
    assert valid.cpu().tolist() == ok.tolist()
    assert torch.all(sq.cpu()[~ok] == 0)
    assert rel(sq, want_sq) < tol(dtype)
    coef = torch.rand(N, dtype=torch.float64) * ok.double()
    g_fake, g_x = P.fake_backward(yf_d, x_d, coef.to(device), need_x=True)
    diff0 = torch.where(ok[:, None], diff, torch.zeros_like(diff))
    want = 2 * coef[:, None] * diff0
    assert g_fake.dtype == dtype and g_x.dtype == dtype
    assert torch.isfinite(g_fake).all() and torch.isfinite(g_x).all()
    assert rel(g_fake, want) < tol(dtype)
    assert rel(g_x, -want) < tol(dtype)


# ---------------------------------------------------------------- plumbing
def test_availability_reports():
    ok, reason = native.is_available("cpu")
    assert ok and reason == ""
    ok, reason = native.is_available("cuda")
    if not ok:
        assert reason
    ok, reason = native.is_available("mps")
    assert not ok and "mps" in reason


def test_cpu_thread_count_does_not_change_results():
    x = centred(300, 40, torch.float64, "cpu")
    z = centred(300, 10, torch.float64, "cpu")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s1, gx1, gz1 = run_iso(native.CPU, x, z, (0, 300, 0, 300), 0.0)
        torch.set_num_threads(2)
        s2, gx2, gz2 = run_iso(native.CPU, x, z, (0, 300, 0, 300), 0.0)
    finally:
        torch.set_num_threads(old)
    # Deterministic schedule: bitwise equal whatever the thread count.
    assert torch.equal(s1, s2) and torch.equal(gx1, gx2) and torch.equal(gz1, gz2)
    assert not math.isnan(s1.sum().item())


# ---------------------------------------------------------------- in-kernel centring (CPU)
def run_iso_means(P, x, z, ranges, inv_two_h2, pqrs=(0.7, -1.3, 0.4, -0.9)):
    """The primitives on uncentred rows plus column means; the norms are left to the kernel."""
    mx, mz = x.mean(0), z.mean(0)
    r0, r1, c0, c1 = ranges
    h = f64(inv_two_h2, x.device)
    sums = P.iso_forward_sums(x, z, None, None, r0, r1, c0, c1, h, mean_x=mx, mean_z=mz)
    gx, gz = P.iso_backward_rows(x, z, None, None, r0, r1, c0, c1, h, coef4(pqrs, x.device),
                                 need_x=True, need_z=True, mean_x=mx, mean_z=mz)
    return sums, gx, gz


def test_cpu_centres_in_kernel_flag():
    assert native.CPU.centres_in_kernel is True
    assert native.CUDA.centres_in_kernel is False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,D,d,ranges,h", ISO_CASES)
def test_iso_primitives_with_means(device, dtype, N, D, d, ranges, h):
    # Uncentred rows (a large common offset) with their column means: the same results as the
    # oracle on the rows themselves (distances are translation invariant).
    P = prims(device)
    x = (torch.randn(N, D, dtype=torch.float64) + 50.0).to(dtype).to(device)
    z = (torch.randn(N, d, dtype=torch.float64) - 30.0).to(dtype).to(device)
    ranges = ranges or (0, N, 0, N)
    if h > 0:
        h = h * 2.0 / d
    pqrs = (0.7, -1.3, 0.4, -0.9)
    sums, gx, gz = run_iso_means(P, x, z, ranges, h, pqrs)
    ref_s, ref_gx, ref_gz = iso_oracle(x, z, *ranges, h, *pqrs)
    assert gx.dtype == dtype and gx.shape == (ranges[1] - ranges[0], D)
    assert gz.dtype == dtype and gz.shape == (ranges[1] - ranges[0], d)
    for c in range(4):
        assert abs(sums[c].item() - ref_s[c].item()) <= tol(dtype) * abs(ref_s[c].item()) + 1e-12
    assert rel(gx, ref_gx) < tol(dtype)
    assert rel(gz, ref_gz) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_iso_means_duplicates_and_empty_ranges(device):
    P = prims(device)
    N, D, d = 41, 13, 5
    x = torch.randn(N, D, dtype=torch.float64) + 7.0
    z = torch.randn(N, d, dtype=torch.float64)
    x[7] = x[3]
    z[11] = z[30]
    x, z = x.float().to(device), z.float().to(device)
    pqrs = (1.1, 0.6, -0.3, 0.8)
    sums, gx, gz = run_iso_means(P, x, z, (0, N, 0, N), 0.0, pqrs)
    ref_s, ref_gx, ref_gz = iso_oracle(x, z, 0, N, 0, N, 0.0, *pqrs)
    assert torch.isfinite(gx).all() and torch.isfinite(gz).all()
    assert rel(sums, ref_s) < 1e-4 and rel(gx, ref_gx) < 1e-4 and rel(gz, ref_gz) < 1e-4
    sums, gx, gz = run_iso_means(P, x, z, (2, 6, 4, 4), 0.0)
    assert torch.all(sums == 0) and torch.all(gx == 0) and torch.all(gz == 0)
    sums, gx, gz = run_iso_means(P, x, z, (3, 3, 0, N), 0.0)
    assert torch.all(sums == 0) and gx.shape == (0, D)


@pytest.mark.parametrize("ranges", [(0, 421, 0, 421), (30, 421, 0, 400), (0, 421, 200, 230)])
def test_cpu_thread_count_does_not_change_results_with_means(ranges):
    # In-kernel centring and norms, gradients accumulated in the output buffers (full tiles)
    # and in the tail accumulator (421 rows: a partial last tile): still bitwise deterministic.
    x = torch.randn(421, 70) + 3.0
    z = torch.randn(421, 20) - 1.0
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s1, gx1, gz1 = run_iso_means(native.CPU, x, z, ranges, 0.01)
        torch.set_num_threads(2)
        s2, gx2, gz2 = run_iso_means(native.CPU, x, z, ranges, 0.01)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(s1, s2) and torch.equal(gx1, gx2) and torch.equal(gz1, gz2)
    ref_s, ref_gx, ref_gz = iso_oracle(x, z, *ranges, 0.01, 0.7, -1.3, 0.4, -0.9)
    assert rel(s1, ref_s) < 1e-4 and rel(gx1, ref_gx) < 1e-4 and rel(gz1, ref_gz) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_iso_means_match_centred_call(device):
    # Given the same centring, the kernels' own norms agree with the caller's to rounding.
    P = prims(device)
    x = torch.randn(300, 40, dtype=torch.float64, device=device) + 5.0
    z = torch.randn(300, 10, dtype=torch.float64, device=device)
    a = run_iso_means(P, x, z, (0, 300, 0, 300), 0.02)
    b = run_iso(P, x - x.mean(0), z - z.mean(0), (0, 300, 0, 300), 0.02)
    for u, v in zip(a, b):
        assert rel(u, v) < 1e-12
