"""GPU accuracy and hygiene checks of the fused ops at the benchmark shapes (one short run).

    python benchmarks/gpu_accuracy.py            # on a GPU (gpu_session.sh stage `accuracy`)
    python benchmarks/gpu_accuracy.py --variants # + Triton dot-precision x tile-preset timings
    python benchmarks/gpu_accuracy.py --small    # tiny shapes; runs on CPU (dry run, no GPU)

Sections, each line printed as soon as it is known (a run killed at its cap keeps them):
  accuracy  fp32 `triton` (each dot precision: tf32x3, tf32) and `cuda` against a float64
            evaluation: relative error of the loss and of every gradient, target 1e-4,
            at N=2048 D=d=3072 (randn, +50 offset), N=1024 with duplicates, N=512
            D=d=12288, N=8192 D=d=3072 (forward), odd N with small dims, N=2; SiD and
            fake-score at N=1024, 3x64x64 with a non-finite sample.
  syncs     host synchronisations per fwd+bwd (torch.cuda.set_sync_debug_mode), for the
            public ops and for the Triton primitives alone; bit-identical rerun.
  graphs    torch.compile(mode="reduce-overhead") of a small distillation-like step with
            the fused ops (isometry + SiD + fake score): captured and replayed, against
            eager, and whether cudagraphs were skipped.
  variants  (--variants) isometry fwd+bwd at N=8192 D=d=3072 with z needing no gradient
            (training), per Triton DOT_PRECISION x TILES preset: median ms and the
            error of gx against float64.
Lines start with OK / FAIL / INFO / SKIP; the exit code is 1 when any line is FAIL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gsd_kernels  # noqa: E402

TARGET = 1e-4
FAILS = []


def say(status, msg):
    if status == "FAIL":
        FAILS.append(msg)
    print(f"{status:4s} {msg}", flush=True)


def num(t):
    return float(t.detach())


def rel(a, b, floor=0.0):
    """Relative error; against `floor` where the exact value is (nearly) 0 (N = 2)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


class Setup:
    def __init__(self, small):
        self.gpu = torch.cuda.is_available() and not small
        self.dev = torch.device("cuda" if self.gpu else "cpu")
        avail = gsd_kernels.available_backends(self.dev)
        # interpreted Triton on CPU only when asked for (TRITON_INTERPRET=1): a dry run
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        self.backends = [b for b in avail if b != "reference" and (self.gpu or b != "triton" or interp)]
        self.tb = self.tknobs = None
        if "triton" in self.backends:
            from gsd_kernels.backends import triton as triton_backend
            from gsd_kernels.backends.triton import common as triton_knobs
            self.tb, self.tknobs = triton_backend, triton_knobs

    def variants(self):
        """(label, backend, triton dot precision or None) of the fused fp32 runs."""
        out = []
        for be in self.backends:
            if be == "triton":
                out += [("triton/tf32x3", be, "tf32x3"), ("triton/tf32", be, "tf32")]
            else:
                out.append((be, be, None))
        return out

    def sync(self):
        if self.gpu:
            torch.cuda.synchronize()


class dot_precision:  # noqa: N801 - a context manager
    def __init__(self, setup, prec):
        self.tknobs, self.prec = setup.tknobs, prec

    def __enter__(self):
        if self.prec is not None:
            self.old, self.tknobs.DOT_PRECISION = self.tknobs.DOT_PRECISION, self.prec

    def __exit__(self, *exc):
        if self.prec is not None:
            self.tknobs.DOT_PRECISION = self.old


# -------------------------------------------------------------------------- accuracy
def iso_case(S, N, D, d, kind="randn", grads=True, floor=0.0, groups=None):
    g = torch.Generator(device=S.dev).manual_seed(N + D + d)
    x = torch.randn(N, D, device=S.dev, dtype=torch.float64, generator=g)
    z = torch.randn(N, d, device=S.dev, dtype=torch.float64, generator=g)
    if kind == "offset":
        x = x + 50.0
    if kind == "dup":
        x[1] = x[0]
        x[3] = x[2]
        z[5] = z[4]
    x64, z64 = x.clone().requires_grad_(grads), z.clone().requires_grad_(grads)
    L0 = gsd_kernels.isometry_loss(x64, z64, groups=groups, backend="reference")
    g0 = torch.autograd.grad(L0, (x64, z64)) if grads else None
    tag = "" if groups is None else f" g={groups}"
    L0 = num(L0)
    for label, be, prec in S.variants():
        xs, zs = x.float().requires_grad_(grads), z.float().requires_grad_(grads)
        try:
            with dot_precision(S, prec):
                S.sync()
                t = time.perf_counter()
                L = gsd_kernels.isometry_loss(xs, zs, groups=groups, backend=be)
                g = torch.autograd.grad(L, (xs, zs)) if grads else None
                S.sync()
                dt = time.perf_counter() - t
        except Exception as e:  # report and go on with the next backend
            say("FAIL", f"iso N={N} D={D} d={d}{tag} {kind} {label}: {type(e).__name__}: {e}")
            continue
        eL = abs(num(L) - L0) / max(abs(L0), floor, 1e-300)
        msg = f"iso N={N} D={D} d={d}{tag} {kind:6s} {label:14s} L={L0:.3e} relL={eL:.1e}"
        errs = [eL]
        if grads:
            ex, ez = rel(g[0], g0[0], floor), rel(g[1], g0[1], floor)
            errs += [ex, ez]
            finite = bool(torch.isfinite(g[0]).all() and torch.isfinite(g[1]).all())
            msg += f" gx={ex:.1e} gz={ez:.1e}"
        else:
            finite = True
        ok = max(errs) < TARGET and finite
        say("OK" if ok else "FAIL", f"{msg} ({dt * 1e3:.1f} ms incl. first-call JIT)")


def sid_case(S, N, C, H, W):
    g = torch.Generator(device=S.dev).manual_seed(N)
    xg, yr, yf = (torch.randn(N, C, H, W, device=S.dev, dtype=torch.float64, generator=g)
                  for _ in range(3))
    yr = xg + 0.3 * yr
    yf = yr + 0.2 * yf
    xg[3 % N, 0, 0, 0] = float("nan")
    ins64 = [t.clone().requires_grad_() for t in (xg, yr, yf)]
    L0 = gsd_kernels.sid_generator_loss(*ins64, backend="reference")
    g0 = torch.autograd.grad(L0, ins64)
    sigma = torch.exp(torch.randn(N, device=S.dev, dtype=torch.float64, generator=g) - 1)
    f64 = [yf.clone().requires_grad_(), xg.clone().requires_grad_(), sigma.clone().requires_grad_()]
    F0 = gsd_kernels.fake_score_loss(*f64, backend="reference")
    h0 = torch.autograd.grad(F0, f64)
    for be in S.backends:
        ins = [t.float().requires_grad_() for t in (xg, yr, yf)]
        L = gsd_kernels.sid_generator_loss(*ins, backend=be)
        gr = torch.autograd.grad(L, ins)
        e = [abs(num(L) - num(L0)) / abs(num(L0))] + [rel(a, b) for a, b in zip(gr, g0)]
        ok = max(e) < TARGET and all(bool(torch.isfinite(t).all()) for t in gr)
        say("OK" if ok else "FAIL", f"sid  N={N} {C}x{H}x{W} {be:7s} rel L/gxg/greal/gfake = "
            + " ".join(f"{v:.1e}" for v in e))
        fi = [t.float().requires_grad_() for t in f64]
        F = gsd_kernels.fake_score_loss(*fi, backend=be)
        hr = torch.autograd.grad(F, fi)
        e = [abs(num(F) - num(F0)) / abs(num(F0))] + [rel(a, b) for a, b in zip(hr, h0)]
        ok = max(e) < TARGET and all(bool(torch.isfinite(t).all()) for t in hr)
        say("OK" if ok else "FAIL", f"fake N={N} {C}x{H}x{W} {be:7s} rel L/gfake/gx/gsigma = "
            + " ".join(f"{v:.1e}" for v in e))


# ---------------------------------------------------------------- syncs, determinism
def count_syncs(S, fn):
    """Host synchronisations torch reports while fn runs (sync-debug 'warn' mode)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(m.message).lower() for m in w), out


def syncs_and_determinism(S):
    if not S.gpu:
        say("SKIP", "syncs / determinism: no GPU")
        return
    dev = S.dev
    x = torch.randn(2048, 3072, device=dev, requires_grad=True)
    z = torch.randn(2048, 3072, device=dev, requires_grad=True)
    a, b, c = (torch.randn(256, 3, 32, 32, device=dev, requires_grad=True) for _ in range(3))
    sig = torch.rand(256, device=dev) + 0.1
    for be in S.backends:
        cases = (
            ("isometry", lambda: torch.autograd.grad(gsd_kernels.isometry_loss(x, z, backend=be), (x, z))),
            ("grouped", lambda: torch.autograd.grad(
                gsd_kernels.isometry_loss(x, z, weighting="local", groups=4, backend=be), (x, z))),
            ("sid", lambda: torch.autograd.grad(gsd_kernels.sid_generator_loss(a, b, c, backend=be), (a, b, c))),
            ("fake", lambda: torch.autograd.grad(gsd_kernels.fake_score_loss(a, b, sig, backend=be), (a, b))),
        )
        for name, fn in cases:
            try:
                n, r1 = count_syncs(S, fn)
                r2 = fn()
                same = all(torch.equal(p, q) for p, q in zip(r1, r2))
            except Exception as e:
                say("FAIL", f"syncs {name} {be}: {type(e).__name__}: {e}")
                continue
            say("OK" if n == 0 and same else "FAIL",
                f"syncs {name:8s} {be:7s} op fwd+bwd: host syncs = {n}, bit-identical rerun = {same}")
    if S.tb is None:
        return
    tb = S.tb  # the primitives alone (what this backend controls, whatever ops.py does)
    xc, zc = (x - x.mean(0)).detach(), (z - z.mean(0)).detach()
    a, b, c = a.detach(), b.detach(), c.detach()
    xn2, zn2 = (xc * xc).sum(1), (zc * zc).sum(1)
    h = torch.zeros((), dtype=torch.float64, device=dev)
    cf = torch.tensor([1e-9, -2e-9, 1e-9, -2e-9], dtype=torch.float64, device=dev)
    n = xc.shape[0]
    sc = torch.tensor(0.5, dtype=torch.float64, device=dev)

    def prims():
        tb.iso_forward_sums(xc, zc, xn2, zn2, 0, n, 0, n, h)
        tb.iso_backward_rows(xc, zc, xn2, zn2, 0, n, 0, n, h, cf, need_x=True, need_z=False)
        ln, wn, vn = tb.sid_forward(a, b, c, 1.2)
        tb.sid_backward(a, b, c, 1.2, wn, vn, sc)
        sq, v = tb.fake_forward(a, b)
        tb.fake_backward(a, b, wn, need_x=False)
        return ()

    k, _ = count_syncs(S, prims)
    say("OK" if k == 0 else "FAIL", f"syncs triton primitives (all six): host syncs = {k}")


# --------------------------------------------------------------------- graph capture
def graphs(S):
    if not S.gpu:
        say("SKIP", "torch.compile(mode='reduce-overhead') capture: no GPU")
        return
    from torch._dynamo.utils import counters

    dev = S.dev
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(),
                              torch.nn.Linear(256, 3 * 16 * 16)).to(dev)
    fake = torch.nn.Linear(3 * 16 * 16, 3 * 16 * 16).to(dev)

    def step(zl, sigma):
        x = gen(zl)
        y_real = x.detach() + 0.1 * torch.tanh(x.detach())
        y_fake = fake(x)
        loss = gsd_kernels.sid_generator_loss(x, y_real, y_fake.detach())
        loss = loss + gsd_kernels.isometry_loss(x, zl)
        loss = loss + gsd_kernels.fake_score_loss(fake(x.detach()), x.detach(), sigma)
        return loss

    zl = torch.randn(256, 64, device=dev)
    sigma = torch.rand(256, device=dev) + 0.2
    params = list(gen.parameters()) + list(fake.parameters())

    def run(fn):
        loss = fn(zl, sigma)
        grads = torch.autograd.grad(loss, params)
        return loss.detach().clone(), [g.clone() for g in grads]

    try:
        ref_loss, ref_grads = run(step)
        counters.clear()
        compiled = torch.compile(step, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            out_loss, out_grads = run(compiled)
        torch.cuda.synchronize()
    except Exception as e:
        say("FAIL", f"graphs reduce-overhead step: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return
    skips = dict(counters.get("inductor", {}))
    skipped = {k: v for k, v in skips.items() if "cudagraph_skip" in k}
    e = max([rel(out_loss, ref_loss)] + [rel(a, b) for a, b in zip(out_grads, ref_grads)])
    say("OK" if e < 1e-4 and not skipped else "FAIL",
        f"graphs reduce-overhead distillation-like step: max rel err vs eager {e:.1e}, "
        f"cudagraph skips {skipped or 0}")


# ------------------------------------------------------------------------- variants
def variants(S, N=8192, D=3072):
    if not S.gpu or S.tb is None:
        say("SKIP", "triton variants: needs a GPU and the triton backend")
        return
    import triton.testing

    dev = S.dev
    x = torch.randn(N, D, device=dev, requires_grad=True)
    z = torch.randn(N, D, device=dev)  # the latent: no gradient, as in training
    x64 = x.detach().double().requires_grad_()
    gx0 = torch.autograd.grad(gsd_kernels.isometry_loss(x64, z.double(), backend="reference"), x64)[0]
    del x64
    knobs = S.tknobs  # the package's tuning knobs live in its common module
    old = (knobs.DOT_PRECISION, knobs.TILES)
    try:
        # most informative first: a new precision compiles three kernels, a new preset one
        for prec, tiles in (("tf32x3", "default"), ("tf32", "default"), ("tf32", "tall"),
                            ("tf32", "wide"), ("tf32:tf32x3", "default"), ("tf32x3", "tall")):
            if tiles not in knobs.TILE_PRESETS:
                continue
            knobs.DOT_PRECISION, knobs.TILES = prec, tiles

            def fn():
                return torch.autograd.grad(gsd_kernels.isometry_loss(x, z, backend="triton"), x)[0]
            try:
                gx = fn()
                ms = triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")
            except Exception as e:
                say("FAIL", f"variant dot={prec} tiles={tiles}: {type(e).__name__}: {e}")
                continue
            err = rel(gx, gx0)
            say("INFO" if err < TARGET else "FAIL",
                f"variant iso fwd+bwd N={N} D=d={D} need_z=False dot={prec:12s} "
                f"tiles={tiles:7s}: {ms:7.2f} ms, gx rel err {err:.1e}")
    finally:
        knobs.DOT_PRECISION, knobs.TILES = old


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (runs on CPU)")
    ap.add_argument("--variants", action="store_true", help="also time Triton variants")
    ap.add_argument("--only-variants", action="store_true", help="only the variant timings")
    args = ap.parse_args(argv)
    S = Setup(args.small)
    info = torch.cuda.get_device_name(S.dev) if S.gpu else "cpu"
    say("INFO", f"device {info}, backends {S.backends}, torch {torch.__version__}")
    def section(fn, *a, **k):  # one section's crash is a FAIL line, not the end of the run
        try:
            fn(S, *a, **k)
        except Exception as e:
            say("FAIL", f"{fn.__name__}{a}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        if S.gpu:
            torch.cuda.empty_cache()

    if args.only_variants:
        section(variants)
    elif args.small:
        section(iso_case, 256, 96, 80)
        section(iso_case, 65, 3, 70, "dup")
        section(iso_case, 2, 1, 1, floor=1e-2)
        section(iso_case, 256, 96, 80, "offset", groups=4)
        section(iso_case, 65, 3, 70, "dup", groups=5)
        section(sid_case, 8, 3, 8, 8)
        section(syncs_and_determinism)
        section(graphs)
    else:
        section(iso_case, 2048, 3072, 3072)
        section(iso_case, 2048, 3072, 3072, "offset")
        section(iso_case, 1024, 3072, 3072, "dup")
        section(iso_case, 512, 12288, 12288)
        section(syncs_and_determinism)
        section(graphs)
        section(sid_case, 1024, 3, 64, 64)
        section(iso_case, 4097, 20, 3)  # odd N, small dims: direct / flash-style paths
        section(iso_case, 2, 1, 1, floor=1e-2)
        section(iso_case, 8192, 3072, 3072, grads=False)
        section(iso_case, 4096, 3072, 3072, "offset", groups=4)
        section(iso_case, 16384, 3072, 3072, groups=4)
        section(iso_case, 4095, 20, 3, "dup", groups=5)
        section(iso_case, 2, 1, 1, floor=1e-2, groups=2)
        if args.variants:
            section(variants)
    print(f"== {len(FAILS)} FAIL line(s)", flush=True)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
