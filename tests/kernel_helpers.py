"""Shared by the kernel tests: the device, full-size mode, and every autotune config as test params.

With ``DIGA_KERNEL_TESTS=full`` on a GPU (what ``benchmarks/gpu_check.py`` sets), each kernel file's
``test_every_config`` runs at the training shapes; otherwise at small shapes (the interpreter has one
config per kernel, a GPU its whole list)."""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL_SIZE = DEVICE == "cuda" and os.environ.get("DIGA_KERNEL_TESTS") == "full"


def sizes(small: list, full: list) -> list:
    """The shapes of ``test_every_config``: the training shapes in full-size mode, else small ones."""
    return full if FULL_SIZE else small


def config_id(config) -> str:
    return "-".join([*(f"{k}{v}" for k, v in config.kwargs.items()), f"w{config.num_warps}", f"s{config.num_stages}"])


def every_config(kernel, cases: list, keep=lambda config, *case: True) -> list:
    """pytest params (config, *case) for each autotune config of ``kernel`` and each case tuple that
    ``keep`` admits (what the kernel's own config pruning would leave for it)."""
    return [pytest.param(config, *case, id=f"{config_id(config)}-{'-'.join(map(str, case))}")
            for config in kernel.configs for case in cases if keep(config, *case)]


def huge_fp16_buffer(numel: int) -> torch.Tensor:
    """A virtual buffer: torch.empty maps the pages, only the ones written are ever touched (so a test can
    put values beyond 2**31 elements without gigabytes of memory); skipped when it cannot be mapped."""
    try:
        return torch.empty(numel, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"cannot map a {numel * 2 / 2**30:.0f} GiB virtual buffer here: {err}")
