"""``diga train ...``: the training stages."""

from __future__ import annotations

import click
from rich.console import Console

from diga_fast.cli.common import resolve_recipe, training_options, translator_training_options
from diga_fast.cli.tables import iou_table, targets_table
from diga_fast.utils.io import check_out_folder
from diga_fast.utils.printing import print_wide


def _console() -> Console:
    """stdout for the results; quiet on every rank but 0 under torchrun."""
    from diga_fast.utils import dist

    return Console(quiet=not dist.current().is_main)


_EVAL_TARGETS = click.option(
    "--eval-targets", default=None, metavar="KIND:ROOT,...",
    help="More labelled datasets (e.g. bdd100k:B,mapillary:M) whose val mIoU is reported beside the target's at "
         "the end (and at every train.eval_every with train.select_on_val): the generalisation table, in eval.json. "
         "Sets train.eval_targets.")


_SELECT_ON_VAL = click.option(
    "--select-on-val/--no-select-on-val", default=None,
    help="Evaluate on target val every train.eval_every iterations and keep the best weights in best/, which later "
         "stages take (the official model selection: it uses target labels; on in the paper preset). "
         "Sets train.select_on_val.")


def _fold_flags(options: dict) -> dict:
    """--eval-targets and --select-on-val as the KEY=VALUE overrides ``train.eval_targets=[...]`` and
    ``train.select_on_val=...`` (which --resume also takes)."""
    from diga_fast.stages.recipes import eval_targets_override

    text = options.pop("eval_targets")
    if text is not None:
        options["overrides"] = (*options["overrides"], eval_targets_override(text))
    select = options.pop("select_on_val", None)
    if select is not None:
        options["overrides"] = (*options["overrides"], f"train.select_on_val={str(select).lower()}")
    return options


def _resume_or_restart(out: str, resume: bool) -> tuple[bool, bool]:
    """(resume, restarted): a worker torchelastic restarted after a failure resumes by itself."""
    from diga_fast.stages.recipes import restarted_by_torchelastic

    restarted = restarted_by_torchelastic(out, resume)
    if restarted:
        click.echo(f"torchelastic restart: resuming {out} from its last checkpoint", err=True)
    return resume or restarted, restarted


def _start(stage: str, recipe, out: str, device: str, resume: bool, force: bool, dry_run: bool, train) -> dict | None:
    """Check --out, then train (the stage's summary), or with --dry-run print the plan (None)."""
    if not dry_run:
        check_out_folder(out, stage, resume, force)
        return train(recipe, out, device=device, resume=resume)
    from diga_fast.stages.plan import dry_run as plan

    if force:
        note = f"{out}: --force would replace what is there"
    else:
        check_out_folder(out, stage, resume, False)
        note = f"{out}: {'resumed' if resume else 'a new run'}"
    rows = [*plan(stage, recipe, device, train), ("--out", note)]
    console = _console()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        console.print(f"{name:<{width}}  {value}", highlight=False, soft_wrap=True)
    console.print("dry run: nothing was trained or written to --out", highlight=False)
    return None


def _print_summary(summary: dict, title: str) -> None:
    """The target's per-class table, then the generalisation table when the run evaluated more datasets."""

    _console().print(iou_table(summary, title=title))
    if summary.get("targets"):
        print_wide(_console(), targets_table(summary["targets"], title="val IoU % of the target and every train.eval_targets dataset"))


@click.group()
def train() -> None:
    """Train a model: source (supervised baseline / oracle), and the DiGA stages."""


@train.command("source")
@training_options
@_EVAL_TARGETS
@_SELECT_ON_VAL
def train_source_command(out, device, resume, force, dry_run, **options) -> None:
    """Supervised training on --source (the source-only baseline); evaluates on --target val.

    The oracle on the built-in pair: --source synthetic:target (trains on the target's labels)."""
    from diga_fast.stages.source_only import train_source

    resume, restarted = _resume_or_restart(out, resume)
    recipe = resolve_recipe("source", out=out, resume=resume, restarted=restarted, **_fold_flags(options))
    summary = _start("source", recipe, out, device, resume, force, dry_run, train_source)
    if summary is None:
        return
    _print_summary(summary, f"target val ({recipe.data.target}) after {recipe.train.iters} iterations")
    _console().print(f"run folder: {out}")


@train.command("warmup")
@training_options
@_EVAL_TARGETS
@_SELECT_ON_VAL
def train_warmup_command(out, device, resume, force, dry_run, **options) -> None:
    """DiGA stage 1: CE on the source + two-way distillation between the clean and the CrDoMix
    view with an EMA teacher (source data only; the target feeds the FDA translator).

    Ablations: warmup.distill=false, warmup.crdomix=false, translator.kind=fda|cyclegan.
    --eval-targets adds the paper's generalisation table (e.g. Cityscapes, BDD100K, Mapillary)."""
    from diga_fast.stages.warmup import train_warmup

    resume, restarted = _resume_or_restart(out, resume)
    recipe = resolve_recipe("warmup", out=out, resume=resume, restarted=restarted, **_fold_flags(options))
    summary = _start("warmup", recipe, out, device, resume, force, dry_run, train_warmup)
    if summary is None:
        return
    _print_summary(summary, f"student on target val ({recipe.data.target}) after {recipe.train.iters} warm-up iterations")
    _console().print(f"run folder: {out}")


@train.command("translator")
@translator_training_options
def train_translator_command(out, device, resume, force, dry_run, **options) -> None:
    """Train the source->target image translator (Stage 0, CycleGAN-style) on --source/--target.

    The perceptual term needs a local torchvision VGG state dict: translator.vgg_weights=FILE.
    Use the result in later stages with translator.kind=cyclegan translator.checkpoint=RUN."""
    from diga_fast.stages.translator import train_translator

    resume, restarted = _resume_or_restart(out, resume)
    recipe = resolve_recipe("translator", out=out, resume=resume, restarted=restarted, arch=None, pretrained=None, **options)
    summary = _start("translator", recipe, out, device, resume, force, dry_run, train_translator)
    if summary is None:
        return
    console = _console()
    console.print(f"translator saved: {summary['translator']} ({summary['iters']} iterations, "
                  f"perceptual loss {'on' if summary['perceptual'] else 'off'})", highlight=False)
    console.print(f"run folder: {out}")


@train.command("self")
@click.option("--init", "init", type=click.Path(), default=None, help="Warm-up run folder (or student .safetensors) to adapt.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True, help="Self-training rounds (each relabels with the last student).")
@training_options
@_EVAL_TARGETS
@_SELECT_ON_VAL
def train_self_command(init, rounds, out, device, resume, force, dry_run, **options) -> None:
    """DiGA stage 2: threshold-free bilateral-consensus self-training from a warm-up student.

    Probability labels and initial centroids are made from --init unless
    self_training.pseudo_labels=DIR / self_training.centroids=FILE name existing ones.
    Ablations: self_training.labels=consensus|prob|feat|threshold, self_training.metric=cosine|l2."""
    from diga_fast.stages.self_training import train_self_rounds

    resume, restarted = _resume_or_restart(out, resume)
    recipe = resolve_recipe("self", out=out, resume=resume, restarted=restarted, init=init, **_fold_flags(options))
    summary = _start("self", recipe, out, device, resume, force, dry_run,
                     lambda recipe, out, **kw: train_self_rounds(recipe, out, init, rounds=rounds, **kw))
    if summary is None:
        return
    _print_summary(summary, f"student on target val ({recipe.data.target}) after self-training")
    _console().print(f"run folder: {out}")
