"""Shared test setup.

Triton kernels run on CPU tensors only under its interpreter, and @triton.jit picks the
interpreter when the kernel is defined, so the variable must be set before anything
imports gsd_kernels' Triton module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs per test, but reproducible when a failure is re-run.
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks gain nothing from intra-op threads, and on a shared CPU two OpenMP threads
    fighting other jobs made whole modules tens of times slower. Modules that run tiny networks
    use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
