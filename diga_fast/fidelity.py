"""How the ``paper`` preset compares with the official DiGA code (``diga-official-code.md``), element by
element, and where each value of ``paper-daformer`` comes from (DAFormer or DiGA): the fidelity
table of docs/fidelity.md is generated from here (``diga recipe table``), from the presets themselves, so it cannot drift: a test fails when a ``paper`` field changes and the page does not.

Each row: the element, what the official code does, a function giving the value of a preset (of the
stage the element belongs to), and whether the ``paper`` value is the official one. Rows whose official
behaviour is not implemented yet say so in their value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diga_fast.config import Recipe, preset_recipe


@dataclass(frozen=True)
class Row:
    element: str
    official: str
    stage: str
    value: Callable[[Recipe], str]
    matches: Callable[[Recipe], bool]


def _size(size) -> str:
    return "keep" if size is None else "×".join(map(str, size))


def _scale(scale) -> str:
    return "none" if scale is None else f"{scale[0]:g}–{scale[1]:g}"


def _sizes(r: Recipe, role: str) -> str:
    sizes, resize, scale = (getattr(r.data, f"{role}_{k}") for k in ("sizes", "resize", "scale"))
    shown = " + ".join(f"{n} at {h}×{w}" for h, w, n in sizes) if sizes else f"all at {_size(resize)}"
    return f"{shown}, flip, rescale {_scale(scale)}, crop {_size(r.data.crop)}"


def _aug(r: Recipe) -> str:
    a = r.warmup.aug
    return (f"jitter {a.brightness:g}/{a.contrast:g}/{a.saturation:g}/{a.hue:g} p{a.jitter_p:g}, grey p{a.grayscale_p:g}, "
            f"blur σ{a.blur_sigma:g} p{a.blur_p:g}, sharpness {a.sharpness:g} p{a.sharpness_p:g}, β {a.beta:g}")


def _init(r: Recipe) -> str:
    if r.model.pretrained and r.model.pretrained != "none":
        return r.model.pretrained
    return ("required: `--pretrained FILE` (refuses to start without)" if r.preset.startswith("paper")
            else "random (small CPU net)")


ROWS = (
    Row("network", "DeepLabV2-ResNet-101, OS 8, ProDA ASPP head", "warmup",
        lambda r: r.model.arch, lambda r: r.model.arch == "deeplabv2_r101"),
    Row("initialisation", "DeepLab ImageNet init (`Scale.*` keys)", "warmup",
        _init, lambda r: r.preset == "paper"),
    Row("input normalisation", "Caffe BGR, minus mean, ÷128", "warmup",
        lambda r: "Caffe BGR ÷128 inside the model (torchvision weights converted)" if r.model.arch.startswith("deeplab")
        else "the small net's own", lambda r: r.model.arch.startswith("deeplab")),
    Row("translator for CrDoMix", "trained CycleGAN-style translator", "warmup",
        lambda r: r.translator.kind, lambda r: r.translator.kind == "cyclegan"),
    Row("strong augmentation", "jitter 0.4/0.4/0.2/0.1 p0.5, grey p0.3, blur σ2 p0.8, sharpness 0.5 p0.3, β 0.4 "
        "(SYNTHIA: jitter p0.7, grey p0.1)", "warmup", _aug, lambda r: True),
    Row("CrDoMix", "⌊n/2⌋ of the n label values (+255) keep the strong view, the rest translated", "warmup",
        lambda r: "on" if r.warmup.crdomix else "off", lambda r: r.warmup.crdomix),
    Row("source loss", "CE (GTA5); OHEM 0.7 / 100k (SYNTHIA)", "warmup",
        lambda r: r.train.source_loss if r.train.source_loss == "ce" else f"ohem {r.train.ohem_thresh:g} / {r.train.ohem_min_kept}",
        lambda r: True),
    Row("CE normaliser", "all pixels, ignored ones included", "warmup",
        lambda r: f"{r.train.ce_normalizer} pixels", lambda r: r.train.ce_normalizer == "all"),
    Row("distillation", "λ 0.5, reverse 0.5, τ 1 (SYNTHIA 0.25 / 0.25)", "warmup",
        lambda r: f"λ {r.warmup.lambda_distill:g}, reverse {r.warmup.reverse_scale:g}, τ {r.warmup.temperature:g}",
        lambda r: r.warmup.temperature == 1.0),
    Row("EMA teacher", "α = min(1 − 1/(t+1), 0.999), before the forward", "warmup",
        lambda r: f"α max {r.warmup.ema_max:g}", lambda r: r.warmup.ema_max == 0.999),
    Row("teacher forward", "train mode (batch-statistics BN, dropout on)", "warmup",
        lambda r: f"{r.warmup.teacher_mode} mode", lambda r: r.warmup.teacher_mode == "train"),
    Row("optimiser", "SGD momentum 0.9, wd 5e-4, lr 2.5e-4, head ×10", "warmup",
        lambda r: f"SGD {r.optim.momentum:g}, wd {r.optim.weight_decay:g}, lr {r.optim.lr:g}, head ×{r.optim.head_lr_mult:g}",
        lambda r: (r.optim.momentum, r.optim.weight_decay, r.optim.lr, r.optim.head_lr_mult) == (0.9, 5e-4, 2.5e-4, 10.0)),
    Row("schedule", "poly 0.9, 80k iterations per stage (SYNTHIA warm-up 60k)", "warmup",
        lambda r: f"poly {r.optim.poly_power:g}, {r.train.iters} iterations", lambda r: r.optim.poly_power == 0.9),
    Row("warm-up batch", "3 source crops (SYNTHIA 4)", "warmup",
        lambda r: f"{r.data.batch_size} source crops", lambda r: r.data.batch_size in (3, 4)),
    Row("warm-up source sizes", "1 at 720×1280 + 2 at 1052×1914 (SYNTHIA 1 + 3 at 760×1280 / 1140×1920), flip, "
        "rescale 0.7–1 (SYNTHIA none), crop 512×896", "warmup", lambda r: _sizes(r, "source"),
        lambda r: r.data.source_sizes == ((720, 1280, 1), (1052, 1914, 2)) and r.data.crop == (512, 896)),
    Row("self-training source sizes", "2 at 720×1280 + 1 at 1052×1914 (SYNTHIA 1 + 2), flip, rescale 0.7–1, crop 512×896",
        "self", lambda r: _sizes(r, "source"), lambda r: r.data.source_sizes == ((720, 1280, 2), (1052, 1914, 1))),
    Row("target sizes", "2 at 512×1024 + 1 at 1024×2048, flip, rescale 0.7–1, crop 512×896", "self",
        lambda r: _sizes(r, "target"), lambda r: r.data.target_sizes == ((512, 1024, 2), (1024, 2048, 1))),
    Row("probability labels", "argmax of max(logits at scales 1.0, 0.5), no threshold", "self",
        lambda r: f"scales {', '.join(f'{s:g}' for s in r.self_training.pseudo_label_scales)}",
        lambda r: tuple(r.self_training.pseudo_label_scales) == (1.0, 0.5)),
    Row("centroid metric", "l2 (nearest centroid)", "self",
        lambda r: r.self_training.metric, lambda r: r.self_training.metric == "l2"),
    Row("feature labels' geometry", "softmax(−d) at feature size, bilinear up, argmax", "self",
        lambda r: {"scores": "softmax, bilinear up, argmax", "nearest": "argmin, nearest up"}[r.self_training.feat_upsample],
        lambda r: r.self_training.feat_upsample == "scores"),
    Row("centroid update", "EMA 1e-4 per (image, class) with ≥ 5 pixels", "self",
        lambda r: f"EMA {r.self_training.centroid_momentum:g}, ≥ {r.self_training.centroid_min_pixels} pixels",
        lambda r: (r.self_training.centroid_momentum, r.self_training.centroid_min_pixels) == (1e-4, 5)),
    Row("target labels", "bilateral consensus, no threshold", "self",
        lambda r: r.self_training.labels, lambda r: r.self_training.labels == "consensus"),
    Row("ClassMix target view", "β 0.3", "self", lambda r: f"β {r.self_training.target_beta:g}",
        lambda r: r.self_training.target_beta == 0.3),
    Row("self-training CrDoMix view", "β 0.3", "self",
        lambda r: f"β {r.self_training.source_beta if r.self_training.source_beta is not None else r.warmup.aug.beta:g}",
        lambda r: r.self_training.source_beta == 0.3),
    Row("self-training distillation", "λ 0.25, reverse 0.5 (SYNTHIA 0.25)", "self",
        lambda r: f"λ {r.self_training.lambda_distill:g}, reverse {r.self_training.reverse_scale:g}",
        lambda r: r.self_training.lambda_distill == 0.25),
    Row("self-training forwards", "student: [x_s; x_cdm] and x_mix in two forwards", "self",
        lambda r: {"grouped": "[x_s; x_cdm] and x_mix in two forwards", "pooled": "one forward of all crops"}[r.self_training.forward],
        lambda r: r.self_training.forward == "grouped"),
    Row("model selection", "best student on target val every 1000 iterations", "warmup",
        lambda r: f"best on target val every {r.train.eval_every} iterations (`best/`)" if r.train.select_on_val
        else "last weights", lambda r: r.train.select_on_val and r.train.eval_every == 1000),
    Row("evaluation", "max of logits at scales 1.0, 0.5; one confusion matrix", "warmup",
        lambda r: f"scales {', '.join(f'{s:g}' for s in r.data.eval_scales)}",
        lambda r: tuple(r.data.eval_scales) == (1.0, 0.5)),
)


@dataclass(frozen=True)
class DAFormerRow:
    """A row of the ``paper-daformer`` table: where its value comes from (DAFormer's training of its
    network, or DiGA's method as in ``paper``), that source's value, and the preset's."""

    element: str
    origin: str  # "DAFormer" | "DiGA"
    reference: str
    stage: str
    value: Callable[[Recipe], str]


def _optim(r: Recipe) -> str:
    o = r.optim
    if o.name == "adamw":
        return (f"AdamW β {o.betas[0]:g}/{o.betas[1]:g}, lr {o.lr:g}, head ×{o.head_lr_mult:g}, wd {o.weight_decay:g} "
                "(encoder norms 0)")
    return f"SGD {o.momentum:g}, lr {o.lr:g}, head ×{o.head_lr_mult:g}, wd {o.weight_decay:g}"


def _rcs(r: Recipe) -> str:
    d = r.data
    if not d.rare_class_sampling:
        return "off"
    return f"T {d.rcs_temperature:g}, > {d.rcs_min_pixels} px, crop ratio {d.rcs_min_crop_ratio:g}"


DAFORMER_ROWS = (
    DAFormerRow("network", "DAFormer", "MiT-B5 + context-aware fusion (256, sep. ASPP 1/6/12/18), dropout 0.1", "warmup",
                lambda r: r.model.arch),
    DAFormerRow("initialisation", "DAFormer", "ImageNet-1k MiT-B5 (SegFormer release)", "warmup", _init),
    DAFormerRow("optimiser", "DAFormer", "AdamW β 0.9/0.999, lr 6e-05, head ×10, wd 0.01 (norms 0)", "warmup", _optim),
    DAFormerRow("schedule", "DAFormer", "linear warm-up 1500 iterations from 1e-6×, poly 1.0", "warmup",
                lambda r: f"warm-up {r.optim.warmup_iters}, poly {r.optim.poly_power:g}"),
    DAFormerRow("crops and batch", "DAFormer", "GTA5 720×1280 (SYNTHIA 760×1280), CS 512×1024, no rescale, "
                "512×512 crops, batch 2 + 2", "self",
                lambda r: f"{_size(r.data.source_resize)} / {_size(r.data.target_resize)}, rescale "
                          f"{_scale(r.data.source_scale)}, crop {_size(r.data.crop)}, batch {r.data.batch_size} + "
                          f"{r.data.batch_size}"),
    DAFormerRow("rare-class sampling", "DAFormer", "T 0.01, > 3000 px, crop ratio 0.5", "warmup", _rcs),
    DAFormerRow("iterations", "DiGA", "80k per stage (SYNTHIA warm-up 60k); DAFormer: 40k", "warmup",
                lambda r: str(r.train.iters)),
    DAFormerRow("losses, EMA, CrDoMix, consensus, centroids, rounds", "DiGA", "as `paper` (table above)", "self",
                lambda r: f"distillation λ {r.self_training.lambda_distill:g}, {r.self_training.labels}, "
                          f"{r.self_training.metric}, EMA {r.self_training.centroid_momentum:g}"),
    DAFormerRow("evaluation, model selection", "DiGA", "scales 1.0, 0.5; best on target val", "warmup",
                lambda r: f"scales {', '.join(f'{s:g}' for s in r.data.eval_scales)}, "
                          f"{'best on target val' if r.train.select_on_val else 'last weights'}"),
)


def fidelity_table(source: str = "gta5:GTA5", target: str = "cityscapes:CS") -> str:
    """The Markdown tables: element | official code | ``paper`` | ``demo`` | paper = official; then
    the ``paper-daformer`` preset, each value with its origin (DAFormer or DiGA)."""
    lines = ["| element | official code | `paper` | `demo` | `paper` = official |", "|---|---|---|---|---|"]
    for row in ROWS:
        paper = preset_recipe("paper", row.stage, source, target)
        demo = preset_recipe("demo", row.stage)
        lines.append(f"| {row.element} | {row.official} | {row.value(paper)} | {row.value(demo)} | "
                     f"{'yes' if row.matches(paper) else '**no**'} |")
    note = ("`paper-daformer`: DiGA on DAFormer's network. DiGA's own settings for a transformer are not public "
            "(its official code ships DeepLabV2 only), so the network is trained as DAFormer trains it and DiGA's "
            "method is `paper`'s.")
    lines += ["", note, "", "| element | from | reference value | `paper-daformer` |", "|---|---|---|---|"]
    for row in DAFORMER_ROWS:
        recipe = preset_recipe("paper-daformer", row.stage, source, target)
        lines.append(f"| {row.element} | {row.origin} | {row.reference} | {row.value(recipe)} |")
    return "\n".join(lines) + "\n"
