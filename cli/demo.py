"""``diga demo``."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True, help="Folder for every stage's run.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rounds", type=click.IntRange(min=0), default=2, show_default=True, help="Self-training rounds.")
@click.option("--oracle/--no-oracle", default=False, show_default=True, help="Also train on the target's labels (the upper bound).")
@click.option("--export/--no-export", default=True, show_default=True, help="Export the final student to OUT/model.onnx.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def demo(out: str, device: str, seed: int, rounds: int, oracle: bool, export: bool, overrides: tuple[str, ...]) -> None:
    """Run the whole pipeline on the built-in synthetic -> real-looking pair (source-only, warm-up,
    pseudo-labels, centroids, self-training rounds, eval, ONNX export) and print target mIoU per stage.

    KEY=VALUE overrides apply to every stage's demo recipe (e.g. train.iters=300)."""
    from diga_fast.stages.demo import run_demo

    run_demo(out, device=device, seed=seed, oracle=oracle, rounds=rounds, overrides=overrides, export=export)
