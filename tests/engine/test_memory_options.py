"""Gradient checkpointing (`--grad-checkpoint`) and `--compile` of the distillation step.

Checkpointing must give the gradients of the plain backward pass while keeping fewer
activations alive; compiling must give the eager step's result.
"""

import copy

import pytest
import torch

from gsd.config import resolve_config
from gsd.errors import UsageError
from gsd.distill import DistillConfig, Distiller
from gsd.models.networks import build_denoiser, set_gradient_checkpointing


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unet(dropout=0.1):
    torch.manual_seed(0)
    net = build_denoiser({"arch": "SongUNet", "sigma_data": 0.5, "label_dim": 0,
                          "model": dict(img_resolution=8, in_channels=2, out_channels=2, model_channels=8,
                                        channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4],
                                        channel_mult_emb=2, dropout=dropout)})
    with torch.no_grad():  # the zero-initialised output convs would hide a wrong gradient
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def mlp(dropout=0.1):
    torch.manual_seed(0)
    net = build_denoiser({"arch": "MLPDenoiserNet", "sigma_data": 0.5, "label_dim": 0,
                          "model": dict(dim=5, hidden=32, num_blocks=3, noise_channels=8, emb_channels=16,
                                        dropout=dropout)})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def loss_and_grads(net, x, sigma, seed):
    """Loss, parameter gradients and input gradient of one training-mode backward pass, and the
    bytes autograd kept for it (counted by a saved-tensors hook around the forward)."""
    net = net.train()
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(seed)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x, sigma)
    loss = (out.double() ** 2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, x.grad.clone(), sum(kept)


@pytest.mark.parametrize("make", [unet, mlp], ids=["unet", "mlp"])
def test_checkpointing_keeps_the_gradients_and_fewer_activations(make):
    plain = make()
    ckpt = copy.deepcopy(plain)
    assert set_gradient_checkpointing(ckpt) >= 3
    n = 3  # odd batch
    x = torch.randn(n, *plain.sample_shape)
    sigma = torch.tensor([0.1, 1.0, 20.0])
    l0, g0, gx0, bytes_plain = loss_and_grads(plain, x, sigma, seed=5)
    l1, g1, gx1, bytes_ckpt = loss_and_grads(ckpt, x, sigma, seed=5)
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-7)
    assert bytes_ckpt < 0.6 * bytes_plain, (bytes_ckpt, bytes_plain)
    # switched off again: the plain graph
    set_gradient_checkpointing(ckpt, False)
    assert loss_and_grads(ckpt, x, sigma, seed=5)[3] == bytes_plain


def test_checkpointing_is_inactive_in_eval_and_without_grad():
    net = unet(dropout=0.0)
    set_gradient_checkpointing(net)
    x, sigma = torch.randn(2, 2, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        ref = net.eval()(x, sigma)
        torch.testing.assert_close(net.train()(x, sigma), ref)


def test_network_without_blocks_is_refused():
    with pytest.raises(UsageError, match="no residual blocks"):
        set_gradient_checkpointing(torch.nn.Linear(3, 3))


def test_diffusers_model_is_switched():
    diffusers = pytest.importorskip("diffusers")
    from gsd.teachers.diffusers_teacher import DiffusersTeacher

    unet2d = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                   layers_per_block=1, norm_num_groups=8,
                                   down_block_types=("DownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "UpBlock2D"))
    wrapped = DiffusersTeacher(unet2d)
    assert set_gradient_checkpointing(wrapped) == 1 and unet2d.is_gradient_checkpointing
    set_gradient_checkpointing(wrapped, False)
    assert not unet2d.is_gradient_checkpointing


def distil(steps=2, dropout=0.1, **options):
    teacher = mlp(dropout)
    cfg = DistillConfig(batch=6, lr=1e-3, lambda_irl=0.5, seed=3, backend="reference", ema_halflife=0.0, **options)
    d = Distiller(teacher, cfg, init=teacher)
    logs = [d.step() for _ in range(steps)]
    return d, logs


def test_distiller_with_checkpointing_trains_the_same_weights():
    plain, logs0 = distil()
    ckpt, logs1 = distil(grad_checkpoint=True)
    assert ckpt.generator.model.blocks[0].checkpointing and ckpt.fake.model.blocks[0].checkpointing
    assert not plain.generator.model.blocks[0].checkpointing
    for key in ("loss_sid", "loss_irl", "loss_fake"):
        assert logs1[-1][key] == pytest.approx(logs0[-1][key], rel=1e-5), key
    for (name, a), b in zip(plain.generator.state_dict().items(), ckpt.generator.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    moved = any(not torch.equal(a, b) for a, b in zip(plain.generator.state_dict().values(),
                                                       mlp().state_dict().values()))
    assert moved, "two steps did not change the generator: the comparison would be empty"


def test_train_flags_reach_the_distiller():
    cfg = resolve_config({"grad_checkpoint": True, "compile": True})
    dcfg = DistillConfig.from_run_config(cfg)
    assert dcfg.grad_checkpoint and dcfg.compile
    assert not DistillConfig.from_run_config(resolve_config({})).grad_checkpoint


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step():
    """`--compile` (inductor, as users run it): one iteration equals the eager one (without
    dropout: inductor draws its own random numbers)."""
    eager, logs0 = distil(steps=1, dropout=0.0)
    compiled, logs1 = distil(steps=1, dropout=0.0, compile=True)
    assert compiled._call_g_train is not compiled.generator  # the compiled wrapper is what trains
    for key in ("loss_sid", "loss_irl", "loss_fake"):
        assert logs1[-1][key] == pytest.approx(logs0[-1][key], rel=1e-4), key
    for (name, a), b in zip(eager.generator.state_dict().items(), compiled.generator.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
