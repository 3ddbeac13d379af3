"""crdomix_blend: against a per-image, per-value loop that builds the mask the way the official code
does (compare the label map with each selected value); the blend is a selection, so results are exact."""

import importlib

import pytest
import torch

from diga_fast.kernels import crdomix_blend, crdomix_blend_ref

from kernel_helpers import DEVICE, every_config, sizes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def loop_blend(source, translated, labels, selected):
    mixed = torch.empty(source.shape, dtype=source.dtype, device=source.device)
    for b in range(source.shape[0]):
        mask = torch.zeros(labels.shape[1:], dtype=torch.bool, device=labels.device)
        for v in selected[b].nonzero()[:, 0].tolist():
            mask |= labels[b].long() == v
        mixed[b] = torch.where(mask, source[b], translated[b].to(source.dtype))
    return mixed


def make_inputs(B, C, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(B, C, H, W, generator=g).to(dtype)
    translated = torch.randn(B, C, H, W, generator=g).to(dtype)
    labels = torch.randint(0, 19, (B, H, W), generator=g)
    labels[:, : H // 3] = 255  # an ignore band
    labels[:, -1, :3] = torch.tensor([254, 100, 0])
    selected = torch.rand(B, 256, generator=g) < 0.5
    selected[:, 255] = True
    return source.to(DEVICE), translated.to(DEVICE), labels.to(DEVICE), selected.to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64], ids=["u8", "i32", "i64"])
@pytest.mark.parametrize("B,C,H,W", [(2, 3, 13, 17), (3, 3, 1, 29), (1, 5, 31, 7)])
def test_matches_loop(B, C, H, W, label_dtype, dtype, backend):
    source, translated, labels, selected = make_inputs(B, C, H, W, dtype)
    labels = labels.to(label_dtype)
    mixed = crdomix_blend(source, translated, labels, selected, backend=backend)
    assert mixed.dtype == dtype and mixed.shape == source.shape and mixed.is_contiguous()
    assert torch.equal(mixed, loop_blend(source, translated, labels, selected))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_selected_table_semantics(backend):
    source, translated, labels, selected = make_inputs(2, 3, 9, 11, torch.float32, seed=1)
    # Image 0 keeps only its ignore pixels (255), image 1 keeps only class 4.
    selected.zero_()
    selected[0, 255] = True
    selected[1, 4] = True
    mixed = crdomix_blend(source, translated, labels, selected, backend=backend)
    keep = torch.stack([labels[0] == 255, labels[1] == 4])[:, None]
    assert torch.equal(mixed, torch.where(keep, source, translated))
    # All selected → the source; none selected → the translated image.
    all_sel = torch.ones_like(selected)
    assert torch.equal(crdomix_blend(source, translated, labels, all_sel, backend=backend), source)
    no_sel = torch.zeros_like(selected)
    assert torch.equal(crdomix_blend(source, translated, labels, no_sel, backend=backend), translated)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_translated_dtype_follows_source(backend):
    source, translated, labels, selected = make_inputs(2, 3, 7, 9, torch.float16, seed=2)
    translated32 = translated.float() + 1e-4  # not representable in fp16: must be rounded, not kept
    mixed = crdomix_blend(source, translated32, labels, selected, backend=backend)
    assert mixed.dtype == torch.float16
    assert torch.equal(mixed, loop_blend(source, translated32, labels, selected))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous(layout, backend):
    source, translated, labels, selected = make_inputs(2, 3, 13, 34, torch.float32, seed=3)
    if layout == "channels_last":
        source = source.to(memory_format=torch.channels_last)
        translated = translated.to(memory_format=torch.channels_last)
    else:  # every other column; a strided view of a wider table
        source, translated, labels = source[..., ::2], translated[..., 1::2], labels[..., ::2]
        selected = torch.cat([selected, ~selected], dim=1)[:, ::2]
    mixed = crdomix_blend(source, translated, labels, selected, backend=backend)
    assert mixed.is_contiguous()
    assert torch.equal(mixed, loop_blend(source, translated, labels, selected))


def test_backend_resolution(monkeypatch):
    source, translated, labels, selected = make_inputs(1, 3, 2, 3, torch.float32)
    source, translated, labels, selected = source.cpu(), translated.cpu(), labels.cpu(), selected.cpu()
    assert torch.equal(
        crdomix_blend(source, translated, labels, selected),
        crdomix_blend_ref(source, translated, labels, selected),
    )
    with pytest.raises(ValueError, match="backend"):
        crdomix_blend(source, translated, labels, selected, backend="cpu")
    with pytest.raises(ValueError, match="selected"):
        crdomix_blend(source, translated, labels, selected[:, :255])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        crdomix_blend(source, translated, labels, selected, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_labels_outside_the_table_select_nothing(backend):
    source, translated, labels, selected = make_inputs(2, 3, 5, 7, torch.float32, seed=4)
    selected[:, 3] = True
    selected[:, 255] = True
    wide = labels.clone()
    wide[:, 1] = 2**32 + 3  # value 3 in int32, outside 0..255 in int64
    wide[:, 2, :2] = -1  # 255 once narrowed to uint8
    mixed = crdomix_blend(source, translated, wide, selected, backend=backend)
    outside = ((wide < 0) | (wide > 255))[:, None]
    assert torch.equal(mixed[outside.expand_as(mixed)], translated[outside.expand_as(mixed)])
    inside = torch.where(outside[:, 0], 0, wide)
    assert torch.equal(mixed, torch.where(outside, translated, loop_blend(source, translated, inside, selected)))


BLEND = importlib.import_module("diga_fast.kernels.crdomix_blend")
NAMED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LABEL_DTYPES = {"u8": torch.uint8, "i64": torch.int64}
# GTA5-size images of the warm-up (batch 8 at 720x1280 in the bench) and the self-training crops
BLEND_SHAPES = sizes([(2, 3, 13, 17)], [(8, 3, 720, 1280), (3, 3, 512, 896)])


@pytest.mark.parametrize("config,shape,dtype,label_dtype", every_config(
    BLEND._crdomix_blend_kernel,
    [("x".join(map(str, s)), d, l) for s in BLEND_SHAPES for d in NAMED_DTYPES for l in LABEL_DTYPES]))
def test_every_config(config, shape, dtype, label_dtype, monkeypatch):
    """Each autotune config, forced: bit for bit the per-value loop's blend."""
    monkeypatch.setattr(BLEND._crdomix_blend_kernel, "configs", [config])
    B, C, H, W = map(int, shape.split("x"))
    source, translated, labels, selected = make_inputs(B, C, H, W, NAMED_DTYPES[dtype], seed=16)
    labels = labels.to(LABEL_DTYPES[label_dtype])
    assert torch.equal(crdomix_blend(source, translated, labels, selected, backend="triton"),
                       loop_blend(source, translated, labels, selected))
