"""``diga recipe show`` (the resolved recipe of a preset) and ``diga recipe table`` (the fidelity table
of the ``paper`` preset against the official code, as in docs/fidelity.md)."""

from __future__ import annotations

import click

from diga_fast.cli.common import labelling_options

STAGES = ("source", "translator", "warmup", "self")


@click.group()
def recipe() -> None:
    """Show recipes: what a preset resolves to, and how `paper` compares with the official code."""


@recipe.command("show")
@click.option("--stage", type=click.Choice(STAGES), default="warmup", show_default=True)
@click.option("--source", default=None, help="Source data (decides SYNTHIA's differences) [default: synthetic].")
@labelling_options
def show(stage, source, target, preset, config_file, seed, device, overrides) -> None:
    """Print the fully resolved recipe (YAML) a training command would run with these options."""
    import yaml

    from diga_fast.cli.common import resolve_recipe

    resolved = resolve_recipe(stage, source=source, target=target, preset=preset, config_file=config_file, arch=None,
                              pretrained=None, iters=None, seed=seed, bf16=None, resume=False, out="",
                              overrides=overrides, check=False)
    click.echo(yaml.safe_dump(resolved.to_dict(), sort_keys=False), nl=False)


@recipe.command("table")
def table() -> None:
    """The fidelity table of docs/fidelity.md (Markdown): every element of method.md, official code vs presets."""
    from diga_fast.fidelity import fidelity_table

    click.echo(fidelity_table(), nl=False)
