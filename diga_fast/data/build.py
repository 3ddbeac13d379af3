"""The datasets a recipe names, built the same way for every stage: source and target training crops,
the target val split, and the untransformed target train split (pseudo-labels and centroids)."""

from __future__ import annotations

import sys

from torch.utils.data import Dataset

from diga_fast.data import build_dataset
from diga_fast.labels import LabelSpace
from diga_fast.data.transforms import eval_transform, train_transform
from diga_fast.data.translated import TranslatedSource
from diga_fast.config import Recipe
from diga_fast.errors import DigaError


def source_train_dataset(recipe: Recipe, label_space: LabelSpace, translated: bool = False) -> Dataset:
    """Labelled source crops: resize, flip, rescale-and-crop (method.md / official §4.1). With
    ``translated`` and the ``folder`` translator, each sample also carries its pre-translated image,
    cropped and flipped the same way (``"translated"``)."""
    data = recipe.data
    transform = train_transform(
        resize=data.source_resize, crop=data.crop, scale=data.source_scale, flip=True, content_retry=data.content_retry,
        sizes=data.source_sizes,
    )
    dataset = build_dataset(
        data.source, role="source", split="train", label_space=label_space, transform=transform,
        synthetic_images=data.synthetic_train_images, seed=recipe.train.seed, skip_bad=data.skip_bad,
    )
    if getattr(dataset, "skipped", None):
        print(f"data.skip_bad: left out {len(dataset.skipped)} source images whose label has another size "
              f"(first: {dataset.skipped[0]})", file=sys.stderr)
    check_crop(dataset, data.crop, _largest(data.source_sizes) or data.source_resize, data.source_scale, "source")
    if translated and recipe.translator.kind == "folder":
        if not recipe.translator.folder:
            raise DigaError("translator.kind=folder needs translator.folder=DIR (one translated image per source image)")
        dataset = TranslatedSource(dataset, recipe.translator.folder)
    return dataset


def target_transform(recipe: Recipe):
    """The target's training crops: resize (or a size per batch row), flip, rescale-and-crop."""
    data = recipe.data
    return train_transform(resize=data.target_resize, crop=data.crop, scale=data.target_scale, flip=True,
                           content_retry=False, sizes=data.target_sizes)


def target_train_dataset(recipe: Recipe, label_space: LabelSpace) -> Dataset:
    """Unlabelled target training crops (the FDA translator's style images)."""
    data = recipe.data
    transform = target_transform(recipe)
    dataset = build_dataset(
        data.target, role="target", split="train", label_space=label_space, transform=transform,
        with_labels=False, synthetic_images=data.synthetic_train_images, seed=recipe.train.seed,
    )
    check_crop(dataset, data.crop, _largest(data.target_sizes) or data.target_resize, data.target_scale, "target")
    return dataset


def _largest(sizes) -> tuple[int, int] | None:
    return None if not sizes else max(((h, w) for h, w, _ in sizes), key=lambda hw: hw[0] * hw[1])


def check_crop(dataset: Dataset, crop, resize, scale, role: str) -> None:
    """Refuse a crop that no training image can fill on some side, even at the largest rescale (the
    crop would be mostly padding; at 4000x4000 the process runs out of memory). The first image
    stands for the split (the real datasets hold one size each)."""
    height, width = resize if resize is not None else dataset.read(0)[0].shape[:2]
    largest = max(scale) if scale is not None else 1.0
    most = (int(height * largest), int(width * largest))
    if crop[0] > most[0] or crop[1] > most[1]:
        raise DigaError(f"data.crop={list(crop)} is larger than any {role} training image can be "
                        f"({most[0]}x{most[1]} after resize and rescale); choose a crop within that")


def target_val_dataset(recipe: Recipe, label_space: LabelSpace) -> Dataset:
    data = recipe.data
    return build_dataset(
        data.target, role="target", split="val", label_space=label_space, transform=eval_transform(None),
        synthetic_images=data.synthetic_val_images, seed=recipe.train.seed,
    )


def target_images(recipe: Recipe, label_space: LabelSpace) -> Dataset:
    """The target train split without transform (what pseudo-labels and centroids are made on). Its
    ground truth, where the folder has it, only measures the pseudo-labels (never trained on); without
    it (e.g. no ``gtFine/train``) the split loads unlabelled and label quality reports the kept share only."""
    def build(with_labels: bool) -> Dataset:
        return build_dataset(recipe.data.target, role="target", split="train", label_space=label_space, transform=None,
                             with_labels=with_labels, synthetic_images=recipe.data.synthetic_train_images,
                             seed=recipe.train.seed)

    try:
        return build(True)
    except DigaError:
        return build(False)  # raises again if the images themselves are the problem


def eval_target_datasets(recipe: Recipe, label_space: LabelSpace) -> list[tuple[str, Dataset]]:
    """``(spec, val split)`` of each of ``train.eval_targets`` (full size, labelled): the datasets of the
    generalisation table a run reports beside its target."""
    data = recipe.data
    return [(spec, build_dataset(spec, role="target", split="val", label_space=label_space,
                                 transform=eval_transform(None), synthetic_images=data.synthetic_val_images,
                                 seed=recipe.train.seed))
            for spec in recipe.train.eval_targets]
