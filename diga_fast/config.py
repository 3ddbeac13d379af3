"""The recipe: every hyper-parameter of a run in one dataclass tree, loaded from and saved to YAML.

A run's recipe is built in three layers: the preset (``paper`` = the official recipe of method.md,
``demo`` = the small CPU model on the built-in pair), then an optional ``--config FILE``, then dotted
``key=value`` overrides from the command line (``optim.lr=0.01 data.batch_size=4``). The fully
resolved recipe is written to ``config.yaml`` in the run folder, and ``--config config.yaml``
reproduces the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diga_fast.errors import DigaError
from diga_fast.utils.io import parse_yaml

Size = tuple[int, int]

ARCHS = ("small", "deeplabv2_r50", "deeplabv2_r101", *(f"daformer_mitb{i}" for i in range(6)))


@dataclass
class DataConfig:
    source: str = "synthetic"
    target: str = "synthetic"
    label_space: str = "cityscapes19"
    batch_size: int = 8
    num_workers: int = 0  # the built-in pair renders each scene once and keeps it in memory
    # Geometry of training crops: resize the whole image first (None = keep), then rescale
    # width and height independently by U(scale) (None = no rescale), then random-crop ``crop``.
    source_resize: Size | None = None
    source_scale: tuple[float, float] | None = (0.75, 1.5)
    target_resize: Size | None = None
    target_scale: tuple[float, float] | None = (0.75, 1.5)
    crop: Size = (112, 224)
    # Several sizes per batch, as the official loaders: ((height, width, rows), ...) resizes the first
    # ``rows`` images of each batch to the first size, and so on (rows add up to data.batch_size);
    # instead of source_resize / target_resize when set
    source_sizes: tuple[tuple[int, int, int], ...] | None = None
    target_sizes: tuple[tuple[int, int, int], ...] | None = None
    content_retry: bool = False
    # DAFormer's rare-class sampling of source images (diga_fast.data.rare_class): class c drawn with
    # p(c) = softmax((1 - f_c) / rcs_temperature), f_c its share of the source pixels; then an image
    # with more than rcs_min_pixels pixels of c, its crop redrawn (up to 10 times) until the crop holds
    # more than rcs_min_pixels * rcs_min_crop_ratio of them. Statistics cached in the run folder.
    rare_class_sampling: bool = False
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    rcs_min_crop_ratio: float = 0.5
    skip_bad: bool = False  # leave out source pairs whose image and label sizes differ (counted, reported)
    # Evaluation: full-size images, logits at each scale upsampled to full size, element-wise max.
    eval_scales: tuple[float, ...] = (1.0,)
    eval_max_images: int | None = None
    # The built-in pair: how many images each split of each synthetic domain holds.
    synthetic_train_images: int = 500
    synthetic_val_images: int = 200


@dataclass
class ModelConfig:
    arch: str = "small"
    pretrained: str | None = None  # a local file; "none" = random init on purpose (paper refuses unset)
    dropout: float | None = None  # the classifier's Dropout2d p; None = the architecture's (0.1)
    freeze_bn_stats: bool = False  # BatchNorm uses running statistics in training too


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (DiGA) | adamw (DAFormer: no weight decay on the encoder's norms)
    lr: float = 5e-2
    head_lr_mult: float = 10.0
    momentum: float = 0.9  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    # Linear warm-up (mmcv's): over the first warmup_iters steps the poly LR is scaled by
    # 1 - (1 - step / warmup_iters) * (1 - warmup_ratio); 0 = none
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6


@dataclass
class TrainConfig:
    iters: int = 1000
    log_every: int = 20
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 500
    bf16: bool = False
    # The four fused ops: "auto" = Triton on CUDA tensors, the PyTorch references elsewhere; "torch" = the
    # references everywhere; "compile" = torch.compile of the references (the baseline the kernels are
    # measured against). true/false (older config.yaml files) read as "auto"/"torch".
    kernels: str = "auto"
    channels_last: bool = False  # student and teacher in channels_last memory format
    compile: bool = False  # torch.compile the student's training forward pass
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager", "eager" to debug)
    seed: int = 0
    # CPU threads of a stage's own computation (torch intra-op); 0 = torch's default (one per core). The demo
    # uses 1: on the 2-vCPU VMs we measured, two threads gain 1.4x alone and lose 5-7x when anything else
    # shares the CPU, and one thread gives the same floating-point results on every core count
    threads: int = 0
    # Under torchrun: minutes a collective waits for every rank before the run stops with an error that
    # names it (a frozen or dead rank), instead of the backend's 30-minute hang
    dist_timeout_minutes: float = 10.0
    # Supervised source loss: "ce", or "ohem" (official SYNTHIA: pixels with p_true below
    # max(ohem_thresh, the ohem_min_kept-th smallest p_true) only)
    source_loss: str = "ce"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    # What a CE loss is averaged over: "valid" pixels (diga-fast) or "all" pixels, ignored ones included
    # (the official code; the paper preset)
    ce_normalizer: str = "valid"
    # Keep the weights of the best target-val mIoU (evaluated every eval_every steps) in best/: the
    # official model selection, which uses target labels (the paper preset); later stages take best/
    select_on_val: bool = False
    # More labelled datasets (KIND:ROOT) whose val mIoU is reported beside the target's, at the end of a run
    # (and at every eval_every evaluation when select_on_val is on): the generalisation table, in eval.json
    eval_targets: tuple[str, ...] = ()


@dataclass
class StrongAugConfig:
    """The strong photometric view (method.md Stage 1 step 1, :mod:`diga_fast.method.augment`)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.5
    grayscale_p: float = 0.3
    blur_sigma: float = 2.0
    blur_p: float = 0.8
    sharpness: float = 0.5
    sharpness_p: float = 0.3
    beta: float = 0.4


@dataclass
class WarmupConfig:
    """Stage 1 (method.md): CE on the clean source + lambda_distill * two-way cross-view distillation
    between the clean view and the CrDoMix view, EMA teacher."""

    distill: bool = True  # off: CE on both views instead (CrDoMix as plain augmentation)
    crdomix: bool = True  # off: the second view is the strong view alone (no translated regions)
    lambda_distill: float = 0.5
    reverse_scale: float = 0.5
    temperature: float = 1.0
    ema_max: float = 0.999
    # The EMA teacher's forward: "eval" (running BN statistics, no dropout: diga-fast) or "train" (batch
    # statistics and dropout, the official code; the paper preset). Centroids and labels always use eval.
    teacher_mode: str = "eval"
    aug: StrongAugConfig = field(default_factory=StrongAugConfig)
    visualize_every: int = 500


@dataclass
class TranslatorConfig:
    """Stage 0 (method.md): the source->target translator CrDoMix uses (``kind``: fda | cyclegan |
    folder), and how ``diga train translator`` trains the cyclegan one (official §3). The defaults
    are the tiny CPU demo; the paper preset sets the official sizes."""

    kind: str = "fda"
    fda_beta: float = 0.01
    checkpoint: str | None = None  # cyclegan: a translator run folder or its translator.safetensors
    folder: str | None = None  # folder: pre-translated source images, matched by file name
    # -- training (diga train translator) --
    width: int = 16  # base channels (paper 64)
    n_res: int = 2  # residual blocks in each encoder and decoder (paper 4)
    crop: Size = (64, 128)
    # each image is first resized to data.source_resize / data.target_resize, then zoomed by a
    # factor drawn from this list (aspect kept), then random-cropped (official: two fixed sizes)
    source_zoom: tuple[float, ...] = (1.0,)
    target_zoom: tuple[float, ...] = (1.0,)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    adv_weight: float = 0.5
    cycle_weight: float = 10.0
    edge_weight: float = 20.0
    perceptual_weight: float = 0.1
    identity_weight: float = 0.001  # SYNTHIA 0.025
    vgg_weights: str | None = None  # local torchvision vgg16/vgg19 state dict; unset = perceptual term off


@dataclass
class SelfTrainingConfig:
    """Stage 2 (method.md): bilateral-consensus pseudo-labels, cross-domain ClassMix, online centroids."""

    labels: str = "consensus"  # consensus | prob | feat | threshold (ablations)
    threshold: float = 0.9  # labels=threshold: keep probability labels with confidence >= this
    metric: str = "cosine"  # cosine (diga-fast default) | l2 (the official code)
    feat_upsample: str = "nearest"  # nearest: labels at feature resolution, nearest-upsampled; scores: upsample scores, argmax
    centroid_momentum: float = 1e-4
    centroid_min_pixels: int = 5
    lambda_distill: float = 0.25
    reverse_scale: float = 0.5
    target_beta: float = 0.3  # strong-view blend of the target in ClassMix
    forward: str = "pooled"  # student forwards: pooled (one of all crops) | grouped (official: [x_s; x_cdm], x_mix)
    source_beta: float | None = None  # strong-view blend of the source CrDoMix view; None = warmup.aug.beta (official 0.3)
    pseudo_label_scales: tuple[float, ...] = (1.0, 0.5)
    pseudo_labels: str | None = None  # a folder from `diga pseudo-label`; unset = made in the run folder
    centroids: str | None = None  # a file from `diga centroids`; unset = computed in the run folder


@dataclass
class Recipe:
    preset: str = "demo"
    stage: str = "source"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def digest(self) -> str:
        """A short hash of the resolved recipe (recorded in checkpoints and exported models)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


PRESETS = ("demo", "paper", "paper-daformer")


def preset_recipe(preset: str, stage: str, source: str = "synthetic", target: str = "synthetic") -> Recipe:
    """The preset's defaults. ``demo``: the small CPU model on the built-in pair. ``paper``: the
    official DeepLabV2-R101 recipe (method.md) for GTA5/SYNTHIA -> Cityscapes, with the DAFormer family's
    sizes for Cityscapes -> ACDC / Dark Zurich (:func:`_daformer_sizes`)."""
    if preset not in PRESETS:
        raise DigaError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset == "paper-daformer":
        return paper_daformer_recipe(stage, source, target)
    recipe = Recipe(preset=preset, stage=stage)
    recipe.data.source, recipe.data.target = source, target
    if preset == "paper":
        synthia = source.startswith("synthia")
        recipe.data = DataConfig(
            source=source,
            target=target,
            label_space="synthia16" if synthia else "cityscapes19",
            batch_size=3,
            num_workers=4,
            source_resize=(760, 1280) if synthia else (720, 1280),
            source_scale=None if synthia and stage != "self" else (0.7, 1.0),  # official §8
            target_resize=(512, 1024),
            target_scale=(0.7, 1.0),
            crop=(512, 896),
            content_retry=True,
            eval_scales=(1.0, 0.5),
        )
        recipe.model = ModelConfig(arch="deeplabv2_r101")
        recipe.optim = OptimConfig(lr=2.5e-4)
        recipe.train = TrainConfig(iters=80_000, log_every=50, eval_every=1000, save_every=2000, bf16=False,
                                   ce_normalizer="all", select_on_val=True)
        recipe.warmup.teacher_mode = "train"
        recipe.self_training.source_beta = 0.3
        recipe.self_training.forward = "grouped"
        recipe.self_training.feat_upsample = "scores"  # softmax at feature resolution, upsampled, argmax
        recipe.translator = TranslatorConfig(
            kind="cyclegan", width=64, n_res=4, crop=(512, 896), source_zoom=(1.0, 1.5) if synthia else (1.0, 1.47),
            target_zoom=(1.0, 2.0), identity_weight=0.025 if synthia else 0.001,
        )
        # official batches of two sizes (low + high resolution), rows per size by stage
        low, high = ((760, 1280), (1140, 1920)) if synthia else ((720, 1280), (1052, 1914))
        rows = {("warmup", False): (1, 2), ("warmup", True): (1, 3), ("self", False): (2, 1), ("self", True): (1, 2)}
        if stage != "translator":  # the translator zooms between the two sizes instead (translator.*_zoom)
            low_rows, high_rows = rows.get((stage, synthia), (1, 2))
            recipe.data.source_sizes = ((*low, low_rows), (*high, high_rows))
            recipe.data.batch_size = low_rows + high_rows
            recipe.data.target_sizes = ((512, 1024, 2), (1024, 2048, 1)) if recipe.data.batch_size == 3 else None
        if synthia:  # method.md / official §8: SYNTHIA warm-up differences
            recipe.train.iters = 60_000 if stage == "warmup" else 80_000
            recipe.warmup.lambda_distill = recipe.warmup.reverse_scale = 0.25
            recipe.train.source_loss = "ohem"
            recipe.warmup.aug.jitter_p, recipe.warmup.aug.grayscale_p = 0.7, 0.1
            recipe.self_training.reverse_scale = 0.25
        if stage == "translator":  # official §3: batch 2 + 2, 50k iterations
            recipe.data.batch_size, recipe.train.iters = 2, 50_000
        if _kind(source) == "cityscapes" and _kind(target) in ADVERSE_TARGETS:
            _daformer_sizes(recipe)
    else:  # demo: `diga demo` (every stage) in under five minutes on a 2-vCPU VM (README, "Results on the built-in pair")
        recipe.train.iters = DEMO_ITERS[stage]
        recipe.train.threads = 1  # see TrainConfig.threads
        recipe.data.batch_size = 4
        recipe.data.synthetic_train_images = 300
        # lr 0.05 (head x10: 0.5) trains source-only, but with the warm-up's second loss term the small
        # model's rare classes collapse on some seeds (seed 1: 14.6 mIoU against 29.8 at 0.025; docs/results.md)
        recipe.optim.lr = 0.025
        # The EMA horizon 1/(1 - alpha) as a share of the run: the paper's 0.999 is 1000 of 80k
        # iterations; 0.9 is 10 of the demo's 300 (0.99 would average a third of the warm-up, from its
        # random start: 2-4 points lower on seeds 0 and 1)
        recipe.warmup.ema_max = 0.9
        # The official teacher (train mode) and student forwards (grouped): measured on 3 seeds against
        # the alternatives, both scored higher on average, by less than the seed spread (docs/results.md)
        recipe.warmup.teacher_mode = "train"
        recipe.self_training.forward = "grouped"
    return recipe


ADVERSE_TARGETS = ("acdc", "darkzurich")


def _kind(spec: str) -> str:
    return spec.partition(":")[0].strip().lower()


def _daformer_sizes(recipe: Recipe) -> None:
    """``paper`` for Cityscapes -> ACDC / Dark Zurich, which DiGA did not publish: the sizes of the DAFormer
    family (DAFormer, HRDA, MIC configs ``uda_cityscapes_to_{acdc,darkzurich}_512x512``): Cityscapes
    resized to 512x1024, the 1080x1920 target to 540x960, 512x512 random crops with flip and no
    rescale, batch 2, 40k iterations, evaluation at 540x960 (scale 0.5, logits upsampled to the full
    label). Network, losses and optimiser stay DiGA's."""
    data = recipe.data
    data.source_resize, data.target_resize, data.crop = (512, 1024), (540, 960), (512, 512)
    data.source_sizes = data.target_sizes = data.source_scale = data.target_scale = None
    data.batch_size, data.eval_scales = 2, (0.5,)
    recipe.translator.crop, recipe.translator.source_zoom, recipe.translator.target_zoom = (512, 512), (1.0,), (1.0,)
    if recipe.stage != "translator":  # the translator keeps its official 50k
        recipe.train.iters = 40_000


DEMO_ITERS = {"source": 300, "warmup": 300, "self": 80, "translator": 300}

DAFORMER_ARCHS = tuple(a for a in ARCHS if a.startswith("daformer_"))


def daformer_optim(lr: float = 6e-5, warmup_iters: int = 1500) -> OptimConfig:
    """DAFormer's optimiser: AdamW (betas 0.9 / 0.999), weight decay 0.01 (none on the encoder's norms),
    head x10, linear warm-up from 1e-6 x, then poly 1.0."""
    return OptimConfig(name="adamw", lr=lr, head_lr_mult=10.0, weight_decay=0.01, poly_power=1.0,
                       warmup_iters=warmup_iters, warmup_ratio=1e-6)


def paper_daformer_recipe(stage: str, source: str = "synthetic", target: str = "synthetic") -> Recipe:
    """``paper-daformer``: DiGA (losses, EMA, CrDoMix, consensus, rounds: everything of ``paper``) on
    DAFormer's network, trained as DAFormer trains it: MiT-B5 + context-aware fusion head, AdamW lr 6e-5,
    head x10, weight decay 0.01, linear warm-up 1500 iterations, poly 1.0, 512x512 crops of images
    resized once (GTA5 to 720x1280, SYNTHIA 760x1280, Cityscapes 512x1024; no random rescale), batch 2,
    rare-class sampling. DiGA's own settings for a transformer are not public. The translator stage is
    ``paper``'s."""
    recipe = preset_recipe("paper", stage, source, target)
    recipe.preset = "paper-daformer"
    if stage == "translator":
        return recipe
    recipe.model = ModelConfig(arch="daformer_mitb5")
    recipe.optim = daformer_optim()
    data = recipe.data
    if data.source_sizes is not None:  # GTA5 / SYNTHIA -> Cityscapes (not the adverse targets' sizes)
        data.source_resize = (760, 1280) if source.startswith("synthia") else (720, 1280)
        data.target_resize = (512, 1024)
    data.source_sizes = data.target_sizes = data.source_scale = data.target_scale = None
    data.crop, data.batch_size = (512, 512), 2
    data.rare_class_sampling = True
    return recipe


def use_network(recipe: Recipe, arch: str) -> Recipe:
    """``--model ARCH``: the network; on the ``demo`` preset a DAFormer network also gets DAFormer's
    optimiser (AdamW; SGD at the small CNN's LR does not suit a transformer), at 10x DAFormer's LR and
    a 50-iteration warm-up for runs of a few hundred iterations from random weights, and DAFormer's
    batch of 2 (at the demo's crops its forward and backward take ~30x the small model's on a CPU; docs/daformer.md)."""
    recipe.model.arch = arch
    if recipe.preset == "demo" and arch in DAFORMER_ARCHS:
        recipe.optim = daformer_optim(lr=6e-4, warmup_iters=50)
        recipe.data.batch_size = 2
    return recipe


def choose_network(recipe: Recipe, arch: str | None, pretrained: str | None) -> Recipe:
    """``--model ARCH`` (:func:`use_network`) and ``--pretrained FILE``, each when given, in place."""
    if arch is not None:
        use_network(recipe, arch)
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise DigaError(f"--pretrained: file not found: {pretrained}")
        recipe.model.pretrained = pretrained
    return recipe


# ---------------------------------------------------------------------------------------------
# dict / YAML round trip with type checking


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message stays one readable line."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxlist, shortener.maxdict, shortener.maxstring = 3, 8, 8, 60
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` (from YAML or the command line) against a field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except DigaError as err:
                errors.append(str(err))
        raise DigaError(errors[0] if errors else f"{key}: bad value {_short(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DigaError(f"{key}: expected a list, got {_short(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise DigaError(f"{key}: expected {len(args)} values, got {_short(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise DigaError(f"{key}: expected true or false, got {_short(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DigaError(f"{key}: expected an integer, got {_short(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise DigaError(f"{key}: expected a number, got {_short(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise DigaError(f"{key}: expected a string, got {_short(value)}")
    raise DigaError(f"{key}: unsupported field type {annotation!r}")  # pragma: no cover


# Values of fields that changed type, as older run folders' config.yaml and older commands write them.
LEGACY_VALUES = {"train.kernels": {True: "auto", False: "torch"}}


def _update(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise DigaError(f"unknown recipe key {path!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DigaError(f"{path}: expected a mapping of its fields, got {_short(value)}")
            _update(current, value, prefix=f"{path}.")
        else:
            if isinstance(value, bool) and path in LEGACY_VALUES:
                value = LEGACY_VALUES[path][value]
            setattr(obj, key, _coerce(value, hints[key], path))


def recipe_from_dict(values: dict[str, Any], base: Recipe | None = None) -> Recipe:
    recipe = base if base is not None else Recipe()
    _update(recipe, values)
    return recipe


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise DigaError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as err:
        raise DigaError(f"cannot read config file {path}: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DigaError(f"config file {path} must hold a mapping of recipe fields")
    return data


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """Apply ``section.field=value`` strings; values are parsed as YAML (``1e-3``, ``[512, 896]``,
    ``true``, ``null``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise DigaError(f"override {_short(item)} is not of the form key=value (e.g. optim.lr=0.01)")
        try:
            value = parse_yaml(text) if text != "" else ""
        except yaml.YAMLError as err:
            raise DigaError(f"override {_short(item)}: cannot parse value {_short(text)} "
                            f"({str(err).splitlines()[0]})") from None
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _update(recipe, nested)
    return recipe


# Fields that name one of a few behaviours, checked before a run starts.
CHOICES = {
    ("data", "label_space"): ("cityscapes19", "synthia16"),
    ("model", "arch"): ARCHS,
    ("optim", "name"): ("sgd", "adamw"),
    ("train", "source_loss"): ("ce", "ohem"),
    ("translator", "kind"): ("fda", "cyclegan", "folder"),
    ("self_training", "labels"): ("consensus", "prob", "feat", "threshold"),
    ("self_training", "metric"): ("cosine", "l2"),
    ("self_training", "feat_upsample"): ("nearest", "scores"),
    ("train", "ce_normalizer"): ("valid", "all"),
    ("warmup", "teacher_mode"): ("eval", "train"),
    ("self_training", "forward"): ("pooled", "grouped"),
    ("train", "kernels"): ("auto", "torch", "compile"),
}


@dataclass(frozen=True)
class Range:
    """Allowed values of a number field (every element of a tuple field; None passes where the field
    is optional). ``low``/``high`` are bounds, closed unless ``open_low``/``open_high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '<='} {self.high:g}")
        return " and ".join(parts)


AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, open_low=True)
UNIT, UNIT_OPEN_HIGH = Range(0, 1), Range(0, 1, open_high=True)
SCALE = Range(0, 4, open_low=True)  # inference and rescale factors

RANGES = {
    ("data", "batch_size"): AT_LEAST_1, ("data", "num_workers"): AT_LEAST_0,
    ("data", "source_resize"): AT_LEAST_1, ("data", "target_resize"): AT_LEAST_1,
    ("data", "source_scale"): SCALE, ("data", "target_scale"): SCALE,
    ("data", "crop"): Range(8), ("data", "eval_scales"): SCALE, ("data", "eval_max_images"): AT_LEAST_1,
    ("data", "synthetic_train_images"): AT_LEAST_1, ("data", "synthetic_val_images"): AT_LEAST_1,
    ("model", "dropout"): UNIT_OPEN_HIGH,
    ("optim", "lr"): POSITIVE, ("optim", "head_lr_mult"): POSITIVE, ("optim", "momentum"): UNIT_OPEN_HIGH,
    ("optim", "weight_decay"): AT_LEAST_0, ("optim", "poly_power"): AT_LEAST_0,
    ("optim", "betas"): UNIT_OPEN_HIGH, ("optim", "warmup_iters"): AT_LEAST_0, ("optim", "warmup_ratio"): UNIT,
    ("data", "rcs_temperature"): POSITIVE, ("data", "rcs_min_pixels"): AT_LEAST_0, ("data", "rcs_min_crop_ratio"): UNIT,
    ("train", "iters"): AT_LEAST_1, ("train", "log_every"): AT_LEAST_1, ("train", "eval_every"): AT_LEAST_0,
    ("train", "save_every"): AT_LEAST_1, ("train", "seed"): Range(0, 2**63 - 1), ("train", "threads"): AT_LEAST_0,
    ("train", "dist_timeout_minutes"): POSITIVE,
    ("train", "ohem_thresh"): UNIT, ("train", "ohem_min_kept"): AT_LEAST_1,
    ("warmup", "lambda_distill"): AT_LEAST_0, ("warmup", "reverse_scale"): AT_LEAST_0,
    ("warmup", "temperature"): POSITIVE, ("warmup", "ema_max"): UNIT_OPEN_HIGH, ("warmup", "visualize_every"): AT_LEAST_0,
    **{("warmup", "aug", name): UNIT for name in ("jitter_p", "grayscale_p", "blur_p", "sharpness_p", "beta",
                                                   "brightness", "contrast", "saturation")},
    ("warmup", "aug", "hue"): Range(0, 0.5), ("warmup", "aug", "blur_sigma"): POSITIVE,
    ("warmup", "aug", "sharpness"): AT_LEAST_0,
    ("translator", "fda_beta"): Range(0, 0.5), ("translator", "width"): AT_LEAST_1, ("translator", "n_res"): AT_LEAST_0,
    ("translator", "crop"): Range(16), ("translator", "source_zoom"): SCALE, ("translator", "target_zoom"): SCALE,
    ("translator", "lr"): POSITIVE, ("translator", "betas"): UNIT_OPEN_HIGH,
    **{("translator", name): AT_LEAST_0 for name in ("adv_weight", "cycle_weight", "edge_weight",
                                                       "perceptual_weight", "identity_weight")},
    ("self_training", "threshold"): UNIT, ("self_training", "centroid_momentum"): UNIT,
    ("self_training", "centroid_min_pixels"): AT_LEAST_1, ("self_training", "lambda_distill"): AT_LEAST_0,
    ("self_training", "reverse_scale"): AT_LEAST_0, ("self_training", "target_beta"): UNIT,
    ("self_training", "source_beta"): UNIT,
    ("self_training", "pseudo_label_scales"): SCALE,
}
NON_EMPTY = {("data", "eval_scales"), ("self_training", "pseudo_label_scales"), ("translator", "source_zoom"),
             ("translator", "target_zoom")}


def _field(recipe: Recipe, path: tuple[str, ...]) -> Any:
    value = recipe
    for name in path:
        value = getattr(value, name)
    return value


def validate_recipe(recipe: Recipe, starting_points: bool = True) -> Recipe:
    """Raise one :class:`DigaError` line for the first field outside its choices (:data:`CHOICES`) or
    range (:data:`RANGES`), before any run folder exists; with ``starting_points``, also a ``paper``
    training run without its ImageNet weights or translator."""
    for path, allowed in CHOICES.items():
        value = _field(recipe, path)
        if value not in allowed:
            raise DigaError(f"{'.'.join(path)}={_short(value)}; choose from {', '.join(allowed)}")
    for path, allowed in RANGES.items():
        value, key = _field(recipe, path), ".".join(path)
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        if path in NON_EMPTY and not values:
            raise DigaError(f"{key} must not be empty")
        if not all(allowed.admits(v) for v in values):
            shown = list(value) if isinstance(value, tuple) else value
            raise DigaError(f"{key}={shown}: {'each value must be' if isinstance(value, tuple) else 'must be'} {allowed}")
    for key in ("source_scale", "target_scale"):
        scale = getattr(recipe.data, key)
        if scale is not None and scale[0] > scale[1]:
            raise DigaError(f"data.{key}={list(scale)}: the first value (smallest factor) must not exceed the second")
    if any(s % 4 for s in recipe.translator.crop):
        raise DigaError(f"translator.crop must be multiples of 4, at least 16, got {list(recipe.translator.crop)}")
    for key in ("source_sizes", "target_sizes"):
        sizes = getattr(recipe.data, key)
        if sizes is None:
            continue
        if not sizes or any(min(entry) < 1 for entry in sizes):
            raise DigaError(f"data.{key}={[list(e) for e in sizes]}: give [height, width, rows] entries, all >= 1")
        if sum(rows for _, _, rows in sizes) != recipe.data.batch_size:
            raise DigaError(f"data.{key}={[list(e) for e in sizes]}: the rows add up to "
                            f"{sum(rows for _, _, rows in sizes)}, data.batch_size is {recipe.data.batch_size}")
    if recipe.train.select_on_val and not recipe.train.eval_every:
        raise DigaError("train.select_on_val keeps the best evaluation: it needs train.eval_every > 0")
    if starting_points:
        _check_paper_starting_points(recipe)
    return recipe


def _check_paper_starting_points(recipe: Recipe) -> None:
    """The ``paper`` recipe starts from ImageNet weights and CrDoMix uses the trained translator: a run
    that would silently do neither is refused (explicit ``none`` / another translator kind opt out)."""
    if not recipe.preset.startswith("paper"):
        return
    if recipe.stage in ("source", "warmup") and recipe.model.arch != "small" and not recipe.model.pretrained:
        files = ("the SegFormer release's mit_bX.pth or a Hugging Face SegformerModel file, mapped on load"
                 if recipe.model.arch in DAFORMER_ARCHS else "the official DeepLab init with Scale.* keys, or a "
                 "torchvision ResNet state dict, converted on load")
        raise DigaError(f"the {recipe.preset} recipe starts from ImageNet weights: pass --pretrained FILE ({files}), "
                        "or model.pretrained=none to train from random weights")
    if (recipe.stage in ("warmup", "self") and recipe.warmup.crdomix and recipe.translator.kind == "cyclegan"
            and not recipe.translator.checkpoint):
        raise DigaError("the paper recipe's CrDoMix uses the trained translator: train it with `diga train translator` "
                        "and pass translator.checkpoint=RUN, or choose translator.kind=fda|folder")


# What a stage started from another run (``--init``) does not take over from it: the stage itself
# and its length (the self-training stage has its own).
NOT_INHERITED = ("stage", "preset", "train.iters")


def run_changes(saved: dict[str, Any]) -> dict[str, Any]:
    """What a run's command set: the fields of its saved recipe (its config.yaml, as loaded) that differ
    from its preset's defaults for its stage, source and target, as flat ``key: value``."""
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    defaults = _flat(preset_recipe(str(saved.get("preset", "demo")), str(saved.get("stage", "warmup")),
                                   str(data.get("source", "synthetic")), str(data.get("target", "synthetic"))).to_dict())
    return {key: value for key, value in _flat(_to_plain(saved)).items() if key in defaults and value != defaults[key]}


# Fields that only make sense together (the rows of the per-size batches add up to the batch): one
# set by the saved run's command brings the others of its group along.
TAKEN_TOGETHER = (("data.batch_size", "data.source_sizes", "data.target_sizes"),)


def inherit_run(recipe: Recipe, saved: dict[str, Any]) -> list[str]:
    """Take into ``recipe`` (in place; built from the saved run's preset for its own stage) everything
    the saved run's command set (:func:`run_changes`) but :data:`NOT_INHERITED`, with the rest of its
    :data:`TAKEN_TOGETHER` group; returns ``key=value`` for each field taken."""
    taken = {key: value for key, value in run_changes(saved).items() if key not in NOT_INHERITED}
    flat = _flat(_to_plain(saved))
    for group in TAKEN_TOGETHER:
        if any(key in taken for key in group):
            taken.update({key: flat[key] for key in group if key in flat})
    nested: dict[str, Any] = {}
    for key, value in taken.items():
        *parents, name = key.split(".")
        cursor = nested
        for parent in parents:
            cursor = cursor.setdefault(parent, {})
        cursor[name] = value
    _update(recipe, nested)
    return [f"{key}={_short(value)}" for key, value in taken.items()]


def recipe_changes(saved: dict[str, Any], recipe: Recipe) -> list[str]:
    """``key: old -> new`` for every field in which ``recipe`` differs from a saved one (a run's
    config.yaml, as loaded)."""
    before, after = _flat(_to_plain(saved)), _flat(recipe.to_dict())
    return [f"{key}: {_short(before.get(key))} -> {_short(value)}" for key, value in after.items() if value != before.get(key)]


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Fields that name files or folders: stored absolute, so a run resumes from any working directory.
PATH_FIELDS = (("model", "pretrained"), ("translator", "checkpoint"), ("translator", "folder"),
               ("translator", "vgg_weights"), ("self_training", "pseudo_labels"), ("self_training", "centroids"))


def absolute_paths(recipe: Recipe) -> Recipe:
    """Make dataset roots (``KIND:ROOT``) and :data:`PATH_FIELDS` absolute, in place."""
    for key in ("source", "target"):
        setattr(recipe.data, key, _absolute_spec(getattr(recipe.data, key)))
    recipe.train.eval_targets = tuple(_absolute_spec(spec) for spec in recipe.train.eval_targets)
    for section, name in PATH_FIELDS:
        value = getattr(getattr(recipe, section), name)
        if value and value != "none":
            setattr(getattr(recipe, section), name, str(Path(value).expanduser().absolute()))
    return recipe


def _absolute_spec(spec: str) -> str:
    """``KIND:ROOT?key=value&...`` with ROOT and a ``list=FILE`` option made absolute (other options,
    e.g. ``cond=night``, are words)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind == "synthetic":
        return spec
    root, _, query = rest.partition("?")
    options = [f"list={Path(value).expanduser().absolute()}" if key == "list" else f"{key}{eq}{value}"
               for key, eq, value in (item.partition("=") for item in query.split("&") if item)]
    return f"{kind}:{Path(root).expanduser().absolute()}" + (f"?{'&'.join(options)}" if options else "")


def save_yaml(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
