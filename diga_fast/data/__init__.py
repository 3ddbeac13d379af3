"""Datasets named ``KIND:ROOT`` on the command line: ``synthetic`` (the built-in pair, no root),
``gta5:ROOT``, ``synthia:ROOT``, ``cityscapes:ROOT``.

``synthetic`` takes its domain from the role it plays (``--source synthetic`` is the rendered look,
``--target synthetic`` the photo-like look); ``synthetic:source`` / ``synthetic:target`` name the
domain explicitly, e.g. ``diga train source --source synthetic:target`` trains the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diga_fast.errors import DigaError

if TYPE_CHECKING:  # torch stays unimported until a dataset is built (`diga --help` stays fast)
    from torch.utils.data import Dataset

    from diga_fast.data.labels import LabelSpace

DATASET_KINDS = ("synthetic", "gta5", "synthia", "cityscapes")


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    root: str | None
    list_file: str | None = None  # ``KIND:ROOT?list=FILE`` (GTA5, SYNTHIA): keep only the ids it names

    def __str__(self) -> str:
        text = self.kind if self.root is None else f"{self.kind}:{self.root}"
        return text if self.list_file is None else f"{text}?list={self.list_file}"

    @property
    def is_synthetic(self) -> bool:
        return self.kind == "synthetic"


def parse_dataset_spec(text: str) -> DatasetSpec:
    kind, sep, root = text.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS:
        raise DigaError(f"unknown dataset {text!r}; use synthetic, gta5:ROOT, synthia:ROOT or cityscapes:ROOT")
    if kind == "synthetic":
        if sep and root not in ("source", "target"):
            raise DigaError(f"dataset {text!r}: the built-in pair takes no root (synthetic, synthetic:source or synthetic:target)")
        return DatasetSpec(kind, root or None)
    root, _, query = root.partition("?")
    list_file = None
    if query:
        key, _, list_file = query.partition("=")
        if key != "list" or not list_file or kind == "cityscapes":
            raise DigaError(f"dataset {text!r}: the only option is ?list=FILE, for gta5 and synthia "
                            "(e.g. gta5:ROOT?list=train_modified.txt)")
        if not Path(list_file).is_file():
            raise DigaError(f"dataset {text!r}: list file not found: {list_file}")
    if not root:
        raise DigaError(f"dataset {text!r} needs a folder: {kind}:ROOT")
    if not Path(root).is_dir():
        raise DigaError(f"dataset folder not found: {root}")
    return DatasetSpec(kind, root, list_file)


def build_dataset(
    spec: str | DatasetSpec,
    *,
    role: str,
    split: str,
    label_space: LabelSpace,
    transform=None,
    with_labels: bool = True,
    synthetic_images: int = 1000,
    seed: int = 0,
    skip_bad: bool = False,
) -> Dataset:
    """The dataset ``spec`` names, for ``role`` ("source" or "target") and ``split`` ("train"/"val").
    ``skip_bad``: leave out pairs whose image and label sizes differ (GTA5, SYNTHIA; see ``skipped``)."""
    spec = parse_dataset_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "synthetic":
        from diga_fast.data.synthetic import SyntheticDomain

        return SyntheticDomain(
            domain=spec.root or role,
            split=split,
            num_images=synthetic_images,
            seed=seed,
            transform=transform,
            with_labels=with_labels,
        )
    from diga_fast.data import datasets

    if spec.kind in ("gta5", "synthia"):
        kind = datasets.GTA5 if spec.kind == "gta5" else datasets.Synthia
        dataset = kind(spec.root, label_space=label_space, transform=transform, with_labels=with_labels,
                       list_file=spec.list_file)
        if skip_bad and with_labels:
            dataset.drop_mismatched()
        return dataset
    return datasets.Cityscapes(
        spec.root, split=split, label_space=label_space, transform=transform, with_labels=with_labels
    )
