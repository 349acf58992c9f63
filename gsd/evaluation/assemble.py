"""The one assembler of evaluation results: `evaluation_sections` fills the sections that
`gsd.train`'s end-of-run evaluation (metrics.json, `evaluate_distillation`) and `gsd.evaluate`
(eval.json, gsd.evaluation.core.evaluate_loaded) share, with the same latent seeds, estimators
and latency method; each caller adds only what is its own (the panels of the run's sample
figure; FID and PPL of eval.json)."""

from __future__ import annotations

from typing import Callable

import torch

from gsd.evaluation.metrics import (
    batched, distribution_section, evaluation_latents, FeatureSpace, geometry_section, LATENCY_METHOD,
    latency_section, local_isometry_settings, one_step_samples,
)
from gsd.sampling.samplers import heun_nfe, heun_sample

__all__ = ["evaluation_sections", "evaluate_distillation"]


def evaluation_sections(result: dict, generate: Callable, teacher_map: Callable, dataset, space: FeatureSpace, *,
                        seed: int, num_samples: int, num_classes: int, device, isometry_latents: int,
                        latency_batch: int, latency_repeats: int, latency_warmup: int,
                        x_teacher: torch.Tensor | None = None, teacher_geometry: dict | bool = False,
                        bootstraps: int | None = None) -> dict:
    """Fill `result` with the shared sections of an evaluation of the one-step map
    generate(eps, labels) against teacher_map(eps, labels) on the evaluation latents of `seed`.

    result["one_step"] and result["teacher"] (created if absent) get the sample-quality
    metrics, the isometry defects and latency_ms; result gets the noise floors, fd_feature,
    isometry_defect, local_isometry_defect, local_isometry, isometry_latents and `latency`
    (batch, repeats, both medians, speedup, method). `x_teacher`: the teacher's samples when
    already computed (a cache shared between runs of one teacher); `teacher_geometry`: its
    geometry section when already computed, True to compute it (35 NFE per latent), False to
    leave it out. Returns {"one_step": samples, "teacher": samples, "true": the gmm reference
    sample or None}."""
    device = torch.device(device)
    shape = tuple(dataset.sample_shape)
    eps, labels = evaluation_latents(seed, num_samples, shape, device, num_classes)
    with torch.no_grad():
        x_one = one_step_samples(generate, seed, num_samples, shape, device, num_classes)  # as gsd.generate
        if x_teacher is None:
            x_teacher = batched(teacher_map, eps, labels)
    one = result.setdefault("one_step", {"nfe": 1})
    teach = result.setdefault("teacher", {})
    true = distribution_section(result, dataset, space, [(one, x_one), (teach, x_teacher)], num_samples,
                                bootstraps=bootstraps)

    geo = geometry_section(generate, shape, device, num_classes, seed=seed, isometry_latents=isometry_latents)
    one.update(geo)
    result["isometry_defect"] = geo["isometry_defect"]
    result["local_isometry_defect"] = geo["local_isometry_defect"]
    if teacher_geometry is True:
        teacher_geometry = geometry_section(teacher_map, shape, device, num_classes, seed=seed,
                                            isometry_latents=isometry_latents)
    if teacher_geometry:
        teach.update({k: teacher_geometry[k] for k in geo})
    result["isometry_latents"] = int(isometry_latents)
    result["local_isometry"] = local_isometry_settings(seed)

    # the same latents for both, repeats interleaved (a load change hits both alike)
    nb = min(latency_batch, num_samples)
    eps_b, lab_b = eps[:nb], None if labels is None else labels[:nb]
    lat = latency_section({"one": lambda: generate(eps_b, lab_b), "teacher": lambda: teacher_map(eps_b, lab_b)},
                          device, warmup=latency_warmup, repeats=latency_repeats)
    one["latency_ms"], teach["latency_ms"] = lat["one"], lat["teacher"]
    result["latency"] = {"batch": int(nb), "repeats": int(latency_repeats), "one_step_ms": lat["one"],
                         "teacher_ms": lat["teacher"], "speedup": lat["teacher"] / lat["one"],
                         "reduction": 1.0 - lat["one"] / lat["teacher"], "method": LATENCY_METHOD}
    return {"one_step": x_one, "teacher": x_teacher, "true": true}


def evaluate_distillation(generate: Callable, teacher, dataset, *, device="cpu", num_samples: int = 1000,
                          num_classes: int = 0, cache_dir=None, latency_repeats: int = 5, latency_batch: int = 64,
                          teacher_steps: int = 18, classifier_epochs: int = 30, isometry_latents: int = 512,
                          progress: bool = False, seed: int = 0, latency_warmup: int = 2,
                          teacher_geometry: bool = False, bootstraps: int | None = None) -> tuple[dict, list]:
    """gsd.train's end-of-run evaluation: the one-step generator vs the Heun teacher on the same
    seeds as `gsd.evaluate --seed seed`; returns (metrics, panels).

    generate(eps, class_labels) -> samples for standard-normal latents eps (e.g.
    `Distiller.generate`); teacher: the denoiser f_phi sampled with Heun (2*teacher_steps-1
    NFE). `teacher_geometry` adds the teacher Heun map's isometry defects (35 NFE per latent:
    off by default to keep the run short). `panels` are (title, samples) pairs for
    `gsd.evaluation.plots.save_samples_png`."""
    nfe_t = heun_nfe(teacher_steps)

    def teacher_map(e, l):
        return heun_sample(teacher, e, l, num_steps=teacher_steps)

    metrics: dict = {"one_step": {"nfe": 1}, "teacher": {"nfe": nfe_t}, "num_samples": num_samples}
    space = FeatureSpace(dataset, torch.device(device), cache_dir=cache_dir, classifier_epochs=classifier_epochs,
                         progress=progress)
    samples = evaluation_sections(metrics, generate, teacher_map, dataset, space, seed=seed, num_samples=num_samples,
                                  num_classes=num_classes, device=device, isometry_latents=isometry_latents,
                                  latency_batch=latency_batch, latency_repeats=latency_repeats,
                                  latency_warmup=latency_warmup, teacher_geometry=teacher_geometry,
                                  bootstraps=bootstraps)
    n_show = 2000 if samples["true"] is not None else 64
    panels = [("one-step G (1 NFE)", samples["one_step"][:n_show]),
              (f"teacher Heun ({nfe_t} NFE)", samples["teacher"][:n_show])]
    if samples["true"] is not None:
        panels.append(("true mixture", samples["true"][:2000]))
    return metrics, panels
