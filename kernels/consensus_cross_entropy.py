"""Bilateral-consensus cross-entropy: mean CE(logits, prob_labels) over the pixels where the probability
label and the feature-induced label agree (and are not ignore_index), in one fused op.

Byte-traffic model, forward + backward (``traffic_bytes``; s = bytes per logit, s_l per label):
    forward   read  v·B·K·H·W·s        logits of valid pixels (invalid pixels are never loaded)
                  + 2·B·H·W·s_l        both label maps
    backward  read  v·B·K·H·W·s + 2·B·H·W·s_l   (recompute the softmax: nothing per-pixel is saved)
              write B·K·H·W·s          the gradient (zeros on invalid pixels)
with v the fraction of valid pixels (1 gives the dense upper bound). Eager PyTorch (mask building +
F.cross_entropy(ignore_index) + backward) writes and re-reads a log-softmax copy, a zero-filled
gradient of the NLL, and the masks: about 6 full logit-sized passes instead of 3, and it keeps the
log-softmax alive between forward and backward. Here the forward keeps only the inputs and two
scalars, so the extra memory is the gradient the caller asked for.

Kernels: one program per (block of BLOCK_P pixels, image) loads a [K_PAD, BLOCK_P] logits tile (all
classes of a pixel block; the pixel dimension is contiguous in NCHW), computes a max-shifted
logsumexp in fp32 (fp64 for fp64 logits) and writes one partial loss sum and one valid count. A
one-program kernel reduces the partials in a fixed order (deterministic, no atomics) into the loss and
n_valid, which stay on the device. The backward kernel recomputes softmax and writes
(softmax − onehot) · grad_output / max(n_valid, 1) on valid pixels and 0 elsewhere; it reads
grad_output and n_valid from device memory, so there is no host synchronisation anywhere. With no
valid pixel the loss is exactly 0/1 = 0.0 and the gradient exactly 0.

BLOCK_P = 8192 / K_PAD pixels (256 for K = 19), 8 warps, 64-80 registers. The logits loads are
masked per pixel, so they are not vectorised; they are still coalesced (a warp reads 32 consecutive
pixels of one class plane), and the gradient stores are 16-byte vectors.

Labels outside [0, K) are treated like ignore_index (F.cross_entropy would fail on them).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_k, check_pixels, interpreting, pixel_offsets, pixels_contiguous, resolve_backend


def traffic_bytes(
    B: int, K: int, H: int, W: int, logit_bytes: int = 4, label_bytes: int = 8,
    valid_fraction: float = 1.0, backward: bool = True,
) -> int:
    """Bytes read + written by a forward (and, by default, the backward) pass."""
    logits = B * K * H * W * logit_bytes
    labels = 2 * B * H * W * label_bytes
    fwd = valid_fraction * logits + labels
    bwd = valid_fraction * logits + labels + logits
    return int(fwd + (bwd if backward else 0))


def minimum_traffic_bytes(B: int, K: int, H: int, W: int, logit_bytes: int = 4, label_bytes: int = 8) -> int:
    """What any forward + backward must move: logits read once, both label maps read once, the
    gradient written once. The bench reports bandwidth against this, so the backward's re-read
    counts as a cost, not as useful bytes."""
    return B * K * H * W * logit_bytes * 2 + 2 * B * H * W * label_bytes


@triton.jit
def _load_consensus_tile(
    logits_ptr, prob_ptr, feat_ptr, b, offs_p, offs_k, K, HW, W, ignore_index,
    stride_lb, stride_lk, stride_lh, stride_lw, stride_pb, stride_ph, stride_pw,
    stride_qb, stride_qh, stride_qw,
    LOGITS_CONTIGUOUS: tl.constexpr, PROB_CONTIGUOUS: tl.constexpr, FEAT_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Labels of a pixel block (int32), its validity mask, and the logits tile of its valid pixels.
    The range check runs in the labels' own dtype: an int64 label 2**32 + 3 is invalid, not class 3."""
    mask_p = offs_p < HW
    mask_k = offs_k < K
    b64 = b.to(tl.int64)
    prob = tl.load(
        prob_ptr + b64 * stride_pb + pixel_offsets(offs_p, W, stride_ph, stride_pw, PROB_CONTIGUOUS),
        mask=mask_p, other=0,
    )
    feat = tl.load(
        feat_ptr + b64 * stride_qb + pixel_offsets(offs_p, W, stride_qh, stride_qw, FEAT_CONTIGUOUS),
        mask=mask_p, other=0,
    )
    valid = mask_p & (prob == feat) & (prob != ignore_index) & (prob >= 0) & (prob < K)
    prob = prob.to(tl.int32)
    pix = pixel_offsets(offs_p, W, stride_lh, stride_lw, LOGITS_CONTIGUOUS)
    x = tl.load(
        logits_ptr + b64 * stride_lb + offs_k.to(tl.int64)[:, None] * stride_lk + pix[None, :],
        mask=mask_k[:, None] & valid[None, :], other=0.0,
    ).to(ACC_DTYPE)
    return prob, valid, x


@triton.jit
def _consensus_ce_fwd_kernel(
    logits_ptr, prob_ptr, feat_ptr, part_loss_ptr, part_count_ptr,
    K, HW, W, ignore_index,
    stride_lb, stride_lk, stride_lh, stride_lw, stride_pb, stride_ph, stride_pw,
    stride_qb, stride_qh, stride_qw,
    LOGITS_CONTIGUOUS: tl.constexpr, PROB_CONTIGUOUS: tl.constexpr, FEAT_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, K_PAD)
    prob, valid, x = _load_consensus_tile(
        logits_ptr, prob_ptr, feat_ptr, b, offs_p, offs_k, K, HW, W, ignore_index,
        stride_lb, stride_lk, stride_lh, stride_lw, stride_pb, stride_ph, stride_pw,
        stride_qb, stride_qh, stride_qw,
        LOGITS_CONTIGUOUS, PROB_CONTIGUOUS, FEAT_CONTIGUOUS, ACC_DTYPE,
    )
    real_k = (offs_k < K)[:, None]
    x_max = tl.max(tl.where(real_k, x, float("-inf")), axis=0)
    e = tl.where(real_k, tl.exp(x - x_max[None, :]), 0.0)
    lse = x_max + tl.log(tl.sum(e, axis=0))
    x_target = tl.sum(tl.where(offs_k[:, None] == prob[None, :], x, 0.0), axis=0)
    loss = tl.where(valid, lse - x_target, 0.0)

    pid = b * tl.num_programs(0) + pid_p
    tl.store(part_loss_ptr + pid, tl.sum(loss, axis=0))
    tl.store(part_count_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))


@triton.jit
def _consensus_ce_finalize_kernel(
    part_loss_ptr, part_count_ptr, loss_ptr, count_ptr, N,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sum the per-program partials in a fixed order: loss = Σ loss / max(Σ valid, 1)."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        m = start + offs < N
        total += tl.load(part_loss_ptr + start + offs, mask=m, other=0.0)
        count += tl.load(part_count_ptr + start + offs, mask=m, other=0)
    n_valid = tl.sum(count, axis=0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / tl.maximum(n_valid, 1).to(ACC_DTYPE))
    tl.store(count_ptr, n_valid)


@triton.jit
def _consensus_ce_bwd_kernel(
    logits_ptr, prob_ptr, feat_ptr, grad_out_ptr, count_ptr, grad_ptr,
    K, HW, W, ignore_index,
    stride_lb, stride_lk, stride_lh, stride_lw, stride_pb, stride_ph, stride_pw,
    stride_qb, stride_qh, stride_qw, stride_gb, stride_gk, stride_gh, stride_gw,
    LOGITS_CONTIGUOUS: tl.constexpr, PROB_CONTIGUOUS: tl.constexpr, FEAT_CONTIGUOUS: tl.constexpr,
    GRAD_CONTIGUOUS: tl.constexpr, ACC_DTYPE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, K_PAD)
    prob, valid, x = _load_consensus_tile(
        logits_ptr, prob_ptr, feat_ptr, b, offs_p, offs_k, K, HW, W, ignore_index,
        stride_lb, stride_lk, stride_lh, stride_lw, stride_pb, stride_ph, stride_pw,
        stride_qb, stride_qh, stride_qw,
        LOGITS_CONTIGUOUS, PROB_CONTIGUOUS, FEAT_CONTIGUOUS, ACC_DTYPE,
    )
    scale = tl.load(grad_out_ptr).to(ACC_DTYPE) / tl.maximum(tl.load(count_ptr), 1).to(ACC_DTYPE)
    real_k = (offs_k < K)[:, None]
    x_max = tl.max(tl.where(real_k, x, float("-inf")), axis=0)
    e = tl.where(real_k, tl.exp(x - x_max[None, :]), 0.0)
    softmax = e / tl.sum(e, axis=0)[None, :]
    onehot = tl.where(offs_k[:, None] == prob[None, :], 1.0, 0.0)
    grad = tl.where(valid[None, :], (softmax - onehot) * scale, 0.0)

    pix = pixel_offsets(offs_p, W, stride_gh, stride_gw, GRAD_CONTIGUOUS)
    g_ptrs = grad_ptr + b.to(tl.int64) * stride_gb + offs_k.to(tl.int64)[:, None] * stride_gk + pix[None, :]
    tl.store(g_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=real_k & (offs_p < HW)[None, :])


def _launch_args(logits, prob_labels, feat_labels):
    K = logits.shape[1]
    H, W = logits.shape[-2:]
    k_pad = max(2, triton.next_power_of_2(K))
    block_p = max(32, (8192 if not interpreting() else 16384) // k_pad)
    grid = (triton.cdiv(H * W, block_p), logits.shape[0])
    strides = (*logits.stride(), *prob_labels.stride(), *feat_labels.stride())
    flags = dict(
        LOGITS_CONTIGUOUS=pixels_contiguous(logits),
        PROB_CONTIGUOUS=pixels_contiguous(prob_labels),
        FEAT_CONTIGUOUS=pixels_contiguous(feat_labels),
        ACC_DTYPE=tl.float64 if logits.dtype == torch.float64 else tl.float32,
        K_PAD=k_pad,
        BLOCK_P=block_p,
    )
    return grid, strides, flags


class ConsensusCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, prob_labels, feat_labels, ignore_index):
        B, K, H, W = logits.shape
        acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        grid, strides, flags = _launch_args(logits, prob_labels, feat_labels)
        n_parts = grid[0] * grid[1]
        part_loss = torch.empty(n_parts, dtype=acc_dtype, device=logits.device)
        part_count = torch.empty(n_parts, dtype=torch.int32, device=logits.device)
        _consensus_ce_fwd_kernel[grid](
            logits, prob_labels, feat_labels, part_loss, part_count,
            K, H * W, W, ignore_index, *strides, **flags, num_warps=8,
        )
        loss = torch.empty((), dtype=acc_dtype, device=logits.device)
        n_valid = torch.empty((), dtype=torch.int32, device=logits.device)
        _consensus_ce_finalize_kernel[(1,)](
            part_loss, part_count, loss, n_valid, n_parts, ACC_DTYPE=flags["ACC_DTYPE"], BLOCK=1024,
        )
        ctx.save_for_backward(logits, prob_labels, feat_labels, n_valid)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, prob_labels, feat_labels, n_valid = ctx.saved_tensors
        B, K, H, W = logits.shape
        grad = torch.empty_like(logits)
        grid, strides, flags = _launch_args(logits, prob_labels, feat_labels)
        _consensus_ce_bwd_kernel[grid](
            logits, prob_labels, feat_labels, grad_output.contiguous(), n_valid, grad,
            K, H * W, W, ctx.ignore_index, *strides, *grad.stride(),
            **flags, GRAD_CONTIGUOUS=pixels_contiguous(grad), num_warps=8,
        )
        return grad, None, None, None


def consensus_cross_entropy_ref(
    logits: torch.Tensor, prob_labels: torch.Tensor, feat_labels: torch.Tensor, ignore_index: int = 255,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: mask building + F.cross_entropy summed over valid pixels / their count, in fp32
    (as under autocast; ``upcast=False`` keeps fp16/bf16 logits in their dtype: the low-precision
    baseline the tests measure the kernel against). The gradient comes back in the logits' dtype."""
    K = logits.shape[1]
    if upcast and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    prob, feat = prob_labels.long(), feat_labels.long()
    valid = (prob == feat) & (prob != ignore_index) & (prob >= 0) & (prob < K)
    target = torch.where(valid, prob, torch.full_like(prob, -100))
    loss_sum = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (loss_sum.to(out_dtype) / valid.sum().clamp_min(1)).to(out_dtype)


def consensus_cross_entropy(
    logits: torch.Tensor, prob_labels: torch.Tensor, feat_labels: torch.Tensor,
    ignore_index: int = 255, backend: str | None = None,
) -> torch.Tensor:
    """Mean CE(logits, prob_labels) over pixels with prob == feat != ignore_index; a 0-dim float32
    tensor (float64 for float64 logits), exactly 0.0 with zero gradient when no pixel is valid."""
    if logits.dim() != 4 or prob_labels.shape != feat_labels.shape or prob_labels.dim() != 3 \
            or prob_labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits [B, K, H, W] and two label maps [B, H, W], got {tuple(logits.shape)}, "
            f"{tuple(prob_labels.shape)} and {tuple(feat_labels.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError("logits must be floating point")
    if prob_labels.is_floating_point() or feat_labels.is_floating_point():
        raise ValueError("labels must be integer tensors")
    if resolve_backend(backend, logits) == "torch":
        return consensus_cross_entropy_ref(logits, prob_labels, feat_labels, ignore_index)
    check_k(logits.shape[1])
    check_pixels(*logits.shape[-2:])
    if prob_labels.dtype == torch.bool:
        prob_labels = prob_labels.to(torch.uint8)
    if feat_labels.dtype == torch.bool:
        feat_labels = feat_labels.to(torch.uint8)
    if logits.numel() == 0:
        return (logits.sum() * 0).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return ConsensusCrossEntropy.apply(logits, prob_labels, feat_labels, int(ignore_index))
