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

``self_training.labels`` switches the target labels for the ablations: ``prob`` (y_prob alone),
``feat`` (y_feat alone), ``threshold`` (y_prob where its confidence >= ``threshold``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from diga_fast.data import build_dataset
from diga_fast.data.labels import IGNORE_INDEX, get_label_space
from diga_fast.data.loader import make_loader
from diga_fast.data.transforms import train_transform
from diga_fast.engine.checkpoint import load_model
from diga_fast.engine import distributed
from diga_fast.engine.recipe import Recipe
from diga_fast.engine.training import (
    PhaseTimer,
    TrainingRun,
    autocast,
    backward_step,
    build_optimizer,
    console,
    resolve_device,
    seed_everything,
    set_poly_lr,
    training_forward,
)
from diga_fast.errors import DigaError
from diga_fast.kernels import assign_centroids, consensus_cross_entropy, crdomix_blend, default_backend
from diga_fast.method.augment import strong_view
from diga_fast.method.centroids import agreement_labels, initial_centroids, update_centroids
from diga_fast.method.common import (
    evaluate_on_target,
    source_train_dataset,
    target_train_dataset,
    target_val_dataset,
)
from diga_fast.method.ema import ema_update, make_teacher
from diga_fast.method.losses import cross_view_distillation, source_cross_entropy, upsample_to
from diga_fast.method.mixing import classmix_labels, classmix_selection, crdomix
from diga_fast.method.pseudo_labels import PseudoLabelled, generate_probability_labels
from diga_fast.method.translators import build_translator
from diga_fast.method.visualize import save_grid
from diga_fast.models import build_model

LABEL_MODES = ("consensus", "prob", "feat", "threshold")


def target_images(recipe: Recipe, label_space):
    """The target train split without transform (what pseudo-labels and centroids are made on)."""
    return build_dataset(recipe.data.target, role="target", split="train", label_space=label_space, transform=None,
                         with_labels=True, synthetic_images=recipe.data.synthetic_train_images, seed=recipe.train.seed)


def feature_labels(features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int], metric: str,
                   upsample: str) -> torch.Tensor:
    """y_feat at label size: the nearest centroid of every feature pixel."""
    if upsample == "nearest":
        labels, _ = assign_centroids(features, centroids, metric=metric)
        return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    # "scores": upsample per-class similarity (or -distance) maps, then argmax (the official order)
    f = features.float()
    if metric == "cosine":
        scores = torch.einsum("bchw,kc->bkhw", F.normalize(f, dim=1), F.normalize(centroids.float(), dim=1))
    else:
        scores = -torch.cdist(f.permute(0, 2, 3, 1).flatten(1, 2), centroids.float()[None]).permute(0, 2, 1)
        scores = scores.reshape(f.shape[0], -1, *f.shape[-2:])
    return upsample_to(scores, size).argmax(1)


def target_labels(mode: str, prob: torch.Tensor, feat: torch.Tensor, confidence: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (prob, feat) pair handed to the consensus CE: a pixel is supervised where they agree."""
    if mode == "consensus":
        return prob, feat
    if mode == "prob":
        return prob, prob
    if mode == "feat":
        return feat, feat
    kept = torch.where(confidence >= threshold, prob, torch.full_like(prob, IGNORE_INDEX))
    return kept, kept


def prepare_inputs(recipe: Recipe, model, run_dir: Path, label_space, device: torch.device):
    """Probability labels and initial centroids from the starting student ``model`` (unless the recipe
    names existing ones). Returns (pseudo-label folder, centroids [K, D])."""
    cfg = recipe.self_training
    images = target_images(recipe, label_space)
    label_dir = Path(cfg.pseudo_labels) if cfg.pseudo_labels else run_dir / "pseudo_labels"
    if not cfg.pseudo_labels:
        console.print(f"probability labels for {len(images)} target images -> {label_dir}")
        if distributed.current().is_main:  # a half-written folder from an interrupted start
            shutil.rmtree(label_dir, ignore_errors=True)
        distributed.barrier()
        generate_probability_labels(model, images, label_dir, label_space, device, cfg.pseudo_label_scales)
    if cfg.centroids:
        centroids = load_centroids(cfg.centroids, model)
    else:
        console.print("initial centroids from the student's own argmax on the target images")
        centroids, _ = initial_centroids(model, images, device)
    return label_dir, centroids.to(device)


def load_centroids(path: str | Path, model) -> torch.Tensor:
    try:
        centroids = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DigaError(f"centroid file not found: {path}") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DigaError(f"cannot read centroids {path}: {err}") from None
    if isinstance(centroids, dict):
        centroids = centroids.get("centroids")
    if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != (model.num_classes, model.feature_dim):
        raise DigaError(f"{path} does not hold {model.num_classes}x{model.feature_dim} centroids for this model")
    return centroids.float()


def train_self(recipe: Recipe, out: str | Path, init: str | Path | None, device: str | None = None,
               resume: bool = False, timer: PhaseTimer | None = None) -> dict:
    """One self-training round from the student in ``init`` (a warm-up or earlier round run).
    ``timer`` (``diga bench train``) records the wall time of each phase of every step."""
    cfg = recipe.self_training
    if cfg.labels not in LABEL_MODES:
        raise DigaError(f"self_training.labels={cfg.labels!r}; choose from {', '.join(LABEL_MODES)}")
    if cfg.metric not in ("cosine", "l2"):
        raise DigaError(f"self_training.metric={cfg.metric!r}; choose cosine or l2")
    device = resolve_device(device)
    seed_everything(recipe.train.seed)
    label_space = get_label_space(recipe.data.label_space)
    source_set = source_train_dataset(recipe, label_space, translated=recipe.warmup.crdomix)
    target_val_dataset(recipe, label_space)
    if not resume:
        if init is None:
            raise DigaError("diga train self needs --init WARMUP_RUN (the warm-up run folder or student weights)")
        init_model, _ = load_model(init)  # fail on a bad --init before anything is written
        if init_model.arch != recipe.model.arch or init_model.num_classes != label_space.num_classes:
            raise DigaError(f"--init {init} holds a {init_model.arch} with {init_model.num_classes} classes; the recipe "
                            f"trains a {recipe.model.arch} with {label_space.num_classes}")

    run = TrainingRun(recipe, out, resume)
    student = (build_model(recipe.model.arch, label_space.num_classes) if resume else init_model).to(device)
    student.set_training_options(recipe.model.dropout, recipe.model.freeze_bn_stats)
    teacher = make_teacher(student)
    optimizer = build_optimizer(student, recipe)
    generator = distributed.ShardedGenerator(recipe.train.seed)  # augmentation and ClassMix draws
    networks = {"student": student, "teacher": teacher}
    if resume:
        extras = run.restore(networks, optimizer)
        label_dir, centroids = Path(extras["pseudo_labels"]), extras["centroids"].to(device)
        generator.set_state(extras["generator"])
    else:
        label_dir, centroids = prepare_inputs(recipe, student, run.dir, label_space, device)
        if run.is_main:
            torch.save({"centroids": centroids.cpu()}, run.dir / "initial_centroids.pt")
    trained = training_forward(student, recipe, device, teacher)  # channels_last, DDP, compile as asked

    def stage_state() -> dict:
        return {"centroids": centroids.cpu(), "pseudo_labels": str(label_dir), "generator": generator.get_state()}

    data = recipe.data
    target_transform = train_transform(resize=data.target_resize, crop=data.crop, scale=data.target_scale, flip=True,
                                       content_retry=False)
    target_set = PseudoLabelled(target_images(recipe, label_space), label_dir, label_space.num_classes, target_transform)

    def loader(dataset):
        return make_loader(dataset, batch_size=data.batch_size, shuffle=True, num_workers=data.num_workers,
                           seed=recipe.train.seed, drop_last=True, infinite=True, start_step=run.step)

    source_batches, target_batches = loader(source_set), loader(target_set)
    style_images = (batch["image"] for batch in loader(target_train_dataset(recipe, label_space)))
    translator = build_translator(recipe, style_images, device) if recipe.warmup.crdomix else None
    source_aug = recipe.warmup.aug
    target_aug = type(source_aug)(**{**vars(source_aug), "beta": cfg.target_beta})

    total = recipe.train.iters
    timer = timer or PhaseTimer(enabled=False)
    student.train()
    with run.progress(total, f"self-training ({cfg.labels}, {cfg.metric})") as tick, \
            default_backend(None if recipe.train.kernels else "torch"):
        for step in range(run.step, total):
            lr = set_poly_lr(optimizer, step, total, recipe.optim.poly_power)
            with timer("ema"):
                ema_update(teacher, student, step, recipe.warmup.ema_max)
            with timer("data"):
                source, target = next(source_batches), next(target_batches)
                x_s, y_s = source["image"].to(device, non_blocking=True), source["label"].to(device, non_blocking=True)
                x_t = target["image"].to(device, non_blocking=True)
                y_prob = target["pseudo_label"].to(device, non_blocking=True)
            size = y_s.shape[-2:]

            # 1-2. feature-induced labels from the teacher on the clean target; consensus pairs
            with timer("teacher"), torch.no_grad(), autocast(device, recipe.train.bf16):
                t_logits, t_feat = teacher(x_t)
            with timer("labelling"):
                y_feat = feature_labels(t_feat, centroids, y_prob.shape[-2:], cfg.metric, cfg.feat_upsample)
                prob, feat = target_labels(cfg.labels, y_prob, y_feat, target["confidence"].to(device), cfg.threshold)

            with timer("mixing"):
                # 3. cross-domain ClassMix: source classes pasted onto the strongly augmented target
                selected = classmix_selection(y_s, generator)
                x_mix = crdomix_blend(x_s, strong_view(x_t, target_aug, generator), y_s, selected)
                prob_mix, feat_mix = classmix_labels(selected, y_s, prob), classmix_labels(selected, y_s, feat)
                # 4. CrDoMix on the source
                x_aug = strong_view(x_s, source_aug, generator)
                x_cdm = crdomix(x_aug, translator(x_s, source), y_s, generator) if translator is not None else x_aug

            # 5. losses
            with timer("forward"):
                with autocast(device, recipe.train.bf16):
                    s_clean, s_cdm, s_mix = trained(torch.cat([x_s, x_cdm, x_mix]))[0].chunk(3)
                with torch.no_grad(), autocast(device, recipe.train.bf16):
                    t_src_logits, t_src_feat = teacher(torch.cat([x_s, x_cdm]))
                t_clean, t_cdm = t_src_logits.chunk(2)
                loss_src = source_cross_entropy(s_clean, y_s, recipe.train)
                loss_mix = distributed.global_mean(consensus_cross_entropy(upsample_to(s_mix, size), prob_mix, feat_mix),
                                                   lambda: ((prob_mix == feat_mix) & (prob_mix != IGNORE_INDEX)).sum())
                loss_dist = cross_view_distillation(upsample_to(s_clean, size), upsample_to(s_cdm, size),
                                                    upsample_to(t_clean, size), upsample_to(t_cdm, size),
                                                    reverse_scale=cfg.reverse_scale)
                loss = loss_src + loss_mix + cfg.lambda_distill * loss_dist

            # 6. online centroids from the teacher (before the student's update, as the official code)
            with timer("centroids"):
                consensus = torch.where(prob == feat, prob, torch.full_like(prob, IGNORE_INDEX))
                update_centroids(centroids, t_feat, agreement_labels(t_logits, consensus), cfg.centroid_momentum,
                                 cfg.centroid_min_pixels)
                update_centroids(centroids, t_src_feat.chunk(2)[1], agreement_labels(t_cdm, y_s), cfg.centroid_momentum,
                                 cfg.centroid_min_pixels)
            run.check_finite(step + 1, loss=loss, centroids=centroids.sum())  # NaN features reach the centroids

            with timer("backward"):
                backward_step(loss, optimizer, student)
            timer.next_step()

            done = step + 1
            tick(done, loss=loss)
            if run.should_log(done):
                run.log(done, loss=loss, lr=lr, loss_src=loss_src, loss_mix=loss_mix, loss_dist=loss_dist,
                        **label_quality(consensus, target["label"].to(device), prob=y_prob, feat=y_feat))
            if run.is_main and recipe.warmup.visualize_every and (done % recipe.warmup.visualize_every == 0 or done == total):
                save_grid(run.dir / "images" / f"{done:07d}.png", label_space, images=[x_t, x_mix],
                          labels=[y_prob, y_feat, consensus, prob_mix, s_mix.detach().argmax(1)])
            run.checkpoint_and_evaluate(done, networks, optimizer, extras=stage_state,
                                        evaluate=lambda: evaluate_on_target(student, recipe, label_space, device))

    summary = evaluate_on_target(student, recipe, label_space, device)
    if run.is_main:
        torch.save({"centroids": centroids.cpu()}, run.dir / "centroids.pt")
    return run.finish(summary, networks, optimizer, stage_state())


def label_quality(consensus: torch.Tensor, truth: torch.Tensor, **sources: torch.Tensor) -> dict[str, torch.Tensor]:
    """Share of target pixels the consensus keeps, and their accuracy where the true label is known
    (the built-in pair has target labels; real targets report only the share). ``sources`` (e.g.
    ``prob=y_prob, feat=y_feat``) add each full label map's accuracy, ``<name>_accuracy``: what the
    consensus is measured against."""
    kept = consensus != IGNORE_INDEX
    known = truth != IGNORE_INDEX
    quality = {"consensus_kept": kept.float().mean()}
    if bool(known.any()):
        quality["consensus_accuracy"] = (consensus[kept & known] == truth[kept & known]).float().mean() \
            if bool((kept & known).any()) else torch.tensor(float("nan"))
        quality["consensus_kept_known"] = kept[known].float().mean()
        for name, labels in sources.items():
            quality[f"{name}_accuracy"] = (labels[known] == truth[known]).float().mean()
    return quality


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
    summary: dict = {}
    for round_index in range(1, rounds + 1):
        round_dir = out if rounds == 1 else out / f"round_{round_index}"
        if resume and (round_dir / "eval.json").is_file() and rounds > 1:
            init = round_dir  # this round finished before the interruption
            continue
        round_recipe = recipe if round_index == 1 else _later_round(recipe)
        round_resume = resume and (round_dir / "state.pt").is_file()
        if rounds > 1:
            console.rule(f"self-training round {round_index} of {rounds}")
        summary = train_self(round_recipe, round_dir, init, device=device, resume=round_resume)
        init = round_dir
    return summary


def _later_round(recipe: Recipe) -> Recipe:
    import copy

    later = copy.deepcopy(recipe)
    later.self_training.pseudo_labels = None
    later.self_training.centroids = None
    return later
