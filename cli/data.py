"""``diga data ...``: the built-in domain pair on disk, and source images translated once for the
``folder`` translator."""

from __future__ import annotations

import click

from diga_fast.cli.tables import counted
from diga_fast.config import DataConfig


@click.group()
def data() -> None:
    """Datasets: write the built-in pair in the real folder layouts; translate a source once."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write gta5/, synthia/, cityscapes/, bdd100k/, mapillary/, acdc/, darkzurich/ and folder/ into.")
@click.option("--train-images", type=click.IntRange(min=1), default=DataConfig.synthetic_train_images, show_default=True, help="Images per domain in the train split.")
@click.option("--val-images", type=click.IntRange(min=1), default=DataConfig.synthetic_val_images, show_default=True, help="Target val images (what training, the demo and diga eval use).")
@click.option("--real-sizes", is_flag=True, help="Images at the real datasets' sizes (GTA5 1914x1052, SYNTHIA 1280x760, Cityscapes and the other targets 2048x1024) instead of 256x128.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: str, train_images: int, val_images: int, real_sizes: bool, seed: int) -> None:
    """Write the built-in synthetic -> real-looking pair as OUT/gta5 (GTA5 layout: images/, labels/
    with Cityscapes label ids), OUT/synthia (SYNTHIA RAND_CITYSCAPES: RGB/, 16-bit GT/LABELS/) and
    OUT/cityscapes (leftImg8bit/ and gtFine/ with train and val splits), so the real loaders read it:
    --source gta5:OUT/gta5 (or synthia:OUT/synthia) --target cityscapes:OUT/cityscapes. The target
    scenes are also written in the layouts of bdd100k/, mapillary/ (JPEG), acdc/ (spread over its four
    conditions), darkzurich/ (night) and folder/ (JPEG with labels.yaml), each loaded as KIND:OUT/KIND."""
    from diga_fast.stages.datasets import write_pair

    gta5, synthia, cityscapes, *others = write_pair(out, train_images, val_images, seed, real_sizes)
    click.echo(f"wrote {counted(train_images, 'source image')} to {gta5} and {synthia}, {train_images}+{val_images} target "
               f"images to {cityscapes}, and the target images to {', '.join(map(str, others))}")


@data.command("translate")
@click.option("--translator", "checkpoint", required=True, type=click.Path(), help="A `diga train translator` run folder or its translator.safetensors.")
@click.option("--source", default="synthetic", show_default=True, help="Source dataset whose train images are translated.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for OUT/NAME.png, one per source image.")
@click.option("--synthetic-images", type=click.IntRange(min=1), default=DataConfig.synthetic_train_images, show_default=True, help="Train images of the built-in pair (match the training recipe).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the built-in pair (match the training recipe).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
def translate(checkpoint, source, out, synthetic_images, seed, device) -> None:
    """Translate every source training image to the target look with a trained translator, at its
    stored size, into OUT/NAME.png; train with `translator.kind=folder translator.folder=OUT`.
    Images already in OUT are kept (each file is written atomically), so an interrupted run resumes."""
    from diga_fast.stages.datasets import translate_source

    written, total = translate_source(checkpoint, source, out, synthetic_images, seed, device)
    click.echo(f"wrote {written} translated images to {out} ({total - written} were already there); "
               f"train with translator.kind=folder translator.folder={out}")
