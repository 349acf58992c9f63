"""The fake-score step: f_psi learns to denoise G's samples (SiD), and with SiDA its encoder
also learns to tell real from generated samples (docs/definitions.md §3.3, §3.8)."""

from __future__ import annotations

import contextlib

import torch

from gsd.adversarial import discriminator_loss
from gsd.objective.rows import bcast, kernel_ops, row_valid, sanitize_grads

__all__ = ["FakeScoreStep"]


class FakeScoreStep:
    """The fake-score step of gsd.distill.Distiller (a mixin). Reads the Distiller's config,
    fake / generator networks and their call wrappers, opt_f, scaler_f, rng, accum,
    micro_batch, real_data and sample_shape."""

    def _no_sync(self, net, last: bool):
        """DDP: no gradient all-reduce before the last micro-step of an accumulation."""
        return contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()

    def fake_score_step(self) -> dict:
        c = self.config
        n = self.micro_batch
        self.fake.train().requires_grad_(True)
        # SiD's recipe: the fake score learns from the samples G gives at sampling time (dropout
        # off); generator_step puts G back in train mode
        self.generator.eval()
        self.opt_f.zero_grad(set_to_none=True)
        loss_sum, d_sum, dropped = 0.0, 0.0, None
        for k in range(self.accum):
            # independent latents: the neighbour groups serve only the generator's isometry term
            real = None
            if c.adv_on:  # SiDA: real samples, whose labels the generated ones take
                real, real_labels = self.real_data.sample(n, self.rng, self.device)
                eps, labels = self._randn(n, *self.sample_shape), real_labels
            else:
                eps, labels = self._latents(n)
            with torch.no_grad():
                x_g = self._gen(self._call_g, eps, labels)
            x_g = self._apply_hook("fake", x_g)
            sigma = (self._randn(n) * c.p_std + c.p_mean).exp()
            noise = self._randn(n, *self.sample_shape)
            with self._no_sync(self._f_train, k == self.accum - 1):
                loss, loss_d, keep = self.fake_score_terms(x_g, sigma, noise, labels, real)
                total = loss * c.fake_loss_scale + (0 if loss_d is None else loss_d * c.adv_loss_scale_d)
                self.scaler_f.scale(total / self.accum).backward()
            loss_sum += float(loss.detach())
            d_sum += 0.0 if loss_d is None else float(loss_d.detach())
            d = n - keep.sum()
            dropped = d if dropped is None else dropped + d
        self.scaler_f.unscale_(self.opt_f)
        bad_grads, n_grads = sanitize_grads(self.fake.parameters())
        if c.adv_on:  # SiDA clips f_psi's gradients by value once the discriminator trains it
            torch.nn.utils.clip_grad_value_(self.fake.parameters(), c.adv_clip)
        self.scaler_f.step(self.opt_f)  # fp16: a step whose gradients overflowed is skipped
        self.scaler_f.update()
        out = {"loss_fake": loss_sum / self.accum, "nan_samples": int(dropped), "nan_grads": bad_grads,
               "rows": n * self.accum, "grads": n_grads}
        if c.adv_on:
            out["loss_d"] = d_sum / self.accum
        return out

    def fake_score_terms(self, x_g: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None,
                         real: torch.Tensor | None = None):
        """(fake-score loss, discriminator loss or None, kept rows) of one micro-batch: f_psi
        denoises x_g + sigma noise; with `real` (SiDA) its encoder also scores real + sigma noise
        (the same sigma and noise) in the same pass, which decodes the generated rows only."""
        c = self.config
        n = x_g.shape[0]
        valid = row_valid(x_g)
        x_in = torch.where(bcast(valid, x_g), x_g, torch.zeros_like(x_g))
        x_noisy = x_in + bcast(sigma, x_in) * noise
        if real is None:
            y_fake = self._net(self._call_f_train, x_noisy, sigma, labels)
            loss_d = None
        else:
            both = torch.cat([x_noisy, real + bcast(sigma, real) * noise])
            y_fake, logits = self._net(self._call_f_train, both, torch.cat([sigma, sigma]),
                                       None if labels is None else torch.cat([labels, labels]),
                                       return_logits=True, decoder_rows=n)
            logit_fake, logit_real = logits[:n], logits[n:]
        loss = kernel_ops().fake_score_loss(y_fake, x_g, sigma, sigma_data=c.sigma_data, backend=c.backend)
        # the rows the op dropped: non-finite x_g or non-finite f_psi output (and, with SiDA, logits)
        keep = valid & row_valid(y_fake.detach())
        if real is not None:
            keep = keep & row_valid(logit_fake.detach()) & row_valid(logit_real.detach())
            loss_d = discriminator_loss(logit_fake, logit_real, sigma, keep, sigma_data=c.sigma_data)
        return loss, loss_d, keep
