"""Segmentation networks. ``build_model(arch, num_classes, pretrained=None)`` is the one entry point."""

from __future__ import annotations

from diga_fast.config import ARCHS
from diga_fast.errors import DigaError
from diga_fast.models.base import SegmentationModel, upsample_to


def build_model(arch: str, num_classes: int, pretrained: str | None = None) -> SegmentationModel:
    """``pretrained`` is a local ImageNet file: a torchvision ResNet state dict (deeplabv2) or a MiT
    encoder (daformer_mitb*, the SegFormer release or Hugging Face layout); nothing is fetched."""
    if arch == "small":
        from diga_fast.models.small import SmallSegNet

        if pretrained:
            raise DigaError("--pretrained applies to the deeplabv2 and daformer models; 'small' trains from scratch")
        return SmallSegNet(num_classes)
    if arch in ("deeplabv2_r50", "deeplabv2_r101"):
        from diga_fast.models.deeplabv2 import DeepLabV2

        return DeepLabV2(depth=int(arch[-3:].lstrip("r")), num_classes=num_classes, pretrained=pretrained)
    if arch.startswith("daformer_mit") and arch in ARCHS:
        from diga_fast.models.daformer import DAFormer

        return DAFormer(variant=arch.removeprefix("daformer_mit"), num_classes=num_classes, pretrained=pretrained)
    raise DigaError(f"unknown model {arch!r}; choose from {', '.join(ARCHS)}")


__all__ = ["ARCHS", "SegmentationModel", "build_model", "upsample_to"]
