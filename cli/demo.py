"""``diga demo``."""

from __future__ import annotations

import click

from diga_fast.config import ARCHS, DEMO_ITERS


@click.command(help=f"""Run the whole pipeline on the built-in synthetic -> real-looking pair (source-only, warm-up,
pseudo-labels, centroids, self-training rounds, eval, ONNX export) and print target mIoU per stage
(also OUT/summary.json, with the time taken and the ONNX check's figures).

KEY=VALUE overrides apply to every stage's demo recipe: train.iters=N sets the length of every stage
at once (source-only {DEMO_ITERS['source']}, warm-up {DEMO_ITERS['warmup']} and each self-training round
{DEMO_ITERS['self']} iterations by default), e.g. train.iters=100 for a quick look. Every argument is
checked before the first stage starts.""")
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True, help="Folder for every stage's run.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (CUDA when available); every stage runs there.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every stage (weights, draws, the built-in pair's images); the README's table is for seed 0.")
@click.option("--model", "arch", type=click.Choice(ARCHS), default=None,
              help="Network of every stage [default: small]; daformer_mitb0 is the smallest transformer.")
@click.option("--pretrained", type=click.Path(dir_okay=False), default=None,
              help="Local ImageNet weights of the network's backbone (as for diga train); the demo starts from random weights without.")
@click.option("--rounds", type=click.IntRange(min=0), default=2, show_default=True, help="Self-training rounds.")
@click.option("--oracle/--no-oracle", default=False, show_default=True, help="Also train on the target's labels (the upper bound).")
@click.option("--export/--no-export", default=True, show_default=True, help="Export the final student to OUT/model.onnx.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def demo(out: str, device: str, seed: int, arch: str | None, pretrained: str | None, rounds: int, oracle: bool,
         export: bool, overrides: tuple[str, ...]) -> None:
    from diga_fast.stages.demo import run_demo

    run_demo(out, device=device, seed=seed, oracle=oracle, rounds=rounds, overrides=overrides, export=export,
             arch=arch, pretrained=pretrained)
