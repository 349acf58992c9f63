"""Reliability of the command-line layer: bounded numbers, one-line errors, quiet logs
(review D4, D9, issue 10 item 4)."""

import argparse

import pytest

from gsd import argtypes, util
from gsd.errors import UsageError


def test_seed_int_accepts_its_range_and_refuses_outside():
    assert argtypes.seed_int("0") == 0
    assert argtypes.seed_int(str(util.MAX_SEED)) == util.MAX_SEED
    for bad in (str(10 ** 20), str(util.MAX_SEED + 1), "-1", "1e20", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.seed_int(bad)


def test_max_seed_is_accepted_by_torch_numpy_and_sklearn():
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    assert torch.Generator().manual_seed(util.MAX_SEED).initial_seed() == util.MAX_SEED
    assert np.array_equal(np.random.RandomState(util.MAX_SEED).randint(0, 1000, 5),
                          np.random.RandomState(util.MAX_SEED).randint(0, 1000, 5))
    fitted = LogisticRegression(random_state=util.MAX_SEED).fit(np.array([[0.0], [1.0]]), [0, 1])
    assert list(fitted.predict(np.array([[-5.0], [6.0]]))) == [0, 1]
    # commands derive seeds as seed * stride + offset; the largest stride used is 1e8
    derived = util.MAX_SEED * 100_000_000 + 10 ** 9
    assert torch.Generator().manual_seed(derived).initial_seed() == derived


def test_bounded_int_and_count_int():
    parse = argtypes.bounded_int(2, 5, "why not")
    assert parse("2") == 2 and parse("5") == 5
    with pytest.raises(argparse.ArgumentTypeError, match="why not"):
        parse("6")
    with pytest.raises(argparse.ArgumentTypeError):
        parse("1")
    assert argtypes.count_int(str(argtypes.MAX_COUNT)) == argtypes.MAX_COUNT
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.count_int(str(10 ** 20))
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.count_int("0")


def test_check_memory_refuses_beyond_the_limit(monkeypatch):
    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "1")
    assert util.memory_limit_bytes() == 10 ** 9
    util.check_memory(0.9e9, "x")
    with pytest.raises(UsageError, match=r"25\.6 GB.*1\.0 GB limit"):
        util.check_memory(25.6e9, "the samples")
    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "nan")
    with pytest.raises(UsageError):
        util.memory_limit_bytes()
    monkeypatch.delenv("GSD_MEMORY_LIMIT_GB")
    assert util.memory_limit_bytes() > 10 ** 8


# ---------------------------------------------------------------- quiet logs (issue 10 item 4)

import io  # noqa: E402
import sys  # noqa: E402

from gsd import progress  # noqa: E402


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _lines(text):
    return [l for l in text.split("\n") if l.strip()]


@pytest.mark.parametrize("total", [40, 2, 7, 1000, 99_991])
def test_plain_progress_is_a_few_lines_without_carriage_returns(capsys, total):
    bar = progress.progress_bar(total=total, desc="loop")
    assert isinstance(bar, progress.PlainProgress)  # captured stderr is not a terminal
    for i in range(total):
        bar.update(1)
        bar.set_postfix({"loss": f"{1.0 / (i + 1):.3g}"}, refresh=False)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = _lines(err)
    assert len(lines) <= min(22, total + 2), lines
    assert lines[0].startswith(f"loop: 0/{total}")
    assert lines[-1].startswith(f"loop: {total}/{total} (100%)") and "loss=" in lines[-1]
    # the percentages printed never go down and are at least ~5% apart (except the start)
    pct = [int(l.split("(")[1].split("%")[0]) for l in lines]
    assert pct == sorted(pct)
    if total >= 20:
        assert all(b - a >= 4 for a, b in zip(pct[1:], pct[2:])), pct


def test_forty_iteration_loop_fits_in_22_lines_and_wraps_iterables(capsys):
    seen = list(progress.progress_bar(range(40), desc="it"))
    assert seen == list(range(40))
    err = capsys.readouterr().err
    assert "\r" not in err and 2 <= len(_lines(err)) <= 22
    assert _lines(err)[-1].startswith("it: 40/40")


def test_resumed_plain_progress_counts_from_initial(capsys):
    bar = progress.progress_bar(total=40, initial=30, desc="r")
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = _lines(capsys.readouterr().err)
    assert lines[0].startswith("r: 30/40") and lines[-1].startswith("r: 40/40")
    assert len(lines) <= 7  # start + one per 5% of the 40 (10 left = 25%)


def test_fake_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    tty = _FakeTTY()
    bar = progress.progress_bar(total=40, desc="tty", file=tty)
    assert isinstance(bar, tqdm)
    for _ in range(40):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue()


def test_isatty_of_stderr_decides_the_mode(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(sys, "stderr", _FakeTTY())
    assert isinstance(progress.progress_bar(total=3), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress.progress_bar(total=3), progress.PlainProgress)


def test_disabled_progress_writes_nothing(capsys):
    bar = progress.progress_bar(range(5), total=5, enabled=False)
    assert list(bar) == list(range(5))
    bar.update(3)
    bar.set_postfix(loss=1)
    bar.close()
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_progress_module_imports_no_command():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(progress.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("gsd") or n == "" or n.startswith(".")], names


# ---------------------------------------------------------------- review D9: one line, exit 2

from cli_checks import assert_one_line_error  # noqa: E402


def _cli(main, argv, capsys):
    from gsd.cli import run_main

    try:
        code = run_main(main, argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture
def nothing_loads(monkeypatch):
    """The refusals below must come before a teacher is loaded or trained."""
    import gsd.sample
    import gsd.teacher

    def boom(*a, **k):
        raise AssertionError("a teacher was loaded before the flags were checked")
    monkeypatch.setattr(gsd.teacher, "get_teacher", boom)
    monkeypatch.setattr(gsd.sample, "get_teacher", boom)  # the name gsd.sample calls


@pytest.mark.parametrize("argv, needles", [
    (["--num", str(10 ** 20)], ["--num"]),
    (["--num", str(10 ** 8)], ["--num 100000000", "25.6 GB", "limit"]),   # the review's 25.6 GB allocation
    (["--scale", "100000"], ["--scale"]),                                  # was a MemoryError
    (["--num", "16", "--scale", "1000"], ["--scale 1000", "pixels"]),
    (["--num", "4000000", "--scale", "1"], ["--num 4000000", "pixels"]),
    (["--seed", str(10 ** 20)], ["--seed"]),
    (["--steps", str(10 ** 20)], ["--steps"]),
    (["--out", "/proc/x.png"], ["/proc"]),
    (["--out", "FILE/x.png"], ["not a folder"]),
    (["--out", "TMP"], ["folder"]),
    (["--out", "TMP/x.jpg"], [".png"]),
])
def test_sample_refuses_in_one_line(tmp_path, capsys, monkeypatch, nothing_loads, argv, needles):
    from gsd.sample import main

    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "12")  # the review machine's half of 23 GB
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "FILE")).replace("TMP", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "g.png")]
    code, err = _cli(main, ["--dataset", "digits"] + argv, capsys)
    assert_one_line_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_sample_grid_check_matches_the_written_grid(tmp_path):
    # the size check computes the same layout as the writer (guards against the two drifting apart)
    from PIL import Image

    from gsd.evaluation.plots import grid_layout, save_image_grid

    for n, nrow, scale in [(1, None, 1), (7, None, 2), (12, 6, 1), (5, 3, 3)]:
        path = tmp_path / f"g{n}.png"
        save_image_grid(torch_rand(n), str(path), nrow=nrow, scale=scale)
        _, _, gh, gw = grid_layout(n, 8, 8, nrow)
        assert Image.open(path).size == (gw * scale, gh * scale)


def torch_rand(n):
    import torch

    return torch.rand(n, 1, 8, 8) * 2 - 1
