"""Test set-up. Triton reads TRITON_INTERPRET when a kernel is decorated (import time of the kernel
module), so without a GPU it is switched on here, before anything imports ``diga_fast.kernels``."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: the suite runs under pytest-xdist on 2 cores, and OpenMP
# spin-waiting on an oversubscribed machine is slower than one thread by an order of magnitude.
torch.set_num_threads(1)
