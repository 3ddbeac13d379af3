"""Dataset ids into label spaces: the official Cityscapes id -> train-id map (through
:class:`diga_fast.labels.LabelSpace`), SYNTHIA-RAND-CITYSCAPES ids, Cityscapes train ids (BDD100K,
mapped Mapillary, ``folder``) and Mapillary Vistas v1.2 ids. Every id that is not a class becomes
``IGNORE_INDEX`` (255). Ids outside a map's range are an error: they mean the file is not a label map
of that kind.
"""

from __future__ import annotations

import numpy as np

from diga_fast.labels import CITYSCAPES19, IGNORE_INDEX, SYNTHIA16, LabelSpace

# Cityscapes label ids run 0..33 (-1 "license plate" is never written to labelIds PNGs).
CITYSCAPES_MAX_ID = 33

# SYNTHIA-RAND-CITYSCAPES GT/LABELS id -> class name (the official SYNTHIALoader map).
_SYNTHIA_IDS = {
    3: "road", 4: "sidewalk", 2: "building", 21: "wall", 5: "fence", 7: "pole",
    15: "traffic light", 9: "traffic sign", 6: "vegetation", 1: "sky", 10: "person",
    17: "rider", 8: "car", 19: "bus", 12: "motorcycle", 11: "bicycle",
}
SYNTHIA_MAX_ID = 22  # SYNTHIA-RAND-CITYSCAPES uses ids 0..22


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
    for train_id, name in enumerate(CITYSCAPES19.classes):
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
