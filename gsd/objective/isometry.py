"""The isometric term of the generator step: its latents (anchors with neighbours), the
isometry loss over pairs or groups (gsd_kernels), the Jacobian estimator, and the floor of
the scale-free weight (docs/definitions.md §2.1, §3.4)."""

from __future__ import annotations

import math

import torch

from gsd.errors import UsageError
from gsd.jacobian_isometry import distortion_terms
from gsd.objective.rows import kernel_ops
from gsd_kernels.reference import local_bandwidth_sq, local_bandwidth_sq_grouped

__all__ = ["IsometryTerm", "IRL_GRADIENT_FLOOR", "check_irl_radius"]

# The scale-free weight's floor on the isometric gradient's norm, in units of sqrt(N) / delta
# (IsometryTerm._irl_gradient_floor). An exact linear isometry gives 1e-9 (float64 kernels) to
# 6e-8 (the float32 reference) in these units, one perturbed by 1e-3 (L ~ 2e-8) ~5e-6, maps with
# the isometry loss of trained generators (L ~ 1e-4 - 1e-2) 3e-4 - 3e-3: the floor binds only
# near an exact isometry.
IRL_GRADIENT_FLOOR = 1e-5

# A neighbour eps + R u differs from its anchor eps by R/sqrt(D) per component on average; below
# ~1000 float32 rounding steps (of unit-sized values) that difference, and G's response to it,
# is rounding noise, and at R = 1e-12 the neighbours round to their anchors: the term's loss is 1
# and its weight 0, a plain SiD run that calls itself GSD.
MIN_IRL_RADIUS_PER_SQRT_DIM = 1e3 * float(torch.finfo(torch.float32).eps)


def check_irl_radius(radius: float, neighbours: int, dim: int) -> None:
    """UsageError unless neighbours at distance `radius` in a `dim`-dimensional latent resolve in float32."""
    low = MIN_IRL_RADIUS_PER_SQRT_DIM * math.sqrt(dim)
    if neighbours > 0 and radius < low:
        raise UsageError(f"--irl-radius {radius:g} is below {low:.3g} (1.2e-4 x sqrt of the latent dimension {dim}): "
                         f"the neighbours would differ from their anchors only by float32 rounding")



class IsometryTerm:
    """The isometric term of gsd.distill.Distiller (a mixin). Reads the Distiller's config,
    generator, rng, world, device and sample_shape, and draws latents with its `_latents`."""

    def _generator_latents(self, n: int):
        """Latents of the generator step. K = irl_neighbours = 0: n independent latents (the
        same draws as `_latents`). K > 0: n / (K+1) anchors eps, each followed by its K
        neighbours eps + R u_k, u_k uniform on the unit sphere of dimension prod(sample_shape),
        with the anchor's class label (rows a(K+1) .. a(K+1)+K are anchor a's group)."""
        k = self.config.irl_neighbours
        if k == 0:
            return self._latents(n)
        g = k + 1
        anchors, labels = self._latents(n // g)
        flat = anchors.reshape(n // g, 1, -1)
        u = self._randn(n // g, k, flat.shape[-1])
        u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        eps = torch.cat([flat, flat + self.config.irl_radius * u], dim=1).reshape(n, *self.sample_shape)
        if labels is not None:
            labels = labels.repeat_interleave(g)
        return eps, labels

    def _irl_term(self, x: torch.Tensor, eps: torch.Tensor, labels, valid: torch.Tensor, parts: dict):
        """The isometry loss of the generator step (sets parts["loss_irl"]); returns (loss or
        None when too few rows are left, factor): the loss is back-propagated with weight x
        factor (the world size for the global-batch loss under DDP, else 1)."""
        c = self.config
        n = x.shape[0]
        if c.irl_estimator == "jvp":
            return self._jvp_term(eps, labels, valid, parts), 1
        z = c.sigma_init * eps
        k = c.irl_neighbours
        kw = dict(weighting=c.irl_weighting, bandwidth=c.irl_bandwidth, scale=c.irl_scale, backend=c.backend)
        # groups never straddle ranks (accum_steps checks that the micro-batch is a multiple of
        # K+1), so under DDP the global batch's loss (random pairs or groups) comes from the
        # distributed op: one optimal scale for the whole batch, as in one process
        groups = k + 1 if k > 0 else None
        # rows that may enter the loss: finite ones; with groups a dropped row drops its group
        keep = valid.reshape(n // groups, groups).all(1).repeat_interleave(groups) if groups else valid
        # the global-batch loss needs the same rows on every rank: in an iteration where some
        # rank dropped one, every rank takes the loss of its own kept rows instead
        if self.world > 1 and self._no_rank_dropped(n - int(keep.sum())):
            from gsd_kernels.distributed import isometry_loss as dist_isometry_loss
            l_irl = dist_isometry_loss(x, z, groups=groups, **kw)
            parts["loss_irl"] = float(l_irl.detach())
            return l_irl, self.world
        if int(keep.sum()) < (groups or 2):
            parts["loss_irl"] = float("nan")
            return None, 1
        x_v, z_v = (x, z) if bool(keep.all()) else (x[keep], z[keep])
        l_irl = kernel_ops().isometry_loss(x_v, z_v, groups=groups, **kw)
        parts["loss_irl"] = float(l_irl.detach())
        return l_irl, 1

    def _no_rank_dropped(self, dropped: int) -> bool:
        """Whether no process dropped a row of this micro-batch (the same answer on every rank)."""
        bad = torch.tensor([dropped], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(bad)
        return int(bad) == 0

    def _jvp_term(self, eps: torch.Tensor, labels, valid: torch.Tensor, parts: dict):
        """--irl-estimator jvp: the relaxed distortion measure of G's Jacobian at the anchors
        (every latent of the micro-batch, one Gaussian probe each, drawn from the run's RNG),
        gsd.jacobian_isometry. It is a separate pass through G (a forward, and vector-Jacobian
        products with a graph for the double backward), in float32 without autocast, through the
        plain module (not the compiled or DDP wrapper).

        Anchors whose x_g was dropped are left out before the pass, and anchors whose terms come
        out non-finite are left out by a pass without them (with the same probes): dropping them
        from the mean afterwards would keep their graph, whose backward puts NaN into the
        parameter gradients."""

        c = self.config
        z = c.sigma_init * eps
        # the probes as distortion_terms would draw them, kept for a pass over fewer anchors
        u = torch.randn((1, *z.shape), generator=self.rng, device=z.device, dtype=z.dtype)
        keep = valid.clone()
        while True:
            rows = keep.nonzero().squeeze(1)
            if rows.numel() == 0:
                parts["loss_irl"] = float("nan")
                return None
            sigma = torch.full((rows.numel(),), c.sigma_init, device=eps.device)
            sub_labels = None if labels is None else labels[rows]

            def fn(t):
                return self.generator(t, sigma, sub_labels)

            # the double-backward route: about 1.5x cheaper than forward-mode AD on the digits network,
            # it runs through gradient checkpointing, and it draws dropout masks as a plain forward does
            num, den = distortion_terms(fn, z[rows], probes=u[:, rows], method="double_backward")
            finite = torch.isfinite(num) & torch.isfinite(den)
            if bool(finite.all()):
                break
            keep[rows[~finite]] = False
        l_irl = num.mean() / den.mean() ** 2
        parts["loss_irl"] = float(l_irl.detach())
        return l_irl

    def _irl_gradient_floor(self, x: torch.Tensor, valid: torch.Tensor, factor: float) -> float:
        """The least norm the scale-free weight divides the isometric x-gradient's by:
        IRL_GRADIENT_FLOOR sqrt(N) / delta, delta the RMS distance of the pairs the loss compares
        (its own length scale; the norm of a gradient of a [0, 1]-valued loss of distances scales
        as sqrt(N) / delta), in the frame of the factor the term is back-propagated with. Where G
        is already an exact isometry the gradient is rounding noise, and dividing by its norm
        made w explode (36-79) and push that noise at F x the SiD gradient's norm."""
        k = self.config.irl_neighbours
        keep = valid.reshape(-1, k + 1).all(1).repeat_interleave(k + 1) if k > 0 else valid  # whole groups
        rows = x if bool(keep.all()) else x[keep]
        if rows.shape[0] < 2:
            return 0.0
        rows = rows.reshape(rows.shape[0], -1).double()
        d2 = local_bandwidth_sq_grouped(rows, k + 1) if k > 0 else local_bandwidth_sq(rows)
        if not float(d2) > 0:
            return 0.0
        n = rows.shape[0] * self.world
        return float(factor) * IRL_GRADIENT_FLOOR * math.sqrt(n) / math.sqrt(float(d2))
