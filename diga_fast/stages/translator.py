"""Stage 0 of DiGA (method.md; official §3): train the source->target image translator that CrDoMix
applies, frozen, during the warm-up.

Per iteration, on a labelled source batch (x_s, y_s) and an unlabelled target batch x_t (images in
[-1, 1]): the six images of one generator pass (translations, self-reconstructions, cycles), L_G
against frozen discriminators, then L_D (the nets and the objective: :mod:`diga_fast.method.gan_losses`).

Adam (lr 1e-4, betas 0.5/0.999) for the generators and for the discriminators, poly decay (power
``optim.poly_power``) over the run. The generators step first, then the discriminators on the same
(detached) translations. ``translator.safetensors`` holds enc_s + dec_s2t (what later stages load);
``state.pt`` holds all six nets and both optimizers for ``--resume``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diga_fast.config import Recipe
from diga_fast.data import build_dataset
from diga_fast.data.transforms import translator_transform
from diga_fast.engine.device import autocast
from diga_fast.engine.logging import console, save_image_rows
from diga_fast.engine.optim import load_optimizer_state, translator_optimizer
from diga_fast.errors import DigaError
from diga_fast.method.gan_losses import TranslatorNets, discriminator_loss, generator_forward, generator_losses
from diga_fast.models.io import TRANSLATOR_FILE, load_state_checked, load_vgg_features, translator_weights
from diga_fast.stages.common import Stage, resumable
from diga_fast.utils import dist


@resumable
def train_translator(recipe: Recipe, out: str | Path, device: str | None = None, resume: bool = False) -> dict:
    """Train the cycle-consistent translator; writes ``translator.safetensors`` (source->target
    generator) into the run folder. Returns {"translator": path, "iters": N, "perceptual": bool}."""
    cfg, data = recipe.translator, recipe.data
    stage = Stage(recipe, out, device, resume)
    vgg = load_vgg_features(cfg.vgg_weights).to(stage.device) if cfg.vgg_weights else None
    source_set = build_dataset(
        data.source, role="source", split="train", label_space=stage.label_space,
        transform=translator_transform(data.source_resize, cfg.source_zoom, cfg.crop, data.content_retry),
        synthetic_images=data.synthetic_train_images, seed=recipe.train.seed,
    )
    target_set = build_dataset(
        data.target, role="target", split="train", label_space=stage.label_space, with_labels=False,
        transform=translator_transform(data.target_resize, cfg.target_zoom, cfg.crop, False),
        synthetic_images=data.synthetic_train_images, seed=recipe.train.seed,
    )
    run = stage.open_run(check_target_val=False)
    nets = TranslatorNets(cfg.width, cfg.n_res).to(stage.device)
    opt_g = translator_optimizer(nets.generator_parameters(), cfg)
    opt_d = translator_optimizer(nets.discriminator_parameters(), cfg)
    extras = stage.restore({}, None)
    if resume:
        if "nets" not in extras:
            raise DigaError(f"--resume: {run.dir}/state.pt holds no translator nets")
        load_state_checked(nets, extras["nets"], f"{run.dir}/state.pt")
        load_optimizer_state(opt_g, extras["opt_g"])
        load_optimizer_state(opt_d, extras["opt_d"])
    if vgg is None:
        note = "perceptual loss off: translator.vgg_weights is not set (a local torchvision vgg16/vgg19 state dict)"
        console.print(note, highlight=False)
        if not resume and run.is_main:
            run.metrics.write(run.step, note=note)
    source_batches, target_batches = stage.loader(source_set), stage.loader(target_set)

    def save(step: int, at_once: bool = True) -> None:
        run.save(step, {}, None, extras={"nets": nets.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()},
                 files={TRANSLATOR_FILE: translator_weights(nets.s2t, recipe.digest())} if run.is_main else None,
                 at_once=at_once)

    device, total = stage.device, recipe.train.iters
    stage.checkpoint_now = save
    nets.train()
    images: dict[str, torch.Tensor] = {}
    for step, lr in stage.steps("translator", opt_g, opt_d):
        source, target = next(source_batches), next(target_batches)
        x_s = source["image"].to(device, non_blocking=True) * 2.0 - 1.0
        y_s = source["label"].to(device, non_blocking=True)
        x_t = target["image"].to(device, non_blocking=True) * 2.0 - 1.0

        # the generators, against frozen discriminators
        nets.dis_s2t.requires_grad_(False)
        nets.dis_t2s.requires_grad_(False)
        with autocast(device, recipe.train.bf16):
            images = generator_forward(nets, x_s, x_t)
            loss_g, terms = generator_losses(nets, images, x_s, y_s, x_t, cfg, vgg)
        run.check_finite(step + 1, loss_g=loss_g)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        dist.average_gradients(nets.generator_parameters())  # under torchrun
        opt_g.step()

        # the discriminators, on the same (detached) translations
        nets.dis_s2t.requires_grad_(True)
        nets.dis_t2s.requires_grad_(True)
        with autocast(device, recipe.train.bf16):
            loss_d = discriminator_loss(nets, images, x_s, x_t)
        run.check_finite(step + 1, loss_d=loss_d)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        dist.average_gradients(nets.discriminator_parameters())
        opt_d.step()
        dist.average_buffers(nets)

        done = step + 1
        stage.tick(done, loss_g=loss_g, loss_d=loss_d)
        if run.should_log(done):
            run.log(done, loss_g=loss_g, loss_d=loss_d, lr=lr, **terms)
        if done % recipe.train.save_every == 0 and done != total:
            save(done, at_once=False)  # written once the next step's losses are finite

    if run.step < total or not (run.dir / TRANSLATOR_FILE).is_file():
        save(total)
    if images and run.is_main:
        save_image_rows(run.dir / "preview.png", [x_s, images["s2t"], x_t, images["t2s"]])
    run.close()
    path = run.dir / TRANSLATOR_FILE
    return {"translator": str(path), "iters": total, "perceptual": vgg is not None}
