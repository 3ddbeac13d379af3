"""Shared by the kernel tests."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def huge_fp16_buffer(numel: int) -> torch.Tensor:
    """A virtual buffer: torch.empty maps the pages, only the ones written are ever touched (so a test can
    put values beyond 2**31 elements without gigabytes of memory); skipped when it cannot be mapped."""
    try:
        return torch.empty(numel, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"cannot map a {numel * 2 / 2**30:.0f} GiB virtual buffer here: {err}")
