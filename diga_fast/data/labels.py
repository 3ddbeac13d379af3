"""Label spaces: class names, the Cityscapes palette, and the official id -> train-id maps.

Cityscapes label ids (0..33, as in ``*_gtFine_labelIds.png`` and the GTA5 label PNGs) map to the 19
train ids of the Cityscapes benchmark; SYNTHIA-RAND-CITYSCAPES ids map to its 16 classes. Every id
that is not a class becomes ``IGNORE_INDEX`` (255). Ids outside a map's range are an error: they mean
the file is not a label map of that kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255

# (name, Cityscapes label id, colour) of the 19 train-id classes, in train-id order.
_CITYSCAPES19 = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
# Cityscapes label ids run 0..33 (-1 "license plate" is never written to labelIds PNGs).
CITYSCAPES_MAX_ID = 33

# SYNTHIA-RAND-CITYSCAPES GT/LABELS id -> class name (the official SYNTHIALoader map).
_SYNTHIA_IDS = {
    3: "road", 4: "sidewalk", 2: "building", 21: "wall", 5: "fence", 7: "pole",
    15: "traffic light", 9: "traffic sign", 6: "vegetation", 1: "sky", 10: "person",
    17: "rider", 8: "car", 19: "bus", 12: "motorcycle", 11: "bicycle",
}
SYNTHIA_MAX_ID = 22  # SYNTHIA-RAND-CITYSCAPES uses ids 0..22


@dataclass(frozen=True)
class LabelSpace:
    """The classes a model predicts. ``label_ids[k]`` is the Cityscapes label id of class k (used to
    read Cityscapes/GTA5 label PNGs and to write label-id predictions)."""

    name: str
    classes: tuple[str, ...]
    label_ids: tuple[int, ...]
    palette: np.ndarray = field(repr=False, compare=False)
    eval_subsets: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def cityscapes_id_lut(self) -> np.ndarray:
        """uint8 lookup table, Cityscapes label id (0..255) -> class index or 255."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for k, label_id in enumerate(self.label_ids):
            lut[label_id] = k
        return lut

    def train_id_to_label_id(self) -> np.ndarray:
        """uint8 lookup table, class index (0..255) -> Cityscapes label id (255 -> 0, 'unlabeled')."""
        lut = np.zeros(256, dtype=np.uint8)
        lut[: self.num_classes] = self.label_ids
        return lut

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """[H, W] class indices -> [H, W, 3] uint8 colours (ignore and unknown -> black)."""
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: self.num_classes] = self.palette
        return table[labels.astype(np.uint8)]


def _space(name: str, names: tuple[str, ...], eval_subsets: dict[str, tuple[str, ...]]) -> LabelSpace:
    by_name = {n: (i, c) for n, i, c in _CITYSCAPES19}
    return LabelSpace(
        name=name,
        classes=names,
        label_ids=tuple(by_name[n][0] for n in names),
        palette=np.array([by_name[n][1] for n in names], dtype=np.uint8),
        eval_subsets={k: tuple(names.index(n) for n in v) for k, v in eval_subsets.items()},
    )


_NAMES19 = tuple(n for n, _, _ in _CITYSCAPES19)
_NAMES16 = tuple(n for n in _NAMES19 if n not in ("terrain", "truck", "train"))
_NAMES13 = tuple(n for n in _NAMES16 if n not in ("wall", "fence", "pole"))

CITYSCAPES19 = _space("cityscapes19", _NAMES19, {"mIoU19": _NAMES19})
SYNTHIA16 = _space("synthia16", _NAMES16, {"mIoU16": _NAMES16, "mIoU13": _NAMES13})

LABEL_SPACES = {space.name: space for space in (CITYSCAPES19, SYNTHIA16)}


def get_label_space(name: str) -> LabelSpace:
    from diga_fast.errors import DigaError

    try:
        return LABEL_SPACES[name]
    except KeyError:
        raise DigaError(f"unknown label space {name!r}; choose from {', '.join(LABEL_SPACES)}") from None


def synthia_id_lut(space: LabelSpace = SYNTHIA16) -> np.ndarray:
    """int lookup table, SYNTHIA label id (0..SYNTHIA_MAX_ID) -> class index of ``space`` or 255."""
    lut = np.full(SYNTHIA_MAX_ID + 1, IGNORE_INDEX, dtype=np.uint8)
    for synthia_id, class_name in _SYNTHIA_IDS.items():
        if class_name in space.classes:
            lut[synthia_id] = space.classes.index(class_name)
    return lut


def train_id_lut(space: LabelSpace = CITYSCAPES19) -> np.ndarray:
    """uint8 lookup table, Cityscapes train id (0..18; 255 = ignore) -> class index of ``space`` (by class
    name) or 255: how labels stored in train ids (BDD100K, mapped Mapillary, a ``folder``) reach a label
    space. Every value above 18 maps to 255; callers check that only 0..18 and 255 occur."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, name in enumerate(_NAMES19):
        if name in space.classes:
            lut[train_id] = space.classes.index(name)
    return lut


MAPILLARY_FILE = "mapillary_vistas_v1.2.csv"  # package data of diga_fast.data, its source named inside
MAPILLARY_MAX_ID = 65  # Vistas v1.2: 66 classes, ids 0..65 (65 = void--unlabeled)


def mapillary_rows() -> list[tuple[int, str, int]]:
    """``(Mapillary id, class name, Cityscapes train id or 255)`` for the 66 Vistas v1.2 classes, read from
    the package data file :data:`MAPILLARY_FILE` (``#`` lines are its comments)."""
    from importlib.resources import files

    text = files("diga_fast.data").joinpath(MAPILLARY_FILE).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows = []
    for line in lines[1:]:  # lines[0] is the header: id,name,train_id
        mapillary_id, name, train_id = line.split(",")
        rows.append((int(mapillary_id), name, int(train_id)))
    return rows


def mapillary_lut(space: LabelSpace = CITYSCAPES19) -> np.ndarray:
    """uint8 lookup table, Mapillary Vistas v1.2 id (0..65) -> class index of ``space`` or 255."""
    to_space = train_id_lut(space)
    lut = np.full(MAPILLARY_MAX_ID + 1, IGNORE_INDEX, dtype=np.uint8)
    for mapillary_id, _, train_id in mapillary_rows():
        lut[mapillary_id] = to_space[train_id]
    return lut
