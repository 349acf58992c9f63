"""Find the compiled core `gsd_kernels._C`, and refuse one built from other kernel sources.

`pip install .` puts `_C` in site-packages. A user who then runs `python -m gsd.train` from the
clone's root imports the *source tree's* gsd_kernels, which has no `_C`: without this module
every fused backend would silently be unavailable there. So the loader looks in two places, in
order: the package's own folder (an in-place development build) and the installed distribution.
A candidate is used only if the source fingerprint compiled into it equals the fingerprint of the
`csrc/` beside this package (when there is one: an installed package has no `csrc/`, and its `_C`
was built with it).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from .source_hash import HASH_CHARS, MARKER, source_hash

PACKAGE_DIR = Path(__file__).resolve().parent
MODULE_NAME = f"{__package__}._C"


class ExtensionUnavailable(ImportError):
    """No usable `_C`: its message is one line saying why and how to fix it."""


def _candidates() -> list[Path]:
    """Files that could be `_C`: the package's own folder first, then the installed copy."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    found = [p for s in suffixes for p in sorted(PACKAGE_DIR.glob(f"_C{s}"))]
    # every installed copy named gsd, not only the first: in a clone's root after `pip install .`,
    # the first one found is the build's gsd.egg-info in the source tree, whose file list has no `_C`
    files = [f for dist in importlib.metadata.distributions(name="gsd") for f in (dist.files or [])]
    for f in files:
        if f.parts[:1] == ("gsd_kernels",) and f.name.startswith("_C.") and any(f.name.endswith(s) for s in suffixes):
            path = Path(f.locate()).resolve()
            if path.exists() and path not in found:
                found.append(path)
    return found


def embedded_hash(path: Path) -> str | None:
    """The source fingerprint compiled into a `_C` file, read without importing it."""
    data = path.read_bytes()
    at = data.find(MARKER)
    if at < 0:
        return None
    value = data[at + len(MARKER): at + len(MARKER) + HASH_CHARS].split(b"\0")[0]
    return value.decode("ascii", "replace")


def expected_hash() -> str | None:
    """Fingerprint of the `csrc/` beside this package (a clone), or None (an installed package)."""
    csrc = PACKAGE_DIR.parent / "csrc"
    return source_hash(csrc) if csrc.is_dir() else None


def _import_from(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE_NAME] = module
    return module


def choose(candidates: list[Path], want: str | None) -> Path:
    """The first candidate built from the sources `want` (any candidate when `want` is None),
    or ExtensionUnavailable with a one-line reason and fix."""
    stale = []
    for path in candidates:
        have = embedded_hash(path)
        if want is None or have == want:
            return path
        stale.append(f"{path} was built from kernel sources {have or 'of unknown version'}, "
                     f"this tree's csrc/ is {want}")
    fix = "run `pip install .` in the repository root (or `python setup.py build_ext --inplace` for development)"
    if stale:
        raise ExtensionUnavailable(f"gsd_kernels._C is stale ({'; '.join(stale)}): {fix}")
    raise ExtensionUnavailable(f"gsd_kernels._C is not built: {fix}")


def load():
    """The `_C` module to use, or ExtensionUnavailable with a one-line reason and fix."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    return _import_from(choose(_candidates(), expected_hash()))
