"""`python -m gsd.generate`: files by seed that do not depend on the batch size, the number of
processes or an interruption; npz and grid outputs; --resume; the one-line refusals."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_checks import assert_one_line_error
from gsd import generate, generation
from gsd.cli import run_main
from gsd.generator import OneStepGenerator, load_generator
from test_generator import image_net, write_generator_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {"rgb": write_generator_file(root / "rgb.safetensors", image_net(res=8, channels=3)),
            "cond": write_generator_file(root / "cond.safetensors", image_net(res=8, channels=3, label_dim=4)),
            "grey": write_generator_file(root / "grey.safetensors", image_net(res=8, channels=1))}


def _gen(argv, capsys):
    try:
        code = run_main(generate.main, [*argv, "--no-progress", "--device", "cpu"])
    except SystemExit as exc:  # argparse's own one-line errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _pngs(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*.png"))}


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def test_files_do_not_depend_on_the_batch_size(files, tmp_path, capsys):
    outs = []
    for batch in ("1", "7", "64"):
        out = tmp_path / f"b{batch}"
        code, stdout, err = _gen([files["rgb"], "--seeds", "3-40,100", "--out", str(out), "--batch", batch], capsys)
        assert code == 0, err
        assert "39 images" in stdout
        outs.append(_pngs(out))
    assert outs[0] == outs[1] == outs[2]
    assert sorted(outs[0]) == [f"{s:06d}.png" for s in [*range(3, 41), 100]]
    # the pixels are the loader's images_for_seeds: what a library user gets for the same seeds
    G = load_generator(files["rgb"])
    expected = G.images_for_seeds([3, 17, 100])
    for k, s in enumerate([3, 17, 100]):
        assert np.array_equal(_pixels(outs[0][f"{s:06d}.png"]), expected[k])
    manifest = json.loads((tmp_path / "b1" / generation.MANIFEST_NAME).read_text())
    assert manifest["seeds"] == "3-40,100" and manifest["block"] == 16 and manifest["labels"] is None


def test_npz_grid_subdirs_and_labels(files, tmp_path, capsys):
    code, _, err = _gen([files["cond"], "--seeds", "0-9,1500", "--out", str(tmp_path / "x.npz"), "--labels",
                         "balanced", "--grid", str(tmp_path / "grid.png")], capsys)
    assert code == 0, err
    with np.load(tmp_path / "x.npz") as data:
        arr, lab = data["arr_0"], data["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (11, 8, 8, 3)
    assert lab.tolist() == [s % 4 for s in [*range(10), 1500]]
    code, _, err = _gen([files["cond"], "--seeds", "0-9,1500", "--out", str(tmp_path / "dir"), "--labels",
                         "balanced", "--subdirs"], capsys)
    assert code == 0, err
    got = _pngs(tmp_path / "dir")
    assert sorted(got) == [f"000000/{s:06d}.png" for s in range(10)] + ["001000/001500.png"]
    for k, s in enumerate([*range(10), 1500]):
        assert np.array_equal(_pixels(got[f"{s - s % 1000:06d}/{s:06d}.png"]), arr[k])
    grid = _pixels((tmp_path / "grid.png").read_bytes())
    assert grid.shape == (3 * 9 + 1, 4 * 9 + 1, 3)  # 11 images: 3 rows of 4 tiles of 8 px with 1-px gaps
    assert np.array_equal(grid[1:9, 1:9], arr[0]) and np.array_equal(grid[10:18, 1 + 9 * 2:9 + 9 * 2], arr[6])
    # --class C gives every image class C; greyscale generators write greyscale PNGs
    code, _, err = _gen([files["cond"], "--seeds", "0-3", "--out", str(tmp_path / "c.npz"), "--class", "2"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "c.npz") as data:
        assert data["arr_1"].tolist() == [2, 2, 2, 2]
    code, _, err = _gen([files["grey"], "--seeds", "0-3", "--out", str(tmp_path / "g")], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "g" / "000000.png") as img:
        assert img.mode == "L" and img.size == (8, 8)
    code, _, err = _gen([files["rgb"], "--seeds", "0-3", "--out", str(tmp_path / "u.npz")], capsys)
    assert code == 0, err
    with np.load(tmp_path / "u.npz") as data:  # an unconditional generator's npz has no labels
        assert data.files == ["arr_0"]


def test_interrupt_and_resume_give_the_uninterrupted_files(files, tmp_path, capsys, monkeypatch):
    full = tmp_path / "full"
    assert _gen([files["rgb"], "--seeds", "0-99", "--out", str(full), "--batch", "16"], capsys)[0] == 0
    part = tmp_path / "part"
    calls = {"n": 0}
    real = OneStepGenerator.run_blocks

    def interrupted(self, blocks, labels=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, blocks, labels)

    monkeypatch.setattr(OneStepGenerator, "run_blocks", interrupted)
    code, _, err = _gen([files["rgb"], "--seeds", "0-99", "--out", str(part), "--batch", "16"], capsys)
    assert code == 130 and "interrupted" in err
    monkeypatch.setattr(OneStepGenerator, "run_blocks", real)
    done = _pngs(part)
    assert len(done) == 48 and all(done[k] == v for k, v in _pngs(full).items() if k in done)
    # a killed writer's temporary file (dead pid) is removed; complete files are kept as they are
    stale = part / ".000060.png.tmp999999999"
    stale.write_bytes(b"half a png")
    before = (part / "000000.png").stat().st_mtime_ns
    code, _, err = _gen([files["rgb"], "--seeds", "0-99", "--out", str(part)], capsys)
    assert_one_line_error(code, err, "not empty", "--resume")
    code, out, err = _gen([files["rgb"], "--seeds", "0-99", "--out", str(part), "--resume", "--batch", "48"], capsys)
    assert code == 0, err
    assert "52 PNG files in" in out and "48 already there" in out
    assert _pngs(part) == _pngs(full) and not stale.exists()
    assert (part / "000000.png").stat().st_mtime_ns == before
    # a grid of a finished folder: every image is computed for it, no file is rewritten
    code, out, err = _gen([files["rgb"], "--seeds", "0-99", "--out", str(part), "--resume", "--grid",
                           str(tmp_path / "grid.png")], capsys)
    assert code == 0, err
    assert "0 PNG files in" in out and "100 already there" in out and (tmp_path / "grid.png").is_file()
    assert (part / "000000.png").stat().st_mtime_ns == before
    # another generator, or other labels, cannot continue the folder
    code, _, err = _gen([files["grey"], "--seeds", "0-99", "--out", str(part), "--resume"], capsys)
    assert_one_line_error(code, err, "--resume", "another generator")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.png").write_bytes(b"x")
    code, _, err = _gen([files["rgb"], "--out", str(tmp_path / "foreign"), "--resume"], capsys)
    assert_one_line_error(code, err, "gsd-generate.json")


@pytest.mark.parametrize("args, needles", [
    (["--seeds", "1-"], ["--seeds", "not a seed"]),
    (["--seeds", ""], ["--seeds", "empty"]),
    (["--seeds", "-3"], ["--seeds", "negative"]),
    (["--seeds", "0-4294967296"], ["--seeds", "4294967295"]),
    (["--seeds", "5-2"], ["--seeds", "ends before"]),
    (["--seeds", "1,2,1"], ["--seeds", "twice"]),
    (["--class", "1"], ["unconditional"]),
    (["--labels", "random"], ["unconditional"]),
    (["--subdirs", "--out", "{tmp}/x.npz"], ["--subdirs"]),
    (["--resume", "--out", "{tmp}/x.npz"], ["--resume"]),
    (["--grid", "{tmp}/g.jpg"], ["--grid", ".png"]),
    ([], ["nothing to write"]),
])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, args, needles):
    work = tmp_path / "work"
    work.mkdir()
    argv = [files["rgb"]] + [a.format(tmp=work) for a in args]
    if "--out" not in args and "--grid" not in args and args:
        argv += ["--out", str(work / "out")]
    code, _, err = _gen(argv, capsys)
    assert_one_line_error(code, err, *needles)
    assert list(work.iterdir()) == []


def test_bad_class_and_source_are_one_line(files, tmp_path, capsys):
    for argv, needle in (([files["cond"], "--class", "4"], "outside the generator's labels 0-3"),
                         ([str(tmp_path / "missing")], "no such file"),
                         ([str(REPO / "README.md")], "neither a run directory nor a generator file")):
        code, _, err = _gen([*argv, "--out", str(tmp_path / "o")], capsys)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_non_finite_images_are_refused_not_written(files, tmp_path, capsys, monkeypatch):
    real = OneStepGenerator.forward

    def broken(self, eps, labels=None):
        x = real(self, eps, labels)
        x[3] = float("nan")
        return x

    monkeypatch.setattr(OneStepGenerator, "forward", broken)
    code, _, err = _gen([files["rgb"], "--seeds", "0-15", "--out", str(tmp_path / "o.npz")], capsys)
    assert_one_line_error(code, err, "seed 3", "non-finite")
    assert not (tmp_path / "o.npz").exists()


def _torchrun_env(_tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def test_two_torchrun_processes_write_the_files_of_one(files, tmp_path, capsys):
    from test_ddp import free_port

    def torchrun(out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "gsd.generate", files["cond"],
               "--seeds", "0-70", "--out", str(out), "--batch", "16", "--device", "cpu", "--no-progress"]
        return subprocess.run(cmd, cwd=tmp_path, env=_torchrun_env(tmp_path), capture_output=True, text=True,
                              timeout=300)

    one = tmp_path / "one"
    assert _gen([files["cond"], "--seeds", "0-70", "--out", str(one), "--batch", "32"], capsys)[0] == 0
    p = torchrun(tmp_path / "two")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("71 images") == 1  # one summary, from rank 0
    assert _pngs(tmp_path / "two") == _pngs(one)
    p = torchrun(tmp_path / "two.npz")
    assert p.returncode == 0, p.stderr[-2000:]
    got = _pngs(one)
    with np.load(tmp_path / "two.npz") as data:
        assert data["arr_0"].shape == (71, 8, 8, 3) and data["arr_1"].shape == (71,)
        for s in range(71):
            assert np.array_equal(data["arr_0"][s], _pixels(got[f"{s:06d}.png"]))
