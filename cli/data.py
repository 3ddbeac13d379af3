"""``diga data ...``: the built-in domain pair on disk, and source images translated once for the
``folder`` translator."""

from __future__ import annotations

from pathlib import Path

import click
from PIL import Image

from diga_fast.config import DataConfig
from diga_fast.errors import DigaError


@click.group()
def data() -> None:
    """Datasets: write the built-in pair in the real folder layouts; translate a source once."""


LAYOUTS = ("gta5", "cityscapes", "bdd100k", "mapillary", "acdc", "darkzurich", "folder")


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write gta5/, cityscapes/, bdd100k/, mapillary/, acdc/, darkzurich/ and folder/ into.")
@click.option("--train-images", type=click.IntRange(min=1), default=DataConfig.synthetic_train_images, show_default=True, help="Images per domain in the train split.")
@click.option("--val-images", type=click.IntRange(min=1), default=DataConfig.synthetic_val_images, show_default=True, help="Target val images (what training, the demo and diga eval use).")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: str, train_images: int, val_images: int, seed: int) -> None:
    """Write the built-in synthetic -> real-looking pair as OUT/gta5 (GTA5 layout: images/, labels/
    with Cityscapes label ids) and OUT/cityscapes (leftImg8bit/ and gtFine/ with train and val splits),
    so the real loaders read it: --source gta5:OUT/gta5 --target cityscapes:OUT/cityscapes. The target
    scenes are also written in the layouts of bdd100k/, mapillary/ (JPEG), acdc/ (spread over its four
    conditions), darkzurich/ (night) and folder/ (JPEG with labels.yaml), each loaded as KIND:OUT/KIND."""
    from diga_fast.data.domain_layouts import write_target_scene
    from diga_fast.data.layouts import write_cityscapes_layout, write_gta5_layout
    from diga_fast.data.synthetic import render_scene
    from diga_fast.engine.logging import progress_bar

    root = Path(out)
    taken = [name for name in LAYOUTS if (root / name).exists()]
    if taken:
        raise DigaError(f"{root} already holds {', '.join(f'{name}/' for name in taken)}; choose an empty folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"cannot create {root}: {err.strerror or err}") from None

    written = [0]

    def scenes(domain: str, split: str, count: int):
        for index in range(count):
            image, label = render_scene(domain, split, index, seed)
            if domain == "target":
                write_target_scene(root, split, index, image, label)
            yield f"{index:05d}", image, label
            written[0] += 1
            tick(written[0])

    try:
        with progress_bar(2 * train_images + val_images, "writing", unit="img") as tick:
            write_gta5_layout(root / "gta5", scenes("source", "train", train_images))
            write_cityscapes_layout(root / "cityscapes", "train", scenes("target", "train", train_images))
            write_cityscapes_layout(root / "cityscapes", "val", scenes("target", "val", val_images))
    except OSError as err:
        raise DigaError(f"cannot write the pair into {root}: {err.strerror or err}") from None
    click.echo(f"wrote {train_images} source images to {root / 'gta5'} and {train_images}+{val_images} target images "
               f"to {root / 'cityscapes'}, and the target images to {', '.join(str(root / n) for n in LAYOUTS[2:])}")


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
    import numpy as np
    import torch
    from rich.progress import track

    from diga_fast.data import build_dataset
    from diga_fast.labels import get_label_space
    from diga_fast.utils.io import atomic_write
    from diga_fast.engine.device import resolve_device
    from diga_fast.models.io import load_translator_generator

    dev = resolve_device(device)
    generator = load_translator_generator(checkpoint, dev)
    dataset = build_dataset(source, role="source", split="train", label_space=get_label_space("cityscapes19"),
                            transform=None, with_labels=False, synthetic_images=synthetic_images, seed=seed)
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"cannot create {root}: {err.strerror or err}") from None
    written = 0
    for index, name in enumerate(track(dataset.names, description="translating", transient=True)):
        path = root / f"{name}.png"
        if path.is_file():
            continue
        image, _ = dataset.read(index)
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(dev).float().div(255.0)
            y = generator(x[None])[0].clamp(0.0, 1.0)
        pixels = y.mul(255.0).round().byte().permute(1, 2, 0).cpu().numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, pixels=pixels: Image.fromarray(pixels).save(tmp, format="PNG"))
        written += 1
    click.echo(f"wrote {written} translated images to {root} ({len(dataset) - written} were already there); "
               f"train with translator.kind=folder translator.folder={root}")
