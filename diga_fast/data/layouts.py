"""Write samples in the folder layouts of the real datasets, so that ``diga data synth --out DIR``
and the tests can produce data that the real loaders (:mod:`diga_fast.data.datasets`) read back.

Samples carry labels as *class indices* of a label space (255 = ignore); each writer stores them the
way the real dataset does: Cityscapes label ids for GTA5 (a palette PNG, as in the GTA5 release) and
Cityscapes, SYNTHIA ids in the first channel of a 16-bit RGB PNG for SYNTHIA (written with OpenCV, the
optional ``synthia`` extra, as Pillow cannot). Ignore (255), and any class the target format lacks, is
written as id 0 ("unlabeled"/"void"), which reads back as 255.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from diga_fast.data.datasets import require_opencv
from diga_fast.labels import CITYSCAPES19, SYNTHIA16, LabelSpace
from diga_fast.data.labels import SYNTHIA_MAX_ID, synthia_id_lut

__all__ = [
    "write_png",
    "write_gta5_layout",
    "write_cityscapes_layout",
    "write_synthia_layout",
    "synthia_id_from_class",
]


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``[H, W]`` or ``[H, W, C]`` (C = 1..4: grey, grey+alpha, RGB, RGBA) uint8 or uint16 as a PNG
    of that bit depth. Pillow writes 8-bit images and 16-bit grey; 16-bit RGB/RGBA, which Pillow
    cannot write, go through OpenCV (an optional dependency, see :func:`require_opencv`)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    channels = 1 if array.ndim == 2 else array.shape[-1]
    wide = array.dtype == np.uint16
    if (array.ndim not in (2, 3) or not 1 <= channels <= 4 or array.dtype not in (np.uint8, np.uint16)
            or (wide and channels == 2)):
        raise ValueError(f"write_png takes [H, W(, 1..4)] uint8 or [H, W(, 1, 3, 4)] uint16, "
                         f"got {array.shape} {array.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not wide or channels == 1:
        Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
        return
    cv2 = require_opencv(f"writing the 16-bit PNG {path}")
    ok, data = cv2.imencode(".png", np.ascontiguousarray(array[:, :, [2, 1, 0, 3][:channels]]))  # BGR(A)
    if not ok:
        raise ValueError(f"OpenCV could not encode {path}")
    path.write_bytes(data.tobytes())


def _check(name: str, image: np.ndarray, label: np.ndarray | None) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"sample {name!r}: image must be [H, W, 3] uint8, "
                         f"got {image.shape} {image.dtype}")
    if label is not None and label.shape != image.shape[:2]:
        raise ValueError(f"sample {name!r}: label {label.shape} does not match image {image.shape[:2]}")


def _save_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path)


def _cityscapes_palette() -> list[int]:
    """A 256-entry palette indexed by Cityscapes label id (class colours; other ids black)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[list(CITYSCAPES19.label_ids)] = CITYSCAPES19.palette
    return palette.reshape(-1).tolist()


def write_gta5_layout(root: str | os.PathLike, samples: Iterable[tuple[str, np.ndarray, np.ndarray]],
                      label_space: LabelSpace = CITYSCAPES19) -> list[str]:
    """Write ``(name, image [H,W,3] uint8, class-index label [H,W] uint8)`` samples as
    ``root/images/NAME.png`` and ``root/labels/NAME.png`` (Cityscapes label ids in a palette PNG, like
    the GTA5 release). Returns the names."""
    root = Path(root)
    to_ids = label_space.train_id_to_label_id()
    palette = _cityscapes_palette()
    names = []
    for name, image, label in samples:
        _check(name, image, label)
        _save_rgb(root / "images" / f"{name}.png", image)
        ids = Image.fromarray(to_ids[np.asarray(label, dtype=np.uint8)])
        ids.putpalette(palette)  # "L" -> "P": pixel values stay the label ids
        (root / "labels").mkdir(parents=True, exist_ok=True)
        ids.save(root / "labels" / f"{name}.png")
        names.append(name)
    return names


def write_cityscapes_layout(root: str | os.PathLike, split: str, samples: Iterable[tuple],
                            city: str = "synthcity",
                            label_space: LabelSpace = CITYSCAPES19) -> list[str]:
    """Write samples as ``root/leftImg8bit/SPLIT/CITY/CITY_SEQ_000019_leftImg8bit.png`` with
    ``root/gtFine/SPLIT/CITY/..._gtFine_labelIds.png`` (Cityscapes label ids) and
    ``..._gtFine_color.png`` (for viewing). A sample is ``(image, label)`` or ``(name, image,
    label)``; Cityscapes file names follow a fixed pattern, so a given name is not used: SEQ is the
    running index (6 digits) and the frame is 000019 (the annotated frame of real sequences).
    ``label`` may be None (no gtFine files, like an unlabelled split). Returns the dataset names
    (``CITY/CITY_SEQ_000019``)."""
    root = Path(root)
    to_ids = label_space.train_id_to_label_id()
    image_dir = root / "leftImg8bit" / split / city
    label_dir = root / "gtFine" / split / city
    names = []
    for seq, sample in enumerate(samples):
        image, label = sample[-2], sample[-1]
        stem = f"{city}_{seq:06d}_{19:06d}"
        _check(stem, image, label)
        _save_rgb(image_dir / f"{stem}_leftImg8bit.png", image)
        if label is not None:
            label = np.asarray(label, dtype=np.uint8)
            label_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_ids[label]).save(label_dir / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(label_space.colorize(label)).save(label_dir / f"{stem}_gtFine_color.png")
        names.append(f"{city}/{stem}")
    return names


def synthia_id_from_class(label_space: LabelSpace = SYNTHIA16) -> np.ndarray:
    """uint16 lookup table, class index of ``label_space`` (0..255) -> SYNTHIA id, by class name;
    255 and classes SYNTHIA lacks (terrain, truck, train) -> 0 (void)."""
    inverse = np.zeros(256, dtype=np.uint16)
    for synthia_id, index in enumerate(synthia_id_lut(label_space)[: SYNTHIA_MAX_ID + 1]):
        if index != 255:
            inverse[index] = synthia_id
    return inverse


def write_synthia_layout(root: str | os.PathLike, samples: Iterable[tuple[str, np.ndarray, np.ndarray]],
                         label_space: LabelSpace = SYNTHIA16) -> list[str]:
    """Write ``(name, image, class-index label)`` samples as ``root/RGB/NAME.png`` and
    ``root/GT/LABELS/NAME.png``: a 16-bit RGB PNG whose first channel is the SYNTHIA class id (the
    second, the instance id in the real data, and the third are 0). Returns the names."""
    root = Path(root)
    to_ids = synthia_id_from_class(label_space)
    names = []
    for name, image, label in samples:
        _check(name, image, label)
        _save_rgb(root / "RGB" / f"{name}.png", image)
        ids = np.zeros((*label.shape, 3), dtype=np.uint16)
        ids[:, :, 0] = to_ids[np.asarray(label, dtype=np.uint8)]
        write_png(root / "GT" / "LABELS" / f"{name}.png", ids)
        names.append(name)
    return names
