"""The measurement of loss guidance on digits (docs/definitions.md, issue 6.3): DSG vs DPS vs
unguided on the ancestral sampler, same seeds and NFE, judged by the evaluation classifier
(gsd.evaluation.digits_classifier), never by the guidance classifier that steers the samples
(gsd.sampling.guidance). `measure_guidance(teacher, dataset, ...)` -> dict,
`format_guidance_table(result)` -> markdown."""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from gsd.errors import UsageError
from gsd.evaluation.digits_classifier import classifier_features, digits_classifier, DIGITS_FEATURE_NAME
from gsd.evaluation.feature_metrics import frechet_distance
from gsd.sampling.guidance import (
    MASK_NAMES, classifier_loss, guidance_classifier, heldout_indices, inpaint_mask, inpainting_loss,
)
from gsd.sampling.samplers import guided_sample, latents_for_seeds

__all__ = ["measure_guidance", "format_guidance_table", "DEFAULT_DSG_RATES", "DEFAULT_DPS_STEP_SIZES"]

# Settings compared by `measure_guidance` (the whole grid is reported, not only the best).
DEFAULT_DSG_RATES = (0.1, 0.2, 0.4)
DEFAULT_DPS_STEP_SIZES = {"inpaint": (0.1, 0.3, 1.0), "class": (0.5, 2.0, 8.0)}


def _configs(task: str, dsg_rates, dps_step_sizes):
    out = [("none", {})]
    out += [("dsg", {"guidance_rate": float(r)}) for r in dsg_rates]
    out += [("dps", {"step_size": float(s)}) for s in dps_step_sizes]
    return out


def _setting(method: str, kw: dict) -> str:
    if method == "dsg":
        return f"rate {kw['guidance_rate']:g}"
    if method == "dps":
        return f"step {kw['step_size']:g}"
    return "-"


@torch.no_grad()
def _predict(model, x, batch=256):
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch].to(dev, torch.float32)).cpu() for i in range(0, len(x), batch)])


def _inpainting_rows(teacher, dataset, evaluator, *, num, steps, seed, device, dsg_rates, dps_step_sizes,
                     progress) -> list[dict]:
    """(a) of `measure_guidance`: inpainting of `num` held-out digits, one row per method and setting."""
    held = heldout_indices(len(dataset))
    g = torch.Generator().manual_seed(seed)
    pick = held[torch.randperm(len(held), generator=g)[:num]]
    if len(pick) < num:
        raise UsageError(f"only {len(pick)} held-out digits for num={num}")
    ref = dataset.data[pick].to(device)
    ref_labels = dataset.labels[pick]
    masks = torch.stack([inpaint_mask(MASK_NAMES[i % len(MASK_NAMES)], dataset.sample_shape)
                         for i in range(num)]).to(device)
    seeds = [seed * 1_000_003 + i for i in range(num)]
    latents = latents_for_seeds(seeds, dataset.sample_shape, device=device)
    inpaint_rows = []
    loss = inpainting_loss(ref, masks)
    for method, kw in _configs("inpaint", dsg_rates, dps_step_sizes):
        t0 = time.perf_counter()
        x = guided_sample(teacher, latents, loss, method=method, num_steps=steps, seeds=seeds, **kw)
        secs = time.perf_counter() - t0
        x = x.clamp(-1, 1)
        err = (x.cpu() - ref.cpu()).square()
        m = masks.cpu()
        obs = ((err * m).flatten(1).sum(1) / m.flatten(1).sum(1)).mean().item()
        hid = ((err * (1 - m)).flatten(1).sum(1) / (1 - m).flatten(1).sum(1)).mean().item()
        agree = (_predict(evaluator, x).argmax(1) == ref_labels).float().mean().item()
        inpaint_rows.append(dict(method=method, setting=_setting(method, kw), **kw, mse_observed=obs,
                                 mse_hidden=hid, label_agreement=agree, seconds=secs))
        if progress:
            print(f"inpaint {method} {_setting(method, kw)}: obs MSE {obs:.4f}, hidden MSE {hid:.4f}, "
                  f"agreement {agree:.3f} ({secs:.1f} s)", flush=True)

    return inpaint_rows


def _class_rows(teacher, dataset, evaluator, guide_clf, *, num, steps, seed, device, dsg_rates, dps_step_sizes,
                progress) -> tuple[list[dict], float]:
    """(b) of `measure_guidance`: class guidance towards target i % classes; returns (rows, the
    FD of `num` real held-out digits, the small-N floor of the rows' FD)."""
    held = heldout_indices(len(dataset))
    targets = torch.arange(num) % int(dataset.num_classes)
    cseeds = [seed * 1_000_003 + 500_000 + i for i in range(num)]
    clat = latents_for_seeds(cseeds, dataset.sample_shape, device=device)
    closs = classifier_loss(guide_clf, targets)
    real_feat = classifier_features(evaluator, dataset.data)
    # small-N floor of the FD: `num` real held-out digits (repeated if needed) against all real digits
    floor_idx = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(seed + 1))]
    floor_idx = floor_idx.repeat(math.ceil(num / len(floor_idx)))[:num]
    fd_real = frechet_distance(classifier_features(evaluator, dataset.data[floor_idx]), real_feat)
    class_rows = []
    for method, kw in _configs("class", dsg_rates, dps_step_sizes):
        t0 = time.perf_counter()
        x = guided_sample(teacher, clat, closs, method=method, num_steps=steps, seeds=cseeds, **kw)
        secs = time.perf_counter() - t0
        x = x.clamp(-1, 1)
        success = (_predict(evaluator, x).argmax(1) == targets).float().mean().item()
        guide_success = (_predict(guide_clf, x).argmax(1) == targets).float().mean().item()
        fd = frechet_distance(classifier_features(evaluator, x), real_feat)
        class_rows.append(dict(method=method, setting=_setting(method, kw), **kw, success=success,
                               guidance_classifier_success=guide_success, frechet_digits_cnn=fd, seconds=secs))
        if progress:
            print(f"class {method} {_setting(method, kw)}: success {success:.3f} (guidance clf {guide_success:.3f}), "
                  f"FD {fd:.2f} ({secs:.1f} s)", flush=True)

    return class_rows, fd_real


def measure_guidance(teacher, dataset, *, num: int = 200, steps: int = 30, seed: int = 0, device="cpu",
                     dsg_rates: Sequence[float] = DEFAULT_DSG_RATES, dps_step_sizes: dict | None = None,
                     cache_dir=None, progress: bool = False) -> dict:
    """DSG vs DPS vs unguided on the ancestral sampler with `steps` steps (same seeds, same NFE).

    (a) inpainting of `num` held-out real digits (hidden region cycling through MASK_NAMES):
        MSE on the observed region (what the loss constrains), MSE on the hidden region (vs
        the original), and agreement of the evaluation classifier's label of the completion
        with the reference digit's label.
    (b) class guidance towards target i % 10 for `num` samples, loss from the independent
        `guidance_classifier`; success = the evaluation classifier (`gsd.evaluation.digits_classifier`)
        labels the sample as the target. Also the guidance classifier's own success rate and a
        Frechet distance in digits-CNN features to all real digits (small-N, biased: compare rows only).
    Every method runs a grid of settings (DEFAULT_DSG_RATES / DEFAULT_DPS_STEP_SIZES); all rows are
    returned. Default cost ~1.5 min on one (shared) CPU core for digits.
    """

    if dataset.labels is None or len(dataset.sample_shape) != 3:
        raise UsageError("measure_guidance needs a labelled image data set (digits)")
    if dataset.name != "digits":
        raise UsageError(f"measure_guidance uses digits classifiers; got dataset {dataset.name!r}")
    dps_step_sizes = dict(DEFAULT_DPS_STEP_SIZES, **(dps_step_sizes or {}))
    start = time.perf_counter()
    teacher = teacher.to(device).eval()
    evaluator, eval_info = digits_classifier(dataset, device=device, cache_dir=cache_dir)
    guide_clf, guide_info = guidance_classifier(dataset, device=device, cache_dir=cache_dir)
    evaluator.requires_grad_(False)

    inpaint_rows = _inpainting_rows(teacher, dataset, evaluator, num=num, steps=steps, seed=seed, device=device,
                                    dsg_rates=dsg_rates, dps_step_sizes=dps_step_sizes["inpaint"], progress=progress)
    class_rows, fd_real = _class_rows(teacher, dataset, evaluator, guide_clf, num=num, steps=steps, seed=seed,
                                      device=device, dsg_rates=dsg_rates, dps_step_sizes=dps_step_sizes["class"],
                                      progress=progress)

    return {
        "sampler": "ancestral (DDPM posterior, eta=1), EDM time steps", "steps": steps, "nfe": steps,
        "num": num, "seed": seed, "device": str(device),
        "masks": list(MASK_NAMES), "inpaint": inpaint_rows, "class": class_rows,
        "class_fd_real_heldout": fd_real,
        "evaluator": {"name": "gsd.evaluation.digits_classifier.digits_classifier", "test_accuracy": eval_info["test_accuracy"]},
        "guidance_classifier": {"name": "gsd.sampling.guidance.guidance_classifier", "test_accuracy": guide_info["test_accuracy"]},
        "feature": DIGITS_FEATURE_NAME, "seconds": time.perf_counter() - start,
    }


def _best(rows, key, reverse):
    return sorted(rows, key=lambda r: r[key], reverse=reverse)[0]


def format_guidance_table(result: dict) -> str:
    """Markdown tables of `measure_guidance`'s result (every setting, one row each)."""
    lines = [f"Loss guidance on digits, {result['sampler']}, {result['steps']} steps "
             f"({result['nfe']} network evaluations + as many backward passes when guided), "
             f"{result['num']} samples per row, seed {result['seed']}.", "",
             f"(a) Inpainting of held-out real digits (hidden region cycles over {', '.join(result['masks'])}); "
             "label agreement by the evaluation classifier "
             f"(test acc. {result['evaluator']['test_accuracy']:.3f}).", "",
             "| method | setting | MSE observed | MSE hidden | label agreement | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in result["inpaint"]:
        lines.append(f"| {r['method']} | {r['setting']} | {r['mse_observed']:.4f} | {r['mse_hidden']:.4f} | "
                     f"{r['label_agreement']:.3f} | {r['seconds']:.1f} |")
    lines += ["", "(b) Class guidance (target = i mod 10) with the guidance classifier "
              f"(test acc. {result['guidance_classifier']['test_accuracy']:.3f}); success judged by the "
              "independent evaluation classifier. FD: Frechet distance in digits-CNN features "
              "to all real digits (not FID; small N, compare rows only; "
              f"{result['num']} real held-out digits score {result['class_fd_real_heldout']:.2f}).", "",
              "| method | setting | success (evaluator) | success (guidance clf) | FD digits-CNN | time (s) |",
              "|---|---|---|---|---|---|"]
    for r in result["class"]:
        lines.append(f"| {r['method']} | {r['setting']} | {r['success']:.3f} | "
                     f"{r['guidance_classifier_success']:.3f} | {r['frechet_digits_cnn']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
