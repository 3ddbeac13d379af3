"""What a local weight file is (``diga weights inspect FILE``): its format, the network it fits, its
parameter count, size and sha256, and the options that take it.

A format is recognised by its own loader's detection (:func:`~diga_fast.models.deeplabv2.resnet_layout`,
:func:`~diga_fast.models.mit_weights.mit_layout`, :func:`~diga_fast.models.io.vgg_features`, the
``format`` field of a diga-fast safetensors header) and then checked as that loader checks it, against
the network's shapes built without weights: a file reported here loads, and one that would not is the
loader's own one-line error. Files are read with ``torch.load(weights_only=True)`` or safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from diga_fast.errors import DigaError
from diga_fast.models import build_model
from diga_fast.models.deeplabv2 import (BACKBONE_MODULES, DeepLabV2, backbone_tensors, check_backbone_tensors,
                                        resnet_depth, resnet_layout)
from diga_fast.models.io import (FORMAT, TRANSLATOR_FILE, TRANSLATOR_FORMAT, VGG_VARIANTS, WEIGHT_FILES, check_fits,
                                 read_metadata, read_translator_header, vgg_conv_count, vgg_features)
from diga_fast.models.mit import MIT_CONFIGS, MixVisionTransformer
from diga_fast.models.mit_weights import (RELEASE_LAYOUT, check_mit_state, describe_mit, mit_layout, mit_variant,
                                          to_release_layout, unwrap_state_dict)
from diga_fast.models.translator import ImageTranslator, VGGFeatures
from diga_fast.utils.io import torch_load_error

# The weight file of a folder, first found: a diga-fast run's model, a Hugging Face folder's
# (model.safetensors or pytorch_model.bin, beside its config.json), a translator run's.
FOLDER_FILES = (*WEIGHT_FILES, "pytorch_model.bin", TRANSLATOR_FILE)
SOURCES = ("gta5", "synthia", "cityscapes")  # the sources a preset's network is looked up for
KNOWN = ("the DeepLab init (Scale.*), torchvision resnet50/101 (conv1.*, layer1.*) or vgg16/19 (features.*), "
         "SegFormer mit_b0..b5 (patch_embed1.*), Hugging Face Segformer ([segformer.]encoder.patch_embeddings.*), "
         "diga-fast .safetensors")
CHECKPOINT_USES = ("--checkpoint of diga eval / predict / export / pseudo-label / centroids",
                   "--init of diga train self (a warm-up or self-training student)")
TRANSLATOR_USES = ("translator.checkpoint=FILE with translator.kind=cyclegan (CrDoMix in diga train warmup / self)",
                   "diga data translate --translator FILE")


def inspect_weights(path: str | Path) -> dict:
    """A report on the weight file ``path`` (or the weight file of the folder ``path``): ``format``,
    ``description``, ``network``, ``parameters`` (of the network, taken from the file), ``tensors`` (in the
    file), ``file_bytes``, ``sha256`` (of the file), ``accepted_by`` (the options that take it), and for
    diga-fast files their ``metadata``, for a Hugging Face folder its ``config``. One DigaError line for a
    missing, unreadable or unrecognised file."""
    path = Path(path)
    file = _weight_file(path)
    state, metadata = _read(file)
    report = {"path": str(path), "file": str(file), **_identify(file, state, metadata)}
    if path.is_dir():
        report["accepted_by"] = [f"{use} (give the file {file}, not the folder)" if use.startswith("--pretrained")
                                 else use for use in report["accepted_by"]]
        if (path / "config.json").is_file():
            report["config"] = _hub_config(path / "config.json")
    report["tensors"] = len(unwrap_state_dict(state)[0])  # _identify found a dict of tensors in there
    report["file_bytes"] = file.stat().st_size
    with file.open("rb") as handle:
        report["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
    return report


def _weight_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise DigaError(f"{path}: no such file or folder")
    for name in FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise DigaError(f"{path} is a folder with no weight file ({', '.join(FOLDER_FILES)})")


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _read(file: Path) -> tuple[object, dict[str, str]]:
    """(the file's content, its safetensors header or {}), read as the loaders read it: by suffix."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise DigaError(f"{file} is not a readable safetensors file: {_first_line(err)}") from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True), {}
    except Exception as err:  # noqa: BLE001 - a text file, a truncated download, a pickle of other objects
        raise DigaError(f"{file} is not a PyTorch file of tensors ({torch_load_error(err)})") from None


def _hub_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DigaError(f"{path} is not readable JSON: {_first_line(err)}") from None
    return {key: config[key] for key in ("model_type", "architectures", "hidden_sizes", "depths") if key in config}


def _skeleton(build: Callable[[], nn.Module]) -> nn.Module:
    """A network's names and shapes without its weights: built on the meta device (no memory, no
    initialisation), or on the CPU where the constructor computes with tensors (MiT's drop-path rates)."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        return build()


def _parameters(state: dict[str, torch.Tensor], names: object) -> int:
    """How many of the network's parameter values (``names``; not its buffers) the file provides."""
    return sum(state[name].numel() for name in names if name in state)


def _pretrained_uses(network: str) -> list[str]:
    """The ``--pretrained`` uses of an ImageNet file of ``network``: each preset built on it (for the
    sources it is built on for), and any preset with ``--model``."""
    from diga_fast.config import PRESETS, preset_recipe

    uses = []
    for preset in PRESETS:
        sources = [source for source in SOURCES
                   if preset_recipe(preset, "warmup", f"{source}:ROOT", "cityscapes:ROOT").model.arch == network]
        if sources:
            uses.append(f"--pretrained for --preset {preset} ({network}; --source {' / '.join(sources)})")
    uses.append(f"--pretrained with --model {network} (model.pretrained=FILE), any preset")
    return uses


def _identify(file: Path, content: object, metadata: dict[str, str]) -> dict:
    if metadata.get("format") == FORMAT:
        return _diga_model(file, content)
    if metadata.get("format") == TRANSLATOR_FORMAT:
        return _diga_translator(file, content, metadata)
    state, wrappers = unwrap_state_dict(content)
    if not isinstance(state, dict) or not state:
        found = "an empty dict" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise DigaError(f"{file} holds no state dict (found {found}); known: {KNOWN}")
    odd = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise DigaError(f"{file} is not a state dict of tensors: entry {odd[0]!r} is a {type(odd[1]).__name__}")
    if resnet_layout(state) is not None:
        return _resnet(file, state, wrappers)
    if mit_layout(state) is not None:
        return _mit(file, state)
    if vgg_features(state):
        return _vgg(file, state, wrappers)
    first = ", ".join(repr(k) for k in list(state)[:3])
    raise DigaError(f"{file} is no weight file diga-fast knows ({len(state)} tensor{'s' if len(state) != 1 else ''}; "
                    f"first keys {first}); known: {KNOWN}")


def _resnet(file: Path, state: dict[str, torch.Tensor], wrappers: tuple[str, ...]) -> dict:
    layout = resnet_layout(state)
    name = "the official DeepLab init" if layout == "deeplab" else "a torchvision ResNet"
    if wrappers:
        raise DigaError(f"{file} holds {name} under {'/'.join(wrappers)!r}; --pretrained takes the bare state dict "
                        f"(torch.save(torch.load(FILE)[{wrappers[0]!r}], OUT))")
    if file.suffix == ".safetensors":  # load_backbone_weights reads a PyTorch file only
        raise DigaError(f"{file} holds {name} as safetensors; --pretrained of deeplabv2 takes a PyTorch .pth "
                        "(torch.save(safetensors.torch.load_file(FILE), OUT.pth))")
    backbone = backbone_tensors(state)
    depth = resnet_depth(backbone) or 101
    model = _skeleton(lambda: DeepLabV2(depth=depth, num_classes=19))
    check_backbone_tensors(model, backbone, file)
    names = [n for n, _ in model.named_parameters() if n.split(".")[0] in BACKBONE_MODULES]
    if layout == "deeplab":
        fmt, description = "deeplab-official-init", (f"the official DeepLab ImageNet init of ResNet-{depth} (Caffe-"
                                                      "converted, keys Scale.*; its layer5 head is not used)")
    else:
        fmt, description = f"torchvision-resnet{depth}", (f"a torchvision ResNet-{depth} ImageNet state dict (fc.* is "
                                                          "not used; converted to the Caffe BGR input on load)")
    return {"format": fmt, "description": description, "network": model.arch,
            "parameters": _parameters(backbone, names), "accepted_by": _pretrained_uses(model.arch)}


def _mit(file: Path, state: dict[str, torch.Tensor]) -> dict:
    layout, mapped = to_release_layout(state, str(file))
    variant = mit_variant(mapped)
    if variant is None:
        raise DigaError(f"{file} ({layout} layout) holds {describe_mit(mapped)}: no MiT size diga-fast builds "
                        f"({', '.join(f'mit{v}' for v in MIT_CONFIGS)})")
    encoder = _skeleton(lambda: MixVisionTransformer(MIT_CONFIGS[variant]))
    check_mit_state(encoder, mapped, file, layout)
    release = layout == RELEASE_LAYOUT
    unused = "head.*" if release else "classifier.* / decode_head.*"
    network = f"daformer_mit{variant}"
    return {"format": "segformer-mit" if release else "huggingface-segformer",
            "description": f"{layout} layout of the MiT-{variant} ImageNet encoder ({unused} not used)",
            "network": network, "parameters": _parameters(mapped, (n for n, _ in encoder.named_parameters())),
            "accepted_by": _pretrained_uses(network)}


def _vgg(file: Path, state: dict[str, torch.Tensor], wrappers: tuple[str, ...]) -> dict:
    features = vgg_features(state)
    variant = VGG_VARIANTS.get(vgg_conv_count(features))
    if variant is None or wrappers not in ((), ("state_dict",)):
        found = f"{vgg_conv_count(features)} 'features.*' conv weights"
        if wrappers:
            found += f" under {'/'.join(wrappers)!r}"
        raise DigaError(f"{file} is not a torchvision vgg16/vgg19 state dict (found {found}, expected 13 or 16)")
    model = _skeleton(lambda: VGGFeatures(variant))
    check_fits(model, features, str(file))
    note = "" if variant == "vgg19" else "; the official code uses vgg19"
    return {"format": f"torchvision-{variant}",
            "description": f"a torchvision {variant} ImageNet state dict (features.* used, classifier.* not{note})",
            "network": variant, "parameters": _parameters(features, (n for n, _ in model.named_parameters())),
            "accepted_by": ["translator.vgg_weights=FILE (the translator's perceptual loss, diga train translator)"]}


def _diga_model(file: Path, state: dict[str, torch.Tensor]) -> dict:
    metadata = read_metadata(file)
    arch, num_classes = metadata["arch"], int(metadata["num_classes"])
    model = _skeleton(lambda: build_model(arch, num_classes))
    check_fits(model, state, str(file))
    return {"format": "diga-fast-model",
            "description": f"a diga-fast segmentation model ({FORMAT}: {arch}, {num_classes} classes, "
                           f"label space {metadata.get('label_space')})",
            "network": arch, "parameters": _parameters(state, (n for n, _ in model.named_parameters())),
            "accepted_by": list(CHECKPOINT_USES), "metadata": metadata}


def _diga_translator(file: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    width, n_res = read_translator_header(file)
    generator = _skeleton(lambda: ImageTranslator(width, n_res))
    check_fits(generator, state, str(file))
    return {"format": "diga-fast-translator",
            "description": f"a diga-fast source->target translator ({TRANSLATOR_FORMAT}: width {width}, {n_res} "
                           "residual blocks)",
            "network": f"cyclegan translator (width {width}, n_res {n_res})",
            "parameters": _parameters(state, (n for n, _ in generator.named_parameters())),
            "accepted_by": list(TRANSLATOR_USES), "metadata": metadata}
