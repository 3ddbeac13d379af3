"""Source images paired with their pre-translated versions (the ``folder`` translator).

A user who translated the source once with an external model (the official DiGA releases GTA5 and
SYNTHIA translated by its CycleGAN; ``diga translate`` writes the same from a ``diga train
translator`` run) points ``translator.folder`` at a folder holding one image per source image, named
after it: ``FOLDER/NAME.png`` (or ``.jpg``/``.jpeg``), ``NAME`` being the source dataset's sample name
(``00001`` for GTA5, sub-folders kept). :func:`write_translated` writes such a folder.

:class:`TranslatedSource` wraps the source dataset and adds ``"translated"`` to each sample. The two
images must stay pixel-aligned with the label, so the translated image goes through the *same*
random crop, rescale and flip: the transform runs on the source image, then again on the
translated image from the same random state (every draw of the transforms comes from torch's global
RNG and depends only on the image size and the label, which are the same). A translated image of
another size but the same aspect ratio is resized to the source's size first; another aspect ratio
is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diga_fast.data.datasets import read_rgb
from diga_fast.errors import DigaError

EXTENSIONS = (".png", ".jpg", ".jpeg")


def _index_folder(folder: Path) -> dict[str, Path]:
    """name (relative path without extension, ``/``-separated) -> file, for every image under ``folder``."""
    found: dict[str, Path] = {}
    for directory, _, files in os.walk(folder):
        for file in files:
            ext = os.path.splitext(file)[1]
            if ext.lower() in EXTENSIONS and not file.startswith("."):
                path = Path(directory) / file
                found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return found


class TranslatedSource(Dataset):
    """``dataset`` (any dataset with ``names``, ``read(i)`` and ``transform``) plus the translated image
    of each sample from ``folder``. Every source sample must have one: missing files are reported
    when the dataset is built, before training starts."""

    def __init__(self, dataset, folder: str | os.PathLike):
        self.dataset = dataset
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DigaError(f"translator.folder {self.folder} does not exist or is not a folder")
        available = _index_folder(self.folder)
        names = dataset.names
        missing = [name for name in names if name not in available]
        if missing:
            raise DigaError(f"translator.folder {self.folder} has no translated image for {len(missing)} of "
                            f"{len(names)} source images, e.g. {missing[0]}.png")
        self._names = names
        self.files = [available[name] for name in names]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __getitem__(self, index: int) -> dict:
        image, label = self.dataset.read(index)
        translated = self._aligned(read_rgb(self.files[index]), image.shape[:2], index)
        item = {"name": self._names[index], "size": torch.tensor(image.shape[:2], dtype=torch.int64)}
        transform = self.dataset.transform
        if transform is not None:
            state = torch.get_rng_state()
            image, new_label = transform(image, label)
            torch.set_rng_state(state)  # replay the same draws on the translated image
            translated, _ = transform(translated, label)
            label = new_label
        item["image"], item["translated"] = _to_tensor(image), _to_tensor(translated)
        if label is not None:
            item["label"] = torch.from_numpy(np.array(label, dtype=np.int64))  # a copy: the read may be read-only
        return item

    def _aligned(self, translated: np.ndarray, size: tuple[int, int], index: int) -> np.ndarray:
        if translated.shape[:2] == size:
            return translated
        (h, w), (th, tw) = size, translated.shape[:2]
        if abs(th * w - tw * h) > 0.01 * h * w:
            raise DigaError(f"translated image {self.files[index]} is {th}x{tw} (HxW) but its source image is "
                            f"{h}x{w}: another aspect ratio, so the labels would not line up")
        return np.asarray(Image.fromarray(translated).resize((w, h), Image.Resampling.BICUBIC))


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


def write_translated(dataset, translate, root: Path, progress=None) -> int:
    """``root/NAME.png`` for every image of ``dataset`` (``dataset.names``, ``dataset.read``), as
    ``translate`` maps it ([H, W, 3] uint8 -> [H, W, 3] uint8). Images already there are kept (each file
    is written atomically), so an interrupted run resumes; returns how many were written.
    ``progress(done, total)`` follows the images."""
    from diga_fast.utils.io import atomic_write

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"cannot create {root}: {err.strerror or err}") from None
    written = 0
    for index, name in enumerate(dataset.names):
        path = root / f"{name}.png"
        if not path.is_file():
            image, _ = dataset.read(index)
            pixels = translate(image)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp, pixels=pixels: Image.fromarray(pixels).save(tmp, format="PNG"))
            written += 1
        if progress is not None:
            progress(index + 1, len(dataset.names))
    return written

