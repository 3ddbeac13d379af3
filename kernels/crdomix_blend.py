"""CrDoMix / ClassMix blending: per pixel, keep the source image where the pixel's label is one of the
image's selected values, else take the translated image. Mask building and blending in one pass.
Labels outside 0..255 (any integer dtype; range-checked before narrowing) select nothing.

Byte-traffic model (``traffic_bytes``; s = bytes per image element, s_l per label):
    read   B·H·W·s_l          labels
         + B·3·H·W·s          one of source / translated per pixel (the other is never loaded)
         + B·256              the selected table (L1/L2 resident)
    write  B·3·H·W·s          the mixed image
The eager version builds a [B, H, W] mask (a gather or a per-class loop of compares), then reads
both images in full and writes the result: at least 2 + 1 image passes plus the mask traffic, and
the official per-class loop reads the label map once per selected class.

Kernel: one program per (block of BLOCK_P pixels, image) loads the labels, gathers
selected[b, label] from the 256-entry table, and for each channel loads source with mask
``keep`` and translated with mask ``~keep``: masked-off lanes issue no memory transactions, so with
spatially coherent class regions each pixel's bytes are fetched from one image only. The output
stores are 16-byte vectors; the masked loads are scalar but coalesced. C is a constexpr and the
channel loop is unrolled (``tl.static_range``), so a thread's loads of all channels are in flight
together. uint8 labels are read as they are (an eighth of int64's label bytes).
BLOCK_P and warps are autotuned on a GPU (one config, 4096 pixels, under the interpreter).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    check_pixels,
    interpreting,
    pixel_offsets,
    pixels_contiguous,
    reference,
    resolve_backend,
)

NUM_VALUES = 256


def traffic_bytes(B: int, C: int, H: int, W: int, image_bytes: int = 4, label_bytes: int = 8) -> int:
    """Bytes read + written by one call (see the module docstring)."""
    return B * H * W * label_bytes + 2 * B * C * H * W * image_bytes + B * NUM_VALUES


def _configs():
    """Pixels per program and warps: a list to tune on a GPU, one config for the interpreter (which
    cannot autotune and wants few, large programs)."""
    if interpreting():
        return [triton.Config({"BLOCK_P": 4096}, num_warps=4)]
    return [triton.Config({"BLOCK_P": p}, num_warps=w) for p, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]


@triton.autotune(configs=_configs(), key=["HW", "C"])
@triton.jit
def _crdomix_blend_kernel(
    src_ptr, trans_ptr, labels_ptr, selected_ptr, out_ptr,
    C: tl.constexpr, HW, W,
    stride_sb, stride_sc, stride_sh, stride_sw,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_lb, stride_lh, stride_lw, stride_selb, stride_selv,
    SRC_CONTIGUOUS: tl.constexpr, TRANS_CONTIGUOUS: tl.constexpr, LABELS_CONTIGUOUS: tl.constexpr,
    NUM_VALUES: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW

    label = tl.load(
        labels_ptr + b * stride_lb + pixel_offsets(offs_p, W, stride_lh, stride_lw, LABELS_CONTIGUOUS),
        mask=mask_p, other=0,
    )
    in_table = mask_p & (label >= 0) & (label < NUM_VALUES)  # in the labels' own dtype
    keep = tl.load(selected_ptr + b * stride_selb + label.to(tl.int32) * stride_selv, mask=in_table, other=0) != 0
    take_src = mask_p & keep
    take_trans = mask_p & (keep == 0)

    src_ptrs = src_ptr + b * stride_sb + pixel_offsets(offs_p, W, stride_sh, stride_sw, SRC_CONTIGUOUS)
    trans_ptrs = trans_ptr + b * stride_tb + pixel_offsets(offs_p, W, stride_th, stride_tw, TRANS_CONTIGUOUS)
    out_ptrs = out_ptr + b * C * HW + offs_p
    for c in tl.static_range(C):  # unrolled: the loads of all channels are issued together
        s = tl.load(src_ptrs + c * stride_sc, mask=take_src, other=0.0)
        t = tl.load(trans_ptrs + c * stride_tc, mask=take_trans, other=0.0)
        tl.store(out_ptrs + c * HW, tl.where(keep, s, t.to(s.dtype)), mask=mask_p)


def crdomix_blend_ref(
    source: torch.Tensor, translated: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch: gather the per-image table at each label (labels outside 0..255 select
    nothing), then where()."""
    lab = labels.long()
    in_table = (lab >= 0) & (lab < NUM_VALUES)
    keep = torch.gather(selected.bool(), 1, lab.clamp(0, NUM_VALUES - 1).flatten(1)).view(labels.shape) & in_table
    return torch.where(keep[:, None], source, translated.to(source.dtype)).contiguous()


def crdomix_blend(
    source: torch.Tensor, translated: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """mixed[b, :, h, w] = source if selected[b, labels[b, h, w]] else translated; contiguous NCHW in
    the source's dtype. labels hold values 0..255, selected is a bool table [B, 256]."""
    if source.dim() != 4 or translated.shape != source.shape or labels.dim() != 3 \
            or labels.shape != (source.shape[0], *source.shape[2:]) \
            or selected.shape != (source.shape[0], NUM_VALUES):
        raise ValueError(
            "expected source and translated [B, C, H, W], labels [B, H, W] and selected [B, 256], got "
            f"{tuple(source.shape)}, {tuple(translated.shape)}, {tuple(labels.shape)}, "
            f"{tuple(selected.shape)}"
        )
    if labels.is_floating_point():
        raise ValueError("labels must be an integer tensor")
    if (resolved := resolve_backend(backend, source)) != "triton":
        return reference(crdomix_blend_ref, resolved)(source, translated, labels, selected)

    B, C, H, W = source.shape
    check_pixels(H, W)
    out = torch.empty((B, C, H, W), dtype=source.dtype, device=source.device)
    if out.numel() == 0:
        return out
    if labels.dtype == torch.bool:
        labels = labels.to(torch.uint8)
    table = selected.view(torch.uint8) if selected.dtype == torch.bool else (selected != 0).to(torch.uint8)
    if C > 16:  # the channel loop is unrolled (C is a constexpr): images, not feature maps
        return crdomix_blend_ref(source, translated, labels, selected)
    grid = lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), B)
    _crdomix_blend_kernel[grid](
        source, translated, labels, table, out,
        C, H * W, W,
        *source.stride(), *translated.stride(), *labels.stride(), *table.stride(),
        SRC_CONTIGUOUS=pixels_contiguous(source),
        TRANS_CONTIGUOUS=pixels_contiguous(translated),
        LABELS_CONTIGUOUS=pixels_contiguous(labels),
        NUM_VALUES=NUM_VALUES,
    )
    return out
