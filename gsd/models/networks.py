"""Denoiser networks: EDM preconditioning (docs/definitions.md §3.1), a DDPM++-style U-Net, an MLP.

`EDMPrecond` wraps a raw network F into the EDM denoiser

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)

with c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
c_in = 1/sqrt(sigma^2+sd^2), c_noise = ln(sigma)/4.

`SongUNet` follows the module layout and parameter names of the DDPM++ configuration
of the U-Net in NVlabs' EDM code base (``enc``/``dec`` ModuleDicts keyed
``"32x32_conv"``, ``"16x16_down"``, ``"16x16_block0"``, ``"8x8_in0"``, ``"32x32_aux_conv"``...,
``map_noise``/``map_label``/``map_layer0``/``map_layer1``, blocks with
``norm0/conv0/affine/norm1/conv1/skip/norm2/qkv/proj``), so that a state dict of that
layout can be loaded into it. The code here is written independently.

Checkpoints are safetensors files whose metadata carries the JSON config, so that
gsd.models.checkpoint can rebuild the network without any other information.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from gsd.errors import UsageError

FORMAT_NAME = "gsd-denoiser"
FORMAT_VERSION = 1

__all__ = [
    "EDMPrecond", "SongUNet", "NCSNppUNet", "DhariwalUNet", "FourierEmbedding", "FusedDownConv2d", "MLPDenoiserNet", "UNetBlock", "PositionalEmbedding",
    "Linear", "Conv2d", "GroupNorm", "build_denoiser", "default_config",
    "edm_coefficients", "edm_ddpmpp_config", "FORMAT_NAME", "FORMAT_VERSION",
    "count_parameters", "set_gradient_checkpointing", "set_dropout",
]


class _CheckpointedBlock(nn.Module):
    """A residual block whose activations can be recomputed in the backward pass instead of
    stored (gradient checkpointing; `set_gradient_checkpointing`). Subclasses define `block`."""

    checkpointing = False  # a plain attribute: state dicts and checkpoints are unchanged

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # non-reentrant: works with DDP, torch.compile and inputs that need no gradient;
            # dropout draws the same mask again because the RNG state is restored
            return torch.utils.checkpoint.checkpoint(self.block, x, emb, use_reentrant=False)
        return self.block(x, emb)


# ----------------------------------------------------------------------------------------
# Constructor argument checks. Configs come from files (safetensors metadata, EDM pickles), so
# a bad value must give a ValueError naming it, not an IndexError deep inside the build.

MAX_IMG_RESOLUTION = 8192  # no pixel-space diffusion network is larger; also bounds test inputs


def check_int(name: str, value, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be at least {lo}, got {value}" if hi is None
                         else f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_int_list(name: str, value, lo: int = 1, allow_empty: bool = False) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return [check_int(f"{name}[{i}]", v, lo) for i, v in enumerate(value)]


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_sigma_data(value) -> float:
    """sigma_data as a float; ValueError unless finite and > 0 (it divides the EDM coefficients)."""
    try:
        sd = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"sigma_data must be a number, got {value!r}") from None
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sigma_data must be finite and > 0, got {value!r}")
    return sd


def check_unet_args(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                    channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout, label_dropout) -> None:
    """The argument checks shared by the U-Nets (SongUNet, NCSN++, ADM)."""
    check_int("img_resolution", img_resolution, 1, MAX_IMG_RESOLUTION)
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("model_channels", model_channels), ("channel_mult_emb", channel_mult_emb),
                        ("num_blocks", num_blocks)):
        check_int(name, value, 1)
    check_int("label_dim", label_dim, 0)
    check_int("augment_dim", augment_dim, 0)
    levels = len(check_int_list("channel_mult", channel_mult))
    check_int_list("attn_resolutions", list(attn_resolutions), 1, allow_empty=True)
    check_fraction("dropout", dropout)
    check_fraction("label_dropout", label_dropout)
    if levels > 1 and img_resolution < 2 ** (levels - 1):
        raise ValueError(f"img_resolution {img_resolution} is too small for {levels} levels")


# ----------------------------------------------------------------------------------------
# Initialisation and primitive layers (parameter names as in EDM: weight, bias).

def _init_tensor(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A freshly initialised tensor of `shape` (uniform/normal Xavier or Kaiming)."""
    if mode == "xavier_uniform":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return torch.empty(shape).uniform_(-bound, bound)
    if mode == "xavier_normal":
        return torch.empty(shape).normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        bound = math.sqrt(3.0 / fan_in)
        return torch.empty(shape).uniform_(-bound, bound)
    if mode == "kaiming_normal":
        return torch.empty(shape).normal_(0.0, math.sqrt(1.0 / fan_in))
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """Fully connected layer; `weight` is (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fan = dict(fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init_tensor([out_features, in_features], init_mode, **fan) * init_weight)
        self.bias = (nn.Parameter(_init_tensor([out_features], init_mode, **fan) * init_bias)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _resample_kernel(taps: Sequence[int]) -> torch.Tensor:
    t = torch.as_tensor(list(taps), dtype=torch.float32)
    k = torch.outer(t, t)
    return (k / k.sum()).reshape(1, 1, len(taps), len(taps))


class Conv2d(nn.Module):
    """2-D convolution with optional 2x up/down resampling by a separable FIR filter.

    ``kernel=0`` gives a resampling-only layer (no weight). The FIR filter is a buffer
    named ``resample_filter`` (present only when up or down), as in EDM's layout.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[int] = (1, 1),
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        fan = dict(fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(_init_tensor([out_channels, in_channels, kernel, kernel], init_mode, **fan)
                                    * init_weight) if kernel else None)
        self.bias = (nn.Parameter(_init_tensor([out_channels], init_mode, **fan) * init_bias)
                     if kernel and bias else None)
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        c = x.shape[1]
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)
            else:
                x = F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most `num_groups` groups and >= `min_channels_per_group`."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        while num_channels % groups:  # EDM's rule, then the largest divisor below it
            groups -= 1
        self.num_groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample: [cos(x f_i), sin(x f_i)], f_i geometric."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        if num_channels % 2:
            raise ValueError("PositionalEmbedding needs an even number of channels")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        denom = max(half - (1 if self.endpoint else 0), 1)
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / denom
        freqs = (1.0 / self.max_positions) ** freqs
        angles = torch.outer(x.to(torch.float32), freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1).to(x.dtype)


# ----------------------------------------------------------------------------------------
# The U-Net block and the DDPM++ U-Net.

class UNetBlock(_CheckpointedBlock):
    """Pre-activation residual block with the embedding injected between the two convs,
    optional 2x up/down sampling and optional single-head self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[int] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0.0)
        init_attn = init_attn if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:
            self.num_heads = max(out_channels // channels_per_head, 1)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"{out_channels} channels do not split into {self.num_heads} heads")
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def block(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        residual = x
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = h + (self.skip(residual) if self.skip is not None else residual)
        h = h * self.skip_scale

        if self.num_heads:
            n, c, hh, ww = h.shape
            heads = self.num_heads
            # Channel layout of qkv's output: (head, channel-in-head, {q,k,v}) as in EDM.
            qkv = self.qkv(self.norm2(h)).reshape(n * heads, c // heads, 3, hh * ww)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (n*heads, hw, c/heads)
            a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
            a = a.transpose(1, 2).reshape(n, c, hh, ww)
            h = (self.proj(a) + h) * self.skip_scale
        return h


def _decoder_rows(rows, x, emb, skips):
    """The encoder's outputs cut to the first `rows` rows for the decoder (all when None)."""
    if rows is None:
        return x, emb, skips
    return x[:rows], emb[:rows], [s[:rows] for s in skips]


class SongUNet(nn.Module):
    """DDPM++ U-Net (Song et al. 2021 as configured in EDM), positional noise embedding.

    forward(x, noise_labels, class_labels, augment_labels=None): x (N, C, H, W), noise
    labels (N,), class labels (N, label_dim) one-hot/float or None.

    `__init__` is longer than the engine's ~80-line rule on purpose: it builds the encoder and
    decoder in one pass whose order decides the module names of EDM's checkpoint layout
    (``enc``/``dec`` keys), and splitting it would scatter that order over several functions.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Iterable[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        super().__init__()
        if embedding_type != "positional" or encoder_type != "standard" or decoder_type != "standard":
            raise ValueError("only the DDPM++ configuration is implemented "
                             "(embedding_type='positional', encoder_type='standard', decoder_type='standard')")
        check_unet_args(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                        channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout, label_dropout)
        check_int("channel_mult_noise", channel_mult_noise, 1)
        check_int_list("resample_filter", resample_filter)
        if (model_channels * channel_mult_noise) % 2:
            raise ValueError("model_channels * channel_mult_noise must be even (sinusoidal embedding)")
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = sorted(int(r) for r in attn_resolutions)
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        self.config = dict(img_resolution=int(img_resolution), in_channels=int(in_channels),
                           out_channels=int(out_channels), label_dim=int(label_dim), augment_dim=int(augment_dim),
                           model_channels=int(model_channels), channel_mult=channel_mult,
                           channel_mult_emb=int(channel_mult_emb), num_blocks=int(num_blocks),
                           attn_resolutions=attn_resolutions, dropout=float(dropout),
                           label_dropout=float(label_dropout), embedding_type=embedding_type,
                           channel_mult_noise=int(channel_mult_noise), encoder_type=encoder_type,
                           decoder_type=decoder_type, resample_filter=[int(t) for t in resample_filter])
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.sample_shape = (in_channels, img_resolution, img_resolution)

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Embedding of noise level, class label and augmentation label.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, kernel=3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kwargs)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        # [cos, sin] -> [sin, cos] (EDM's channel order for this embedding).
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(emb.shape[0], self.label_dim, device=emb.device, dtype=emb.dtype)
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = (torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout)
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, *, return_logits: bool = False,
                decoder_rows: int | None = None):
        """The output; with return_logits (output, logits): the logits are the channel mean of
        the encoder's last feature map, (N, 1, H', W'), SiDA's discriminator (docs/definitions.md
        §3.8). decoder_rows=k: the decoder runs on the first k rows only (the output has k rows,
        the logits N), so that one pass scores extra rows with the encoder alone."""
        emb = self.embed(noise_labels, class_labels, augment_labels).to(x.dtype)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        logits = x.mean(dim=1, keepdim=True) if return_logits else None
        x, emb, skips = _decoder_rows(decoder_rows, x, emb, skips)
        out = None
        normed = None
        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                normed = block(x)
            elif name.endswith("_aux_conv"):
                out = block(F.silu(normed))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return (out, logits) if return_logits else out


# ----------------------------------------------------------------------------------------
# MLP for low-dimensional data.

class _MLPBlock(_CheckpointedBlock):
    def __init__(self, hidden: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm0 = nn.LayerNorm(hidden)
        self.fc0 = Linear(hidden, hidden, init_mode="xavier_uniform")
        self.affine = Linear(emb_channels, 2 * hidden, init_mode="xavier_uniform")
        self.norm1 = nn.LayerNorm(hidden)
        self.fc1 = Linear(hidden, hidden, init_mode="xavier_uniform", init_weight=1e-5)
        self.dropout = dropout

    def block(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.fc0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb).chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.fc1(F.dropout(h, p=self.dropout, training=self.training))
        return x + h


class MLPDenoiserNet(nn.Module):
    """Residual MLP with a sinusoidal noise embedding (scale-shift modulation per block).

    forward(x, noise_labels, class_labels): x (N, dim) (or (N, ...) with prod = dim).
    """

    def __init__(self, dim: int, label_dim: int = 0, hidden: int = 256, num_blocks: int = 4,
                 noise_channels: int = 64, emb_channels: int = 256, dropout: float = 0.0):
        super().__init__()
        for name, value, lo in (("dim", dim, 1), ("label_dim", label_dim, 0), ("hidden", hidden, 1),
                                ("num_blocks", num_blocks, 0), ("noise_channels", noise_channels, 2),
                                ("emb_channels", emb_channels, 1)):
            check_int(name, value, lo)
        check_fraction("dropout", dropout)
        self.config = dict(dim=int(dim), label_dim=int(label_dim), hidden=int(hidden), num_blocks=int(num_blocks),
                           noise_channels=int(noise_channels), emb_channels=int(emb_channels),
                           dropout=float(dropout))
        self.dim = dim
        self.label_dim = label_dim
        self.sample_shape = (dim,)
        init = dict(init_mode="xavier_uniform")
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.fc_in = Linear(dim, hidden, **init)
        self.blocks = nn.ModuleList([_MLPBlock(hidden, emb_channels, dropout) for _ in range(num_blocks)])
        self.norm_out = nn.LayerNorm(hidden)
        self.fc_out = Linear(hidden, dim, init_mode="xavier_uniform", init_weight=1e-5)

    @property
    def encoder_blocks(self) -> int:
        """The blocks on the encoder side, for SiDA's logits: the first half, rounded up (a
        U-Net's encoder is its first half too)."""
        return (len(self.blocks) + 1) // 2

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                return_logits: bool = False, decoder_rows: int | None = None):
        """The output; with return_logits (output, logits): the logits are the mean over the
        hidden features after the encoder-side blocks, (N, 1) (the analogue of the U-Nets'
        encoder logits, docs/definitions.md §3.8). decoder_rows as SongUNet.forward."""
        shape = x.shape
        h = x.reshape(shape[0], -1)
        if h.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiserNet expects {self.dim} features per sample, got {h.shape[1]}")
        emb = self.map_noise(noise_labels).to(h.dtype)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(shape[0], self.label_dim, device=h.device, dtype=h.dtype)
            emb = emb + self.map_label(class_labels.to(h.dtype) * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        h = self.fc_in(h)
        for block in self.blocks[:self.encoder_blocks]:
            h = block(h, emb)
        logits = h.mean(dim=1, keepdim=True) if return_logits else None
        h, emb, _ = _decoder_rows(decoder_rows, h, emb, [])
        for block in self.blocks[self.encoder_blocks:]:
            h = block(h, emb)
        out = self.fc_out(F.silu(self.norm_out(h))).reshape(h.shape[0], *shape[1:])
        return (out, logits) if return_logits else out


# ----------------------------------------------------------------------------------------
# The other EDM architectures: NCSN++ (SongUNet with Fourier embedding and a residual or skip
# encoder) and ADM (DhariwalUNet). gsd.teachers.edm_pickle maps EDM pickles onto them.

class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar: [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        if num_channels % 2:
            raise ValueError("FourierEmbedding needs an even number of channels")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FusedDownConv2d(Conv2d):
    """Convolution followed by the 2x FIR down-sampling (EDM's ``fused_resample=True``, down).

    The padding differs from `Conv2d` (conv first, padded by w_pad + f_pad; then the filter
    with stride 2 and no padding), so the result differs near the borders.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 resample_filter: Sequence[int] = (1, 1), **init):
        if not kernel:
            raise ValueError("FusedDownConv2d needs a kernel")
        super().__init__(in_channels, out_channels, kernel, bias=bias, down=True, resample_filter=resample_filter,
                         **init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        f = self.resample_filter.to(x.dtype)
        w_pad, f_pad = w.shape[-1] // 2, (f.shape[-1] - 1) // 2
        x = F.conv2d(x, w, padding=w_pad + f_pad)
        x = F.conv2d(x, f.expand(self.out_channels, 1, -1, -1), groups=self.out_channels, stride=2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class NCSNppUNet(SongUNet):
    """EDM's SongUNet in the NCSN++ configuration: Fourier noise embedding and a 'residual'
    (or 'skip') auxiliary encoder path; decoder 'standard' (as in EDM's ncsnpp setup)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "fourier",
                 channel_mult_noise: int = 2, encoder_type: str = "residual", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 3, 3, 1)):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"unknown embedding_type {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"unknown encoder_type {encoder_type!r}")
        if decoder_type != "standard":
            raise ValueError("only decoder_type='standard' is supported (EDM's NCSN++ and DDPM++ use it)")
        super().__init__(img_resolution, in_channels, out_channels, label_dim=label_dim, augment_dim=augment_dim,
                         model_channels=model_channels, channel_mult=channel_mult,
                         channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                         attn_resolutions=attn_resolutions, dropout=dropout, label_dropout=label_dropout,
                         embedding_type="positional", channel_mult_noise=channel_mult_noise,
                         encoder_type="standard", decoder_type="standard", resample_filter=resample_filter)
        self.config.update(embedding_type=embedding_type, encoder_type=encoder_type)
        noise_channels = model_channels * channel_mult_noise
        if embedding_type == "fourier":
            self.map_noise = FourierEmbedding(noise_channels)
        init = dict(init_mode="xavier_uniform")
        # Rebuild the encoder with the auxiliary layers after each level's down block.
        enc = nn.ModuleDict()
        caux = in_channels
        for name, block in self.enc.items():
            enc[name] = block
            if not name.endswith("_down"):
                continue
            res = name.split("x", 1)[0]
            cout = block.out_channels
            if encoder_type == "skip":
                enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                      resample_filter=resample_filter)
                enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
            elif encoder_type == "residual":
                enc[f"{res}x{res}_aux_residual"] = FusedDownConv2d(caux, cout, kernel=3,
                                                                   resample_filter=resample_filter, **init)
                caux = cout
        self.enc = enc

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, *, return_logits: bool = False,
                decoder_rows: int | None = None):
        """As SongUNet.forward, logits and decoder_rows included."""
        emb = self.embed(noise_labels, class_labels, augment_labels).to(x.dtype)
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        logits = x.mean(dim=1, keepdim=True) if return_logits else None
        x, emb, skips = _decoder_rows(decoder_rows, x, emb, skips)
        out = normed = None
        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                normed = block(x)
            elif name.endswith("_aux_conv"):
                out = block(F.silu(normed))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return (out, logits) if return_logits else out


class DhariwalUNet(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021) in EDM's layout: positional embedding without
    endpoint, adaptive scale/shift blocks, 64 channels per attention head, label embedding
    added after the mapping MLP; ``out_norm`` / ``out_conv`` at the end."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0):
        super().__init__()
        check_unet_args(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                        channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout, label_dropout)
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = sorted(int(r) for r in attn_resolutions)
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        self.config = dict(img_resolution=int(img_resolution), in_channels=int(in_channels),
                           out_channels=int(out_channels), label_dim=int(label_dim), augment_dim=int(augment_dim),
                           model_channels=int(model_channels), channel_mult=channel_mult,
                           channel_mult_emb=int(channel_mult_emb), num_blocks=int(num_blocks),
                           attn_resolutions=attn_resolutions, dropout=float(dropout),
                           label_dropout=float(label_dropout))
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.sample_shape = (in_channels, img_resolution, img_resolution)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)

        def block(cin, cout, attention=False, **kw):
            heads = cout // 64 if attention else 0  # EDM: channels_per_head = 64, no minimum of one
            return UNetBlock(cin, cout, emb_channels, attention=heads > 0, num_heads=heads or None,
                             dropout=dropout, skip_scale=1.0, eps=1e-5, resample_proj=False, adaptive_scale=True,
                             init=init, init_zero=init_zero, init_attn=init, **kw)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attn_resolutions)
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attn_resolutions)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, *, return_logits: bool = False,
                decoder_rows: int | None = None):
        """As SongUNet.forward, logits and decoder_rows included."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(emb.shape[0], self.label_dim, device=emb.device, dtype=emb.dtype)
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb).to(x.dtype)
        skips = []
        for blk in self.enc.values():
            x = blk(x, emb) if isinstance(blk, UNetBlock) else blk(x)
            skips.append(x)
        logits = x.mean(dim=1, keepdim=True) if return_logits else None
        x, emb, skips = _decoder_rows(decoder_rows, x, emb, skips)
        for blk in self.dec.values():
            if x.shape[1] != blk.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        out = self.out_conv(F.silu(self.out_norm(x)))
        return (out, logits) if return_logits else out


# Every architecture a gsd denoiser file may name (its config "arch").
ARCHITECTURES = {"SongUNet": SongUNet, "MLPDenoiserNet": MLPDenoiserNet, "NCSNppUNet": NCSNppUNet,
                 "DhariwalUNet": DhariwalUNet}


# ----------------------------------------------------------------------------------------
# EDM preconditioning.

def edm_coefficients(sigma, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of docs/definitions.md §3.1 for a tensor (or float) sigma."""
    sigma = torch.as_tensor(sigma)
    sd = sigma_data
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1.0 / (sigma ** 2 + sd ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) around a raw network `model`.

    sigma: Python float, 0-dim, (N,) or (N, 1, ..., 1) tensor (one element broadcasts).
    class_labels: int64 (N,) indices, (N, label_dim) one-hot/float, or None (zeros for a
    conditional model; ignored by an unconditional one). Computation is in float32 (float64
    if x is float64); the output has the compute dtype.
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, label_dim: int = 0):
        super().__init__()
        model_label_dim = getattr(model, "label_dim", label_dim)
        if model_label_dim != label_dim:
            raise ValueError(f"label_dim {label_dim} differs from the model's {model_label_dim}")
        self.model = model
        self.sigma_data = check_sigma_data(sigma_data)
        self.label_dim = int(label_dim)
        self.sample_shape = tuple(getattr(model, "sample_shape", ()))

    @property
    def config(self) -> dict:
        model_config = getattr(self.model, "config", None)
        if model_config is None or type(self.model).__name__ not in ARCHITECTURES:
            raise ValueError(f"{type(self.model).__name__} has no serialisable config")
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": type(self.model).__name__,
                "model": dict(model_config), "sigma_data": self.sigma_data, "label_dim": self.label_dim}

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _labels(self, class_labels, n: int, device, dtype):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(n, self.label_dim, device=device, dtype=dtype)
        class_labels = torch.as_tensor(class_labels, device=device)
        if not class_labels.is_floating_point():
            if class_labels.ndim == 2 and class_labels.shape[1] == self.label_dim:
                return class_labels.to(dtype)
            idx = class_labels.reshape(-1).long()
            if idx.numel() and (idx.min() < 0 or idx.max() >= self.label_dim):
                raise ValueError(f"class label out of range [0, {self.label_dim})")
            return F.one_hot(idx, self.label_dim).to(dtype)
        return class_labels.to(dtype).reshape(-1, self.label_dim)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, *, return_logits: bool = False,
                decoder_rows: int | None = None):
        """D(x; sigma); with return_logits (D, logits): the raw network's encoder logits (SiDA's
        discriminator), in the compute dtype, unscaled. decoder_rows=k: D of the first k rows
        only, the logits of all (one pass scores real samples with the encoder alone)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        n = x.shape[0]
        if torch.is_tensor(sigma):
            sigma = sigma.to(device=x.device, dtype=dtype).reshape(-1)
        else:
            sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(n)
        if sigma.numel() != n:
            raise ValueError(f"sigma has {sigma.numel()} elements for a batch of {n}")
        sigma = sigma.reshape(n, *([1] * (x.ndim - 1)))
        labels = self._labels(class_labels, n, x.device, dtype)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd ** 2).sqrt()
        # ln(0) = -inf would turn the embedding into NaN; a floor of 1e-30 changes nothing
        # elsewhere (c_out is ~0 there, so D = x).
        c_noise = sigma.clamp_min(1e-30).log().reshape(n) / 4
        model_dtype = next(self.model.parameters()).dtype
        args = ((c_in * x).to(model_dtype), c_noise.to(model_dtype), None if labels is None else labels.to(model_dtype))
        if not return_logits and decoder_rows is None:
            F_x = self.model(*args)
            return c_skip * x + c_out * F_x.to(dtype)
        rows = n if decoder_rows is None else int(decoder_rows)
        F_x, logits = self.model(*args, return_logits=True, decoder_rows=decoder_rows)
        D_x = c_skip[:rows] * x[:rows] + c_out[:rows] * F_x.to(dtype)
        return (D_x, logits.to(dtype)) if return_logits else D_x


# ----------------------------------------------------------------------------------------
# Configs.

def build_denoiser(config: dict) -> EDMPrecond:
    """Rebuild an `EDMPrecond` (freshly initialised) from its `config`."""
    if not isinstance(config, dict):
        raise ValueError("denoiser config must be a dict")
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    model_kwargs = dict(config.get("model") or {})
    try:
        model = ARCHITECTURES[arch](**model_kwargs)
    except TypeError as exc:
        raise ValueError(f"bad {arch} config: {exc}") from None
    label_dim = int(config.get("label_dim", model_kwargs.get("label_dim", 0)))
    return EDMPrecond(model, sigma_data=float(config.get("sigma_data", 0.5)), label_dim=label_dim)




def default_config(dataset_name: str, sample_shape: tuple, num_classes: int = 0) -> dict:
    """A denoiser config sized for fast training (CPU-friendly for digits and gmm).

    num_classes > 0 makes the network class-conditional.
    """
    sample_shape = tuple(int(s) for s in sample_shape)
    label_dim = int(num_classes)
    base = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "sigma_data": 0.5, "label_dim": label_dim}
    if len(sample_shape) == 1:
        model = dict(dim=sample_shape[0], label_dim=label_dim, hidden=128, num_blocks=3, noise_channels=32,
                     emb_channels=128, dropout=0.0)
        return {**base, "arch": "MLPDenoiserNet", "model": model}
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ValueError(f"no default network for sample shape {sample_shape} (need (dim,) or (C, R, R))")
    channels, res = sample_shape[0], sample_shape[1]
    if dataset_name == "shapes":
        # one grey shape on black: the digits network's size learns it, at 16x16 ~4x digits'
        # cost per sample (0.31M parameters), so that a teacher trains in minutes on a CPU
        unet = dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[],
                    channel_mult_emb=4, dropout=0.0)
    elif res <= 8:
        # digits: 8x8 -> 4x4 -> 2x2 (attention in the 2x2 bottleneck), 0.31M parameters,
        # ~1 ms per sample for forward+backward on one CPU core.
        unet = dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[],
                    channel_mult_emb=4, dropout=0.0)
    elif res <= 16:
        unet = dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4],
                    channel_mult_emb=4, dropout=0.0)
    elif res <= 32:
        unet = dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8],
                    channel_mult_emb=4, dropout=0.1)
    else:
        unet = dict(model_channels=64, channel_mult=[1, 2, 2, 2], num_blocks=2, attn_resolutions=[16],
                    channel_mult_emb=4, dropout=0.1)
    levels = len(unet["channel_mult"])
    while res % (2 ** (levels - 1)):
        levels -= 1
    unet["channel_mult"] = unet["channel_mult"][:levels]
    model = dict(img_resolution=res, in_channels=channels, out_channels=channels, label_dim=label_dim, **unet)
    return {**base, "arch": "SongUNet", "model": model}


def edm_ddpmpp_config(img_resolution: int = 32, img_channels: int = 3, label_dim: int = 0, augment_dim: int = 9,
                      dropout: float = 0.13) -> dict:
    """Config of EDM's DDPM++ network (its CIFAR-10 setup: 128 channels, mult (2, 2, 2), 4 blocks,
    attention at 16x16), the layout of NVlabs' released EDM checkpoints (55.7M parameters)."""
    model = dict(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                 label_dim=label_dim, augment_dim=augment_dim, model_channels=128, channel_mult=[2, 2, 2],
                 channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=dropout)
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": "SongUNet", "model": model,
            "sigma_data": 0.5, "label_dim": label_dim}


def set_gradient_checkpointing(net: nn.Module, enabled: bool = True) -> int:
    """Recompute the activations of every residual block of `net` in the backward pass instead
    of keeping them (less memory, about one more forward pass of compute). Covers gsd's U-Nets
    and MLP (also imported EDM networks) and diffusers models. Returns how many blocks / models
    were switched; UsageError when `net` has none."""
    count = 0
    for module in net.modules():
        if isinstance(module, _CheckpointedBlock):
            module.checkpointing = bool(enabled)
            count += 1
        elif hasattr(module, "enable_gradient_checkpointing") and hasattr(module, "disable_gradient_checkpointing"):
            (module.enable_gradient_checkpointing if enabled else module.disable_gradient_checkpointing)()
            count += 1
    if enabled and count == 0:
        raise UsageError(f"gradient checkpointing: {type(net).__name__} has no residual blocks that support it")
    return count


def set_dropout(net: nn.Module, p: float) -> int:
    """Set the dropout probability of every residual block of `net` (gsd's U-Nets and MLP,
    imported EDM networks) and of every torch.nn.Dropout in it (diffusers models) to `p`.
    Returns how many were set; UsageError when `net` has no dropout to set."""
    count = 0
    for module in net.modules():
        if isinstance(module, (UNetBlock, _MLPBlock)):
            module.dropout = float(p)
            count += 1
        elif isinstance(module, nn.Dropout):
            module.p = float(p)
            count += 1
    if count == 0:
        raise UsageError(f"--dropout: {type(net).__name__} has no dropout layers to set")
    return count


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
