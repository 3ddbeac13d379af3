"""The networks of the learned source->target translator (method.md Stage 0; official §2.4).

A MUNIT/CycleGAN-style encoder-decoder and a multi-scale PatchGAN discriminator, re-implemented from
the description (``width`` = base channels, ``n_res`` = residual blocks per encoder/decoder; the
paper sizes are ``width=64, n_res=4``, the demo preset uses a tiny version):

* :class:`ImageEncoder`  7x7 conv (w) -> 4x4/2 conv (2w) -> 4x4/2 conv (4w) -> ``n_res`` residual
  blocks; instance norm, ReLU, reflection padding everywhere. 4w channels at 1/4 resolution.
* :class:`ImageDecoder`  ``n_res`` residual blocks -> 2 x [nearest x2, 5x5 conv halving the channels,
  IN, ReLU] -> 7x7 conv to 3 channels, tanh.
* :class:`MultiScaleDiscriminator`  3 scales (3x3/2 average pooling between them), each four 4x4/2
  convs with LeakyReLU(0.2) and no norm (w -> 8w), then a 1x1 conv to one channel (LSGAN scores);
  coarser scales too small for the stack (only with tiny CPU crops) are skipped.

Inside the training loop the nets work on images in [-1, 1]. :class:`ImageTranslator` (one encoder
and one decoder, what later stages load) takes and returns RGB in [0, 1], scaling inside; it pads any
height/width to a multiple of 4 and crops the result back, so odd sizes work.

:class:`VGGFeatures` is the frozen VGG16/VGG19 feature stack of the perceptual loss, laid out like
torchvision's ``vgg16().features`` / ``vgg19().features`` so that their state dicts load as they are
(torchvision itself is not needed, and nothing is downloaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diga_fast.errors import DigaError



def _conv_block(in_ch: int, out_ch: int, kernel: int, stride: int = 1, norm: bool = True, act: bool = True) -> nn.Sequential:
    """Reflection padding, conv, optional instance norm and ReLU."""
    # odd kernels: "same" padding; the 4x4/2 convs: 1 on each side, so an even H becomes exactly H/2
    pad = kernel // 2 if kernel % 2 else 1
    layers: list[nn.Module] = [nn.ReflectionPad2d(pad), nn.Conv2d(in_ch, out_ch, kernel, stride)]
    if norm:
        layers.append(nn.InstanceNorm2d(out_ch))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """x + [3x3 conv, IN, ReLU, 3x3 conv, IN], reflection padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_block(channels, channels, 3), _conv_block(channels, channels, 3, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ImageEncoder(nn.Module):
    """[B, 3, H, W] in [-1, 1] (H, W multiples of 4) -> content code [B, 4w, H/4, W/4]."""

    def __init__(self, width: int = 64, n_res: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _conv_block(3, width, 7),
            _conv_block(width, 2 * width, 4, stride=2),
            _conv_block(2 * width, 4 * width, 4, stride=2),
            *[ResidualBlock(4 * width) for _ in range(n_res)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageDecoder(nn.Module):
    """Content code [B, 4w, h, w] -> image [B, 3, 4h, 4w] in [-1, 1] (tanh)."""

    def __init__(self, width: int = 64, n_res: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[ResidualBlock(4 * width) for _ in range(n_res)],
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv_block(4 * width, 2 * width, 5),
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv_block(2 * width, width, 5),
            _conv_block(width, 3, 7, norm=False, act=False),
            nn.Tanh(),
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.layers(code)


def pad_to_multiple(x: torch.Tensor, multiple: int = 4, minimum: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad bottom/right to a multiple of ``multiple`` and at least ``minimum`` (reflection where the
    image is big enough, else replication); returns the padded tensor and the original (H, W)."""
    height, width = x.shape[-2:]
    pad_h = max(minimum, height + (-height % multiple)) - height
    pad_w = max(minimum, width + (-width % multiple)) - width
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (height, width)


def encode_decode(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``decoder(encoder(x))`` for any H, W (padded to a multiple of 4, cropped back); [-1, 1] in/out."""
    padded, (height, width) = pad_to_multiple(x, 4)
    return decoder(encoder(padded))[..., :height, :width]


class ImageTranslator(nn.Module):
    """One direction of the translator (encoder + decoder): RGB in [0, 1] -> RGB in [0, 1]."""

    arch = "cyclegan translator"

    def __init__(self, width: int = 64, n_res: int = 4) -> None:
        super().__init__()
        self.width, self.n_res = width, n_res
        self.encoder = ImageEncoder(width, n_res)
        self.decoder = ImageDecoder(width, n_res)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = encode_decode(self.encoder, self.decoder, x * 2.0 - 1.0)
        return (out + 1.0) * 0.5


class MultiScaleDiscriminator(nn.Module):
    """LSGAN PatchGAN at ``n_scales`` scales; returns one score map [B, 1, h_i, w_i] per scale.
    A coarser scale whose input is under 2**n_layers pixels on a side is skipped (only tiny crops)."""

    def __init__(self, width: int = 64, n_scales: int = 3, n_layers: int = 4) -> None:
        super().__init__()
        self.scales = nn.ModuleList(self._one_scale(width, n_layers) for _ in range(n_scales))
        self.min_size = 2**n_layers

    @staticmethod
    def _one_scale(width: int, n_layers: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_ch, out_ch = 3, width
        for _ in range(n_layers):
            layers += [nn.Conv2d(in_ch, out_ch, 4, 2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            in_ch, out_ch = out_ch, out_ch * 2
        layers.append(nn.Conv2d(in_ch, 1, 1))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for k, scale in enumerate(self.scales):
            if k:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
                if min(x.shape[-2:]) < self.min_size:  # too small for the stride-2 stack (tiny CPU crops)
                    break
            outputs.append(scale(x))
        return outputs


# ----------------------------------------------------------------------------------------- VGG

VGG_CONFIGS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """torchvision's ``vgg16/19().features`` (same parameter names: ``features.<i>.weight``), frozen,
    returning the relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 activations (the five slices of the
    pix2pixHD/MUNIT perceptual loss). Input: RGB in [0, 1]; ImageNet normalisation happens inside."""

    def __init__(self, variant: str = "vgg19") -> None:
        super().__init__()
        if variant not in VGG_CONFIGS:
            raise DigaError(f"unknown VGG variant {variant!r}; choose vgg16 or vgg19")
        self.variant = variant
        layers: list[nn.Module] = []
        taps: list[int] = []  # index of the ReLU after the first conv of each block
        in_ch, first_in_block = 3, True
        for item in VGG_CONFIGS[variant]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                first_in_block = True
                continue
            layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=False)]
            if first_in_block:
                taps.append(len(layers) - 1)
                first_in_block = False
            in_ch = item
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGFeatures:
        return super().train(False)  # always frozen

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        outputs = []
        for index, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs
