"""Bilateral-consensus cross-entropy: mean CE(logits, prob_labels) over the pixels where the probability
label and the feature-induced label agree (and are not ignore_index), in one fused op whose forward
also writes the gradient, so the logits are read once in all.

Byte-traffic model (``traffic_bytes``; s = bytes per logit, s_l per label):
    forward   read  2·B·H·W·s_l        both label maps (the pre-pass)
              write B·H·W              the target per pixel (int8, -1 = invalid)
              read  B·H·W              that target again
                  + v·B·K·H·W·s        logits of valid pixels (invalid pixels are never loaded)
              write B·K·H·W·s          the gradient of the mean (zeros on invalid pixels)
    backward  nothing when grad_output equals the value the saved gradient already carries (1, as
              for ``loss.backward()``); otherwise read + write B·K·H·W·s (the gradient scaled in place)
with v the fraction of valid pixels (1 gives the dense upper bound). Eager PyTorch (mask building +
F.cross_entropy(ignore_index) + backward) writes and re-reads a log-softmax copy, a zero-filled
gradient of the NLL, and the masks: about 6 full logit-sized passes instead of 1 + v. The memory held
from forward to backward is the gradient (logit-sized, in the logits' dtype) instead of the logits,
and the backward allocates nothing.

Kernels. ``_consensus_ce_target_kernel``, one program per (block of pixels, image), reads the two label
maps, writes the int8 target and adds its count of valid pixels to one int64 counter (integer atomics:
the sum does not depend on their order), the normaliser n. ``_consensus_ce_fwd_kernel``, one program
per (block of BLOCK_P pixels, image), walks the K class planes one [BLOCK_P] row at a time (the pixel
dimension is contiguous in NCHW) with an online softmax: a running max m and sum s per pixel, one exp
per logit (s ← s·e^{m−x} + 1 when x is the new max, s + e^{x−m} otherwise), so nothing is padded to a
power of two and no reduction crosses threads. A second walk over the same planes, which the program
read a moment before (from L2, not memory, at the bench shapes: the tile of a program is 19 KB to
78 KB, L2 50-60 MB), writes (exp(x − lse) − onehot) / max(n, 1) as the gradient, and the program writes
one partial loss sum per MIN_BLOCK_P-pixel slot (a program of BLOCK_P = R·MIN_BLOCK_P pixels writes its
sum in its first slot and zeros in the other R − 1, so the partial buffer does not depend on the tuned
block size). ``_consensus_ce_finalize_kernel`` (one program) adds the slots in a fixed order (no float
atomics) into loss = Σ / max(n, 1), which stays on the device. The backward's ``_scale_kernel`` reads
grad_output and the factor the saved gradient carries (1 after the forward) from device memory and
multiplies the gradient in place by their ratio only where they differ: masked loads move no bytes, so
the common case costs one launch and two scalar reads, and there is no host synchronisation anywhere.
A second backward through the same graph (``retain_graph``) rescales the same buffer, so a gradient
returned by the first is overwritten; a grad_output of 0 leaves it zero, and a later non-zero one then
gives NaN (the information is gone). With no valid pixel the loss is exactly 0/1 = 0.0 and the
gradient exactly 0. Accumulation is fp32 (fp64 for fp64 logits, which the gradient tests use).

Block size and warps are autotuned on a GPU (``_configs``, pruned to one 16-byte vector of logits per
thread and class plane; one config under the interpreter). The logits loads are masked per pixel
(invalid pixels cost no bytes), so they are coalesced 4-byte (fp32) loads; the label, target and
gradient accesses are 16-byte vectors where H·W allows.

Labels outside [0, K) are treated like ignore_index (F.cross_entropy would fail on them).
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
)

MIN_BLOCK_P = 256  # pixels per partial-sum slot: the smallest tuned block
TARGET_BLOCK = 1024  # pixels per program of the label pre-pass


def traffic_bytes(
    B: int, K: int, H: int, W: int, logit_bytes: int = 4, label_bytes: int = 8,
    valid_fraction: float = 1.0, backward: bool = True, unit_grad_output: bool = True,
) -> int:
    """Bytes read + written by a forward (and, by default, the backward: nothing for a grad_output of 1)."""
    logits = B * K * H * W * logit_bytes
    pixels = B * H * W
    fwd = 2 * pixels * label_bytes + 2 * pixels + valid_fraction * logits + logits
    bwd = 0 if unit_grad_output else 2 * logits
    return int(fwd + (bwd if backward else 0))


def minimum_traffic_bytes(B: int, K: int, H: int, W: int, logit_bytes: int = 4, label_bytes: int = 8) -> int:
    """What any forward + backward must move: logits read once, both label maps read once, the
    gradient written once. The bench reports bandwidth against this."""
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
    loops, fewer gives narrower gradient stores."""
    size = named_args["logits_ptr"].element_size()
    kept = [c for c in configs if c.kwargs["BLOCK_P"] * size == 16 * 32 * c.num_warps]
    return kept or configs


@triton.jit
def _consensus_ce_target_kernel(
    prob_ptr, feat_ptr, target_ptr, count_ptr, K, HW, W, ignore_index,
    stride_pb, stride_ph, stride_pw, stride_qb, stride_qh, stride_qw,
    PROB_CONTIGUOUS: tl.constexpr, FEAT_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    prob = tl.load(prob_ptr + b * stride_pb + pixel_offsets(offs, W, stride_ph, stride_pw, PROB_CONTIGUOUS),
                   mask=mask, other=0)
    feat = tl.load(feat_ptr + b * stride_qb + pixel_offsets(offs, W, stride_qh, stride_qw, FEAT_CONTIGUOUS),
                   mask=mask, other=0)
    # range-checked in the labels' own dtype: an int64 label 2**32 + 3 is invalid, not class 3
    valid = mask & (prob == feat) & (prob != ignore_index) & (prob >= 0) & (prob < K)
    tl.store(target_ptr + b * HW + offs, tl.where(valid, prob.to(tl.int32), -1).to(tl.int8), mask=mask)
    tl.atomic_add(count_ptr, tl.sum(valid.to(tl.int32), axis=0).to(tl.int64))


@triton.autotune(configs=_configs(), key=["K", "HW"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _consensus_ce_fwd_kernel(
    logits_ptr, target_ptr, count_ptr, grad_ptr, part_loss_ptr,
    K, HW, W, n_slots,
    stride_lb, stride_lk, stride_lh, stride_lw, stride_gb, stride_gk, stride_gh, stride_gw,
    LOGITS_CONTIGUOUS: tl.constexpr, GRAD_CONTIGUOUS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, MIN_BLOCK_P: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    target = tl.load(target_ptr + b * HW + offs_p, mask=mask_p, other=-1).to(tl.int32)
    valid = target >= 0

    x_start = logits_ptr + b * stride_lb + pixel_offsets(offs_p, W, stride_lh, stride_lw, LOGITS_CONTIGUOUS)
    step = tl.full([], 0, tl.int64) + stride_lk  # int64 even when stride_lk is a specialised 1
    x_ptrs = x_start
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

    if WRITE_GRAD:  # the class planes again, from L2: this program read them a moment ago
        inv_n = 1.0 / tl.maximum(tl.load(count_ptr), 1).to(ACC_DTYPE)
        g_ptrs = grad_ptr + b * stride_gb + pixel_offsets(offs_p, W, stride_gh, stride_gw, GRAD_CONTIGUOUS)
        g_step = tl.full([], 0, tl.int64) + stride_gk
        x_ptrs = x_start
        for k in range(K):
            x = tl.load(x_ptrs, mask=valid, other=0.0).to(ACC_DTYPE)
            grad = tl.where(valid, (tl.exp(x - lse) - (target == k).to(ACC_DTYPE)) * inv_n, 0.0)
            tl.store(g_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=mask_p)
            x_ptrs += step
            g_ptrs += g_step

    R: tl.constexpr = BLOCK_P // MIN_BLOCK_P
    offs_r = tl.arange(0, R)
    slot = pid_p * R + offs_r
    tl.store(part_loss_ptr + b * n_slots + slot, tl.where(offs_r == 0, tl.sum(loss, axis=0), 0.0),
             mask=slot < n_slots)


@triton.jit
def _consensus_ce_finalize_kernel(part_loss_ptr, count_ptr, loss_ptr, N, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Sum the per-slot partials in a fixed order: loss = Σ loss / max(n, 1)."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(0, N, BLOCK):
        total += tl.load(part_loss_ptr + start + offs, mask=start + offs < N, other=0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / tl.maximum(tl.load(count_ptr), 1).to(ACC_DTYPE))


@triton.jit
def _scale_kernel(grad_ptr, grad_out_ptr, carried_ptr, N, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= grad_output / carried where they differ (masked loads and stores move nothing where
    they are equal); a carried factor of 0 cannot be undone and gives NaN."""
    g = tl.load(grad_out_ptr).to(ACC_DTYPE)
    carried = tl.load(carried_ptr).to(ACC_DTYPE)
    factor = tl.where(carried != 0, g / carried, float("nan"))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(g != carried, N, 0)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    tl.store(grad_ptr + offs, (grad.to(ACC_DTYPE) * factor).to(grad_ptr.dtype.element_ty), mask=mask)


def _consensus_ce_forward(logits, prob_labels, feat_labels, ignore_index, write_grad=True):
    """The forward launches: (loss, n_valid int64, target int8 [B, H, W] with -1 on invalid pixels,
    gradient of the loss [B, K, H, W] in the logits' dtype, or None without ``write_grad``)."""
    B, K, H, W = logits.shape
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ACC_DTYPE = tl.float64 if acc_dtype == torch.float64 else tl.float32
    device = logits.device
    target = torch.empty((B, H, W), dtype=torch.int8, device=device)
    n_valid = torch.zeros((), dtype=torch.int64, device=device)
    _consensus_ce_target_kernel[(triton.cdiv(H * W, TARGET_BLOCK), B)](
        prob_labels, feat_labels, target, n_valid, K, H * W, W, ignore_index,
        *prob_labels.stride(), *feat_labels.stride(),
        PROB_CONTIGUOUS=pixels_contiguous(prob_labels), FEAT_CONTIGUOUS=pixels_contiguous(feat_labels),
        BLOCK=TARGET_BLOCK,
    )
    grad = torch.empty_like(logits) if write_grad else logits  # (not written without write_grad)
    n_slots = triton.cdiv(H * W, MIN_BLOCK_P)
    part_loss = torch.empty(B * n_slots, dtype=acc_dtype, device=device)
    grid = lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), B)
    _consensus_ce_fwd_kernel[grid](
        logits, target, n_valid, grad, part_loss,
        K, H * W, W, n_slots, *logits.stride(), *grad.stride(),
        LOGITS_CONTIGUOUS=pixels_contiguous(logits), GRAD_CONTIGUOUS=pixels_contiguous(grad),
        WRITE_GRAD=write_grad, ACC_DTYPE=ACC_DTYPE, MIN_BLOCK_P=MIN_BLOCK_P,
    )
    loss = torch.empty((), dtype=acc_dtype, device=device)
    _consensus_ce_finalize_kernel[(1,)](part_loss, n_valid, loss, B * n_slots, ACC_DTYPE=ACC_DTYPE, BLOCK=1024)
    return loss, n_valid, target, grad if write_grad else None


class ConsensusCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, prob_labels, feat_labels, ignore_index):
        loss, _, _, grad = _consensus_ce_forward(logits, prob_labels, feat_labels, ignore_index)
        # Not save_for_backward: the backward changes both in place (autograd would refuse the versions).
        ctx.grad, ctx.carried = grad, torch.ones((), dtype=loss.dtype, device=loss.device)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad, carried = ctx.grad, ctx.carried  # grad is dense (empty_like): its storage is numel elements
        block = 4096
        _scale_kernel[(triton.cdiv(grad.numel(), block),)](
            grad, grad_output.reshape(()).to(carried.dtype).contiguous(), carried, grad.numel(),
            ACC_DTYPE=tl.float64 if carried.dtype == torch.float64 else tl.float32, BLOCK=block,
        )
        carried.copy_(grad_output.reshape(()))
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
    if (resolved := resolve_backend(backend, logits)) != "triton":
        return reference(consensus_cross_entropy_ref, resolved)(logits, prob_labels, feat_labels, ignore_index)
    check_k(logits.shape[1])
    check_pixels(*logits.shape[-2:])
    if prob_labels.dtype == torch.bool:
        prob_labels = prob_labels.to(torch.uint8)
    if feat_labels.dtype == torch.bool:
        feat_labels = feat_labels.to(torch.uint8)
    if logits.numel() == 0:
        return (logits.sum() * 0).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if not (torch.is_grad_enabled() and logits.requires_grad):  # nothing to differentiate: no gradient written
        return _consensus_ce_forward(logits, prob_labels, feat_labels, int(ignore_index), write_grad=False)[0]
    return ConsensusCrossEntropy.apply(logits, prob_labels, feat_labels, int(ignore_index))
