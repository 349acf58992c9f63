"""`pip install .` ships every subpackage: pyproject.toml discovers packages instead of listing them."""

import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[2]


def test_package_discovery_finds_every_package_folder():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "packages" in tool and "find" in tool["packages"], "a fixed list silently drops new subpackages"
    include = tool["packages"]["find"]["include"]
    found = set(find_packages(where=str(REPO), include=include))
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for top in ("gsd", "gsd_kernels") for p in (REPO / top).rglob("__init__.py")}
    assert {"gsd.models", "gsd.teachers", "gsd.sampling", "gsd.evaluation"} <= on_disk
    assert on_disk <= found, sorted(on_disk - found)
    assert not {p for p in found if not p.startswith(("gsd.", "gsd_kernels.")) and p not in ("gsd", "gsd_kernels")}
