"""Shared helpers for the kernels: backend resolution (the contract's ``backend=`` argument, and
``"compile"``: ``torch.compile`` of the reference, the baseline a user would reach for instead of a
hand-written kernel), launch sizes, and the one Triton helper every kernel uses to address a pixel of a [B, C, H, W] tensor of any
strides (NCHW, channels_last, sliced views) without copying it."""

import contextlib
import os

import torch
import triton
import triton.language as tl

BACKENDS = ("triton", "torch", "compile")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (how CI tests them without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_default_backend: str | None = None


@contextlib.contextmanager
def default_backend(backend: str | None):
    """Within the block, ops called with ``backend=None`` use ``backend`` (None: the automatic choice).
    How a training run switches every op to its PyTorch reference (``train.kernels=torch``) or to
    ``torch.compile`` of it (``train.kernels=compile``)."""
    global _default_backend
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected None, 'triton', 'torch' or 'compile'")
    previous, _default_backend = _default_backend, backend
    try:
        yield
    finally:
        _default_backend = previous


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """``None`` → the :func:`default_backend` in force, else "triton" for CUDA tensors and "torch"
    otherwise; "triton" on CPU only when interpreting."""
    if backend is None:
        backend = _default_backend
    if backend is None:
        return "triton" if tensor.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected None, 'triton', 'torch' or 'compile'")
    if backend == "triton" and not tensor.is_cuda and not interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1, set before the kernels are "
            f"imported, to run the Triton interpreter on CPU); got a tensor on {tensor.device}"
        )
    return backend


_compiled: dict = {}


def reference(fn, backend: str):
    """The PyTorch reference ``fn`` for backend "torch", or ``torch.compile(fn)`` (made once per
    function, Inductor's default mode) for "compile"."""
    if backend == "torch":
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def pixels_contiguous(t: torch.Tensor) -> bool:
    """Whether the pixels of one channel of a [..., H, W] tensor are one contiguous run (w stride 1,
    h stride W): the kernels then index pixels by a flat offset the compiler can vectorise."""
    h, w = t.shape[-2], t.shape[-1]
    return (w == 1 or t.stride(-1) == 1) and (h == 1 or t.stride(-2) == w)


MAX_TRITON_CLASSES = 64


def check_k(k: int) -> None:
    """The Triton kernels hold all classes of a pixel block in registers: 1 to 64 classes. Called on
    the Triton path only; the PyTorch references take any number of classes."""
    if not 1 <= k <= MAX_TRITON_CLASSES:
        raise ValueError(
            f"the Triton kernels support 1 to {MAX_TRITON_CLASSES} classes, got {k} "
            "(backend='torch' takes any number)"
        )


def check_pixels(h: int, w: int) -> None:
    """Flat pixel indices (h * W + w) are int32 inside the kernels; element offsets are int64."""
    if h * w >= 2**31:
        raise ValueError(f"the Triton kernels support fewer than 2**31 pixels per image, got {h}x{w}")


@triton.jit
def pixel_offsets(offs_p, W, stride_h, stride_w, CONTIGUOUS: tl.constexpr):
    """Element offsets of flat pixel indices ``offs_p`` (h * W + w, int32) in a tensor with the given
    h/w strides; a flat index itself when the pixels are contiguous (then < H·W < 2**31). Strided
    offsets are int64: h · stride_h passes 2**31 in a channels_last or sliced view long before the
    flat index does."""
    if CONTIGUOUS:
        return offs_p
    else:
        return (offs_p // W).to(tl.int64) * stride_h + (offs_p % W).to(tl.int64) * stride_w


@triton.jit
def round_to_tf32(x):
    """fp32 rounded to the nearest tf32 (10 mantissa bits, ties away from zero), as cvt.rna.tf32 does:
    the tensor cores then take it exactly. x and x - round_to_tf32(x), both rounded, are the two
    halves of tf32x3's split; when the other operand is exact in tf32 (a one-hot, fp16/bf16
    features), the two products hi·y + lo·y are tf32x3's whole sum."""
    return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
