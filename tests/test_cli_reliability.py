"""Reliability of the command-line layer: bounded numbers, one-line errors, quiet logs
(review D4, D9, issue 10 item 4)."""

import argparse

import pytest

from gsd import cli


def test_seed_int_accepts_its_range_and_refuses_outside():
    assert cli.seed_int("0") == 0
    assert cli.seed_int(str(cli.MAX_SEED)) == cli.MAX_SEED
    for bad in (str(10 ** 20), str(cli.MAX_SEED + 1), "-1", "1e20", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.seed_int(bad)


def test_max_seed_is_accepted_by_torch_numpy_and_sklearn():
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    torch.Generator().manual_seed(cli.MAX_SEED)
    np.random.RandomState(cli.MAX_SEED)
    LogisticRegression(random_state=cli.MAX_SEED).fit(np.array([[0.0], [1.0]]), [0, 1])
    # commands derive seeds as seed * stride + offset; the largest stride used is 1e8
    torch.Generator().manual_seed(cli.MAX_SEED * 100_000_000 + 10 ** 9)


def test_bounded_int_and_count_int():
    parse = cli.bounded_int(2, 5, "why not")
    assert parse("2") == 2 and parse("5") == 5
    with pytest.raises(argparse.ArgumentTypeError, match="why not"):
        parse("6")
    with pytest.raises(argparse.ArgumentTypeError):
        parse("1")
    assert cli.count_int(str(cli.MAX_COUNT)) == cli.MAX_COUNT
    with pytest.raises(argparse.ArgumentTypeError):
        cli.count_int(str(10 ** 20))
    with pytest.raises(argparse.ArgumentTypeError):
        cli.count_int("0")


def test_check_memory_refuses_beyond_the_limit(monkeypatch):
    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "1")
    assert cli.memory_limit_bytes() == 10 ** 9
    cli.check_memory(0.9e9, "x")
    with pytest.raises(cli.UsageError, match=r"25\.6 GB.*1\.0 GB limit"):
        cli.check_memory(25.6e9, "the samples")
    monkeypatch.setenv("GSD_MEMORY_LIMIT_GB", "nan")
    with pytest.raises(cli.UsageError):
        cli.memory_limit_bytes()
    monkeypatch.delenv("GSD_MEMORY_LIMIT_GB")
    assert cli.memory_limit_bytes() > 10 ** 8
