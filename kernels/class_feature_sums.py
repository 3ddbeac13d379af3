"""Per-image, per-class feature sums and pixel counts (masked global average pooling without the
division): the statistics behind centroid initialisation, the online centroid EMA and its DDP
all-reduce.

Byte-traffic model (``traffic_bytes``; s = bytes per feature element, s_l per label):
    read   v·B·C·H·W·s      features of pixels with a label in [0, K) (the others are never loaded)
         + B·H·W·s_l        labels (re-read once per channel block, from L2)
    write  B·K·C·4 + B·K·8  sums (fp32) and counts (int64)
    and    2·S·B·K·(C+1)·4  the per-span partial sums and counts, written by one kernel and read by
                            the next (S spans per image, ``span_count``)
with v the fraction of labelled pixels. Each way, the partials are 7.5 % of the feature bytes at
2×256×65×129 fp32 (S = 33 spans of 256 pixels) and 1.8 % at 2×2048×65×129 (S = 8).
The eager version materialises a one-hot [B, H·W, K] in the feature dtype and contracts it with the
features (an einsum), or loops over classes with a mask multiply per class (the official code): K
passes over the features.

Kernels. ``_class_feature_sums_partial_kernel``: grid (pixel span, channel block, image). A program
walks its span of pixels in BLOCK_P tiles; per tile it builds the [K_PAD, BLOCK_P] one-hot of the
labels in registers, loads the [BLOCK_C, BLOCK_P] feature tile (pixel dimension contiguous in NCHW)
and accumulates one-hot · featuresᵀ into a [K_PAD, BLOCK_C] accumulator with ``tl.dot``: fp16/bf16
features go to the tensor cores in their own dtype (the one-hot is exact in it, products are exact,
sums fp32). fp32 features are split into hi + lo, both rounded to tf32 (``round_to_tf32``), and go
in as two tf32 products: that is tf32x3's sum (its third product, the one-hot's low part, is zero),
at fp32-level accuracy, with a third fewer MMAs and far fewer registers than ``tf32x3``. Pixel
counts accumulate element-wise in a [K_PAD, BLOCK_P] int32 tile, reduced once at the end. Each
program writes its span's partial sums (and, channel block 0, counts) to a scratch buffer.
``_class_feature_sums_reduce_kernel``, one program per (class, block of REDUCE_BLOCK_C channels,
image), adds that row of every span: REDUCE_SPANS spans per load, so that many loads are in flight at
once, then the partial row sums in span-block order.

Deterministic: no atomics, and the summation order depends only on the shape (the span length is a
function of B, C, H, W, never of the GPU's SM count, BLOCK_C, warps or stages; the reduce kernel has
one fixed configuration), so two runs, two cards or two launch configurations give the same bits. fp64 features accumulate in fp64.
The feature loads are masked by the labels, so unlabelled pixels cost no feature bytes (and NaN
features there cannot leak into the sums). Labels are range-checked in their own dtype before any
narrowing (an int64 label 2**32 + 3 is out of range, not class 3); offsets are int64.
BLOCK_P = 32 (fixed: part of the summation order); BLOCK_C, warps and stages autotuned on a GPU from
configs that all keep two or more programs per SM without spills (sm_90a/sm_80, Triton 3.7.1,
``diga bench compile``): fp32 106-128 registers (2-4 programs per SM; 189 and one program per SM
with BLOCK_P = 64 and tf32x3), fp16/bf16 64-80 registers (3-8 programs per SM).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    check_k,
    check_pixels,
    interpreting,
    pixel_offsets,
    pixels_contiguous,
    reference,
    resolve_backend,
    round_to_tf32,
)

BLOCK_P = 32  # pixels per tile: part of the summation order, so fixed (not tuned)
# Spans are sized for about this many (span, 64-channel block, image) programs, two per SM of a
# 132-SM card with 32-channel blocks: a constant, not the SM count, so that the result does not depend
# on the card. At least MIN_SPAN_TILES tiles (256 pixels) per span keep the partials small at DeepLab's
# 65×129. The interpreter wants few programs.
TARGET_PROGRAMS = 512
INTERPRETER_TARGET_PROGRAMS = 4
MIN_SPAN_TILES = 8
REDUCE_SPANS = 8  # spans the reduce kernel loads at once (loads in flight)
REDUCE_BLOCK_C = 128


def span_count(B: int, C: int, H: int, W: int) -> tuple[int, int]:
    """(tiles per span, spans per image): a function of the shape only (see the module docstring)."""
    n_tiles = triton.cdiv(H * W, BLOCK_P)
    target = INTERPRETER_TARGET_PROGRAMS if interpreting() else TARGET_PROGRAMS
    spans_wanted = max(1, triton.cdiv(target, B * triton.cdiv(C, 64)))
    tiles_per_span = max(min(MIN_SPAN_TILES, n_tiles), triton.cdiv(n_tiles, spans_wanted))
    return tiles_per_span, triton.cdiv(n_tiles, tiles_per_span)


def traffic_bytes(
    B: int, C: int, H: int, W: int, K: int, feature_bytes: int = 4, label_bytes: int = 8,
    valid_fraction: float = 1.0,
) -> int:
    """Bytes read + written by one call, the span partials included (see the module docstring)."""
    spans = span_count(B, C, H, W)[1]
    partials = 2 * spans * B * K * (C + 1) * 4
    return int(valid_fraction * B * C * H * W * feature_bytes + B * H * W * label_bytes + B * K * (C * 4 + 8)
               + partials)


def _configs():
    """Channels per program, warps and stages: a list to tune on a GPU (each keeps two or more programs
    per SM without spills at the bench shapes, ``diga bench compile``), one config for the interpreter.
    None changes the result: BLOCK_P and the span length fix the summation order."""
    if interpreting():
        return [triton.Config({"BLOCK_C": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_C": c}, num_warps=w, num_stages=s)
            for c, w, s in ((64, 8, 3), (64, 8, 2), (32, 4, 3), (32, 4, 2))]


@triton.autotune(configs=_configs(), key=["C", "K", "HW"])
@triton.jit
def _class_feature_sums_partial_kernel(
    feat_ptr, labels_ptr, part_sums_ptr, part_counts_ptr,
    C, K, HW, W, ignore_index, tiles_per_span, n_spans, spans_per_program,
    stride_fb, stride_fc, stride_fh, stride_fw, stride_lb, stride_lh, stride_lw,
    FEAT_CONTIGUOUS: tl.constexpr, LABELS_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_TF32: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    arange_p = tl.arange(0, BLOCK_P)
    f_rows = feat_ptr + b * stride_fb + offs_c.to(tl.int64)[:, None] * stride_fc
    l_base = labels_ptr + b * stride_lb

    mask_k = offs_k < K
    # One partial per span, whichever program computes it: the grid never changes the sums.
    for i in range(spans_per_program):
        s = pid_s * spans_per_program + i
        acc = tl.zeros([K_PAD, BLOCK_C], dtype=ACC_DTYPE)
        count = tl.zeros([K_PAD, BLOCK_P], dtype=tl.int32)
        for t in range(tiles_per_span):
            offs_p = (s * tiles_per_span + t) * BLOCK_P + arange_p
            mask_p = offs_p < HW
            label = tl.load(l_base + pixel_offsets(offs_p, W, stride_lh, stride_lw, LABELS_CONTIGUOUS),
                            mask=mask_p, other=0)
            valid = mask_p & (label >= 0) & (label < K) & (label != ignore_index)  # in the labels' dtype
            onehot = (offs_k[:, None] == label.to(tl.int32)[None, :]) & valid[None, :]
            pix = pixel_offsets(offs_p, W, stride_fh, stride_fw, FEAT_CONTIGUOUS)
            f = tl.load(f_rows + pix[None, :], mask=mask_c[:, None] & valid[None, :], other=0.0)
            if SPLIT_TF32:  # fp32: f = hi + lo, both tf32; the one-hot is exact, so two products do
                f = f.to(tl.float32)
                hi = round_to_tf32(f)
                oh = onehot.to(tl.float32)
                acc = tl.dot(oh, tl.trans(hi), acc, input_precision="tf32", out_dtype=ACC_DTYPE)
                acc = tl.dot(oh, tl.trans(round_to_tf32(f - hi)), acc, input_precision="tf32", out_dtype=ACC_DTYPE)
            else:
                acc = tl.dot(
                    onehot.to(DOT_DTYPE), tl.trans(f.to(DOT_DTYPE)), acc,
                    input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE,
                )
            count += onehot.to(tl.int32)
        span = b * n_spans + s
        in_range = s < n_spans
        s_ptrs = part_sums_ptr + (span * K + offs_k[:, None]) * C + offs_c[None, :]
        tl.store(s_ptrs, acc, mask=mask_k[:, None] & mask_c[None, :] & in_range)
        tl.store(part_counts_ptr + span * K + offs_k, tl.sum(count, axis=1),
                 mask=mask_k & (pid_c == 0) & in_range)


@triton.jit
def _class_feature_sums_reduce_kernel(
    part_sums_ptr, part_counts_ptr, sums_ptr, counts_ptr, C, K, n_spans,
    ACC_DTYPE: tl.constexpr, SPANS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row k of image b, channels of this block: the spans' partial rows added SPANS at a time (that
    many loads in flight), then the block sums in span-block order. A fixed order, no atomics."""
    k = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, SPANS)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    rows = (b * n_spans + offs_s.to(tl.int64)) * K + k  # partial row (image b, span s, class k)
    acc = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    count = tl.zeros([SPANS], dtype=tl.int64)
    for s0 in range(0, n_spans, SPANS):
        mask_s = s0 + offs_s < n_spans
        tile = tl.load(part_sums_ptr + (rows + s0 * K)[:, None] * C + offs_c[None, :],
                       mask=mask_s[:, None] & mask_c[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
        count += tl.load(part_counts_ptr + rows + s0 * K, mask=mask_s & (pid_c == 0), other=0)
    tl.store(sums_ptr + (b * K + k) * C + offs_c, acc, mask=mask_c)
    tl.store(counts_ptr + b * K + k, tl.sum(count, axis=0), mask=pid_c == 0)


def class_feature_sums_ref(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: one-hot of the labels contracted with the features, in fp32 (``upcast=False``
    contracts fp16/bf16 features in their own dtype, as a user's einsum would; the sums are float32)."""
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    dot_dtype = acc_dtype if upcast or features.dtype == torch.float64 else features.dtype
    lab = labels.long().flatten(1)  # [B, H*W]
    valid = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)
    onehot = F.one_hot(torch.where(valid, lab, 0), num_classes) * valid[..., None]  # [B, H*W, K]
    sums = torch.einsum("bpk,bcp->bkc", onehot.to(dot_dtype), features.flatten(2).to(dot_dtype))
    return sums.to(acc_dtype), onehot.sum(dim=1)


def _class_feature_sums_triton(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int,
    block_c: int | None = None, spans_per_program: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two launches. ``spans_per_program`` changes the grid, never the result; so does the
    channel block (autotuned, or ``block_c`` to force one) on a GPU, where a product's rounding does
    not depend on the matrix shape (the interpreter's numpy matmul is not shape-invariant)."""
    B, C, H, W = features.shape
    K = num_classes
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    ACC_DTYPE = tl.float64 if acc_dtype == torch.float64 else tl.float32
    device = features.device
    if labels.dtype == torch.bool:
        labels = labels.to(torch.uint8)
    if features.dtype == torch.float64:
        dot_dtype, precision = tl.float64, "ieee"
    elif features.dtype in (torch.float16, torch.bfloat16) and not interpreting():
        # exact: the one-hot is exact in fp16/bf16, so every product is, and the sums are fp32
        dot_dtype, precision = (tl.float16 if features.dtype == torch.float16 else tl.bfloat16), "ieee"
    else:  # fp32 (and, interpreted, 16-bit features upcast exactly: the interpreter's bf16 dot is wrong)
        dot_dtype, precision = tl.float32, "tf32"
    k_pad = max(16, triton.next_power_of_2(K))
    tiles_per_span, n_spans = span_count(B, C, H, W)
    part_sums = torch.empty((B, n_spans, K, C), dtype=acc_dtype, device=device)
    part_counts = torch.empty((B, n_spans, K), dtype=torch.int32, device=device)
    grid = lambda meta: (triton.cdiv(n_spans, spans_per_program), triton.cdiv(C, meta["BLOCK_C"]), B)
    kernel, forced = _class_feature_sums_partial_kernel, {}
    if block_c is not None:  # the plain kernel under the autotuner, at this block size
        kernel, forced = _class_feature_sums_partial_kernel.fn, {"BLOCK_C": block_c, "num_warps": 4, "num_stages": 2}
    kernel[grid](
        features, labels, part_sums, part_counts,
        C, K, H * W, W, int(ignore_index), tiles_per_span, n_spans, spans_per_program,
        *features.stride(), *labels.stride(),
        FEAT_CONTIGUOUS=pixels_contiguous(features),
        LABELS_CONTIGUOUS=pixels_contiguous(labels),
        ACC_DTYPE=ACC_DTYPE,
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision,
        SPLIT_TF32=dot_dtype == tl.float32,
        K_PAD=k_pad,
        BLOCK_P=BLOCK_P,
        **forced,
    )
    sums = torch.empty((B, K, C), dtype=acc_dtype, device=device)
    counts = torch.empty((B, K), dtype=torch.int64, device=device)
    _class_feature_sums_reduce_kernel[(K, triton.cdiv(C, REDUCE_BLOCK_C), B)](
        part_sums, part_counts, sums, counts, C, K, n_spans,
        ACC_DTYPE=ACC_DTYPE, SPANS=REDUCE_SPANS, BLOCK_C=REDUCE_BLOCK_C, num_warps=4,
    )
    return sums, counts


def class_feature_sums(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sums [B, K, C] (float32; float64 for float64 features) of the features of the pixels labelled
    k, and counts int64 [B, K]; labels outside [0, K) and ignore_index are skipped. Deterministic."""
    if features.dim() != 4 or labels.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(
            f"expected features [B, C, H, W] and labels [B, H, W], got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not features.is_floating_point() or labels.is_floating_point():
        raise ValueError("features must be floating point and labels integer")
    if (resolved := resolve_backend(backend, features)) != "triton":
        return reference(class_feature_sums_ref, resolved)(features, labels, num_classes, ignore_index)
    check_k(num_classes)
    B, C, H, W = features.shape
    check_pixels(H, W)
    if B * H * W == 0 or C == 0:
        sums, counts = class_feature_sums_ref(features, labels, num_classes, ignore_index)
        return sums.to(features.device), counts.to(features.device)
    return _class_feature_sums_triton(features, labels, num_classes, ignore_index)
