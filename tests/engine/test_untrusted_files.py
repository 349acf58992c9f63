"""Hostile and malformed input files (reliability review D1, D3, D5, D6, D8, D9, D11).

Every case is rebuilt here from scratch. Allocation bombs are never run unguarded: the builders
are either made to fail if called, or the bomb is small enough that a time limit catches the old
behaviour cheaply.
"""

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gsd.cli import run_main
from gsd.errors import UsageError
from gsd.data import DataError, load_dataset
from cli_checks import assert_one_line_error

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------
# D1: CIFAR-10 batches are read without running code from them

class _Payload:
    """Unpickling this calls `func(arg)`: what a hostile file does."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _cifar_batch(n=4, seed=0, data=None):
    rng = np.random.default_rng(seed)
    return {"batch_label": "training batch", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
            "filenames": [f"f{i}.png" for i in range(n)]}


def _write_cifar(root, protocol=2, batch_one=None, meta=None):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        entry = batch_one if (i == 1 and batch_one is not None) else _cifar_batch(seed=i)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry, protocol=protocol))
    names = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta if meta is not None else names, protocol=protocol))
    return folder


def _marker_command(marker):
    return f"open({str(marker)!r}, 'w').write('code from the CIFAR file ran')"


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_in_every_pickle_protocol_still_load(tmp_path, protocol):
    folder = _write_cifar(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", data_root=str(tmp_path))
    assert ds.data.shape == (20, 3, 32, 32)
    expected = np.concatenate([_cifar_batch(seed=i)["data"] for i in range(1, 6)])
    got = ((ds.data + 1) * 127.5).round().to(torch.uint8).reshape(20, -1).numpy()
    assert np.array_equal(got, expected)
    assert ds.labels.tolist() == sum((_cifar_batch(seed=i)["labels"] for i in range(1, 6)), [])
    assert ds.info["label_names"][0] == "airplane" and folder.is_dir()


def test_cifar_batches_naming_numpy_1_modules_load(tmp_path):
    # the original CIFAR files (and numpy 1.x pickles) name numpy.core.multiarray._reconstruct
    folder = _write_cifar(tmp_path, protocol=2)
    for f in folder.iterdir():
        blob = f.read_bytes()
        f.write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert b"numpy.core.multiarray\n_reconstruct" in (folder / "data_batch_3").read_bytes()
    ds = load_dataset("cifar10", data_root=str(tmp_path))
    got = ((ds.data[8:12] + 1) * 127.5).round().to(torch.uint8).reshape(4, -1).numpy()
    assert np.array_equal(got, _cifar_batch(seed=3)["data"])


def test_cifar_batch_in_fortran_order_loads_with_the_right_values(tmp_path):
    data = np.asfortranarray(np.random.default_rng(3).integers(0, 256, (4, 3072), dtype=np.uint8))
    _write_cifar(tmp_path, protocol=2, batch_one=_cifar_batch(data=data))
    ds = load_dataset("cifar10", data_root=str(tmp_path))
    got = ((ds.data[:4] + 1) * 127.5).round().to(torch.uint8).reshape(4, -1).numpy()
    assert np.array_equal(got, data)


@pytest.mark.parametrize("func", [os.system, exec, eval])
@pytest.mark.parametrize("where", ["top", "nested", "meta"])
def test_hostile_cifar_batch_runs_no_code(tmp_path, func, where):
    marker = tmp_path / "PWNED"
    arg = f"touch {marker}" if func is os.system else _marker_command(marker)
    payload = _Payload(func, arg)
    batch = _cifar_batch()
    if where == "top":
        batch = payload
    elif where == "nested":
        batch["labels"] = [1, 2, {"x": [payload]}, 3]
    meta = {"label_names": [payload]} if where == "meta" else None
    _write_cifar(tmp_path / "root", batch_one=batch if where != "meta" else None, meta=meta)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_root=str(tmp_path / "root"))
    msg = str(info.value)
    assert "\n" not in msg and "refus" in msg and ("data_batch_1" in msg or "batches.meta" in msg), msg
    assert not marker.exists()


def test_cifar_object_arrays_and_odd_globals_are_refused(tmp_path):
    # an object-dtype array (numpy would unpickle its items with the full unpickler)
    batch = _cifar_batch(data=np.array([1, 2, 3], dtype=object))
    _write_cifar(tmp_path / "a", batch_one=batch)
    with pytest.raises(DataError, match="dtype"):
        load_dataset("cifar10", data_root=str(tmp_path / "a"))
    # an ndarray subclass (its own __setstate__ would run)
    batch = _cifar_batch(data=np.ma.masked_array(np.zeros((4, 3072), np.uint8)))
    _write_cifar(tmp_path / "b", batch_one=batch)
    with pytest.raises(DataError, match="refus"):
        load_dataset("cifar10", data_root=str(tmp_path / "b"))
    # a shape that does not match its bytes
    (tmp_path / "c").mkdir()
    folder = _write_cifar(tmp_path / "c")
    blob = (folder / "data_batch_2").read_bytes().replace(b"K\x04M\x00\x0c", b"K\x05M\x00\x0c")
    assert blob != (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_root=str(tmp_path / "c"))
    assert "data_batch_2" in str(info.value) and "\n" not in str(info.value)


def test_hostile_cifar_root_via_the_train_cli_runs_no_code(tmp_path):
    marker = tmp_path / "PWNED"
    _write_cifar(tmp_path / "evil", batch_one=_Payload(os.system, f"touch {marker}"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GSD_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "gsd.train", "--dataset", "cifar10", "--data-root",
                        str(tmp_path / "evil"), "--iters", "1", "--eval-samples", "0", "--no-progress",
                        "--out", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert_one_line_error(p.returncode, p.stderr, "data_batch_1", "system", "refusing")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# Guards: the old loaders built whatever a config asked for. These make such a build fail
# loudly (instead of allocating gigabytes) so that the bomb tests are safe to run either way.

MAX_REAL_NUMEL = 20_000_000
MAX_BLOCKS = 2_000


class BombBuilt(BaseException):
    """Not an Exception: loaders that wrap every Exception into a one-line error cannot hide it."""


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


@pytest.fixture
def no_bomb_builds(monkeypatch):
    import gsd.models.networks as networks

    real_init = networks._init_tensor

    def guarded_init(shape, *args, **kwargs):
        if not _on_meta() and int(np.prod([int(s) for s in shape])) > MAX_REAL_NUMEL:
            raise BombBuilt(f"allocation bomb: a real {tuple(shape)} tensor was requested")
        return real_init(shape, *args, **kwargs)

    monkeypatch.setattr(networks, "_init_tensor", guarded_init)
    count = {"blocks": 0}

    def counting(cls):
        real = cls.__init__

        def init(self, *args, **kwargs):
            count["blocks"] += 1
            if count["blocks"] > MAX_BLOCKS:
                raise BombBuilt("build bomb: thousands of blocks were constructed")
            real(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", init)

    counting(networks.UNetBlock)
    counting(networks._MLPBlock)
    try:
        from diffusers.models.resnet import ResnetBlock2D

        counting(ResnetBlock2D)
    except ImportError:
        pass
    for layer in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding):
        real_layer_init = layer.__init__

        def layer_init(self, a, b, *args, _real=real_layer_init, **kwargs):
            if not _on_meta() and int(a) * int(b) > MAX_REAL_NUMEL:
                raise BombBuilt(f"allocation bomb: a real {a}x{b} layer was requested")
            _real(self, a, b, *args, **kwargs)
        monkeypatch.setattr(layer, "__init__", layer_init)
    return count


def _fast_one_line(fn, *needles, limit_s=10.0):
    start = time.perf_counter()
    with pytest.raises(UsageError) as info:
        fn()
    elapsed = time.perf_counter() - start
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    assert elapsed < limit_s, f"took {elapsed:.1f} s"
    return msg


# ----------------------------------------------------------------------------------------
# gsd safetensors teachers (gsd.models.checkpoint.load_denoiser): D3 bombs, D5 dtypes, D6 values

SMALL_MLP = {"arch": "MLPDenoiserNet", "sigma_data": 0.5, "label_dim": 0,
             "model": dict(dim=2, label_dim=0, hidden=16, num_blocks=2, noise_channels=8, emb_channels=16)}


def _mlp_file(tmp_path, name="t.safetensors", config_edit=None, tensor_edit=None, dtype=None):
    """A small MLP teacher; `config_edit(config)` / `tensor_edit(tensors)` tamper with it."""
    from safetensors.torch import save_file

    from gsd.models.networks import build_denoiser

    net = build_denoiser(SMALL_MLP)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    config = json.loads(json.dumps(net.config))
    if config_edit:
        config_edit(config)
    tensors = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if tensor_edit:
        tensor_edit(tensors)
    path = tmp_path / name
    save_file(tensors, str(path), metadata={"gsd_format": "gsd-denoiser/1", "gsd_config": json.dumps(config)})
    return path, net


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["model"].update(hidden=150_000), "does not match"),
    (lambda c: c["model"].update(num_blocks=10 ** 7), "tensors"),
    (lambda c: c["model"].update(num_blocks=10 ** 4), "tensors"),
    (lambda c: c["model"].update(emb_channels=10 ** 6, noise_channels=10 ** 6), "does not match"),
    (lambda c: c.update(arch="SongUNet", model=dict(img_resolution=8, in_channels=3, out_channels=3,
                                                   model_channels=8192, channel_mult=[1, 2], num_blocks=1)),
     "does not match"),
    (lambda c: c.update(arch="SongUNet", model=dict(img_resolution=8, in_channels=3, out_channels=3,
                                                   model_channels=8, channel_mult=[1, 2], num_blocks=10 ** 6)),
     "tensors"),
])
def test_safetensors_config_bombs_fail_fast_before_building(tmp_path, no_bomb_builds, edit, needle):
    from gsd.models.checkpoint import load_denoiser

    path, _ = _mlp_file(tmp_path, config_edit=edit)
    msg = _fast_one_line(lambda: load_denoiser(path), str(path), limit_s=5.0)
    assert needle in msg or "unusable config" in msg, msg
    assert no_bomb_builds["blocks"] <= 50  # nothing beyond a meta build of a small tree


def test_block_count_bound_knows_the_edm_architectures_in_a_fresh_process():
    # NCSNppUNet / DhariwalUNet register themselves when gsd.teachers.edm_pickle is imported; the bound
    # must not silently be 0 (no check) before that
    code = ("from gsd.models.checkpoint import min_tensor_count as m; "
            "print(m('DhariwalUNet', {'num_blocks': 10}), m('NCSNppUNet', {'num_blocks': 10}))")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [int(v) for v in p.stdout.split()] == [8 * 4 * 21, 8 * 4 * 21]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_teacher_dtypes_load_as_float32(tmp_path, capsys, dtype):
    from gsd.models.checkpoint import load_denoiser

    path, net = _mlp_file(tmp_path, dtype=dtype)
    loaded = load_denoiser(path)
    assert {p.dtype for p in loaded.parameters()} | {b.dtype for b in loaded.buffers()} == {torch.float32}
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.to(dtype).to(torch.float32), b), k
    assert str(dtype).replace("torch.", "") in capsys.readouterr().err  # said, not silent
    x = torch.randn(5, 2)
    with torch.no_grad():
        assert loaded(x, torch.full((5,), 0.5)).dtype == torch.float32


def test_safetensors_mixed_dtypes_load_as_float32(tmp_path):
    from gsd.models.checkpoint import load_denoiser

    def mix(t):
        for i, k in enumerate(sorted(t)):
            t[k] = t[k].to([torch.float16, torch.float64, torch.float32][i % 3])
    path, _ = _mlp_file(tmp_path, tensor_edit=mix)
    assert {p.dtype for p in load_denoiser(path).parameters()} == {torch.float32}


def test_safetensors_float64_overflowing_float32_is_refused(tmp_path):
    from gsd.models.checkpoint import load_denoiser

    def huge(t):
        t["model.fc_in.weight"][0, 0] = 1e300
    path, _ = _mlp_file(tmp_path, dtype=torch.float64, tensor_edit=huge)
    _fast_one_line(lambda: load_denoiser(path), "model.fc_in.weight", "non-finite", "float32")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, 0.0, "abc", None])
def test_safetensors_sigma_data_must_be_finite_and_positive(tmp_path, value):
    from gsd.models.checkpoint import load_denoiser

    path, _ = _mlp_file(tmp_path, config_edit=lambda c: c.update(sigma_data=value))
    _fast_one_line(lambda: load_denoiser(path), "sigma_data")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["model"].update(hidden="abc"), "hidden"),
    (lambda c: c["model"].update(num_blocks=-1), "num_blocks"),
    (lambda c: c["model"].update(dim=0), "dim"),
    (lambda c: c["model"].update(dropout=2.0), "dropout"),
    (lambda c: c.update(model=[1, 2]), "unusable"),
])
def test_safetensors_bad_config_values_are_one_line(tmp_path, edit, needle):
    from gsd.models.checkpoint import load_denoiser

    path, _ = _mlp_file(tmp_path, config_edit=edit)
    _fast_one_line(lambda: load_denoiser(path), needle)


# ----------------------------------------------------------------------------------------
# EDM pickles (gsd.teachers.edm_pickle): D3 constructor bombs, D5 dtypes, D6 sigma_data, D9 bad values

def _edm_pickle(tmp_path, make="ddpmpp", model_kwargs=None, precond=None, tensors=None, name="snap.pkl"):
    from test_edm_import import adm, ddpmpp, write_pickle

    net = {"ddpmpp": lambda: ddpmpp(label_dim=0, augment_dim=0, channels=1), "adm": lambda: adm(label_dim=0)}[make]()

    def edit(ema, nets):
        ema.model._init_kwargs.update(model_kwargs or {})
        for key, value in (precond or {}).items():
            ema._init_kwargs[key] = value
            ema.__dict__[key] = value
        if tensors is not None:
            for module in ema.modules():
                for pname, p in module._parameters.items():
                    if p is not None:
                        module._parameters[pname] = torch.nn.Parameter(tensors(p.detach()), requires_grad=False)
    path, marker = write_pickle(tmp_path, net, name=name, edit=edit)
    return path, marker, net


@pytest.mark.parametrize("make, kwargs, needle", [
    ("ddpmpp", dict(model_channels=8192), "shape"),
    ("ddpmpp", dict(num_blocks=10 ** 6), "tensors"),
    ("ddpmpp", dict(num_blocks=3000), "tensors"),
    ("ddpmpp", dict(channel_mult=[1] * 5000, img_resolution=8), "tensors"),
    ("adm", dict(model_channels=1_000_000), "shape"),
    ("adm", dict(num_blocks=10 ** 6), "tensors"),
])
def test_edm_constructor_bombs_fail_fast_before_building(tmp_path, no_bomb_builds, make, kwargs, needle):
    from gsd.teachers.edm_pickle import load_edm_pickle

    path, marker, _ = _edm_pickle(tmp_path, make, model_kwargs=kwargs)
    _fast_one_line(lambda: load_edm_pickle(path, trust_pickle=True), str(path), needle, limit_s=5.0)
    assert not marker.exists()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(img_resolution=0), "img_resolution"),
    (dict(img_resolution=-8), "img_resolution"),
    (dict(model_channels="abc"), "model_channels"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(channel_mult=[]), "channel_mult"),
    (dict(dropout=float("nan")), "dropout"),
])
def test_edm_bad_constructor_values_are_one_line(tmp_path, kwargs, needle):
    from gsd.teachers.edm_pickle import load_edm_pickle

    path, _, _ = _edm_pickle(tmp_path, model_kwargs=kwargs)
    _fast_one_line(lambda: load_edm_pickle(path, trust_pickle=True), needle)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, 0.0, "abc"])
def test_edm_sigma_data_must_be_finite_and_positive(tmp_path, value):
    from gsd.teachers.edm_pickle import load_edm_pickle

    path, _, _ = _edm_pickle(tmp_path, precond={"sigma_data": value})
    _fast_one_line(lambda: load_edm_pickle(path, trust_pickle=True), "sigma_data")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_edm_weights_of_any_float_dtype_load_as_float32(tmp_path, capsys, dtype):
    from gsd.teachers.edm_pickle import load_edm_pickle

    path, _, net = _edm_pickle(tmp_path, tensors=lambda t: t.to(dtype))
    loaded = load_edm_pickle(path, trust_pickle=True)
    assert str(dtype).replace("torch.", "") in capsys.readouterr().err  # said, not silent
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.to(dtype).to(torch.float32), b), k


def test_edm_float64_weights_overflowing_float32_are_refused(tmp_path):
    from gsd.teachers.edm_pickle import load_edm_pickle

    def huge(t):
        t = t.to(torch.float64)
        t.view(-1)[0] = 1e300
        return t
    path, _, _ = _edm_pickle(tmp_path, tensors=huge)
    _fast_one_line(lambda: load_edm_pickle(path, trust_pickle=True), "non-finite", "float32")


def test_edm_img_resolution_0_via_import_and_train_clis(tmp_path, capsys):
    from gsd import import_teacher, train

    path, _, _ = _edm_pickle(tmp_path, model_kwargs=dict(img_resolution=0))
    code = run_main(import_teacher.main, [str(path), "--trust-pickle", "--out", str(tmp_path / "x.safetensors")])
    assert_one_line_error(code, capsys.readouterr().err, "img_resolution")
    assert not (tmp_path / "x.safetensors").exists()
    out = tmp_path / "run"
    code = run_main(train.main, ["--dataset", "digits", "--teacher", str(path), "--trust-pickle", "--iters", "1",
                                 "--eval-samples", "0", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, "img_resolution")


# ----------------------------------------------------------------------------------------
# diffusers folders (gsd.teachers.diffusers_teacher): D3 config bombs, D5 dtypes, D6 NaN weights,
# D9 bad config / scheduler values, D11 reversed betas

def _unet_folder(tmp_path, name="unet", dtype=None, edit_weights=None, config=None, scheduler=None):
    from test_diffusers_teacher import tiny_unet

    unet = tiny_unet()
    if edit_weights:
        with torch.no_grad():
            edit_weights(unet)
    if dtype is not None:
        unet = unet.to(dtype)
    folder = tmp_path / name
    unet.save_pretrained(folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    if scheduler is not None:
        sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
                 "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", **scheduler}
        (folder / "scheduler_config.json").write_text(json.dumps(sched))
    return folder, unet


@pytest.mark.parametrize("config, needle", [
    (dict(layers_per_block=100_000), "blocks"),
    (dict(layers_per_block=1000), "blocks"),
    (dict(block_out_channels=[150_000, 150_000], norm_num_groups=8), "do not match"),
    (dict(block_out_channels=[32, 64 * 1024]), "do not match"),
    (dict(num_class_embeds=10 ** 9), "do not match"),
])
def test_diffusers_config_bombs_fail_fast_before_building(tmp_path, no_bomb_builds, config, needle):
    from gsd.teachers.diffusers_teacher import load_diffusers_teacher

    folder, _ = _unet_folder(tmp_path, config=config)
    _fast_one_line(lambda: load_diffusers_teacher(folder), str(folder), needle, limit_s=5.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_diffusers_weights_of_any_float_dtype_load_as_float32(tmp_path, capsys, dtype):
    from gsd.teachers.diffusers_teacher import load_diffusers_teacher

    folder, unet = _unet_folder(tmp_path, dtype=dtype)
    net = load_diffusers_teacher(folder)
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    for (k, a), b in zip(unet.state_dict().items(), net.unet.state_dict().values()):
        assert torch.equal(a.to(torch.float32), b), k
    assert str(dtype).replace("torch.", "") in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_diffusers_non_finite_weights_are_refused(tmp_path, bad):
    from gsd.teachers.diffusers_teacher import load_diffusers_teacher

    def poison(unet):
        next(unet.parameters()).view(-1)[3] = bad
    folder, _ = _unet_folder(tmp_path, edit_weights=poison)
    _fast_one_line(lambda: load_diffusers_teacher(folder), "non-finite", str(folder))


def test_diffusers_float64_weights_overflowing_float32_are_refused(tmp_path):
    from gsd.teachers.diffusers_teacher import load_diffusers_teacher

    from safetensors.torch import load_file, save_file

    folder, _ = _unet_folder(tmp_path, dtype=torch.float64)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    first = next(iter(state))
    state[first].view(-1)[0] = 1e300
    save_file(state, str(weights), metadata={"format": "pt"})
    _fast_one_line(lambda: load_diffusers_teacher(folder), "non-finite")


@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0])
def test_diffusers_sigma_data_must_be_finite_and_positive(tmp_path, value):
    from gsd.teachers.diffusers_teacher import load_diffusers_teacher

    folder, _ = _unet_folder(tmp_path)
    _fast_one_line(lambda: load_diffusers_teacher(folder, sigma_data=value), "sigma_data")


@pytest.mark.parametrize("config, needle", [
    (dict(in_channels="abc"), "in_channels"),
    (dict(in_channels=None), "in_channels"),
    (dict(out_channels=-3), "out_channels"),
    (dict(sample_size="big"), "sample_size"),
    (dict(sample_size=10 ** 9), "sample_size"),
    (dict(layers_per_block="two"), "layers_per_block"),
    (dict(num_class_embeds=1.5), "num_class_embeds"),
    (dict(block_out_channels=7), "block_out_channels"),
    (dict(norm_num_groups="x"), "buildable"),
])
def test_diffusers_bad_config_values_are_one_line(tmp_path, config, needle):
    from gsd.teachers.diffusers_teacher import load_diffusers_teacher

    folder, _ = _unet_folder(tmp_path, config=config)
    _fast_one_line(lambda: load_diffusers_teacher(folder), needle)


@pytest.mark.parametrize("scheduler, needle", [
    (dict(num_train_timesteps="abc"), "num_train_timesteps"),
    (dict(num_train_timesteps=10 ** 12), "num_train_timesteps"),
    (dict(num_train_timesteps=1.5), "num_train_timesteps"),
    (dict(beta_start="x"), "beta_start"),
    (dict(beta_end=float("nan")), "beta_end"),
    (dict(beta_end=1.5), "beta_end"),
    (dict(beta_schedule=["linear"]), "beta_schedule"),
    (dict(trained_betas=["a", "b"]), "trained_betas"),
    (dict(trained_betas=[0.1] * 200_000), "trained_betas"),
    (dict(beta_start=0.02, beta_end=1e-4), "reversed"),
])
def test_diffusers_bad_scheduler_values_are_one_line(tmp_path, scheduler, needle):
    from gsd.teachers.diffusers_teacher import load_diffusers_teacher

    folder, _ = _unet_folder(tmp_path, scheduler=scheduler)
    _fast_one_line(lambda: load_diffusers_teacher(folder), needle)


def test_diffusers_bad_files_via_the_import_cli(tmp_path, capsys):
    from gsd import import_teacher

    for i, (kw, needle) in enumerate([(dict(config=dict(in_channels="abc")), "in_channels"),
                                      (dict(scheduler=dict(num_train_timesteps=10 ** 12)), "num_train_timesteps"),
                                      (dict(scheduler=dict(beta_start="x")), "beta_start"),
                                      (dict(edit_weights=lambda u: next(u.parameters()).view(-1).fill_(float("nan"))),
                                       "non-finite")]):
        folder, _ = _unet_folder(tmp_path, name=f"u{i}", **kw)
        code = run_main(import_teacher.main, [str(folder)])
        assert_one_line_error(code, capsys.readouterr().err, needle)


# ----------------------------------------------------------------------------------------
# D8: --dataset folder

def _png16(path, array):
    from PIL import Image

    Image.fromarray(np.asarray(array, dtype=np.uint16)).save(path)


def test_folder_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    _png16(tmp_path / "grey.png", np.full((8, 8), 32768))
    ramp = np.tile(np.linspace(0, 65535, 16).round(), (16, 1))
    _png16(tmp_path / "ramp16.png", ramp)
    Image.fromarray((ramp / 257).round().astype(np.uint8)).save(tmp_path / "ramp8.png")
    assert Image.open(tmp_path / "grey.png").mode.startswith("I")  # really a 16-bit file
    ds = load_dataset("folder", data_root=str(tmp_path), resolution=8)
    grey, ramp16, ramp8 = ds.data  # sorted file names
    assert (grey - (32768 / 65535 * 2 - 1)).abs().max() < 1e-3  # ~0, not +1 (white)
    assert abs(float(ramp16.mean())) < 0.02
    assert (ramp16 - ramp8).abs().max() < 0.02  # same picture as its 8-bit version
    assert torch.equal(ramp16[0], ramp16[1]) and torch.equal(ramp16[0], ramp16[2])  # grey -> RGB


def test_folder_symlink_loops_and_duplicate_links_do_not_duplicate_images(tmp_path, monkeypatch):
    from PIL import Image

    real_walk = os.walk

    def bounded_walk(*args, **kwargs):  # two loops make an unguarded walk exponential
        for i, entry in enumerate(real_walk(*args, **kwargs)):
            if i > 200:
                raise BombBuilt("the folder walk does not end")
            yield entry
    monkeypatch.setattr(os, "walk", bounded_walk)

    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "sub" / "b.png")
    os.symlink(".", tmp_path / "self")                 # a loop to itself
    os.symlink("..", tmp_path / "sub" / "up")          # a loop to an ancestor
    os.symlink("sub", tmp_path / "sub_again")          # the same folder twice
    os.symlink("a.png", tmp_path / "a_link.png")       # the same file twice
    ds = load_dataset("folder", data_root=str(tmp_path), resolution=8)
    assert ds.info["files"] == 2 and len(ds) == 2
    assert sorted(float(x.mean()) for x in ds.data) == [-1.0, 1.0]


def test_folder_data_root_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "afile.png"
    f.write_bytes(b"x")
    for name in ("folder", "cifar10"):
        with pytest.raises(DataError) as info:
            load_dataset(name, data_root=str(f))
        assert "not a directory" in str(info.value) and "afile.png" in str(info.value)


@pytest.mark.parametrize("name", ["folder", "cifar10"])
def test_absurd_resolution_is_refused_with_a_reason_before_allocating(tmp_path, monkeypatch, name):
    from PIL import Image

    if name == "folder":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    else:
        _write_cifar(tmp_path)

    def no_resize(*args, **kwargs):
        raise BombBuilt("an image was resized to the absurd resolution")
    monkeypatch.setattr(Image.Image, "resize", no_resize)
    monkeypatch.setattr(torch.nn.functional, "interpolate", no_resize)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_dataset(name, data_root=str(tmp_path), resolution=100_000)
    msg = str(info.value)
    assert "100000" in msg and "GB" in msg and "memory" in msg and "\n" not in msg, msg
    assert time.perf_counter() - start < 5
    for bad in (0, -3):
        with pytest.raises(DataError, match="resolution"):
            load_dataset(name, data_root=str(tmp_path), resolution=bad)


# ----------------------------------------------------------------------------------------
# D9: gsd.import_teacher --out checks come first

@pytest.mark.parametrize("case", ["dir", "under-file", "proc", "existing-file"])
def test_import_teacher_bad_out_is_one_line_before_loading(tmp_path, capsys, monkeypatch, case):
    from gsd.teachers import edm_pickle as edm_import
    from gsd import import_teacher

    if case == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc")
    path, _, _ = _edm_pickle(tmp_path)
    (tmp_path / "afile").write_text("precious")
    out = {"dir": tmp_path, "under-file": tmp_path / "afile" / "t.safetensors",
           "proc": Path("/proc/gsd-import-test.safetensors"), "existing-file": tmp_path / "afile"}[case]

    def never(*args, **kwargs):
        raise BombBuilt("the pickle was loaded before --out was checked")
    monkeypatch.setattr(edm_import, "export_edm_pickle", never)
    monkeypatch.setattr(import_teacher, "export_edm_pickle", never)  # the name the command calls
    code = run_main(import_teacher.main, [str(path), "--trust-pickle", "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, "--out")
    assert (tmp_path / "afile").read_text() == "precious"


def test_import_teacher_write_failure_is_one_line(tmp_path, capsys, monkeypatch):
    from gsd import import_teacher
    from gsd.models import checkpoint

    path, _, _ = _edm_pickle(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_denoiser", full_disk)
    import gsd.teachers.edm_pickle as edm_import
    monkeypatch.setattr(edm_import, "save_denoiser", full_disk)
    code = run_main(import_teacher.main, [str(path), "--trust-pickle", "--out", str(tmp_path / "t.safetensors")])
    assert_one_line_error(code, capsys.readouterr().err, "t.safetensors", "No space left")
