"""Supervised training on a labelled dataset: the source-only baseline (and, pointed at the target's
labels, the oracle). The DiGA stages use the same engine; this is the plainest loop of them all."""

from __future__ import annotations

from pathlib import Path


from diga_fast.data.labels import get_label_space
from diga_fast.data.loader import make_loader
from diga_fast.engine.recipe import Recipe
from diga_fast.engine.training import (
    TrainingRun,
    autocast,
    backward_step,
    build_optimizer,
    resolve_device,
    seed_everything,
    set_poly_lr,
    training_forward,
)
from diga_fast.method.common import evaluate_on_target, source_train_dataset, target_val_dataset
from diga_fast.method.losses import source_cross_entropy
from diga_fast.models import build_model


def train_source(recipe: Recipe, out: str | Path, device: str | None = None, resume: bool = False) -> dict:
    """Train ``recipe.model`` on ``recipe.data.source`` with CE; evaluate on the target's val split.
    Returns the final evaluation summary (also written to ``eval.json`` in the run folder)."""
    device = resolve_device(device)
    seed_everything(recipe.train.seed)
    label_space = get_label_space(recipe.data.label_space)
    train_set = source_train_dataset(recipe, label_space)
    target_val_dataset(recipe, label_space)  # fail on a bad target before training starts

    run = TrainingRun(recipe, out, resume)
    model = build_model(recipe.model.arch, label_space.num_classes, recipe.model.pretrained).to(device)
    model.set_training_options(recipe.model.dropout, recipe.model.freeze_bn_stats)
    optimizer = build_optimizer(model, recipe)
    run.restore({"model": model}, optimizer)
    trained = training_forward(model, recipe, device)  # channels_last, DDP, compile as asked

    total = recipe.train.iters
    batches = make_loader(
        train_set, batch_size=recipe.data.batch_size, shuffle=True, num_workers=recipe.data.num_workers,
        seed=recipe.train.seed, drop_last=True, infinite=True, start_step=run.step,
    )
    model.train()
    with run.progress(total, f"train source ({recipe.data.source})") as tick:
        for step in range(run.step, total):
            lr = set_poly_lr(optimizer, step, total, recipe.optim.poly_power)
            batch = next(batches)
            images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            with autocast(device, recipe.train.bf16):
                logits, _ = trained(images)
            loss = source_cross_entropy(logits, labels, recipe.train)
            run.check_finite(step + 1, loss=loss)
            backward_step(loss, optimizer, model)

            done = step + 1
            tick(done, loss=loss)
            if run.should_log(done):
                run.log(done, loss=loss, lr=lr)
            run.checkpoint_and_evaluate(done, {"model": model}, optimizer, extras=dict,
                                        evaluate=lambda: evaluate_on_target(model, recipe, label_space, device))

    summary = evaluate_on_target(model, recipe, label_space, device)
    return run.finish(summary, {"model": model}, optimizer)

