"""Bilateral-consensus cross-entropy: mean CE(logits, prob_labels) over the pixels where the probability
label and the feature-induced label agree (and are not ignore_index), in one fused op.

Byte-traffic model, forward + backward (``traffic_bytes``; s = bytes per logit, s_l per label, s_a =
bytes of the accumulator dtype, 4 for fp32):
    forward   read  v·B·K·H·W·s        logits of valid pixels (invalid pixels are never loaded)
                  + 2·B·H·W·s_l        both label maps
              write B·H·W·(s_a + 1)    per-pixel log-sum-exp and target class (int8, -1 = invalid)
    backward  read  v·B·K·H·W·s        logits of valid pixels again (nothing logit-sized is saved)
                  + B·H·W·(s_a + 1)    the saved log-sum-exp and targets (not the two label maps)
              write B·K·H·W·s          the gradient (zeros on invalid pixels)
with v the fraction of valid pixels (1 gives the dense upper bound). Eager PyTorch (mask building +
F.cross_entropy(ignore_index) + backward) writes and re-reads a log-softmax copy, a zero-filled
gradient of the NLL, and the masks: about 6 full logit-sized passes instead of 3, and it keeps the
log-softmax alive between forward and backward. Here the forward keeps the inputs, 5 bytes per pixel
and two scalars: the extra memory is those 5 bytes per pixel (≈ 1/(4K) of the logits) and the
gradient the caller asked for.

Kernels. ``_consensus_ce_fwd_kernel``: one program per (block of BLOCK_P pixels, image) loads the two
label maps, then walks the K class planes one [BLOCK_P] row at a time (the pixel dimension is
contiguous in NCHW) with an online softmax: a running max m and sum s per pixel, one exp per logit
(s ← s·e^{m−x} + 1 when x is the new max, s + e^{x−m} otherwise), so nothing is padded to a power of
two and no reduction crosses threads until the per-program loss/count sums at the end. It writes
the per-pixel log-sum-exp (m + log s) and target, and one partial loss sum and valid count per
MIN_BLOCK_P-pixel slot (a program of BLOCK_P = R·MIN_BLOCK_P pixels writes its sums in its first slot
and zeros in the other R − 1, so the partial buffer does not depend on the tuned block size).
``_consensus_ce_finalize_kernel`` (one program) reduces the slots in a fixed order (no atomics) into
the loss and n_valid, which stay on the device. ``_consensus_ce_bwd_kernel`` reads the saved
log-sum-exp and target per pixel and, class plane by class plane, writes
(exp(x − lse) − onehot) · grad_output / max(n_valid, 1) on valid pixels and 0 elsewhere; it reads
grad_output and n_valid from device memory, so there is no host synchronisation anywhere. With no
valid pixel the loss is exactly 0/1 = 0.0 and the gradient exactly 0. Accumulation is fp32 (fp64 for
fp64 logits, which gradcheck uses).

Block size and warps are autotuned on a GPU (``_configs``, pruned to one 16-byte vector of logits per
thread and class plane; one config under the interpreter). The logits loads are masked per pixel (invalid pixels cost no bytes), so they are coalesced 4-byte (fp32)
loads; the label, log-sum-exp and gradient accesses are 16-byte vectors where H·W allows.

Labels outside [0, K) are treated like ignore_index (F.cross_entropy would fail on them).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_k, check_pixels, interpreting, pixel_offsets, pixels_contiguous, resolve_backend

MIN_BLOCK_P = 256  # pixels per partial-sum slot: the smallest tuned block


def traffic_bytes(
    B: int, K: int, H: int, W: int, logit_bytes: int = 4, label_bytes: int = 8,
    valid_fraction: float = 1.0, backward: bool = True,
) -> int:
    """Bytes read + written by a forward (and, by default, the backward) pass."""
    logits = B * K * H * W * logit_bytes
    labels = 2 * B * H * W * label_bytes
    saved = B * H * W * (4 + 1)  # fp32 log-sum-exp + int8 target
    fwd = valid_fraction * logits + labels + saved
    bwd = valid_fraction * logits + saved + logits
    return int(fwd + (bwd if backward else 0))


def minimum_traffic_bytes(B: int, K: int, H: int, W: int, logit_bytes: int = 4, label_bytes: int = 8) -> int:
    """What any forward + backward must move: logits read once, both label maps read once, the
    gradient written once. The bench reports bandwidth against this, so the backward's re-read
    counts as a cost, not as useful bytes."""
    return B * K * H * W * logit_bytes * 2 + 2 * B * H * W * label_bytes


def _configs():
    """Pixels per program and warps: a list to tune on a GPU, one config for the interpreter (which
    cannot autotune and wants few, large programs). Every BLOCK_P is a multiple of MIN_BLOCK_P."""
    if interpreting():
        return [triton.Config({"BLOCK_P": 1024}, num_warps=4)]
    return [triton.Config({"BLOCK_P": p}, num_warps=w)
            for p, w in ((256, 2), (512, 4), (1024, 8), (512, 2), (1024, 4), (2048, 8))]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs where a thread holds one 16-byte vector per class plane (4 fp32 or 8 fp16/bf16
    pixels): more per thread makes the compiler shuffle layouts through shared memory in the class
    loop, fewer gives narrower gradient stores."""
    size = named_args["logits_ptr"].element_size()
    kept = [c for c in configs if c.kwargs["BLOCK_P"] * size == 16 * 32 * c.num_warps]
    return kept or configs


_TUNING = {"configs": _configs(), "key": ["K", "HW"], "prune_configs_by": {"early_config_prune": _prune_configs}}


@triton.autotune(**_TUNING)
@triton.jit
def _consensus_ce_fwd_kernel(
    logits_ptr, prob_ptr, feat_ptr, lse_ptr, target_ptr, part_loss_ptr, part_count_ptr,
    K, HW, W, ignore_index, n_slots,
    stride_lb, stride_lk, stride_lh, stride_lw, stride_pb, stride_ph, stride_pw,
    stride_qb, stride_qh, stride_qw,
    LOGITS_CONTIGUOUS: tl.constexpr, PROB_CONTIGUOUS: tl.constexpr, FEAT_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, MIN_BLOCK_P: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    prob = tl.load(prob_ptr + b * stride_pb + pixel_offsets(offs_p, W, stride_ph, stride_pw, PROB_CONTIGUOUS),
                   mask=mask_p, other=0)
    feat = tl.load(feat_ptr + b * stride_qb + pixel_offsets(offs_p, W, stride_qh, stride_qw, FEAT_CONTIGUOUS),
                   mask=mask_p, other=0)
    # range-checked in the labels' own dtype: an int64 label 2**32 + 3 is invalid, not class 3
    valid = mask_p & (prob == feat) & (prob != ignore_index) & (prob >= 0) & (prob < K)
    target = tl.where(valid, prob.to(tl.int32), -1)  # narrowed only where in range

    x_ptrs = logits_ptr + b * stride_lb + pixel_offsets(offs_p, W, stride_lh, stride_lw, LOGITS_CONTIGUOUS)
    step = tl.full([], 0, tl.int64) + stride_lk  # int64 even when stride_lk is a specialised 1
    x = tl.load(x_ptrs, mask=valid, other=0.0).to(ACC_DTYPE)
    m = x  # running max and sum of exp(x - m) over the classes seen so far
    s = tl.full([BLOCK_P], 1.0, dtype=ACC_DTYPE)
    x_target = tl.where(target == 0, x, 0.0)
    for k in range(1, K):
        x_ptrs += step
        x = tl.load(x_ptrs, mask=valid, other=0.0).to(ACC_DTYPE)
        d = x - m
        e = tl.exp(-tl.abs(d))
        s = tl.where(d > 0, s * e + 1.0, s + e)
        m = tl.maximum(m, x)
        x_target = tl.where(target == k, x, x_target)
    lse = m + tl.log(s)
    loss = tl.where(valid, lse - x_target, 0.0)

    out = b * HW + offs_p
    tl.store(lse_ptr + out, lse, mask=mask_p)
    tl.store(target_ptr + out, target.to(tl.int8), mask=mask_p)
    R: tl.constexpr = BLOCK_P // MIN_BLOCK_P
    offs_r = tl.arange(0, R)
    slot = pid_p * R + offs_r
    first = offs_r == 0
    tl.store(part_loss_ptr + b * n_slots + slot, tl.where(first, tl.sum(loss, axis=0), 0.0), mask=slot < n_slots)
    tl.store(part_count_ptr + b * n_slots + slot, tl.where(first, tl.sum(valid.to(tl.int32), axis=0), 0),
             mask=slot < n_slots)


@triton.jit
def _consensus_ce_finalize_kernel(
    part_loss_ptr, part_count_ptr, loss_ptr, count_ptr, N,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sum the per-slot partials in a fixed order: loss = Σ loss / max(Σ valid, 1)."""
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


@triton.autotune(**_TUNING)
@triton.jit
def _consensus_ce_bwd_kernel(
    logits_ptr, lse_ptr, target_ptr, grad_out_ptr, count_ptr, grad_ptr,
    K, HW, W,
    stride_lb, stride_lk, stride_lh, stride_lw, stride_gb, stride_gk, stride_gh, stride_gw,
    LOGITS_CONTIGUOUS: tl.constexpr, GRAD_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    target = tl.load(target_ptr + b * HW + offs_p, mask=mask_p, other=-1).to(tl.int32)
    valid = target >= 0
    lse = tl.load(lse_ptr + b * HW + offs_p, mask=mask_p, other=0.0)
    scale = tl.load(grad_out_ptr).to(ACC_DTYPE) / tl.maximum(tl.load(count_ptr), 1).to(ACC_DTYPE)

    x_ptrs = logits_ptr + b * stride_lb + pixel_offsets(offs_p, W, stride_lh, stride_lw, LOGITS_CONTIGUOUS)
    g_ptrs = grad_ptr + b * stride_gb + pixel_offsets(offs_p, W, stride_gh, stride_gw, GRAD_CONTIGUOUS)
    x_step = tl.full([], 0, tl.int64) + stride_lk
    g_step = tl.full([], 0, tl.int64) + stride_gk
    for k in range(K):
        x = tl.load(x_ptrs, mask=valid, other=0.0).to(ACC_DTYPE)
        p = tl.exp(x - lse)
        grad = tl.where(valid, (p - (target == k).to(ACC_DTYPE)) * scale, 0.0)
        tl.store(g_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=mask_p)
        x_ptrs += x_step
        g_ptrs += g_step


def _consensus_ce_forward(logits, prob_labels, feat_labels, ignore_index):
    """The forward launches: (loss, n_valid, lse [B, H, W], target int8 [B, H, W] with -1 on invalid
    pixels). The last two are what the backward reads instead of the label maps."""
    B, K, H, W = logits.shape
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    device = logits.device
    n_slots = triton.cdiv(H * W, MIN_BLOCK_P)
    lse = torch.empty((B, H, W), dtype=acc_dtype, device=device)
    target = torch.empty((B, H, W), dtype=torch.int8, device=device)
    part_loss = torch.empty(B * n_slots, dtype=acc_dtype, device=device)
    part_count = torch.empty(B * n_slots, dtype=torch.int32, device=device)
    ACC_DTYPE = tl.float64 if acc_dtype == torch.float64 else tl.float32
    grid = lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), B)
    _consensus_ce_fwd_kernel[grid](
        logits, prob_labels, feat_labels, lse, target, part_loss, part_count,
        K, H * W, W, ignore_index, n_slots,
        *logits.stride(), *prob_labels.stride(), *feat_labels.stride(),
        LOGITS_CONTIGUOUS=pixels_contiguous(logits),
        PROB_CONTIGUOUS=pixels_contiguous(prob_labels),
        FEAT_CONTIGUOUS=pixels_contiguous(feat_labels),
        ACC_DTYPE=ACC_DTYPE,
        MIN_BLOCK_P=MIN_BLOCK_P,
    )
    loss = torch.empty((), dtype=acc_dtype, device=device)
    n_valid = torch.empty((), dtype=torch.int32, device=device)
    _consensus_ce_finalize_kernel[(1,)](
        part_loss, part_count, loss, n_valid, B * n_slots, ACC_DTYPE=ACC_DTYPE, BLOCK=1024,
    )
    return loss, n_valid, lse, target


class ConsensusCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, prob_labels, feat_labels, ignore_index):
        loss, n_valid, lse, target = _consensus_ce_forward(logits, prob_labels, feat_labels, ignore_index)
        ctx.save_for_backward(logits, lse, target, n_valid)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, lse, target, n_valid = ctx.saved_tensors
        B, K, H, W = logits.shape
        grad = torch.empty_like(logits)
        grid = lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), B)
        _consensus_ce_bwd_kernel[grid](
            logits, lse, target, grad_output.contiguous(), n_valid, grad,
            K, H * W, W, *logits.stride(), *grad.stride(),
            LOGITS_CONTIGUOUS=pixels_contiguous(logits),
            GRAD_CONTIGUOUS=pixels_contiguous(grad),
            ACC_DTYPE=tl.float64 if lse.dtype == torch.float64 else tl.float32,
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
