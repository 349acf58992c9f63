"""How much of the local factor defect on shapes a pixel-space isometric term can reach, and how
much of it is the factor regressor's own error.

    python benchmarks/shapes_pixel_factor.py RUN_DIR [RUN_DIR ...] --out results/shapes/pixel_vs_factor

The local defects (docs/definitions.md §2.1, §3.6) are all one quantity: 1 - cos^2 of the angle
between two vectors of within-group distances (the grouped optimal-scale loss, global weighting).
For a run's local-isometry groups (the evaluation's anchors, seed 0, K = 3 neighbours at each
`--latent-radii` radius; 0.5 is the evaluation's), with latents z, G's images x and their
regressed factors f, it reports:

- `local_factor_defect` = defect(f, z) (at radius 0.5 the evaluation's figure) and
  `local_pixel_defect` = defect(x, z);
- `factor_vs_pixel_defect` = defect(f, x): the factor defect G would have if it were an exact
  pixel isometry with the same images. Angles obey the triangle inequality, so
  theta(f, z) >= |theta(f, x) - theta(x, z)| (theta = arcsin sqrt(defect));
  `bound_at_this_pixel_defect` is that lower bound;
- `regressor_floor`: groups of a factor anchor and K neighbours at the factor distance G's
  neighbours have (the median regressed anchor-to-neighbour distance, unit factors), rendered
  by the data set's own renderer; the defect of the regressor's factors against the true ones.
  An exact factor isometry would read about this much; `renderer_defect` is the defect of
  pixels against true factors on the same groups.

Writes OUT.json (every figure, per run and radius) and OUT.png (factor defect against
lambda_irl per kinds and radius, with the floor and the exact-pixel-isometry points).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/shapes_pixel_factor.py", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="evaluated shapes run directories")
    p.add_argument("--out", required=True, help="output path without suffix (.json and .png are written)")
    p.add_argument("--latent-radii", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                   help="neighbour radii in latent space (0.5: the evaluation's local-isometry figures)")
    p.add_argument("--anchors", type=int, default=512, help="factor anchors of the renderer's groups")
    return p.parse_args(argv)


def defect(a, b, groups: int) -> float:
    """The grouped optimal-scale local defect between two maps' rows (float64, reference backend)."""
    import gsd_kernels
    import torch

    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    return float(gsd_kernels.isometry_loss(a, b, groups=groups, weighting="global", scale="optimal",
                                           backend="reference"))


def angle(d: float) -> float:
    return math.asin(math.sqrt(min(max(d, 0.0), 1.0)))


def lower_bound(defect_fx: float, defect_xz: float) -> float:
    """The least defect(f, z) allowed by the triangle inequality of angles, given defect(f, x) and
    defect(x, z)."""
    return math.sin(max(0.0, angle(defect_fx) - angle(defect_xz))) ** 2


def run_figures(d: Path, latent_radii: list, anchors: int) -> dict:
    """A run's local defects on the evaluation's anchors (seed 0) at each latent radius, with the
    renderer's figures at the factor distance G's neighbours actually have there."""
    import torch

    from gsd.evaluation.core import load_run
    from gsd.evaluation.factors import factor_regressor, regress
    from gsd.evaluation.geometry import LOCAL_ISOMETRY, neighbour_latents
    from gsd.evaluation.metrics import evaluation_latents
    from gsd.seed_ranges import LOCAL_DIRECTION_SEED, LOCAL_ISOMETRY_SEED_OFFSET

    run = load_run(d, device="cpu")
    if run.config.get("dataset") != "shapes":
        raise SystemExit(f"error: {d} is a {run.config.get('dataset')} run; this needs shapes runs")
    resolution, kinds = int(run.sample_shape[-1]), int(run.config.get("shapes_kinds") or 1)
    regressor = factor_regressor(resolution, kinds, device=run.device)[0]
    k, g = LOCAL_ISOMETRY["neighbours"], LOCAL_ISOMETRY["neighbours"] + 1
    a, labels = evaluation_latents(0, LOCAL_ISOMETRY["anchors"], run.sample_shape, run.device, run.num_classes,
                                   offset=LOCAL_ISOMETRY_SEED_OFFSET)
    lab = None if labels is None else labels.repeat_interleave(g)
    per_radius = []
    for radius in latent_radii:
        z = neighbour_latents(a, neighbours=k, radius=radius, seed=LOCAL_DIRECTION_SEED)
        with torch.no_grad():
            x = run.generator(z.to(torch.float32), lab)
            f, _ = regress(regressor, x)
        d_fz, d_xz, d_fx = defect(f, z, g), defect(x, z, g), defect(f, x, g)
        fs = f.reshape(-1, g, f.shape[1]).double()
        median = float(torch.cdist(fs, fs)[:, 0, 1:].median())  # anchor-to-neighbour factor distance
        render = renderer_figures(regressor, kinds, median, anchors, resolution, neighbours=k)
        per_radius.append({"latent_radius": radius, "local_factor_defect": d_fz, "local_pixel_defect": d_xz,
                           "factor_vs_pixel_defect": d_fx, "bound_at_this_pixel_defect": lower_bound(d_fx, d_xz),
                           "median_neighbour_factor_distance": median,
                           "regressor_floor": render["regressor_floor"], "renderer_defect": render["renderer_defect"]})
    return {"run": d.name, "kinds": kinds, "lambda_irl": run.config.get("lambda_irl"),
            "irl_neighbours": run.config.get("irl_neighbours"), "seed": run.config.get("seed"),
            "radii": per_radius}


def renderer_figures(regressor, kinds: int, radius: float, anchors: int, resolution: int, *,
                     neighbours: int) -> dict:
    """Groups of a factor anchor and K = `neighbours` neighbours at `radius` in unit factor space
    (one kind per group; K as in G's groups), rendered: the local defect of pixels against true factors, and of the regressor's
    factors against true factors (its floor at this neighbourhood size)."""
    import torch

    from gsd import shapes
    from gsd.evaluation.factors import regress

    gen = torch.Generator().manual_seed(0)
    k = neighbours
    unit = torch.rand(anchors, 1, len(shapes.FACTORS), generator=gen, dtype=torch.float64) * (1 - 2 * radius) + radius
    u = torch.randn(anchors, k, len(shapes.FACTORS), generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=2, keepdim=True)
    groups = torch.cat([unit, unit + radius * u], 1).reshape(-1, len(shapes.FACTORS))  # stays inside the box
    kind = torch.randint(0, kinds, (anchors,), generator=gen).repeat_interleave(k + 1)
    x = shapes.render(shapes.denormalise(groups), kind, resolution)
    with torch.no_grad():
        f, _ = regress(regressor, x)
    return {"kinds": kinds, "radius": radius, "anchors": anchors,
            "renderer_defect": defect(x, groups, k + 1), "regressor_floor": defect(f, groups, k + 1)}


def plot(runs: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds_list = sorted({r["kinds"] for r in runs})
    radii = [e["latent_radius"] for e in runs[0]["radii"]]
    fig, axes = plt.subplots(len(kinds_list), len(radii), figsize=(4.0 * len(radii), 3.5 * len(kinds_list)),
                             squeeze=False)
    for row, kinds in zip(axes, kinds_list):
        rows = [r for r in runs if r["kinds"] == kinds]
        for j, (ax, radius) in enumerate(zip(row, radii)):
            def at(r, key):
                return next(e[key] for e in r["radii"] if e["latent_radius"] == radius)
            curve = [r for r in rows if r["irl_neighbours"]]
            plain = [r for r in rows if not r["irl_neighbours"]]
            lams = sorted({r["lambda_irl"] for r in curve})
            for key, style, label in (("local_factor_defect", "o", "local factor defect"),
                                      ("factor_vs_pixel_defect", "^", "same images, exact pixel isometry")):
                ax.plot([r["lambda_irl"] for r in curve], [at(r, key) for r in curve], style, color="C0",
                        mfc="C0" if style == "o" else "none", alpha=0.6, ms=4)
                means = [sum(at(r, key) for r in curve if r["lambda_irl"] == lam)
                         / sum(1 for r in curve if r["lambda_irl"] == lam) for lam in lams]
                ax.plot(lams, means, "-" if style == "o" else ":", color="C0", lw=1, label=label)
            if plain:
                ax.axhline(sum(at(r, "local_factor_defect") for r in plain) / len(plain), color="red", ls="--", lw=1,
                           label=f"plain SiD (mean of {len(plain)})")
            floor = sum(at(r, "regressor_floor") for r in rows) / len(rows)
            ax.axhspan(0, floor, color="grey", alpha=0.2, label="regressor's floor")
            dist = sum(at(r, "median_neighbour_factor_distance") for r in rows) / len(rows)
            ax.set_xscale("symlog", linthresh=0.1)
            ax.margins(x=0.08)
            ax.set_ylim(0, 1)
            ax.set_xlabel("lambda_irl")
            ax.set_title(f"{kinds} kind{'s' if kinds > 1 else ''}, latent radius {radius:g} "
                         f"(factor distance ~{dist:.3f})", fontsize=8)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("local defect in factors")
                ax.legend(fontsize=6.5)
    fig.suptitle("shapes: local factor defect against the isometric weight, the regressor's floor, and what an "
                 "exact pixel isometry with the same images would give", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(2)
    runs = []
    for d in args.runs:
        r = run_figures(Path(d), args.latent_radii, args.anchors)
        runs.append(r)
        print(f"{r['run']} ({r['kinds']} kinds): " + "; ".join(
            f"radius {e['latent_radius']:g}: factor {e['local_factor_defect']:.3f}, pixel "
            f"{e['local_pixel_defect']:.3f}, exact-pixel-isometry {e['factor_vs_pixel_defect']:.3f}, "
            f"floor {e['regressor_floor']:.3f}" for e in r["radii"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "command": "python benchmarks/shapes_pixel_factor.py "
                                                    + " ".join(sys.argv[1:])}, indent=1))
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
