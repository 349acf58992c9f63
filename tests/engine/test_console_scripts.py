"""Every console script runs its command through run_main: bad input is one line and exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cli_checks import assert_one_line_error
from gsd import console

REPO = Path(__file__).resolve().parents[2]

# script -> (arguments that must be refused before anything runs, a word the error names)
BAD_INPUT = {
    "gsd-train": (["--teacher", "/nonexistent"], "/nonexistent"),
    "gsd-evaluate": (["/nonexistent"], "/nonexistent"),
    "gsd-experiments": (["--teacher", "/nonexistent"], "/nonexistent"),
    "gsd-edit": (["/nonexistent"], "/nonexistent"),
    "gsd-sample": (["--teacher", "/nonexistent", "--out", "{tmp}/g.png"], "/nonexistent"),
    "gsd-teacher": (["--dataset", "nope"], "nope"),
    "gsd-import-teacher": (["/nonexistent.pkl", "--out", "{tmp}/t.safetensors", "--trust-pickle"], "/nonexistent"),
    "gsd-generate": (["/nonexistent", "--out", "{tmp}/samples"], "/nonexistent"),
    "gsd-export": (["/nonexistent", "--out", "{tmp}/G.safetensors"], "/nonexistent"),
    "gsd-fid": (["calc", "--images", "/nonexistent", "--ref", "{tmp}/ref.npz"], "/nonexistent"),
}


def test_pyproject_names_one_console_script_per_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(console.COMMANDS) == set(BAD_INPUT)
    for script, target in scripts.items():
        module, attr = target.split(":")
        assert module == "gsd.console"
        assert callable(getattr(console, attr)), target
    # every documented `python -m gsd.<command>` has its script
    documented = {line.split("python -m ")[1].split()[0] for line in (REPO / "README.md").read_text().splitlines()
                  if "python -m gsd." in line}
    assert documented <= set(console.COMMANDS.values()), documented - set(console.COMMANDS.values())


def _run(argv, tmp_path):
    return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("script", sorted(BAD_INPUT))
def test_console_entry_refuses_bad_input_in_one_line(script, tmp_path):
    args, needle = BAD_INPUT[script]
    args = [a.format(tmp=tmp_path) for a in args]
    attr = script.removeprefix("gsd-").replace("-", "_")
    code = f"import sys; sys.argv = ['{script}'] + {args!r}; from gsd.console import {attr}; {attr}()"
    p = _run([sys.executable, "-c", code], tmp_path)
    assert_one_line_error(p.returncode, p.stderr, needle)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_installed_gsd_train_script_refuses_a_missing_teacher_in_one_line(tmp_path):
    """The installed `gsd-train` (after `pip install .`, as CI does) is the same entry."""
    exe = shutil.which("gsd-train", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("gsd-train is not installed in this environment (pip install . installs it)")
    p = _run([exe, "--teacher", "/nonexistent"], tmp_path)
    assert_one_line_error(p.returncode, p.stderr, "/nonexistent")


def test_every_readme_command_is_a_command_module_with_help():
    """The README's `python -m gsd.<cmd>` lines name exactly the command modules (top level =
    commands), and each answers --help with exit 0 through the real interpreter."""
    import re

    documented = set(re.findall(r"python -m (gsd\.[a-z_]+)", (REPO / "README.md").read_text()))
    assert documented == set(console.COMMANDS.values())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for module in sorted(documented):
        p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0 and "usage:" in p.stdout, (module, p.stderr[-500:])
