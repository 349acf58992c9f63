"""Ahead-of-time check: compile every kernel variant the launchers can pick for an NVIDIA
target without a GPU (``compile_check``), with ptxas's register / spill report."""

from __future__ import annotations

import os

import torch

from . import common
from .common import _FIN_ROWS, _FIN_SPLITS, _INTERPRET_AT_IMPORT, _close_tol, triton
from .iso import _DIRECT, _DOT, _FMA, _bk_of

if triton is not None:
    from .iso_kernels import (_iso_apply_kernel, _iso_bwd_small_kernel, _iso_coef_kernel,
                              _iso_fwd_kernel, _iso_grouped_bwd_kernel,
                              _iso_grouped_fwd_kernel)
    from .sid_kernels import (_fake_bwd_kernel, _fake_fin_kernel, _fake_fwd_kernel,
                              _sid_bwd_kernel, _sid_fin_kernel, _sid_fwd_kernel)


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory of one kernel, from `ptxas -v` (the ptxas
    bundled with triton) on the PTX triton generated."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    m = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE)
    gpu = m.group(1) if m else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    out = {}
    for key, pat in (("regs", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                     ("spill_loads", r"(\d+) bytes spill loads"), ("stack", r"(\d+) bytes stack frame")):
        found = re.findall(pat, log)
        out[key] = max(int(v) for v in found) if found else None
    return out


def compile_variants(dtypes=("fp32", "fp64")):
    """(kernel, constexprs, dtype, num_warps, num_stages) of every variant the launchers
    can pick: all modes, every TILE_PRESETS entry, each fp32 dot precision choice."""
    out = []
    for dt in dtypes:
        tol = _close_tol(torch.float32 if dt == "fp32" else torch.float64)
        precs = ("tf32x3", "tf32", "ieee") if dt == "fp32" else ("ieee",)
        for prec in precs:
            bk = 32
            # large-batch Gram path: the preset tables
            seen = set()
            for preset in common.TILE_PRESETS.values():
                fbm, fbk, fnw, fns = preset["fwd"]
                key = ("fwd", preset["fwd"])
                if key not in seen:
                    seen.add(key)
                    out.append((_iso_fwd_kernel, dict(SYM=True, BM=fbm, BN=fbm, BKX=fbk, BKZ=fbk,
                                MODE_X=_DOT, MODE_Z=_DOT, DOT_PREC=prec, TOL=tol), dt, fnw, fns))
                cbm, cbn, cbk, cnw, cns = preset["coef"]
                for need in ((True, True), (True, False)):
                    key = ("coef", preset["coef"], need)
                    if key not in seen:
                        seen.add(key)
                        out.append((_iso_coef_kernel, dict(BM=cbm, BN=cbn, BKX=cbk, BKZ=cbk,
                                    MODE_X=_DOT, MODE_Z=_DOT, DOT_PREC=prec, TOL=tol,
                                    NEED_A=need[0], NEED_B=need[1]), dt, cnw, cns))
                abm, abc, abd, anw, ans = preset["apply"]
                key = ("apply", preset["apply"])
                if key not in seen:
                    seen.add(key)
                    out.append((_iso_apply_kernel, dict(BM=abm, BC=abc, BD=abd, MODE=_DOT,
                                                        DOT_PREC=prec), dt, anw, ans))
            if prec != precs[0]:
                continue  # the small-batch / small-dim variants once per dtype
            for mx, mz in ((_DOT, _DOT), (_DIRECT, _DOT), (_DOT, _DIRECT), (_FMA, _FMA),
                           (_DIRECT, _DIRECT)):
                bkx = _bk_of(3 if mx == _DIRECT else 99, mx, bk)
                bkz = _bk_of(3 if mz == _DIRECT else 99, mz, bk)
                out.append((_iso_fwd_kernel, dict(SYM=True, BM=32, BN=32, BKX=bkx, BKZ=bkz,
                            MODE_X=mx, MODE_Z=mz, DOT_PREC=prec, TOL=tol), dt, 4, 3))
                out.append((_iso_coef_kernel, dict(BM=32, BN=32, BKX=bkx, BKZ=bkz, MODE_X=mx,
                            MODE_Z=mz, DOT_PREC=prec, TOL=tol, NEED_A=True, NEED_B=True),
                            dt, 4, 3))
                if _FMA not in (mx, mz):
                    bm = 32 if (mx, mz) == (_DOT, _DOT) else 16
                    for need in ((True, True), (True, False)):
                        out.append((_iso_bwd_small_kernel,
                                    dict(BM=bm, BN=bm, DPX=64 if mx == _DOT else 16,
                                         DPZ=64 if mz == _DOT else 4, MODE_X=mx, MODE_Z=mz,
                                         DOT_PREC=prec, TOL=tol, NEED_X=need[0],
                                         NEED_Z=need[1]), dt, 8, 3))
            out.append((_iso_fwd_kernel, dict(SYM=False, BM=32, BN=32, BKX=32, BKZ=8,
                        MODE_X=_DOT, MODE_Z=_DIRECT, DOT_PREC=prec, TOL=tol), dt, 4, 3))
            for mode, bc, bd in ((_DOT, 32, 64), (_FMA, 8, 32), (_DIRECT, 8, 16)):
                out.append((_iso_apply_kernel, dict(BM=32, BC=bc, BD=bd, MODE=mode,
                                                    DOT_PREC=prec), dt, 4, 3))
            for bkx, bkz in ((1024, 16), (64, 16)):  # grouped pairs: images, small dims
                out.append((_iso_grouped_fwd_kernel, dict(BKX=bkx, BKZ=bkz), dt, 4, 3))
                for need in ((True, True), (True, False)):
                    out.append((_iso_grouped_bwd_kernel, dict(BKX=bkx, BKZ=bkz, NEED_X=need[0],
                                                              NEED_Z=need[1]), dt, 4, 3))
            for fn in (_sid_fwd_kernel, _fake_fwd_kernel):
                for final in (True, False):
                    out.append((fn, dict(BLOCK=common.SID_BLOCK, FINAL=final), dt, 4, 3))
            out.append((_sid_bwd_kernel, dict(BLOCK=common.SID_BLOCK), dt, 4, 3))
            for need in (True, False):
                out.append((_fake_bwd_kernel, dict(BLOCK=common.SID_BLOCK, NEED_X=need), dt, 4, 3))
            for fn in (_sid_fin_kernel, _fake_fin_kernel):
                out.append((fn, dict(BR=_FIN_ROWS, BS=_FIN_SPLITS), dt, 4, 3))
    return out


# pointer arguments that are float64 whatever the input dtype, and the bool ones
_F64_PTRS = {"h_ptr", "coef_ptr", "scale_ptr", "w_ptr", "loss_ptr", "sq_ptr", "c_ptr"}
_BOOL_PTRS = {"valid_ptr"}


def compile_check(arch: int = 90, dtypes=("fp32", "fp64"), verbose: bool = False,
                  report: bool = False, only=None):
    """Compile every kernel variant the launchers can pick for an NVIDIA target without
    a GPU (needs triton's bundled ptxas; must run without TRITON_INTERPRET). Returns a
    list of (kernel, dtype, config, error-or-None, usage) where usage holds ptxas's
    registers / spill bytes when `report` is set. `only`: a predicate on (kernel name,
    constexprs) to compile a subset."""
    if triton is None or _INTERPRET_AT_IMPORT:
        raise RuntimeError("compile_check needs triton without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", int(arch), 32)
    out = []
    for fn, consts, dt, nw, ns in compile_variants(dtypes):
        if only is not None and not only(fn.__name__, consts):
            continue
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in _F64_PTRS or name == "part_ptr":
                sig[name] = "*fp64"
            elif name in _BOOL_PTRS:
                sig[name] = "*i1"
            elif name.endswith("_ptr"):
                sig[name] = f"*{dt}"
            elif name in ("a0", "a1", "a2"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        err, usage = None, {}
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                               options={"num_warps": nw, "num_stages": ns})
            if report:
                usage = _ptxas_usage(k.asm["ptx"], arch)
                usage["smem"] = k.metadata.shared
        except Exception as e:  # report, keep going
            err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        cfg = dict(consts, num_warps=nw, num_stages=ns)
        out.append((fn.__name__, dt, cfg, err, usage))
        if verbose:
            print(out[-1], flush=True)
    return out
