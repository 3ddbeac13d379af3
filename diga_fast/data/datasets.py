"""The real datasets: GTA5, SYNTHIA-RAND-CITYSCAPES, Cityscapes, and a plain folder of images.

Every dataset returns a dict per sample:

* ``"image"``: float32 ``[3, H, W]`` RGB in [0, 1] (after the transform);
* ``"label"``: int64 ``[H, W]`` class indices of the dataset's label space, 255 = ignore (only when
  ``with_labels``);
* ``"name"``: a relative path without extension, unique within the dataset (``"00001"`` for GTA5,
  ``"aachen/aachen_000000_000019"`` for Cityscapes, ``"sub/dir/photo"`` for a folder). Predictions
  are written under the same name, so sub-folders are kept;
* ``"size"``: int64 ``[2]``, the (height, width) of the image as stored, before the transform.

Folder layouts are those of the official code (``docs/diga-official-code.md`` §11.1). Listing checks
(missing folders, no images, an image without a label file, a bad list file) run when a dataset is
built; checks that need the pixels (unreadable files, size mismatch, ids outside the label map) run
when a sample is read, since the datasets are large. Each raises :class:`DigaError` with one line
that names the file or folder.

16-bit PNGs (SYNTHIA's ``GT/LABELS``): Pillow opens 16-bit RGB/RGBA PNGs as 8-bit, keeping only the
high byte of each sample, which throws the class id (the low byte) away. :func:`read_png` reads the bit
depth and colour type from the PNG header and decodes 16-bit colour or grey+alpha PNGs with OpenCV
(optional: ``pip install "diga-fast[synthia]"``, imported only then); every other image, 16-bit grey
included, is read by Pillow, so 8-bit datasets (GTA5, Cityscapes) never need OpenCV.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diga_fast.labels import CITYSCAPES19, IGNORE_INDEX, SYNTHIA16, LabelSpace
from diga_fast.data.labels import CITYSCAPES_MAX_ID, SYNTHIA_MAX_ID, synthia_id_lut
from diga_fast.errors import DigaError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "SegmentationDataset",
    "GTA5",
    "Synthia",
    "Cityscapes",
    "ImageFolder",
    "read_png",
    "require_opencv",
    "read_rgb",
    "to_rgb_uint8",
    "split_names",
    "synthia_to_space_lut",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> ``[H, W, 3]`` uint8 RGB. Conversions: greyscale (``L``, ``1``) is
    repeated over three channels; an alpha channel (``RGBA``, ``LA``, ``PA``) is dropped, colours kept
    as stored; palette images are expanded; 16-bit samples (``I;16*``, and ``I`` taken as 16-bit) keep
    their high byte (``v >> 8``; Pillow does the same for 16-bit RGB PNGs); float images (``F``) are
    taken as [0, 1] when their maximum is <= 1, else as [0, 255]; CMYK/YCbCr go through Pillow's
    ``convert("RGB")``."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(im).astype(np.int64)
        grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32))
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    elif mode in ("L", "1"):
        grey = np.asarray(im.convert("L"))
    else:
        return np.asarray(im.convert("RGB"))
    return np.repeat(grey[:, :, None], 3, axis=2)


# The largest image read (and predicted) in one piece: a 109 KB PNG can declare 13000 x 13000 pixels,
# whose logits alone (19 classes, fp32) take 12.8 GB. 8000 x 6000 (48 MP, a phone photo) fits below it.
MAX_PIXELS = 50_000_000


def too_large(size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image of ``size`` (width, height, from its header) is not read, or None."""
    width, height = size
    if width * height <= max_pixels:
        return None
    return (f"{width}x{height} is {width * height / 1e6:.0f} MP, more than the {max_pixels / 1e6:.0f} MP "
            "read in one piece (resize it first)")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` uint8 RGB (see :func:`to_rgb_uint8` for conversions); one of
    more than :data:`MAX_PIXELS` is refused from its header, before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit below is ours
            im = Image.open(path)
        with im:
            if (why := too_large(im.size)) is not None:
                raise DigaError(f"image {path}: {why}")
            im.load()
            return to_rgb_uint8(im)
    except DigaError:
        raise
    except FileNotFoundError:
        raise DigaError(f"image {path} does not exist") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad file for the user
        raise DigaError(f"cannot read image {path}: {_one_line(error)}") from None


# The channels to take from OpenCV's 16-bit decode (BGR, BGRA, grey+alpha as GGGA), by PNG colour type.
_FROM_OPENCV = {2: [2, 1, 0], 4: [0, 3], 6: [2, 1, 0, 3]}


def require_opencv(purpose: str):
    """Import OpenCV (``cv2``), which only 16-bit colour PNGs need; a missing one is a one-line
    :class:`DigaError` that says how to install it."""
    try:
        import cv2
    except ImportError:
        raise DigaError(f'{purpose} needs OpenCV: pip install "diga-fast[synthia]" '
                        "(or pip install opencv-python-headless)") from None
    return cv2


def _png_colour16(path: Path) -> int | None:
    """The colour type (2 RGB, 4 grey+alpha, 6 RGBA) of a 16-bit PNG with more than one channel,
    read from its header; None for anything else."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[24] == 16:
        return head[25] if head[25] in _FROM_OPENCV else None
    return None


def read_png(path: str | os.PathLike, what: str = "label") -> np.ndarray:
    """Read a PNG (or any Pillow image) at full bit depth, without colour conversion: ``[H, W]`` for
    single-channel and palette images (palette *indices*), ``[H, W, C]`` otherwise (channels in file
    order: grey+alpha, RGB, RGBA); uint8, uint16 (16-bit) or int32 (Pillow mode ``I``). 16-bit PNGs
    with more than one channel need OpenCV (see the module docstring)."""
    path = Path(path)
    try:
        colour = _png_colour16(path)
        if colour is not None:
            cv2 = require_opencv(f"reading the 16-bit {what} {path}")
            array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            if array is None or array.ndim != 3 or array.dtype != np.uint16:
                raise ValueError("OpenCV cannot decode it")
            return np.ascontiguousarray(array[:, :, _FROM_OPENCV[colour]])
        with Image.open(path) as im:
            im.load()
            array = np.asarray(im)
        return array.astype(array.dtype.newbyteorder("=")) if array.dtype.byteorder == ">" else array
    except DigaError:
        raise
    except FileNotFoundError:
        raise DigaError(f"{what} {path} does not exist") from None
    except Exception as error:  # noqa: BLE001
        raise DigaError(f"cannot read {what} {path}: {_one_line(error)}") from None


# --------------------------------------------------------------------------------------------------
# Listing helpers
# --------------------------------------------------------------------------------------------------

def split_names(names: Sequence[str], split: str, val_every: int = 20,
                what: str = "dataset") -> list[str]:
    """Deterministic train/val split of a dataset without an official one (GTA5, SYNTHIA): a name is
    in ``"val"`` when ``crc32(name) % val_every == 0`` (about 1 in ``val_every``), else in
    ``"train"``; ``"all"`` keeps everything. Hashing the name keeps each file on the same side when
    other files are added or removed."""
    if split == "all":
        return list(names)
    if split not in ("train", "val"):
        raise DigaError(f"unknown {what} split {split!r}; choose all, train or val")
    want_val = split == "val"
    return [n for n in names if (zlib.crc32(n.encode()) % val_every == 0) == want_val]


def _require_dir(path: Path, message: str) -> Path:
    if not path.is_dir():
        raise DigaError(message)
    return path


def _pngs_in(folder: Path) -> list[str]:
    """Sorted stems of the ``*.png`` files directly in ``folder`` (hidden files skipped)."""
    with os.scandir(folder) as entries:
        return sorted(e.name[:-4] for e in entries
                      if e.name.lower().endswith(".png") and not e.name.startswith(".") and e.is_file())


def _images_in(folder: Path) -> dict[str, Path]:
    """Stem -> path of the image files (:data:`IMAGE_EXTENSIONS`, any case) directly in ``folder``, sorted
    by stem (hidden files skipped); two files with one stem are an error."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, extension = os.path.splitext(entry.name)
            if extension.lower() in IMAGE_EXTENSIONS and not entry.name.startswith(".") and entry.is_file():
                if stem in found:
                    raise DigaError(f"{found[stem]} and {folder / entry.name} are two images named {stem!r}; keep one")
                found[stem] = folder / entry.name
    return dict(sorted(found.items()))


def _sequence_frames(image_root: Path, suffix: str) -> list[tuple[str, str]]:
    """``(sequence, stem)`` of every ``image_root/SEQUENCE/STEM{suffix}`` (Cityscapes' cities, ACDC's and
    Dark Zurich's recordings), sorted by sequence, then stem."""
    frames = []
    for sequence in sorted(d.name for d in os.scandir(image_root) if d.is_dir()):
        with os.scandir(image_root / sequence) as entries:
            frames += [(sequence, stem) for stem in
                       sorted(e.name[: -len(suffix)] for e in entries if e.name.endswith(suffix))]
    return frames


def _read_list_file(list_file: str | os.PathLike, known: set[str], images: Path) -> list[str]:
    """Ids from a list file such as the official ``train_modified.txt``: one per line, with or
    without a folder and the ``.png`` extension; blank lines and ``#`` comments are skipped."""
    path = Path(list_file)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DigaError(f"cannot read list file {path}: {_one_line(error)}") from None
    names = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        name = Path(entry.split()[0]).name
        if name.lower().endswith(".png"):
            name = name[:-4]
        if name not in known:
            raise DigaError(f"list file {path} line {number}: no image {name}.png in {images}")
        names.append(name)
    if not names:
        raise DigaError(f"list file {path} names no images")
    return names


def synthia_to_space_lut(label_space: LabelSpace = SYNTHIA16) -> np.ndarray:
    """uint8 lookup table SYNTHIA id (0..SYNTHIA_MAX_ID) -> class index of ``label_space``, matched by
    class name; for CITYSCAPES19, terrain, truck and train (absent from SYNTHIA) never occur."""
    return synthia_id_lut(label_space)


class Sample(NamedTuple):
    name: str
    image: Path
    label: Path | None


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

class SegmentationDataset(Dataset):
    """Shared reading, checking and tensor conversion. Subclasses fill ``self.samples`` and
    implement :meth:`read_label` (file -> uint8 class indices, 255 = ignore)."""

    kind = "dataset"
    # Added to pixel-level errors of datasets that take a list file of good ids.
    hint = ""

    def __init__(self, samples: list[Sample], label_space: LabelSpace, transform=None,
                 with_labels: bool = True):
        self.samples = samples
        self.label_space = label_space
        self.transform = transform
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    def read_label(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The untransformed sample: ``[H, W, 3]`` uint8 image, ``[H, W]`` uint8 class indices."""
        sample = self.samples[index]
        image = read_rgb(sample.image)
        if not self.with_labels or sample.label is None:
            return image, None
        label = self.read_label(sample.label)
        if label.shape != image.shape[:2]:
            raise DigaError(
                f"label {sample.label} is {label.shape[0]}x{label.shape[1]} (HxW) but its image "
                f"{sample.image} is {image.shape[0]}x{image.shape[1]}{self.hint}")
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.read(index)
        size = torch.tensor(image.shape[:2], dtype=torch.int64)
        if self.transform is not None:
            image, label = self.transform(image, label)
        item = {  # astype copies: decoded arrays may be read-only, which torch.from_numpy warns about
            "image": torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)).div_(255.0),
            "name": self.samples[index].name,
            "size": size,
        }
        if label is not None:
            item["label"] = torch.from_numpy(label.astype(np.int64))
        return item

    def _check_ids(self, ids: np.ndarray, path: Path, max_id: int, kind: str) -> None:
        if ids.size == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if high > max_id or low < 0:
            bad = high if high > max_id else low
            raise DigaError(f"label {path} has id {bad}, outside the {kind} label ids 0..{max_id}"
                            f"{self.hint}")

    def _read_label_ids(self, path: Path, max_id: int, kind: str) -> np.ndarray:
        ids = read_png(path)
        if ids.ndim != 2:
            raise DigaError(f"label {path} has {ids.shape[2]} channels; expected a single-channel "
                            f"PNG of {kind} label ids")
        self._check_ids(ids, path, max_id, kind)
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.label_space.name})"


class _FlatPairs(SegmentationDataset):
    """``root/<image_dir>/NAME.png`` with labels at ``root/<label_dir>/NAME.png`` (GTA5, SYNTHIA)."""

    image_dir = label_dir = ""
    hint = " (data.skip_bad=true leaves such pairs out; KIND:ROOT?list=FILE keeps only the ids a list names)"

    def __init__(self, root, split, label_space, transform, with_labels, list_file, val_every):
        root = Path(root)
        layout = f"{self.image_dir}/*.png and {self.label_dir}/*.png"
        _require_dir(root, f"{self.kind} root {root} does not exist or is not a folder")
        images = _require_dir(root / self.image_dir,
                              f"{self.kind} root {root} has no {self.image_dir}/ folder "
                              f"(expected {layout})")
        labels = root / self.label_dir
        if with_labels:
            _require_dir(labels, f"{self.kind} root {root} has no {self.label_dir}/ folder "
                                 f"(expected {layout})")
        names = _pngs_in(images)
        if not names:
            raise DigaError(f"no .png images in {images}")
        if list_file is not None:
            names = _read_list_file(list_file, set(names), images)
        names = split_names(names, split, val_every, what=self.kind)
        if not names:
            raise DigaError(f"{self.kind} split {split!r} of {images} is empty")
        if with_labels:
            have = set(_pngs_in(labels))
            for name in names:
                if name not in have:
                    raise DigaError(f"image {images / (name + '.png')} has no label file "
                                    f"{labels / (name + '.png')}")
        samples = [Sample(n, images / f"{n}.png", labels / f"{n}.png" if with_labels else None)
                   for n in names]
        super().__init__(samples, label_space, transform, with_labels)
        self.root = root
        self.skipped: list[str] = []

    def drop_mismatched(self) -> None:
        """Leave out the pairs whose image and label sizes differ (read from the file headers; GTA5 has
        about 6,900 such ids, the ones the official ``train_modified.txt`` leaves out); their names go
        to ``skipped``."""
        def size(path: Path) -> tuple[int, int] | None:
            try:
                with Image.open(path) as handle:
                    return handle.size
            except Exception:  # noqa: BLE001 - an unreadable file fails later with its own message
                return None

        kept = [s for s in self.samples if size(s.image) == size(s.label)]
        self.skipped += [s.name for s in self.samples if s not in kept]
        if not kept:
            raise DigaError(f"every one of the {len(self.samples)} {self.kind} images has a label of another size")
        self.samples = kept


class GTA5(_FlatPairs):
    """GTA5: ``root/images/NAME.png``, ``root/labels/NAME.png`` holding Cityscapes label ids (Pillow
    palette PNGs in the release; greyscale works too). GTA5 has no official val split: ``split`` is
    ``"all"`` or the deterministic ``"train"``/``"val"`` of :func:`split_names`. ``list_file`` keeps
    only the ids it names (e.g. the official ``train_modified.txt``, which leaves out images whose
    label does not match), applied before the split."""

    kind, image_dir, label_dir = "GTA5", "images", "labels"

    def __init__(self, root, split: str = "all", label_space: LabelSpace = CITYSCAPES19,
                 transform=None, with_labels: bool = True, list_file=None, val_every: int = 20):
        super().__init__(root, split, label_space, transform, with_labels, list_file, val_every)
        self._lut = label_space.cityscapes_id_lut()

    def read_label(self, path: Path) -> np.ndarray:
        return self._lut[self._read_label_ids(path, CITYSCAPES_MAX_ID, "Cityscapes")]


class Synthia(_FlatPairs):
    """SYNTHIA-RAND-CITYSCAPES: ``root/RGB/NAME.png``, ``root/GT/LABELS/NAME.png``. Labels are 16-bit
    PNGs whose first channel holds the SYNTHIA class id (0..22); 8-bit and single-channel label PNGs
    are read too. Ids map to ``label_space`` by class name (SYNTHIA16 by default; with CITYSCAPES19 the
    16 SYNTHIA classes land on their 19-class indices). ``split``/``list_file`` as in :class:`GTA5`."""

    kind, image_dir, label_dir = "SYNTHIA", "RGB", "GT/LABELS"

    def __init__(self, root, split: str = "all", label_space: LabelSpace = SYNTHIA16,
                 transform=None, with_labels: bool = True, list_file=None, val_every: int = 20):
        super().__init__(root, split, label_space, transform, with_labels, list_file, val_every)
        self._lut = synthia_to_space_lut(label_space)

    def read_label(self, path: Path) -> np.ndarray:
        ids = read_png(path)
        if ids.ndim == 3:
            ids = ids[:, :, 0]
        self._check_ids(ids, path, SYNTHIA_MAX_ID, "SYNTHIA")
        return self._lut[ids]


class Cityscapes(SegmentationDataset):
    """Cityscapes: ``root/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` with labels
    ``root/gtFine/SPLIT/CITY/*_gtFine_labelIds.png``; name ``CITY/CITY_SEQ_FRAME``.

    ``pseudo_label_dir``: read labels from ``pseudo_label_dir/NAME.png`` instead of gtFine, as uint8
    class indices of ``label_space`` (255 = ignore): the stored probability labels of self-training."""

    kind = "Cityscapes"
    SPLITS = ("train", "val", "test")

    def __init__(self, root, split: str = "train", label_space: LabelSpace = CITYSCAPES19,
                 transform=None, with_labels: bool = True, pseudo_label_dir=None):
        root = Path(root)
        if split not in self.SPLITS:
            raise DigaError(f"unknown Cityscapes split {split!r}; choose {', '.join(self.SPLITS)}")
        _require_dir(root, f"Cityscapes root {root} does not exist or is not a folder")
        image_root = _require_dir(root / "leftImg8bit" / split,
                                  f"Cityscapes root {root} has no leftImg8bit/{split}/ folder")
        use_gt = with_labels and pseudo_label_dir is None
        label_root = root / "gtFine" / split
        if use_gt:
            _require_dir(label_root, f"Cityscapes root {root} has no gtFine/{split}/ folder")
        pseudo_root = Path(pseudo_label_dir) if pseudo_label_dir is not None else None
        if with_labels and pseudo_root is not None:
            _require_dir(pseudo_root, f"pseudo-label folder {pseudo_root} does not exist")
        suffix = "_leftImg8bit.png"
        samples = []
        for city, stem in _sequence_frames(image_root, suffix):
            name = f"{city}/{stem}"
            image = image_root / city / f"{stem}{suffix}"
            label = None
            if use_gt:
                label = label_root / city / f"{stem}_gtFine_labelIds.png"
            elif with_labels:
                label = pseudo_root / f"{name}.png"
            if label is not None and not label.is_file():
                raise DigaError(f"image {image} has no label file {label}")
            samples.append(Sample(name, image, label))
        if not samples:
            raise DigaError(f"no *{suffix} images in the city folders of {image_root}")
        super().__init__(samples, label_space, transform, with_labels)
        self.root, self.split, self.pseudo_label_dir = root, split, pseudo_root
        self._lut = label_space.cityscapes_id_lut()

    def read_label(self, path: Path) -> np.ndarray:
        if self.pseudo_label_dir is None:
            return self._lut[self._read_label_ids(path, CITYSCAPES_MAX_ID, "Cityscapes")]
        labels = read_png(path, what="pseudo-label")
        if labels.ndim != 2:
            raise DigaError(f"pseudo-label {path} has {labels.shape[2]} channels; "
                            "expected one channel of class indices")
        bad = labels[(labels >= self.label_space.num_classes) & (labels != IGNORE_INDEX)]
        if bad.size:
            raise DigaError(f"pseudo-label {path} has value {int(bad.max())}, not a class index "
                            f"0..{self.label_space.num_classes - 1} or {IGNORE_INDEX}")
        return labels.astype(np.uint8)


class ImageFolder(SegmentationDataset):
    """Every image (``IMAGE_EXTENSIONS``, any case) under ``root``, recursively, sorted by relative
    path; hidden files and folders (leading ``.``) are skipped. ``root`` may also be one image file.
    Name = the relative path without extension; two files that differ only in extension are an
    error. Images are converted to RGB uint8 by :func:`to_rgb_uint8`. No labels. ``exclude``: a folder
    under ``root`` not to read (where predictions of these images are written)."""

    kind = "image folder"

    def __init__(self, root, transform=None, label_space: LabelSpace = CITYSCAPES19, exclude=None):
        root = Path(root)
        skip = Path(exclude).resolve() if exclude is not None else None  # e.g. predictions written inside root
        if root.is_file():
            if root.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DigaError(f"{root} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
            files = [(root.stem, root)]
        else:
            _require_dir(root, f"image folder {root} does not exist")
            files = []
            for folder, dirs, names in os.walk(root):
                if skip is not None and Path(folder).resolve() == skip:
                    dirs[:] = []
                    continue
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in names:
                    extension = os.path.splitext(file)[1].lower()
                    if not file.startswith(".") and extension in IMAGE_EXTENSIONS:
                        path = Path(folder) / file
                        files.append((path.relative_to(root).with_suffix("").as_posix(), path))
            files.sort()
            if not files:
                raise DigaError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
            for (a, pa), (b, pb) in zip(files, files[1:]):
                if a == b:
                    raise DigaError(f"{pa} and {pb} would both be named {a!r}; rename one of them")
        super().__init__([Sample(n, p, None) for n, p in files], label_space, transform,
                         with_labels=False)
        self.root = root
