"""Options shared by the training commands, and the recipe they resolve to."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from diga_fast.data import parse_dataset_spec
from diga_fast.config import (
    ARCHS,
    PRESETS,
    Recipe,
    apply_overrides,
    load_yaml,
    preset_recipe,
    recipe_from_dict,
    validate_recipe,
)
from diga_fast.errors import DigaError


_SOURCE = click.option("--source", default="synthetic", show_default=True, help="Labelled source data: synthetic, gta5:ROOT, synthia:ROOT, cityscapes:ROOT.")
_TARGET = click.option("--target", default="synthetic", show_default=True, help="Target data (unlabelled for adaptation; its val split is evaluated).")
_PRESET = click.option("--preset", type=click.Choice(PRESETS), default=None, help="Recipe preset [default: demo on the built-in pair, paper on real data].")
_CONFIG = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML recipe file (e.g. a run's config.yaml) applied over the preset.")
_SEED = click.option("--seed", type=int, default=None, help="Random seed (also of the built-in pair's images) [default: 0].")
_DEVICE = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
_OVERRIDES = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


def _apply(command, options):
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def training_options(command):
    """--source/--target/--preset/--iters/--out/--seed/--device/--resume/--config/... KEY=VALUE"""
    return _apply(command, [
        _SOURCE, _TARGET, _PRESET, _CONFIG,
        click.option("--model", "arch", type=click.Choice(ARCHS), default=None, help="Network (overrides the preset's)."),
        click.option("--pretrained", type=click.Path(dir_okay=False), default=None, help="Local torchvision ResNet state dict for the deeplabv2 backbones."),
        click.option("--iters", type=click.IntRange(min=1), default=None, help="Training iterations."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (config.yaml, *.safetensors, state.pt, metrics.jsonl)."),
        _SEED, _DEVICE,
        click.option("--bf16/--no-bf16", default=None, help="bf16 autocast (fp32 master weights and losses)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its state.pt."),
        _OVERRIDES,
    ])


def labelling_options(command):
    """The recipe options of the commands that label the target with a trained student (pseudo-label,
    centroids): --target/--preset/--config/--seed/--device and KEY=VALUE, as in ``diga train self``."""
    return _apply(command, [_TARGET, _PRESET, _CONFIG, _SEED, _DEVICE, _OVERRIDES])


def labelling_recipe(target: str, preset: str | None, config_file: str | None, seed: int | None,
                     overrides: tuple[str, ...]) -> Recipe:
    """The self-training recipe these options resolve to (its target, pair size, seed, scales)."""
    return resolve_recipe("self", source="synthetic", target=target, preset=preset, config_file=config_file,
                          arch=None, pretrained=None, iters=None, seed=seed, bf16=None, resume=False, out="",
                          overrides=overrides)


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DigaError(f"--scales {text!r}: expected comma-separated numbers such as 1.0,0.5") from None
    if not scales or any(not 0.0 < s <= 4.0 for s in scales):
        raise DigaError(f"--scales {text!r}: each scale must lie in (0, 4]")
    return scales


def resolve_recipe(stage: str, *, source: str, target: str, preset: str | None, config_file: str | None,
                   arch: str | None, pretrained: str | None, iters: int | None, seed: int | None,
                   bf16: bool | None, resume: bool, out: str, overrides: tuple[str, ...]) -> Recipe:
    """Preset -> --config -> named options -> KEY=VALUE overrides. On --resume the run's own
    config.yaml is the recipe (only --iters and overrides may change it)."""
    if resume:
        run_dir = Path(out) if (Path(out) / "config.yaml").is_file() else Path(out) / "round_1"  # self --rounds
        saved = run_dir / "config.yaml"
        if not (run_dir / "state.pt").is_file() or not saved.is_file():
            raise DigaError(f"--resume: {out} holds no state.pt and config.yaml to resume from")
        values = load_yaml(saved)
        recipe = recipe_from_dict(values, base=preset_recipe(values.get("preset", "demo"), stage))
    else:
        source_spec, target_spec = parse_dataset_spec(source), parse_dataset_spec(target)
        if preset is None:
            preset = "demo" if source_spec.is_synthetic and target_spec.is_synthetic else "paper"
        recipe = preset_recipe(preset, stage, source, target)
        if config_file:
            recipe = recipe_from_dict(load_yaml(config_file), base=recipe)
            recipe.stage = stage
        if arch is not None:
            recipe.model.arch = arch
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise DigaError(f"--pretrained: file not found: {pretrained}")
            recipe.model.pretrained = pretrained
        if seed is not None:
            recipe.train.seed = seed
        if bf16 is not None:
            recipe.train.bf16 = bf16
    if iters is not None:
        recipe.train.iters = iters
    return validate_recipe(apply_overrides(recipe, overrides))
