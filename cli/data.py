"""``diga data ...``: the built-in domain pair on disk."""

from __future__ import annotations

from pathlib import Path

import click

from diga_fast.errors import DigaError


@click.group()
def data() -> None:
    """Datasets: write the built-in pair in the real folder layouts."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write gta5/ and cityscapes/ into.")
@click.option("--train-images", type=click.IntRange(min=1), default=500, show_default=True, help="Images per domain in the train split.")
@click.option("--val-images", type=click.IntRange(min=1), default=100, show_default=True, help="Target val images.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: str, train_images: int, val_images: int, seed: int) -> None:
    """Write the built-in synthetic -> real-looking pair as OUT/gta5 (GTA5 layout: images/, labels/
    with Cityscapes label ids) and OUT/cityscapes (leftImg8bit/ and gtFine/ with train and val splits),
    so the real loaders read it: --source gta5:OUT/gta5 --target cityscapes:OUT/cityscapes."""
    from diga_fast.data.layouts import write_cityscapes_layout, write_gta5_layout
    from diga_fast.data.synthetic import render_scene

    root = Path(out)
    if (root / "gta5").exists() or (root / "cityscapes").exists():
        raise DigaError(f"{root} already holds gta5/ or cityscapes/; choose an empty folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"cannot create {root}: {err.strerror or err}") from None

    def scenes(domain: str, split: str, count: int):
        for index in range(count):
            image, label = render_scene(domain, split, index, seed)
            yield f"{index:05d}", image, label

    write_gta5_layout(root / "gta5", scenes("source", "train", train_images))
    write_cityscapes_layout(root / "cityscapes", "train", scenes("target", "train", train_images))
    write_cityscapes_layout(root / "cityscapes", "val", scenes("target", "val", val_images))
    click.echo(f"wrote {train_images} source images to {root / 'gta5'} and {train_images}+{val_images} target images to {root / 'cityscapes'}")
