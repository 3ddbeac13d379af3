"""Test set-up. Triton reads TRITON_INTERPRET when a kernel is decorated (import time of the kernel
module), so without a GPU it is switched on here, before anything imports ``diga_fast.kernels``."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))
