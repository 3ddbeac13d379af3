"""Every weight file of diga-fast, written and read in one place.

* Segmentation models: ``*.safetensors`` with the model's arch, class count and label space in the
  header (:func:`save_weights`, :func:`load_model`); a run folder's model is ``model.safetensors``
  (source-only) or ``student.safetensors`` (the DiGA stages).
* The learned translator: ``translator.safetensors`` holding the source->target generator with the
  metadata that rebuilds it (:func:`save_translator`, :func:`load_translator_generator`).
* The perceptual loss's VGG: a local torchvision ``vgg16``/``vgg19`` state dict (:func:`load_vgg_features`).
* Class centroids: ``{"centroids": K x D}`` files (:func:`save_centroids`, :func:`load_centroids`).
Every file is written atomically; every bad file is one :class:`DigaError` line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diga_fast.labels import get_label_space
from diga_fast.errors import DigaError
from diga_fast.models import SegmentationModel, build_model
from diga_fast.models.translator import ImageTranslator, VGGFeatures
from diga_fast.utils.io import atomic_write

FORMAT = "diga-fast/1"
WEIGHT_FILES = ("model.safetensors", "student.safetensors")  # what a run folder's model is, in order
TRANSLATOR_FORMAT = "diga-fast-translator/1"
TRANSLATOR_FILE = "translator.safetensors"


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


@dataclass(frozen=True)
class WeightFile:
    """A weight file's content, copied off its module when made: it can be written later, after the
    module has trained on (a checkpoint is written once its weights have given a finite loss)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @classmethod
    def of(cls, module: nn.Module, metadata: dict[str, str]) -> WeightFile:
        return cls({k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}, metadata)

    def write(self, path: str | Path) -> None:
        atomic_write(Path(path), lambda tmp: save_file(self.tensors, str(tmp), metadata=self.metadata))


def _read_header(path: Path, what: str) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise DigaError(f"{path} is not a {what} (safetensors): {_first_line(err)}") from None


def check_fits(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``state`` has exactly ``module``'s keys with its shapes, or one clear line naming the first miss."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        kind = "is missing" if missing else "is not part of the model"
        raise DigaError(f"{source} does not fit the {getattr(module, 'arch', 'model')} model: key {key!r} {kind}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise DigaError(
                f"{source} does not fit the model: {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with one clear line on any mismatch."""
    check_fits(module, state, source)
    module.load_state_dict(state)


# ------------------------------------------------------------------------------ segmentation models


def model_weights(model: SegmentationModel, label_space: str, recipe_digest: str = "") -> WeightFile:
    """A segmentation model's weight file: its tensors and the header that rebuilds it."""
    return WeightFile.of(model, {
        "format": FORMAT,
        "arch": model.arch,
        "num_classes": str(model.num_classes),
        "label_space": label_space,
        "recipe": recipe_digest,
    })


def save_weights(path: Path, model: SegmentationModel, label_space: str, recipe_digest: str = "") -> None:
    model_weights(model, label_space, recipe_digest).write(path)


def resolve_weights(run_or_file: str | Path) -> Path:
    """The weight file of a run folder (its ``best/`` when ``train.select_on_val`` kept one, said on
    stderr), or the file itself."""
    path = Path(run_or_file)
    if path.is_dir():
        best = path / "best"
        for folder in (best, path):
            for name in WEIGHT_FILES:
                if (folder / name).is_file():
                    if folder == best:
                        chosen = json.loads((best / "eval.json").read_text()) if (best / "eval.json").is_file() else {}
                        print(f"{path}: using best/ (step {chosen.get('step', '?')}, target-val mIoU "
                              f"{chosen.get('miou', float('nan')):.2f}, kept by train.select_on_val)", file=sys.stderr)
                    return folder / name
        raise DigaError(f"{path} holds no model weights ({' or '.join(WEIGHT_FILES)})")
    if not path.exists():
        raise DigaError(f"checkpoint not found: {path}")
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The header of a model checkpoint, checked: a known arch, a positive class count, a known label
    space (so an edited header is one line, not a traceback later)."""
    from diga_fast.config import ARCHS

    metadata = _read_header(path, "diga-fast checkpoint")
    if metadata.get("format") != FORMAT:
        raise DigaError(f"{path} is a safetensors file but not a diga-fast model checkpoint")
    if metadata.get("arch") not in ARCHS:
        raise DigaError(f"{path}: its metadata names no known model (arch={metadata.get('arch')!r}; known: {', '.join(ARCHS)})")
    if not metadata.get("num_classes", "").isdigit() or int(metadata["num_classes"]) < 1:
        raise DigaError(f"{path}: its metadata has no valid class count (num_classes={metadata.get('num_classes')!r})")
    get_label_space(metadata.get("label_space", ""))
    return metadata


def load_model(run_or_file: str | Path) -> tuple[SegmentationModel, dict[str, str]]:
    """Build the model a checkpoint describes and load its weights. Returns (model, metadata)."""
    path = resolve_weights(run_or_file)
    metadata = read_metadata(path)
    arch, num_classes = metadata["arch"], int(metadata["num_classes"])
    model = build_model(arch, num_classes)
    load_state_checked(model, load_file(str(path)), str(path))
    return model, metadata


# ------------------------------------------------------------------------------ the translator


def translator_weights(generator: ImageTranslator, recipe_digest: str = "") -> WeightFile:
    """One direction's weights with the metadata that rebuilds it (kind, width, n_res)."""
    return WeightFile.of(generator, {
        "format": TRANSLATOR_FORMAT,
        "kind": "cyclegan",
        "width": str(generator.width),
        "n_res": str(generator.n_res),
        "recipe": recipe_digest,
    })


def save_translator(path: str | Path, generator: ImageTranslator, recipe_digest: str = "") -> None:
    translator_weights(generator, recipe_digest).write(path)


def read_translator_header(path: Path) -> tuple[int, int]:
    """(width, n_res) from a translator checkpoint's header, checked."""
    metadata = _read_header(path, "translator checkpoint")
    if metadata.get("format") != TRANSLATOR_FORMAT or metadata.get("kind") != "cyclegan":
        raise DigaError(f"{path} is not a translator checkpoint (no {TRANSLATOR_FORMAT} cyclegan metadata)")
    try:
        return int(metadata["width"]), int(metadata["n_res"])
    except (KeyError, ValueError):
        raise DigaError(f"{path}: translator metadata lacks a valid width / n_res") from None


def load_translator_generator(path: str | Path, device: str | torch.device | None = None) -> ImageTranslator:
    """The source->target generator (enc_s + dec_s2t) from ``diga train translator``: a run folder
    or its ``translator.safetensors``. Frozen, in eval mode, on ``device`` (default CPU)."""
    path = Path(path)
    if path.is_dir():
        if not (path / TRANSLATOR_FILE).is_file():
            raise DigaError(f"{path} holds no {TRANSLATOR_FILE} (train one with `diga train translator`)")
        path = path / TRANSLATOR_FILE
    elif not path.is_file():
        raise DigaError(f"translator checkpoint not found: {path}")
    width, n_res = read_translator_header(path)
    generator = ImageTranslator(width, n_res)
    load_state_checked(generator, load_file(str(path)), str(path))
    generator.requires_grad_(False)
    return generator.eval().to(device or "cpu")


VGG_VARIANTS = {13: "vgg16", 16: "vgg19"}  # conv layers in ``features`` -> torchvision's name


def vgg_features(state: dict) -> dict:
    """The ``features.*`` entries of a torchvision VGG state dict (its ``classifier.*`` is not used)."""
    return {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}


def vgg_conv_count(features: dict) -> int:
    """How many conv layers :func:`vgg_features` holds (13: vgg16, 16: vgg19; see :data:`VGG_VARIANTS`)."""
    return sum(1 for k in features if k.endswith(".weight"))


def load_vgg_features(path: str | Path) -> VGGFeatures:
    """A :class:`VGGFeatures` from a local torchvision ``vgg16``/``vgg19`` state dict (``.pth`` or
    ``.safetensors``; ``classifier.*`` entries are ignored; vgg16 vs vgg19 is read from the keys)."""
    path = Path(path)
    if not path.is_file():
        raise DigaError(f"translator.vgg_weights: file not found: {path}")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any read failure means a bad file
        raise DigaError(f"translator.vgg_weights: cannot read {path}: {_first_line(err)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DigaError(f"translator.vgg_weights: {path} does not hold a state dict")
    features = vgg_features(state)
    convs = vgg_conv_count(features)
    variant = VGG_VARIANTS.get(convs)
    if variant is None:
        raise DigaError(
            f"translator.vgg_weights: {path} is not a torchvision vgg16/vgg19 state dict "
            f"(found {convs} 'features.*' conv weights, expected 13 or 16)"
        )
    model = VGGFeatures(variant)
    load_state_checked(model, features, f"translator.vgg_weights {path}")
    return model


# ------------------------------------------------------------------------------ centroids


def save_centroids(path: Path, centroids: torch.Tensor, **extra: torch.Tensor) -> None:
    """``{"centroids": K x D, **extra}`` (e.g. ``pixel_counts``), written atomically."""
    tensors = {"centroids": centroids.detach().cpu(), **{k: v.detach().cpu() for k, v in extra.items()}}
    atomic_write(Path(path), lambda tmp: torch.save(tensors, tmp))


def load_centroids(path: str | Path, model: SegmentationModel) -> torch.Tensor:
    """float32 [K, D] centroids for ``model`` from a file of :func:`save_centroids` (or a bare tensor)."""
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
