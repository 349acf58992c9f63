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

from gsd.cli import UsageError, run_main
from gsd.data import DataError, load_dataset
from cli_checks import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]

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
