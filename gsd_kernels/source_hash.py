"""The fingerprint of the kernel sources a compiled `gsd_kernels._C` was built from.

setup.py compiles this fingerprint into `_C`; `gsd_kernels.extension` compares it with the
fingerprint of the `csrc/` beside the package, so that a build made from other kernel sources
(an old `pip install .`, an in-place build before an edit) is refused instead of being run.
This module must not import torch or gsd_kernels: setup.py loads it by path at build time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_SUFFIXES = (".h", ".hpp", ".cpp", ".cu", ".cuh")
MARKER = b"GSD_SOURCE_HASH="   # precedes the hex fingerprint inside the compiled module
HASH_CHARS = 16


def source_hash(csrc: Path) -> str:
    """Hex fingerprint of every C++/CUDA source under `csrc` (paths and contents)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(csrc).rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
    for path in files:
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:HASH_CHARS]
