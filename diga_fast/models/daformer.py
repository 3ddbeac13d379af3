"""DAFormer (Hoyer et al., CVPR 2022): a MiT encoder with the context-aware fusion head.

Layout (``daformer_sepaspp_mitb5`` of the DAFormer code, ``decode_head`` in its config)::

    image RGB [0, 1] -> normalise (ImageNet mean/std, as DAFormer's 0..255 mean/std)
    MiT-Bx encoder (diga_fast.models.mit)            4 maps, strides 4, 8, 16, 32
    embed      per map: 1x1 projection to 256 (a Linear with bias: no norm, no activation),
               bilinearly upsampled to the stride-4 map (align_corners=False), concatenated -> 1024
    fuse       the ASPP-like context-aware fusion, no image pooling:
                 dilation 1:       1x1 conv 1024 -> 256, BN, ReLU
                 dilation 6/12/18: depth-wise 3x3 (dilated) 1024, BN, ReLU; 1x1 1024 -> 256, BN, ReLU
               concatenated (1024) -> 3x3 conv -> 256, BN, ReLU          stride 4  <- "the feature"
    Dropout2d(0.1) -> 1x1 classifier 256 -> K (with bias)                 stride 4  <- logits

Convs followed by BN have no bias (mmcv's ConvModule). ``forward`` returns ``(logits, feature)`` at
stride 4, ``ceil(H / 4)`` x ``ceil(W / 4)``; the feature (the fused 256-d map the classifier reads) is
what DiGA's centroids and consensus use. The encoder runs at the base learning rate, the head (embed,
fuse, classifier) at ``head_lr_mult`` x (DAFormer: lr_mult 10 for ``decode_head``).

Input sides must be at least 29 pixels: the first stage's key/value reduction is an 8x8 conv on the
stride-4 map (the reference MiT has the same limit). Exported graphs keep batch, height and width
dynamic; a ``torch.export`` program (``.pt2``) additionally needs a width of at least 33, so that the
stride-32 map is wider than one column (the program guards on it).

``pretrained`` is a local ImageNet file of the MiT encoder (the SegFormer release's ``mit_bX.pth`` or a
Hugging Face ``SegformerModel``); see :mod:`diga_fast.models.mit_weights`. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diga_fast.models.base import SegmentationModel
from diga_fast.models.mit import MIT_CONFIGS, MixVisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FUSION_DILATIONS = (1, 6, 12, 18)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SeparableASPP(nn.Module):
    """DAFormer's fusion: a 1x1 branch and depth-wise separable 3x3 branches at the other dilations,
    concatenated, then a 3x3 bottleneck; every conv with BN and ReLU."""

    def __init__(self, in_channels: int, channels: int, dilations: tuple[int, ...] = FUSION_DILATIONS) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            _conv_bn_relu(in_channels, channels) if d == 1 else nn.Sequential(
                _conv_bn_relu(in_channels, in_channels, 3, dilation=d, groups=in_channels),
                _conv_bn_relu(in_channels, channels),
            )
            for d in dilations
        )
        self.bottleneck = _conv_bn_relu(channels * len(dilations), channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))


class DAFormerHead(nn.Module):
    """Encoder maps -> the fused 256-d feature at the resolution of the first map."""

    def __init__(self, in_channels: tuple[int, ...], channels: int = 256) -> None:
        super().__init__()
        self.embed = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = SeparableASPP(channels * len(in_channels), channels)
        for module in self.fuse.modules():
            if isinstance(module, nn.Conv2d):  # mmcv ConvModule: kaiming normal, fan_out, relu
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[2:]
        embedded = [self.embed[0](maps[0])] + [
            F.interpolate(embed(x), size=size, mode="bilinear", align_corners=False)
            for embed, x in zip(self.embed[1:], maps[1:])
        ]
        return self.fuse(torch.cat(embedded, dim=1))


class DAFormer(SegmentationModel):
    feature_dim = 256
    output_stride = 4

    def __init__(self, variant: str = "b5", num_classes: int = 19, pretrained: str | Path | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.arch = f"daformer_mit{variant}"
        self.num_classes = num_classes
        self.encoder = MixVisionTransformer(MIT_CONFIGS[variant])
        self.head = DAFormerHead(self.encoder.out_channels, self.feature_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(self.feature_dim, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        if pretrained:
            from diga_fast.models.mit_weights import load_mit_weights

            load_mit_weights(self.encoder, pretrained)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.head(self.encoder(self.normalize(image)))
        logits = self.classifier(self.dropout(feature))
        return logits, feature

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for m in (self.head, self.classifier) for p in m.parameters() if p.requires_grad)

    def no_weight_decay_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's LayerNorm weights and biases: DAFormer's optimiser gives every parameter whose
        name holds ``norm`` (in the MiT: these) a weight-decay multiplier of 0."""
        return (p for m in self.encoder.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
                if p.requires_grad)
