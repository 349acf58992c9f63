"""SiDA's adversarial terms (docs/definitions.md §3.8): the fake-score network's encoder is the
discriminator, with no parameters of its own.

Both functions take the rows of one micro-batch of n samples and a boolean `keep` (the rows
whose inputs and network outputs are finite). They reduce as SiDA's training loop does: a sum
over the kept rows divided by n (not by the kept count), with each BCE a mean over the kept
rows' logits. The generator's form is expressed in the units of the engine's generator loss,
which the Distiller multiplies by gen_loss_scale (SiD's 100) before the backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gsd_kernels.reference import edm_loss_weight

__all__ = ["discriminator_loss", "generator_adversarial_loss", "GAN_LOGIT_CLAMP", "SID_WEIGHT_FLOOR"]

# the generator's BCE sees logits clamped to [-10, 10] (the discriminator's do not)
GAN_LOGIT_CLAMP = 10.0
# the floor of SiD's per-sample weight mean |x - y_real| (sid_generator_loss uses the same)
SID_WEIGHT_FLOOR = 1e-5


def discriminator_loss(logit_fake: torch.Tensor, logit_real: torch.Tensor, sigma: torch.Tensor, keep: torch.Tensor,
                       *, sigma_data: float = 0.5) -> torch.Tensor:
    """(1/n) sum_kept lambda(sigma_i) (BCE(logit_real, 1) + BCE(logit_fake, 0)) / 2.

    logit_* (n, ...): the encoder logits of the noised generated and real samples (same sigma
    and noise); sigma (n,); lambda = EDM's loss weight. Not scaled by --adv-loss-scale-d."""
    n = logit_fake.shape[0]
    lf, lr = logit_fake[keep].float(), logit_real[keep].float()
    bce = (F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
           + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))) / 2
    weight = edm_loss_weight(sigma[keep].float(), sigma_data)
    return (weight * bce).sum() / n


def generator_adversarial_loss(logits: torch.Tensor, x: torch.Tensor, y_real: torch.Tensor, keep: torch.Tensor,
                               *, loss_scale: float, gen_loss_scale: float) -> torch.Tensor:
    """(loss_scale / gen_loss_scale) (1/n) sum_kept D BCE(clamp(logits), 1) / w_i, w_i = SiD's
    weight max(mean |x_i - y_real_i|, 1e-5) (no gradient), D the sample's dimension.

    logits (n, ...): the encoder logits of the noised generated samples; x, y_real (n, ...): the
    samples and the teacher's denoising of them. Multiplied by gen_loss_scale it is SiDA's
    loss_scaling_G_gan-scaled generator term."""
    n = x.shape[0]
    dim = math.prod(x.shape[1:])
    lk = logits[keep].float().clamp(-GAN_LOGIT_CLAMP, GAN_LOGIT_CLAMP)
    bce = F.binary_cross_entropy_with_logits(lk, torch.ones_like(lk))
    with torch.no_grad():
        w = (x[keep] - y_real[keep]).abs().float().flatten(1).mean(1).clamp_min(SID_WEIGHT_FLOOR)
    return (loss_scale / gen_loss_scale) * dim * bce * (1.0 / w).sum() / n
