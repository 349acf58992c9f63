"""The one-step generator as a module and a file (gsd.generator, `python -m gsd.export`): what it
computes from each kind of SOURCE, checked against the formula G(eps) = D(sigma_init eps;
sigma_init) evaluated on networks loaded independently, and the one-line refusals."""

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gsd
from cli_checks import assert_one_line_error
from factories import tiny_unet
from gsd import export
from gsd.distillation.run import run as distill_run
from gsd.cli import run_main
from gsd.errors import UsageError
from gsd.generator import GENERATOR_KIND, OneStepGenerator, load_generator
from gsd.models.networks import build_denoiser
from gsd.models.checkpoint import load_denoiser, save_denoiser

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def image_net(res=8, channels=3, label_dim=0, seed=0):
    """A tiny SongUNet denoiser with random (not zero) output weights."""
    torch.manual_seed(seed)
    net = build_denoiser({"arch": "SongUNet", "sigma_data": 0.5, "label_dim": label_dim,
                          "model": dict(img_resolution=res, in_channels=channels, out_channels=channels,
                                        label_dim=label_dim, model_channels=8, channel_mult=[1], num_blocks=1,
                                        attn_resolutions=[], channel_mult_emb=2, dropout=0.0)})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def write_generator_file(path, net, sigma_init=2.5, **override):
    """A generator file in the documented format (docs/definitions.md §3.9), written by hand."""
    meta = {"kind": GENERATOR_KIND, "version": 1, "sigma_init": sigma_init, "label_dim": net.label_dim,
            "sample_shape": list(net.sample_shape), "value_range": [-1.0, 1.0], **override}
    save_denoiser(path, net, extra_metadata=meta)
    return str(path)


def formula(net, eps, sigma_init, labels=None):
    with torch.no_grad():
        return net(sigma_init * eps, torch.full((len(eps),), sigma_init), labels)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from gsd import train

    root = tmp_path_factory.mktemp("genrun")
    teacher = root / "teacher.safetensors"
    save_denoiser(teacher, tiny_unet())
    return distill_run(dict(teacher=str(teacher), iters=4, batch=8, lambda_irl=0.5, eval_samples=0, progress=False,
                          device="cpu", out=str(root / "run"), cache_dir=str(root / "cache"), ckpt_every=2,
                          keep_every=2, fused=True))


def _ckpt_net(run_dir, step, prefix):
    """The run's network with one half of a checkpoint, loaded without gsd.generator."""
    net = load_denoiser(run_dir / "teacher.safetensors")
    w = load_file(str(run_dir / "checkpoints" / f"ckpt-{step:08d}.safetensors"))
    net.load_state_dict({k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)})
    return net.eval()


def test_run_directory_generator_is_the_checkpoints_ema_network(run_dir):
    eps = torch.randn(5, 1, 8, 8)
    G = gsd.load_generator(run_dir)  # the package-level loader is this one
    assert isinstance(G, OneStepGenerator) and G.info["step"] == 4 and G.sigma_init == 2.5
    assert G.sample_shape == (1, 8, 8) and G.label_dim == 0 and G.value_range == (-1.0, 1.0)
    with torch.no_grad():
        assert torch.equal(G(eps), formula(_ckpt_net(run_dir, 4, "ema."), eps, 2.5))
        raw = load_generator(run_dir, raw=True)
        assert torch.equal(raw(eps), formula(_ckpt_net(run_dir, 4, "generator."), eps, 2.5))
        assert not torch.equal(raw(eps), G(eps))
        old = load_generator(run_dir, step=2)
        assert old.info["step"] == 2 and torch.equal(old(eps), formula(_ckpt_net(run_dir, 2, "ema."), eps, 2.5))
    with pytest.raises(UsageError, match="no complete checkpoint 3"):
        load_generator(run_dir, step=3)


def test_every_loader_of_a_run_uses_the_same_generator(run_dir):
    """gsd.evaluate's run, gsd.edit's generator and the loader compute the same samples."""
    from gsd.evaluation.core import load_run
    from gsd.evaluation.editing import load_generator as edit_generator

    eps = torch.randn(6, 1, 8, 8)
    G = load_generator(run_dir)
    run = load_run(run_dir)
    g_edit, info = edit_generator(run_dir)
    with torch.no_grad():
        assert torch.equal(run.generator(eps), G(eps))
        assert torch.equal(g_edit(eps), G(eps))
    assert info["step"] == 4 and info["sigma_init"] == 2.5


def test_export_round_trips_and_records_the_run(run_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "G.safetensors"
    assert run_main(export.main, [str(run_dir), "--out", str(out)]) == 0, capsys.readouterr().err
    meta = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["gsd_extra"])
    cfg = json.loads((run_dir / "config.json").read_text())
    assert meta["kind"] == GENERATOR_KIND and meta["sigma_init"] == 2.5 and meta["label_dim"] == 0
    assert meta["sample_shape"] == [1, 8, 8] and meta["value_range"] == [-1.0, 1.0] and meta["step"] == 4
    assert meta["run_config_sha256"] == hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    G = load_generator(out)
    eps = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(G(eps), formula(_ckpt_net(run_dir, 4, "ema."), eps, 2.5))
    assert G.info["kind"] == "file" and G.info["step"] == 4
    # --step exports another checkpoint
    out2 = tmp_path / "G2.safetensors"
    assert run_main(export.main, [str(run_dir), "--out", str(out2), "--step", "2"]) == 0
    with torch.no_grad():
        assert torch.equal(load_generator(out2)(eps), formula(_ckpt_net(run_dir, 2, "ema."), eps, 2.5))


def test_export_refuses_in_one_line_and_writes_nothing(run_dir, tmp_path, capsys):
    empty_run = tmp_path / "fresh"
    empty_run.mkdir()
    shutil.copy(run_dir / "config.json", empty_run / "config.json")
    cases = [([str(empty_run)], "no complete checkpoint"),
             ([str(tmp_path / "nowhere")], "not a run directory"),
             ([str(run_dir), "--step", "3"], "no complete checkpoint 3")]
    for args, needle in cases:
        code = run_main(export.main, args + ["--out", str(tmp_path / "G.safetensors")])
        assert_one_line_error(code, capsys.readouterr().err, needle)
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    code = run_main(export.main, [str(run_dir), "--out", str(tmp_path / "taken.safetensors")])
    assert_one_line_error(code, capsys.readouterr().err, "exists")
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "taken.safetensors"]


def test_generator_files_are_checked_like_teacher_files(tmp_path):
    net = image_net()
    good = write_generator_file(tmp_path / "g.safetensors", net, sigma_init=1.7)
    eps = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_generator(good)(eps), formula(net, eps, 1.7))
    # a teacher file is a denoiser, not a generator
    teacher = tmp_path / "t.safetensors"
    save_denoiser(teacher, net)
    with pytest.raises(UsageError, match="not a one-step generator"):
        load_generator(teacher)
    # non-finite weights, a header that disagrees with the declared architecture, bad metadata
    bad = image_net()
    with torch.no_grad():
        next(bad.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(UsageError, match="non-finite"):
        load_generator(write_generator_file(tmp_path / "nan.safetensors", bad))
    from safetensors.torch import save_file

    cfg = net.config
    cfg["model"]["model_channels"] = 16  # the header's 8-channel tensors no longer fit it
    meta = {"kind": GENERATOR_KIND, "version": 1, "sigma_init": 2.5, "label_dim": 0, "sample_shape": [3, 8, 8],
            "value_range": [-1.0, 1.0]}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "lying.safetensors"),
              metadata={"gsd_format": "gsd-denoiser/1", "gsd_config": json.dumps(cfg), "gsd_extra": json.dumps(meta)})
    with pytest.raises(UsageError, match="does not match its config"):
        load_generator(tmp_path / "lying.safetensors")
    with pytest.raises(UsageError, match="sigma_init"):
        load_generator(write_generator_file(tmp_path / "s.safetensors", net, sigma_init=float("nan")))
    with pytest.raises(UsageError, match="value range"):
        load_generator(write_generator_file(tmp_path / "r.safetensors", net, value_range=[0.0, 1.0]))
    # float16 storage is read as float32
    half = image_net()
    path16 = tmp_path / "h.safetensors"
    write_generator_file(path16, half.half())
    G16 = load_generator(path16)
    assert next(G16.net.parameters()).dtype == torch.float32
    # neither a run directory nor a generator file
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    for path, needle in ((tmp_path / "notes.txt", "neither a run directory nor a generator file"),
                         (tmp_path / "folder", "not a run directory"), (tmp_path / "missing", "no such file")):
        with pytest.raises(UsageError, match=needle):
            load_generator(path)
    with pytest.raises(UsageError, match="--sigma-init is for SiD pickles"):
        load_generator(good, sigma_init=2.0)


def test_sid_pickle_generators_load_behind_the_gate(tmp_path):
    from test_edm_import import ddpmpp, write_pickle

    net = ddpmpp(label_dim=0, augment_dim=0)
    path, marker = write_pickle(tmp_path, net, name="sid-generator.pkl")
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_generator(path)
    eps = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        G = load_generator(path, trust_pickle=True)
        assert G.sigma_init == 2.5 and G.info["kind"] == "pickle"
        torch.testing.assert_close(G(eps), formula(net, eps, 2.5), rtol=1e-6, atol=1e-6)
        G15 = load_generator(path, trust_pickle=True, sigma_init=1.5)
        torch.testing.assert_close(G15(eps), formula(net, eps, 1.5), rtol=1e-6, atol=1e-6)
    assert not marker.exists()  # nothing from the pickle ran


def test_seeds_and_labels_of_a_conditional_generator(tmp_path):
    from gsd.sampling.samplers import latents_for_seeds

    net = image_net(label_dim=3)
    G = load_generator(write_generator_file(tmp_path / "c.safetensors", net))
    assert G.label_dim == 3
    seeds = [0, 1, 2, 3, 17, 40]
    x, lab = G.generate(seeds, "balanced")
    assert lab.tolist() == [s % 3 for s in seeds]
    # each image is the formula at its own latent and label (up to the batch's rounding)
    ref = formula(net, latents_for_seeds(seeds, (3, 8, 8)), 2.5, lab)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    _, fixed = G.generate(seeds, 2)
    assert fixed.tolist() == [2] * len(seeds)
    _, rnd = G.generate(seeds, "random")
    _, rnd_again = G.generate(list(reversed(seeds)), "random")
    assert rnd.tolist() == list(reversed(rnd_again.tolist())) and set(rnd.tolist()) <= {0, 1, 2}
    u8 = G.images_for_seeds(seeds, "balanced")
    assert u8.dtype == np.uint8 and u8.shape == (6, 8, 8, 3)
    expected = np.clip(np.floor(x.permute(0, 2, 3, 1).numpy().astype(np.float64) * 127.5 + 128), 0, 255)
    assert np.abs(u8.astype(np.float64) - expected).max() <= 1  # EDM's rule (float32 arithmetic)
    with pytest.raises(UsageError, match="outside"):
        G.generate(seeds, 3)
    unconditional = load_generator(write_generator_file(tmp_path / "u.safetensors", image_net()))
    with pytest.raises(UsageError, match="unconditional"):
        unconditional.generate(seeds, 1)


def test_a_seeds_image_does_not_depend_on_its_company(tmp_path):
    """The block rule: the same seed gives the same bytes alone, in a long list, in any order."""
    G = load_generator(write_generator_file(tmp_path / "g.safetensors", image_net()))
    alone = G.images_for_seeds([21])
    many = G.images_for_seeds(list(range(0, 50)))
    shuffled = G.images_for_seeds([49, 3, 21, 8])
    assert np.array_equal(alone[0], many[21]) and np.array_equal(alone[0], shuffled[2])
    assert np.array_equal(shuffled[0], many[49])
    assert not np.array_equal(many[0], many[1])
    assert math.isfinite(float(G(torch.randn(1, 3, 8, 8)).sum()))
