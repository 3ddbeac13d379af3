"""ImageNet weights of the MiT encoder from a local file, in either published layout, mapped on load.

* The SegFormer release (``mit_b0.pth`` ... ``mit_b5.pth``, what DAFormer starts from): the encoder's
  own names (``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``, ``block1.0.attn.kv.weight``,
  ``norm1.weight``, ...); its ImageNet classifier ``head.*`` is ignored.
* Hugging Face ``SegformerModel`` / ``SegformerForImageClassification`` / ``...ForSemanticSegmentation``
  (``pytorch_model.bin`` or ``model.safetensors``), keys with or without the ``segformer.`` prefix, in
  the layout of the files on the Hub (``encoder.patch_embeddings.0.proj.weight``,
  ``encoder.block.0.0.attention.self.query.weight``, ...) or in the one transformers >= 5 keeps in
  memory (``stages.0.patch_embeddings.proj.weight``, ``stages.0.blocks.0.attention.q_proj.weight``,
  ...). Separate key and value projections are concatenated into the release's ``kv`` (keys first);
  ``classifier.*`` and ``decode_head.*`` are ignored.

A file may wrap its state dict in ``{"state_dict": ...}`` or ``{"model": ...}``. The encoder must be
covered exactly (every tensor present with its shape); a file of another MiT size says which size it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from diga_fast.errors import DigaError
from diga_fast.models.base import check_state_dict
from diga_fast.models.mit import MIT_CONFIGS
from diga_fast.utils.io import torch_load_error

# (pattern, replacement) applied in order to a key with its "segformer." prefix removed.
_HUB_RULES = (
    (r"^encoder\.patch_embeddings\.(\d)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^encoder\.patch_embeddings\.(\d)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^encoder\.layer_norm\.(\d)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^encoder\.block\.(\d)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
)
_MEMORY_RULES = (
    (r"^stages\.(\d)\.patch_embeddings\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^stages\.(\d)\.patch_embeddings\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^stages\.(\d)\.layer_norm\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
)
# Inside a block (after the prefix rules), both Hugging Face layouts.
_BLOCK_RULES = (
    (r"\.layer_norm_1\.|\.layernorm_before\.", ".norm1."),
    (r"\.layer_norm_2\.|\.layernorm_after\.", ".norm2."),
    (r"\.attention\.self\.query\.|\.attention\.q_proj\.", ".attn.q."),
    (r"\.attention\.self\.key\.|\.attention\.k_proj\.", ".attn.k."),
    (r"\.attention\.self\.value\.|\.attention\.v_proj\.", ".attn.v."),
    (r"\.attention\.self\.sr\.|\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.|\.attention\.sequence_reduction\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.|\.attention\.o_proj\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
)
# (first-key prefix, layout name, rules): how each published layout is recognised and renamed.
_LAYOUTS = (
    ("patch_embed1.", "SegFormer release", ()),
    ("encoder.patch_embeddings.", "Hugging Face SegformerModel", _HUB_RULES),
    ("stages.0.patch_embeddings.", "Hugging Face SegformerModel (transformers >= 5)", _MEMORY_RULES),
)
RELEASE_LAYOUT = _LAYOUTS[0][1]
WRAPPERS = ("state_dict", "model")  # keys a file may wrap its state dict in, outermost first
_IGNORED_PREFIXES = ("head.", "classifier.", "decode_head.")
RELEASE_EXAMPLE = "patch_embed1.proj.weight, block1.0.attn.q.weight, ..."
HF_EXAMPLE = "[segformer.]encoder.patch_embeddings.0.proj.weight, ..."


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A dict of name -> tensor from a ``.safetensors`` file or a PyTorch pickle (tensors only)."""
    if not path.is_file():
        raise DigaError(f"pretrained weights not found: {path}")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a text file, a truncated download, a pickle of other objects
        raise DigaError(f"{path} is not a state dict of tensors ({torch_load_error(exc)})") from None
    state, _ = unwrap_state_dict(state)
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DigaError(f"{path} is not a state dict (expected a dict of name -> tensor)")
    return state


def unwrap_state_dict(state: object) -> tuple[object, tuple[str, ...]]:
    """``state`` out of its :data:`WRAPPERS` (``{"state_dict": ...}``, ``{"model": ...}``), and the ones removed."""
    removed = []
    for wrapper in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            removed.append(wrapper)
    return state, tuple(removed)


def mit_layout(state: dict[str, torch.Tensor]) -> str | None:
    """The published MiT layout of a state dict (``"SegFormer release"``, ``"Hugging Face SegformerModel"``,
    ...), or None; keys may carry the ``segformer.`` prefix."""
    keys = [k.removeprefix("segformer.") for k in state]
    return next((name for prefix, name, _ in _LAYOUTS if any(k.startswith(prefix) for k in keys)), None)


def _apply(rules, key: str) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def to_release_layout(state: dict[str, torch.Tensor], source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout name, the encoder's tensors under the release's names) for a file of any known layout."""
    stripped = {k.removeprefix("segformer."): v for k, v in state.items()}
    layout = mit_layout(state)
    if layout is None:
        raise DigaError(f"{source} is neither a SegFormer release MiT file ({RELEASE_EXAMPLE}) nor a Hugging Face "
                        f"SegformerModel state dict ({HF_EXAMPLE}); first key: {next(iter(state))!r}")
    rules = next(rules for _, name, rules in _LAYOUTS if name == layout)
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in stripped.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        mapped[_apply(_BLOCK_RULES, _apply(rules, key)) if rules else key] = tensor
    for key in [k for k in mapped if ".attn.k." in k]:
        value_key = key.replace(".attn.k.", ".attn.v.")
        if value_key in mapped:
            mapped[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([mapped.pop(key), mapped.pop(value_key)])
    return layout, mapped


def _widths_and_depths(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    widths = tuple(state[f"norm{i}.weight"].shape[0] for i in range(1, 5) if f"norm{i}.weight" in state)
    depths = tuple(len({k.split(".")[1] for k in state if k.startswith(f"block{i}.")}) for i in range(1, 5))
    return widths, depths


def mit_variant(state: dict[str, torch.Tensor]) -> str | None:
    """The MiT size (a :data:`MIT_CONFIGS` key, ``"b2"``) of a release-layout state dict, or None."""
    widths, depths = _widths_and_depths(state)
    return next((name for name, config in MIT_CONFIGS.items()
                 if widths == config.embed_dims and depths == config.depths), None)


def describe_mit(state: dict[str, torch.Tensor]) -> str:
    """Which MiT size a release-layout state dict holds ("MiT-b2"), or its widths and depths."""
    variant = mit_variant(state)
    if variant is not None:
        return f"MiT-{variant}"
    widths, depths = _widths_and_depths(state)
    return f"a MiT with widths {widths} and depths {depths}"


def check_mit_state(encoder: nn.Module, state: dict[str, torch.Tensor], path: Path, layout: str) -> None:
    """A release-layout ``state`` (read from ``path`` in ``layout``) covers ``encoder`` exactly, or one
    DigaError line that says which MiT size the file holds."""
    mine = next(name for name, config in MIT_CONFIGS.items() if config == encoder.config)

    def problem(detail: str) -> DigaError:
        return DigaError(f"{path} ({layout} layout, {describe_mit(state)}) does not fit the MiT-{mine} encoder: {detail}")

    check_state_dict(state, encoder.state_dict(), problem)


def load_mit_weights(encoder: nn.Module, path: str | Path) -> str:
    """Load a local MiT file into ``encoder`` (a :class:`MixVisionTransformer`), strictly; returns the
    layout it was read as."""
    path = Path(path)
    layout, state = to_release_layout(read_state_dict(path), str(path))
    check_mit_state(encoder, state, path, layout)
    with torch.no_grad():
        for key, tensor in encoder.state_dict().items():
            tensor.copy_(state[key])
    return layout
