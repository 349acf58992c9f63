"""The compiled core is found wherever the user stands, and a stale build is refused.

`pip install .` followed by `python -m gsd.train --fused` in the clone's root imports the source
tree's gsd_kernels (no `_C` there); gsd_kernels.extension must then load the installed `_C`, and
only if it was built from the same kernel sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gsd_kernels import extension
from gsd_kernels.source_hash import MARKER, source_hash

REPO = Path(__file__).resolve().parents[2]


def _fake_module(path: Path, fingerprint: bytes | None) -> Path:
    body = b"\x7fELF padding " + (MARKER + fingerprint + b"\0" if fingerprint is not None else b"") + b" tail"
    path.write_bytes(body)
    return path


def test_source_hash_sees_every_kernel_source_and_nothing_else(tmp_path):
    csrc = tmp_path / "csrc"
    (csrc / "cuda").mkdir(parents=True)
    (csrc / "a.cpp").write_text("int a;")
    (csrc / "cuda" / "k.cu").write_text("__global__ void k() {}")
    first = source_hash(csrc)
    (csrc / "README.txt").write_text("not a source")
    assert source_hash(csrc) == first
    (csrc / "cuda" / "k.cu").write_text("__global__ void k() { }")
    edited = source_hash(csrc)
    assert edited != first
    (csrc / "cuda" / "k.cu").rename(csrc / "k.cu")  # same bytes, other path
    assert source_hash(csrc) != edited


def test_choose_takes_the_first_build_of_these_sources(tmp_path):
    stale = _fake_module(tmp_path / "stale.so", b"0123456789abcdef")
    good = _fake_module(tmp_path / "good.so", b"fedcba9876543210")
    assert extension.choose([stale, good], "fedcba9876543210") == good
    assert extension.embedded_hash(good) == "fedcba9876543210"
    # an installed package has no csrc/ to compare with: its own _C is taken
    assert extension.choose([stale, good], None) == stale


def test_choose_refuses_a_stale_build_in_one_line(tmp_path):
    stale = _fake_module(tmp_path / "stale.so", b"0123456789abcdef")
    unknown = _fake_module(tmp_path / "old.so", None)
    with pytest.raises(ImportError) as info:
        extension.choose([stale, unknown], "fedcba9876543210")
    message = str(info.value)
    assert "\n" not in message and "stale" in message and "pip install ." in message
    assert "0123456789abcdef" in message and "unknown version" in message
    with pytest.raises(ImportError, match="not built: run `pip install .`"):
        extension.choose([], "fedcba9876543210")


def test_the_loaded_extension_was_built_from_this_checkout():
    """The build embeds the fingerprint (setup.py -> CMake -> bindings.cpp) and the loaded `_C`
    is a build of this repository's csrc/, whichever folder it was found in."""
    import gsd_kernels.backends.native as native  # imports _C through the loader

    assert native._C.source_hash() == source_hash(REPO / "csrc")
    assert extension.embedded_hash(Path(native._C.__file__)) == native._C.source_hash()


def _clone(tmp_path: Path) -> Path:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.fail("the newcomer-path test needs the repository as a git checkout and git on PATH")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def _run(clone: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["GSD_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "gsd.train", *args], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_newcomer_path_runs_the_compiled_kernels_from_the_clone_root(tmp_path):
    """The README's sequence: a fresh clone, `pip install .` (done by CI for this checkout), then
    `python -m gsd.train --fused` from the clone's root. The source tree is first on sys.path
    there and has no `_C`; the run must still use the compiled kernels and record so."""
    clone = _clone(tmp_path)
    assert not list((clone / "gsd_kernels").glob("_C*")), "a fresh clone has no compiled module"
    out = tmp_path / "run"
    done = _run(clone, tmp_path, "--fused", "--dataset", "gmm", "--iters", "3", "--eval-samples", "256",
                "--latency-repeats", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    for record in ("config.json", "metrics.json"):
        backends = json.loads((out / record).read_text())["backends"]
        assert set(backends) == {"isometry_loss", "sid_generator_loss", "fake_score_loss"}
        assert "reference" not in backends.values(), f"{record}: {backends}"
    summary = [line for line in done.stdout.splitlines() if "backends" in line]
    assert summary and "reference" not in summary[-1], done.stdout[-2000:]


@pytest.mark.slow
def test_fused_refuses_a_stale_build_before_writing_anything(tmp_path):
    """Kernel sources edited after `pip install .`: the installed `_C` no longer matches, so
    `--fused` has no fused backend and must stop in one line, exit 2, with no run directory."""
    clone = _clone(tmp_path)
    source = clone / "csrc" / "cpu" / "sid_cpu.cpp"
    source.write_text(source.read_text() + "\n// edited after the install\n")
    out = tmp_path / "run"
    done = _run(clone, tmp_path, "--fused", "--dataset", "gmm", "--iters", "3", "--eval-samples", "0",
                "--out", str(out))
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "stale" in lines[0] and "pip install ." in lines[0], done.stderr
    assert not out.exists()


def test_a_source_tree_egg_info_does_not_hide_the_installed_build(tmp_path, monkeypatch):
    """`pip install .` leaves gsd.egg-info in the clone, and from the clone's root it is the first
    `gsd` distribution Python finds; its file list has no `_C`. The loader must still find the
    installed `_C` (CI failed on exactly this once the package list became package discovery)."""
    import importlib.metadata as md

    installed = [Path(f.locate()).resolve() for d in md.distributions(name="gsd") for f in (d.files or [])
                 if f.parts[:1] == ("gsd_kernels",) and f.name.startswith("_C.")]
    if not installed:
        pytest.skip("no installed gsd distribution with a compiled _C here (CI installs one with pip install .)")
    shadow = tmp_path / "gsd.egg-info"
    shadow.mkdir()
    (shadow / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: gsd\nVersion: 0.1.0\n")
    (shadow / "SOURCES.txt").write_text("gsd_kernels/__init__.py\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert next(iter(md.distributions(name="gsd")))._path == shadow  # the shadow comes first
    assert set(installed) <= set(extension._candidates())
