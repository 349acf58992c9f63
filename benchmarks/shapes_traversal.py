"""Latent traversals of shapes runs: G's images along its top principal latent directions, next
to the teacher's Heun map along the same directions, with the factor each direction moves.

    python benchmarks/shapes_traversal.py RUN_DIR [RUN_DIR ...] --out results/shapes/traversal.png

For each run, at `--anchors` latents (the evaluation's local-isometry anchors, seed 0), the top
`--directions` right-singular vectors v of G's Jacobian (gsd.evaluation.factors, as traversal
purity takes them) give rows G(z + t v) and Heun_35(z + t v) for t in [-T, T]. Each G row is
titled with the factor the factor regressor sees change most along it and the share of the
change on that factor (the direction's traversal purity at this anchor). The figure is what the
traversal purity figure summarises; it is for looking, not a metric.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/shapes_traversal.py", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="shapes run directories (one block of rows each)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--anchors", type=int, default=1)
    p.add_argument("--directions", type=int, default=3)
    p.add_argument("--span", type=float, default=2.0, help="T: the latent moves from -T to T along each unit direction")
    p.add_argument("--steps", type=int, default=9, help="images per row")
    p.add_argument("--teacher-steps", type=int, default=18, help="Heun steps of the teacher's map (35 NFE at 18)")
    return p.parse_args(argv)


def traversal_rows(run, regressor, *, anchors: int, directions: int, span: float, steps: int, teacher_steps: int):
    """[(title, G images (steps, C, H, W), teacher images)] for each anchor and direction."""
    import torch

    from gsd import shapes
    from gsd.evaluation.factors import principal_directions, regress
    from gsd.evaluation.metrics import evaluation_latents
    from gsd.sampling.samplers import heun_sample
    from gsd.seed_ranges import LOCAL_ISOMETRY_SEED_OFFSET

    z_all, labels = evaluation_latents(0, anchors, run.sample_shape, run.device, run.num_classes,
                                       offset=LOCAL_ISOMETRY_SEED_OFFSET)
    ts = torch.linspace(-span, span, steps, dtype=z_all.dtype)
    rows = []
    for a in range(anchors):
        z = z_all[a:a + 1]
        lab = None if labels is None else labels[a:a + 1]
        v, _ = principal_directions(run.generator, z, directions, lab)
        for r in range(directions):
            d = v[r].to(z.dtype).reshape(1, *z.shape[1:])
            zs = z + ts.reshape(-1, *[1] * (z.dim() - 1)) * d
            lr = None if lab is None else lab.expand(steps)
            with torch.no_grad():
                g = run.generator(zs, lr)
                t = heun_sample(run.teacher, zs, lr, num_steps=teacher_steps)
                f, _ = regress(regressor, g[[0, -1]])
            c = (f[1] - f[0]) ** 2
            i = int(c.argmax())
            purity = float(c[i] / c.sum()) if float(c.sum()) > 0 else float("nan")
            rows.append((f"anchor {a}, direction {r + 1}: {shapes.FACTORS[i]} ({purity:.2f})", g, t))
    return rows


def plot(blocks: list, path: Path, span: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gsd.evaluation.plots import image_grid

    n_rows = sum(2 * len(rows) for _, rows in blocks)
    fig, axes = plt.subplots(n_rows, 1, figsize=(7.5, 0.95 * n_rows + 0.6), squeeze=False)
    k = 0
    for name, rows in blocks:
        for title, g, t in rows:
            for who, imgs in ((f"{name} G: {title}", g), ("teacher, Heun 35 NFE, same direction", t)):
                ax = axes[k][0]
                grid = image_grid(imgs, nrow=len(imgs), pad=1)
                ax.imshow(grid, interpolation="nearest")
                ax.set_title(who, fontsize=7, loc="left", pad=2)
                ax.axis("off")
                k += 1
    fig.suptitle(f"shapes: latent traversals t in [-{span:g}, {span:g}] along G's top principal directions; "
                 "factor (share of the factor change)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from gsd.evaluation.core import load_run
    from gsd.evaluation.factors import factor_regressor

    blocks = []
    for d in args.runs:
        run = load_run(d, device="cpu")
        if run.config.get("dataset") != "shapes":
            raise SystemExit(f"error: {d} is a {run.config.get('dataset')} run; traversals need a shapes run")
        resolution, kinds = int(run.sample_shape[-1]), max(1, int(run.dataset.num_classes))
        regressor = factor_regressor(resolution, kinds, device=run.device)[0]
        rows = traversal_rows(run, regressor, anchors=args.anchors, directions=args.directions, span=args.span,
                              steps=args.steps, teacher_steps=args.teacher_steps)
        blocks.append((Path(d).name, rows))
        print(f"{d}: " + "; ".join(title for title, _, _ in rows), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(blocks, out, args.span)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
