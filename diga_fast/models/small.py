"""``SmallSegNet``: a compact DeepLab-v3+-like segmentation net that trains in minutes on a few CPU
cores (about 0.26 M parameters).

Layout::

    image RGB [0, 1] -> normalise (ImageNet mean/std)
    stem     conv3x3/2 3 -> 24, conv3x3/2 24 -> 32, conv3x3 32 -> 32          stride 4  ("low")
    deep     conv3x3/2 32 -> 64, conv3x3 64 -> 64,
             conv3x3 64 -> 96 (dil 2), conv3x3 96 -> 96 (dil 2)               stride 8
    context  1x1 + three depthwise-separable atrous 3x3 branches (dil 3, 6, 12) + image pooling,
             48 ch each, concatenated -> conv1x1 -> 64, GroupNorm + ReLU      stride 8
    decoder  upsample to "low", concat with a 1x1 projection of "low" (16 ch),
             depthwise 3x3 + conv1x1 -> D = 64, GroupNorm + ReLU              stride 4  <- "the feature"
    Dropout2d(0.1) -> conv1x1 D -> K (no bias)                                stride 4  <- logits

Backbone convs use BatchNorm; the head (context, skip projection, decoder, classifier) uses
GroupNorm, as the ProDA head does, and runs at the head learning rate. Every stride-2 layer is a 3x3
conv with padding 1, so an H x W input gives logits and features of ``ceil(ceil(H / 2) / 2)`` =
``ceil(H / 4)`` rows by ``ceil(W / 4)`` columns (e.g. 97 x 181 -> 25 x 46). The graph has no
data-dependent control flow (upsampling takes its size from a tensor's shape), so it exports with
torch.onnx and torch.export with dynamic height and width.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diga_fast.models.base import SegmentationModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _gn_relu(channels: int, groups: int = 8) -> list[nn.Module]:
    return [nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]


class ContextBlock(nn.Module):
    """A light ASPP: 1x1, depthwise-separable atrous 3x3 branches and image pooling, fused by a 1x1."""

    def __init__(self, cin: int, branch: int, cout: int, dilations: tuple[int, ...] = (3, 6, 12)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(cin, branch, 1, bias=False), *_gn_relu(branch))]
            + [
                nn.Sequential(
                    nn.Conv2d(cin, cin, 3, padding=d, dilation=d, groups=cin, bias=False),
                    nn.Conv2d(cin, branch, 1, bias=False),
                    *_gn_relu(branch),
                )
                for d in dilations
            ]
        )
        self.pool = nn.Sequential(nn.Conv2d(cin, branch, 1, bias=False), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(
            nn.Conv2d(branch * (len(dilations) + 2), cout, 1, bias=False), *_gn_relu(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.fuse(torch.cat(outs, dim=1))


class SmallSegNet(SegmentationModel):
    arch = "small"

    def __init__(self, num_classes: int, feature_dim: int = 64, dropout: float = 0.1) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.output_stride = 4
        self.backbone = nn.ModuleDict(
            {
                "stem": nn.Sequential(
                    _conv_bn_relu(3, 24, stride=2),
                    _conv_bn_relu(24, 32, stride=2),
                    _conv_bn_relu(32, 32),
                ),
                "deep": nn.Sequential(
                    _conv_bn_relu(32, 64, stride=2),
                    _conv_bn_relu(64, 64),
                    _conv_bn_relu(64, 96, dilation=2),
                    _conv_bn_relu(96, 96, dilation=2),
                ),
            }
        )
        self.context = ContextBlock(96, 48, feature_dim)
        self.skip = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), *_gn_relu(16, 4))
        self.decoder = nn.Sequential(
            nn.Conv2d(feature_dim + 16, feature_dim + 16, 3, padding=1, groups=feature_dim + 16, bias=False),
            nn.Conv2d(feature_dim + 16, feature_dim, 1, bias=False),
            *_gn_relu(feature_dim),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(feature_dim, num_classes, 1, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.backbone["stem"](self.normalize(image))
        context = self.context(self.backbone["deep"](low))
        context = F.interpolate(context, size=low.shape[2:], mode="bilinear", align_corners=False)
        feature = self.decoder(torch.cat([context, self.skip(low)], dim=1))
        logits = self.classifier(self.dropout(feature))
        return logits, feature

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        modules = (self.context, self.skip, self.decoder, self.classifier)
        return (p for m in modules for p in m.parameters() if p.requires_grad)
