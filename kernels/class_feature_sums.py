"""Per-image, per-class feature sums and pixel counts (masked global average pooling without the
division): the statistics behind centroid initialisation, the online centroid EMA and its DDP
all-reduce.

Byte-traffic model (``traffic_bytes``; s = bytes per feature element, s_l per label):
    read   v·B·C·H·W·s      features of pixels with a label in [0, K) (the others are never loaded)
         + B·H·W·s_l        labels (re-read once per channel block, from L2)
    write  B·K·C·4 + B·K·8  sums (fp32) and counts (int64)
with v the fraction of labelled pixels. The eager version materialises a one-hot [B, H·W, K] in the
feature dtype and contracts it with the features (an einsum), or loops over classes with a mask
multiply per class (the official code): K passes over the features.

Kernel: grid (pixel chunk, channel block, image). A program walks its chunk of pixels in BLOCK_P
tiles; per tile it builds the [K_PAD, BLOCK_P] one-hot of the labels in registers, loads the
[BLOCK_C, BLOCK_P] feature tile (pixel dimension contiguous in NCHW) and accumulates
one-hot · featuresᵀ into a [K_PAD, BLOCK_C] register accumulator with ``tl.dot`` (tf32x3 for fp32:
the one-hot is exact in tf32, the three-product split keeps the features at fp32 accuracy). Only at
the end does it issue one atomic add per (class, channel) — and the chunk count is chosen to give a
few programs per SM, so each output address sees a handful of atomics, never one per pixel. The
channel-block-0 programs also add the per-class pixel counts (int64 atomics). fp32 atomics make the
summation order vary run to run at the level of fp32 rounding; fp64 features accumulate in fp64.
The feature loads are masked by the labels, so unlabelled pixels cost no feature bytes (and NaN
features there cannot leak into the sums). BLOCK_P = 64, BLOCK_C = 64, 8 warps: 150 registers and
25 KB of shared memory for fp32 features on sm_90.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_k, pixel_offsets, pixels_contiguous, resolve_backend


def traffic_bytes(
    B: int, C: int, H: int, W: int, K: int, feature_bytes: int = 4, label_bytes: int = 8,
    valid_fraction: float = 1.0,
) -> int:
    """Bytes read + written by one call (see the module docstring)."""
    return int(valid_fraction * B * C * H * W * feature_bytes + B * H * W * label_bytes + B * K * (C * 4 + 8))


@triton.jit
def _class_feature_sums_kernel(
    feat_ptr, labels_ptr, sums_ptr, counts_ptr,
    C, K, HW, W, ignore_index, tiles_per_program,
    stride_fb, stride_fc, stride_fh, stride_fw, stride_lb, stride_lh, stride_lw,
    FEAT_CONTIGUOUS: tl.constexpr, LABELS_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_chunk = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    arange_p = tl.arange(0, BLOCK_P)

    acc = tl.zeros([K_PAD, BLOCK_C], dtype=ACC_DTYPE)
    count = tl.zeros([K_PAD], dtype=tl.int32)
    first_p = pid_chunk * tiles_per_program * BLOCK_P
    for t in range(0, tiles_per_program):
        offs_p = first_p + t * BLOCK_P + arange_p
        mask_p = offs_p < HW
        label = tl.load(
            labels_ptr + b * stride_lb + pixel_offsets(offs_p, W, stride_lh, stride_lw, LABELS_CONTIGUOUS),
            mask=mask_p, other=0,
        ).to(tl.int32)
        valid = mask_p & (label >= 0) & (label < K) & (label != ignore_index)
        onehot = (offs_k[:, None] == label[None, :]) & valid[None, :]
        pix = pixel_offsets(offs_p, W, stride_fh, stride_fw, FEAT_CONTIGUOUS)
        f = tl.load(
            feat_ptr + b * stride_fb + offs_c[:, None] * stride_fc + pix[None, :],
            mask=mask_c[:, None] & valid[None, :], other=0.0,
        ).to(ACC_DTYPE)
        acc = tl.dot(
            onehot.to(ACC_DTYPE), tl.trans(f), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
        )
        count += tl.sum(onehot.to(tl.int32), axis=1)

    mask_k = offs_k < K
    s_ptrs = sums_ptr + (b * K + offs_k[:, None]) * C + offs_c[None, :]
    tl.atomic_add(s_ptrs, acc, mask=mask_k[:, None] & mask_c[None, :], sem="relaxed")
    tl.atomic_add(counts_ptr + b * K + offs_k, count.to(tl.int64), mask=mask_k & (pid_c == 0), sem="relaxed")


def class_feature_sums_ref(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: one-hot of the labels contracted with the features."""
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    lab = labels.long().flatten(1)  # [B, H*W]
    valid = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)
    onehot = F.one_hot(torch.where(valid, lab, 0), num_classes) * valid[..., None]  # [B, H*W, K]
    sums = torch.einsum("bpk,bcp->bkc", onehot.to(acc_dtype), features.flatten(2).to(acc_dtype))
    return sums, onehot.sum(dim=1)


def class_feature_sums(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sums [B, K, C] (float32; float64 for float64 features) of the features of the pixels labelled
    k, and counts int64 [B, K]; labels outside [0, K) and ignore_index are skipped."""
    if features.dim() != 4 or labels.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(
            f"expected features [B, C, H, W] and labels [B, H, W], got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not features.is_floating_point() or labels.is_floating_point():
        raise ValueError("features must be floating point and labels integer")
    check_k(num_classes)
    if resolve_backend(backend, features) == "torch":
        return class_feature_sums_ref(features, labels, num_classes, ignore_index)

    B, C, H, W = features.shape
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    sums = torch.zeros((B, num_classes, C), dtype=acc_dtype, device=features.device)
    counts = torch.zeros((B, num_classes), dtype=torch.int64, device=features.device)
    if features.numel() == 0:
        return sums, counts
    if labels.dtype == torch.bool:
        labels = labels.to(torch.uint8)

    BLOCK_C, BLOCK_P = 64, 64
    n_tiles = triton.cdiv(H * W, BLOCK_P)
    n_cblocks = triton.cdiv(C, BLOCK_C)
    if features.is_cuda:
        target_programs = 4 * torch.cuda.get_device_properties(features.device).multi_processor_count
    else:  # the interpreter: few, large programs (still more than one chunk, to exercise the atomics)
        target_programs = 4
    chunks = max(1, min(n_tiles, triton.cdiv(target_programs, B * n_cblocks)))
    tiles_per_program = triton.cdiv(n_tiles, chunks)
    grid = (triton.cdiv(n_tiles, tiles_per_program), n_cblocks, B)
    _class_feature_sums_kernel[grid](
        features, labels, sums, counts,
        C, num_classes, H * W, W, int(ignore_index), tiles_per_program,
        *features.stride(), *labels.stride(),
        FEAT_CONTIGUOUS=pixels_contiguous(features),
        LABELS_CONTIGUOUS=pixels_contiguous(labels),
        ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        DOT_PRECISION="ieee" if acc_dtype == torch.float64 else "tf32x3",
        K_PAD=max(16, triton.next_power_of_2(num_classes)),
        BLOCK_C=BLOCK_C,
        BLOCK_P=BLOCK_P,
        num_warps=8,
        num_stages=3,
    )
    return sums, counts
