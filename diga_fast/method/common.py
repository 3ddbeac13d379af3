"""What every training stage builds the same way: its datasets and the target-val evaluation."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from diga_fast.data import build_dataset
from diga_fast.data.labels import LabelSpace
from diga_fast.data.transforms import eval_transform, train_transform
from diga_fast.data.translated import TranslatedSource
from diga_fast.engine.inference import evaluate_model
from diga_fast.engine.recipe import Recipe
from diga_fast.errors import DigaError


def source_train_dataset(recipe: Recipe, label_space: LabelSpace, translated: bool = False) -> Dataset:
    """Labelled source crops: resize, flip, rescale-and-crop (method.md / official §4.1). With
    ``translated`` and the ``folder`` translator, each sample also carries its pre-translated image,
    cropped and flipped the same way (``"translated"``)."""
    data = recipe.data
    transform = train_transform(
        resize=data.source_resize, crop=data.crop, scale=data.source_scale, flip=True, content_retry=data.content_retry
    )
    dataset = build_dataset(
        data.source, role="source", split="train", label_space=label_space, transform=transform,
        synthetic_images=data.synthetic_train_images, seed=recipe.train.seed,
    )
    if translated and recipe.translator.kind == "folder":
        if not recipe.translator.folder:
            raise DigaError("translator.kind=folder needs translator.folder=DIR (one translated image per source image)")
        dataset = TranslatedSource(dataset, recipe.translator.folder)
    return dataset


def target_train_dataset(recipe: Recipe, label_space: LabelSpace, with_labels: bool = False, **kwargs) -> Dataset:
    """Target training crops; unlabelled unless a stage asks for (pseudo-)labels."""
    data = recipe.data
    transform = train_transform(resize=data.target_resize, crop=data.crop, scale=data.target_scale, flip=True,
                                content_retry=False)
    return build_dataset(
        data.target, role="target", split="train", label_space=label_space, transform=transform,
        with_labels=with_labels, synthetic_images=data.synthetic_train_images, seed=recipe.train.seed, **kwargs,
    )


def target_val_dataset(recipe: Recipe, label_space: LabelSpace) -> Dataset:
    data = recipe.data
    return build_dataset(
        data.target, role="target", split="val", label_space=label_space, transform=eval_transform(None),
        synthetic_images=data.synthetic_val_images, seed=recipe.train.seed,
    )


def evaluate_on_target(model, recipe: Recipe, label_space: LabelSpace, device: torch.device) -> dict:
    """Target-val mIoU of ``model`` with the recipe's inference scales (full-size images)."""
    return evaluate_model(
        model, target_val_dataset(recipe, label_space), label_space, device,
        scales=recipe.data.eval_scales, max_images=recipe.data.eval_max_images, bf16=recipe.train.bf16,
    )
