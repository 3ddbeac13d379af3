"""Rare-class sampling (DAFormer, Hoyer et al. CVPR 2022, ``mmseg/datasets/uda_dataset.py``), for any
network: source images that hold rare classes are drawn more often.

Statistics, once per dataset: the pixel count ``n[i, c]`` of every class c in every source label i (as
stored, before any resize; 255 is not a class). Then, over the classes that occur at all,

    f_c = sum_i n[i, c] / sum_{i, c'} n[i, c']          the class's share of the labelled pixels
    p_c = softmax_c((1 - f_c) / T)                       T = ``data.rcs_temperature`` (0.01)

A sample: draw c ~ p, then an image uniformly among those with ``n[i, c] > data.rcs_min_pixels`` (3000),
then its crop; while the crop holds no more than ``rcs_min_pixels * rcs_min_crop_ratio`` (1500) pixels
of c, draw another crop of the same image, at most 10 times (DAFormer's loop). A class that no image
holds more than ``rcs_min_pixels`` of cannot be drawn (DAFormer stops with an assertion there): it is
left out, the others' probabilities renormalised, and a warning names it.

Draws use torch's global RNG, which :class:`~diga_fast.data.loader.SeededSamples` seeds per stream
position, so batches stay a function of (seed, step) and resume exactly. The statistics are cached
as ``rare_class_stats.json`` in the run folder, keyed by the dataset's sample names.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diga_fast.errors import DigaError
from diga_fast.utils.io import atomic_write

STATS_FILE = "rare_class_stats.json"
CROP_RETRIES = 10


def read_label(dataset, index: int) -> np.ndarray:
    """The untransformed label of sample ``index``, without decoding its image where the dataset allows."""
    inner = getattr(dataset, "dataset", dataset)  # TranslatedSource wraps a dataset
    samples = getattr(inner, "samples", None)
    if samples is not None and hasattr(inner, "read_label"):
        return inner.read_label(samples[index].label)
    label = inner.read(index)[1]
    if label is None:
        raise DigaError("data.rare_class_sampling needs labelled source data")
    return label


def class_pixel_counts(dataset, num_classes: int) -> np.ndarray:
    """int64 [N, K]: pixels of each class in each untransformed source label."""
    counts = np.zeros((len(dataset), num_classes), np.int64)
    for i in range(len(dataset)):
        label = read_label(dataset, i)
        counts[i] = np.bincount(label[label < num_classes].ravel(), minlength=num_classes)[:num_classes]
    return counts


def class_probabilities(counts: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(classes that occur, their sampling probabilities softmax((1 - f_c) / T))."""
    totals = counts.sum(0)
    classes = np.flatnonzero(totals)
    freq = torch.from_numpy(totals[classes]).double()
    freq = freq / freq.sum()
    probs = torch.softmax((1.0 - freq) / temperature, dim=0)
    return classes, probs.numpy()


@dataclass
class RareClassStats:
    classes: np.ndarray  # class indices that can be drawn
    probs: np.ndarray  # their probabilities (sum 1)
    images: list[np.ndarray]  # per drawable class: the images with more than min_pixels of it


def rare_class_stats(counts: np.ndarray, temperature: float, min_pixels: int, class_names=None) -> RareClassStats:
    classes, probs = class_probabilities(counts, temperature)
    images = [np.flatnonzero(counts[:, c] > min_pixels) for c in classes]
    keep = np.array([len(i) > 0 for i in images], bool)
    if not keep.any():
        raise DigaError(f"data.rare_class_sampling: no source image holds more than data.rcs_min_pixels={min_pixels} "
                        "pixels of any class; lower data.rcs_min_pixels")
    if not keep.all():
        left_out = [class_names[c] if class_names else str(c) for c in classes[~keep]]
        print(f"data.rare_class_sampling: no source image holds more than {min_pixels} pixels of "
              f"{', '.join(left_out)}; left out of the draws", file=sys.stderr)
    probs = probs[keep] / probs[keep].sum()
    return RareClassStats(classes[keep], probs, [i for i, k in zip(images, keep) if k])


def _names_digest(dataset) -> str:
    names = getattr(dataset, "names", None) or [str(i) for i in range(len(dataset))]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def cached_counts(dataset, num_classes: int, folder: Path | None, spec: str, write: bool = True) -> np.ndarray:
    """:func:`class_pixel_counts`, read from ``folder/rare_class_stats.json`` when it was computed for
    the same dataset (spec, sample names, class count), else computed and written there."""
    key = {"dataset": spec, "names": _names_digest(dataset), "num_images": len(dataset), "num_classes": num_classes}
    path = Path(folder) / STATS_FILE if folder is not None else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return np.asarray(cached["counts"], np.int64).reshape(len(dataset), num_classes)
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache is recomputed
    counts = class_pixel_counts(dataset, num_classes)
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"key": key, "counts": counts.tolist()})
        atomic_write(path, lambda tmp: tmp.write_text(text))
    return counts


class RareClassSampling(Dataset):
    """``dataset`` with every item drawn by rare-class sampling (the index is ignored; the length stays)."""

    def __init__(self, dataset, stats: RareClassStats, min_crop_pixels: float, retries: int = CROP_RETRIES) -> None:
        self.dataset, self.stats = dataset, stats
        self.min_crop_pixels, self.retries = min_crop_pixels, retries
        self._probs = torch.from_numpy(stats.probs)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def names(self) -> list[str]:
        return self.dataset.names

    def draw(self) -> tuple[int, int]:
        """(class, image index), from torch's global RNG."""
        k = int(torch.multinomial(self._probs, 1))
        images = self.stats.images[k]
        return int(self.stats.classes[k]), int(images[int(torch.randint(len(images), ()))])

    def __getitem__(self, index: int) -> dict:
        cls, image = self.draw()
        item = self.dataset[image]
        for _ in range(self.retries):
            if int((item["label"] == cls).sum()) > self.min_crop_pixels:
                break
            item = self.dataset[image]
        return item


def with_rare_class_sampling(dataset, recipe, num_classes: int, folder: Path | None, write: bool = True,
                             class_names=None) -> Dataset:
    """``dataset`` wrapped for rare-class sampling as ``recipe.data`` says (statistics cached in ``folder``)."""
    data = recipe.data
    counts = cached_counts(dataset, num_classes, folder, data.source, write=write)
    stats = rare_class_stats(counts, data.rcs_temperature, data.rcs_min_pixels, class_names)
    return RareClassSampling(dataset, stats, data.rcs_min_pixels * data.rcs_min_crop_ratio)
