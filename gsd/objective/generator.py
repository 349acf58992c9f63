"""The generator step's objective: the SiD term, SiDA's adversarial term, the isometric and
the regression terms, combined with a raw weight or the scale-free one (docs/definitions.md
§3.3-3.5; `GeneratorObjective.generator_loss` says how)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from gsd.adversarial import generator_adversarial_loss
from gsd.objective.rows import bcast, kernel_ops, row_valid, zero_dropped_rows

__all__ = ["GeneratorObjective", "global_norms", "scale_free_weight", "sigma_schedule"]


def sigma_schedule(t: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM's rho-schedule as a function of t in [0, 1]: sigma(0) = sigma_min, sigma(1) = sigma_max."""
    a = sigma_max ** (1.0 / rho)
    b = sigma_min ** (1.0 / rho)
    return (a + (1.0 - t) * (b - a)) ** rho


def global_norms(*grads: torch.Tensor, world: int = 1) -> tuple[float, ...]:
    """The norms of tensors over the whole batch: squared norms (float64) summed over the
    processes under DDP, so that every rank gets the same numbers."""
    sq = torch.stack([g.double().square().sum() for g in grads])
    if world > 1:
        torch.distributed.all_reduce(sq)
    return tuple(float(v) for v in sq.sqrt())


def scale_free_weight(f: float, n_sid: float, n_irl: float, floor: float = 0.0) -> float:
    """w = F ||g_sid|| / max(||g_irl||, floor); 0 when the isometric gradient is 0 (docs/definitions.md §3.4)."""
    return f * n_sid / max(n_irl, floor) if n_irl > 0 else 0.0


@dataclass
class _GeneratorPass:
    """G's forward of one micro-step: samples, their finite rows, and the regression rows and targets."""
    x_g: torch.Tensor
    valid: torch.Tensor
    x_reg: torch.Tensor | None
    target: torch.Tensor | None


@dataclass
class _GeneratorTerms:
    """The terms of one generator micro-step (None: not in this step) and their values."""
    used: torch.Tensor
    sid: torch.Tensor | None = None
    irl: torch.Tensor | None = None
    factor: float = 1
    adv: torch.Tensor | None = None
    reg: torch.Tensor | None = None
    mix: float = 0.0
    parts: dict = dataclasses.field(default_factory=dict)

    def value(self, name: str) -> float:
        term = getattr(self, name)
        return self.parts.get(f"loss_{name}", 0.0) if term is not None else 0.0

    def reg_value(self, c) -> float:
        return c.lambda_regress * self.parts["loss_regress"] if self.reg is not None else 0.0


class GeneratorObjective:
    """The generator objective of gsd.distill.Distiller (a mixin). Reads the Distiller's config,
    networks and their call wrappers, scaler_g, rng, world and sample_shape, and the terms of
    gsd.objective.isometry and gsd.objective.regression."""

    def generator_loss(self, eps: torch.Tensor, labels=None, *, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The generator objective for given latents (draws t and the noise from self.rng
        unless given: `t` in [0, tmax/1000), `noise` like the samples).

        Returns (L, parts); L.backward() gives the generator's gradient (before gen_loss_scale):

        - raw weight W = lambda_irl_raw (or no isometric term): L = lambda_sid L_sid + W L_irl;
        - scale-free weight F = lambda_irl: the two terms are evaluated on detached copies of
          x_g and differentiated once each (the SiD backward passes through teacher and f_psi
          once, as a plain backward would): g_sid = lambda_sid dL_sid/dx_g, g_irl = dL_irl/dx_g,
          w = F ||g_sid|| / ||g_irl|| (a detached scalar; 0 when g_irl = 0), and L is a
          surrogate whose gradient through G is g_sid + w g_irl, i.e. that of lambda_sid L_sid
          + w L_irl, and whose value is that loss. parts gets irl_weight (w), irl_gnorm_sid
          (||g_sid||) and irl_gnorm_irl (||g_irl||). Norms are over the whole micro-batch; under
          DDP the squared norms are summed over ranks, so every rank uses the same w.

        Under DDP, L is what this rank back-propagates: its local SiD mean plus the isometry
        term, which is world x the global-batch loss (DDP averages gradients over ranks; with
        neighbour groups it is each rank's own grouped loss, see below); parts["loss_gen"] is
        the unweighted-by-world value. With irl_neighbours = K > 0 the isometry loss is taken
        over the groups of K+1 rows (anchor + neighbours); a group that holds a dropped
        (non-finite) row is dropped from it whole.
        """
        c = self.config
        fwd = self._generator_forward(eps, labels)
        scale_free = c.lambda_irl > 0
        # scale-free: each term sees its own detached copy of x_g, so that its x_g-gradient can be
        # measured before the combination goes back through G once
        x_sid = fwd.x_g.detach().requires_grad_(True) if scale_free else fwd.x_g
        x_irl = fwd.x_g.detach().requires_grad_(True) if scale_free else fwd.x_g
        terms = self._generator_terms(fwd, x_sid, x_irl, eps, labels, t, noise)
        if scale_free:
            return self._scale_free_loss(fwd, x_sid, x_irl, terms)
        return self._raw_weight_loss(fwd, terms)

    def _generator_forward(self, eps: torch.Tensor, labels) -> "_GeneratorPass":
        """G's samples x_g (after the NaN hook), their finite rows, and the regression rows G
        makes in the same pass (a second forward would trip DDP's one-backward bookkeeping)."""
        c = self.config
        n = eps.shape[0]
        reg = self._regression_batch(n * c.regress_ratio) if c.lambda_regress > 0 else None
        if reg is None:
            x_g, x_reg, target = self._gen(self._call_g_train, eps, labels), None, None
        else:
            eps_r, target, labels_r = reg
            both = self._gen(self._call_g_train, torch.cat([eps, eps_r]),
                             None if labels is None else torch.cat([labels, labels_r]))
            x_g, x_reg = both[:n], both[n:]
        x_g = self._apply_hook("generator", x_g)
        return _GeneratorPass(x_g, row_valid(x_g), x_reg, target)

    def _generator_terms(self, fwd, x_sid, x_irl, eps, labels, t, noise) -> "_GeneratorTerms":
        """The generator step's terms (SiD, adversarial, isometric, regression) and their values."""
        c = self.config
        n = eps.shape[0]
        terms = _GeneratorTerms(used=fwd.valid)  # rows that entered some loss
        mix = c.lambda_adv if self.adversarial_mixing else 0.0  # SiDA: (1 - mix) L + mix L_adv
        terms.mix = mix
        if c.lambda_sid > 0:
            x_in = zero_dropped_rows(x_sid, fwd.valid)
            self.fake.eval().requires_grad_(False)
            if t is None:
                t = torch.rand(n, generator=self.rng, device=self.device) * (c.tmax / 1000.0)
            sigma = sigma_schedule(t, c.sigma_min, c.sigma_max, c.rho)
            if noise is None:
                noise = self._randn(n, *self.sample_shape)
            x_t = x_in + bcast(sigma, x_in) * noise
            y_real = self._net(self._call_teacher, x_t, sigma, labels)
            if mix:  # the discriminator's logits come with f_psi's denoising, in one pass
                y_fake, logits = self._net(self._call_f, x_t, sigma, labels, return_logits=True)
            else:
                y_fake = self._net(self._call_f, x_t, sigma, labels)
            terms.sid = kernel_ops().sid_generator_loss(x_sid, y_real, y_fake, alpha=c.alpha, backend=c.backend)
            terms.used = fwd.valid & row_valid(y_real.detach()) & row_valid(y_fake.detach())
            terms.parts["loss_sid"] = float(terms.sid.detach())
            if mix:
                terms.used = terms.used & row_valid(logits.detach())
                terms.adv = generator_adversarial_loss(logits, x_sid, y_real, terms.used,
                                                       loss_scale=c.adv_loss_scale_g, gen_loss_scale=c.gen_loss_scale)
                terms.parts["loss_adv"] = float(terms.adv.detach())
        if c.irl_on:
            terms.irl, terms.factor = self._irl_term(x_irl, eps, labels, fwd.valid, terms.parts)
        terms.parts["nan_samples"] = int(n - terms.used.sum())
        if fwd.x_reg is not None:
            terms.reg = self._regress_term(fwd.x_reg, fwd.target, terms.parts)
        return terms

    def _raw_weight_loss(self, fwd, terms) -> tuple[torch.Tensor, dict]:
        """L = lambda_sid L_sid + W L_irl + mu L_reg (SiDA: mixed with L_adv), back-propagated as is."""
        c, mix = self.config, terms.mix
        # under DDP every rank must back-propagate through G, even if all its terms drop out
        total = (zero_dropped_rows(fwd.x_g, fwd.valid) * 0).sum() if self.world > 1 else fwd.x_g.new_zeros(())
        if terms.sid is not None:
            total = total + c.lambda_sid * terms.sid
        if terms.irl is not None:
            total = total + (c.lambda_irl_raw * terms.factor) * terms.irl
        if terms.reg is not None:
            total = total + c.lambda_regress * terms.reg
        value = c.lambda_sid * terms.value("sid") + c.lambda_irl_raw * terms.value("irl") + terms.reg_value(c)
        if mix:
            total = (1 - mix) * total + (mix * terms.adv if terms.adv is not None else 0.0)
            value = (1 - mix) * value + mix * terms.value("adv")
        terms.parts["loss_gen"] = value
        return total, terms.parts

    def _scale_free_loss(self, fwd, x_sid, x_irl, terms) -> tuple[torch.Tensor, dict]:
        """The scale-free weight: each term's x_g-gradient once, w = F ||g_sid|| / ||g_irl||
        (scale_free_weight), and a surrogate whose gradient through G is g_sid + w g_irl and
        whose value is lambda_sid L_sid + w L_irl (docstring of generator_loss)."""
        c, mix, parts = self.config, terms.mix, terms.parts
        x_grad = self._x_gradient(fwd)
        g_sid = x_grad(terms.sid, x_sid, c.lambda_sid, retain=terms.adv is not None)  # L_adv shares f_psi's pass
        g_irl = x_grad(terms.irl, x_irl, float(terms.factor))
        n_sid, n_irl = global_norms(g_sid, g_irl, world=self.world)
        if math.isfinite(n_sid) and math.isfinite(n_irl):
            floor = self._irl_gradient_floor(x_irl.detach(), fwd.valid, terms.factor)
            # the weight of L_irl in lambda_sid L_sid + w L_irl, in one process and under DDP alike:
            # there each rank's SiD gradient is that of its local mean (world x its share of the
            # global mean's), and g_irl that of world x the global loss (factor), so the ratio is
            # unchanged. The norms are reported in the one-process frame.
            m = w = scale_free_weight(c.lambda_irl, n_sid, n_irl, floor)
            parts.update(irl_weight=m, irl_gnorm_sid=n_sid / self.world, irl_gnorm_irl=n_irl / terms.factor,
                         irl_floored=float(0 < n_irl < floor))
        else:
            # an overflowing x-gradient (fp16): no weight this step; the NaN it leaves in the
            # generator's gradient makes the scaler skip the step (counted in nan_grads); the loss
            # value reported is the SiD term's
            m, w = float("nan"), 0.0
        g = (g_sid + m * g_irl).detach()
        value = c.lambda_sid * terms.value("sid") + w * terms.value("irl")
        if mix:  # SiDA's mixture: the scale-free weight stays relative to the SiD term alone
            g = (1 - mix) * g + mix * x_grad(terms.adv, x_sid, 1.0).detach()
            value = (1 - mix) * value + mix * terms.value("adv")
        surrogate = (zero_dropped_rows(fwd.x_g, fwd.valid) * g).sum()
        parts["loss_gen"] = value + (1 - mix) * terms.reg_value(c)
        total = surrogate - surrogate.detach() + value
        if terms.reg is not None:  # its own value and gradient; the scale-free weight is not relative to it
            total = total + ((1 - mix) * c.lambda_regress) * terms.reg
        return total, parts

    def _x_gradient(self, fwd):
        """d(weight loss)/dx for a term evaluated on a detached copy x of x_g, the dropped rows
        zeroed. fp16: the x-gradients pass through the autocast networks, so they are taken at the
        GradScaler's scale (and unscaled here); an overflow shows as inf in the combined gradient,
        which makes the scaler skip the step as usual."""
        c = self.config
        amp_scale = (float(self.scaler_g.get_scale()) * c.gen_loss_scale / self.accum
                     if self.scaler_g.is_enabled() else 1.0)
        x_g, valid = fwd.x_g, fwd.valid

        def x_grad(loss, x, weight, retain=False):
            if loss is None or not loss.requires_grad:
                return torch.zeros_like(x_g)
            (g,) = torch.autograd.grad(loss * (weight * amp_scale), x, allow_unused=True, retain_graph=retain)
            if g is None:
                return torch.zeros_like(x_g)
            g = g / amp_scale if amp_scale != 1.0 else g
            return zero_dropped_rows(g, valid)  # dropped rows take no part
        return x_grad
