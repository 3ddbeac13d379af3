"""Datasets named ``KIND:ROOT`` on the command line: ``synthetic`` (the built-in pair, no root),
``gta5:ROOT``, ``synthia:ROOT``, ``cityscapes:ROOT`` and the other domains of
:mod:`diga_fast.data.domains`: ``bdd100k:ROOT``, ``mapillary:ROOT``, ``acdc:ROOT``, ``darkzurich:ROOT``,
``folder:ROOT``.

``synthetic`` takes its domain from the role it plays (``--source synthetic`` is the rendered look,
``--target synthetic`` the photo-like look); ``synthetic:source`` / ``synthetic:target`` name the
domain explicitly, e.g. ``diga train source --source synthetic:target`` trains the oracle.

Options follow the root as ``?key=value&key=value``: ``list=FILE`` (gta5, synthia: keep only the ids a
list file names), ``cond=night,snow`` (acdc: these adverse conditions only; all four by default) and
``train=test`` (acdc, darkzurich, bdd100k, mapillary: adapt on the unlabelled test images instead of the
train split).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diga_fast.errors import DigaError

if TYPE_CHECKING:  # torch stays unimported until a dataset is built (`diga --help` stays fast)
    from torch.utils.data import Dataset

    from diga_fast.labels import LabelSpace

DATASET_KINDS = ("synthetic", "gta5", "synthia", "cityscapes", "bdd100k", "mapillary", "acdc", "darkzurich", "folder")
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
# The options each kind takes (``KIND:ROOT?key=value``).
OPTIONS = {"gta5": ("list",), "synthia": ("list",), "acdc": ("cond", "train"), "darkzurich": ("train",),
           "bdd100k": ("train",), "mapillary": ("train",)}


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    root: str | None
    list_file: str | None = None  # ``KIND:ROOT?list=FILE`` (GTA5, SYNTHIA): keep only the ids it names
    conditions: tuple[str, ...] | None = None  # ``acdc:ROOT?cond=night``; None = all four
    train_split: str | None = None  # ``?train=test``: the split that serves as "train" (unlabelled test images)

    def __str__(self) -> str:
        text = self.kind if self.root is None else f"{self.kind}:{self.root}"
        options = [f"{key}={value}" for key, value in (("list", self.list_file), ("train", self.train_split),
                                                       ("cond", ",".join(self.conditions or ()))) if value]
        return f"{text}?{'&'.join(options)}" if options else text

    @property
    def is_synthetic(self) -> bool:
        return self.kind == "synthetic"

    def split(self, split: str) -> str:
        """The folder split read for ``split``: ``train`` becomes the ``?train=`` choice."""
        return self.train_split if split == "train" and self.train_split else split


def _kinds_text() -> str:
    return "synthetic, " + ", ".join(f"{kind}:ROOT" for kind in DATASET_KINDS[1:])


def _parse_options(text: str, kind: str, query: str) -> dict[str, str]:
    """``key=value&...`` -> dict, each key one this kind takes (:data:`OPTIONS`) and given once."""
    allowed = OPTIONS.get(kind, ())
    options: dict[str, str] = {}
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if key not in allowed or not value or key in options:
            takes = ", ".join(f"?{name}=..." for name in allowed) or "no options"
            raise DigaError(f"dataset {text!r}: bad option {item!r}; {kind} takes {takes} "
                            "(e.g. gta5:ROOT?list=train_modified.txt, acdc:ROOT?cond=night)")
        options[key] = value
    return options


def _conditions(text: str, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(value.split(","))
    bad = [n for n in names if n not in ACDC_CONDITIONS]
    if bad or len(set(names)) != len(names):
        raise DigaError(f"dataset {text!r}: cond takes distinct conditions from {', '.join(ACDC_CONDITIONS)}, "
                        "comma-separated (e.g. cond=night or cond=fog,rain)")
    return names


def parse_dataset_spec(text: str) -> DatasetSpec:
    kind, sep, root = text.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS:
        raise DigaError(f"unknown dataset {text!r}; use {_kinds_text()}")
    if kind == "synthetic":
        if sep and root not in ("source", "target"):
            raise DigaError(f"dataset {text!r}: the built-in pair takes no root (synthetic, synthetic:source or synthetic:target)")
        return DatasetSpec(kind, root or None)
    root, _, query = root.partition("?")
    options = _parse_options(text, kind, query) if query else {}
    list_file = options.get("list")
    if list_file is not None and not Path(list_file).is_file():
        raise DigaError(f"dataset {text!r}: list file not found: {list_file}")
    if options.get("train", "test") != "test":
        raise DigaError(f"dataset {text!r}: train takes only test (train=test adapts on the unlabelled test images)")
    if not root:
        raise DigaError(f"dataset {text!r} needs a folder: {kind}:ROOT")
    if not Path(root).is_dir():
        raise DigaError(f"dataset folder not found: {root}")
    return DatasetSpec(kind, root, list_file, _conditions(text, options.get("cond")), options.get("train"))


_NEXT_SPEC = re.compile(r",(?=\s*(?:" + "|".join(DATASET_KINDS) + r")(?::|\s*,|\s*$))", re.IGNORECASE)


def split_dataset_specs(text: str) -> list[str]:
    """``"bdd100k:B,acdc:A?cond=fog,rain,mapillary:M"`` -> one spec per dataset: a comma starts a new
    spec only where a dataset kind follows it, so option values may hold commas."""
    return [part.strip() for part in _NEXT_SPEC.split(text) if part.strip()]


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
    if spec.kind == "cityscapes":
        return datasets.Cityscapes(
            spec.root, split=split, label_space=label_space, transform=transform, with_labels=with_labels
        )
    from diga_fast.data.domains import build_domain

    return build_domain(spec, split=spec.split(split), label_space=label_space, transform=transform,
                        with_labels=with_labels)
