"""Joint image/label transforms on numpy arrays (the official ``util/loader/augmentations.py``).

Every transform is called as ``transform(image, label) -> (image, label)`` with ``image`` an
``[H, W, 3]`` uint8 array and ``label`` an ``[H, W]`` uint8 array of class indices (255 = ignore) or
``None``. Geometry is applied to both; images are resampled smoothly, labels with nearest neighbour,
both through PIL. Random draws come from torch's global RNG (``torch.rand``/``torch.randint``), so the
data loader's seeding (``diga_fast.data.loader``) makes every draw reproducible.

Sizes are ``(height, width)`` throughout, as in the recipe; PIL's ``(width, height)`` stays inside
this file.

The official training pipeline is ``resize (bicubic) -> flip -> RandomSized_and_Crop`` with a content
filter that redraws the random part up to 5 times; :func:`train_transform` builds exactly that, and
:func:`eval_transform` the plain resize used for validation and pseudo-labelling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from diga_fast.labels import IGNORE_INDEX

Label = np.ndarray | None
Transform = Callable[[np.ndarray, Label], tuple[np.ndarray, Label]]

__all__ = [
    "Compose",
    "Resize",
    "RandomScaleCrop",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ContentRetry",
    "has_enough_content",
    "train_transform",
    "eval_transform",
]


def _size(size: Sequence[int], what: str) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"{what} must be (height, width) with positive entries, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _resize_image(image: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))


def _resize_label(label: Label, size: tuple[int, int]) -> Label:
    if label is None or label.shape[:2] == size:
        return label
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.Resampling.NEAREST))


def _random_window(image: np.ndarray, label: Label, crop: tuple[int, int]) -> tuple[np.ndarray, Label]:
    """A uniformly placed ``crop`` window of an image at least that large (and of its label)."""
    (h, w), (ch, cw) = image.shape[:2], crop
    top, left = _randint(0, h - ch), _randint(0, w - cw)
    return image[top:top + ch, left:left + cw], (None if label is None else label[top:top + ch, left:left + cw])


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive), from torch's global RNG."""
    return int(torch.randint(low, high + 1, ()).item())


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: Label = None) -> tuple[np.ndarray, Label]:
        for t in self.transforms:
            image, label = t(image, label)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize to a fixed ``(height, width)``: image bicubic, label nearest (the official loaders'
    first step, e.g. GTA5 to 720x1280 or 1052x1914, Cityscapes to 512x1024 or 1024x2048)."""

    def __init__(self, size: Sequence[int]):
        self.size = _size(size, "Resize size")

    def __call__(self, image: np.ndarray, label: Label = None) -> tuple[np.ndarray, Label]:
        image = _resize_image(image, self.size, Image.Resampling.BICUBIC)
        return image, _resize_label(label, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


_batch_row = [0]  # the row of the batch being loaded (set by the loader, see ResizeByRow)


@contextmanager
def at_batch_row(row: int) -> Iterator[None]:
    """Tell row-dependent transforms (:class:`ResizeByRow`) which row of its batch a sample fills."""
    previous, _batch_row[0] = _batch_row[0], row
    try:
        yield
    finally:
        _batch_row[0] = previous


class ResizeByRow:
    """The official loaders' batches of several sizes: ``sizes`` = ((height, width, count), ...) gives
    the first ``count`` rows of a batch the first size, the next rows the next size (e.g. GTA5: 1 image
    at 720x1280 and 2 at 1052x1914). The row comes from the loader (:func:`at_batch_row`)."""

    def __init__(self, sizes: Sequence[Sequence[int]]):
        self.sizes = [Resize((h, w)) for h, w, count in sizes for _ in range(count)]

    def __call__(self, image: np.ndarray, label: Label = None) -> tuple[np.ndarray, Label]:
        return self.sizes[_batch_row[0] % len(self.sizes)](image, label)

    def __repr__(self) -> str:
        return f"ResizeByRow({[r.size for r in self.sizes]})"


class RandomScaleCrop:
    """The official ``RandomSized_and_Crop``: scale height and width *independently* by factors drawn
    from U(scale) (so the aspect ratio changes), image bilinear / label nearest, then take a random
    ``crop`` window. When the rescaled image is smaller than the crop in either dimension, the image
    is stretched to the crop size instead (official behaviour, quirk Q7); this resizes the original
    straight to the crop size, which skips one resampling but is otherwise the same."""

    def __init__(self, crop: Sequence[int], scale: Sequence[float] = (0.7, 1.0)):
        self.crop = _size(crop, "crop size")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
        self.scale = (float(scale[0]), float(scale[1]))

    def __call__(self, image: np.ndarray, label: Label = None) -> tuple[np.ndarray, Label]:
        h, w = image.shape[:2]
        new_w = int(_uniform(*self.scale) * w)
        new_h = int(_uniform(*self.scale) * h)
        ch, cw = self.crop
        if new_h < ch or new_w < cw:
            return (_resize_image(image, self.crop, Image.Resampling.BILINEAR),
                    _resize_label(label, self.crop))
        image = _resize_image(image, (new_h, new_w), Image.Resampling.BILINEAR)
        return _random_window(image, _resize_label(label, (new_h, new_w)), self.crop)

    def __repr__(self) -> str:
        return f"RandomScaleCrop(crop={self.crop}, scale={self.scale})"


class RandomCrop:
    """A random ``(height, width)`` window. An image smaller than the crop is either padded
    (``if_smaller="pad"``, default: image with 0, label with 255 so the padding never counts in a
    loss; padding goes to the bottom/right and the window is then drawn as usual) or stretched to
    the crop size (``if_smaller="resize"``, what the official ``RandomCrop`` does)."""

    def __init__(self, crop: Sequence[int], if_smaller: str = "pad"):
        self.crop = _size(crop, "crop size")
        if if_smaller not in ("pad", "resize"):
            raise ValueError(f"if_smaller must be 'pad' or 'resize', got {if_smaller!r}")
        self.if_smaller = if_smaller

    def __call__(self, image: np.ndarray, label: Label = None) -> tuple[np.ndarray, Label]:
        h, w = image.shape[:2]
        ch, cw = self.crop
        if h < ch or w < cw:
            if self.if_smaller == "resize":
                return (_resize_image(image, self.crop, Image.Resampling.BILINEAR),
                        _resize_label(label, self.crop))
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            if label is not None:
                label = np.pad(label, ((0, ph), (0, pw)) + ((0, 0),) * (label.ndim - 2), constant_values=IGNORE_INDEX)
        return _random_window(image, label, self.crop)

    def __repr__(self) -> str:
        return f"RandomCrop({self.crop}, if_smaller={self.if_smaller!r})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image: np.ndarray, label: Label = None) -> tuple[np.ndarray, Label]:
        if float(torch.rand(()).item()) < self.p:
            image = image[:, ::-1]
            if label is not None:
                label = label[:, ::-1]
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def has_enough_content(label: np.ndarray, min_share: float = 0.02) -> bool:
    """The official content check (GTA5Loader/SYNTHIALoader). Count the label values (255 included)
    that each cover more than ``min_share`` of the crop: accept three or more; accept exactly two
    unless the larger of the two is 255 (one real class next to a big ignore region)."""
    counts = np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=256)
    big = np.flatnonzero(counts > min_share * label.size)
    if len(big) >= 3:
        return True
    return bool(len(big) == 2 and big[-1] != IGNORE_INDEX)


class ContentRetry:
    """Redraw ``transform`` (up to ``tries`` draws in all) until the label crop passes
    :func:`has_enough_content`; after the last try keep the last draw. Without a label the transform
    runs once."""

    def __init__(self, transform: Transform, tries: int = 5, min_share: float = 0.02):
        if tries < 1:
            raise ValueError(f"tries must be >= 1, got {tries}")
        self.transform, self.tries, self.min_share = transform, int(tries), float(min_share)

    def __call__(self, image: np.ndarray, label: Label = None) -> tuple[np.ndarray, Label]:
        if label is None:
            return self.transform(image, label)
        for _ in range(self.tries):
            out_image, out_label = self.transform(image, label)
            if has_enough_content(out_label, self.min_share):
                break
        return out_image, out_label

    def __repr__(self) -> str:
        return f"ContentRetry({self.transform!r}, tries={self.tries}, min_share={self.min_share})"


def train_transform(
    resize: Sequence[int] | None,
    crop: Sequence[int],
    scale: Sequence[float] | None = (0.7, 1.0),
    flip: bool = True,
    content_retry: bool = True,
    sizes: Sequence[Sequence[int]] | None = None,
) -> Compose:
    """The official training pipeline: optional fixed resize (bicubic; ``sizes``: a size per batch row,
    :class:`ResizeByRow`, instead), then the random part (flip,
    then :class:`RandomScaleCrop` when ``scale`` is given, else :class:`RandomCrop`), the random part
    wrapped in :class:`ContentRetry` when ``content_retry``. The resize runs once, outside the
    retry loop, since it is deterministic."""
    random_part: list[Transform] = []
    if flip:
        random_part.append(RandomHorizontalFlip())
    random_part.append(RandomScaleCrop(crop, scale) if scale is not None else RandomCrop(crop))
    random: Transform = Compose(random_part)
    if content_retry:
        random = ContentRetry(random)
    steps: list[Transform] = [ResizeByRow(sizes)] if sizes else [Resize(resize)] if resize is not None else []
    return Compose([*steps, random])


def eval_transform(resize: Sequence[int] | None = None) -> Compose:
    """Validation / inference: a fixed resize (bicubic image, nearest label) or nothing."""
    return Compose([Resize(resize)] if resize is not None else [])


class RandomZoom:
    """Resize by a factor drawn uniformly from ``factors`` (aspect kept): the official loaders'
    choice between two fixed sizes (e.g. GTA5 at 720x1280 and 1052x1914)."""

    def __init__(self, factors: Sequence[float]):
        self.factors = tuple(float(f) for f in factors)

    def __call__(self, image, label=None):
        factor = self.factors[int(torch.randint(len(self.factors), ()).item())] if len(self.factors) > 1 else self.factors[0]
        if factor == 1.0:
            return image, label
        h, w = image.shape[:2]
        return Resize((max(1, round(h * factor)), max(1, round(w * factor))))(image, label)


def translator_transform(resize, zoom: Sequence[float], crop, content_retry: bool) -> Compose:
    random_part = Compose([RandomZoom(zoom), RandomHorizontalFlip(), RandomCrop(crop, if_smaller="resize")])
    steps = [Resize(resize)] if resize is not None else []
    return Compose([*steps, ContentRetry(random_part) if content_retry else random_part])
