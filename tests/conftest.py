"""Test set-up. Triton reads TRITON_INTERPRET when a kernel is decorated (import time of the kernel
module), so without a GPU it is switched on here, before anything imports ``diga_fast.kernels``."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: the suite runs under pytest-xdist on 2 cores, and OpenMP
# spin-waiting on an oversubscribed machine is slower than one thread by an order of magnitude.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The docs' commands (tests/test_docs.py, marker ``docs``: minutes of paper networks on a CPU) run
    when asked for by ``-m`` (``python -m pytest -m docs``, which CI runs after the suite); otherwise
    they are deselected, and the run's summary counts them as such."""
    if "docs" in (config.getoption("markexpr") or ""):
        return
    chosen = [item for item in items if item.get_closest_marker("docs") is None]
    if len(chosen) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("docs") is not None])
        items[:] = chosen
