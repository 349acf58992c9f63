"""The regression term of the generator step: fixed pairs (latent, the teacher's 18-step ODE
output for it), and ||G(eps_j) - x_j||^2 over a batch of them (docs/definitions.md §3.5)."""

from __future__ import annotations

import torch

from gsd.errors import UsageError
from gsd.objective.rows import row_valid
from gsd.sampling.samplers import teacher_ode_pairs
from gsd.seed_ranges import REGRESS_SEED_BASE

__all__ = ["RegressionTerm"]


class RegressionTerm:
    """The regression pairs of gsd.distill.Distiller (a mixin). Reads the Distiller's config,
    teacher, rng, device, num_classes and sample_shape; sets regression_pairs."""

    def draw_regression_pairs(self, progress=None) -> None:
        """Draw config.regress_pairs pairs with the teacher's 18-step Heun sampler (35 teacher calls
        each) and set them: latents from seed REGRESS_SEED_BASE + config.seed, so every rank and
        every resume of a run draws the same pairs and none is an evaluation latent. `progress`:
        a gsd.progress bar advanced by the pairs done. UsageError when the teacher's outputs are
        not finite (an overflowing teacher)."""
        c = self.config
        eps, x, labels = teacher_ode_pairs(self.teacher, c.regress_pairs, self.sample_shape,
                                           seed=REGRESS_SEED_BASE + int(c.seed), num_classes=self.num_classes,
                                           device=self.device, progress=progress)
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).sum())
        if bad:
            raise UsageError(f"--lambda-regress: the teacher's ODE outputs are not finite for {bad} of "
                             f"{c.regress_pairs} regression pairs (the teacher overflows); check the teacher, or "
                             f"turn the term off with --lambda-regress 0")
        self.set_regression_pairs(eps, x, labels)

    def set_regression_pairs(self, eps: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """The pairs of the regression term (config.lambda_regress > 0): latents eps (P, *sample_shape)
        and the teacher's outputs x for them (same shape), with class labels (P,) for a
        conditional generator. P must be config.regress_pairs; every value finite."""
        shape = (self.config.regress_pairs, *self.sample_shape)
        if tuple(eps.shape) != shape or tuple(x.shape) != shape:
            raise ValueError(f"regression pairs must both have shape {shape}, got {tuple(eps.shape)} and {tuple(x.shape)}")
        if not (torch.isfinite(eps).all() and torch.isfinite(x).all()):
            raise ValueError("regression pairs hold non-finite values")
        if (labels is None) != (self.num_classes == 0) or (labels is not None and tuple(labels.shape) != shape[:1]):
            raise ValueError(f"regression pairs need {'no labels' if self.num_classes == 0 else 'one label per pair'} "
                             f"for a generator with {self.num_classes} classes")
        put = (lambda t: None if t is None else t.detach().to(self.device))
        self.regression_pairs = (put(eps).float(), put(x).float(), put(labels))

    def _regression_batch(self, n: int):
        """n pairs (eps, teacher output, labels) drawn with replacement from the regression pairs."""
        if self.regression_pairs is None:
            raise RuntimeError("lambda_regress > 0: call set_regression_pairs before training")
        eps, x, labels = self.regression_pairs
        idx = torch.randint(0, eps.shape[0], (n,), generator=self.rng, device=self.device)
        return eps[idx], x[idx], None if labels is None else labels[idx]

    def _regress_term(self, x_r: torch.Tensor, target: torch.Tensor, parts: dict):
        """Mean over the rows with a finite G output of ||x_r - target||^2 (summed over the
        sample's dimensions); sets parts["loss_regress"]. None when no row is finite."""
        keep = row_valid(x_r)
        if not bool(keep.any()):
            parts["loss_regress"] = float("nan")
            return None
        err = (x_r[keep].float() - target[keep]).flatten(1).square().sum(1).mean()
        parts["loss_regress"] = float(err.detach())
        return err
