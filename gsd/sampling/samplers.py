"""EDM samplers (docs/definitions.md §3.2): deterministic Heun (the multi-step baseline), Euler, the
stochastic "churn" sampler, and a stochastic ancestral (DDPM-like) sampler with optional
loss guidance: DSG (Diffusion with Spherical Gaussian constraint, Yang et al. 2024) and
plain DPS-style loss guidance (`guided_sample`, `dsg_step`).

The time steps and the ODE state are float64 (as in EDM); the denoiser is evaluated on
float32 inputs as `denoiser(x, sigma, class_labels)` with sigma of shape (N,).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from gsd.errors import GuidanceError

__all__ = ["edm_sigma_steps", "heun_sample", "teacher_ode_pairs", "euler_sample", "churn_sample", "heun_nfe",
           "latents_for_seeds", "SeedStreams", "ancestral_sigmas", "ancestral_sample", "dsg_step",
           "guided_sample", "GuidanceError", "GUIDANCE_METHODS", "STOCHASTIC_SAMPLERS"]


def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> torch.Tensor:
    """t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N, and t_N = 0.

    float64, shape (num_steps + 1,).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    frac = i / (num_steps - 1) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    t = (hi + frac * (lo - hi)) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of the Heun sampler: an Euler step + correction per step, none
    on the last (t_N = 0) -> 2 N - 1."""
    return 2 * num_steps - 1


def _seed_to_int(seed) -> int:
    return int(seed) % (2 ** 63)


def latents_for_seeds(seeds: Sequence[int], shape: Sequence[int], device="cpu",
                      dtype=torch.float32) -> torch.Tensor:
    """Standard normal latents (len(seeds), *shape), one CPU torch.Generator per seed.

    `shape` is the shape of ONE sample. Sample i depends only on seeds[i], not on the
    batch it is drawn in.
    """
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(seeds),) + shape, dtype=torch.float32)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(_seed_to_int(seed))
        out[i] = torch.randn(shape, generator=gen)
    return out.to(device=device, dtype=dtype)


class SeedStreams:
    """One random stream per sample (CPU generators), for per-sample noise in samplers.

    The streams are derived from the seeds but differ from `latents_for_seeds`' streams, so
    that the churn noise is independent of the latents.
    """

    def __init__(self, seeds: Sequence[int], salt: int = 0x5EED):
        self.generators = [torch.Generator().manual_seed((_seed_to_int(s) * 6364136223846793005 + salt)
                                                         % (2 ** 63)) for s in seeds]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} seeds for a batch of {x.shape[0]}")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64)
                             for g in self.generators])
        return noise.to(device=x.device, dtype=x.dtype)


def _evaluate(denoiser, x: torch.Tensor, sigma: float, class_labels, dtype=torch.float32) -> torch.Tensor:
    sig = torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)
    return denoiser(x.to(dtype), sig, class_labels).to(torch.float64)


def _check(latents: torch.Tensor, class_labels):
    if latents.ndim < 2:
        raise ValueError(f"latents must be (N, ...), got shape {tuple(latents.shape)}")
    if class_labels is not None and torch.as_tensor(class_labels).shape[0] != latents.shape[0]:
        raise ValueError("class_labels must have one row per latent")


def ode_sample(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
               sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, heun: bool = True,
               eval_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The probability-flow ODE on EDM's steps, in float64; returns float64 samples.

    heun=True: Euler step + Heun correction except on the last step (2*num_steps - 1 calls);
    heun=False: Euler only (num_steps calls). The denoiser is evaluated in `eval_dtype`
    (float64 with a float64 network for finite differences such as PPL).
    """
    _check(latents, class_labels)
    t = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        d_cur = (x - _evaluate(denoiser, x, t_cur, class_labels, eval_dtype)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_next = (x_next - _evaluate(denoiser, x_next, t_next, class_labels, eval_dtype)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


@torch.no_grad()
def heun_sample(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler; latents ~ N(0, I) (scaled by t_0 here).

    Returns float32 samples of the latents' shape. 2*num_steps - 1 denoiser calls.
    """
    return ode_sample(denoiser, latents, class_labels, num_steps=num_steps, sigma_min=sigma_min,
                      sigma_max=sigma_max, rho=rho, heun=True).to(torch.float32)


@torch.no_grad()
def teacher_ode_pairs(denoiser, count: int, sample_shape, *, seed: int, num_classes: int = 0, device="cpu",
                      num_steps: int = 18, chunk: int = 2048, progress=None):
    """`count` pairs (eps, x = heun_sample(denoiser, eps)) for the distiller's regression term:
    eps ~ N(0, I) of `sample_shape` from a CPU generator seeded `seed` (the same pairs on any
    device and under DDP on every rank), with a uniform class label per pair when num_classes > 0.
    Drawn `chunk` at a time; `progress` (a gsd.progress bar) advances by the pairs done.
    Returns (eps, x, labels or None) on `device`."""
    if count < 1 or chunk < 1:
        raise ValueError(f"count and chunk must be >= 1, got {count}, {chunk}")
    rng = torch.Generator().manual_seed(_seed_to_int(seed))
    eps = torch.randn((count, *sample_shape), generator=rng)
    labels = torch.randint(0, num_classes, (count,), generator=rng) if num_classes > 0 else None
    eps, labels = eps.to(device), None if labels is None else labels.to(device)
    out = []
    for start in range(0, count, chunk):
        cls = None if labels is None else labels[start:start + chunk]  # integer labels, as the distiller passes them
        out.append(heun_sample(denoiser, eps[start:start + chunk], cls, num_steps=num_steps))
        if progress is not None:
            progress.update(out[-1].shape[0])
    return eps, torch.cat(out), labels


@torch.no_grad()
def euler_sample(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """First-order (Euler) probability-flow ODE sampler on the same steps; num_steps calls."""
    return ode_sample(denoiser, latents, class_labels, num_steps=num_steps, sigma_min=sigma_min,
                      sigma_max=sigma_max, rho=rho, heun=False).to(torch.float32)


@torch.no_grad()
def churn_sample(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 S_churn: float = 40.0, S_min: float = 0.05, S_max: float = 50.0, S_noise: float = 1.003,
                 seeds: Sequence[int] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's stochastic sampler (Heun with noise injection for t in [S_min, S_max]).

    Noise: per-sample streams derived from `seeds` when given (a sample then does not
    depend on the batch), else `generator` (or the global RNG).
    """
    _check(latents, class_labels)
    if seeds is not None:
        streams = SeedStreams(seeds)
        randn_like = streams.randn_like
    else:
        def randn_like(x):
            return torch.randn(x.shape, generator=generator, dtype=x.dtype,
                               device=generator.device if generator is not None else x.device).to(x.device)
    t = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * randn_like(x)
        else:
            x_hat = x
        d_cur = (x_hat - _evaluate(denoiser, x_hat, t_hat, class_labels)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - _evaluate(denoiser, x_next, t_next, class_labels)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(torch.float32)


# ----------------------------------------------------------------------------------------
# Ancestral sampler and loss guidance (DSG / DPS).

GUIDANCE_METHODS = ("none", "dsg", "dps")
# more sampler steps than any diffusion sampler takes (DDPM's 1000); a bound on the schedule
# tensors and noise draws a mistyped count would allocate
MAX_SAMPLER_STEPS = 10_000
STOCHASTIC_SAMPLERS = ("ancestral",)
_DETERMINISTIC_SAMPLERS = ("heun", "euler")


def ancestral_sigmas(t_cur: float, t_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from noise level t_cur to t_next < t_cur.

    In the EDM (variance-exploding) parametrisation x_t = x0 + t eps, the DDPM posterior
    q(x_s | x_t, x0) for s < t is Gaussian with mean x0 + (s^2/t^2)(x_t - x0) and std
    s sqrt(t^2 - s^2) / t. With x0 replaced by the denoiser's x0_hat this is the step
        mean = x_t + (sigma_down - t) (x_t - x0_hat) / t,   x_s = mean + sigma_up eps,
    sigma_up = eta s sqrt(t^2 - s^2)/t (capped at s), sigma_down = sqrt(s^2 - sigma_up^2),
    so that the marginal noise level of x_s stays s. eta = 1 is the DDPM posterior
    (sigma_down = s^2/t), eta = 0 the deterministic Euler/DDIM step. t_next = 0 gives
    (0, 0): the last step returns x0_hat.
    """
    t_cur, t_next = float(t_cur), float(t_next)
    if not t_cur > t_next >= 0:
        raise ValueError(f"need t_cur > t_next >= 0, got {t_cur}, {t_next}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if t_next == 0 or eta == 0:
        return t_next, 0.0
    up = min(t_next, eta * t_next * math.sqrt(t_cur ** 2 - t_next ** 2) / t_cur)
    down = math.sqrt(max(t_next ** 2 - up ** 2, 0.0))
    return down, up


def _noise_source(seeds, generator):
    if seeds is not None:
        return SeedStreams(seeds).randn_like

    def randn_like(x):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype,
                           device=generator.device if generator is not None else x.device).to(x.device)
    return randn_like


def dsg_step(mean: torch.Tensor, noise: torch.Tensor, grad: torch.Tensor, noise_std,
             guidance_rate: float) -> torch.Tensor:
    """One DSG step: the guided sample on the sphere of radius sqrt(n) * noise_std around `mean`.

    n = number of elements of one sample (mean[i].numel()); noise = noise_std * eps, the
    step's own noise (d_sample); grad = gradient of the loss (per sample).
        d*  = -sqrt(n) noise_std grad / ||grad||        (steepest descent, on the sphere)
        d_m = d_sample + guidance_rate (d* - d_sample)
        x   = mean + sqrt(n) noise_std d_m / ||d_m||
    noise_std: float or one value per sample. Samples with a zero (or non-finite)
    gradient keep their noise direction (d* = d_sample); if d_m vanishes (a degenerate
    case: rate 1/2 and d* = -d_sample) the noise direction is used. All norms are per sample.
    """
    if mean.shape != noise.shape or mean.shape != grad.shape:
        raise ValueError(f"mean {tuple(mean.shape)}, noise {tuple(noise.shape)} and grad "
                         f"{tuple(grad.shape)} must have the same shape")
    if not 0 <= guidance_rate <= 1:
        raise ValueError(f"guidance_rate must be in [0, 1], got {guidance_rate}")
    b = mean.shape[0]
    view = (b,) + (1,) * (mean.ndim - 1)
    n = mean[0].numel()
    std = torch.as_tensor(noise_std, dtype=mean.dtype, device=mean.device).reshape(-1)
    std = (std.expand(b) if std.numel() == 1 else std).reshape(view)
    radius = math.sqrt(n) * std
    flat_norm = lambda v: v.reshape(b, -1).norm(dim=1).reshape(view)  # noqa: E731
    g = torch.nan_to_num(grad.to(mean.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    g_norm = flat_norm(g)
    ok = g_norm > 0
    d_star = torch.where(ok, -radius * g / torch.where(ok, g_norm, torch.ones_like(g_norm)), noise)
    d_m = noise + guidance_rate * (d_star - noise)
    m_norm = flat_norm(d_m)
    ok_m = m_norm > 0
    direction = torch.where(ok_m, d_m / torch.where(ok_m, m_norm, torch.ones_like(m_norm)),
                            noise / flat_norm(noise).clamp_min(torch.finfo(mean.dtype).tiny))
    return mean + radius * direction


def _denoise_with_grad(denoiser, x: torch.Tensor, sigma: float, class_labels, loss_fn):
    """x0_hat = D(x; sigma) and the gradient of sum_i loss_fn(x0_hat)_i w.r.t. x (float64)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = _evaluate(denoiser, xg, sigma, class_labels)
        if not x0.requires_grad:
            raise GuidanceError("loss guidance needs a denoiser that is differentiable with respect to its "
                                "input (its output carries no gradient: is it run under torch.no_grad or detached?)")
        loss = loss_fn(x0.to(torch.float32))
        if not torch.is_tensor(loss) or loss.numel() not in (1, x.shape[0]):
            raise GuidanceError(f"the guidance loss must return a scalar or one value per sample "
                                f"({x.shape[0]}), got {getattr(loss, 'shape', type(loss).__name__)}")
        if not loss.requires_grad:
            raise GuidanceError("the guidance loss does not depend on the clean estimate x0_hat differentiably")
        loss = loss.reshape(-1)
        loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))  # drop non-finite samples
        (grad,) = torch.autograd.grad(loss.sum(), xg)
    grad = torch.nan_to_num(grad.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    return x0.detach(), grad


def _ancestral_loop(denoiser, latents, class_labels, *, num_steps, sigma_min, sigma_max, rho, eta,
                    seeds, generator, loss_fn=None, method="none", guidance_rate=0.0, step_size=0.0,
                    guide_min_sigma=0.0, trace=None):
    _check(latents, class_labels)
    randn_like = _noise_source(seeds, generator)
    t = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        down, up = ancestral_sigmas(t_cur, t_next, eta)
        guided = method != "none" and t_cur >= guide_min_sigma and (method == "dps" or up > 0)
        if guided:
            x0, grad = _denoise_with_grad(denoiser, x, t_cur, class_labels, loss_fn)
        else:
            with torch.no_grad():
                x0 = _evaluate(denoiser, x, t_cur, class_labels)
        mean = x + (down - t_cur) * ((x - x0) / t_cur)
        noise = up * randn_like(x) if up > 0 else None
        if guided and method == "dsg":
            x_next = dsg_step(mean, noise, grad, up, guidance_rate)
        else:
            x_next = mean if noise is None else mean + noise
            if guided:  # dps
                x_next = x_next - step_size * grad
        if trace is not None:
            trace.append(dict(t_cur=t_cur, t_next=t_next, sigma_up=up, sigma_down=down, mean=mean.detach(),
                              noise=noise, x_next=x_next.detach(), guided=guided))
        x = x_next.detach()
    return x.to(torch.float32)


@torch.no_grad()
def ancestral_sample(denoiser, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, eta: float = 1.0,
                     seeds: Sequence[int] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic ancestral (DDPM-posterior) sampler on EDM's time steps; num_steps calls.

    Each step from t_i to t_{i+1}: x0_hat = D(x; t_i), mean = x + (sigma_down - t_i)(x - x0_hat)/t_i,
    x_{i+1} = mean + sigma_up eps (see `ancestral_sigmas`; eta = 1: DDPM posterior, eta = 0:
    Euler). Noise as `churn_sample`: per-sample streams from `seeds`, else `generator`.
    """
    return _ancestral_loop(denoiser, latents, class_labels, num_steps=num_steps, sigma_min=sigma_min,
                           sigma_max=sigma_max, rho=rho, eta=eta, seeds=seeds, generator=generator)


def guided_sample(denoiser, latents: torch.Tensor, loss_fn=None, class_labels=None, *, method: str = "dsg",
                  sampler: str = "ancestral", guidance_rate: float = 0.1, step_size: float = 1.0,
                  num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  eta: float = 1.0, guide_min_sigma: float = 0.0, seeds: Sequence[int] | None = None,
                  generator: torch.Generator | None = None, trace: list | None = None) -> torch.Tensor:
    """Loss-guided stochastic sampling (training-free conditional generation).

    loss_fn(x0_hat) -> per-sample losses (N,) (or a scalar sum) of the float32 clean estimate
    x0_hat = D(x_t; t) of the (N, ...) batch; it must be differentiable. Guidance uses the
    gradient g = grad_{x_t} loss(D(x_t; t)) through the denoiser (one forward + backward per
    step, no extra network evaluations: num_steps calls as the unguided sampler).

    The sampler is `ancestral` (see `ancestral_sample`): each step is a Gaussian step with
    mean `mean = x + (sigma_down - t)(x - x0_hat)/t` and noise std `sigma_up`, i.e. the DDPM
    posterior in EDM's sigma parametrisation; the 'mean' and 'noise std' DSG needs are
    exactly these (EDM churn instead adds its noise *before* the denoiser call, so its
    noise is not around a mean that the loss gradient at x_t can steer; not supported).

    method:
      - "none": the unguided sampler (== `ancestral_sample` with the same seeds).
      - "dsg": x_next = mean + sqrt(n) sigma_up d_m/||d_m||, d_m = d_sample + guidance_rate
        (d* - d_sample), d_sample = sigma_up eps, d* = -sqrt(n) sigma_up g/||g|| (`dsg_step`).
        guidance_rate in [0, 1]; 0 is *defined* as no guidance and returns the unguided
        sampler's output exactly (the noise is then not projected onto the sphere; with
        rate > 0 the step lies on the sphere, whose radius differs from ||sigma_up eps||
        by O(1/sqrt(2n)) relative). Steps with sigma_up = 0 (the last step, to t = 0)
        cannot be guided by DSG and are unguided.
      - "dps": x_next = mean + sigma_up eps - step_size g (plain loss guidance, every step).
    guide_min_sigma: guide only steps with t_i >= this (0: all).
    Deterministic samplers (`heun`, `euler`, or eta = 0) cannot take guidance: GuidanceError.
    trace: if a list, gets one dict per step (t_cur, t_next, sigma_up, sigma_down, mean, noise,
    x_next, guided) for inspection.
    """
    if method not in GUIDANCE_METHODS:
        raise GuidanceError(f"unknown guidance method {method!r} (known: {', '.join(GUIDANCE_METHODS)})")
    if sampler in _DETERMINISTIC_SAMPLERS:
        if method != "none":
            raise GuidanceError(f"{method} guidance needs a stochastic sampler ({', '.join(STOCHASTIC_SAMPLERS)}); "
                                f"{sampler} is deterministic")
    elif sampler == "churn":
        raise GuidanceError("guidance is implemented on the ancestral sampler; EDM churn injects its noise "
                            "before the denoiser call, so it has no Gaussian step around a guidable mean")
    elif sampler not in STOCHASTIC_SAMPLERS:
        raise GuidanceError(f"unknown sampler {sampler!r} (known: ancestral, heun, euler, churn)")
    if method != "none":
        if loss_fn is None or not callable(loss_fn):
            raise GuidanceError(f"{method} guidance needs a loss function")
        if eta == 0:
            raise GuidanceError(f"{method} guidance needs a stochastic sampler; eta=0 makes the ancestral "
                                "sampler deterministic")
    if not (isinstance(guidance_rate, (int, float)) and 0 <= guidance_rate <= 1):
        raise GuidanceError(f"guidance_rate must be in [0, 1], got {guidance_rate}")
    if not (isinstance(step_size, (int, float)) and 0 <= step_size < float("inf")):
        raise GuidanceError(f"step_size must be a finite number >= 0, got {step_size}")
    if not 0 <= eta <= 1:
        raise GuidanceError(f"eta must be in [0, 1], got {eta}")
    if method == "dsg" and guidance_rate == 0:
        method = "none"
    if method == "dps" and step_size == 0:
        method = "none"
    if sampler in _DETERMINISTIC_SAMPLERS:
        fn = heun_sample if sampler == "heun" else euler_sample
        return fn(denoiser, latents, class_labels, num_steps=num_steps, sigma_min=sigma_min,
                  sigma_max=sigma_max, rho=rho)
    with torch.no_grad():
        return _ancestral_loop(denoiser, latents, class_labels, num_steps=num_steps, sigma_min=sigma_min,
                               sigma_max=sigma_max, rho=rho, eta=eta, seeds=seeds, generator=generator,
                               loss_fn=loss_fn, method=method, guidance_rate=float(guidance_rate),
                               step_size=float(step_size), guide_min_sigma=float(guide_min_sigma), trace=trace)
