"""consensus_cross_entropy: forward and hand-written backward against an independent float64
log-softmax/gather computation differentiated by autograd."""

import importlib

import pytest
import torch

from diga_fast.kernels import consensus_cross_entropy, consensus_cross_entropy_ref

from kernel_helpers import DEVICE, every_config, huge_fp16_buffer, sizes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def exact_loss(logits, prob, feat, ignore_index=255):
    """float64 mean CE over pixels with prob == feat != ignore_index and prob in [0, K)."""
    K = logits.shape[1]
    prob, feat = prob.long(), feat.long()
    valid = (prob == feat) & (prob != ignore_index) & (prob >= 0) & (prob < K)
    log_p = torch.log_softmax(logits.double(), dim=1)
    nll = -log_p.gather(1, prob.clamp(0, K - 1)[:, None])[:, 0]
    return (nll * valid).sum() / max(int(valid.sum()), 1)


def make_labels(B, K, H, W, agree=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    prob = torch.randint(0, K, (B, H, W), generator=g)
    prob[:, 0, : W // 2] = 255  # an ignore strip
    other = torch.randint(0, K, (B, H, W), generator=g)
    feat = torch.where(torch.rand(B, H, W, generator=g) < agree, prob, other)
    return prob.to(DEVICE), feat.to(DEVICE)


def loss_and_grad(fn, logits, *args, scale=1.0, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss * scale, x)
    return loss, grad


def assert_within_flash_bound(loss, grad, logits, prob, feat, scale):
    """FlashAttention's test bound on the loss and the gradient (of ``loss * scale``): at most twice the
    error of PyTorch computing in the logits' dtype, against float64, plus a dtype-sized atol."""
    dtype = logits.dtype
    ref_loss, ref_grad = loss_and_grad(exact_loss, logits.double(), prob, feat, scale=scale)
    lowp_loss, lowp_grad = loss_and_grad(consensus_cross_entropy_ref, logits, prob, feat, scale=scale, upcast=False)
    loss_tol = 2 * (lowp_loss.double() - ref_loss).abs().item() + ATOL[dtype] * ref_loss.abs().item()
    assert (loss.double() - ref_loss).abs().item() <= loss_tol
    grad_tol = 2 * (lowp_grad.double() - ref_grad).abs().max().item() + ATOL[dtype] * ref_grad.abs().max().item()
    if dtype != torch.float32 and scale != 1:  # the forward rounds the gradient to the logits' dtype, the scale again
        grad_tol += torch.finfo(dtype).eps * ref_grad.abs().max().item()
    assert (grad.double() - ref_grad).abs().max().item() <= grad_tol


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64], ids=["u8", "i32", "i64"])
@pytest.mark.parametrize("B,K,H,W", [(2, 19, 13, 17), (1, 16, 7, 33), (2, 64, 3, 5)])
def test_matches_exact(B, K, H, W, label_dtype, dtype, backend):
    torch.manual_seed(0)
    logits = (3 * torch.randn(B, K, H, W, device=DEVICE)).to(dtype)
    prob, feat = make_labels(B, K, H, W)
    prob, feat = prob.to(label_dtype), feat.to(label_dtype)

    loss, grad = loss_and_grad(consensus_cross_entropy, logits, prob, feat, backend=backend, scale=1.7)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert grad.dtype == dtype and grad.shape == logits.shape

    assert_within_flash_bound(loss, grad, logits, prob, feat, scale=1.7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", ["all_ignore", "all_disagree", "out_of_range"])
def test_no_valid_pixel_gives_exact_zero(case, backend):
    torch.manual_seed(1)
    B, K, H, W = 2, 19, 5, 7
    logits = 10 * torch.randn(B, K, H, W, device=DEVICE)
    prob, _ = make_labels(B, K, H, W)
    prob = prob.clamp(max=K - 1)
    feat = {
        "all_ignore": torch.full_like(prob, 255),
        "all_disagree": (prob + 1) % K,
        "out_of_range": prob,
    }[case]
    if case == "all_ignore":
        prob = feat
    if case == "out_of_range":  # labels K..254 and negatives are not classes: ignored, not an error
        prob = torch.where(prob % 2 == 0, torch.full_like(prob, K), torch.full_like(prob, -3))
        feat = prob
    loss, grad = loss_and_grad(consensus_cross_entropy, logits, prob, feat, backend=backend)
    assert loss.item() == 0.0 and not loss.isnan()
    assert (grad == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_custom_ignore_index(backend):
    torch.manual_seed(2)
    B, K, H, W = 2, 19, 6, 9
    logits = torch.randn(B, K, H, W, device=DEVICE)
    prob, feat = make_labels(B, K, H, W, agree=0.8)
    prob = torch.where(prob == 255, torch.full_like(prob, 3), prob)
    feat = torch.where(feat == 255, torch.full_like(feat, 3), feat)
    loss, grad = loss_and_grad(consensus_cross_entropy, logits, prob, feat, ignore_index=3, backend=backend)
    ref_loss, ref_grad = loss_and_grad(exact_loss, logits.double(), prob, feat, ignore_index=3)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous(layout, backend):
    torch.manual_seed(3)
    B, K, H, W = 2, 19, 9, 13
    if layout == "channels_last":
        logits = torch.randn(B, K, H, W, device=DEVICE).to(memory_format=torch.channels_last)
        prob, feat = make_labels(B, K, H, W)
    else:  # every other class plane and column; labels sliced the same way
        logits = torch.randn(B, 2 * K, H, 2 * W, device=DEVICE)[:, ::2, :, ::2]
        prob, feat = make_labels(B, K, H, 2 * W)
        prob, feat = prob[..., ::2], feat[..., ::2]
    loss, grad = loss_and_grad(consensus_cross_entropy, logits, prob, feat, backend=backend)
    ref_loss, ref_grad = loss_and_grad(exact_loss, logits.double(), prob, feat)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradcheck_float64(backend):
    torch.manual_seed(4)
    B, K, H, W = 1, 5, 3, 4
    logits = torch.randn(B, K, H, W, dtype=torch.float64, device=DEVICE, requires_grad=True)
    prob, feat = make_labels(B, K, H, W, agree=0.6, seed=4)
    prob[0, 1, 1] = feat[0, 1, 1] = 2  # at least one valid pixel
    assert consensus_cross_entropy(logits, prob, feat, backend=backend).dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda x: consensus_cross_entropy(x, prob, feat, backend=backend), (logits,), eps=1e-6, atol=1e-7
    )


def test_backend_resolution(monkeypatch):
    logits = torch.randn(1, 3, 2, 2)
    prob = torch.zeros(1, 2, 2, dtype=torch.long)
    assert torch.equal(
        consensus_cross_entropy(logits, prob, prob), consensus_cross_entropy_ref(logits, prob, prob)
    )
    with pytest.raises(ValueError, match="backend"):
        consensus_cross_entropy(logits, prob, prob, backend="numpy")
    with pytest.raises(ValueError, match="label"):
        consensus_cross_entropy(logits, prob[0], prob)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        consensus_cross_entropy(logits, prob, prob, backend="triton")


def test_torch_path_takes_any_number_of_classes():
    logits = torch.randn(1, 70, 2, 3)
    prob = torch.full((1, 2, 3), 69, dtype=torch.long)
    loss = consensus_cross_entropy(logits, prob, prob, backend="torch")
    torch.testing.assert_close(loss, consensus_cross_entropy_ref(logits, prob, prob))
    with pytest.raises(ValueError, match="classes"):  # only the Triton path has a class limit
        consensus_cross_entropy(logits, prob, prob, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_int64_labels_are_range_checked_before_narrowing(backend):
    torch.manual_seed(5)
    B, K, H, W = 2, 19, 4, 6
    logits = torch.randn(B, K, H, W, device=DEVICE)
    prob, feat = make_labels(B, K, H, W, agree=1.0, seed=5)
    wide = prob.clone()
    wide[:, 1] = 2**32 + 3  # class 3 in int32, out of range in int64
    loss, grad = loss_and_grad(consensus_cross_entropy, logits, wide, wide, backend=backend)
    ignored = torch.where(wide == 2**32 + 3, 255, wide)
    ref_loss, ref_grad = loss_and_grad(exact_loss, logits.double(), ignored, ignored)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert (grad[:, :, 1] == 0).all()


def test_class_offsets_beyond_2_31():
    """Class plane 2 sits 2**31 + 16 elements after the view's start; int32 offsets would wrap to
    element 16 of the buffer (left at 0, so the loss would change)."""
    base, stride_k = 2**31, 2**30 + 8
    buf = huge_fp16_buffer(base + 2 * stride_k + 64)
    logits = buf.as_strided((1, 3, 1, 4), (3 * stride_k, stride_k, 4, 1), storage_offset=base)
    for k in range(3):
        logits[0, k] = float(k)
    buf[16:20] = 0.0
    labels = torch.full((1, 1, 4), 2, dtype=torch.long, device=DEVICE)
    loss = consensus_cross_entropy(logits, labels, labels, backend="triton")
    expected = torch.logsumexp(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0) - 2.0
    assert abs(loss.item() - expected.item()) < 1e-3, loss.item()


def test_forward_writes_the_gradient_and_the_backward_scales_it_in_place():
    """The forward writes the target (int8, -1 where not valid), the count and the gradient of the mean;
    the backward hands that very buffer back (scaled in place only where grad_output is not 1) and reads
    neither label map: changing them after the forward changes nothing."""
    from diga_fast.kernels.consensus_cross_entropy import _consensus_ce_forward

    torch.manual_seed(6)
    B, K, H, W = 2, 19, 7, 11
    logits = 4 * torch.randn(B, K, H, W, device=DEVICE)
    prob, feat = make_labels(B, K, H, W, seed=6)
    loss, n_valid, target, grad = _consensus_ce_forward(logits, prob, feat, 255)
    valid = (prob == feat) & (prob != 255)
    assert target.dtype == torch.int8 and torch.equal(target.long(), torch.where(valid, prob, -1))
    assert n_valid.item() == valid.sum().item()
    ref_loss, ref_grad = loss_and_grad(exact_loss, logits.double(), prob, feat)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)

    x = logits.clone().requires_grad_(True)
    out = consensus_cross_entropy(x, prob, feat, backend="triton")
    written = out.grad_fn.grad.data_ptr()
    prob.fill_(255)  # the label maps are not kept: the gradients below are those of the original labels
    (first,) = torch.autograd.grad(out, x, retain_graph=True)
    assert first.data_ptr() == written  # no allocation in the backward
    torch.testing.assert_close(first.double(), ref_grad, rtol=1e-5, atol=1e-7)
    (second,) = torch.autograd.grad(out * 0.25, x)  # a second backward rescales the same buffer
    torch.testing.assert_close(second.double(), 0.25 * ref_grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # nothing to differentiate: no gradient is written
        assert consensus_cross_entropy(x, *make_labels(B, K, H, W, seed=6), backend="triton").grad_fn is None
    frozen = consensus_cross_entropy(logits, *make_labels(B, K, H, W, seed=6), backend="triton")
    torch.testing.assert_close(frozen.double(), ref_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_online_softmax_at_extreme_scales(scale, backend):
    """The running max keeps the one-exp-per-logit update finite for logits of any magnitude."""
    torch.manual_seed(7)
    B, K, H, W = 1, 19, 5, 9
    logits = scale * torch.randn(B, K, H, W, device=DEVICE)
    prob, feat = make_labels(B, K, H, W, agree=0.9, seed=7)
    loss, grad = loss_and_grad(consensus_cross_entropy, logits, prob, feat, backend=backend)
    ref_loss, ref_grad = loss_and_grad(exact_loss, logits.double(), prob, feat)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("K", [1, 2])
def test_one_and_two_classes(K):
    torch.manual_seed(8)
    logits = torch.randn(2, K, 3, 5, device=DEVICE)
    prob = torch.randint(0, K, (2, 3, 5), device=DEVICE)
    loss, grad = loss_and_grad(consensus_cross_entropy, logits, prob, prob, backend="triton")
    ref_loss, ref_grad = loss_and_grad(exact_loss, logits.double(), prob, prob)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_several_programs_per_image_fill_every_partial_slot():
    """H·W over one block: several programs per image, the last one's spare slots beyond the end."""
    torch.manual_seed(9)
    B, K, H, W = 2, 16, 40, 41  # 1640 pixels: 7 slots of 256, two programs of 1024 under the interpreter
    logits = torch.randn(B, K, H, W, device=DEVICE)
    prob, feat = make_labels(B, K, H, W, seed=9)
    loss, grad = loss_and_grad(consensus_cross_entropy, logits, prob, feat, backend="triton", scale=0.5)
    ref_loss, ref_grad = loss_and_grad(exact_loss, logits.double(), prob, feat, scale=0.5)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64_several_programs():
    """float64 end to end (fp64 accumulators, fp64 saved log-sum-exp) across two programs per image."""
    torch.manual_seed(10)
    B, K, H, W = 1, 3, 33, 34  # 1122 pixels
    logits = torch.randn(B, K, H, W, dtype=torch.float64, device=DEVICE, requires_grad=True)
    prob, feat = make_labels(B, K, H, W, agree=0.6, seed=10)
    assert torch.autograd.gradcheck(
        lambda x: consensus_cross_entropy(x, prob, feat, backend="triton"), (logits,), eps=1e-6, atol=1e-7,
        fast_mode=True,
    )


CE = importlib.import_module("diga_fast.kernels.consensus_cross_entropy")
NAMED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# logits at label resolution: GTA5 crops of the paper preset (512x1024 eval, 512x896 training)
CE_SHAPES = sizes([(2, 19, 13, 17)], [(2, 19, 512, 1024), (3, 19, 512, 896)])


def _tuned_for(config, shape, dtype):
    """Whether the autotuner's pruning keeps ``config`` for logits of this dtype."""
    kernel = CE._consensus_ce_fwd_kernel
    if len(kernel.configs) == 1:
        return True
    return config in CE._prune_configs(kernel.configs, {"logits_ptr": torch.empty(0, dtype=NAMED_DTYPES[dtype])})


@pytest.mark.parametrize("config,shape,dtype", every_config(
    CE._consensus_ce_fwd_kernel, [("x".join(map(str, s)), d) for s in CE_SHAPES for d in NAMED_DTYPES],
    keep=_tuned_for))
def test_every_config(config, shape, dtype, monkeypatch):
    """Each forward config the kernel may pick, forced: loss and gradient (scaled by 1.7 in the
    backward) against float64, with the FlashAttention-style bound."""
    monkeypatch.setattr(CE._consensus_ce_fwd_kernel, "configs", [config])
    B, K, H, W = map(int, shape.split("x"))
    torch.manual_seed(15)
    logits = (3 * torch.randn(B, K, H, W, device=DEVICE)).to(NAMED_DTYPES[dtype])
    prob, feat = make_labels(B, K, H, W, seed=15)
    loss, grad = loss_and_grad(consensus_cross_entropy, logits, prob, feat, backend="triton", scale=1.7)
    assert_within_flash_bound(loss, grad, logits, prob, feat, scale=1.7)
