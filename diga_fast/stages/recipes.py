"""The recipe a command names: preset -> --config -> named options -> KEY=VALUE overrides (or, on
--resume, the run's own config.yaml), checked, with absolute paths; what a stage takes over from the run it
starts from (self-training's --init); and the self-training recipe of the labelling commands."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from diga_fast.config import (
    DAFORMER_ARCHS,
    Recipe,
    absolute_paths,
    apply_overrides,
    choose_network,
    inherit_run,
    load_yaml,
    preset_recipe,
    recipe_changes,
    recipe_from_dict,
    validate_recipe,
)
from diga_fast.data import parse_dataset_spec, split_dataset_specs
from diga_fast.engine.logging import console
from diga_fast.errors import DigaError


def resolve_recipe(stage: str, *, source: str | None, target: str | None, preset: str | None,
                   config_file: str | None, arch: str | None, pretrained: str | None, iters: int | None,
                   seed: int | None, bf16: bool | None, resume: bool, out: str, overrides: tuple[str, ...],
                   check: bool = True, restarted: bool = False, init: str | None = None) -> Recipe:
    """Preset -> --config -> named options -> KEY=VALUE overrides; paths in it made absolute. On
    --resume the run's own config.yaml is the recipe: only --iters and overrides may change it, and
    any other recipe option is refused rather than silently ignored (``restarted``: a torchelastic
    restart, whose command line is the first launch's, options and all). A stage started from another
    run (``init``: self-training's --init, a labelling command's --checkpoint) starts from that run's
    preset and everything its command set (:func:`init_recipe`), and says what it took and what this
    command's options changed. ``check=False`` skips the checks (``diga recipe show`` prints a recipe
    that still lacks its weights or translator)."""
    if resume and not restarted:
        ignored = [name for name, value in (("--source", source), ("--target", target), ("--preset", preset),
                                             ("--config", config_file), ("--model", arch), ("--pretrained", pretrained),
                                             ("--seed", seed), ("--bf16/--no-bf16", bf16)) if value is not None]
        if ignored:
            raise DigaError(f"--resume continues {out} with its own config.yaml; {', '.join(ignored)} cannot change it "
                            "(only --iters and KEY=VALUE overrides can)")
    inherited = None
    if resume:
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
        inherited = init_recipe(init, stage, source, target, preset) if init is not None else None
        if inherited is not None:
            recipe = copy.deepcopy(inherited)
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
    if inherited is not None and (changed := recipe_changes(inherited.to_dict(), recipe)):
        console.print(f"changed by this command: {'; '.join(changed)}", highlight=False)
    return absolute_paths(validate_recipe(recipe) if check else recipe)


def init_recipe(init: str, stage: str, source: str | None, target: str | None, preset: str | None) -> Recipe | None:
    """The ``stage`` recipe of a run started from the run ``init`` (a run folder, or a weight file in
    one): the preset of ``init`` (or ``preset``) for this stage, with everything ``init``'s command set
    (network, optimiser, sampling, translator, sizes, ...; not its stage and length), printed. None
    when ``init`` has no config.yaml (a bare weight file)."""
    saved = Path(init) / "config.yaml" if Path(init).is_dir() else Path(init).parent / "config.yaml"
    if not saved.is_file():
        return None
    values = load_yaml(saved)
    data = values.get("data") if isinstance(values.get("data"), dict) else {}
    chosen = preset or str(values.get("preset", "demo"))
    recipe = preset_recipe(chosen, stage, source or str(data.get("source", "synthetic")),
                           target or str(data.get("target", "synthetic")))
    taken = inherit_run(recipe, values)
    where = "--preset" if preset else "its preset"
    console.print(f"from {saved}: the {chosen} recipe ({where})" + (f", with {', '.join(taken)}" if taken else ""),
                  highlight=False)
    return recipe


def labelling_recipe(checkpoint: str, target: str | None, preset: str | None, config_file: str | None,
                     seed: int | None, overrides: tuple[str, ...]) -> Recipe:
    """The self-training recipe these options resolve to from the run of ``checkpoint`` (its target,
    pair size, seed, scales), checked for what labelling uses: not the training's starting points
    (ImageNet weights, translator)."""
    recipe = resolve_recipe("self", source=None, target=target, preset=preset, config_file=config_file, arch=None,
                            pretrained=None, iters=None, seed=seed, bf16=None, resume=False, out="",
                            overrides=overrides, check=False, init=checkpoint)
    return absolute_paths(validate_recipe(recipe, starting_points=False))


def eval_targets_override(text: str) -> str:
    """``--eval-targets KIND:ROOT,...`` as the override ``train.eval_targets=[...]`` (which --resume takes
    too): a comma starts a new dataset only where a dataset kind follows it."""
    return f"train.eval_targets={json.dumps(split_dataset_specs(text))}"


def restarted_by_torchelastic(out: str | Path, resume: bool) -> bool:
    """Whether this worker was restarted by torchelastic after a failure (``TORCHELASTIC_RESTART_COUNT``
    > 0) and ``out`` holds a checkpoint: then it resumes from it by itself, since the restart repeats
    the first launch's command line, which has no --resume. A first launch is unchanged."""
    if resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) == 0:
        return False
    out = Path(out)
    return (out / "state.pt").is_file() or (out / "round_1" / "state.pt").is_file()
