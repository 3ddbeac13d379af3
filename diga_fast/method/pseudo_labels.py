"""Probability labels (method.md, "Between stages"): the warm-up student's argmax on every target
training image, no threshold, inference = max of the logits at scales 1.0 and 0.5 upsampled to full
size. Stored as PNGs so that rounds can be re-run:

    DIR/labels/NAME.png       class indices (uint8; every pixel gets a class, no 255)
    DIR/confidence/NAME.png   max softmax probability x 255 (for the fixed-threshold baseline)
    DIR/color/NAME.png        the Cityscapes palette, for looking at them

``PseudoLabelled`` serves them back with the target images through the same joint transform.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diga_fast.labels import IGNORE_INDEX, LabelSpace
from diga_fast.errors import DigaError
from diga_fast.models.predict import predict_logits
from diga_fast.models import SegmentationModel
from diga_fast.utils import dist
from diga_fast.utils.io import atomic_write, save_png

INDEX_FILE = "pseudo_labels.json"


def raw_sample(dataset: Dataset, index: int) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(name, uint8 image HxWx3, uint8 label HxW or None) before any transform."""
    image, label = dataset.read(index)
    return dataset.names[index], image, label


@torch.no_grad()
def generate_probability_labels(
    model: SegmentationModel,
    dataset: Dataset,
    out_dir: str | Path,
    label_space: LabelSpace,
    device: torch.device,
    scales: tuple[float, ...] = (1.0, 0.5),
    progress=None,
) -> Path:
    """Label every image of ``dataset`` (a target train split, read without transform) into
    ``out_dir``; the index file is written last, so a folder without it is incomplete. Under torchrun
    each rank labels every world-th image and rank 0 writes the index once all are done."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    names = dataset.names
    info = dist.current()
    for index in range(info.rank, len(dataset), info.world):
        name, image, _ = raw_sample(dataset, index)
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div(255.0).unsqueeze(0).to(device)
        prob = torch.softmax(predict_logits(model, x, scales), dim=1)[0]
        confidence, labels = prob.max(0)
        labels = labels.to(torch.uint8).cpu().numpy()
        save_png(out_dir / "labels" / f"{name}.png", labels)
        save_png(out_dir / "confidence" / f"{name}.png", (confidence * 255).round().to(torch.uint8).cpu().numpy())
        save_png(out_dir / "color" / f"{name}.png", label_space.colorize(labels))
        if progress is not None:
            progress(index + 1, len(dataset))
    dist.barrier()
    if info.is_main:
        index_data = {"num_images": len(names), "label_space": label_space.name, "scales": list(scales), "names": names}
        atomic_write(out_dir / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index_data) + "\n"))
    dist.barrier()
    return out_dir


def _read_u8(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as handle:
            array = np.array(handle)
    except FileNotFoundError:
        raise DigaError(f"{what} not found: {path}") from None
    except OSError as err:
        raise DigaError(f"cannot read {what} {path}: {err}") from None
    if array.ndim != 2 or array.dtype != np.uint8:
        raise DigaError(f"{what} {path} is not a single-channel 8-bit PNG")
    return array


class PseudoLabelled(Dataset):
    """Target training samples with their probability labels: {"image", "pseudo_label",
    "confidence" (float in [0, 1]), "label" (the true label when the dataset has one, else all 255),
    "name"}. The image and the three maps go through one joint transform."""

    def __init__(self, dataset: Dataset, label_dir: str | Path, num_classes: int, transform=None) -> None:
        self.dataset, self.dir, self.num_classes, self.transform = dataset, Path(label_dir), num_classes, transform
        index_path = self.dir / INDEX_FILE
        if not index_path.is_file():
            raise DigaError(f"{self.dir} holds no complete pseudo-labels ({INDEX_FILE} missing): run diga pseudo-label")
        stored = json.loads(index_path.read_text())
        names = list(dataset.names)
        if stored["num_images"] != len(names):
            raise DigaError(
                f"pseudo-labels in {self.dir} cover {stored['num_images']} images, the target train split has {len(names)}"
            )
        missing = [n for n in names if not (self.dir / "labels" / f"{n}.png").is_file()]
        if missing:
            raise DigaError(f"no pseudo-label for target image {missing[0]} in {self.dir / 'labels'} ({len(missing)} missing)")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def names(self) -> list[str]:
        return list(self.dataset.names)

    def __getitem__(self, index: int) -> dict:
        name, image, true_label = raw_sample(self.dataset, index)
        label_path = self.dir / "labels" / f"{name}.png"
        pseudo = _read_u8(label_path, "pseudo-label")
        confidence = _read_u8(self.dir / "confidence" / f"{name}.png", "pseudo-label confidence")
        if pseudo.shape != image.shape[:2] or confidence.shape != image.shape[:2]:
            raise DigaError(f"pseudo-label {label_path} is {pseudo.shape[1]}x{pseudo.shape[0]}, the image is "
                            f"{image.shape[1]}x{image.shape[0]}: the labels were made for other images")
        if int(pseudo.max()) >= self.num_classes and int(pseudo.max()) != IGNORE_INDEX:
            raise DigaError(f"pseudo-label {label_path} holds class {int(pseudo.max())}, the model has {self.num_classes}")
        if true_label is None:
            true_label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        maps = np.stack([pseudo, confidence, true_label], axis=-1)
        if self.transform is not None:
            image, maps = self.transform(image, maps)
        maps = np.ascontiguousarray(maps)
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0),
            "pseudo_label": torch.from_numpy(maps[..., 0].astype(np.int64)),
            "confidence": torch.from_numpy(maps[..., 1].astype(np.float32) / 255.0),
            "label": torch.from_numpy(maps[..., 2].astype(np.int64)),
            "name": name,
        }
