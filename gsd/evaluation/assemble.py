"""The one assembler of evaluation results: `evaluation_sections` fills the sections that
`gsd.train`'s end-of-run evaluation (metrics.json, `evaluate_distillation`) and `gsd.evaluate`
(eval.json, gsd.evaluation.core.evaluate_loaded) share, with the same latent seeds, estimators
and latency method; each caller adds only what is its own (the panels of the run's sample
figure; FID and PPL of eval.json)."""

from __future__ import annotations

from typing import Callable

import torch

from gsd.evaluation.digits_classifier import classifier_features, digits_classifier
from gsd.evaluation.factors import factor_regressor, regressor_features
from gsd.evaluation.fid import FID_FEATURE_NAME
from gsd.evaluation.metrics import (
    batched, distribution_section, evaluation_latents, geometry_section, LATENCY_METHOD, latency_section,
    local_isometry_settings, one_step_samples,
)
from gsd.evaluation.ppl import float64_copy
from gsd.sampling.samplers import heun_nfe, heun_sample

__all__ = ["FeatureSpace", "evaluation_sections", "evaluate_distillation"]


class FeatureSpace:
    """The feature spaces of one data set: for the Frechet distance / KID / precision-recall
    (`fd`, named `fd_name`) and for PPL (`ppl`, named `ppl_name`).

    gmm and vector data: raw coordinates. digits: the digits CNN's penultimate layer for both.
    shapes: the factor regressor's penultimate layer for FD (its factor metrics are
    gsd.evaluation.factors'), raw pixels for PPL. Other images: no FD space of their own (FID is
    their figure), PPL in Inception features where the weights are at hand, else raw pixels."""

    def __init__(self, dataset, device, *, cache_dir=None, classifier_epochs: int = 30, progress: bool = False,
                 fid_model=None):
        self.dataset = dataset
        self.info: dict = {}
        self.fd = None      # x -> (N, F) float64 features, or None (no feature space)
        self.ppl = None     # float64 x -> features (None: identity)
        self.fd_name = None
        self.ppl_name = "raw pixels (no feature network at hand for this data set), squared L2"
        if dataset.mixture is not None or len(dataset.sample_shape) == 1:
            self.fd_name = "raw coordinates"
            self.fd = lambda x: x.reshape(len(x), -1).double()
            self.ppl_name = "raw coordinates (identity features)"
        elif dataset.name == "digits":
            clf, info = digits_classifier(dataset, cache_dir=cache_dir, device=device, progress=progress,
                                          epochs=classifier_epochs)
            self.fd_name = f"{info['feature']} (penultimate layer of a small CNN trained on digits; not FID)"
            self.info["classifier_test_accuracy"] = info["test_accuracy"]
            self.fd = lambda x: classifier_features(clf, x)
            clf64 = float64_copy(clf)
            self.ppl = lambda x: clf64.features(x.to(next(clf64.parameters()).device, torch.float64))
            self.ppl_name = f"{info['feature']} (digits CNN penultimate features, squared L2)"
        elif dataset.name == "shapes":
            model, info = factor_regressor(int(dataset.sample_shape[-1]), max(1, int(dataset.num_classes)),
                                           cache_dir=cache_dir, device=device, progress=progress)
            self.regressor = (model, info)
            self.fd_name = f"{info['feature']} (penultimate layer of the shapes factor regressor; not FID)"
            self.fd = lambda x: regressor_features(model, x)
            self.ppl_name = "raw pixels, squared L2 (factor-space PPL: factors.factor_ppl)"
        elif fid_model is not None:
            self.ppl = lambda x: fid_model(x.float()).double()
            self.ppl_name = f"{FID_FEATURE_NAME}, squared L2 (computed in float32)"


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
