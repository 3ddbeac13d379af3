"""Stage 2 of DiGA, "then adapt" (method.md): threshold-free bilateral-consensus self-training.

Before the loop: the student starts from the warm-up student, the teacher is reset to a copy of it,
the probability labels y_prob (``diga pseudo-label``) and the initial centroids (``diga centroids``)
are made from it unless given. Per iteration, source (x_s, y_s) and target (x_t, y_prob crop):
  1. feature labels   y_feat = nearest centroid of T's feature on the clean x_t
  2. consensus        y = y_prob where y_prob == y_feat, else 255 (inside the fused CE)
  3. ClassMix         x_mix = M' x_s + (1 - M') x_aug_t, labels y_s on M', consensus elsewhere
  4. CrDoMix          x_cdm as in the warm-up; S and T see [x_s ; x_cdm]
  5. loss             CE(S(x_s), y_s) + CE_consensus(S(x_mix)) + lambda_d * L_dist
  6. centroids        EMA from T's features: target (argmax == consensus), source x_cdm (argmax == y_s)
  7. rounds           round r+1 relabels with round r's student (:func:`train_self_rounds`)

``self_training.labels`` switches the target labels for the ablations (:mod:`diga_fast.method.consensus`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from diga_fast.config import Recipe
from diga_fast.data.build import source_train_dataset, target_images, target_train_dataset, target_transform
from diga_fast.engine.device import autocast, training_forward
from diga_fast.engine.logging import console, save_grid
from diga_fast.engine.optim import backward_step
from diga_fast.errors import DigaError
from diga_fast.method.augment import strong_view
from diga_fast.method.centroids import agreement_labels, update_centroids
from diga_fast.method.consensus import consensus_labels, consensus_loss, feature_labels, label_quality, target_labels
from diga_fast.method.ema import ema_update, make_teacher
from diga_fast.method.losses import cross_view_distillation, source_cross_entropy
from diga_fast.method.mixing import classmix, classmix_labels, classmix_selection, crdomix, narrow_labels
from diga_fast.method.pseudo_labels import PseudoLabelled
from diga_fast.method.translators import build_translator
from diga_fast.models import build_model, upsample_to
from diga_fast.models.io import load_centroids, load_model, save_centroids
from diga_fast.stages.common import Stage, resumable, phase
from diga_fast.stages.labelling import make_initial_centroids, make_probability_labels
from diga_fast.utils import dist


@resumable
def train_self(recipe: Recipe, out: str | Path, init: str | Path | None, device: str | None = None,
               resume: bool = False) -> dict:
    """One self-training round from the student in ``init`` (a warm-up or earlier round run)."""
    cfg = recipe.self_training
    stage = Stage(recipe, out, device, resume)
    source_set = source_train_dataset(recipe, stage.label_space, translated=recipe.warmup.crdomix)
    init_model = None if resume else load_init(init, recipe, stage.label_space.num_classes)
    run = stage.open_run()
    student = stage.segmentation_model(build_model(recipe.model.arch, stage.label_space.num_classes) if resume else init_model)
    teacher = make_teacher(student, recipe.warmup.teacher_mode)  # reset to the starting student
    optimizer = stage.optimizer(student)
    networks = {"student": student, "teacher": teacher}
    if resume:
        extras = stage.restore(networks, optimizer)
        label_dir, centroids = Path(extras["pseudo_labels"]), extras["centroids"].to(stage.device)
    else:
        label_dir, centroids = prepare_inputs(recipe, student, run.dir, stage.label_space, stage.device)
        if run.is_main:
            save_centroids(run.dir / "initial_centroids.pt", centroids)
    grouped = cfg.forward == "grouped"  # official: [x_s; x_cdm] and x_mix in two forwards (BN statistics per group)
    trained = training_forward(student, recipe, stage.device, teacher, separate=grouped)  # + channels_last, DDP, compile

    target_set = PseudoLabelled(target_images(recipe, stage.label_space), label_dir, stage.label_space.num_classes,
                                target_transform(recipe))
    source_batches, target_batches = stage.source_loader(source_set), stage.loader(target_set)
    style_images = (batch["image"] for batch in stage.loader(target_train_dataset(recipe, stage.label_space)))
    translator = build_translator(recipe, style_images, stage.device) if recipe.warmup.crdomix else None
    source_aug = recipe.warmup.aug if cfg.source_beta is None else dataclasses.replace(recipe.warmup.aug, beta=cfg.source_beta)
    target_aug = dataclasses.replace(recipe.warmup.aug, beta=cfg.target_beta)
    device, generator = stage.device, stage.generator

    def stage_state() -> dict:
        return {"centroids": centroids.cpu(), "pseudo_labels": str(label_dir), "generator": generator.get_state()}

    student.train()
    for step, lr in stage.steps("self-training", optimizer):
        with phase("ema"):
            ema_update(teacher, student, step, recipe.warmup.ema_max)
        with phase("data"):
            source, target = next(source_batches), next(target_batches)
            x_s, y_s = source["image"].to(device, non_blocking=True), source["label"].to(device, non_blocking=True)
            x_t = target["image"].to(device, non_blocking=True)
            y_prob = target["pseudo_label"].to(device, non_blocking=True)
        size = y_s.shape[-2:]

        # 1-2. feature-induced labels from the teacher on the clean target; consensus pairs
        with phase("teacher"), torch.no_grad(), autocast(device, recipe.train.bf16):
            t_logits, t_feat = teacher(x_t)
        with phase("labelling"):
            y_feat = feature_labels(t_feat, centroids, y_prob.shape[-2:], cfg.metric, cfg.feat_upsample)
            prob, feat = target_labels(cfg.labels, y_prob, y_feat, target["confidence"].to(device), cfg.threshold)

        with phase("mixing"):
            # 3. cross-domain ClassMix: source classes pasted onto the strongly augmented target
            y_s8 = narrow_labels(y_s)  # one byte per pixel for both blends
            selected = classmix_selection(y_s, generator)
            x_mix = classmix(x_s, strong_view(x_t, target_aug, generator), y_s, selected, narrow=y_s8)
            prob_mix, feat_mix = classmix_labels(selected, y_s, prob), classmix_labels(selected, y_s, feat)
            # 4. CrDoMix on the source
            x_aug = strong_view(x_s, source_aug, generator)
            x_cdm = (crdomix(x_aug, translator(x_s, source), y_s, generator, narrow=y_s8) if translator is not None
                     else x_aug)

        # 5. losses
        with phase("forward"):
            with autocast(device, recipe.train.bf16):
                if grouped:
                    (s_source, _), (s_mix, _) = trained(torch.cat([x_s, x_cdm]), x_mix)
                    s_clean, s_cdm = s_source.chunk(2)
                else:
                    s_clean, s_cdm, s_mix = trained(torch.cat([x_s, x_cdm, x_mix]))[0].chunk(3)
            with torch.no_grad(), autocast(device, recipe.train.bf16):
                t_src_logits, t_src_feat = teacher(torch.cat([x_s, x_cdm]))
            t_clean, t_cdm = t_src_logits.chunk(2)
            loss_src = source_cross_entropy(s_clean, y_s, recipe.train)
            loss_mix = consensus_loss(s_mix, prob_mix, feat_mix, recipe.train)
            loss_dist = cross_view_distillation(upsample_to(s_clean, size), upsample_to(s_cdm, size),
                                                upsample_to(t_clean, size), upsample_to(t_cdm, size),
                                                reverse_scale=cfg.reverse_scale)
            loss = loss_src + loss_mix + cfg.lambda_distill * loss_dist

        # 6. online centroids from the teacher (before the student's update, as the official code)
        with phase("centroids"):
            consensus = consensus_labels(prob, feat)
            update_centroids(centroids, t_feat, agreement_labels(t_logits, consensus), cfg.centroid_momentum,
                             cfg.centroid_min_pixels)
            update_centroids(centroids, t_src_feat.chunk(2)[1], agreement_labels(t_cdm, y_s), cfg.centroid_momentum,
                             cfg.centroid_min_pixels)
        run.check_finite(step + 1, loss=loss, centroids=centroids.sum())  # NaN features reach the centroids

        with phase("backward"):
            backward_step(loss, optimizer, student)

        if stage.is_due(recipe.warmup.visualize_every, step + 1):
            save_grid(run.dir / "images" / f"{step + 1:07d}.png", stage.label_space, images=[x_t, x_mix],
                      labels=[y_prob, y_feat, consensus, prob_mix, s_mix.detach().argmax(1)],
                      titles=["target", "mix", "probability labels", "feature labels", "consensus", "mixed label",
                              "prediction"])
        stage.end_step(step + 1, loss, lr, networks, optimizer, evaluate=student, extras=stage_state,
                       log=lambda: {"loss_src": loss_src, "loss_mix": loss_mix, "loss_dist": loss_dist,
                                    **label_quality(consensus, target["label"].to(device), prob=y_prob, feat=y_feat)})

    if run.is_main:
        save_centroids(run.dir / "centroids.pt", centroids)
    return stage.finish(student, networks, optimizer, stage_state())


def load_init(init: str | Path | None, recipe: Recipe, num_classes: int):
    """The starting student of ``--init``, checked against the recipe before anything is written."""
    if init is None:
        raise DigaError("diga train self needs --init WARMUP_RUN (the warm-up run folder or student weights)")
    model, _ = load_model(init)
    if model.arch != recipe.model.arch or model.num_classes != num_classes:
        raise DigaError(f"--init {init} holds a {model.arch} with {model.num_classes} classes; the recipe "
                        f"trains a {recipe.model.arch} with {num_classes}")
    return model


def prepare_inputs(recipe: Recipe, model, run_dir: Path, label_space, device: torch.device):
    """Probability labels and initial centroids from the starting student ``model`` (unless the recipe
    names existing ones). Returns (pseudo-label folder, centroids [K, D])."""
    cfg = recipe.self_training
    images = target_images(recipe, label_space)
    label_dir = Path(cfg.pseudo_labels) if cfg.pseudo_labels else run_dir / "pseudo_labels"
    if not cfg.pseudo_labels:
        make_probability_labels(model, images, label_dir, label_space, device, cfg.pseudo_label_scales, fresh=True)
    if cfg.centroids:
        centroids = load_centroids(cfg.centroids, model)
    else:
        centroids, _ = make_initial_centroids(model, images, device)
    return label_dir, centroids.to(device)


def train_self_rounds(recipe: Recipe, out: str | Path, init: str | Path | None, rounds: int = 1,
                      device: str | None = None, resume: bool = False) -> dict:
    """``rounds`` self-training rounds: round r+1 starts from round r's student, relabels the target
    with it (new probability labels and initial centroids), resets the teacher and restarts the LR
    schedule. One round writes into ``out``; several write ``out/round_1`` ... ``out/round_N``."""
    if rounds < 1:
        raise DigaError(f"--rounds must be at least 1, got {rounds}")
    out = Path(out)
    if rounds > 1 and recipe.self_training.pseudo_labels:
        raise DigaError("self_training.pseudo_labels fixes the labels of round 1 only; it cannot be combined with --rounds > 1")
    later = copy.deepcopy(recipe)  # later rounds make their own labels and centroids
    later.self_training.pseudo_labels = later.self_training.centroids = None
    summary: dict = {}
    for round_index in range(1, rounds + 1):
        round_dir = out if rounds == 1 else out / f"round_{round_index}"
        if resume and (round_dir / "eval.json").is_file() and rounds > 1:
            init = round_dir  # this round finished before the interruption
            continue
        round_resume = resume and (round_dir / "state.pt").is_file()
        if rounds > 1:
            console.rule(f"self-training round {round_index} of {rounds}")
        summary = train_self(recipe if round_index == 1 else later, round_dir, init, device=device, resume=round_resume)
        init = round_dir
    return summary
