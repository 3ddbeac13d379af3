"""Options shared by the training commands, and the recipe they resolve to."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from diga_fast.data import parse_dataset_spec
from diga_fast.config import (
    ARCHS,
    DAFORMER_ARCHS,
    PRESETS,
    absolute_paths,
    Recipe,
    apply_overrides,
    load_yaml,
    preset_recipe,
    recipe_from_dict,
    choose_network,
    validate_recipe,
)
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


def labelling_recipe(target: str, preset: str | None, config_file: str | None, seed: int | None,
                     overrides: tuple[str, ...]) -> Recipe:
    """The self-training recipe these options resolve to (its target, pair size, seed, scales)."""
    return resolve_recipe("self", source="synthetic", target=target, preset=preset, config_file=config_file,
                          arch=None, pretrained=None, iters=None, seed=seed, bf16=None, resume=False, out="",
                          overrides=overrides)


def check_out_folder(out: str | Path, stage: str | None = None, resume: bool = False, force: bool = False) -> Path:
    """Refuse a non-empty ``--out`` before any work starts, unless it is this stage's run being resumed,
    the leftovers of this stage's start that failed before its first checkpoint (``config.yaml``, no
    ``state.pt``), or ``--force`` is given (then a run's ``state.pt`` there is removed, so the new run
    replaces it instead of refusing to)."""
    out = Path(out)
    if resume or not out.exists():
        return out
    if not out.is_dir():
        raise DigaError(f"--out {out} exists and is not a folder")
    entries = list(out.iterdir())
    if not entries:
        return out
    if force:
        for state in (out / "state.pt", *out.glob("round_*/state.pt")):
            state.unlink(missing_ok=True)
        return out
    if stage is not None and not (out / "state.pt").exists() and (out / "config.yaml").is_file():
        if load_yaml(out / "config.yaml").get("stage") == stage:
            return out  # a start that failed before its first checkpoint: starting again loses nothing
    what = "a run" if (out / "state.pt").exists() else f"{len(entries)} entries"
    raise DigaError(f"--out {out} is not empty (it holds {what}); choose a new folder"
                    f"{', --resume the run in it' if (out / 'state.pt').exists() else ''} or pass --force to write into it")


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DigaError(f"--scales {text!r}: expected comma-separated numbers such as 1.0,0.5") from None
    if not scales or any(not 0.0 < s <= 4.0 for s in scales):
        raise DigaError(f"--scales {text!r}: each scale must lie in (0, 4]")
    return scales


def resolve_recipe(stage: str, *, source: str | None, target: str | None, preset: str | None,
                   config_file: str | None, arch: str | None, pretrained: str | None, iters: int | None,
                   seed: int | None, bf16: bool | None, resume: bool, out: str, overrides: tuple[str, ...],
                   check: bool = True) -> Recipe:
    """Preset -> --config -> named options -> KEY=VALUE overrides; paths in it made absolute. On
    --resume the run's own config.yaml is the recipe: only --iters and overrides may change it, and
    any other recipe option is refused rather than silently ignored. ``check=False`` skips the checks
    (``diga recipe show`` prints a recipe that still lacks its weights or translator)."""
    if resume:
        ignored = [name for name, value in (("--source", source), ("--target", target), ("--preset", preset),
                                             ("--config", config_file), ("--model", arch), ("--pretrained", pretrained),
                                             ("--seed", seed), ("--bf16/--no-bf16", bf16)) if value is not None]
        if ignored:
            raise DigaError(f"--resume continues {out} with its own config.yaml; {', '.join(ignored)} cannot change it "
                            "(only --iters and KEY=VALUE overrides can)")
        run_dir = Path(out) if (Path(out) / "config.yaml").is_file() else Path(out) / "round_1"  # self --rounds
        saved = run_dir / "config.yaml"
        if not (run_dir / "state.pt").is_file() or not saved.is_file():
            raise DigaError(f"--resume: {out} holds no state.pt and config.yaml to resume from")
        values = load_yaml(saved)
        if values.get("stage", stage) != stage:
            raise DigaError(f"--resume: {out} is a {values.get('stage')!r} run, not a {stage!r} run "
                            f"(continue it with `diga train {values.get('stage')} --resume --out {out}`)")
        recipe = recipe_from_dict(values, base=preset_recipe(values.get("preset", "demo"), stage))
    else:
        source, target = source or "synthetic", target or "synthetic"
        source_spec, target_spec = parse_dataset_spec(source), parse_dataset_spec(target)
        if preset is None:
            preset = "demo" if source_spec.is_synthetic and target_spec.is_synthetic else (
                "paper-daformer" if arch in DAFORMER_ARCHS else "paper")
        recipe = preset_recipe(preset, stage, source, target)
        if config_file:
            recipe = recipe_from_dict(load_yaml(config_file), base=recipe)
            recipe.stage = stage
        choose_network(recipe, arch, pretrained)
        if seed is not None:
            recipe.train.seed = seed
        if bf16 is not None:
            recipe.train.bf16 = bf16
    if iters is not None:
        recipe.train.iters = iters
    recipe = apply_overrides(recipe, overrides)
    return absolute_paths(validate_recipe(recipe) if check else recipe)


def print_wide(console, renderable) -> None:
    """Print ``renderable`` (e.g. a table with a column per class) at its natural width even where that is
    wider than the console: the terminal wraps long lines, instead of rich cutting every cell to '…'.
    Widens ``console`` for good (the commands make a console per table)."""
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update(width=10_000), renderable).maximum
    console.width = max(console.width, width)
    console.print(renderable)
