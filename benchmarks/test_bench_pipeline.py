"""Pipeline benchmarks (docs/definitions.md §3.6 latency, §4 protocol): whole networks, not single ops.

    pytest benchmarks/test_bench_pipeline.py --benchmark-only       # full grid for this device
    pytest benchmarks/test_bench_pipeline.py --benchmark-disable    # smoke: smallest case, run once

(a) `test_sampling`: the one-step generator G(z) = D(sigma_init z; sigma_init) (1 NFE) vs
    the 35-NFE Heun teacher (EDM, 18 steps), batch 64, same network and device. The
    teacher/one-step time ratio and the inference-time reduction (1 - t_one / t_teacher)
    are written to the extra_info of both rows.
(b) `test_distill_iteration`: one full SiD + IRL iteration (fake-score step + generator
    step, lambda_irl = 1) with the fused ops (backend="auto") vs the reference ops, same
    networks and batch; extra_info holds images/s and the reference/fused ratio.
(c) `test_distill_iteration_options`: one iteration across precision / compile / checkpointing.
(d) `test_irl_iteration_cost`: one iteration with each form of the isometric term (neighbour
    groups, random pairs, the JVP estimator) against the same batch without it (plain SiD);
    extra_info holds the time ratio (the neighbour estimator's target is <= 1.3x).

Networks have random weights (timing does not depend on them). Cases: the digits default
network (`default_config("digits", (1, 8, 8), 10)`, class-conditional) everywhere; EDM's
32x32 DDPM++ (55.7M parameters) only on CUDA (one forward at batch 64 takes minutes on a
small CPU). FLOPs are counted with torch.utils.flop_counter over one call (network
matmuls/convolutions; the fused loss ops are not counted); bytes are a lower bound: the
weights read once per network evaluation plus the input read and output written.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time

import pytest
import torch

from bench_utils import PeakMemory, device_under_test, smoke_only, sync

DEVICE = device_under_test()
BATCH = 64
SIGMA_INIT = 2.5
HEUN_STEPS = 18  # 2 * 18 - 1 = 35 network evaluations

CASES = {"cpu": ["digits8"], "cuda": ["digits8", "ddpmpp32"]}


def _cases(config):
    cases = CASES[DEVICE.type]
    return cases[:1] if smoke_only(config) else cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", _cases(metafunc.config))
    if "option" in metafunc.fixturenames:  # (c) below
        metafunc.parametrize("option", _option_params(metafunc.config))


@functools.lru_cache(maxsize=None)
def _network(case: str):
    from gsd.models.networks import build_denoiser, default_config, edm_ddpmpp_config

    torch.manual_seed(0)
    if case == "digits8":
        cfg = default_config("digits", (1, 8, 8), 10)
        shape = (1, 8, 8)
    elif case == "ddpmpp32":
        cfg = edm_ddpmpp_config(32, 3, label_dim=0)
        shape = (3, 32, 32)
    else:
        raise ValueError(case)
    net = build_denoiser(cfg).to(DEVICE).eval().requires_grad_(False)
    return net, shape


def _inputs(case):
    net, shape = _network(case)
    eps = torch.randn(BATCH, *shape, device=DEVICE)
    labels = torch.randint(0, net.label_dim, (BATCH,), device=DEVICE) if net.label_dim else None
    return net, shape, eps, labels


def _param_bytes(net) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _median(benchmark):
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(stats.stats.median)


def _manual_median(fn, rounds: int) -> tuple[float, float]:
    """The same protocol as the benchmarked rows (warm-up, synchronised), for a missing partner row:
    (median wall seconds, median CPU seconds)."""
    fn()
    sync(DEVICE)
    times, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(DEVICE)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


def _run(benchmark, fn, *, rounds):
    """Warm up outside the timing, then time synchronised calls.

    Also returns the process CPU time of each timed call (all threads): on a shared CPU the
    wall time includes waiting for other jobs, the CPU time much less so; both are recorded.
    """
    cpu = []

    def timed():
        c0 = time.process_time()
        fn()
        sync(DEVICE)
        cpu.append(time.process_time() - c0)
    if not getattr(benchmark, "disabled", False):  # smoke run: the single call is all there is
        timed()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    return statistics.median(cpu[-rounds:]) if cpu and DEVICE.type == "cpu" else None


# rows of the same case, so that both rows of a pair get the ratio: {(test, case): {variant: (median, info)}}
_ROWS: dict = {}


def _pair(key, variant, median, cpu, info, partner, partner_fn, partner_rounds):
    """{variant: (wall median, cpu median, extra_info or None)} of a case, both variants present."""
    rows = _ROWS.setdefault(key, {})
    rows[variant] = (median, cpu, info)
    if partner not in rows:  # the partner row was not selected (-k): time it here, same protocol
        rows[partner] = (*_manual_median(partner_fn, partner_rounds), None)
    return rows


# ----------------------------------------------------------------------- (a) sampling

def _sampler(variant, net, eps, labels):
    from gsd.sampling.samplers import heun_sample

    if variant == "one_step":
        sig = torch.full((eps.shape[0],), SIGMA_INIT, device=eps.device)
        return lambda: net(SIGMA_INIT * eps, sig, labels)
    return lambda: heun_sample(net, eps, labels, num_steps=HEUN_STEPS)


@pytest.mark.parametrize("variant", ["one_step", "heun35"])
def test_sampling(benchmark, record, request, case, variant):
    net, shape, eps, labels = _inputs(case)
    nfe = 1 if variant == "one_step" else 2 * HEUN_STEPS - 1
    raw = _sampler(variant, net, eps, labels)

    def fn():
        with torch.no_grad():
            return raw()

    if smoke_only(request.config):  # one call, nothing measured beyond it
        flops = peak = -1
    else:
        fn()
        flops = _count_flops(fn)
        peak = PeakMemory(DEVICE).measure(fn)
    rounds = 20 if variant == "one_step" else 5
    cpu = _run(benchmark, fn, rounds=rounds)
    in_bytes = eps.numel() * eps.element_size()
    record(op="sampling", variant=variant, shape=(BATCH, *shape), dtype=eps.dtype, flops=flops,
           bytes_moved=nfe * (_param_bytes(net) + 2 * in_bytes), peak_extra_bytes=peak,
           backends={})  # sampling runs the network only, none of the loss ops
    info = benchmark.extra_info
    info.update(case=case, batch=BATCH, nfe=nfe, params=sum(p.numel() for p in net.parameters()),
                label_dim=net.label_dim)
    median = _median(benchmark)
    if median is None:  # --benchmark-disable: nothing was timed
        return
    info["images_per_s"] = BATCH / median
    partner = "heun35" if variant == "one_step" else "one_step"
    partner_raw = _sampler(partner, net, eps, labels)

    def partner_fn():
        with torch.no_grad():
            partner_raw()

    info["cpu_time_median_s"] = cpu
    rows = _pair(("sampling", case), variant, median, cpu, info, partner, partner_fn,
                 20 if partner == "one_step" else 3)
    (t_one, c_one, _), (t_teacher, c_teacher, _) = rows["one_step"], rows["heun35"]
    for *_, row_info in rows.values():
        if row_info is not None:
            row_info["teacher_over_one_step"] = t_teacher / t_one
            row_info["inference_time_reduction_pct"] = 100.0 * (1.0 - t_one / t_teacher)
            if c_one and c_teacher:  # CPU device only
                row_info["teacher_over_one_step_cpu_time"] = c_teacher / c_one
            row_info["one_step_median_s"] = t_one
            row_info["teacher_median_s"] = t_teacher


# ----------------------------------------------------------------------- (b) one distillation iteration

def _distiller(case, backend):
    from gsd.distill import DistillConfig, Distiller

    net, shape = _network(case)
    torch.manual_seed(1)
    cfg = DistillConfig(batch=BATCH, lambda_irl=1.0, lr=1e-5, backend=backend, seed=0, ema_halflife=0.0)
    teacher = copy.deepcopy(net)
    return Distiller(teacher, cfg, init=teacher, sample_shape=shape, device=DEVICE)


VARIANT_BACKEND = {"fused": "auto", "reference": "reference"}


@pytest.mark.parametrize("variant", ["fused", "reference"])
def test_distill_iteration(benchmark, record, request, case, variant):
    d = _distiller(case, VARIANT_BACKEND[variant])
    _, shape = _network(case)
    if smoke_only(request.config):  # one call, nothing measured beyond it
        flops = peak = -1
    else:
        d.step()  # warm-up (autotuning / compilation / allocator) outside the timing
        flops = _count_flops(d.step)
        peak = PeakMemory(DEVICE).measure(d.step)
    cpu = _run(benchmark, d.step, rounds=5)
    nets = _param_bytes(d.generator)
    in_bytes = BATCH * int(torch.tensor(shape).prod()) * 4
    # network evaluations per iteration: fake step G fwd, f_psi fwd+bwd; generator step G fwd+bwd,
    # f_phi and f_psi fwd+bwd (input gradients) -> ~8 passes over one network's weights
    record(op="distill_iteration", variant=variant, shape=(BATCH, *shape), dtype=torch.float32, flops=flops,
           bytes_moved=8 * (nets + 2 * in_bytes), peak_extra_bytes=peak,
           backends=_resolved_backends(VARIANT_BACKEND[variant]))
    info = benchmark.extra_info
    info.update(case=case, batch=BATCH, backend=VARIANT_BACKEND[variant], lambda_irl=1.0,
                resolved_backend=_resolved_backend(VARIANT_BACKEND[variant]), images_per_iteration=2 * BATCH)
    median = _median(benchmark)
    if median is None:
        return
    info["generator_images_per_s"] = BATCH / median
    info["images_per_s"] = 2 * BATCH / median  # fake-score batch + generator batch
    partner = "reference" if variant == "fused" else "fused"
    d_partner = _distiller(case, VARIANT_BACKEND[partner])
    info["cpu_time_median_s"] = cpu
    rows = _pair(("distill", case), variant, median, cpu, info, partner, d_partner.step, 3)
    (t_fused, c_fused, _), (t_ref, c_ref, _) = rows["fused"], rows["reference"]
    for *_, row_info in rows.values():
        if row_info is not None:
            row_info["reference_over_fused"] = t_ref / t_fused
            if c_ref and c_fused:  # CPU device only
                row_info["reference_over_fused_cpu_time"] = c_ref / c_fused
            row_info["fused_median_s"] = t_fused
            row_info["reference_median_s"] = t_ref


def _resolved_backend(name: str) -> str:
    from gsd_kernels import backends

    return backends.resolve(name, DEVICE)


def _resolved_backends(name: str) -> dict:
    """{op: backend} that the distillation step's loss ops run with `backend=name`."""
    import gsd_kernels

    return gsd_kernels.resolved_backends(DEVICE, backend=name)


# ------------------------------------------- (c) one iteration across the scale-out options

# name -> DistillConfig options. The first is the baseline of issue 5's GPU target (eager fp32
# with the reference ops); "bf16+compile" is the configuration that target measures.
OPTIONS = {
    "reference-fp32": dict(backend="reference", precision="fp32", compile=False),
    "fp32": dict(backend="auto", precision="fp32", compile=False),
    "bf16": dict(backend="auto", precision="bf16", compile=False),
    "fp32+checkpoint": dict(backend="auto", precision="fp32", compile=False, grad_checkpoint=True),
    "fp32+compile": dict(backend="auto", precision="fp32", compile=True),
    "bf16+compile": dict(backend="auto", precision="bf16", compile=True),
}
BASELINE = "reference-fp32"


def _option_params(config):
    """Every option on the fused ops plus the eager reference baseline; compiling three networks
    takes minutes on a CPU, so the smoke run keeps the eager variants only."""
    names = list(OPTIONS)
    if smoke_only(config):
        names = [n for n in names if not OPTIONS[n]["compile"]]
    return names


def _options_distiller(case, name):
    from gsd.distill import DistillConfig, Distiller

    net, shape = _network(case)
    torch.manual_seed(1)
    cfg = DistillConfig(batch=BATCH, lambda_irl=1.0, lr=1e-5, seed=0, ema_halflife=0.0, **OPTIONS[name])
    teacher = copy.deepcopy(net)
    d = Distiller(teacher, cfg, init=teacher, sample_shape=shape, device=DEVICE)
    d.step()  # compilation and warm-up outside the timing
    return d


def _autograd_saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward during fn (summed over its backward
    passes): a device-independent view of activation memory, which a CPU's resident-set peak
    does not show. Gradient checkpointing keeps only the inputs of each recomputed block."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_distill_iteration_options(benchmark, record, request, case, option):
    d = _options_distiller(case, option)
    shape = d.sample_shape
    peak = -1 if smoke_only(request.config) else PeakMemory(DEVICE).measure(d.step)
    # compiled graphs save their tensors inside the graph, out of the hooks' sight
    saved = -1 if OPTIONS[option]["compile"] else _autograd_saved_bytes(d.step)
    cpu = _run(benchmark, d.step, rounds=5)
    record(op="distill_iteration_options", variant=option, shape=(BATCH, *shape), dtype=torch.float32, flops=-1,
           bytes_moved=-1, peak_extra_bytes=peak, backends=_resolved_backends(OPTIONS[option]["backend"]))
    median = _median(benchmark)
    if median is None:
        return
    info = benchmark.extra_info
    info.update(case=case, batch=BATCH, images_per_s=2 * BATCH / median, peak_extra_mib=peak / 2 ** 20,
                autograd_saved_mib=saved / 2 ** 20 if saved >= 0 else None)
    timed_before = _ROWS.get(("options", case), {})
    partner_fn = None if option == BASELINE or BASELINE in timed_before else _options_distiller(case, BASELINE).step
    rows = _pair(("options", case), option, median, cpu, info, BASELINE, partner_fn, 3)
    base = rows[BASELINE][0]
    for variant, (t, _cpu, row_info) in rows.items():
        if row_info is not None:  # images/s relative to eager fp32 with the reference ops
            row_info[f"speedup_vs_{BASELINE}"] = base / t


# ------------------------------------------- (d) the isometric and adversarial terms' cost per iteration

# name -> DistillConfig settings of the terms; "sid" (neither) is the baseline. The neighbour
# estimator's target: at most 1.3x the lambda-0 iteration (same batch of 64 samples); SiDA's
# (issue 23): at most 1.5x, its fake-score step scoring real images in the same pass.
_SIDA = dict(lambda_adv=0.5, adv_g_warmup=0, adv_mix_warmup=0, alpha=1.0)
IRL_VARIANTS = {
    "sid": dict(lambda_irl=0.0, irl_neighbours=0),
    "neighbours": dict(lambda_irl=0.1, irl_neighbours=1),
    "neighbours3": dict(lambda_irl=0.1, irl_neighbours=3),
    "pairs": dict(lambda_irl=0.1, irl_neighbours=0),
    "jvp": dict(lambda_irl_raw=0.1, irl_estimator="jvp"),
    "sida": dict(lambda_irl=0.0, irl_neighbours=0, **_SIDA),
    "neighbours3+sida": dict(lambda_irl=0.1, irl_neighbours=3, **_SIDA),
}
IRL_BASELINE = "sid"


class _RealImages:
    """Stand-in real data for SiDA's discriminator: uniform images in [-1, 1] (and labels), from
    the run's generator, as gsd.data.RealSamples draws them (their values do not change the cost)."""

    def __init__(self, shape, num_classes):
        self.shape, self.num_classes = shape, num_classes

    def sample(self, n, generator, device):
        x = torch.rand((n, *self.shape), generator=generator, device=generator.device) * 2 - 1
        labels = (torch.randint(0, self.num_classes, (n,), generator=generator, device=generator.device)
                  if self.num_classes else None)
        return x.to(device), None if labels is None else labels.to(device)


def _irl_distiller(case, name):
    from gsd.distill import DistillConfig, Distiller

    net, shape = _network(case)
    torch.manual_seed(1)
    cfg = DistillConfig(batch=BATCH, lr=1e-5, seed=0, ema_halflife=0.0, backend="auto", **IRL_VARIANTS[name])
    teacher = copy.deepcopy(net)
    real = _RealImages(shape, net.label_dim) if cfg.lambda_adv > 0 else None
    d = Distiller(teacher, cfg, init=teacher, sample_shape=shape, device=DEVICE, real_data=real)
    d.step()  # warm-up outside the timing
    return d


@pytest.mark.parametrize("irl", list(IRL_VARIANTS))
def test_irl_iteration_cost(benchmark, record, request, case, irl):
    d = _irl_distiller(case, irl)
    cpu = _run(benchmark, d.step, rounds=5)
    record(op="irl_iteration", variant=irl, shape=(BATCH, *d.sample_shape), dtype=torch.float32, flops=-1,
           bytes_moved=-1, peak_extra_bytes=-1, backends=_resolved_backends("auto"))
    median = _median(benchmark)
    if median is None:
        return
    info = benchmark.extra_info
    info.update(case=case, batch=BATCH, settings={k: v for k, v in IRL_VARIANTS[irl].items()},
                cpu_time_median_s=cpu)
    timed_before = _ROWS.get(("irl", case), {})
    partner_fn = None if irl == IRL_BASELINE or IRL_BASELINE in timed_before else _irl_distiller(case, IRL_BASELINE).step
    rows = _pair(("irl", case), irl, median, cpu, info, IRL_BASELINE, partner_fn, 5)
    base, base_cpu = rows[IRL_BASELINE][0], rows[IRL_BASELINE][1]
    for variant, (t, c, row_info) in rows.items():
        if row_info is not None:  # cost of the iteration relative to the same batch without the term
            row_info[f"time_over_{IRL_BASELINE}"] = t / base
            if c and base_cpu:
                row_info[f"cpu_time_over_{IRL_BASELINE}"] = c / base_cpu
