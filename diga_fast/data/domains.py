"""More domains: BDD100K and Mapillary Vistas (the paper's generalisation table), ACDC and Dark Zurich
(the adverse-condition targets of the DAFormer family), and ``folder:ROOT`` (a user's own camera).

Folder layouts are those of the official downloads:

* ``bdd100k:ROOT`` (the 10k semantic-segmentation subset): ``images/10k/{train,val,test}/NAME.jpg``,
  ``labels/sem_seg/masks/{train,val}/NAME.png`` holding Cityscapes train ids (0..18, 255 = ignore).
* ``mapillary:ROOT`` (Vistas v1.2): ``{training,validation,testing}/images/NAME.jpg``,
  ``{training,validation}/v1.2/labels/NAME.png`` holding the 66 Vistas ids (palette indices), mapped to
  the 19 Cityscapes classes by the package data file ``mapillary_vistas_v1.2.csv`` (its source is named
  inside). Vistas images come in many sizes, most far above Cityscapes': every image (and its label,
  nearest) is read with its shorter side scaled down to :attr:`Mapillary.SHORT_SIDE` (1024, aspect
  kept; smaller images are kept as they are), so evaluation runs at that size.
* ``acdc:ROOT``: ``rgb_anon/{fog,night,rain,snow}/{train,val,test}/SEQ/SEQ_frame_N_rgb_anon.png`` with
  ``gt/{cond}/{train,val}/SEQ/SEQ_frame_N_gt_labelIds.png`` (Cityscapes label ids); ``?cond=night``
  keeps some conditions (default: all four, a condition whose folder is missing is left out); ``test``
  has no labels (the benchmark withholds them) but serves as an unlabelled target (``?train=test``).
* ``darkzurich:ROOT``: ``rgb_anon/{train,val,test}/{night,twilight,day}/SEQ/*_rgb_anon.png`` with the
  val labels ``gt/val/night/SEQ/*_gt_labelIds.png``; every split reads its ``night`` images (the
  adaptation target of Cityscapes -> Dark Zurich).
* ``folder:ROOT``: ``images/[SPLIT/]**`` (any image type, sub-folders kept in the names), optional
  labels ``labels/[SPLIT/]NAME.png`` and ``labels.yaml`` saying what the label values are (see
  :func:`read_folder_label_map`). With ``images/train``, ``images/val`` or ``images/test`` present, each
  split reads its own sub-folder; without them, every split is the whole ``images/`` folder.

Every label ends as class indices of the run's label space via Cityscapes train ids
(:func:`diga_fast.data.labels.train_id_lut`), so a 16-class (SYNTHIA) model is evaluated on its classes.
A label value outside what its format allows stops with one line naming the file and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import yaml
from PIL import Image

from diga_fast.data import ACDC_CONDITIONS, DatasetSpec
from diga_fast.data.datasets import (
    CITYSCAPES_MAX_ID,
    ImageFolder,
    Sample,
    SegmentationDataset,
    _images_in,
    _require_dir,
    _sequence_frames,
    read_png,
)
from diga_fast.labels import CITYSCAPES19, IGNORE_INDEX, LabelSpace
from diga_fast.data.labels import MAPILLARY_MAX_ID, mapillary_lut, train_id_lut
from diga_fast.data.transforms import _resize_image, _resize_label
from diga_fast.errors import DigaError
from diga_fast.utils.io import parse_yaml

__all__ = ["ACDC", "BDD100K", "DarkZurich", "LabelledFolder", "Mapillary", "build_domain", "read_folder_label_map"]

SPLITS = ("train", "val", "test")
TRAIN_IDS = 19  # Cityscapes train ids 0..18


def _check_split(kind: str, split: str, with_labels: bool, labelled: tuple[str, ...] = ("train", "val")) -> None:
    if split not in SPLITS:
        raise DigaError(f"unknown {kind} split {split!r}; choose {', '.join(SPLITS)}")
    if with_labels and split not in labelled:
        use = "serves as an unlabelled target with ?train=test" if split == "test" else "is the unlabelled target"
        raise DigaError(f"{kind}'s {split} split has no labels: evaluate on {' or '.join(labelled)} ({split} {use})")


def _single_channel(path: Path, what: str) -> np.ndarray:
    ids = read_png(path)
    if ids.ndim != 2:
        raise DigaError(f"label {path} has {ids.shape[2]} channels; expected a single-channel PNG of {what}")
    return ids


def _check_train_ids(ids: np.ndarray, path: Path) -> np.ndarray:
    """``ids`` when every value is a Cityscapes train id (0..18) or 255, else one line naming the file."""
    bad = ids[(ids >= TRAIN_IDS) & (ids != IGNORE_INDEX)]
    if bad.size:
        raise DigaError(f"label {path} has value {int(bad.max())}, not a Cityscapes train id 0..{TRAIN_IDS - 1} "
                        f"or {IGNORE_INDEX}")
    return ids


def _flat_samples(kind: str, images: Path, labels: Path | None) -> list[Sample]:
    """One sample per image directly in ``images``; its label ``labels/STEM.png`` must exist."""
    found = _images_in(images)
    if not found:
        raise DigaError(f"no images in {images}")
    samples = []
    for stem, image in found.items():
        label = None if labels is None else labels / f"{stem}.png"
        if label is not None and not label.is_file():
            raise DigaError(f"{kind} image {image} has no label file {label}")
        samples.append(Sample(stem, image, label))
    return samples


class BDD100K(SegmentationDataset):
    """BDD100K's 10k semantic-segmentation subset (see the module docstring); name = the image stem."""

    kind = "BDD100K"

    def __init__(self, root, split: str = "train", label_space: LabelSpace = CITYSCAPES19, transform=None,
                 with_labels: bool = True):
        root = Path(root)
        _check_split(self.kind, split, with_labels)
        images = _require_dir(root / "images" / "10k" / split,
                              f"BDD100K root {root} has no images/10k/{split}/ folder (the 10k segmentation subset)")
        labels = None
        if with_labels:
            labels = _require_dir(root / "labels" / "sem_seg" / "masks" / split,
                                  f"BDD100K root {root} has no labels/sem_seg/masks/{split}/ folder")
        super().__init__(_flat_samples(self.kind, images, labels), label_space, transform, with_labels)
        self.root, self.split = root, split
        self._lut = train_id_lut(label_space)

    def read_label(self, path: Path) -> np.ndarray:
        return self._lut[_check_train_ids(_single_channel(path, "train ids"), path)]


class Mapillary(SegmentationDataset):
    """Mapillary Vistas v1.2 (see the module docstring); name = the image stem. Read at shorter side
    :attr:`SHORT_SIDE` (``short_side=None`` keeps every image as stored)."""

    kind = "Mapillary"
    FOLDERS: ClassVar[dict[str, str]] = {"train": "training", "val": "validation", "test": "testing"}
    SHORT_SIDE = 1024

    def __init__(self, root, split: str = "train", label_space: LabelSpace = CITYSCAPES19, transform=None,
                 with_labels: bool = True, short_side: int | None = SHORT_SIDE):
        root = Path(root)
        _check_split(self.kind, split, with_labels)
        folder = self.FOLDERS[split]
        images = _require_dir(root / folder / "images", f"Mapillary root {root} has no {folder}/images/ folder")
        labels = None
        if with_labels:
            labels = _require_dir(root / folder / "v1.2" / "labels",
                                  f"Mapillary root {root} has no {folder}/v1.2/labels/ folder (Vistas v1.2 labels)")
        super().__init__(_flat_samples(self.kind, images, labels), label_space, transform, with_labels)
        self.root, self.split, self.short_side = root, split, short_side
        self._lut = mapillary_lut(label_space)

    def read_label(self, path: Path) -> np.ndarray:
        ids = _single_channel(path, "Mapillary Vistas ids")
        self._check_ids(ids, path, MAPILLARY_MAX_ID, "Mapillary Vistas v1.2")
        return self._lut[ids]

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image, label = super().read(index)
        height, width = image.shape[:2]
        if self.short_side is None or min(height, width) <= self.short_side:
            return image, label
        factor = self.short_side / min(height, width)
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        return _resize_image(image, size, Image.Resampling.BILINEAR), _resize_label(label, size)


class _AnonymisedFrames(SegmentationDataset):
    """ACDC and Dark Zurich: ``rgb_anon/.../SEQ/STEM_rgb_anon.png`` with labels
    ``gt/.../SEQ/STEM_gt_labelIds.png`` (Cityscapes label ids), one folder per (condition, split);
    name = ``CONDITION/SEQ/STEM``. Subclasses say where the folders of a condition and split are."""

    IMAGE_SUFFIX, LABEL_SUFFIX = "_rgb_anon.png", "_gt_labelIds.png"
    CONDITIONS: tuple[str, ...] = ()

    def folders(self, condition: str, split: str) -> tuple[str, str]:
        """The image and label folders of ``condition`` and ``split``, relative to the root."""
        raise NotImplementedError

    def __init__(self, root, split, label_space, transform, with_labels, conditions, labelled):
        root = Path(root)
        _check_split(self.kind, split, with_labels, labelled)
        if not root.is_dir():
            raise DigaError(f"{self.kind} root {root} does not exist or is not a folder")
        samples = []
        for condition in self._present(root, split, conditions):
            image_dir, label_dir = (root / f for f in self.folders(condition, split))
            if with_labels:
                _require_dir(label_dir, f"{self.kind} root {root} has images in {image_dir} but no labels folder {label_dir}")
            for sequence, stem in _sequence_frames(image_dir, self.IMAGE_SUFFIX):
                image = image_dir / sequence / f"{stem}{self.IMAGE_SUFFIX}"
                label = label_dir / sequence / f"{stem}{self.LABEL_SUFFIX}" if with_labels else None
                if label is not None and not label.is_file():
                    raise DigaError(f"{self.kind} image {image} has no label file {label}")
                samples.append(Sample(f"{condition}/{sequence}/{stem}", image, label))
        if not samples:
            raise DigaError(f"no *{self.IMAGE_SUFFIX} images in the sequence folders of {self.kind} {split} under {root}")
        super().__init__(samples, label_space, transform, with_labels)
        self.root, self.split = root, split
        self._lut = label_space.cityscapes_id_lut()

    def _present(self, root: Path, split: str, conditions: tuple[str, ...] | None) -> list[str]:
        """The conditions to read: the named ones (each must exist), or every default one that exists."""
        wanted = conditions or self.CONDITIONS
        present = [c for c in wanted if (root / self.folders(c, split)[0]).is_dir()]
        missing = [c for c in wanted if c not in present]
        if (conditions and missing) or not present:
            folder = self.folders(missing[0], split)[0]
            raise DigaError(f"{self.kind} root {root} has no {folder}/ folder"
                            + ("" if conditions else f" (nor one of the other conditions: {', '.join(wanted)})"))
        return present

    def read_label(self, path: Path) -> np.ndarray:
        return self._lut[self._read_label_ids(path, CITYSCAPES_MAX_ID, "Cityscapes")]


class ACDC(_AnonymisedFrames):
    """ACDC (see the module docstring): ``conditions`` of fog, night, rain, snow (None = all four that
    exist); train and val are labelled, test is not."""

    kind = "ACDC"
    CONDITIONS = ACDC_CONDITIONS

    def __init__(self, root, split: str = "train", label_space: LabelSpace = CITYSCAPES19, transform=None,
                 with_labels: bool = True, conditions: tuple[str, ...] | None = None):
        super().__init__(root, split, label_space, transform, with_labels, conditions, labelled=("train", "val"))

    def folders(self, condition: str, split: str) -> tuple[str, str]:
        return f"rgb_anon/{condition}/{split}", f"gt/{condition}/{split}"


class DarkZurich(_AnonymisedFrames):
    """Dark Zurich (see the module docstring): the night images of each split; only val is labelled."""

    kind = "Dark Zurich"
    CONDITIONS = ("night",)

    def __init__(self, root, split: str = "train", label_space: LabelSpace = CITYSCAPES19, transform=None,
                 with_labels: bool = True):
        super().__init__(root, split, label_space, transform, with_labels, None, labelled=("val",))

    def folders(self, condition: str, split: str) -> tuple[str, str]:
        return f"rgb_anon/{split}/{condition}", f"gt/{split}/{condition}"


def read_folder_label_map(path: Path) -> np.ndarray | None:
    """``folder:ROOT``'s ``labels.yaml``: what the label PNGs' values are.

    ``labels: train_ids`` -- they already are Cityscapes train ids (0..18, 255 = ignore); returns None.
    ``labels: {VALUE: TRAIN_ID, ...}`` -- each value a label PNG may hold (0..65535) and the Cityscapes
    train id (0..18) or 255 (ignore) it stands for; a value the map does not list is an error when read.
    Returns an int32 lookup table over 0..65535, -1 for unlisted values."""
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise DigaError(f"{path} not found: a folder with labels/ needs labels.yaml saying what the label values "
                        "are (labels: train_ids, or labels: {VALUE: TRAIN_ID, ...})") from None
    except (OSError, yaml.YAMLError) as err:
        raise DigaError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if labels == "train_ids":
        return None
    if not isinstance(labels, dict) or not labels:
        raise DigaError(f"{path}: expected 'labels: train_ids' or 'labels:' with a VALUE: TRAIN_ID line per label value")
    lut = np.full(65536, -1, dtype=np.int32)
    for value, train_id in labels.items():
        if not isinstance(value, int) or not 0 <= value <= 65535 or isinstance(value, bool):
            raise DigaError(f"{path}: label value {value!r} is not an integer 0..65535")
        if not isinstance(train_id, int) or isinstance(train_id, bool) or not (
                0 <= train_id < TRAIN_IDS or train_id == IGNORE_INDEX):
            raise DigaError(f"{path}: value {value} maps to {train_id!r}, not a Cityscapes train id "
                            f"0..{TRAIN_IDS - 1} or {IGNORE_INDEX}")
        lut[value] = train_id
    return lut


class LabelledFolder(SegmentationDataset):
    """``folder:ROOT`` (see the module docstring): a user's images, optionally labelled; name = the image's
    path under its split folder, without extension."""

    kind = "folder"

    def __init__(self, root, split: str = "train", label_space: LabelSpace = CITYSCAPES19, transform=None,
                 with_labels: bool = True):
        root = Path(root)
        if split not in SPLITS:
            raise DigaError(f"unknown folder split {split!r}; choose {', '.join(SPLITS)}")
        images = _require_dir(root / "images", f"folder root {root} has no images/ folder (images/[SPLIT/]**)")
        labels = root / "labels"
        if any((images / s).is_dir() for s in SPLITS):
            images = _require_dir(images / split, f"folder root {root} has split folders but no images/{split}/")
            labels = labels / split
        listing = ImageFolder(images)
        self._values: np.ndarray | None = None
        if with_labels:
            _require_dir(labels, f"folder root {root} has no {labels.relative_to(root)}/ folder of label PNGs")
            self._values = read_folder_label_map(root / "labels.yaml")
        samples = []
        for sample in listing.samples:
            label = labels / f"{sample.name}.png" if with_labels else None
            if label is not None and not label.is_file():
                raise DigaError(f"folder image {sample.image} has no label file {label}")
            samples.append(Sample(sample.name, sample.image, label))
        super().__init__(samples, label_space, transform, with_labels)
        self.root, self.split = root, split
        self._lut = train_id_lut(label_space)

    def read_label(self, path: Path) -> np.ndarray:
        values = _single_channel(path, "label values")
        if self._values is None:
            return self._lut[_check_train_ids(values, path)]
        clipped = np.clip(values, 0, 65535)  # an int32 label could hold values beyond the map's range
        train_ids = self._values[clipped]
        unlisted = values[(train_ids < 0) | (clipped != values)]
        if unlisted.size:
            raise DigaError(f"label {path} has value {int(unlisted.min())}, which {self.root / 'labels.yaml'} "
                            "does not map (list it, with 255 to ignore it)")
        return self._lut[train_ids]


def build_domain(spec: DatasetSpec, *, split: str, label_space: LabelSpace, transform=None,
                 with_labels: bool = True) -> SegmentationDataset:
    """The dataset of one of this module's kinds that ``spec`` names, at folder split ``split``."""
    common = {"label_space": label_space, "transform": transform, "with_labels": with_labels}
    if spec.kind == "acdc":
        return ACDC(spec.root, split, conditions=spec.conditions, **common)
    kinds = {"bdd100k": BDD100K, "mapillary": Mapillary, "darkzurich": DarkZurich, "folder": LabelledFolder}
    return kinds[spec.kind](spec.root, split, **common)

