"""EDM preconditioning, U-Net / MLP structure and checkpoints (gsd.models.networks)."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gsd.errors import UsageError
from gsd.models.networks import Conv2d, EDMPrecond, MLPDenoiserNet, SongUNet, UNetBlock, build_denoiser, count_parameters, default_config, edm_coefficients, edm_ddpmpp_config
from gsd.models.checkpoint import load_denoiser, read_denoiser_metadata, save_denoiser


def tiny_unet_config(res=8, label_dim=0, attn=(4,)):
    return {"arch": "SongUNet", "sigma_data": 0.5, "label_dim": label_dim,
            "model": dict(img_resolution=res, in_channels=1, out_channels=1, label_dim=label_dim,
                          model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=list(attn),
                          dropout=0.0)}


def perturb_(net, scale=0.05):
    """Random weights everywhere (zero-initialised layers would hide wiring mistakes)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net


class Recorder(torch.nn.Module):
    """Raw network stub: records its inputs, returns a fixed random tensor."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.label_dim = 0

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x.detach().clone(), noise_labels.detach().clone(), class_labels)
        return self.out + 0 * self.w


@pytest.mark.parametrize("form", ["float", "0dim", "vector", "column"])
def test_preconditioning_matches_formula(form):
    n, sd = 5, 0.37
    x = torch.randn(n, 2, 3, 3, dtype=torch.float64)
    out = torch.randn(n, 2, 3, 3, dtype=torch.float64)
    sig = torch.exp(torch.randn(n, dtype=torch.float64) * 2)
    if form == "float":
        sig[:] = float(sig[0])
        sigma = float(sig[0])
    elif form == "0dim":
        sig[:] = sig[0]
        sigma = sig[0].clone()
    elif form == "vector":
        sigma = sig.clone()
    else:
        sigma = sig.reshape(n, 1, 1, 1).clone()
    stub = Recorder(out).double()
    net = EDMPrecond(stub, sigma_data=sd)
    d = net(x, sigma)
    s = sig.reshape(n, 1, 1, 1)
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / torch.sqrt(s ** 2 + sd ** 2)
    c_in = 1 / torch.sqrt(s ** 2 + sd ** 2)
    torch.testing.assert_close(stub.seen[0], c_in * x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stub.seen[1], torch.log(sig) / 4, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, c_skip * x + c_out * out, rtol=1e-12, atol=1e-12)
    # the helper agrees with the same formula
    cs, co, ci, cn = edm_coefficients(sig, sd)
    torch.testing.assert_close(cs, c_skip.reshape(n))
    torch.testing.assert_close(cn, torch.log(sig) / 4)


def test_sigma_to_zero_returns_input():
    net = perturb_(build_denoiser(tiny_unet_config())).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 1e-7), x, atol=1e-5, rtol=0)
        d0 = net(x, 0.0)
    assert torch.isfinite(d0).all()
    torch.testing.assert_close(d0, x, atol=0, rtol=0)


def test_large_sigma_is_finite_and_float64_path():
    net = perturb_(build_denoiser(tiny_unet_config())).eval()
    x = torch.randn(3, 1, 8, 8) * 80
    with torch.no_grad():
        assert torch.isfinite(net(x, 80.0)).all()
        d64 = net.double()(x.double(), torch.full((3,), 2.0, dtype=torch.float64))
    assert d64.dtype == torch.float64


def test_unet_shapes_resolutions_and_gradients():
    for res, mult, attn in [(8, [1, 2], [4]), (16, [1, 2, 2], [8]), (32, [1, 1, 2], [])]:
        cfg = {"arch": "SongUNet", "sigma_data": 0.5, "label_dim": 0,
               "model": dict(img_resolution=res, in_channels=3, out_channels=3, model_channels=8,
                             channel_mult=mult, num_blocks=1, attn_resolutions=attn, dropout=0.0)}
        net = perturb_(build_denoiser(cfg))
        x = torch.randn(2, 3, res, res, requires_grad=True)
        d = net(x, torch.tensor([0.3, 5.0]))
        assert d.shape == x.shape
        d.square().sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert net.sample_shape == (3, res, res) and isinstance(net.model, SongUNet)


def test_unet_parameter_names_follow_edm_layout():
    net = build_denoiser(tiny_unet_config(label_dim=10))
    keys = set(net.state_dict())
    for key in ["model.map_label.weight", "model.map_layer0.weight", "model.map_layer1.bias",
                "model.enc.8x8_conv.weight", "model.enc.8x8_block0.norm0.weight",
                "model.enc.8x8_block0.conv0.weight", "model.enc.8x8_block0.affine.weight",
                "model.enc.8x8_block0.norm1.bias", "model.enc.8x8_block0.conv1.weight",
                "model.enc.4x4_down.conv0.resample_filter", "model.enc.4x4_down.skip.weight",
                "model.enc.4x4_block0.skip.weight", "model.enc.4x4_block0.qkv.weight",
                "model.enc.4x4_block0.norm2.weight", "model.enc.4x4_block0.proj.weight",
                "model.dec.4x4_in0.qkv.weight", "model.dec.4x4_in1.conv1.weight",
                "model.dec.4x4_block1.qkv.weight", "model.dec.8x8_up.conv0.weight",
                "model.dec.8x8_block1.conv0.weight", "model.dec.8x8_aux_norm.weight",
                "model.dec.8x8_aux_conv.weight"]:
        assert key in keys, key
    enc = list(net.model.enc)
    assert enc == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"]
    dec = list(net.model.dec)
    assert dec == ["4x4_in0", "4x4_in1", "4x4_block0", "4x4_block1", "8x8_up", "8x8_block0", "8x8_block1",
                   "8x8_aux_norm", "8x8_aux_conv"]
    assert "model.dec.4x4_block0.qkv.weight" not in keys  # attention only on the last block of a level


def test_edm_ddpmpp_cifar10_layout():
    """EDM's unconditional CIFAR-10 DDPM++ network has 55,733,891 parameters."""
    net = build_denoiser(edm_ddpmpp_config())
    assert count_parameters(net) == 55_733_891
    sd = net.state_dict()
    assert sd["model.enc.32x32_conv.weight"].shape == (128, 3, 3, 3)
    assert sd["model.enc.32x32_block0.conv0.weight"].shape == (256, 128, 3, 3)
    assert sd["model.enc.16x16_block0.qkv.weight"].shape == (768, 256, 1, 1)
    assert sd["model.map_augment.weight"].shape == (128, 9)
    assert sd["model.dec.32x32_block0.conv0.weight"].shape == (256, 512, 3, 3)
    assert "model.dec.32x32_aux_conv.weight" in sd and "model.enc.16x16_down.skip.weight" in sd
    assert [k for k in net.model.enc][:7] == ["32x32_conv"] + [f"32x32_block{i}" for i in range(4)] + [
        "16x16_down", "16x16_block0"]


def test_attention_matches_independent_formula():
    torch.manual_seed(torch.seed() % 2**31)
    block = UNetBlock(8, 8, emb_channels=6, attention=True, num_heads=2, skip_scale=0.7,
                      init=dict(init_mode="xavier_uniform"))
    perturb_(block, 0.2)
    x, emb = torch.randn(3, 8, 4, 4), torch.randn(3, 6)
    out = block(x, emb)
    # independent evaluation of the same block
    h = F.group_norm(x, block.norm0.num_groups, block.norm0.weight, block.norm0.bias, block.norm0.eps)
    h = F.conv2d(F.silu(h), block.conv0.weight, block.conv0.bias, padding=1)
    scale, shift = (emb @ block.affine.weight.T + block.affine.bias).chunk(2, dim=1)
    h = F.group_norm(h, block.norm1.num_groups, block.norm1.weight, block.norm1.bias, block.norm1.eps)
    h = F.silu(shift[:, :, None, None] + h * (1 + scale[:, :, None, None]))
    h = (F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1) + x) * 0.7
    n2 = F.group_norm(h, block.norm2.num_groups, block.norm2.weight, block.norm2.bias, block.norm2.eps)
    qkv = F.conv2d(n2, block.qkv.weight, block.qkv.bias)  # (3, 24, 4, 4), channels (head, c, qkv)
    qkv = qkv.reshape(3, 2, 4, 3, 16)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # (n, head, c, pos)
    w = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(4), dim=-1)
    a = torch.einsum("nhqk,nhck->nhcq", w, v).reshape(3, 8, 4, 4)
    ref = (F.conv2d(a, block.proj.weight, block.proj.bias) + h) * 0.7
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_resampling_layers():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True)
    up = Conv2d(3, 3, kernel=0, up=True)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_conditional_paths():
    cfg = tiny_unet_config(label_dim=4)
    net = perturb_(build_denoiser(cfg)).eval()
    x = torch.randn(6, 1, 8, 8)
    sigma = torch.rand(6) + 0.1
    idx = torch.randint(0, 4, (6,))
    with torch.no_grad():
        d_int = net(x, sigma, idx)
        d_hot = net(x, sigma, F.one_hot(idx, 4).float())
        d_other = net(x, sigma, (idx + 1) % 4)
        d_none = net(x, sigma, None)
    torch.testing.assert_close(d_int, d_hot)
    assert (d_int - d_other).abs().max() > 1e-4
    assert torch.isfinite(d_none).all()
    # an unconditional network ignores labels
    unc = perturb_(build_denoiser(tiny_unet_config())).eval()
    with torch.no_grad():
        torch.testing.assert_close(unc(x, sigma, idx), unc(x, sigma))


def test_mlp_shapes_and_conditioning():
    net = perturb_(EDMPrecond(MLPDenoiserNet(3, label_dim=5, hidden=32, num_blocks=2), label_dim=5))
    x = torch.randn(7, 3, requires_grad=True)
    sigma = torch.exp(torch.randn(7))
    labels = torch.randint(0, 5, (7,))
    d = net(x, sigma, labels)
    assert d.shape == (7, 3)
    assert (d - net(x, sigma, (labels + 2) % 5)).abs().max() > 1e-4
    d.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        net(torch.randn(2, 4), 1.0)


def test_default_configs_build():
    for name, shape in [("digits", (1, 8, 8)), ("gmm", (2,)), ("cifar10", (3, 32, 32)), ("folder", (3, 64, 64)),
                        ("folder", (3, 24, 24))]:
        cfg = default_config(name, shape, 0)
        json.dumps(cfg)
        net = build_denoiser(cfg)
        assert net.sample_shape == shape
        assert {k: net.config["model"][k] for k in cfg["model"]} == cfg["model"]
        assert build_denoiser(net.config).config == net.config
        assert net.label_dim == 0
        if name in ("digits", "gmm"):
            with torch.no_grad():
                assert net(torch.randn(2, *shape), 1.0).shape == (2, *shape)
    assert build_denoiser(default_config("digits", (1, 8, 8), 10)).label_dim == 10


def test_save_load_round_trip_bit_exact(tmp_path):
    net = perturb_(build_denoiser(tiny_unet_config(label_dim=3)))
    path = tmp_path / "sub" / "net.safetensors"
    save_denoiser(path, net, extra_metadata={"dataset": "digits", "iters": 7})
    assert not [f for f in os.listdir(path.parent) if f != "net.safetensors"]  # no temp files left
    loaded = load_denoiser(path)
    a, b = net.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.config == net.config
    assert loaded.metadata == {"dataset": "digits", "iters": 7}
    assert read_denoiser_metadata(path)["extra"]["iters"] == 7
    x, s, y = torch.randn(3, 1, 8, 8), torch.rand(3) + 0.05, torch.tensor([0, 2, 1])
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, s, y), loaded(x, s, y))
    # a float64 file loads as float32 (the file's dtype must not become the training dtype)
    mlp = perturb_(build_denoiser(default_config("gmm", (2,), 0))).double()
    save_denoiser(tmp_path / "m.safetensors", mlp)
    m2 = load_denoiser(tmp_path / "m.safetensors")
    assert {p.dtype for p in m2.parameters()} == {torch.float32}
    assert all(torch.equal(p.float(), q) for p, q in zip(mlp.parameters(), m2.parameters()))


def _one_line_error(fn, *needles):
    with pytest.raises(UsageError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_load_errors(tmp_path):
    net = build_denoiser(tiny_unet_config())
    good = tmp_path / "good.safetensors"
    save_denoiser(good, net)
    blob = good.read_bytes()

    _one_line_error(lambda: load_denoiser(tmp_path / "missing.safetensors"), "missing.safetensors", "does not exist")

    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(blob[: len(blob) // 2])
    _one_line_error(lambda: load_denoiser(bad), "truncated.safetensors")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    _one_line_error(lambda: load_denoiser(junk), "junk.safetensors")

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.randn(3)}, str(foreign))
    _one_line_error(lambda: load_denoiser(foreign), "foreign.safetensors", "not a gsd")

    # weights of one network under the config of another
    tensors = load_file(str(good))
    other = json.dumps(build_denoiser(tiny_unet_config(attn=())).config)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(tensors, str(mismatched), metadata={"gsd_format": "gsd-denoiser/1", "gsd_config": other})
    _one_line_error(lambda: load_denoiser(mismatched), "mismatched.safetensors", "does not match")

    cfg = net.config
    cfg["model"]["model_channels"] = 8
    shapes = tmp_path / "shapes.safetensors"
    save_file(tensors, str(shapes), metadata={"gsd_format": "gsd-denoiser/1", "gsd_config": json.dumps(cfg)})
    _one_line_error(lambda: load_denoiser(shapes), "shapes.safetensors", "shape")

    bad_cfg = tmp_path / "badcfg.safetensors"
    save_file(tensors, str(bad_cfg), metadata={"gsd_format": "gsd-denoiser/1", "gsd_config": "{not json"})
    _one_line_error(lambda: load_denoiser(bad_cfg), "badcfg.safetensors")

    _one_line_error(lambda: load_denoiser(tmp_path), "directory")
