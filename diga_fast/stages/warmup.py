"""Stage 1 of DiGA, "distil to generalize" (method.md): source data only.

Per iteration, on a source batch (x_s, y_s):
  1. strong view      x_aug = beta * A(x_s) + (1 - beta) * x_s
  2. CrDoMix          x_cdm = M * x_aug + (1 - M) * G(x_s), M = ClassMix choice over y_s (+255)
  3. EMA teacher      theta_T <- alpha theta_T + (1 - alpha) theta_S, before the forward pass
  4. loss             CE(S(x_s), y_s) + lambda_d * [CE(p_T(x_s), p_S(x_cdm)) + s * CE(p_T(x_cdm), p_S(x_s))]
  5. SGD, head x10 LR, poly decay.

Ablation switches (``warmup.distill``, ``warmup.crdomix``): without distillation the CrDoMix view is
used as plain augmentation (CE on both views, no teacher); without CrDoMix the second view is the
strong view alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diga_fast.config import Recipe
from diga_fast.data.build import source_train_dataset, target_train_dataset
from diga_fast.engine.device import autocast, training_forward
from diga_fast.engine.logging import save_grid
from diga_fast.engine.optim import backward_step
from diga_fast.method.augment import strong_view
from diga_fast.method.ema import ema_update, make_teacher
from diga_fast.method.losses import cross_view_distillation, source_cross_entropy
from diga_fast.method.mixing import crdomix
from diga_fast.method.translators import build_translator
from diga_fast.models import upsample_to
from diga_fast.stages.common import Stage, resumable


@resumable
def train_warmup(recipe: Recipe, out: str | Path, device: str | None = None, resume: bool = False) -> dict:
    """Run the warm-up; returns the student's target-val summary (also in ``eval.json``)."""
    cfg = recipe.warmup
    stage = Stage(recipe, out, device, resume)
    source_set = source_train_dataset(recipe, stage.label_space, translated=cfg.crdomix)
    target_set = target_train_dataset(recipe, stage.label_space)
    student = stage.segmentation_model()  # a bad --pretrained stops here, before the run folder exists
    run = stage.open_run()
    teacher = make_teacher(student, cfg.teacher_mode)
    optimizer = stage.optimizer(student)
    networks = {"student": student, "teacher": teacher}
    stage.restore(networks, optimizer)
    trained = training_forward(student, recipe, stage.device, teacher)  # channels_last, DDP, compile as asked
    source_batches = stage.source_loader(source_set)
    target_images = (batch["image"] for batch in stage.loader(target_set))
    translator = build_translator(recipe, target_images, stage.device) if cfg.crdomix else None
    device, generator = stage.device, stage.generator

    student.train()
    for step, lr in stage.steps("warm-up", optimizer):
        ema_update(teacher, student, step, cfg.ema_max)  # 3. (before the forward pass)
        batch = next(source_batches)
        x_s, y_s = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)

        # 1-2. strong view, CrDoMix with the translated source
        x_aug = strong_view(x_s, cfg.aug, generator)
        translated = translator(x_s, batch) if translator is not None else None
        x_view = crdomix(x_aug, translated, y_s, generator) if translator is not None else x_aug

        # 4. CE on the clean view + two-way cross-view distillation from the teacher
        with autocast(device, recipe.train.bf16):
            logits_clean, logits_view = trained(torch.cat([x_s, x_view]))[0].chunk(2)
        loss_ce = source_cross_entropy(logits_clean, y_s, recipe.train)
        terms = {"loss_ce": loss_ce}
        if cfg.distill:
            with torch.no_grad(), autocast(device, recipe.train.bf16):
                teacher_clean, teacher_view = teacher(torch.cat([x_s, x_view]))[0].chunk(2)
            size = y_s.shape[-2:]
            terms["loss_dist"] = cross_view_distillation(
                upsample_to(logits_clean, size), upsample_to(logits_view, size),
                upsample_to(teacher_clean, size), upsample_to(teacher_view, size),
                reverse_scale=cfg.reverse_scale, temperature=cfg.temperature,
            )
            loss = loss_ce + cfg.lambda_distill * terms["loss_dist"]
        else:
            terms["loss_ce_view"] = source_cross_entropy(logits_view, y_s, recipe.train)
            loss = loss_ce + terms["loss_ce_view"]
        run.check_finite(step + 1, loss=loss)
        backward_step(loss, optimizer, student)  # 5.

        if stage.is_due(cfg.visualize_every, step + 1):
            save_grid(run.dir / "images" / f"{step + 1:07d}.png", stage.label_space,
                      images=[x_s, x_aug] + ([translated, x_view] if translated is not None else []),
                      labels=[y_s, logits_view.detach().argmax(1)],
                      titles=["source", "strong view"] + (["translation", "CrDoMix"] if translated is not None else [])
                      + ["ground truth", "prediction"])
        stage.end_step(step + 1, loss, lr, networks, optimizer, evaluate=student,
                       extras=lambda: {"generator": generator.get_state()}, log=lambda: terms)

    return stage.finish(student, networks, optimizer, {"generator": generator.get_state()})
