"""Supervised training on a labelled dataset: the source-only baseline (and, pointed at the target's
labels, the oracle). The plainest loop of them all."""

from __future__ import annotations

from pathlib import Path

from diga_fast.config import Recipe
from diga_fast.data.build import source_train_dataset
from diga_fast.engine.device import autocast, training_forward
from diga_fast.engine.optim import backward_step
from diga_fast.method.losses import source_cross_entropy
from diga_fast.stages.common import Stage, resumable


@resumable
def train_source(recipe: Recipe, out: str | Path, device: str | None = None, resume: bool = False) -> dict:
    """Train ``recipe.model`` on ``recipe.data.source`` with CE; evaluate on the target's val split.
    Returns the final evaluation summary (also written to ``eval.json`` in the run folder)."""
    stage = Stage(recipe, out, device, resume)
    train_set = source_train_dataset(recipe, stage.label_space)
    model = stage.segmentation_model()  # a bad --pretrained stops here, before the run folder exists
    run = stage.open_run()
    optimizer = stage.optimizer(model)
    networks = {"model": model}
    stage.restore(networks, optimizer)
    trained = training_forward(model, recipe, stage.device)  # channels_last, DDP, compile as asked
    batches = stage.source_loader(train_set)

    model.train()
    for step, lr in stage.steps("source", optimizer):
        batch = next(batches)
        images, labels = batch["image"].to(stage.device, non_blocking=True), batch["label"].to(stage.device, non_blocking=True)
        with autocast(stage.device, recipe.train.bf16):
            logits, _ = trained(images)
        loss = source_cross_entropy(logits, labels, recipe.train)
        run.check_finite(step + 1, loss=loss)
        backward_step(loss, optimizer, model)
        stage.end_step(step + 1, loss, lr, networks, optimizer, evaluate=model)

    return stage.finish(model, networks, optimizer)
