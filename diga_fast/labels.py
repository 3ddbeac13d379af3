"""The label vocabulary every layer shares: the classes a model predicts (label spaces, with their
names, Cityscapes label ids and palette) and the ignore index. Reading a dataset's own ids into a
label space is data's business (:mod:`diga_fast.data.labels`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diga_fast.errors import DigaError

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
    try:
        return LABEL_SPACES[name]
    except KeyError:
        raise DigaError(f"unknown label space {name!r}; choose from {', '.join(LABEL_SPACES)}") from None
