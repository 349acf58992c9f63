"""Why the one-step gmm student stops short of its teacher: two controlled replacements.

    python benchmarks/gmm_stall.py --seeds 0 1 2              # every check, ~2 min per seed and check
    python benchmarks/gmm_stall.py --only regress --iters 6000

The gmm run as it was (plain SiD, 3000 iterations) ends at a high-quality fraction of 0.92-0.95
with samples bridging neighbouring modes (results/student_vs_teacher.md). Two things could
stop it there: the generator network cannot represent a sharper map, or SiD's training
signal (the fake score f_psi learning G's distribution, and the gradient it gives) does not
ask for one. Each check below changes one of them and keeps everything else of the default run:

- `sid`: plain SiD, the default gmm run before the regression term (`--lambda-regress 0`), as
  the row the others are compared with.
- `regress`: no SiD. G (the same teacher-initialised MLP at sigma_init) is fitted by least
  squares to the exact teacher's probability-flow ODE map eps -> x (Heun, 18 steps, the exact
  mixture denoiser), with the default run's optimiser, learning rate, batch and iterations.
  What it reaches bounds what this network can represent in this many updates.
- `oracle-fake`: SiD with the fake-score network replaced by a closed-form denoiser of G's
  current samples: E[x0 | x0 + sigma n] for x0 drawn from a fresh batch of M G samples blurred
  by N(0, h^2) (a kernel density estimate, bandwidth h = --bandwidth): posterior weights
  softmax(-|x - x_i|^2 / (2 (sigma^2 + h^2))) and mean x_i + h^2 / (sigma^2 + h^2) (x - x_i).
  Without the blur (h = 0) it is the denoiser of the finite sample itself, which at
  sigma below the sample spacing snaps to the nearest sample. Everything else is the
  engine's own Distiller (its generator loss, fused ops, optimiser, EMA). This fake score has
  no lag behind G and no network error, but it has sampling noise and the blur's bias.

- `sid+regress`: SiD plus the regression of G onto fixed pairs of the exact teacher's ODE map
  (the gmm default weight and pairs, drawn as gsd.train draws them), one pair per generated
  sample as when these checks were made. Today's default draws 4 pairs per sample and runs
  12000 iterations (`--iters 12000` here gives its length, not its pair batch;
  results/gmm/regress.md).

Each result is evaluated like a run (gsd.evaluation's mixture section: 4000 samples against
the fixed true sample): sliced W2, high-quality fraction, NLL gap, mode-weight error. Writes
OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gsd.config import DATASET_DEFAULTS  # noqa: E402  (after the sys.path line above)

KEYS = ("sliced_wasserstein", "high_quality_fraction", "nll_gap", "mode_weight_error")
EVAL_SAMPLES = 4000
EVAL_SEED = 0
CHECKS = ("sid", "regress", "oracle-fake", "sid+regress")


def _setup(seed: int, cache_dir, lambda_regress: float = 0.0):
    from gsd.config import resolve_config
    from gsd.data import load_gmm
    from gsd.teachers.recipes import get_teacher
    torch.manual_seed(seed)
    dataset = load_gmm()
    teacher = get_teacher(dataset, cache_dir=cache_dir, progress=False)
    # one pair per sample: the checks compare training signals at the cost they were measured at
    cfg = resolve_config({"dataset": "gmm", "fused": True, "seed": seed, "lambda_regress": lambda_regress,
                          "regress_ratio": 1})
    return dataset, teacher, cfg


def _evaluate(generate, dataset) -> dict:
    from gsd.evaluation.metrics import evaluation_latents, mixture_section
    eps = evaluation_latents(EVAL_SEED, EVAL_SAMPLES, dataset.sample_shape, "cpu")[0]
    with torch.no_grad():
        x = generate(eps)
    m: dict = {}
    mixture_section(dataset.mixture, EVAL_SAMPLES, [(m, x)])
    return {k: float(m[k]) for k in KEYS}


def regress(seed: int, iters: int, cache_dir, log) -> dict:
    """G fitted to the exact teacher's ODE map by least squares (no SiD)."""
    from gsd.data import GMMDenoiser
    from gsd.sampling.samplers import heun_sample
    dataset, teacher, cfg = _setup(seed, cache_dir)
    exact = GMMDenoiser(dataset.mixture)
    g = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = torch.optim.Adam(g.parameters(), lr=cfg["lr"], betas=tuple(cfg["adam_betas"]))
    s = cfg["sigma_init"]

    def gen(net, eps):
        return net(s * eps, torch.full((eps.shape[0],), s))

    rng = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for it in range(iters):
        eps = torch.randn(cfg["batch"], *dataset.sample_shape, generator=rng)
        with torch.no_grad():
            target = heun_sample(exact, eps, num_steps=18)
        loss = ((gen(g, eps) - target) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % 500 == 0:
            log(f"  regress seed {seed}: {it + 1}/{iters}, squared error {float(loss.detach()):.2e}, "
                f"{time.time() - t0:.0f} s")
    g.eval()
    out = _evaluate(lambda eps: gen(g, eps), dataset)
    out["ode_map"] = _evaluate(lambda eps: heun_sample(exact, eps, num_steps=18), dataset)
    return out


def _distiller(seed: int, cache_dir, lambda_regress: float = 0.0):
    from gsd.data import GMMDenoiser
    from gsd.distill import DistillConfig, Distiller
    dataset, teacher, cfg = _setup(seed, cache_dir, lambda_regress)
    d = Distiller(GMMDenoiser(dataset.mixture), DistillConfig.from_run_config(cfg), init=teacher,
                  sample_shape=dataset.sample_shape, device="cpu")
    if lambda_regress > 0:
        d.draw_regression_pairs()  # the pairs gsd.train draws for this seed
    return dataset, d


def _train_and_evaluate(d, dataset, iters: int, log, name: str, before_step=lambda: None) -> dict:
    t0 = time.time()
    for it in range(iters):
        before_step()
        d.step()
        if (it + 1) % 500 == 0:
            log(f"  {name}: {it + 1}/{iters}, {time.time() - t0:.0f} s")
    return _evaluate(lambda eps: d.generate(eps), dataset)


def sid(seed: int, iters: int, cache_dir, log, lambda_regress: float = 0.0) -> dict:
    """Plain SiD (lambda_regress 0) or the default gmm run (SiD + regression, lambda_regress 10)."""
    dataset, d = _distiller(seed, cache_dir, lambda_regress)
    return _train_and_evaluate(d, dataset, iters, log, f"sid (lambda_regress {lambda_regress:g}) seed {seed}")


def oracle_fake(seed: int, iters: int, reference: int, bandwidth: float, cache_dir, log) -> dict:
    """SiD whose fake score is the denoiser of `reference` fresh G samples blurred by `bandwidth`."""
    dataset, d = _distiller(seed, cache_dir)
    samples: dict = {}

    def empirical_denoiser(x, sigma, labels=None):
        ref = samples["x"]
        s2 = sigma.reshape(-1, 1) ** 2
        h2 = bandwidth ** 2
        weights = torch.softmax(-((x[:, None, :] - ref[None]) ** 2).sum(-1) / (2 * (s2 + h2)), dim=1)
        mean = weights @ ref
        return mean + (h2 / (s2 + h2)) * (x - mean)

    # the generator loss calls d._call_f for y_fake; nothing is left for the fake-score step to learn
    d._call_f = empirical_denoiser
    d.fake_score_step = lambda: {"loss_fake": 0.0, "nan_samples": 0, "nan_grads": 0, "rows": 1}
    rng = torch.Generator().manual_seed(10_000 + seed)

    @torch.no_grad()
    def fresh_samples():
        d.generator.eval()  # the samples G gives at sampling time, as the fake-score step uses
        samples["x"] = d._gen(d.generator, torch.randn(reference, *dataset.sample_shape, generator=rng))

    return _train_and_evaluate(d, dataset, iters, log, f"oracle-fake seed {seed}", fresh_samples)


def _fmt(values: list, key: str) -> str:
    digits = 3 if key == "high_quality_fraction" else 4
    mean = f"{statistics.fmean(values):.{digits}f}"
    if len(values) == 1:
        return mean
    stderr = statistics.stdev(values) / len(values) ** 0.5
    return f"{mean} ± {stderr:.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def report(results: dict, iters: int) -> str:
    lines = [f"# gmm: what stops the one-step student ({iters} updates of G; `python benchmarks/gmm_stall.py`)", "",
             f"Each value: mean ± standard error over the seeds in brackets; every seed evaluated on {EVAL_SAMPLES} "
             "samples against the fixed true sample, like a run's metrics.json.", "",
             "| | seeds | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 2) + "|"]
    rows = [(check, results[check]) for check in CHECKS if check in results]
    if "regress" in results:
        rows.append(("exact ODE map (the regression target)", {s: r["ode_map"] for s, r in results["regress"].items()}))
    for name, by_seed in rows:
        seeds = sorted(by_seed, key=int)
        cells = [_fmt([by_seed[s][k] for s in seeds], k) for k in KEYS]
        lines.append(f"| {name} | {', '.join(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--iters", type=int, default=3000, help="updates of G (default: 3000, the gmm run's length when these checks were made)")
    p.add_argument("--reference", type=int, default=4096, help="G samples behind the oracle fake score")
    p.add_argument("--bandwidth", type=float, default=0.01,
                   help="blur h of the oracle fake score's sample (mode std is 0.05; default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="teacher cache (default: GSD_CACHE or ~/.cache/gsd)")
    p.add_argument("--out", default=str(REPO / "results" / "gmm" / "stall"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.iters < 1 or args.reference < 2 or any(s < 0 for s in args.seeds) or not args.bandwidth >= 0:
        p.error("--iters must be >= 1, --reference >= 2, --bandwidth >= 0 and seeds >= 0")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if out.with_suffix(".json").exists():  # add to earlier checks of the same length instead of forgetting them
        earlier = json.loads(out.with_suffix(".json").read_text())
        if earlier.get("iters") == args.iters:
            results = earlier.get("results", {})

    def log(msg):
        print(msg, flush=True)

    for check in args.only:
        for seed in args.seeds:
            log(f"[gmm_stall] {check}, seed {seed}")
            if check == "sid":
                r = sid(seed, args.iters, args.cache_dir, log)
            elif check == "sid+regress":
                r = sid(seed, args.iters, args.cache_dir, log, lambda_regress=DATASET_DEFAULTS["gmm"]["lambda_regress"])
            elif check == "regress":
                r = regress(seed, args.iters, args.cache_dir, log)
            else:
                r = oracle_fake(seed, args.iters, args.reference, args.bandwidth, args.cache_dir, log)
            results.setdefault(check, {})[str(seed)] = r
            log(f"  {json.dumps({k: round(v, 4) for k, v in r.items() if k in KEYS})}")
            out.with_suffix(".json").write_text(json.dumps({"iters": args.iters, "reference": args.reference, "bandwidth": args.bandwidth,
                                                            "results": results}, indent=1))
    text = report(results, args.iters)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
