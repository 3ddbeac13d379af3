"""The warm-up's pieces, each against a plain re-computation: strong view, ClassMix choice, CrDoMix,
EMA, distillation, OHEM, FDA."""

import math

import pytest
import torch
import torch.nn.functional as F

from diga_fast.method.augment import StrongAugConfig, hsv_to_rgb, rgb_to_hsv, strong_photometric, strong_view
from diga_fast.method.ema import ema_alpha, ema_update, make_teacher
from diga_fast.method.losses import (
    cross_view_distillation,
    ohem_cross_entropy,
    segmentation_cross_entropy,
    source_cross_entropy,
)
from diga_fast.method.mixing import classmix, classmix_labels, classmix_selection, crdomix, narrow_labels
from diga_fast.method.translators import fda_translate


def test_hsv_round_trip():
    x = torch.rand(2, 3, 9, 11)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)


def test_strong_view_is_the_beta_blend_and_reproducible():
    x = torch.rand(4, 3, 16, 20)
    cfg = StrongAugConfig()
    a = strong_photometric(x, cfg, torch.Generator().manual_seed(3))
    view = strong_view(x, cfg, torch.Generator().manual_seed(3))
    assert torch.allclose(view, 0.4 * a + 0.6 * x, atol=1e-6)
    assert torch.equal(view, strong_view(x, cfg, torch.Generator().manual_seed(3)))
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_strong_photometric_switches():
    x = torch.rand(3, 3, 8, 8)
    off = StrongAugConfig(jitter_p=0, grayscale_p=0, blur_p=0, sharpness_p=0)
    assert torch.equal(strong_photometric(x, off), x)
    gray_only = StrongAugConfig(jitter_p=0, grayscale_p=1, blur_p=0, sharpness_p=0)
    out = strong_photometric(x, gray_only)
    expected = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    assert torch.allclose(out, expected, atol=1e-6)
    blur_only = StrongAugConfig(jitter_p=0, grayscale_p=0, blur_p=1, sharpness_p=0, blur_sigma=2.0)
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / 8.0)
    k = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    manual = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k.expand(3, 1, 3, 3), groups=3)
    assert torch.allclose(strong_photometric(x, blur_only), manual, atol=1e-6)


def test_classmix_selection_takes_half_of_the_present_values_plus_ignore():
    labels = torch.tensor([0, 1, 2, 3, 255, 7, 7, 7]).view(1, 2, 4).repeat(3, 1, 1)
    labels[2] = 5  # a single present value: floor(1/2) = 0 picked, only 255
    selected = classmix_selection(labels, torch.Generator().manual_seed(0))
    for b in range(2):
        present = set(labels[b].unique().tolist())
        picked = set(torch.nonzero(selected[b]).flatten().tolist())
        assert 255 in picked and picked - {255} <= present
        assert len(picked & present) in (len(present) // 2, len(present) // 2 + 1)  # +1 when 255 was drawn
        assert len((picked - {255}) & present) >= len(present) // 2 - 1
    assert set(torch.nonzero(selected[2]).flatten().tolist()) == {255}


def test_classmix_draws_are_uniform_over_present_values():
    labels = torch.tensor([0, 1, 2, 3]).view(1, 1, 4).repeat(4000, 1, 1)
    selected = classmix_selection(labels, torch.Generator().manual_seed(1))
    assert torch.equal(selected[:, :4].sum(1), torch.full((4000,), 2))
    frequency = selected[:, :4].float().mean(0)
    assert torch.allclose(frequency, torch.full((4,), 0.5), atol=0.03)


def test_crdomix_keeps_source_on_selected_classes_and_255():
    g = torch.Generator().manual_seed(5)
    aug, translated = torch.rand(2, 3, 6, 7), torch.rand(2, 3, 6, 7)
    labels = torch.randint(0, 4, (2, 6, 7))
    labels[:, 0, 0] = 255
    mixed = crdomix(aug, translated, labels, torch.Generator().manual_seed(5))
    selected = classmix_selection(labels, g)
    keep = torch.gather(selected, 1, labels.view(2, -1)).view(2, 1, 6, 7)
    assert torch.equal(mixed, torch.where(keep, aug, translated))
    assert torch.equal(mixed[:, :, 0, 0], aug[:, :, 0, 0])
    all_ignore = torch.full((2, 6, 7), 255)
    assert torch.equal(crdomix(aug, translated, all_ignore), aug)  # no crash, nothing stale


def test_the_blends_read_uint8_labels_as_the_int64_ones():
    """Self-training hands both blends one uint8 copy of the source labels (on CUDA; narrow_labels keeps
    CPU tensors as they are): the same mixes, bit for bit."""
    aug, translated = torch.rand(2, 3, 6, 7), torch.rand(2, 3, 6, 7)
    labels = torch.randint(0, 19, (2, 6, 7))
    labels[:, 0] = 255
    narrow = labels.to(torch.uint8)
    assert narrow_labels(labels) is labels and narrow_labels(narrow) is narrow
    assert torch.equal(crdomix(aug, translated, labels, torch.Generator().manual_seed(1), narrow=narrow),
                       crdomix(aug, translated, labels, torch.Generator().manual_seed(1)))
    selected = classmix_selection(labels, torch.Generator().manual_seed(2))
    assert torch.equal(classmix(aug, translated, labels, selected, narrow=narrow), classmix(aug, translated, labels, selected))


def test_classmix_labels():
    selected = torch.zeros(1, 256, dtype=torch.bool)
    selected[0, 1] = selected[0, 255] = True
    source = torch.tensor([[[1, 2], [255, 3]]])
    target = torch.tensor([[[9, 9], [9, 9]]])
    assert classmix_labels(selected, source, target).tolist() == [[[1, 9], [255, 9]]]


def test_ema_update_follows_the_ramp():
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    teacher = make_teacher(student)
    assert [ema_alpha(t) for t in (0, 1, 2)] == [0.0, 0.5, pytest.approx(2 / 3)] and ema_alpha(10**6) == 0.999
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(2.0)
    ema_update(teacher, student, step=1)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(new, 0.5 * old + 0.5 * s)
    assert torch.allclose(teacher[1].running_mean, torch.full((4,), 1.0))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_cross_view_distillation_matches_the_formula():
    s_c, s_m, t_c, t_m = (torch.randn(2, 5, 3, 4) for _ in range(4))

    def ce(student, teacher):
        p = torch.softmax(teacher, 1)
        return -(p * torch.log_softmax(student, 1)).sum(1).mean()

    expected = ce(s_m, t_c) + 0.5 * ce(s_c, t_m)
    assert torch.allclose(cross_view_distillation(s_c, s_m, t_c, t_m, reverse_scale=0.5), expected)
    s_c.requires_grad_(True)
    t_m.requires_grad_(True)
    cross_view_distillation(s_c, s_m, t_c, t_m, 0.5).backward()
    assert t_m.grad is None and s_c.grad is not None  # teacher detached


def test_segmentation_ce_averages_valid_pixels_and_handles_all_ignore():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0] = 255
    valid = labels != 255
    manual = -torch.log_softmax(logits, 1).gather(1, labels.clamp(max=3).unsqueeze(1)).squeeze(1)[valid].mean()
    assert torch.allclose(segmentation_cross_entropy(logits, labels), manual)
    zero = segmentation_cross_entropy(logits, torch.full((2, 3, 3), 255))
    zero.backward()
    assert float(zero.detach()) == 0.0 and not math.isnan(float(logits.grad.abs().sum()))


def _ohem_by_sorting(logits, labels, thresh, min_kept):
    """HRNet's OhemCrossEntropy as written there: sort p_true of the valid pixels, threshold at
    max(thresh, sorted[min(min_kept, n - 1)]), mean CE of the pixels strictly below it."""
    log_p = torch.log_softmax(logits.double(), 1)
    flat_labels = labels.flatten()
    valid = flat_labels != 255
    nll = -log_p.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])[valid].gather(1, flat_labels[valid, None]).squeeze(1)
    p_true = nll.neg().exp()
    ordered = p_true.sort().values
    threshold = max(thresh, float(ordered[min(min_kept, ordered.numel() - 1)]))
    return nll[p_true < threshold].mean()


@pytest.mark.parametrize("thresh, min_kept", [(0.7, 10), (0.7, 1000), (0.05, 40), (0.99, 0)])
def test_ohem_matches_the_sorting_formulation(thresh, min_kept):
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 5, 8, 8)).requires_grad_()
    labels = torch.randint(0, 5, (2, 8, 8))
    labels[1, :3] = 255
    loss = ohem_cross_entropy(logits, labels, thresh, min_kept)
    assert torch.allclose(loss.double(), _ohem_by_sorting(logits.detach(), labels, thresh, min_kept), atol=1e-6)
    loss.backward()
    kept = (logits.grad.abs().sum(1) > 0)
    assert not kept[labels == 255].any()
    valid = int((labels != 255).sum())
    if min_kept >= valid:  # threshold = the largest p_true (> thresh here), kept strictly below it
        assert int(kept.sum()) == valid - 1
    elif thresh < 0.9:  # confident pixels are dropped
        assert int(kept.sum()) < valid - 1


def test_ohem_all_ignore_and_the_recipe_switch():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    zero = ohem_cross_entropy(logits, torch.full((1, 4, 4), 255))
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0
    labels = torch.randint(0, 3, (1, 4, 4))

    class Train:
        source_loss, ohem_thresh, ohem_min_kept, ce_normalizer = "ohem", 0.7, 3, "valid"

    assert torch.equal(source_cross_entropy(logits, labels, Train), ohem_cross_entropy(logits, labels, 0.7, 3))
    Train.source_loss = "ce"
    assert torch.equal(source_cross_entropy(logits, labels, Train), segmentation_cross_entropy(logits, labels))
    # the official normaliser: the sum over valid pixels divided by all pixels, ignored ones included
    labels[0, 0] = 255
    Train.ce_normalizer = "all"
    summed = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
    torch.testing.assert_close(source_cross_entropy(logits, labels, Train), summed / labels.numel())


def test_fda_swaps_the_low_frequency_amplitude_only():
    source, target = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    out = fda_translate(source, target, beta=0.0)  # band 0: only the DC term (mean colour) moves
    assert torch.allclose(out.mean((2, 3)), target.mean((2, 3)).clamp(0, 1), atol=0.05)
    same = fda_translate(source, source, beta=0.1)
    assert torch.allclose(same, source, atol=1e-5)
    amp = lambda x: torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)).abs()  # noqa: E731
    unclamped = fda_translate(source * 0.5 + 0.25, target * 0.5 + 0.25, beta=0.1)
    a_out, a_trg = amp(unclamped), amp(target * 0.5 + 0.25)
    assert torch.allclose(a_out[..., 13:20, 13:20], a_trg[..., 13:20, 13:20], rtol=1e-3, atol=1e-3)
