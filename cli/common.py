"""Options shared by the training commands, and the recipe they resolve to."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from diga_fast.config import ARCHS, PRESETS
from diga_fast.errors import DigaError


_SOURCE = click.option("--source", default=None, help="Labelled source data: synthetic, gta5:ROOT, synthia:ROOT, cityscapes:ROOT (or any labelled KIND:ROOT) [default: synthetic].")
_TARGET = click.option("--target", default=None, help="Target data (unlabelled for adaptation; its val split is evaluated): synthetic, cityscapes:ROOT, acdc:ROOT[?cond=night], darkzurich:ROOT, bdd100k:ROOT, mapillary:ROOT, folder:ROOT, ... [default: synthetic].")
_PRESET = click.option("--preset", type=click.Choice(PRESETS), default=None, help="Recipe preset [default: demo on the built-in pair, paper on real data; paper-daformer for a daformer network].")
_CONFIG = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML recipe file (e.g. a run's config.yaml) applied over the preset.")
_SEED = click.option("--seed", type=int, default=None, help="Random seed (also of the built-in pair's images) [default: 0].")
_DEVICE = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
FORCE = click.option("--force", is_flag=True, help="Write into a non-empty --out (a run there is replaced).")
_OVERRIDES = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


def _apply(command, options):
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def training_options(command):
    """--source/--target/--preset/--iters/--out/--seed/--device/--resume/--config/... KEY=VALUE"""
    return _apply(command, [
        _SOURCE, _TARGET, _PRESET, _CONFIG,
        click.option("--model", "arch", type=click.Choice(ARCHS), default=None, help="Network (overrides the preset's)."),
        click.option("--pretrained", type=click.Path(dir_okay=False), default=None, help="Local ImageNet weights of the backbone: for deeplabv2 the official DeepLab init (Scale.* keys) or a torchvision ResNet state dict (converted to the Caffe input on load); for daformer_mitb* the SegFormer release's mit_bX.pth or a Hugging Face SegformerModel file."),
        click.option("--iters", type=click.IntRange(min=1), default=None, help="Training iterations."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (config.yaml, *.safetensors, state.pt, metrics.jsonl)."),
        _SEED, _DEVICE,
        click.option("--bf16/--no-bf16", default=None, help="bf16 autocast (fp32 master weights and losses)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its state.pt."),
        FORCE,
        click.option("--dry-run", is_flag=True, help="Check every input and print the plan (stages, iterations, epochs, crops) "
                                                     "with the peak memory and time per iteration of a short measured run "
                                                     "on --device; writes nothing to --out."),
        _OVERRIDES,
    ])


def translator_training_options(command):
    """:func:`training_options` less --model/--pretrained, which name the segmentation network (the
    translator's nets come from ``translator.*`` settings)."""
    command = training_options(command)
    command.__click_params__ = [p for p in command.__click_params__ if p.name not in ("arch", "pretrained")]
    return command


def labelling_options(command):
    """The recipe options of the commands that label the target with a trained student (pseudo-label,
    centroids): --target/--preset/--config/--seed/--device and KEY=VALUE, as in ``diga train self``."""
    return _apply(command, [_TARGET, _PRESET, _CONFIG, _SEED, _DEVICE, _OVERRIDES])


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DigaError(f"--scales {text!r}: expected comma-separated numbers such as 1.0,0.5") from None
    if not scales or any(not 0.0 < s <= 4.0 for s in scales):
        raise DigaError(f"--scales {text!r}: each scale must lie in (0, 4]")
    return scales


def resolve_recipe(stage: str, **options):
    """:func:`diga_fast.stages.recipes.resolve_recipe`, imported when called (``diga --help`` imports no torch)."""
    from diga_fast.stages.recipes import resolve_recipe as resolve

    return resolve(stage, **options)


def labelling_recipe(*options):
    """:func:`diga_fast.stages.recipes.labelling_recipe`, imported when called."""
    from diga_fast.stages.recipes import labelling_recipe as resolve

    return resolve(*options)
