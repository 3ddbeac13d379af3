"""CrDoMix / ClassMix blending: per pixel, keep the source image where the pixel's label is one of the
image's selected values, else take the translated image. Mask building and blending in one pass.

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
stores are 16-byte vectors; the masked loads are scalar but coalesced. BLOCK_P = 1024, 4 warps.
"""

import torch
import triton
import triton.language as tl

from ._common import interpreting, pixel_offsets, pixels_contiguous, resolve_backend

NUM_VALUES = 256


def traffic_bytes(B: int, C: int, H: int, W: int, image_bytes: int = 4, label_bytes: int = 8) -> int:
    """Bytes read + written by one call (see the module docstring)."""
    return B * H * W * label_bytes + 2 * B * C * H * W * image_bytes + B * NUM_VALUES


@triton.jit
def _crdomix_blend_kernel(
    src_ptr, trans_ptr, labels_ptr, selected_ptr, out_ptr,
    C, HW, W,
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
    ).to(tl.int32)
    in_table = mask_p & (label >= 0) & (label < NUM_VALUES)
    keep = tl.load(selected_ptr + b * stride_selb + label * stride_selv, mask=in_table, other=0) != 0
    take_src = mask_p & keep
    take_trans = mask_p & (keep == 0)

    src_ptrs = src_ptr + b * stride_sb + pixel_offsets(offs_p, W, stride_sh, stride_sw, SRC_CONTIGUOUS)
    trans_ptrs = trans_ptr + b * stride_tb + pixel_offsets(offs_p, W, stride_th, stride_tw, TRANS_CONTIGUOUS)
    out_ptrs = out_ptr + b * C * HW + offs_p
    for _ in range(0, C):
        s = tl.load(src_ptrs, mask=take_src, other=0.0)
        t = tl.load(trans_ptrs, mask=take_trans, other=0.0)
        mixed = tl.where(keep, s, t.to(s.dtype))
        tl.store(out_ptrs, mixed, mask=mask_p)
        src_ptrs += stride_sc
        trans_ptrs += stride_tc
        out_ptrs += HW


def crdomix_blend_ref(
    source: torch.Tensor, translated: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch: gather the per-image table at each label, then where()."""
    keep = torch.gather(selected.bool(), 1, labels.long().flatten(1)).view(labels.shape)
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
    if resolve_backend(backend, source) == "torch":
        return crdomix_blend_ref(source, translated, labels, selected)

    B, C, H, W = source.shape
    out = torch.empty((B, C, H, W), dtype=source.dtype, device=source.device)
    if out.numel() == 0:
        return out
    if labels.dtype == torch.bool:
        labels = labels.to(torch.uint8)
    table = selected.view(torch.uint8) if selected.dtype == torch.bool else (selected != 0).to(torch.uint8)
    BLOCK_P = 1024 if not interpreting() else 4096
    grid = (triton.cdiv(H * W, BLOCK_P), B)
    _crdomix_blend_kernel[grid](
        source, translated, labels, table, out,
        C, H * W, W,
        *source.stride(), *translated.stride(), *labels.stride(), *table.stride(),
        SRC_CONTIGUOUS=pixels_contiguous(source),
        TRANS_CONTIGUOUS=pixels_contiguous(translated),
        LABELS_CONTIGUOUS=pixels_contiguous(labels),
        NUM_VALUES=NUM_VALUES,
        BLOCK_P=BLOCK_P,
        num_warps=4,
    )
    return out
