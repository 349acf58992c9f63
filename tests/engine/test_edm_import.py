"""Import of NVlabs EDM pickles (gsd.teachers.edm_pickle, gsd.import_teacher) without executing code.

The pickles are made here: stand-in modules `torch_utils.persistence` and `training.networks`
are written to a temporary folder, imported, used to build a network of EDM's structure
(persistent classes whose instances pickle as `_reconstruct_persistent_obj(meta)` with the
module source, class name and state), pickled, and removed again before loading. The
stand-ins' "module source" would create a marker file if anyone executed it.
"""

import contextlib
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from torch import nn

from gsd.cli import run_main
from gsd.errors import UsageError
from gsd.models.networks import DhariwalUNet, NCSNppUNet
from gsd.teachers.edm_pickle import (PickleRefused, export_edm_pickle, load_edm_pickle,
                            restricted_load)
from gsd.import_teacher import main as import_main
from gsd.teachers.loading import load_teacher_any
from gsd.models.networks import EDMPrecond, SongUNet
from gsd.models.checkpoint import load_denoiser, read_denoiser_metadata


pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERSISTENCE_SRC = '''
import copy
_version = 6
MODULE_SRC = None  # set by the test: the "source code" a real loader would execute


def persistent_class(orig_class):
    class Persistent(orig_class):
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            meta = dict(type="class", version=_version, module_src=MODULE_SRC,
                        class_name=self._orig_class_name, state=fields[2])
            return (_reconstruct_persistent_obj, (meta,), None)

    Persistent.__name__ = orig_class.__name__
    Persistent.__qualname__ = orig_class.__qualname__
    Persistent.__module__ = orig_class.__module__
    return Persistent


def _reconstruct_persistent_obj(meta):
    exec(meta["module_src"], {})  # what EDM's loader does; the importer must never get here
    raise RuntimeError("stand-in reconstruct called")
'''

NETWORKS_SRC = '''
import torch
from torch_utils import persistence


def _shell(name):
    class Shell(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
    Shell.__name__ = Shell.__qualname__ = name
    Shell.__module__ = __name__
    return persistence.persistent_class(Shell)


for _name in ["EDMPrecond", "VPPrecond", "SongUNet", "DhariwalUNet", "UNetBlock", "Conv2d", "Linear",
              "GroupNorm", "PositionalEmbedding", "FourierEmbedding", "Foo"]:
    globals()[_name] = _shell(_name)


class Plain:  # a non-persistent class of training.networks (not allow-listed)
    pass
'''

LOSS_SRC = '''
from torch_utils import persistence


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
'''

STANDIN_MODULES = ("torch_utils", "torch_utils.persistence", "training", "training.networks", "training.loss")
EDM_NAMES = {"NCSNppUNet": "SongUNet", "FusedDownConv2d": "Conv2d"}
ATTRS = ("in_channels", "out_channels", "emb_channels", "num_heads", "dropout", "skip_scale", "adaptive_scale",
         "up", "down", "num_groups", "eps", "in_features", "out_features", "num_channels", "max_positions",
         "endpoint", "label_dropout", "img_resolution")


@contextlib.contextmanager
def standin_modules(root, marker):
    for pkg, files in {"torch_utils": {"persistence.py": PERSISTENCE_SRC},
                       "training": {"networks.py": NETWORKS_SRC, "loss.py": LOSS_SRC}}.items():
        os.makedirs(root / pkg, exist_ok=True)
        (root / pkg / "__init__.py").write_text("")
        for name, text in files.items():
            (root / pkg / name).write_text(text)
    sys.path.insert(0, str(root))
    try:
        import torch_utils.persistence as persistence
        import training.loss as loss
        import training.networks as nets
        persistence.MODULE_SRC = f"open({str(marker)!r}, 'w').write('module source was executed')"
        yield nets, loss
    finally:
        sys.path.remove(str(root))
        for name in STANDIN_MODULES:
            sys.modules.pop(name, None)


def to_standin(module, nets, kwargs=None):
    """A training.networks stand-in tree with `module`'s structure, tensors and attributes."""
    if isinstance(module, nn.ModuleDict):
        out = nn.ModuleDict()
    else:
        name = EDM_NAMES.get(type(module).__name__, type(module).__name__)
        if kwargs is None:
            kwargs = {k: getattr(module, k) for k in ("in_channels", "out_channels") if hasattr(module, k)}
            kwargs["init_weight"] = np.sqrt(0.2)  # numpy scalars appear in EDM's constructor arguments
        out = getattr(nets, name)(**kwargs)
        for attr in ATTRS:
            if attr in module.__dict__:
                value = module.__dict__[attr]
                out.__dict__[attr] = np.float64(value) if isinstance(value, float) else value
    for pname, p in module._parameters.items():
        out._parameters[pname] = None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False)
    for bname, b in module._buffers.items():
        out.register_buffer(bname, None if b is None else b.clone())
    for cname, child in module._modules.items():
        out._modules[cname] = None if child is None else to_standin(child, nets)
    return out


def edm_standin(net: EDMPrecond, nets):
    """EDMPrecond(img_resolution, img_channels, label_dim, ..., model_type, **model_kwargs) as in EDM."""
    cfg = dict(net.model.config)
    model_type = EDM_NAMES.get(type(net.model).__name__, type(net.model).__name__)
    precond_kwargs = dict(img_resolution=cfg["img_resolution"], img_channels=cfg["in_channels"],
                          label_dim=net.label_dim, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                          sigma_data=net.sigma_data, model_type=model_type,
                          **{k: v for k, v in cfg.items() if k not in ("img_resolution", "in_channels",
                                                                         "out_channels", "label_dim")})
    model_kwargs = dict(cfg)
    top = nets.EDMPrecond(**precond_kwargs)
    for k in ("img_resolution", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data"):
        top.__dict__[k] = precond_kwargs[k]
    top.img_channels = cfg["in_channels"]
    top.model = to_standin(net.model, nets, kwargs=model_kwargs)
    return top.eval().requires_grad_(False)


def perturb_(net, scale=0.1):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net.eval()


def write_pickle(tmp_path, net, name="network-snapshot-000000.pkl", edit=None, extra=None):
    """Pickle `net` as an EDM snapshot dict; `edit(ema_standin, nets)` may tamper with it first."""
    marker = tmp_path / "EXECUTED"
    with standin_modules(tmp_path / "standins", marker) as (nets, loss):
        ema = edm_standin(net, nets)
        if edit is not None:
            ema = edit(ema, nets) or ema
        data = dict(ema=ema, loss_fn=loss.EDMLoss(), augment_pipe=None,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"))
        data.update(extra(nets) if extra else {})
        blob = pickle.dumps(data)
    path = tmp_path / name
    path.write_bytes(blob)
    return path, marker


def ddpmpp(label_dim=3, augment_dim=9, channels=3):
    model = SongUNet(img_resolution=8, in_channels=channels, out_channels=channels, label_dim=label_dim,
                     augment_dim=augment_dim,
                     model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    return perturb_(EDMPrecond(model, sigma_data=0.5, label_dim=label_dim))


def ncsnpp(encoder_type="residual"):
    model = NCSNppUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2, 2],
                       num_blocks=1, attn_resolutions=[4], dropout=0.0, embedding_type="fourier",
                       channel_mult_noise=2, encoder_type=encoder_type, resample_filter=[1, 3, 3, 1])
    return perturb_(EDMPrecond(model, sigma_data=0.5, label_dim=0))


def adm(label_dim=4):
    model = DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=label_dim, augment_dim=0,
                         model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    return perturb_(EDMPrecond(model, sigma_data=0.5, label_dim=label_dim))


def assert_same_outputs(a, b, label_dim):
    x = torch.randn(4, *a.sample_shape)
    sigma = torch.tensor([0.002, 0.3, 2.5, 80.0])
    labels = torch.arange(4) % label_dim if label_dim else None
    with torch.no_grad():
        ya, yb = a(x, sigma, labels), b(x, sigma, labels)
    assert torch.isfinite(ya).all()
    torch.testing.assert_close(yb, ya, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("make, variant, cls", [
    (ddpmpp, "ddpmpp", SongUNet),
    (lambda: ddpmpp(label_dim=0, augment_dim=0), "ddpmpp", SongUNet),
    (ncsnpp, "ncsnpp", NCSNppUNet),
    (lambda: ncsnpp("skip"), "ncsnpp", NCSNppUNet),
    (adm, "adm", DhariwalUNet),
])
def test_pickle_maps_onto_our_classes_with_identical_outputs(tmp_path, make, variant, cls):
    net = make()
    path, marker = write_pickle(tmp_path, net)
    loaded = load_edm_pickle(path, trust_pickle=True)
    assert type(loaded) is EDMPrecond and type(loaded.model) is cls
    assert loaded.import_info["variant"] == variant
    assert loaded.import_info["sigma_max"] == float("inf")
    assert_same_outputs(net, loaded, net.label_dim)
    # Nothing from the pickle ran and the stand-in modules were not imported to load it.
    assert not marker.exists()
    assert not any(name in sys.modules for name in STANDIN_MODULES)


def test_refused_without_trust(tmp_path):
    path, _ = write_pickle(tmp_path, ddpmpp())
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_edm_pickle(path)
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_teacher_any(path)


class _SystemPayload:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalPayload:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "training.networks.Plain"])
def test_unknown_globals_are_refused_and_nothing_runs(tmp_path, kind):
    payload_marker = tmp_path / "PAYLOAD_RAN"
    if kind == "os.system":
        extra = lambda nets: {"x": _SystemPayload(f"touch {payload_marker}")}  # noqa: E731
        expect = "system"
    elif kind == "builtins.eval":
        extra = lambda nets: {"x": _EvalPayload(f"open({str(payload_marker)!r}, 'w')")}  # noqa: E731
        expect = "builtins.eval"
    else:
        extra = lambda nets: {"x": nets.Plain()}  # noqa: E731
        expect = "training.networks.Plain"
    path, marker = write_pickle(tmp_path, ddpmpp(), extra=extra)
    with pytest.raises(PickleRefused, match=expect) as info:
        load_edm_pickle(path, trust_pickle=True)
    assert "refusing to load" in str(info.value) and "\n" not in str(info.value)
    assert not payload_marker.exists() and not marker.exists()


def test_unknown_persistent_class_in_the_network_is_refused(tmp_path):
    def edit(ema, nets):
        ema.model.enc["8x8_conv"] = nets.Foo()
    path, _ = write_pickle(tmp_path, ddpmpp(), edit=edit)
    with pytest.raises(UsageError, match=r"unsupported class Foo at model\.enc\.8x8_conv"):
        load_edm_pickle(path, trust_pickle=True)


def test_other_preconditioners_are_refused(tmp_path):
    def edit(ema, nets):
        vp = nets.VPPrecond(img_resolution=8, img_channels=3)
        vp.model = ema.model
        return vp
    path, _ = write_pickle(tmp_path, ddpmpp(), edit=edit)
    with pytest.raises(UsageError, match="unsupported preconditioner VPPrecond"):
        load_edm_pickle(path, trust_pickle=True)


def test_restricted_load_reads_plain_tensors():
    import io
    obj = {"w": torch.randn(3, 4)[:, 1:], "p": nn.Parameter(torch.randn(2)), "h": torch.ones(2, dtype=torch.float16)}
    for protocol in (2, 4, pickle.HIGHEST_PROTOCOL):
        out = restricted_load(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
        for key in obj:
            assert torch.equal(out[key], obj[key].detach())
            assert out[key].dtype == obj[key].dtype


def test_unexpected_shapes_are_a_clear_error(tmp_path):
    def edit(ema, nets):
        w = ema.model.enc["8x8_block0"].conv0._parameters["weight"]
        ema.model.enc["8x8_block0"].conv0._parameters["weight"] = nn.Parameter(w[:, :8].clone())
    path, _ = write_pickle(tmp_path, ddpmpp(), edit=edit)
    with pytest.raises(UsageError, match=r"model\.enc\.8x8_block0\.conv0\.weight has shape \(16, 8, 3, 3\), "
                                         r"expected \(16, 16, 3, 3\)"):
        load_edm_pickle(path, trust_pickle=True)

    def edit_kwargs(ema, nets):
        ema.model._init_kwargs["model_channels"] = 32
    path, _ = write_pickle(tmp_path, ddpmpp(), edit=edit_kwargs, name="b.pkl")
    with pytest.raises(UsageError, match="has shape .* expected"):
        load_edm_pickle(path, trust_pickle=True)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(UsageError, match="not a readable EDM pickle"):
        load_edm_pickle(path, trust_pickle=True)


@pytest.mark.parametrize("make", [ddpmpp, ncsnpp, adm])
def test_safetensors_export_round_trips(tmp_path, make):
    net = make()
    path, _ = write_pickle(tmp_path, net)
    out = tmp_path / "teacher.safetensors"
    loaded, meta = export_edm_pickle(path, out, trust_pickle=True)
    again = load_denoiser(out)
    assert type(again.model) is type(loaded.model)
    assert_same_outputs(net, again, net.label_dim)
    extra = read_denoiser_metadata(out)["extra"]
    assert extra["source"] == "edm-pickle" and extra["source_file"] == path.name
    assert extra["sample_shape"] == [3, 8, 8] and len(extra["source_sha256"]) == 64
    assert_same_outputs(net, load_teacher_any(out), net.label_dim)


def test_cli(tmp_path, capsys):
    net = ddpmpp()
    path, _ = write_pickle(tmp_path, net)
    out = tmp_path / "t.safetensors"
    assert run_main(import_main, [str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and err.count("\n") == 1
    assert not out.exists()
    assert run_main(import_main, [str(path), "--out", str(out), "--trust-pickle"]) == 0
    assert "verified" in capsys.readouterr().out
    assert_same_outputs(net, load_denoiser(out), net.label_dim)
    assert run_main(import_main, [str(tmp_path / "missing.pkl"), "--trust-pickle"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("payload, expect", [
    # BUILD with slot state on an allow-listed function / stand-in class (would setattr on it).
    (b"ctorch_utils.persistence\n_reconstruct_persistent_obj\nN}V__call__\nI1\ns\x86b.", "tried to modify"),
    (b"ctorch.nn.modules.container\nModuleDict\nN}Vclass_path\nI1\ns\x86b.", "not a readable EDM pickle"),
    (b"cbuiltins\ngetattr\n.", "refusing to load builtins.getattr"),
    (b"cnumpy\ndtype\n(VO\ntR.", "numpy dtype object"),
])
def test_allow_listed_globals_cannot_be_tampered_with(payload, expect):
    import io
    with pytest.raises(UsageError, match=expect):
        restricted_load(io.BytesIO(payload))
    from gsd.teachers import edm_pickle as edm_import
    assert edm_import._SAFE_GLOBALS["torch_utils.persistence._reconstruct_persistent_obj"].fn is \
        edm_import._reconstruct_persistent_obj


def test_train_distils_an_edm_pickle_only_with_trust_pickle(tmp_path, capsys):
    """`python -m gsd.train --teacher snapshot.pkl`: refused in one line without --trust-pickle
    (nothing written); with it the run trains from the pickle and keeps a safetensors copy."""
    from gsd import runs, train

    net = ddpmpp(label_dim=0, augment_dim=0, channels=1)  # digits: 1 x 8 x 8, unconditional
    path, marker = write_pickle(tmp_path, net)
    out = tmp_path / "run"
    fast = ["--dataset", "digits", "--iters", "2", "--batch", "4", "--eval-samples", "0", "--no-progress",
            "--device", "cpu", "--out", str(out)]
    assert run_main(train.main, ["--teacher", str(path), *fast]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

    assert run_main(train.main, ["--teacher", str(path), "--trust-pickle", *fast]) == 0, capsys.readouterr().err
    assert not marker.exists()
    cfg = runs.read_config(out)
    assert cfg["teacher_file"] == "teacher.safetensors" and runs.latest_step(out) == 2
    assert_same_outputs(net, load_denoiser(out / "teacher.safetensors"), 0)
