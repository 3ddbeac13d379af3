"""``diga train ...``: the training stages."""

from __future__ import annotations

import click
from rich.console import Console

from diga_fast.cli.common import resolve_recipe, training_options


@click.group()
def train() -> None:
    """Train a model: source (supervised baseline / oracle), and the DiGA stages."""


@train.command("source")
@training_options
def train_source_command(out, device, resume, **options) -> None:
    """Supervised training on --source (the source-only baseline); evaluates on --target val.

    The oracle on the built-in pair: --source synthetic:target (trains on the target's labels)."""
    from diga_fast.evaluate import iou_table
    from diga_fast.method.source_only import train_source

    recipe = resolve_recipe("source", out=out, resume=resume, **options)
    summary = train_source(recipe, out, device=device, resume=resume)
    console = Console()
    console.print(iou_table(summary, title=f"target val ({recipe.data.target}) after {recipe.train.iters} iterations"))
    console.print(f"run folder: {out}")
