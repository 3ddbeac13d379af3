"""``diga pseudo-label`` and ``diga centroids``: the two things self-training makes from a warm-up
student (``diga train self`` runs both itself unless given their outputs)."""

from __future__ import annotations

from pathlib import Path

import click

from diga_fast.engine.recipe import DataConfig
from diga_fast.errors import DigaError


def _target_images(target: str, label_space, synthetic_images: int, seed: int):
    from diga_fast.data import build_dataset

    return build_dataset(target, role="target", split="train", label_space=label_space, transform=None,
                         with_labels=False, synthetic_images=synthetic_images, seed=seed)


_common = [
    click.option("--checkpoint", required=True, type=click.Path(), help="Warm-up (or self-training) run folder or .safetensors."),
    click.option("--target", default="synthetic", show_default=True, help="Target data whose train split is labelled."),
    click.option("--synthetic-images", type=click.IntRange(min=1), default=DataConfig.synthetic_train_images, show_default=True, help="Train images of the built-in pair (match the training recipe)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the built-in pair (match the training recipe)."),
    click.option("--device", default="auto", show_default=True),
]


def _with_common(command):
    for option in reversed(_common):
        command = option(command)
    return command


@click.command("pseudo-label")
@_with_common
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for labels/, confidence/, color/.")
@click.option("--scales", default="1.0,0.5", show_default=True, help="Inference scales (max of upsampled logits).")
def pseudo_label(checkpoint, target, synthetic_images, seed, device, out, scales) -> None:
    """Probability labels: the model's argmax on every target training image, no threshold."""
    from diga_fast.cli.evaluate import parse_scales
    from diga_fast.data.labels import get_label_space
    from diga_fast.engine import distributed
    from diga_fast.engine.checkpoint import load_model
    from diga_fast.engine.training import resolve_device
    from diga_fast.method.pseudo_labels import INDEX_FILE, generate_probability_labels

    dev = resolve_device(device)
    model, meta = load_model(checkpoint)
    space = get_label_space(meta["label_space"])
    images = _target_images(target, space, synthetic_images, seed)
    if (Path(out) / INDEX_FILE).exists():
        raise DigaError(f"{out} already holds pseudo-labels; choose another --out")
    generate_probability_labels(model.to(dev), images, out, space, dev, parse_scales(scales))  # sharded under torchrun
    if distributed.current().is_main:
        click.echo(f"wrote probability labels for {len(images)} images to {out}")


@click.command("centroids")
@_with_common
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write ({'centroids': K x D tensor}).")
def centroids(checkpoint, target, synthetic_images, seed, device, out) -> None:
    """Initial class centroids: per-class mean feature over the target train images, each pixel
    assigned to the model's own argmax class."""
    import torch

    from diga_fast.data.labels import get_label_space
    from diga_fast.engine import distributed
    from diga_fast.engine.checkpoint import atomic_write, load_model
    from diga_fast.engine.training import resolve_device
    from diga_fast.method.centroids import initial_centroids

    dev = resolve_device(device)
    model, meta = load_model(checkpoint)
    space = get_label_space(meta["label_space"])
    images = _target_images(target, space, synthetic_images, seed)
    path = Path(out)
    if not path.parent.is_dir():
        raise DigaError(f"--out: folder {path.parent} does not exist")
    values, counts = initial_centroids(model.to(dev), images, dev)  # sharded under torchrun
    if not distributed.current().is_main:
        return
    atomic_write(path, lambda tmp: torch.save({"centroids": values.cpu(), "pixel_counts": counts.cpu()}, tmp))
    seen = int((counts > 0).sum())
    click.echo(f"wrote {values.shape[0]}x{values.shape[1]} centroids to {path} ({seen} classes seen)")
