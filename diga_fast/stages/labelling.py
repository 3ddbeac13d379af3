"""What self-training makes from a student before its loop (method.md Stage 2, before step 1): the
probability labels y_prob (the student's argmax on every target training image, no threshold) and the
initial class centroids (per-class mean feature, each pixel assigned to the student's own argmax).

One home for both: ``diga pseudo-label`` and ``diga centroids`` (:func:`write_pseudo_labels`,
:func:`write_centroids`) and the start of every self-training round (:func:`make_probability_labels`,
:func:`make_initial_centroids`), so that a label folder or centroid file made by the commands is the one
a training run would make: the same target images, scales and threads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from diga_fast.config import Recipe
from diga_fast.data.build import target_images
from diga_fast.engine.device import resolve_device, set_threads
from diga_fast.engine.logging import console, progress_callback
from diga_fast.errors import DigaError
from diga_fast.labels import LabelSpace, get_label_space
from diga_fast.method.centroids import initial_centroids
from diga_fast.method.pseudo_labels import generate_probability_labels
from diga_fast.models.io import load_model, save_centroids
from diga_fast.utils import dist
from diga_fast.utils.io import make_parent


def make_probability_labels(model, images, folder: Path, label_space: LabelSpace, device: torch.device,
                            scales, fresh: bool = False) -> Path:
    """y_prob of every image into ``folder`` (labels/, confidence/, color/); ``fresh`` removes what the
    folder holds first (a run's own label folder, half-written by an interrupted start). Sharded under
    torchrun."""
    console.print(f"probability labels for {len(images)} target images -> {folder}")
    if fresh and dist.current().is_main:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    with progress_callback("pseudo-labels") as progress:
        generate_probability_labels(model, images, folder, label_space, device, scales, progress=progress)
    return folder


def make_initial_centroids(model, images, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [K, D], pixel counts [K]) from the student's own argmax on ``images``."""
    console.print("initial centroids from the student's own argmax on the target images")
    with progress_callback("centroids") as progress:
        return initial_centroids(model, images, device, progress=progress)


def _student(checkpoint: str | Path, recipe: Recipe, device: str | None):
    """(the checkpoint's model on the device, its label space, the device, the recipe's target train
    images), with the recipe's CPU threads, as ``diga train self`` makes them: the same digits."""
    dev = resolve_device(device)
    set_threads(recipe.train.threads)
    model, meta = load_model(checkpoint)
    space = get_label_space(meta["label_space"])
    return model.to(dev), space, dev, target_images(recipe, space)


def write_pseudo_labels(checkpoint: str | Path, out: str | Path, recipe: Recipe, device: str | None = None) -> int:
    """``diga pseudo-label``: the probability labels of ``checkpoint``'s student; returns the image count."""
    model, space, dev, images = _student(checkpoint, recipe, device)
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"cannot create --out {out}: {err.strerror or err}") from None
    make_probability_labels(model, images, Path(out), space, dev, recipe.self_training.pseudo_label_scales)
    return len(images)


def write_centroids(checkpoint: str | Path, out: str | Path, recipe: Recipe,
                    device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``diga centroids``: the initial centroids of ``checkpoint``'s student, saved to ``out`` by rank 0;
    returns (centroids, pixel counts)."""
    model, _, dev, images = _student(checkpoint, recipe, device)
    values, counts = make_initial_centroids(model, images, dev)
    if dist.current().is_main:
        save_centroids(make_parent(out, "--out"), values, pixel_counts=counts)
    return values, counts
