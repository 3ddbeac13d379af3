"""``diga pseudo-label`` and ``diga centroids``: the two things self-training makes from a warm-up
student (``diga train self`` runs both itself unless given their outputs). They take the recipe
options of ``diga train self`` (target, preset, config, seed, KEY=VALUE) so that what they make
matches what a training run would make: the same target images, and the recipe's
``self_training.pseudo_label_scales``."""

from __future__ import annotations

import click

from diga_fast.cli.common import FORCE, labelling_options, labelling_recipe
from diga_fast.cli.tables import counted
from diga_fast.utils.io import check_out_folder, check_output_file

_CHECKPOINT = click.option("--checkpoint", required=True, type=click.Path(), help="Warm-up (or self-training) run folder or .safetensors.")


@click.command("pseudo-label")
@_CHECKPOINT
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for labels/, confidence/, color/.")
@FORCE
@labelling_options
def pseudo_label(checkpoint, out, force, target, preset, config_file, seed, device, overrides) -> None:
    """Probability labels: the model's argmax on every target training image, no threshold
    (inference scales: self_training.pseudo_label_scales, default 1.0,0.5)."""
    from diga_fast.stages.labelling import write_pseudo_labels
    from diga_fast.utils import dist

    recipe = labelling_recipe(checkpoint, target, preset, config_file, seed, overrides)
    check_out_folder(out, force=force)
    count = write_pseudo_labels(checkpoint, out, recipe, device)  # sharded under torchrun
    if dist.current().is_main:
        click.echo(f"wrote probability labels for {counted(count, 'image')} to {out}")


@click.command("centroids")
@_CHECKPOINT
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write ({'centroids': K x D tensor}).")
@labelling_options
def centroids(checkpoint, out, target, preset, config_file, seed, device, overrides) -> None:
    """Initial class centroids: per-class mean feature over the target train images, each pixel
    assigned to the model's own argmax class."""
    from diga_fast.stages.labelling import write_centroids
    from diga_fast.utils import dist

    recipe = labelling_recipe(checkpoint, target, preset, config_file, seed, overrides)
    check_output_file(out, "--out")
    values, counts = write_centroids(checkpoint, out, recipe, device)  # sharded under torchrun
    if dist.current().is_main:
        seen = int((counts > 0).sum())
        click.echo(f"wrote {values.shape[0]}x{values.shape[1]} centroids to {out} ({seen} classes seen)")
