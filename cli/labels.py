"""``diga pseudo-label`` and ``diga centroids``: the two things self-training makes from a warm-up
student (``diga train self`` runs both itself unless given their outputs). They take the recipe
options of ``diga train self`` (target, preset, config, seed, KEY=VALUE) so that what they make
matches what a training run would make: the same target images, and the recipe's
``self_training.pseudo_label_scales``."""

from __future__ import annotations

from pathlib import Path

import click

from diga_fast.cli.common import FORCE, check_out_folder, labelling_options, labelling_recipe
from diga_fast.utils.io import check_output_file, make_parent
from diga_fast.errors import DigaError

_CHECKPOINT = click.option("--checkpoint", required=True, type=click.Path(), help="Warm-up (or self-training) run folder or .safetensors.")


def _student_and_images(checkpoint: str, recipe, device: str):
    """(model on the device, its label space, the device, the recipe's target train images)."""
    from diga_fast.data.build import target_images
    from diga_fast.data.labels import get_label_space
    from diga_fast.engine.device import resolve_device, set_threads
    from diga_fast.models.io import load_model

    dev = resolve_device(device)
    set_threads(recipe.train.threads)  # as `diga train self` makes them: the same digits
    model, meta = load_model(checkpoint)
    space = get_label_space(meta["label_space"])
    return model.to(dev), space, dev, target_images(recipe, space)


@click.command("pseudo-label")
@_CHECKPOINT
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for labels/, confidence/, color/.")
@FORCE
@labelling_options
def pseudo_label(checkpoint, out, force, target, preset, config_file, seed, device, overrides) -> None:
    """Probability labels: the model's argmax on every target training image, no threshold
    (inference scales: self_training.pseudo_label_scales, default 1.0,0.5)."""
    from diga_fast.engine.logging import progress_callback
    from diga_fast.method.pseudo_labels import generate_probability_labels
    from diga_fast.utils import dist

    recipe = labelling_recipe(target, preset, config_file, seed, overrides)
    check_out_folder(out, force=force)
    model, space, dev, images = _student_and_images(checkpoint, recipe, device)
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"cannot create --out {out}: {err.strerror or err}") from None
    with progress_callback("pseudo-labels") as progress:  # sharded under torchrun
        generate_probability_labels(model, images, out, space, dev, recipe.self_training.pseudo_label_scales,
                                    progress=progress)
    if dist.current().is_main:
        click.echo(f"wrote probability labels for {len(images)} images to {out}")


@click.command("centroids")
@_CHECKPOINT
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write ({'centroids': K x D tensor}).")
@labelling_options
def centroids(checkpoint, out, target, preset, config_file, seed, device, overrides) -> None:
    """Initial class centroids: per-class mean feature over the target train images, each pixel
    assigned to the model's own argmax class."""
    from diga_fast.engine.logging import progress_callback
    from diga_fast.method.centroids import initial_centroids
    from diga_fast.models.io import save_centroids
    from diga_fast.utils import dist

    recipe = labelling_recipe(target, preset, config_file, seed, overrides)
    path = Path(out)
    check_output_file(out, "--out")
    model, space, dev, images = _student_and_images(checkpoint, recipe, device)
    with progress_callback("centroids") as progress:  # sharded under torchrun
        values, counts = initial_centroids(model, images, dev, progress=progress)
    if not dist.current().is_main:
        return
    save_centroids(make_parent(out, "--out"), values, pixel_counts=counts)
    seen = int((counts > 0).sum())
    click.echo(f"wrote {values.shape[0]}x{values.shape[1]} centroids to {path} ({seen} classes seen)")
