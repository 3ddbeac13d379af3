"""The Mix Transformer (MiT) encoder of SegFormer (Xie et al., NeurIPS 2021), B0 to B5, as DAFormer uses it.

Four stages; stage i turns its input into tokens with an *overlapping patch embedding* (a strided conv:
7x7/4 padding 3 for stage 1, 3x3/2 padding 1 for stages 2-4, then LayerNorm), runs ``depths[i]``
transformer blocks on them and ends with a LayerNorm. An H x W image gives maps of
``ceil(H / 4)``, ``ceil(H / 8)``, ``ceil(H / 16)``, ``ceil(H / 32)`` rows (likewise for columns), with
``embed_dims`` channels. A block is

    x = x + drop_path(attn(norm1(x)))       efficient self-attention
    x = x + drop_path(mlp(norm2(x)))        Mix-FFN

* **Efficient self-attention**: queries from every token; keys and values from the token map shrunk by
  a ``sr_ratio`` x ``sr_ratio`` conv of stride ``sr_ratio`` (then LayerNorm), so attention costs
  N x N / sr_ratio^2 (sr_ratio 8, 4, 2, 1 by stage; stage 4 attends over all tokens). A map side that
  is no multiple of ``sr_ratio`` is floored by the conv, as in the reference; nothing depends on a
  fixed input size, so exported graphs keep dynamic height and width.
* **Mix-FFN**: fc1 (x4 width) -> depth-wise 3x3 conv on the token map (the positional information;
  there are no position embeddings) -> GELU -> fc2.
* **Stochastic depth**: the residual branches of block j (counted over all stages) are dropped per
  sample with probability ``drop_path_rate * j / (blocks - 1)`` in training (0.1 at most, as DAFormer).

Module and parameter names are those of the SegFormer release (``patch_embed1.proj.weight``,
``block1.0.attn.q.weight``, ``block1.0.attn.kv.weight``, ``norm1.weight``, ...), so its ImageNet files
(``mit_b5.pth``) load key for key; :mod:`diga_fast.models.mit_weights` maps the Hugging Face layout.
LayerNorm eps is the release's: 1e-6 in the blocks and the stage-final norms, PyTorch's 1e-5 in the
patch embeddings and the key/value reduction (the Hugging Face port uses 1e-5 everywhere).

Initialisation without weights is the release's: Linear ~ trunc-normal(std 0.02), conv ~ N(0, 2 / fan_out),
biases 0, LayerNorm 1 / 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MiTConfig:
    embed_dims: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    drop_path_rate: float = 0.1


_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
MIT_CONFIGS = {
    "b0": MiTConfig((32, 64, 160, 256), _HEADS, (2, 2, 2, 2)),
    "b1": MiTConfig(_WIDE, _HEADS, (2, 2, 2, 2)),
    "b2": MiTConfig(_WIDE, _HEADS, (3, 4, 6, 3)),
    "b3": MiTConfig(_WIDE, _HEADS, (3, 4, 18, 3)),
    "b4": MiTConfig(_WIDE, _HEADS, (3, 8, 27, 3)),
    "b5": MiTConfig(_WIDE, _HEADS, (3, 6, 40, 3)),
}


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]."""
    return x.flatten(2).transpose(1, 2)


def to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W], contiguous (a strided view here would make the convs' choice of
    memory format, and so a ``torch.export`` graph, depend on the batch and map sizes)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width).contiguous()


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of the samples (scaling the rest
    by 1 / keep) in training; the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv with ``patch // 2`` padding, then LayerNorm over channels: image/map -> tokens."""

    def __init__(self, in_channels: int, dim: int, patch: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=stride, padding=patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[2], x.shape[3]
        return self.norm(to_tokens(x)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from the spatially reduced token map."""

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # keys (first half of the outputs), then values
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.heads
        q = self.q(x).reshape(batch, tokens, self.heads, head_dim).transpose(1, 2)
        context = x
        if self.sr_ratio > 1:
            context = self.norm(to_tokens(self.sr(to_map(x, height, width))))
        kv = self.kv(context).reshape(batch, -1, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DWConv(nn.Module):
    """The depth-wise 3x3 conv of the Mix-FFN, on the token map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return to_tokens(self.dwconv(to_map(x, height, width)))


class MixFFN(nn.Module):
    """fc1 -> depth-wise 3x3 conv on the token map -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), height, width)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class MixVisionTransformer(nn.Module):
    """``forward(x)`` -> the four stage outputs [B, C_i, H_i, W_i] (strides 4, 8, 16, 32)."""

    def __init__(self, config: MiTConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        start = 0
        for i, (dim, heads, depth) in enumerate(zip(config.embed_dims, config.num_heads, config.depths), start=1):
            patch, stride = (7, 4) if i == 1 else (3, 2)
            previous = in_channels if i == 1 else config.embed_dims[i - 2]
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(previous, dim, patch, stride))
            setattr(self, f"block{i}", nn.ModuleList(
                Block(dim, heads, config.mlp_ratios[i - 1], config.sr_ratios[i - 1], rates[start + j])
                for j in range(depth)
            ))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            start += depth
        self.apply(_init_weights)

    @property
    def out_channels(self) -> tuple[int, int, int, int]:
        return self.config.embed_dims

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            tokens, height, width = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                tokens = block(tokens, height, width)
            x = to_map(getattr(self, f"norm{i}")(tokens), height, width)
            outs.append(x)
        return outs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
