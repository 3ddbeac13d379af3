"""Nearest-centroid labels: for every pixel of a [B, C, H, W] feature map, the most similar of K class
centroids (cosine) or the nearest one (l2), and that similarity or distance.

Byte-traffic model (what must move; ``traffic_bytes``):
    read   B·C·H·W·s_f   features, once (s_f = bytes per feature element)
         + K·C·4·r       centroids (prepared in fp32, r = 2 rows hi + lo for fp16/bf16 features;
                         each program re-reads them from L2)
    write  B·H·W·(8 + 4) int64 labels + fp32 scores
The eager version (normalise → einsum → max) reads the features twice (norm, divide), writes and
re-reads the normalised copy, and writes and re-reads a [B, K, H, W] similarity map: about
4·C + 2·K element passes per pixel instead of C.

Kernels. ``_prepare_centroids_kernel`` (one program per centroid) writes the rows the main kernel
uses — L2-normalised exactly as F.normalize does for cosine, as given for l2 — their squared norms,
and a flag for rows that repeat an earlier row exactly; flagged rows are left out of the argmax, so
exact ties go to the lowest index whatever order the matrix unit sums in (the interpreter's numpy
matmul does not sum identical rows identically).

The prepared rows are kept for the next call with the same centroids tensor, unchanged
(``_prepared``: the tensor itself, weakly referenced, and its version counter, which every in-place
update such as the online EMA bumps), so they are made once per centroid update, not on every call.

``_assign_centroids_kernel``: one program per (block of BLOCK_P pixels, image). It loops over the
channels in BLOCK_C steps, loading a [BLOCK_C, BLOCK_P] feature tile (pixel dimension contiguous in
NCHW, 16-byte cp.async copies through a 2- to 4-stage pipeline; any strides work, e.g. channels_last) and a
[K_PAD, BLOCK_C] centroid tile, and accumulates the [K_PAD, BLOCK_P] dot products with ``tl.dot`` on
the tensor cores. fp32 uses ``input_precision="tf32x3"``: three tf32 products give fp32-level
accuracy, while an ieee fp32 dot runs on the CUDA cores and, with K padded to 32, is compute-bound
(8 FMAs per feature byte). fp16/bf16 features are upcast exactly to fp32 in registers, and since
they are exact in tf32, tf32x3's third product (the features' low part) is zero: the prepare kernel
splits the centroids into hi + lo (both tf32, ``round_to_tf32``) and the kernel runs two tf32
products, the same sum with a third fewer MMAs. The per-pixel squared norm comes from the same
tile, so the features are read from memory once. Cosine:
label = argmax f·ĉ (a positive per-pixel scale cannot change it), score = f·ĉ / max(‖f‖, eps), which
is F.normalize's definition. L2: argmin ‖c‖² − 2 f·c, score = sqrt(max(‖f‖² − 2 f·c + ‖c‖², 0)).
``tl.max/min(..., return_indices=True)`` breaks ties to the left, as torch.max/min do.

Block sizes, stages and NORM_LOAD are autotuned on a GPU (``_configs``; one config under the
interpreter), among the configs whose grid gives every SM two programs or more (``_prune_configs``:
DeepLab's 2×65×129 feature maps are 132 programs of 128 pixels, one per SM of an H100/H200, but 526 of
32). NORM_LOAD takes the norms from a second, plain load of the tile (an L2 hit): the dot
is then the only user of the pipelined shared-memory copy, which gets the MMA's swizzled layout; a
tile with a second user is left unswizzled by Triton's pipeliner (4-way bank conflicts on the tf32
operand loads). Each config keeps two or more programs per SM without spills at the bench shapes
(``diga bench compile``). At odd H·W (DeepLab's 65×129) a channel row starts at an odd element, so
copies are 4-byte ``cp.async``: the layout allows nothing wider without a copy of the features.
"""

import weakref

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

METRICS = ("cosine", "l2")
NORMALIZE_EPS = 1e-12  # F.normalize's default
# tl.dot precision for fp32 accumulation: "tf32x3" (fp32-level accuracy on the tensor cores) or
# "ieee" (CUDA-core FMAs). A module constant so benchmarks/gpu_check.py can compare them.
FP32_DOT_PRECISION = "tf32x3"


def traffic_bytes(B: int, C: int, H: int, W: int, K: int, feature_bytes: int = 4) -> int:
    """Bytes read + written by one call (see the module docstring)."""
    return B * C * H * W * feature_bytes + K * C * 4 * (2 if feature_bytes == 2 else 1) + B * H * W * (8 + 4)


@triton.jit
def _prepare_centroids_kernel(
    cent_ptr, out_ptr, out_sq_ptr, duplicate_ptr, C, stride_k, stride_c,
    NORMALIZE: tl.constexpr, SPLIT: tl.constexpr, EPS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per centroid k: the row the main kernel uses (L2-normalised as F.normalize does,
    for cosine), its squared norm, and whether it repeats an earlier row exactly. Repeated rows are
    left out of the argmax, so exact ties go to the lowest index whatever order the matrix unit
    sums in (numpy's BLAS in the interpreter does not sum identical rows identically)."""
    k = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    row = cent_ptr + k.to(tl.int64) * stride_k
    sq = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        x = tl.load(row + (c0 + offs) * stride_c, mask=c0 + offs < C, other=0.0).to(ACC_DTYPE)
        sq += x * x
    if NORMALIZE:
        denom = tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), EPS)
    else:
        denom = tl.full([], 1.0, dtype=ACC_DTYPE)
    out_sq = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        x = tl.load(row + (c0 + offs) * stride_c, mask=c0 + offs < C, other=0.0).to(ACC_DTYPE) / denom
        if SPLIT:  # rows K..2K-1 hold the tf32 remainders
            hi = round_to_tf32(x)
            tl.store(out_ptr + k * C + c0 + offs, hi, mask=c0 + offs < C)
            tl.store(out_ptr + (tl.num_programs(0) + k) * C + c0 + offs, round_to_tf32(x - hi), mask=c0 + offs < C)
        else:
            tl.store(out_ptr + k * C + c0 + offs, x, mask=c0 + offs < C)
        out_sq += x * x
    tl.store(out_sq_ptr + k, tl.sum(out_sq, axis=0))
    offs_j = tl.arange(0, K_PAD)
    differ = tl.zeros([K_PAD], dtype=tl.int32)  # per earlier row j: channels where it differs from row k
    for c0 in range(0, C, BLOCK_C):
        m = c0 + offs < C
        x = tl.load(row + (c0 + offs) * stride_c, mask=m, other=0.0)
        y = tl.load(
            cent_ptr + offs_j.to(tl.int64)[:, None] * stride_k + (c0 + offs)[None, :] * stride_c,
            mask=(offs_j < k)[:, None] & m[None, :], other=0.0,
        )
        differ += tl.sum((x[None, :] != y).to(tl.int32), axis=1)
    duplicate = tl.sum(((offs_j < k) & (differ == 0)).to(tl.int32), axis=0)
    tl.store(duplicate_ptr + k, duplicate)


def _configs():
    """Pixels and channels per step, stages, and where the norms come from: a list to tune on a GPU
    (each without spills and with two or more programs per SM at the bench shapes, ``diga bench
    compile``), one config for the interpreter (which cannot autotune and wants few, large programs).
    NORM_LOAD: the squared norms from a second, plain load of the tile (an L2 hit) so that the dot is
    the only user of the pipelined copy, which then gets the MMA's swizzled shared layout (no bank
    conflicts on the operand loads, at the price of registers and L2 traffic); without it the tile
    is read once and its shared copy is left unswizzled."""
    if interpreting():
        return [triton.Config({"BLOCK_P": 256, "BLOCK_C": 16, "NORM_LOAD": True}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c, "NORM_LOAD": n}, num_warps=4, num_stages=s)
            for p, c, s, n in ((128, 16, 4, True), (128, 16, 4, False), (64, 16, 2, True), (64, 16, 4, False),
                               (32, 16, 4, True), (32, 32, 3, True), (32, 32, 3, False))]


def _prune_configs(configs, named_args, **kwargs):
    """The configs whose grid gives every SM two programs or more; where none does (tiny inputs), those
    of the smallest BLOCK_P."""
    features = named_args["feat_ptr"]
    n_sm = torch.cuda.get_device_properties(features.device).multi_processor_count
    programs = lambda c: triton.cdiv(named_args["HW"], c.kwargs["BLOCK_P"]) * named_args["B"]  # noqa: E731
    kept = [c for c in configs if programs(c) >= 2 * n_sm]
    smallest = min(c.kwargs["BLOCK_P"] for c in configs)
    return kept or [c for c in configs if c.kwargs["BLOCK_P"] == smallest]


@triton.autotune(configs=_configs(), key=["B", "C", "K", "HW"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _assign_centroids_kernel(
    feat_ptr, cent_ptr, cent_sq_ptr, duplicate_ptr, labels_ptr, score_ptr,
    B, C, K, HW, W,
    stride_fb, stride_fc, stride_fh, stride_fw,
    METRIC_L2: tl.constexpr, PIXELS_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_CENTROIDS: tl.constexpr, EPS: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, NORM_LOAD: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    pix = pixel_offsets(offs_p, W, stride_fh, stride_fw, PIXELS_CONTIGUOUS)
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    offs_c = tl.arange(0, BLOCK_C)

    f_ptrs = feat_ptr + b.to(tl.int64) * stride_fb + offs_c.to(tl.int64)[:, None] * stride_fc + pix[None, :]
    f_step = tl.full([], BLOCK_C, tl.int64) * stride_fc  # int64 even when stride_fc is a constexpr 1
    c_ptrs = cent_ptr + offs_k[:, None] * C + offs_c[None, :]
    dots = tl.zeros([K_PAD, BLOCK_P], dtype=ACC_DTYPE)
    sq = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        mask_c = (c0 + offs_c) < C
        f_mask = mask_c[:, None] & mask_p[None, :]
        f = tl.load(f_ptrs, mask=f_mask, other=0.0).to(ACC_DTYPE)
        cen = tl.load(c_ptrs, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        if SPLIT_CENTROIDS:  # 16-bit features are exact in tf32: c_hi·f + c_lo·f is tf32x3's sum
            cen_lo = tl.load(c_ptrs + K * C, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            dots = tl.dot(cen, f, dots, input_precision="tf32", out_dtype=ACC_DTYPE)
            dots = tl.dot(cen_lo, f, dots, input_precision="tf32", out_dtype=ACC_DTYPE)
        else:
            dots = tl.dot(cen, f, dots, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if NORM_LOAD:  # see _configs
            g = tl.load(f_ptrs, mask=f_mask, other=0.0, eviction_policy="evict_first").to(ACC_DTYPE)
            sq += tl.sum(g * g, axis=0)
        else:
            sq += tl.sum(f * f, axis=0)
        f_ptrs += f_step
        c_ptrs += BLOCK_C

    candidate = mask_k & (tl.load(duplicate_ptr + offs_k, mask=mask_k, other=1) == 0)
    if METRIC_L2:
        cen_sq = tl.load(cent_sq_ptr + offs_k, mask=mask_k, other=0.0)
        d = tl.where(candidate[:, None], cen_sq[:, None] - 2.0 * dots, float("inf"))
        best, label = tl.min(d, axis=0, return_indices=True)
        score = tl.sqrt(tl.maximum(sq + best, 0.0))
    else:
        s = tl.where(candidate[:, None], dots, float("-inf"))
        best, label = tl.max(s, axis=0, return_indices=True)
        score = best / tl.maximum(tl.sqrt(sq), EPS)

    out = b.to(tl.int64) * HW + offs_p
    tl.store(labels_ptr + out, label.to(tl.int64), mask=mask_p)
    tl.store(score_ptr + out, score.to(tl.float32), mask=mask_p)


_prepared: dict[tuple, tuple] = {}  # (metric, split, dtype, device) -> (weakref, version, prepared rows)


def prepare_centroids(centroids: torch.Tensor, metric: str, split: bool, acc_dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [1 or 2, K, C], squared norms [K], duplicate flags [K]) for the main kernel, made by the
    prepare kernel, or the ones made last time for this very tensor at this version."""
    key = (metric, split, acc_dtype, torch.device(device))
    cached = _prepared.get(key)
    if cached is not None and cached[0]() is centroids and cached[1] == centroids._version:
        return cached[2]
    K, C = centroids.shape
    source = centroids.to(device)
    rows = torch.empty((2 if split else 1, K, C), dtype=acc_dtype, device=device)
    squared = torch.empty(K, dtype=acc_dtype, device=device)
    duplicate = torch.empty(K, dtype=torch.int32, device=device)
    _prepare_centroids_kernel[(K,)](
        source, rows, squared, duplicate, C, *source.stride(),
        NORMALIZE=metric == "cosine", SPLIT=split, EPS=NORMALIZE_EPS,
        ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        K_PAD=max(16, triton.next_power_of_2(K)), BLOCK_C=64,
    )
    _prepared[key] = (weakref.ref(centroids), centroids._version, (rows, squared, duplicate))
    return rows, squared, duplicate


def assign_centroids_ref(
    features: torch.Tensor, centroids: torch.Tensor, metric: str = "cosine", upcast: bool = True
):
    """Plain PyTorch: the vectorised eager version, in fp32 (or, with ``upcast=False``, in the
    features' own dtype: the low-precision baseline the tests measure the kernel against)."""
    if upcast and features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    centroids = centroids.to(features.dtype)
    if metric == "cosine":
        sim = torch.einsum("bchw,kc->bkhw", F.normalize(features, dim=1), F.normalize(centroids, dim=1))
        score, labels = sim.max(dim=1)
    elif metric == "l2":
        f_sq = (features * features).sum(dim=1, keepdim=True)
        c_sq = (centroids * centroids).sum(dim=1)[None, :, None, None]
        dist_sq = f_sq - 2 * torch.einsum("bchw,kc->bkhw", features, centroids) + c_sq
        dist_sq, labels = dist_sq.min(dim=1)
        score = dist_sq.clamp_min(0).sqrt()
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return labels, score.float()


def _check(features: torch.Tensor, centroids: torch.Tensor, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if features.dim() != 4 or centroids.dim() != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"expected features [B, C, H, W] and centroids [K, C], got {tuple(features.shape)} "
            f"and {tuple(centroids.shape)}"
        )
    if not features.is_floating_point() or not centroids.is_floating_point():
        raise ValueError("features and centroids must be floating point")


def assign_centroids(
    features: torch.Tensor, centroids: torch.Tensor, metric: str = "cosine", backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """labels int64 [B, H, W] of the most similar (cosine) / nearest (l2) centroid, ties to the lowest
    index, and score float32 [B, H, W]: that cosine similarity or that Euclidean distance."""
    _check(features, centroids, metric)
    if (resolved := resolve_backend(backend, features)) != "triton":
        return reference(assign_centroids_ref, resolved)(features, centroids, metric)

    B, C, H, W = features.shape
    K = centroids.shape[0]
    check_k(K)
    check_pixels(H, W)
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    ACC_DTYPE = tl.float64 if acc_dtype == torch.float64 else tl.float32
    K_PAD = max(16, triton.next_power_of_2(K))
    split = features.dtype in (torch.float16, torch.bfloat16)
    cent, cent_sq, duplicate = prepare_centroids(centroids, metric, split, acc_dtype, features.device)
    labels = torch.empty((B, H, W), dtype=torch.int64, device=features.device)
    score = torch.empty((B, H, W), dtype=torch.float32, device=features.device)
    if B * H * W == 0:
        return labels, score

    grid = lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), B)
    _assign_centroids_kernel[grid](
        features, cent, cent_sq, duplicate, labels, score,
        B, C, K, H * W, W,
        *features.stride(),
        METRIC_L2=metric == "l2",
        PIXELS_CONTIGUOUS=pixels_contiguous(features),
        ACC_DTYPE=ACC_DTYPE,
        DOT_PRECISION="ieee" if acc_dtype == torch.float64 else FP32_DOT_PRECISION,
        SPLIT_CENTROIDS=split,
        EPS=NORMALIZE_EPS,
        K_PAD=K_PAD,
    )
    return labels, score
