"""Write samples in the official folder layouts of the domains of :mod:`diga_fast.data.domains`
(BDD100K, Mapillary Vistas, ACDC, Dark Zurich, ``folder``), so that ``diga data synth`` and the tests
produce files laid out and encoded like the real ones: JPEG images where the real ones are JPEG
(BDD100K, Mapillary, and the ``folder`` layout, as a camera writes them), PNG elsewhere.

A sample is ``(name, image [H, W, 3] uint8, label [H, W] uint8 or None)``, the label in class indices
of ``label_space`` (255 = ignore), None for an unlabelled split. Each writer stores the label the way
its dataset does: Cityscapes train ids (BDD100K), Vistas v1.2 ids in a palette PNG (Mapillary; each
class written as the first Vistas id that maps to it, ignore as 65 "void--unlabeled"), Cityscapes label
ids (ACDC, Dark Zurich, and ``folder`` with a ``labels.yaml`` mapping them to train ids).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from diga_fast.data import ACDC_CONDITIONS
from diga_fast.labels import CITYSCAPES19, IGNORE_INDEX, LabelSpace
from diga_fast.data.labels import MAPILLARY_MAX_ID, mapillary_rows, train_id_lut
from diga_fast.data.layouts import (
    _check,
    _cityscapes_palette,
    _save_rgb,
    write_cityscapes_layout,
    write_gta5_layout,
    write_synthia_layout,
)
from diga_fast.errors import DigaError

__all__ = [
    "write_acdc_layout",
    "write_bdd100k_layout",
    "write_darkzurich_layout",
    "write_folder_layout",
    "write_mapillary_layout",
    "write_target_scene",
]

Samples = Iterable[tuple[str, np.ndarray, np.ndarray | None]]


def _class_to_train_id(label_space: LabelSpace) -> np.ndarray:
    """uint8 lookup table, class index of ``label_space`` (0..255) -> Cityscapes train id (255 -> 255)."""
    inverse = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, index in enumerate(train_id_lut(label_space)[:19]):
        if index != IGNORE_INDEX:
            inverse[index] = train_id
    return inverse


def _save_label(path: Path, ids: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    if palette is not None:
        image.putpalette(palette)  # "L" -> "P": the pixel values stay the ids
    image.save(path)


def _write_flat(samples: Samples, image_dir: Path, label_dir: Path, to_ids: np.ndarray, extension: str,
                palette: list[int] | None = None) -> list[str]:
    """``image_dir/NAME{extension}`` and, for labelled samples, ``label_dir/NAME.png`` = ``to_ids[label]``."""
    names = []
    for name, image, label in samples:
        _check(name, image, label)
        _save_rgb(image_dir / f"{name}{extension}", image)
        if label is not None:
            _save_label(label_dir / f"{name}.png", to_ids[np.asarray(label, dtype=np.uint8)], palette)
        names.append(name)
    return names


def write_bdd100k_layout(root: str | os.PathLike, split: str, samples: Samples,
                         label_space: LabelSpace = CITYSCAPES19) -> list[str]:
    """``root/images/10k/SPLIT/NAME.jpg`` and ``root/labels/sem_seg/masks/SPLIT/NAME.png`` (train ids)."""
    root = Path(root)
    return _write_flat(samples, root / "images" / "10k" / split, root / "labels" / "sem_seg" / "masks" / split,
                       _class_to_train_id(label_space), ".jpg")


def _class_to_mapillary(label_space: LabelSpace) -> np.ndarray:
    """uint8 lookup table, class index -> the first Vistas id mapping to its train id; others -> 65."""
    first: dict[int, int] = {}
    for mapillary_id, _, train_id in mapillary_rows():
        first.setdefault(train_id, mapillary_id)
    to_train = _class_to_train_id(label_space)
    lut = np.full(256, MAPILLARY_MAX_ID, dtype=np.uint8)
    for index, train_id in enumerate(to_train):
        if train_id != IGNORE_INDEX:
            lut[index] = first[int(train_id)]
    return lut


def write_mapillary_layout(root: str | os.PathLike, split: str, samples: Samples,
                           label_space: LabelSpace = CITYSCAPES19) -> list[str]:
    """``root/{training,validation}/images/NAME.jpg`` and ``.../v1.2/labels/NAME.png`` (Vistas ids)."""
    folder = Path(root) / {"train": "training", "val": "validation", "test": "testing"}[split]
    return _write_flat(samples, folder / "images", folder / "v1.2" / "labels", _class_to_mapillary(label_space),
                       ".jpg", palette=_cityscapes_palette())


def _write_frames(samples: Samples, image_dir: Path, label_dir: Path, sequence: str,
                  label_space: LabelSpace) -> list[str]:
    """``image_dir/SEQ/SEQ_frame_NAME_rgb_anon.png`` and ``label_dir/SEQ/..._gt_labelIds.png`` (Cityscapes
    label ids); NAME is the frame number (e.g. ``"000019"``). Returns ``SEQ/SEQ_frame_NAME`` per sample."""
    to_ids = label_space.train_id_to_label_id()
    names = []
    for frame, image, label in samples:
        stem = f"{sequence}_frame_{frame}"
        _check(stem, image, label)
        _save_rgb(image_dir / sequence / f"{stem}_rgb_anon.png", image)
        if label is not None:
            _save_label(label_dir / sequence / f"{stem}_gt_labelIds.png", to_ids[np.asarray(label, dtype=np.uint8)])
        names.append(f"{sequence}/{stem}")
    return names


def write_acdc_layout(root: str | os.PathLike, condition: str, split: str, samples: Samples,
                      sequence: str = "GOPR0001", label_space: LabelSpace = CITYSCAPES19) -> list[str]:
    """``root/rgb_anon/COND/SPLIT/SEQ/..._rgb_anon.png`` with ``root/gt/COND/SPLIT/SEQ/..._gt_labelIds.png``."""
    root = Path(root)
    return _write_frames(samples, root / "rgb_anon" / condition / split, root / "gt" / condition / split, sequence,
                         label_space)


def write_darkzurich_layout(root: str | os.PathLike, split: str, samples: Samples, condition: str = "night",
                            sequence: str = "GOPR0001", label_space: LabelSpace = CITYSCAPES19) -> list[str]:
    """``root/rgb_anon/SPLIT/COND/SEQ/..._rgb_anon.png`` with ``root/gt/SPLIT/COND/SEQ/..._gt_labelIds.png``."""
    root = Path(root)
    return _write_frames(samples, root / "rgb_anon" / split / condition, root / "gt" / split / condition, sequence,
                         label_space)


def _folder_label_map(label_space: LabelSpace) -> dict[int, int]:
    """Cityscapes label id -> train id of every class of ``label_space``, and 0 ("unlabeled") -> 255."""
    to_train = _class_to_train_id(label_space)
    return {0: IGNORE_INDEX, **{label_id: int(to_train[k]) for k, label_id in enumerate(label_space.label_ids)}}


def write_folder_layout(root: str | os.PathLike, split: str, samples: Samples,
                        label_space: LabelSpace = CITYSCAPES19) -> list[str]:
    """``root/images/SPLIT/NAME.jpg``, ``root/labels/SPLIT/NAME.png`` holding Cityscapes label ids, and
    ``root/labels.yaml`` mapping those ids to train ids (as a user describes their own label values)."""
    root = Path(root)
    names = _write_flat(samples, root / "images" / split, root / "labels" / split,
                        label_space.train_id_to_label_id(), ".jpg")
    label_map = root / "labels.yaml"
    if not label_map.is_file():
        text = yaml.safe_dump({"labels": _folder_label_map(label_space)}, sort_keys=False)
        label_map.write_text("# label value (Cityscapes label id) -> Cityscapes train id; 255 = ignore\n" + text)
    return names


def write_target_scene(root: str | os.PathLike, split: str, index: int, image: np.ndarray, label: np.ndarray,
                       label_space: LabelSpace = CITYSCAPES19) -> None:
    """Write one scene of the built-in target domain into ``root/{bdd100k,mapillary,acdc,darkzurich,folder}``
    (``split`` train or val). ACDC spreads the scenes over its four conditions (scene ``index`` goes to
    condition ``index % 4``); the val scenes also serve as the unlabelled test images of ACDC and Dark
    Zurich; the first train scene is also a Dark Zurich day and twilight image (which only the night
    split reads past)."""
    root = Path(root)
    name, frame = f"{index:05d}", f"{index:06d}"
    labelled = [(name, image, label)]
    write_bdd100k_layout(root / "bdd100k", split, labelled, label_space)
    write_mapillary_layout(root / "mapillary", split, labelled, label_space)
    write_folder_layout(root / "folder", split, labelled, label_space)
    condition = ACDC_CONDITIONS[index % len(ACDC_CONDITIONS)]
    write_acdc_layout(root / "acdc", condition, split, [(frame, image, label)], label_space=label_space)
    dark_zurich_label = label if split == "val" else None  # Dark Zurich labels only its val split
    write_darkzurich_layout(root / "darkzurich", split, [(frame, image, dark_zurich_label)], label_space=label_space)
    if split == "val":
        write_acdc_layout(root / "acdc", condition, "test", [(frame, image, None)], label_space=label_space)
        write_darkzurich_layout(root / "darkzurich", "test", [(frame, image, None)], label_space=label_space)
    elif index == 0:
        for other in ("day", "twilight"):
            write_darkzurich_layout(root / "darkzurich", split, [(frame, image, None)], condition=other,
                                    label_space=label_space)


BUILTIN_LAYOUTS = ("gta5", "synthia", "cityscapes", "bdd100k", "mapillary", "acdc", "darkzurich", "folder")

# (height, width) of the real datasets' images, for ``diga data synth --real-sizes``: GTA5's most common
# size, SYNTHIA RAND_CITYSCAPES, Cityscapes (whose size every other target layout then takes).
REAL_SIZES = {"gta5": (1052, 1914), "synthia": (760, 1280), "cityscapes": (1024, 2048)}


def _scene(domain: str, split: str, index: int, seed: int, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """A built-in scene, at ``size`` when given: rendered at the built-in height with that aspect ratio and
    enlarged (bilinear image, nearest label), as fast as the small scene."""
    from diga_fast.data.synthetic import DEFAULT_SIZE, render_scene

    if size is None:
        return render_scene(domain, split, index, seed)
    height = DEFAULT_SIZE[0]
    image, label = render_scene(domain, split, index, seed, (height, round(height * size[1] / size[0])))
    image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    return image, np.asarray(Image.fromarray(label).resize(size[::-1], Image.NEAREST))


def write_builtin_pair(root: Path, train_images: int, val_images: int, seed: int = 0, tick=None,
                       real_sizes: bool = False) -> None:
    """The built-in pair in the real layouts: ``root/gta5`` (the source, GTA5's images/ and labels/ with
    Cityscapes label ids), ``root/synthia`` (the same source scenes as SYNTHIA RAND_CITYSCAPES: RGB/ and
    16-bit GT/LABELS/), ``root/cityscapes`` (the target's train and val splits) and the target scenes in
    every other layout of :data:`BUILTIN_LAYOUTS`; with ``real_sizes``, at :data:`REAL_SIZES`. ``tick(n)``
    after each of the 3·train + val scenes. A folder that already holds one of the layouts is refused."""
    taken = [name for name in BUILTIN_LAYOUTS if (root / name).exists()]
    if taken:
        raise DigaError(f"{root} already holds {', '.join(f'{name}/' for name in taken)}; choose an empty folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"cannot create {root}: {err.strerror or err}") from None
    written = [0]

    def scenes(domain: str, split: str, count: int, layout: str):
        for index in range(count):
            image, label = _scene(domain, split, index, seed, REAL_SIZES[layout] if real_sizes else None)
            if domain == "target":
                write_target_scene(root, split, index, image, label)
            yield f"{index:05d}", image, label
            written[0] += 1
            if tick is not None:
                tick(written[0])

    try:
        write_gta5_layout(root / "gta5", scenes("source", "train", train_images, "gta5"))
        write_synthia_layout(root / "synthia", scenes("source", "train", train_images, "synthia"), CITYSCAPES19)
        write_cityscapes_layout(root / "cityscapes", "train", scenes("target", "train", train_images, "cityscapes"))
        write_cityscapes_layout(root / "cityscapes", "val", scenes("target", "val", val_images, "cityscapes"))
    except OSError as err:
        raise DigaError(f"cannot write the pair into {root}: {err.strerror or err}") from None
