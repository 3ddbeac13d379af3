"""The objective of the source->target translator (method.md Stage 0; official §3), trained by
:mod:`diga_fast.stages.translator` and applied, frozen, by CrDoMix.

Two encoders (``enc_s``, ``enc_t``), two decoders (``dec_s2t``, ``dec_t2s``) and two multi-scale
discriminators (``dis_s2t`` judges target-looking images, ``dis_t2s`` source-looking ones). All
images are in [-1, 1] inside the loop. Per iteration, on a labelled source batch (x_s, y_s) and an
unlabelled target batch x_t:

  s2t = dec_s2t(enc_s(x_s))          t2s = dec_t2s(enc_t(x_t))            translations
  s2s = dec_t2s(enc_s(x_s))          t2t = dec_s2t(enc_t(x_t))            self-reconstructions
  s2t2s = dec_t2s(enc_t(s2t))        t2s2t = dec_s2t(enc_s(t2s))          cycles

  L_G = 0.5  * [LSGAN_G(dis_s2t(s2t)) + LSGAN_G(dis_t2s(t2s))]
      + 10   * [L1(s2t2s, x_s) + L1(t2s2t, x_t)]
      + 20   * EdgeL1(s2t, x_s; y_s)
      + 0.1  * [VGG(s2t, x_s) + VGG(t2s, x_t)]             (off without translator.vgg_weights)
      + 0.001 * [L1(s2s, x_s) + L1(t2t, x_t)]              (SYNTHIA 0.025)
  L_D = LSGAN_D(dis_s2t: x_t real, s2t fake) + LSGAN_D(dis_t2s: x_s real, t2s fake)

  LSGAN_G(D) = sum over scales of mean((D - 1)^2); LSGAN_D = sum over scales of
  mean((D(real) - 1)^2) + mean(D(fake)^2). L1 = mean absolute difference.
  EdgeL1: the semantic edges of y_s are the pixels where a 5x5 Laplacian (-1 everywhere, 24 in the
  centre) of the label map, taken as numbers with the border replicated, has |response| > 0.1, i.e.
  pixels within 2 of a change of label (ignore = 255 counts as a label); EdgeL1 is the mean of
  |s2t - x_s| over those pixels and the 3 channels (0 when a batch has no edge).
  VGG(a, b) = sum over relu1_1..relu5_1 of w_i * L1(phi_i(a), phi_i(b).detach()), w = 1/32, 1/16,
  1/8, 1/4, 1, on ImageNet-normalised RGB; images wider than 1024 are 2x2 average-pooled first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diga_fast.config import TranslatorConfig
from diga_fast.models.translator import ImageTranslator, MultiScaleDiscriminator, VGGFeatures
from diga_fast.utils import dist

VGG_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
VGG_MAX_WIDTH = 1024


def lsgan_generator_loss(fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over scales of mean((D(fake) - 1)^2)."""
    return sum(torch.mean((score.float() - 1.0) ** 2) for score in fake_scores)


def lsgan_discriminator_loss(real_scores: Sequence[torch.Tensor], fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over scales of mean((D(real) - 1)^2) + mean(D(fake)^2)."""
    return sum(torch.mean((real.float() - 1.0) ** 2) + torch.mean(fake.float() ** 2)
               for real, fake in zip(real_scores, fake_scores))


def semantic_edges(labels: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """bool [B, H, W]: |5x5 Laplacian of the label map| > threshold (border replicated)."""
    kernel = -torch.ones(1, 1, 5, 5, device=labels.device)
    kernel[0, 0, 2, 2] = 24.0
    values = F.pad(labels.float().unsqueeze(1), (2, 2, 2, 2), mode="replicate")
    return F.conv2d(values, kernel).squeeze(1).abs() > threshold


def semantic_edge_l1(translated: torch.Tensor, source: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean |translated - source| over the semantic-edge pixels of ``labels`` (and the channels);
    under torchrun, scaled so that the gradient average is the mean over all ranks' edge pixels."""
    edges = semantic_edges(labels).unsqueeze(1).expand_as(source)
    count = edges.sum()
    diff = (translated.float() - source.float()).abs()
    return dist.global_mean(torch.where(edges, diff, torch.zeros_like(diff)).sum() / count.clamp(min=1),
                                   lambda: count)


def perceptual_loss(vgg: VGGFeatures, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """VGG feature L1 between ``image`` and ``reference`` (both in [-1, 1]; reference detached)."""
    image, reference = (image + 1.0) * 0.5, (reference + 1.0) * 0.5
    while image.shape[-1] > VGG_MAX_WIDTH:
        image, reference = F.avg_pool2d(image, 2), F.avg_pool2d(reference, 2)
    with torch.no_grad():
        targets = vgg(reference)
    return sum(w * F.l1_loss(a.float(), b.float()) for w, a, b in zip(VGG_LAYER_WEIGHTS, vgg(image), targets))


class TranslatorNets(nn.Module):
    """The six nets of the cycle. ``s2t`` = enc_s + dec_s2t, ``t2s`` = enc_t + dec_t2s."""

    def __init__(self, width: int, n_res: int) -> None:
        super().__init__()
        self.s2t = ImageTranslator(width, n_res)
        self.t2s = ImageTranslator(width, n_res)
        self.dis_s2t = MultiScaleDiscriminator(width)
        self.dis_t2s = MultiScaleDiscriminator(width)

    def generator_parameters(self):
        return [*self.s2t.parameters(), *self.t2s.parameters()]

    def discriminator_parameters(self):
        return [*self.dis_s2t.parameters(), *self.dis_t2s.parameters()]


def generator_forward(nets: TranslatorNets, x_s: torch.Tensor, x_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """All images of one generator pass (inputs in [-1, 1], H and W multiples of 4)."""
    enc_s, dec_s2t = nets.s2t.encoder, nets.s2t.decoder
    enc_t, dec_t2s = nets.t2s.encoder, nets.t2s.decoder
    code_s, code_t = enc_s(x_s), enc_t(x_t)
    s2t, t2s = dec_s2t(code_s), dec_t2s(code_t)
    return {
        "s2t": s2t,
        "t2s": t2s,
        "s2s": dec_t2s(code_s),
        "t2t": dec_s2t(code_t),
        "s2t2s": dec_t2s(enc_t(s2t)),
        "t2s2t": dec_s2t(enc_s(t2s)),
    }


def generator_losses(nets: TranslatorNets, images: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor,
                     x_t: torch.Tensor, cfg: TranslatorConfig, vgg: VGGFeatures | None) -> tuple[torch.Tensor, dict]:
    """(weighted total, unweighted terms) of the generator objective in the module docstring."""
    terms = {
        "adv": lsgan_generator_loss(nets.dis_s2t(images["s2t"])) + lsgan_generator_loss(nets.dis_t2s(images["t2s"])),
        "cycle": F.l1_loss(images["s2t2s"].float(), x_s) + F.l1_loss(images["t2s2t"].float(), x_t),
        "edge": semantic_edge_l1(images["s2t"], x_s, y_s),
        "identity": F.l1_loss(images["s2s"].float(), x_s) + F.l1_loss(images["t2t"].float(), x_t),
    }
    total = (cfg.adv_weight * terms["adv"] + cfg.cycle_weight * terms["cycle"] + cfg.edge_weight * terms["edge"]
             + cfg.identity_weight * terms["identity"])
    if vgg is not None:
        terms["perceptual"] = perceptual_loss(vgg, images["s2t"], x_s) + perceptual_loss(vgg, images["t2s"], x_t)
        total = total + cfg.perceptual_weight * terms["perceptual"]
    return total, terms


def discriminator_loss(nets: TranslatorNets, images: dict[str, torch.Tensor], x_s: torch.Tensor,
                       x_t: torch.Tensor) -> torch.Tensor:
    return (lsgan_discriminator_loss(nets.dis_s2t(x_t), nets.dis_s2t(images["s2t"].detach()))
            + lsgan_discriminator_loss(nets.dis_t2s(x_s), nets.dis_t2s(images["t2s"].detach())))
