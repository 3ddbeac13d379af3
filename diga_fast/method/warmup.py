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

from diga_fast.data.labels import get_label_space
from diga_fast.data.loader import make_loader
from diga_fast.engine import distributed
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
from diga_fast.kernels import default_backend
from diga_fast.method.augment import strong_view
from diga_fast.method.common import (
    evaluate_on_target,
    source_train_dataset,
    target_train_dataset,
    target_val_dataset,
)
from diga_fast.method.ema import ema_update, make_teacher
from diga_fast.method.losses import cross_view_distillation, source_cross_entropy, upsample_to
from diga_fast.method.mixing import crdomix
from diga_fast.method.translators import build_translator
from diga_fast.method.visualize import save_grid
from diga_fast.models import build_model


def train_warmup(recipe: Recipe, out: str | Path, device: str | None = None, resume: bool = False) -> dict:
    """Run the warm-up; returns the student's target-val summary (also in ``eval.json``)."""
    cfg = recipe.warmup
    device = resolve_device(device)
    seed_everything(recipe.train.seed)
    label_space = get_label_space(recipe.data.label_space)
    source_set = source_train_dataset(recipe, label_space, translated=cfg.crdomix)
    target_set = target_train_dataset(recipe, label_space)
    target_val_dataset(recipe, label_space)  # fail on a bad target before training starts

    run = TrainingRun(recipe, out, resume)
    student = build_model(recipe.model.arch, label_space.num_classes, recipe.model.pretrained).to(device)
    student.set_training_options(recipe.model.dropout, recipe.model.freeze_bn_stats)
    teacher = make_teacher(student)
    optimizer = build_optimizer(student, recipe)
    generator = distributed.ShardedGenerator(recipe.train.seed)  # augmentation and ClassMix draws
    networks = {"student": student, "teacher": teacher}
    extras = run.restore(networks, optimizer)
    if "generator" in extras:
        generator.set_state(extras["generator"])
    trained = training_forward(student, recipe, device, teacher)  # channels_last, DDP, compile as asked

    def loader(dataset):
        return make_loader(dataset, batch_size=recipe.data.batch_size, shuffle=True, num_workers=recipe.data.num_workers,
                           seed=recipe.train.seed, drop_last=True, infinite=True, start_step=run.step)

    source_batches = loader(source_set)
    target_images = (batch["image"] for batch in loader(target_set))
    translator = build_translator(recipe, target_images, device) if cfg.crdomix else None

    total = recipe.train.iters
    student.train()
    with run.progress(total, f"warm-up ({recipe.data.source})") as tick, \
            default_backend(None if recipe.train.kernels else "torch"):
        for step in range(run.step, total):
            lr = set_poly_lr(optimizer, step, total, recipe.optim.poly_power)
            ema_update(teacher, student, step, cfg.ema_max)
            batch = next(source_batches)
            x_s, y_s = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)

            x_aug = strong_view(x_s, cfg.aug, generator)
            translated = translator(x_s, batch) if translator is not None else None
            x_view = crdomix(x_aug, translated, y_s, generator) if translator is not None else x_aug

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
            backward_step(loss, optimizer, student)

            done = step + 1
            tick(done, loss=loss)
            if run.should_log(done):
                run.log(done, loss=loss, lr=lr, **terms)
            if run.is_main and cfg.visualize_every and (done % cfg.visualize_every == 0 or done == total):
                prediction = logits_view.detach().argmax(1)
                save_grid(run.dir / "images" / f"{done:07d}.png", label_space,
                          images=[x_s, x_aug] + ([translated, x_view] if translated is not None else []),
                          labels=[y_s, prediction])
            run.checkpoint_and_evaluate(done, networks, optimizer, extras=lambda: {"generator": generator.get_state()},
                                        evaluate=lambda: evaluate_on_target(student, recipe, label_space, device))

    summary = evaluate_on_target(student, recipe, label_space, device)
    return run.finish(summary, networks, optimizer, {"generator": generator.get_state()})
