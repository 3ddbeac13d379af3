"""``diga demo``."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True, help="Folder for every stage's run.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--oracle/--no-oracle", default=False, show_default=True, help="Also train on the target's labels (the upper bound).")
def demo(out: str, device: str, seed: int, oracle: bool) -> None:
    """Run the pipeline on the built-in synthetic -> real-looking pair and print target mIoU per stage."""
    from diga_fast.engine.demo import run_demo

    run_demo(out, device=device, seed=seed, oracle=oracle)
