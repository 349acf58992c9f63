"""Latent editing with the one-step generator G(z): the library behind `python -m gsd.edit`
(its docstring describes the method and the numbers; gsd.experiments calls `edit_metrics`)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from gsd import runs
from gsd.data import load_dataset
from gsd.errors import UsageError
from gsd.evaluation.digits_classifier import classifier_features, digits_classifier
from gsd.evaluation.plots import save_grid
from gsd.generator import load_generator as load_one_step_generator
from gsd.sampling.samplers import latents_for_seeds
from gsd.util import check_memory, MAX_SEED

__all__ = ["load_generator", "slerp", "fit_direction", "find_directions", "filtered_mean", "edit_metrics",
           "DEFAULT_ALPHAS", "DEFAULT_NUM", "MAX_ALPHA", "ALPHA_WHY", "write_figures"]

DEFAULT_ALPHAS = (0.125, 0.25, 0.5)
# Edits are fractions of the typical latent norm; 100 norms away the generator sees latents far
# outside anything it was trained on, and much larger steps overflow float32 latents.
MAX_ALPHA = 100.0
ALPHA_WHY = "an edit step is a fraction of the typical latent norm"
DEFAULT_NUM = 2000
PERCENTILES = (1.0, 99.0)
MIN_POSITIVES = 5          # a class needs this many labelled samples (and non-samples) to fit a boundary
FIT_SEED_BASE = 30_000_000
EDIT_SEED_BASE = 40_000_000
INTERP_SEED_BASE = 50_000_000


# --------------------------------------------------------------------------- generator


def load_generator(run_dir, device="cpu") -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """The EMA one-step generator of a run as editing uses it: `(G, info)` with G(eps) -> samples.

    The run's generator is gsd.generator.load_generator's (the loader of every command); G takes
    standard-normal eps (N, *sample_shape), evaluates it without gradient in chunks of 512 and
    returns float32 CPU samples. info: config, step, sample_shape, sigma_init, dataset, device,
    net (the EMA denoiser D itself, for callers that need it in another precision) and
    generator (the OneStepGenerator).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    runs.read_config(run_dir)  # a folder that is not a run says so in the run's own words
    gen = load_one_step_generator(run_dir, device=device)
    if gen.label_dim:
        raise UsageError(f"{run_dir}: the generator is class-conditional; latent editing needs an "
                         "unconditional one")

    @torch.no_grad()
    def generate(eps: torch.Tensor, batch: int = 512) -> torch.Tensor:
        out = [gen(eps[i:i + batch]).float().cpu() for i in range(0, len(eps), batch)]
        return torch.cat(out) if out else eps.new_zeros((0, *gen.sample_shape))

    info = {"config": gen.info["config"], "step": gen.info["step"], "sample_shape": gen.sample_shape,
            "sigma_init": gen.sigma_init, "dataset": gen.info["dataset"], "device": str(gen.device), "net": gen.net,
            "generator": gen}
    return generate, info


# --------------------------------------------------------------------------- labeller

def _labeller(info: dict, device) -> dict:
    """How samples get labels and features: {'label', 'features', 'num_classes', ...}."""
    cfg = info["config"]
    if cfg["dataset"] == "digits":
        model, cinfo = digits_classifier(cache_dir=cfg.get("cache_dir"), device=device,
                                         epochs=int(cfg.get("classifier_epochs") or 30))
        dev = next(model.parameters()).device

        @torch.no_grad()
        def label(x):
            out = []
            for i in range(0, len(x), 1024):
                out.append(model(x[i:i + 1024].to(dev, torch.float32)).argmax(1).cpu())
            return torch.cat(out)

        return {"label": label, "features": lambda x: classifier_features(model, x), "num_classes": 10,
                "labeller": f"digits CNN (held-out accuracy {cinfo['test_accuracy']:.3f})",
                "feature": f"{cinfo['feature']} (penultimate layer of the digits CNN)"}
    if cfg["dataset"] == "gmm":
        mix = load_dataset("gmm").mixture
        means = mix.means.detach().double().cpu().reshape(mix.num_components, -1)

        def label(x):
            return torch.cdist(x.double().reshape(len(x), -1), means).argmin(1)

        return {"label": label, "features": lambda x: x.double().reshape(len(x), -1),
                "num_classes": int(mix.num_components), "labeller": "nearest gmm mode",
                "feature": "raw coordinates"}
    raise UsageError(f"latent editing needs labelled samples; no labeller for --dataset {cfg['dataset']} "
                     "(digits and gmm have one)")


# --------------------------------------------------------------------------- geometry

def slerp(z1: torch.Tensor, z2: torch.Tensor, t) -> torch.Tensor:
    """Spherical interpolation between batches of latents (N, ...), row by row.

    The directions are slerped on the unit sphere and the norm is interpolated linearly,
    so t = 0 gives z1, t = 1 gives z2, and for ||z1|| = ||z2|| the norm stays constant.
    t: a float or a tensor of N values. Nearly parallel rows fall back to a linear blend.
    """
    shape = z1.shape
    a = z1.reshape(shape[0], -1).double()
    b = z2.reshape(shape[0], -1).double()
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device).reshape(-1, 1)
    ra = a.norm(dim=1, keepdim=True)
    rb = b.norm(dim=1, keepdim=True)
    ua = a / ra.clamp_min(1e-30)
    ub = b / rb.clamp_min(1e-30)
    cos = (ua * ub).sum(1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    near = sin.abs() < 1e-6
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / safe)
    wb = torch.where(near, t, torch.sin(t * theta) / safe)
    u = wa * ua + wb * ub
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
    out = u * ((1 - t) * ra + t * rb)
    # exact endpoints (no rounding from the trigonometry)
    out = torch.where(t == 0, a, torch.where(t == 1, b, out))
    return out.to(z1.dtype).reshape(shape)


def fit_direction(z, y, *, C: float = 1.0, seed: int = 0) -> tuple[np.ndarray, float]:
    """Unit normal of a linear boundary between y == 1 and y == 0 on flattened latents z.

    Logistic regression (sklearn, class-balanced); the normal points towards y == 1.
    Returns (n, training accuracy).
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(z.detach().cpu() if isinstance(z, torch.Tensor) else z, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64).reshape(-1)
    if len(np.unique(y)) < 2:
        raise ValueError("need samples of both sides to fit a boundary")
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    clf.fit(x, y)
    w = clf.coef_.reshape(-1)
    norm = float(np.linalg.norm(w))
    if not norm > 0:
        raise ValueError("the fitted boundary has a zero normal")
    return w / norm, float(clf.score(x, y))


def find_directions(z, labels, classes: Sequence[int], *, min_count: int = MIN_POSITIVES,
                    seed: int = 0) -> tuple[dict, dict]:
    """One-vs-rest unit normals per class: ({c: normal}, {c: reason skipped})."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    directions, skipped = {}, {}
    for c in classes:
        pos = int((labels == c).sum())
        neg = len(labels) - pos
        if pos < min_count or neg < min_count:
            skipped[int(c)] = f"{pos} samples labelled {c} (need >= {min_count} on each side)"
            continue
        n, acc = fit_direction(z, labels == c, seed=seed)
        directions[int(c)] = {"normal": n, "train_accuracy": acc, "count": pos}
    return directions, skipped


def filtered_mean(values, percentiles=PERCENTILES) -> float:
    """Mean of the values between the given percentiles (PPL's outlier filter)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan")
    lo, hi = np.percentile(v, percentiles)
    kept = v[(v >= lo) & (v <= hi)]
    return float(kept.mean()) if len(kept) else float("nan")


# --------------------------------------------------------------------------- metrics

def _path_sq_steps(generate, features, z, direction, step_norm, steps: int) -> np.ndarray:
    """Squared feature distances between consecutive points z + k*step_norm*direction, k=0..steps.

    z: (N, D) flat latents (already scaled), direction: (N, D) or (D,) unit vectors.
    Returns (N * steps,) values (not divided by the step).
    """
    n, d = z.shape
    k = torch.arange(steps + 1, dtype=torch.float64).reshape(1, -1, 1)
    dirs = direction.reshape(-1, 1, d) if direction.ndim == 2 else direction.reshape(1, 1, d)
    pts = (z.reshape(n, 1, d) + k * step_norm * dirs).reshape(n * (steps + 1), d)
    f = features(generate(pts.float()))
    f = f.reshape(n, steps + 1, -1)
    return ((f[:, 1:] - f[:, :-1]) ** 2).sum(-1).reshape(-1).numpy()


# What edit.json's numbers mean (written next to them)
CONVENTION = ("z = sigma_init * eps, flattened; edit z' = z + alpha * R * n with n the unit normal of a one-vs-rest "
              "logistic-regression boundary on z and R = sigma_init * sqrt(D) (the typical latent norm): alpha is the "
              "step as a fraction of the latent norm")
PATH_DEFINITION = (f"mean over the target classes of the {PERCENTILES[0]:g}%-{PERCENTILES[1]:g}% "
                   "percentile-filtered mean of ||f(G(z + (a+h) R n)) - f(G(z + a R n))||^2 / h^2, "
                   f"a = 0, h, ..., max(alphas); h = max(alphas) / path_steps in alpha units; "
                   "path_smoothness_random: the same along random unit directions")
SUCCESS_DEFINITION = ("per target class c: among held-out sources not labelled c, the fraction labelled c after the "
                      "edit; averaged over the fitted classes")


def _check_edit_args(alphas, num: int, num_edit: int, path_steps: int, seed: int) -> list[float]:
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (math.isfinite(a) and 0 < a <= MAX_ALPHA) for a in alphas):
        raise UsageError(f"alphas must be numbers in (0, {MAX_ALPHA:g}] ({ALPHA_WHY}), got {alphas}")
    if num < 2 or num_edit < 1 or path_steps < 1:
        raise UsageError("need num >= 2, num_edit >= 1, path_steps >= 1")
    if not 0 <= int(seed) <= MAX_SEED:
        raise UsageError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return alphas


def _target_classes(target_classes, num_classes: int, dataset: str) -> list[int]:
    if target_classes is None:
        return list(range(num_classes))
    classes = [int(c) for c in target_classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--target-class {bad[0]}: {dataset} has classes 0-{num_classes - 1}")
    return classes


def _class_edits(generate, lab: dict, directions: dict, z_src, y_src, *, alphas, radius: float, s_init: float,
                 shape, h: float, path_steps: int) -> dict:
    """Per target class: the success rate of the edit at each alpha and the path smoothness, over
    the held-out sources not already labelled with the class."""
    per_class = {}
    for c, dinfo in directions.items():
        n_c = torch.as_tensor(dinfo["normal"], dtype=torch.float64)
        src = y_src != c
        n_src = int(src.sum())
        rec = {"boundary_train_accuracy": dinfo["train_accuracy"], "fit_count": dinfo["count"],
               "sources": n_src}
        if n_src:
            zs = z_src[src]
            succ = {}
            for a in alphas:
                z_e = zs + a * radius * n_c
                y_e = lab["label"](generate((z_e / s_init).float().reshape(n_src, *shape)))
                succ[repr(a)] = float((y_e == c).double().mean())
            rec["success_rate"] = succ
            d2 = _path_sq_steps(lambda z: generate((z / s_init).reshape(len(z), *shape)), lab["features"],
                                zs, n_c, h * radius, path_steps)
            rec["path_smoothness"] = filtered_mean(d2 / h ** 2)
        per_class[str(c)] = rec
    return per_class


def edit_metrics(run_dir, *, num: int = DEFAULT_NUM, alphas: Sequence[float] = DEFAULT_ALPHAS, seed: int = 0,
                 device="cpu", target_classes: Sequence[int] | None = None, num_edit: int = 256,
                 path_steps: int = 8, return_state: bool = False) -> dict:
    """Edit success rates and edit-path smoothness of a run's one-step generator.

    num: labelled samples G(z) used to fit the boundaries; num_edit: held-out source latents
    that are edited; alphas: edit steps as fractions of the typical latent norm
    sigma_init * sqrt(D); path_steps: points per edit path (0 .. max(alphas)) for the
    smoothness. Returns a JSON-able dict (see the module docstring); nothing is written.
    With `return_state`, the dict also holds "_state" (latents, directions, generator) for
    the figures of the CLI.
    """
    t0 = time.perf_counter()
    alphas = _check_edit_args(alphas, num, num_edit, path_steps, seed)
    generate, info = load_generator(run_dir, device)
    shape = info["sample_shape"]
    dim = int(np.prod(shape))
    # float64 latents of the fitting set and of one class's edit paths, float32 samples of each
    check_memory(12 * max(num, num_edit * (path_steps + 1)) * dim,
                 f"--num {num} / --num-edit {num_edit} x --path-steps {path_steps} latents of dimension {dim}",
                 "lower them")
    lab = _labeller(info, info["device"])
    num_classes = lab["num_classes"]
    classes = _target_classes(target_classes, num_classes, info["dataset"])
    s_init = info["sigma_init"]
    radius = s_init * math.sqrt(dim)  # typical latent norm (E||z|| ~ sigma_init sqrt(D))
    off = int(seed) * 1_000_000

    # 1. labelled samples -> one boundary per class
    eps_fit = latents_for_seeds(range(FIT_SEED_BASE + off, FIT_SEED_BASE + off + num), shape)
    z_fit = (s_init * eps_fit).reshape(num, dim).double()
    y_fit = lab["label"](generate(eps_fit))
    counts = torch.bincount(y_fit, minlength=num_classes).tolist()
    directions, skipped = find_directions(z_fit, y_fit, classes, seed=seed)

    # 2. held-out sources: success rates and path smoothness per class
    eps_src = latents_for_seeds(range(EDIT_SEED_BASE + off, EDIT_SEED_BASE + off + num_edit), shape)
    z_src = (s_init * eps_src).reshape(num_edit, dim).double()
    y_src = lab["label"](generate(eps_src))
    h = max(alphas) / path_steps
    per_class = _class_edits(generate, lab, directions, z_src, y_src, alphas=alphas, radius=radius, s_init=s_init,
                             shape=shape, h=h, path_steps=path_steps)

    # reference: the same paths along random unit directions
    g = torch.Generator().manual_seed(INTERP_SEED_BASE + off + 1)
    rand_dirs = torch.randn(num_edit, dim, generator=g, dtype=torch.float64)
    rand_dirs = rand_dirs / rand_dirs.norm(dim=1, keepdim=True)
    d2_rand = _path_sq_steps(lambda z: generate((z / s_init).reshape(len(z), *shape)), lab["features"],
                             z_src, rand_dirs, h * radius, path_steps)

    fitted = [r for r in per_class.values() if "success_rate" in r]
    success = {repr(a): (float(np.mean([r["success_rate"][repr(a)] for r in fitted])) if fitted else None)
               for a in alphas}
    smooth = [r["path_smoothness"] for r in fitted]
    cfg = info["config"]
    out = {
        "run_dir": str(Path(run_dir)), "dataset": info["dataset"], "checkpoint_step": info["step"],
        "lambda_irl": cfg.get("lambda_irl"), "fused": cfg.get("fused"),
        "generator": "EMA generator of the latest checkpoint",
        "latent_dim": dim, "sigma_init": s_init, "latent_norm": radius, "convention": CONVENTION,
        "alphas": alphas, "num": int(num), "num_edit": int(num_edit), "seed": int(seed),
        "labeller": lab["labeller"], "feature": lab["feature"], "target_classes": classes, "label_counts": counts,
        "skipped_classes": {str(k): v for k, v in skipped.items()},
        "success_rate": success,
        "path_smoothness": float(np.mean(smooth)) if smooth else None,
        "path_smoothness_random": filtered_mean(d2_rand / h ** 2),
        "path_step": h, "path_steps": int(path_steps),
        "path_definition": PATH_DEFINITION, "success_definition": SUCCESS_DEFINITION,
        "per_class": per_class,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if return_state:
        out["_state"] = {"generate": generate, "directions": directions, "z_src": z_src, "y_src": y_src,
                         "shape": shape, "radius": radius, "sigma_init": s_init}
    return out


# --------------------------------------------------------------------------- figures

def _save_png(images: torch.Tensor, path: Path, ncol: int) -> None:
    if images.ndim == 2:  # low-dimensional data: nothing to draw as an image
        return
    save_grid(images, path, nrow=ncol)


def write_figures(result: dict, out_dir: Path, *, rows: int = 8, cols: int = 9, seed: int = 0) -> list[str]:
    """interp.png and edit_class{c}.png from an `edit_metrics(..., return_state=True)` result."""
    st = result["_state"]
    shape, generate = st["shape"], st["generate"]
    if len(shape) != 3:
        return []
    files = []
    off = int(seed) * 1_000_000 + INTERP_SEED_BASE
    e1 = latents_for_seeds(range(off, off + rows), shape)
    e2 = latents_for_seeds(range(off + rows, off + 2 * rows), shape)
    ts = torch.linspace(0, 1, cols, dtype=torch.float64)
    strip = torch.stack([slerp(e1, e2, torch.full((rows,), float(t), dtype=torch.float64)) for t in ts], 1)
    _save_png(generate(strip.reshape(rows * cols, *shape)), out_dir / "interp.png", cols)
    files.append("interp.png")
    a_max = max(result["alphas"])
    grid_alphas = torch.linspace(0, a_max, cols, dtype=torch.float64)
    for c, dinfo in st["directions"].items():
        keep = (st["y_src"] != c).nonzero().reshape(-1)[:rows]
        if len(keep) == 0:
            continue
        z = st["z_src"][keep]
        n_c = torch.as_tensor(dinfo["normal"], dtype=torch.float64)
        pts = z[:, None, :] + grid_alphas[None, :, None] * st["radius"] * n_c
        imgs = generate((pts / st["sigma_init"]).float().reshape(len(keep) * cols, *shape))
        name = f"edit_class{c}.png"
        _save_png(imgs, out_dir / name, cols)
        files.append(name)
    return files
