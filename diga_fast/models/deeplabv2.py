"""DeepLabV2 (ResNet-101 / ResNet-50, output stride 8) with ProDA's ASPP head: the paper preset.

Architecture, as the official DiGA code (``diga-official-code.md`` §2.1):

* Caffe-style ResNet: the stride of a bottleneck sits on its first 1x1 conv. Stem 7x7/2 conv + BN +
  ReLU + 3x3/2 max-pool with ``ceil_mode=True``; layer2 stride 2; layer3 dilation 2, layer4 dilation 4
  (both stride 1), so the output stride is 8: 512x896 -> 65x113, 512x1024 -> 65x129 (``output_size``).
* Backbone BN affine parameters are frozen (``requires_grad=False``). The *statistics* follow the
  module's mode, as in the official code: in ``train()`` BN normalises with batch statistics and
  keeps updating its running statistics; in ``eval()`` it uses the running statistics. Set
  ``freeze_bn_stats=True`` to keep the backbone BN in eval mode even when the model trains.
* Head (ProDA ``Classifier_Module2``): a 1x1 conv and four 3x3 atrous convs (dilations 6/12/18/24),
  each 256 channels + GroupNorm(32) + ReLU; concatenated (1280) -> SE block (reduction 16) -> 3x3 conv
  to 256 -> GroupNorm(32), no ReLU. That 256-d tensor is **the feature**. Then Dropout2d(0.1) and a
  1x1 classifier without bias.

``forward`` returns ``(logits, feature)``, both at stride 8. The official code returns the feature
*after* Dropout2d; diga-fast returns it *before* (the tensor the classifier's dropout reads). In eval
mode Dropout2d is the identity, so the two are the same tensor there; in train mode the official
feature has channels zeroed and the rest scaled by 1/0.9 (§13 Q3), ours does not.

Input normalisation is the official Caffe one, kept inside the model: the loaders turn RGB 0..255 into
BGR, subtract the Caffe mean (104.00698793, 116.66876762, 122.67891434) and divide by 128. For an RGB
image x in [0, 1] that is, channel by channel,

    flip_rgb_to_bgr((x - mean_rgb / 255) / (128 / 255)),

so ``pixel_mean`` holds the Caffe mean in RGB order / 255, ``pixel_std`` is 128 / 255 for every
channel, and ``normalize`` applies the base class formula and then flips the channels.

``pretrained`` is a local torchvision ResNet state dict (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ..., ``fc.*`` ignored): the backbone modules carry torchvision's names, so
the keys load directly, strictly except for ``fc.*`` (and ``num_batches_tracked``, which old
torchvision files lack). torchvision's ResNet is "v1.5" (stride on the 3x3 conv) while this backbone
puts the stride on the first 1x1 conv; the tensors have the same shapes either way, so the weights
load, but they were trained for the other placement (the first block of layer2 sees the input at a
different sampling). The AdaptSegNet/DeepLab checkpoint the official code starts from
(``DeepLab_resnet_pretrained_init-f81d91e8.pth``, keys ``Scale.conv1.weight``, ...,
``Scale.layer5.*``) loads too: the ``Scale.`` prefix is dropped and its ``layer5`` head skipped.
Nothing is downloaded.

Initialisation without ``pretrained`` follows the official code's effective one: every conv weight
~ N(0, 0.01) (its ResNet constructor redraws them after the head's own init), conv biases and the SE
block's linear layers at PyTorch's defaults, BN/GN weight 1 and bias 0.

Head parameter names map onto the official ``layer5`` ones by renaming only:
``conv2d_list.{i}.{0,1}`` -> ``aspp.branches.{i}.{0,1}``, ``bottleneck.0.se.{0,2}`` ->
``aspp.se.fc.{0,2}``, ``bottleneck.{1,2}`` -> ``aspp.project.{0,1}``, ``head.1`` -> ``classifier``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from diga_fast.errors import DigaError
from diga_fast.models.base import SegmentationModel, check_state_dict
from diga_fast.utils.io import torch_load_error

CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # on the 0..255 scale
IMAGENET_MEAN_RGB, IMAGENET_STD_RGB = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's input
CAFFE_SCALE = 128.0
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
ASPP_DILATIONS = (6, 12, 18, 24)
BACKBONE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


class Bottleneck(nn.Module):
    """Caffe-style bottleneck: 1x1 (stride) -> 3x3 (dilation) -> 1x1 (x4), frozen BN affine."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc(relu(fc(global average of x))))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fc(x.mean(dim=(2, 3)))
        return x * weight[:, :, None, None]


class ASPP(nn.Module):
    """ProDA's ASPP (``Classifier_Module2`` without its dropout and classifier): 2048 -> 256 feature."""

    def __init__(self, in_channels: int, channels: int = 256,
                 dilations: tuple[int, ...] = ASPP_DILATIONS) -> None:
        super().__init__()

        def branch(kernel_size: int, dilation: int) -> nn.Sequential:
            padding = dilation if kernel_size == 3 else 0
            return nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size, padding=padding, dilation=dilation),
                nn.GroupNorm(32, channels),
                nn.ReLU(inplace=True),
            )

        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, d) for d in dilations])
        concat = channels * len(self.branches)
        self.se = SEBlock(concat, reduction=16)
        self.project = nn.Sequential(nn.Conv2d(concat, channels, 3, padding=1), nn.GroupNorm(32, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.project(self.se(out))


class DeepLabV2(SegmentationModel):
    feature_dim = 256
    output_stride = 8

    def __init__(self, depth: int = 101, num_classes: int = 19, pretrained: str | Path | None = None,
                 freeze_bn_stats: bool = False) -> None:
        if depth not in BLOCKS:
            raise DigaError(f"DeepLabV2 depth must be 50 or 101, got {depth}")
        mean_rgb = tuple(m / 255.0 for m in reversed(CAFFE_MEAN_BGR))
        super().__init__(mean=mean_rgb, std=(CAFFE_SCALE / 255.0,) * 3)
        self.depth = depth
        self.arch = f"deeplabv2_r{depth}"
        self.num_classes = num_classes
        self.freeze_bn_stats = freeze_bn_stats

        # Stem and layers carry torchvision's names so its state dicts load key for key.
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self._inplanes = 64
        blocks = BLOCKS[depth]
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], dilation=2)
        self.layer4 = self._make_layer(512, blocks[3], dilation=4)

        self.aspp = ASPP(512 * Bottleneck.expansion, self.feature_dim)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(self.feature_dim, num_classes, 1, bias=False)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.backbone_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

        if pretrained:
            load_backbone_weights(self, pretrained)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        downsample = None
        # The official code also forces it when dilation is 2 or 4; in every layer that does not
        # already need it (stride or width change) that only concerns the first block, which needs it.
        if stride != 1 or self._inplanes != out_channels or dilation in (2, 4):
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [Bottleneck(self._inplanes, planes, stride, dilation, downsample)]
        self._inplanes = out_channels
        layers += [Bottleneck(out_channels, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @staticmethod
    def output_size(height: int, width: int) -> tuple[int, int]:
        """Logit/feature map size for an input of ``height`` x ``width``."""

        def one(n: int) -> int:
            n = (n - 1) // 2 + 1  # 7x7/2 conv, padding 3
            n = math.ceil((n - 1) / 2) + 1  # 3x3/2 max-pool, padding 1, ceil_mode
            return (n - 1) // 2 + 1  # layer2: 1x1/2 conv

        return one(height), one(width)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> Caffe input: BGR, (255 * x - caffe_mean) / 128."""
        return super().normalize(image).flip(1)

    def backbone_modules(self) -> Iterator[nn.Module]:
        for name in BACKBONE_MODULES:
            yield from getattr(self, name).modules()

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for m in self.backbone_modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(image)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feature = self.aspp(x)
        logits = self.classifier(self.dropout(feature))
        return logits, feature

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        for name in BACKBONE_MODULES:
            yield from (p for p in getattr(self, name).parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for module in (self.aspp, self.classifier):
            yield from (p for p in module.parameters() if p.requires_grad)


def _count_blocks(keys: object, layer: str) -> int:
    return len({k.split(".")[1] for k in keys if isinstance(k, str) and k.startswith(layer + ".")})


RESNET_DEPTHS = {6: 50, 23: 101}  # layer3 blocks -> depth


def resnet_layout(state: dict[str, torch.Tensor]) -> str | None:
    """Which published ResNet layout a state dict has: ``"deeplab"`` (the official DeepLab init, every key
    under ``Scale.``), ``"torchvision"`` (``conv1.weight``, ``layer1.*``, ...), or None."""
    if all(k.startswith("Scale.") for k in state):
        return "deeplab"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return "torchvision"
    return None


def backbone_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ResNet file's tensors under this backbone's names: the DeepLab init loses its ``Scale.`` prefix
    and its ``layer5`` head, torchvision's ImageNet ``fc`` is dropped."""
    if resnet_layout(state) == "deeplab":
        state = {k[len("Scale."):]: v for k, v in state.items() if not k.startswith("Scale.layer5.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def resnet_depth(backbone: dict[str, torch.Tensor]) -> int | None:
    """50 or 101 from the layer3 blocks of :func:`backbone_tensors`, or None for another net."""
    return RESNET_DEPTHS.get(_count_blocks(backbone, "layer3"))


def backbone_state_dict(model: DeepLabV2) -> dict[str, torch.Tensor]:
    """The model's backbone entries (what a pretrained file fills)."""
    return {k: v for k, v in model.state_dict().items() if k.split(".")[0] in BACKBONE_MODULES}


def check_backbone_tensors(model: DeepLabV2, backbone: dict[str, torch.Tensor], path: Path) -> None:
    """:func:`backbone_tensors` of ``path`` cover ``model``'s backbone exactly, or one DigaError line."""

    def problem(detail: str) -> DigaError:
        found = _count_blocks(backbone, "layer3")
        hint = ""
        if found != BLOCKS[model.depth][2]:
            kind = {6: "ResNet-50", 23: "ResNet-101"}.get(found, f"a net with {found} layer3 blocks")
            hint = f" (the file looks like {kind}; {model.arch} needs ResNet-{model.depth})"
        return DigaError(f"{path} does not fit {model.arch}{hint}: {detail}")

    check_state_dict(backbone, backbone_state_dict(model), problem, optional=("num_batches_tracked",))


def load_backbone_weights(model: DeepLabV2, path: str | Path) -> None:
    """Load a local torchvision-named ResNet state dict into ``model``'s backbone, strictly."""
    path = Path(path)
    if not path.is_file():
        raise DigaError(f"pretrained weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that is no state dict, a text file, a truncated download, ...
        raise DigaError(f"{path} is not a PyTorch state dict of tensors ({torch_load_error(exc)})") from None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DigaError(f"{path} is not a ResNet state dict (expected a dict of name -> tensor)")
    # Anything but the DeepLab init is read as torchvision's (check_backbone_tensors names what is off);
    # the Caffe-converted DeepLab checkpoint reads Caffe BGR input as this model does.
    torchvision = resnet_layout(state) != "deeplab"
    state = backbone_tensors(state)
    check_backbone_tensors(model, state, path)

    if torchvision:
        state = fold_torchvision_input(state)
    with torch.no_grad():
        for key, tensor in backbone_state_dict(model).items():
            if key in state:
                tensor.copy_(state[key])


def fold_torchvision_input(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ResNet's conv1 reads RGB ``u_c = (x_c - m_c) / s_c`` (ImageNet mean and std, x in
    [0, 1]); this model feeds it Caffe BGR ``z_(2-c) = (255 x_c - M_c) / 128``. So
    ``u_c = a_c z_(2-c) + d_c`` with ``a_c = 128 / (255 s_c)`` and ``d_c = (M_c / 255 - m_c) / s_c``:
    the channel order and the scale ``a_c`` fold into conv1's weights, and the constant ``d_c`` gives
    each output channel o of conv1 the offset ``k_o = sum_c d_c sum_(kh,kw) W[o, c]``, which moves into
    bn1's running mean (``bn1(y + k)`` with mean ``mu`` = ``bn1(y)`` with mean ``mu - k``; in training
    mode batch statistics remove it anyway). Exact except within conv1's 3-pixel padding at the image
    border, where zero padding means a different colour in the two normalisations."""
    weight = state["conv1.weight"].double()
    caffe_rgb = torch.tensor(CAFFE_MEAN_BGR[::-1], dtype=torch.float64)
    mean, std = torch.tensor(IMAGENET_MEAN_RGB, dtype=torch.float64), torch.tensor(IMAGENET_STD_RGB, dtype=torch.float64)
    scale, offset = CAFFE_SCALE / (255.0 * std), (caffe_rgb / 255.0 - mean) / std
    folded = dict(state)
    folded["conv1.weight"] = (weight * scale.view(1, 3, 1, 1)).flip(1).to(state["conv1.weight"].dtype)
    shift = (weight.sum((2, 3)) * offset.view(1, 3)).sum(1)
    folded["bn1.running_mean"] = (state["bn1.running_mean"].double() - shift).to(state["bn1.running_mean"].dtype)
    return folded
