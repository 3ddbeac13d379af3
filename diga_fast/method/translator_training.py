"""Stage 0 of DiGA (method.md; official §3): train the source->target image translator that CrDoMix
applies, frozen, during the warm-up.

Two encoders (``enc_s``, ``enc_t``), two decoders (``dec_s2t``, ``dec_t2s``) and two multi-scale
discriminators (``dis_s2t`` judges target-looking images, ``dis_t2s`` source-looking ones). All
images are in [-1, 1] inside the loop. Per iteration, on a labelled source batch (x_s, y_s) and an
unlabelled target batch x_t:

  s2t = dec_s2t(enc_s(x_s))          t2s = dec_t2s(enc_t(x_t))            translations
  s2s = dec_t2s(enc_s(x_s))          t2t = dec_s2t(enc_t(x_t))            self-reconstructions
  s2t2s = dec_t2s(enc_t(s2t))        t2s2t = dec_s2t(enc_s(t2s))          cycles

  L_G = 0.5  * [LSGAN_G(dis_s2t(s2t)) + LSGAN_G(dis_t2s(t2s))]
      + 10   * [L1(s2t2s, x_s) + L1(t2s2t, x_t)]
      + 20   * EdgeL1(s2t, x_s; y_s)
      + 0.1  * [VGG(s2t, x_s) + VGG(t2s, x_t)]             (off without translator.vgg_weights)
      + 0.001 * [L1(s2s, x_s) + L1(t2t, x_t)]              (SYNTHIA 0.025)
  L_D = LSGAN_D(dis_s2t: x_t real, s2t fake) + LSGAN_D(dis_t2s: x_s real, t2s fake)

  LSGAN_G(D) = sum over scales of mean((D - 1)^2); LSGAN_D = sum over scales of
  mean((D(real) - 1)^2) + mean(D(fake)^2). L1 = mean absolute difference.
  EdgeL1: the semantic edges of y_s are the pixels where a 5x5 Laplacian (-1 everywhere, 24 in the
  centre) of the label map, taken as numbers with the border replicated, has |response| > 0.1, i.e.
  pixels within 2 of a change of label (ignore = 255 counts as a label); EdgeL1 is the mean of
  |s2t - x_s| over those pixels and the 3 channels (0 when a batch has no edge).
  VGG(a, b) = sum over relu1_1..relu5_1 of w_i * L1(phi_i(a), phi_i(b).detach()), w = 1/32, 1/16,
  1/8, 1/4, 1, on ImageNet-normalised RGB; images wider than 1024 are 2x2 average-pooled first.

Adam (lr 1e-4, betas 0.5/0.999) for the generators and for the discriminators, poly decay (power
``optim.poly_power``) over the run. The generators step first, then the discriminators on the same
(detached) translations. ``translator.safetensors`` holds enc_s + dec_s2t (what later stages load);
``state.pt`` holds all six nets and both optimizers for ``--resume``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diga_fast.data import build_dataset
from diga_fast.data.labels import get_label_space
from diga_fast.data.loader import make_loader
from diga_fast.data.transforms import Compose, ContentRetry, RandomCrop, RandomHorizontalFlip, Resize
from diga_fast.engine import distributed
from diga_fast.engine.checkpoint import atomic_write, load_state_checked
from diga_fast.engine.recipe import Recipe, TranslatorConfig
from diga_fast.engine.training import TrainingRun, autocast, console, resolve_device, seed_everything, set_poly_lr
from diga_fast.errors import DigaError
from diga_fast.models.translator import (
    TRANSLATOR_FILE,
    ImageTranslator,
    MultiScaleDiscriminator,
    VGGFeatures,
    load_vgg_features,
    save_translator,
)

VGG_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
VGG_MAX_WIDTH = 1024


# ------------------------------------------------------------------------------------------ losses


def lsgan_generator_loss(fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over scales of mean((D(fake) - 1)^2)."""
    return sum(torch.mean((score.float() - 1.0) ** 2) for score in fake_scores)


def lsgan_discriminator_loss(real_scores: Sequence[torch.Tensor], fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over scales of mean((D(real) - 1)^2) + mean(D(fake)^2)."""
    return sum(torch.mean((real.float() - 1.0) ** 2) + torch.mean(fake.float() ** 2)
               for real, fake in zip(real_scores, fake_scores))


def semantic_edges(labels: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """bool [B, H, W]: |5x5 Laplacian of the label map| > threshold (border replicated)."""
    kernel = -torch.ones(1, 1, 5, 5, device=labels.device)
    kernel[0, 0, 2, 2] = 24.0
    values = F.pad(labels.float().unsqueeze(1), (2, 2, 2, 2), mode="replicate")
    return F.conv2d(values, kernel).squeeze(1).abs() > threshold


def semantic_edge_l1(translated: torch.Tensor, source: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean |translated - source| over the semantic-edge pixels of ``labels`` (and the channels);
    under torchrun, scaled so that the gradient average is the mean over all ranks' edge pixels."""
    edges = semantic_edges(labels).unsqueeze(1).expand_as(source)
    count = edges.sum()
    diff = (translated.float() - source.float()).abs()
    return distributed.global_mean(torch.where(edges, diff, torch.zeros_like(diff)).sum() / count.clamp(min=1),
                                   lambda: count)


def perceptual_loss(vgg: VGGFeatures, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """VGG feature L1 between ``image`` and ``reference`` (both in [-1, 1]; reference detached)."""
    image, reference = (image + 1.0) * 0.5, (reference + 1.0) * 0.5
    while image.shape[-1] > VGG_MAX_WIDTH:
        image, reference = F.avg_pool2d(image, 2), F.avg_pool2d(reference, 2)
    with torch.no_grad():
        targets = vgg(reference)
    return sum(w * F.l1_loss(a.float(), b.float()) for w, a, b in zip(VGG_LAYER_WEIGHTS, vgg(image), targets))


# ------------------------------------------------------------------------------------------ nets


class TranslatorNets(nn.Module):
    """The six nets of the cycle. ``s2t`` = enc_s + dec_s2t, ``t2s`` = enc_t + dec_t2s."""

    def __init__(self, width: int, n_res: int) -> None:
        super().__init__()
        self.s2t = ImageTranslator(width, n_res)
        self.t2s = ImageTranslator(width, n_res)
        self.dis_s2t = MultiScaleDiscriminator(width)
        self.dis_t2s = MultiScaleDiscriminator(width)

    def generator_parameters(self):
        return [*self.s2t.parameters(), *self.t2s.parameters()]

    def discriminator_parameters(self):
        return [*self.dis_s2t.parameters(), *self.dis_t2s.parameters()]


def generator_forward(nets: TranslatorNets, x_s: torch.Tensor, x_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """All images of one generator pass (inputs in [-1, 1], H and W multiples of 4)."""
    enc_s, dec_s2t = nets.s2t.encoder, nets.s2t.decoder
    enc_t, dec_t2s = nets.t2s.encoder, nets.t2s.decoder
    code_s, code_t = enc_s(x_s), enc_t(x_t)
    s2t, t2s = dec_s2t(code_s), dec_t2s(code_t)
    return {
        "s2t": s2t,
        "t2s": t2s,
        "s2s": dec_t2s(code_s),
        "t2t": dec_s2t(code_t),
        "s2t2s": dec_t2s(enc_t(s2t)),
        "t2s2t": dec_s2t(enc_s(t2s)),
    }


def generator_losses(nets: TranslatorNets, images: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor,
                     x_t: torch.Tensor, cfg: TranslatorConfig, vgg: VGGFeatures | None) -> tuple[torch.Tensor, dict]:
    """(weighted total, unweighted terms) of the generator objective in the module docstring."""
    terms = {
        "adv": lsgan_generator_loss(nets.dis_s2t(images["s2t"])) + lsgan_generator_loss(nets.dis_t2s(images["t2s"])),
        "cycle": F.l1_loss(images["s2t2s"].float(), x_s) + F.l1_loss(images["t2s2t"].float(), x_t),
        "edge": semantic_edge_l1(images["s2t"], x_s, y_s),
        "identity": F.l1_loss(images["s2s"].float(), x_s) + F.l1_loss(images["t2t"].float(), x_t),
    }
    total = (cfg.adv_weight * terms["adv"] + cfg.cycle_weight * terms["cycle"] + cfg.edge_weight * terms["edge"]
             + cfg.identity_weight * terms["identity"])
    if vgg is not None:
        terms["perceptual"] = perceptual_loss(vgg, images["s2t"], x_s) + perceptual_loss(vgg, images["t2s"], x_t)
        total = total + cfg.perceptual_weight * terms["perceptual"]
    return total, terms


def discriminator_loss(nets: TranslatorNets, images: dict[str, torch.Tensor], x_s: torch.Tensor,
                       x_t: torch.Tensor) -> torch.Tensor:
    return (lsgan_discriminator_loss(nets.dis_s2t(x_t), nets.dis_s2t(images["s2t"].detach()))
            + lsgan_discriminator_loss(nets.dis_t2s(x_s), nets.dis_t2s(images["t2s"].detach())))


# ------------------------------------------------------------------------------------------ data


class RandomZoom:
    """Resize by a factor drawn uniformly from ``factors`` (aspect kept): the official loaders'
    choice between two fixed sizes (e.g. GTA5 at 720x1280 and 1052x1914)."""

    def __init__(self, factors: Sequence[float]):
        self.factors = tuple(float(f) for f in factors)

    def __call__(self, image, label=None):
        factor = self.factors[int(torch.randint(len(self.factors), ()).item())] if len(self.factors) > 1 else self.factors[0]
        if factor == 1.0:
            return image, label
        h, w = image.shape[:2]
        return Resize((max(1, round(h * factor)), max(1, round(w * factor))))(image, label)


def translator_transform(resize, zoom: Sequence[float], crop, content_retry: bool) -> Compose:
    random_part = Compose([RandomZoom(zoom), RandomHorizontalFlip(), RandomCrop(crop, if_smaller="resize")])
    steps = [Resize(resize)] if resize is not None else []
    return Compose([*steps, ContentRetry(random_part) if content_retry else random_part])


def _check_config(cfg: TranslatorConfig) -> None:
    if cfg.width < 1 or cfg.n_res < 0:
        raise DigaError(f"translator.width must be >= 1 and translator.n_res >= 0, got {cfg.width} and {cfg.n_res}")
    if any(s < 16 or s % 4 for s in cfg.crop):
        raise DigaError(f"translator.crop must be multiples of 4, at least 16, got {list(cfg.crop)}")
    for name in ("source_zoom", "target_zoom"):
        zoom = getattr(cfg, name)
        if not zoom or any(z <= 0 for z in zoom):
            raise DigaError(f"translator.{name} must be a non-empty list of positive factors, got {list(zoom)}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise DigaError(f"translator.betas must be two numbers in [0, 1), got {list(cfg.betas)}")


def _adam(params, cfg: TranslatorConfig) -> torch.optim.Adam:
    return torch.optim.Adam([{"params": params, "lr": cfg.lr, "base_lr": cfg.lr}], lr=cfg.lr, betas=tuple(cfg.betas))


def _save_preview(path: Path, rows: list[torch.Tensor]) -> None:
    """A PNG grid: one row per tensor list entry ([B, 3, H, W] in [-1, 1]), images side by side."""
    grid = torch.cat([torch.cat(list(row[:4].detach().float().cpu()), dim=2) for row in rows], dim=1)
    array = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG"))


# ------------------------------------------------------------------------------------------ loop


def train_translator(recipe: Recipe, out: str | Path, device: str | None = None, resume: bool = False) -> dict:
    """Train the cycle-consistent translator; writes ``translator.safetensors`` (source->target
    generator) into the run folder. Returns {"translator": path, "iters": N, "perceptual": bool}."""
    cfg = recipe.translator
    _check_config(cfg)
    device = resolve_device(device)
    seed_everything(recipe.train.seed)
    vgg = load_vgg_features(cfg.vgg_weights).to(device) if cfg.vgg_weights else None
    label_space = get_label_space(recipe.data.label_space)
    data = recipe.data
    source_set = build_dataset(
        data.source, role="source", split="train", label_space=label_space,
        transform=translator_transform(data.source_resize, cfg.source_zoom, cfg.crop, data.content_retry),
        synthetic_images=data.synthetic_train_images, seed=recipe.train.seed,
    )
    target_set = build_dataset(
        data.target, role="target", split="train", label_space=label_space, with_labels=False,
        transform=translator_transform(data.target_resize, cfg.target_zoom, cfg.crop, False),
        synthetic_images=data.synthetic_train_images, seed=recipe.train.seed,
    )

    run = TrainingRun(recipe, out, resume)
    nets = TranslatorNets(cfg.width, cfg.n_res).to(device)
    opt_g, opt_d = _adam(nets.generator_parameters(), cfg), _adam(nets.discriminator_parameters(), cfg)
    extras = run.restore({}, None)
    if resume:
        if "nets" not in extras:
            raise DigaError(f"--resume: {run.dir}/state.pt holds no translator nets")
        load_state_checked(nets, extras["nets"], f"{run.dir}/state.pt")
        opt_g.load_state_dict(extras["opt_g"])
        opt_d.load_state_dict(extras["opt_d"])
    if vgg is None:
        note = "perceptual loss off: translator.vgg_weights is not set (a local torchvision vgg16/vgg19 state dict)"
        console.print(note, highlight=False)
        if not resume and run.is_main:
            run.metrics.write(run.step, note=note)

    def loader(dataset):
        return make_loader(dataset, batch_size=data.batch_size, shuffle=True, num_workers=data.num_workers,
                           seed=recipe.train.seed, infinite=True, start_step=run.step)

    source_batches, target_batches = loader(source_set), loader(target_set)

    def save(step: int) -> None:
        if run.is_main:
            save_translator(run.dir / TRANSLATOR_FILE, nets.s2t, recipe.digest())
        run.save(step, {}, None, extras={"nets": nets.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()})

    total = recipe.train.iters
    nets.train()
    images: dict[str, torch.Tensor] = {}
    with run.progress(total, f"translator ({data.source} -> {data.target})") as tick:
        for step in range(run.step, total):
            lr = set_poly_lr(opt_g, step, total, recipe.optim.poly_power)
            set_poly_lr(opt_d, step, total, recipe.optim.poly_power)
            source, target = next(source_batches), next(target_batches)
            x_s = source["image"].to(device, non_blocking=True) * 2.0 - 1.0
            y_s = source["label"].to(device, non_blocking=True)
            x_t = target["image"].to(device, non_blocking=True) * 2.0 - 1.0

            nets.dis_s2t.requires_grad_(False)
            nets.dis_t2s.requires_grad_(False)
            with autocast(device, recipe.train.bf16):
                images = generator_forward(nets, x_s, x_t)
                loss_g, terms = generator_losses(nets, images, x_s, y_s, x_t, cfg, vgg)
            run.check_finite(step + 1, loss_g=loss_g)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            distributed.average_gradients(nets.generator_parameters())  # under torchrun
            opt_g.step()

            nets.dis_s2t.requires_grad_(True)
            nets.dis_t2s.requires_grad_(True)
            with autocast(device, recipe.train.bf16):
                loss_d = discriminator_loss(nets, images, x_s, x_t)
            run.check_finite(step + 1, loss_d=loss_d)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            distributed.average_gradients(nets.discriminator_parameters())
            opt_d.step()
            distributed.average_buffers(nets)

            done = step + 1
            tick(done, loss_g=loss_g, loss_d=loss_d)
            if done % recipe.train.log_every == 0 or done == total:
                run.log(done, loss_g=loss_g, loss_d=loss_d, lr=lr, **terms)
            if done % recipe.train.save_every == 0 and done != total:
                save(done)

    if run.step < total or not (run.dir / TRANSLATOR_FILE).is_file():
        save(total)
    if images and run.is_main:
        _save_preview(run.dir / "preview.png", [x_s, images["s2t"], x_t, images["t2s"]])
    run.close()
    path = run.dir / TRANSLATOR_FILE
    return {"translator": str(path), "iters": total, "perceptual": vgg is not None}
