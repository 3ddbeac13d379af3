"""assign_centroids: Triton (interpreted on CPU, compiled on a GPU) and the torch path against an
independent float64 computation (per-class broadcasting, no einsum, no expansion of the distance)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diga_fast.kernels import assign_centroids, assign_centroids_ref

from kernel_helpers import DEVICE, every_config, huge_fp16_buffer, sizes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def exact_similarity(features, centroids, metric):
    """[B, K, H, W] in float64: cosine similarity (higher is better) or minus the distance."""
    f = features.double()
    c = centroids.double()[None, :, :, None, None]  # [1, K, C, 1, 1]
    if metric == "cosine":
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        c = c / c.norm(dim=2, keepdim=True).clamp_min(1e-12)
        return (f[:, None] * c).sum(dim=2)
    return -(f[:, None] - c).norm(dim=2)


def exact_score(sim, metric):
    best = sim.max(dim=1).values
    return best if metric == "cosine" else -best


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B,C,H,W,K", [(2, 37, 13, 17, 19), (1, 70, 9, 31, 16), (2, 5, 3, 1, 3)])
def test_matches_exact(B, C, H, W, K, dtype, metric, backend):
    torch.manual_seed(0)
    features = torch.randn(B, C, H, W, device=DEVICE).to(dtype)
    centroids = torch.randn(K, C, device=DEVICE)

    labels, score = assign_centroids(features, centroids, metric, backend=backend)
    assert labels.shape == score.shape == (B, H, W)
    assert labels.dtype == torch.int64 and score.dtype == torch.float32
    assert labels.min() >= 0 and labels.max() < K

    sim = exact_similarity(features, centroids, metric)  # of the (rounded) inputs themselves
    expected = exact_score(sim, metric)
    # FlashAttention-style bound: at most twice the error of PyTorch computing in the input dtype.
    _, lowp_score = assign_centroids_ref(features, centroids.to(dtype), metric, upcast=False)
    lowp_err = (lowp_score.double() - expected).abs().max().item()
    tol = 2 * lowp_err + ATOL[dtype] * max(1.0, expected.abs().max().item())
    assert (score.double() - expected).abs().max().item() <= tol
    # The chosen centroid is as good as the best one, up to the same tolerance ...
    picked = sim.gather(1, labels[:, None])[:, 0]
    assert (sim.max(dim=1).values - picked).max().item() <= tol
    # ... and, in fp32, it is the exact argmax (these random shapes have no near-ties).
    if dtype == torch.float32:
        assert torch.equal(labels, sim.argmax(dim=1))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ties_go_to_lowest_index(metric, backend):
    torch.manual_seed(1)
    K, C = 19, 37
    centroids = torch.randn(K, C, device=DEVICE)
    centroids[5] = centroids[2]
    centroids[11] = centroids[2]
    features = torch.randn(2, C, 5, 7, device=DEVICE)
    features[:, :, :2] = centroids[2][None, :, None, None]  # exactly on the duplicated centroid
    labels, _ = assign_centroids(features, centroids, metric, backend=backend)
    assert (labels[:, :2] == 2).all()
    assert not ((labels == 5) | (labels == 11)).any()
    # All centroids equal: every pixel ties across all classes.
    labels, _ = assign_centroids(features, centroids[2].expand(K, C).contiguous(), metric, backend=backend)
    assert (labels == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_vectors(backend):
    torch.manual_seed(2)
    centroids = torch.randn(19, 37, device=DEVICE)
    features = torch.zeros(2, 37, 3, 5, device=DEVICE)
    labels, score = assign_centroids(features, centroids, "cosine", backend=backend)
    assert (labels == 0).all() and (score == 0).all() and not score.isnan().any()
    labels, score = assign_centroids(features, centroids, "l2", backend=backend)
    norms = centroids.double().norm(dim=1)
    assert (labels == norms.argmin()).all()
    torch.testing.assert_close(score, norms.min().float().expand_as(score), rtol=1e-5, atol=1e-5)
    # A zero centroid wins (score 0) where every other centroid points away from the feature.
    centroids = torch.zeros(3, 4, device=DEVICE)
    centroids[0, 0] = 1.0
    centroids[1, 1] = 1.0
    features = torch.zeros(1, 4, 2, 3, device=DEVICE)
    features[:, 0] = -1.0
    features[:, 1] = -1.0
    labels, score = assign_centroids(features, centroids, "cosine", backend=backend)
    assert (labels == 2).all() and (score == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_non_contiguous(layout, backend):
    torch.manual_seed(3)
    base = torch.randn(2, 74, 13, 36, device=DEVICE)
    features = {
        "channels_last": base[:, :37, :, :17].contiguous().to(memory_format=torch.channels_last),
        "sliced": base[:, ::2, :, 1::2],  # every other channel and column
        "transposed": base[:, :37].transpose(2, 3),
    }[layout]
    centroids = torch.randn(19, 37, device=DEVICE)[:, :]
    for metric in ("cosine", "l2"):
        labels, score = assign_centroids(features, centroids, metric, backend=backend)
        sim = exact_similarity(features, centroids, metric)
        assert torch.equal(labels, sim.argmax(dim=1))
        torch.testing.assert_close(score.double(), exact_score(sim, metric), rtol=1e-5, atol=1e-5)


def test_backend_resolution(monkeypatch):
    features, centroids = torch.randn(1, 4, 2, 3), torch.randn(3, 4)
    labels, score = assign_centroids(features, centroids)  # CPU tensors → the torch reference
    ref_labels, ref_score = assign_centroids_ref(features, centroids)
    assert torch.equal(labels, ref_labels) and torch.equal(score, ref_score)
    with pytest.raises(ValueError, match="backend"):
        assign_centroids(features, centroids, backend="cuda")
    with pytest.raises(ValueError, match="metric"):
        assign_centroids(features, centroids, metric="dot")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        assign_centroids(features, centroids, backend="triton")


def test_torch_path_takes_any_number_of_classes():
    features, centroids = torch.randn(1, 4, 2, 3), torch.randn(100, 4)
    labels, _ = assign_centroids(features, centroids, backend="torch")
    assert torch.equal(labels, assign_centroids_ref(features, centroids)[0])
    with pytest.raises(ValueError, match="classes"):  # only the Triton path has a class limit
        assign_centroids(features, centroids, backend="triton")


def test_pixel_offsets_beyond_2_31():
    """Rows h of a strided view sit h·(2**30 + 8) elements apart: row 2 is 2**31 + 16 elements in,
    which int32 offsets wrap to element 16 of the buffer (filled to point at the other centroid)."""
    base, stride_h = 2**31, 2**30 + 8
    buf = huge_fp16_buffer(base + 2 * stride_h + 64)
    features = buf.as_strided((1, 2, 3, 2), (4, 2, stride_h, 1), storage_offset=base)
    features[0, 0], features[0, 1] = 0.0, 1.0  # every pixel points at centroid 1
    buf[16:20] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    centroids = torch.eye(2, device=DEVICE)
    for metric in ("cosine", "l2"):
        labels, score = assign_centroids(features, centroids, metric, backend="triton")
        assert (labels == 1).all(), labels


@pytest.mark.parametrize("norm_load", [True, False], ids=["second_load", "shared_tile"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_both_norm_variants_agree(norm_load, metric, monkeypatch):
    """Both tuned variants (norms from a second load of the tile, or from the dot's own tile), at
    several programs per image and channel steps: the same labels, scores within fp32 rounding."""
    module = importlib.import_module("diga_fast.kernels.assign_centroids")
    torch.manual_seed(11)
    features = torch.randn(2, 37, 11, 13, device=DEVICE)
    centroids = torch.randn(19, 37, device=DEVICE)
    config = triton.Config({"BLOCK_P": 64, "BLOCK_C": 16, "NORM_LOAD": norm_load}, num_warps=4, num_stages=1)
    monkeypatch.setattr(module._assign_centroids_kernel, "configs", [config])
    labels, score = assign_centroids(features, centroids, metric, backend="triton")
    sim = exact_similarity(features, centroids, metric)
    assert torch.equal(labels, sim.argmax(dim=1))
    torch.testing.assert_close(score.double(), exact_score(sim, metric), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_centroids_split_for_16_bit_features(metric):
    """For fp16/bf16 features (exact in tf32) the centroids are prepared as hi + lo, both exact in tf32:
    the kernel's two products are then tf32x3's whole sum."""
    from diga_fast.kernels.assign_centroids import _prepare_centroids_kernel

    torch.manual_seed(12)
    K, C = 19, 70
    centroids = torch.randn(K, C, device=DEVICE) * torch.logspace(-3, 3, C, device=DEVICE)
    out = torch.empty(2, K, C, device=DEVICE)
    sq = torch.empty(K, device=DEVICE)
    duplicate = torch.empty(K, dtype=torch.int32, device=DEVICE)
    _prepare_centroids_kernel[(K,)](
        centroids, out, sq, duplicate, C, *centroids.stride(),
        NORMALIZE=metric == "cosine", SPLIT=True, EPS=1e-12, ACC_DTYPE=tl.float32, K_PAD=32, BLOCK_C=64,
    )
    rows = F.normalize(centroids.double(), dim=1) if metric == "cosine" else centroids.double()
    assert (out.view(torch.int32) & 0x1FFF == 0).all()
    assert ((out[0].double() + out[1].double() - rows).abs() <= rows.abs() * 2.0**-21).all()
    torch.testing.assert_close(sq.double(), (rows * rows).sum(dim=1), rtol=1e-5, atol=0)


def test_centroids_are_prepared_once_per_update(monkeypatch):
    """The prepared rows are reused while the centroids tensor is unchanged; an in-place update (the
    online EMA) or another tensor with the same values prepares them again."""
    module = importlib.import_module("diga_fast.kernels.assign_centroids")
    launches = []
    real = module._prepare_centroids_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(module, "_prepare_centroids_kernel", Counting())
    monkeypatch.setattr(module, "_prepared", {})
    torch.manual_seed(13)
    features = torch.randn(2, 37, 5, 7, device=DEVICE)
    centroids = torch.randn(19, 37, device=DEVICE)
    first, _ = assign_centroids(features, centroids, backend="triton")
    again, _ = assign_centroids(features + 0.0, centroids, backend="triton")
    assert len(launches) == 1 and torch.equal(first, again)
    centroids.mul_(-1.0)  # as update_centroids does: in place
    flipped, _ = assign_centroids(features, centroids, backend="triton")
    assert len(launches) == 2
    assert torch.equal(flipped, exact_similarity(features, centroids, "cosine").argmax(dim=1))
    assign_centroids(features, centroids.clone(), backend="triton")
    assign_centroids(features, centroids, "l2", backend="triton")
    assign_centroids(features.half(), centroids, backend="triton")  # 16-bit features: the hi + lo rows
    assert len(launches) == 5


def test_configs_fill_every_sm_at_the_training_shapes(monkeypatch):
    """On an H100/H200 (132 SMs) the configs left for DeepLab's 2x65x129 feature maps launch two or more
    programs per SM; full-resolution maps keep every config."""
    module = importlib.import_module("diga_fast.kernels.assign_centroids")
    monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    configs = module._configs()
    for (B, H, W), all_kept in [((2, 65, 129), False), ((2, 512, 1024), True), ((1, 4, 4), False)]:
        named = {"feat_ptr": torch.empty(B, 1, H, W, device="meta"), "B": B, "HW": H * W}
        kept = module._prune_configs(configs, named)
        assert kept and (kept == configs) == all_kept
        programs = [triton.cdiv(H * W, c.kwargs["BLOCK_P"]) * B for c in kept]
        assert all(p >= 2 * 132 for p in programs) or {c.kwargs["BLOCK_P"] for c in kept} == {32}


ASSIGN = importlib.import_module("diga_fast.kernels.assign_centroids")
NAMED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# DeepLabV2's feature maps of 512x1024 inputs (ASPP input and output) and a full-resolution map
ASSIGN_SHAPES = sizes([(2, 37, 13, 17)], [(2, 256, 65, 129), (2, 2048, 65, 129), (1, 256, 512, 1024)])


def _tuned_for(config, shape, dtype, metric):
    """Whether the autotuner would consider ``config`` for this shape (its grid fills the SMs)."""
    kernel = ASSIGN._assign_centroids_kernel
    if len(kernel.configs) == 1:
        return True
    B, C, H, W = map(int, shape.split("x"))
    named = {"feat_ptr": torch.empty(1, device=DEVICE), "B": B, "HW": H * W}
    return config in ASSIGN._prune_configs(kernel.configs, named)


@pytest.mark.parametrize("config,shape,dtype,metric", every_config(
    ASSIGN._assign_centroids_kernel,
    [("x".join(map(str, s)), d, m) for s in ASSIGN_SHAPES for d in NAMED_DTYPES for m in ("cosine", "l2")],
    keep=_tuned_for))
def test_every_config(config, shape, dtype, metric, monkeypatch):
    """Each autotune config the kernel may pick, forced, against float64 (at the training shapes on a GPU
    with DIGA_KERNEL_TESTS=full): the FlashAttention-style bound on the score, and a chosen centroid as
    good as the best up to that bound."""
    monkeypatch.setattr(ASSIGN._assign_centroids_kernel, "configs", [config])
    B, C, H, W = map(int, shape.split("x"))
    torch.manual_seed(14)
    features = torch.randn(B, C, H, W, device=DEVICE).to(NAMED_DTYPES[dtype])
    centroids = torch.randn(19, C, device=DEVICE)
    labels, score = assign_centroids(features, centroids, metric, backend="triton")
    f, c = features.double(), centroids.double()
    if metric == "cosine":
        sim = torch.einsum("bchw,kc->bkhw", F.normalize(f, dim=1), F.normalize(c, dim=1))
    else:
        sq = (f * f).sum(dim=1, keepdim=True) - 2 * torch.einsum("bchw,kc->bkhw", f, c) + (c * c).sum(dim=1)[None, :, None, None]
        sim = -sq.clamp_min(0).sqrt()
    expected = exact_score(sim, metric)
    _, lowp_score = assign_centroids_ref(features, centroids.to(features.dtype), metric, upcast=False)
    tol = 2 * (lowp_score.double() - expected).abs().max().item() + ATOL[NAMED_DTYPES[dtype]] * max(
        1.0, expected.abs().max().item())
    assert (score.double() - expected).abs().max().item() <= tol
    assert (sim.max(dim=1).values - sim.gather(1, labels[:, None])[:, 0]).max().item() <= tol
