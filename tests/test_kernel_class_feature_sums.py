"""class_feature_sums: against a float64 per-image, per-class masked-sum loop (the official code's
formulation), including labels outside [0, K), the ignore index and empty classes."""

import importlib

import pytest
import torch
import triton
import triton.language as tl

from diga_fast.kernels import class_feature_sums, class_feature_sums_ref
from diga_fast.kernels._common import round_to_tf32

from kernel_helpers import DEVICE, every_config, huge_fp16_buffer, sizes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def loop_sums(features, labels, K, ignore_index=255):
    B, C = features.shape[:2]
    sums = torch.zeros(B, K, C, dtype=torch.float64)
    counts = torch.zeros(B, K, dtype=torch.int64)
    for b in range(B):
        f = features[b].double().cpu().flatten(1)  # [C, H*W]
        lab = labels[b].long().cpu().flatten()
        for k in range(K):
            if k == ignore_index:
                continue
            mask = lab == k
            sums[b, k] = f[:, mask].sum(dim=1)
            counts[b, k] = int(mask.sum())
    return sums.to(DEVICE), counts.to(DEVICE)


def make_labels(B, H, W, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-2, K + 3, (B, H, W), generator=g)  # includes -2, -1, K, K+1, K+2
    labels[:, 0] = 255
    labels[labels == K - 1] = 0  # class K-1 is absent: its sums and counts stay zero
    return labels.to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B,C,H,W,K", [(2, 37, 13, 17, 19), (1, 70, 9, 31, 16), (2, 5, 3, 1, 64)])
def test_matches_loop(B, C, H, W, K, dtype, backend):
    torch.manual_seed(0)
    features = torch.randn(B, C, H, W, device=DEVICE).to(dtype)
    labels = make_labels(B, H, W, K)
    sums, counts = class_feature_sums(features, labels.int(), K, backend=backend)
    assert sums.dtype == torch.float32 and sums.shape == (B, K, C)
    assert counts.dtype == torch.int64 and counts.shape == (B, K)

    ref_sums, ref_counts = loop_sums(features, labels, K)
    assert torch.equal(counts, ref_counts)
    assert (counts[:, K - 1] == 0).all() and (sums[:, K - 1] == 0).all()
    # The inputs are exact in fp32, so PyTorch's own error is fp32 summation only.
    torch_err = (class_feature_sums_ref(features, labels, K)[0].double() - ref_sums).abs().max().item()
    tol = 2 * torch_err + 1e-5 * max(1.0, ref_sums.abs().max().item())
    assert (sums.double() - ref_sums).abs().max().item() <= tol


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float64_is_exact(backend):
    torch.manual_seed(1)
    features = torch.randn(2, 37, 13, 17, dtype=torch.float64, device=DEVICE)
    labels = make_labels(2, 13, 17, 19, seed=1)
    sums, counts = class_feature_sums(features, labels, 19, backend=backend)
    ref_sums, ref_counts = loop_sums(features, labels, 19)
    assert sums.dtype == torch.float64
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ignore_index_and_empty(backend):
    torch.manual_seed(2)
    features = torch.randn(2, 37, 5, 9, device=DEVICE)
    labels = make_labels(2, 5, 9, 19, seed=2)
    # An ignore index inside [0, K) removes that class.
    sums, counts = class_feature_sums(features, labels, 19, ignore_index=3, backend=backend)
    ref_sums, ref_counts = loop_sums(features, labels, 19, ignore_index=3)
    assert (counts[:, 3] == 0).all() and torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    # Nothing labelled: all zeros, no NaN.
    sums, counts = class_feature_sums(features, torch.full_like(labels, 255), 19, backend=backend)
    assert (sums == 0).all() and (counts == 0).all()
    if backend == "triton":  # the kernel never reads the features of unlabelled pixels
        features[:, :, 0] = float("nan")
        labels[:, 0] = 255
        sums, _ = class_feature_sums(features, labels, 19, backend=backend)
        assert not sums.isnan().any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous(layout, backend):
    torch.manual_seed(3)
    if layout == "channels_last":
        features = torch.randn(2, 37, 13, 17, device=DEVICE).to(memory_format=torch.channels_last)
        labels = make_labels(2, 13, 17, 19, seed=3).to(torch.uint8)  # -2, -1 wrap to 254, 255
    else:
        features = torch.randn(2, 74, 13, 34, device=DEVICE)[:, 1::2, :, ::2]
        labels = make_labels(2, 13, 34, 19, seed=3)[..., ::2]
    sums, counts = class_feature_sums(features, labels, 19, backend=backend)
    ref_sums, ref_counts = loop_sums(features, labels, 19)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)


def test_backend_resolution(monkeypatch):
    features, labels = torch.randn(1, 4, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long)
    for got, want in zip(class_feature_sums(features, labels, 3), class_feature_sums_ref(features, labels, 3)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="backend"):
        class_feature_sums(features, labels, 3, backend="gpu")
    with pytest.raises(ValueError, match="classes"):  # only the Triton path has a class limit
        class_feature_sums(features, labels, 65, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        class_feature_sums(features, labels, 3, backend="triton")


def test_torch_path_takes_any_number_of_classes():
    features, labels = torch.randn(1, 4, 2, 3), torch.arange(6).view(1, 2, 3) * 20  # 0, 20, ..., 100
    sums, counts = class_feature_sums(features, labels, 101, backend="torch")
    assert sums.shape == (1, 101, 4) and counts.sum() == 6 and counts[0, 100] == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_int64_labels_are_range_checked_before_narrowing(backend):
    torch.manual_seed(5)
    features = torch.randn(2, 6, 3, 5, device=DEVICE)
    labels = make_labels(2, 3, 5, 19, seed=5)
    wide = labels.clone()
    wide[:, 1] = 2**32 + 3  # class 3 in int32, out of range in int64
    sums, counts = class_feature_sums(features, wide, 19, backend=backend)
    ref_sums, ref_counts = loop_sums(features, torch.where(wide == 2**32 + 3, 255, wide), 19)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)


def test_channel_offsets_beyond_2_31():
    """Channel 2 sits 2**31 + 16 elements after the view's start: int32 offsets would wrap to
    -2**31 + 16, i.e. element 16 of the buffer (filled with 1000 to catch it)."""
    base, stride_c = 2**31, 2**30 + 8
    buf = huge_fp16_buffer(base + 2 * stride_c + 64)
    features = buf.as_strided((1, 3, 1, 4), (3 * stride_c, stride_c, 4, 1), storage_offset=base)
    for c in range(3):
        features[0, c] = 2.0**c
    buf[16:20] = 1000.0
    labels = torch.zeros(1, 1, 4, dtype=torch.long, device=DEVICE)
    sums, counts = class_feature_sums(features, labels, 2, backend="triton")
    assert sums[0, 0].tolist() == [4.0, 8.0, 16.0] and counts[0].tolist() == [4, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_across_runs_and_block_counts(dtype):
    """No atomics: the same bits on every run and for any number of programs (spans per program;
    on a GPU also the channel block size); several spans per image, so the reduction is exercised."""
    from diga_fast.kernels.class_feature_sums import _class_feature_sums_triton, span_count

    torch.manual_seed(6)
    B, C, H, W = 2, 40, 17, 33
    assert span_count(B, C, H, W)[1] >= 2
    features = (100 * torch.randn(B, C, H, W, device=DEVICE)).to(dtype)  # large sums: rounding shows
    labels = make_labels(B, H, W, 5, seed=6)
    first = _class_feature_sums_triton(features, labels, 5, 255, block_c=64)
    again = _class_feature_sums_triton(features, labels, 5, 255, block_c=64)
    fewer_programs = _class_feature_sums_triton(features, labels, 5, 255, block_c=64, spans_per_program=2)
    public = class_feature_sums(features, labels, 5, backend="triton")
    others = [again, fewer_programs, public]
    if DEVICE == "cuda":  # numpy's matmul (the interpreter's tl.dot) rounds differently per shape
        others.append(_class_feature_sums_triton(features, labels, 5, 255, block_c=16))
    for other in others:
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    hi = round_to_tf32(x)
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, round_to_tf32(x - hi))


def test_fp32_split_into_two_tf32_parts_is_exact_enough():
    """fp32 features go to the tensor cores as hi + lo, both rounded to tf32 (as cvt.rna.tf32): hi
    keeps 10 mantissa bits, and hi + lo is within 2**-22 of the feature, the accuracy of tf32x3 (whose
    third product, the one-hot's low part, is zero here)."""
    torch.manual_seed(7)
    x = torch.randn(1024, device=DEVICE) * torch.logspace(-20, 20, 1024, device=DEVICE)
    x[:4] = torch.tensor([0.0, -0.0, 1.0 + 2**-11, 1.0 + 3 * 2**-12])  # zeros, a tie, a round-up
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, N=1024)
    for part in (hi, lo):
        assert (part.view(torch.int32) & 0x1FFF == 0).all()  # exact in tf32
    assert hi[2].item() == 1.0 + 2**-10 and hi[3].item() == 1.0 + 2**-10  # ties away from zero
    assert ((x - hi).abs() <= x.abs() * 2.0**-11).all()
    assert ((x.double() - hi.double() - lo.double()).abs() <= x.abs().double() * 2.0**-22).all()


SUMS = importlib.import_module("diga_fast.kernels.class_feature_sums")
NAMED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUMS_SHAPES = sizes([(2, 37, 13, 17)], [(2, 256, 65, 129), (2, 2048, 65, 129)])  # DeepLabV2's feature maps


@pytest.mark.parametrize("config,shape,dtype", every_config(
    SUMS._class_feature_sums_partial_kernel, [("x".join(map(str, s)), d) for s in SUMS_SHAPES for d in NAMED_DTYPES]))
def test_every_config(config, shape, dtype, monkeypatch):
    """Each autotune config, forced: counts exact, sums within twice PyTorch's fp32 error of float64."""
    monkeypatch.setattr(SUMS._class_feature_sums_partial_kernel, "configs", [config])
    B, C, H, W = map(int, shape.split("x"))
    torch.manual_seed(17)
    features = torch.randn(B, C, H, W, device=DEVICE).to(NAMED_DTYPES[dtype])
    labels = make_labels(B, H, W, 19, seed=17)
    sums, counts = class_feature_sums(features, labels, 19, backend="triton")
    ref_sums, ref_counts = class_feature_sums_ref(features.double(), labels, 19)
    assert torch.equal(counts, ref_counts)
    torch_err = (class_feature_sums_ref(features, labels, 19)[0].double() - ref_sums).abs().max().item()
    tol = 2 * torch_err + 1e-5 * max(1.0, ref_sums.abs().max().item())
    assert (sums.double() - ref_sums).abs().max().item() <= tol
