"""MPT: ALiBi attention, bias-free LayerNorm and linears, fused qkv.

ALiBi needs no rotation: `attend` biases each score by -slope * (query position - key position), with
positions taken *inside the cache* (sinks 0..S-1, then the window contiguous), exactly as the paper does
for MPT. So a key's distance shrinks as older tokens are evicted, like a re-indexed cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import cached_attention
from ..cache import LayerSpec
from ..errors import UnsupportedModelError
from . import register
from .base import CausalLM, embedding


@dataclass
class MptConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    alibi_bias_max: float = 8.0
    softmax_scale: float | None = None
    clip_qkv: float | None = None
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "MptConfig":
        attn = d.get("attn_config") or {}
        if not attn.get("alibi", True):
            raise UnsupportedModelError("MPT without ALiBi (learned position embeddings) is not supported")
        if attn.get("qk_ln"):
            raise UnsupportedModelError("MPT with qk_ln is not supported")
        hidden = d.get("d_model") or d["hidden_size"]
        return cls(vocab_size=d["vocab_size"], hidden_size=hidden,
                   num_hidden_layers=d.get("n_layers") or d["num_hidden_layers"],
                   num_attention_heads=d.get("n_heads") or d["num_attention_heads"],
                   ffn_hidden_size=int(d.get("expansion_ratio", 4) * hidden),
                   alibi_bias_max=attn.get("alibi_bias_max", 8), softmax_scale=attn.get("softmax_scale"),
                   clip_qkv=attn.get("clip_qkv"), layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
                   max_position_embeddings=d.get("max_seq_len") or d.get("max_position_embeddings") or 2048)


def alibi_slopes(heads: int, bias_max: float) -> torch.Tensor:
    """MPT's ALiBi slopes 2^(-bias_max * i / n) (n = heads rounded up to a power of two, odd ones first)."""
    n = 2 ** math.ceil(math.log2(heads))
    slopes = torch.tensor([2.0 ** -(i * bias_max / n) for i in range(1, n + 1)], dtype=torch.float32, device="cpu")
    if n != heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:heads]
    return slopes


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps, bias=False)


class Attention(nn.Module):
    def __init__(self, c: MptConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.Wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=False)  # rows: [q; k; v]
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.scale = c.softmax_scale or self.head_dim ** -0.5
        self.clip = c.clip_qkv

    def forward(self, x, kv, plan, slopes):
        b, n, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip:
            qkv = qkv.clamp(-self.clip, self.clip)
        q, k, v = (t.view(b, n, self.heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        o = cached_attention(kv, plan, q, k, v, scale=self.scale, alibi_slopes=slopes)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, c: MptConfig):
        super().__init__()
        self.up_proj = nn.Linear(c.hidden_size, c.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, c: MptConfig):
        super().__init__()
        self.norm_1 = layer_norm(c.hidden_size, c.layer_norm_epsilon)
        self.attn = Attention(c)
        self.norm_2 = layer_norm(c.hidden_size, c.layer_norm_epsilon)
        self.ffn = MLP(c)

    def forward(self, x, kv, plan, slopes):
        x = x + self.attn(self.norm_1(x), kv, plan, slopes)
        return x + self.ffn(self.norm_2(x))


class Backbone(nn.Module):
    def __init__(self, c: MptConfig):
        super().__init__()
        self.wte = embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm_f = layer_norm(c.hidden_size, c.layer_norm_epsilon)


@register("mpt", family="mpt", needs="config.json + safetensors; MPT-7B/30B and variants with ALiBi")
class MptForCausalLM(CausalLM):
    config_class = MptConfig
    embedding_module = "transformer.wte"
    tied = True  # MPT always ties

    def __init__(self, config: MptConfig):
        super().__init__()
        self.config = config
        self.transformer = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads, config.alibi_bias_max),
                             persistent=False)

    def layer_specs(self) -> list[LayerSpec]:
        c = self.config
        return [LayerSpec(c.num_attention_heads, c.head_dim) for _ in range(c.num_hidden_layers)]

    def forward_layers(self, input_ids, kv_layers, plans, rows=None):
        x = self.transformer.wte(input_ids)
        for layer, kv, plan in zip(self.transformer.blocks, kv_layers, plans):
            x = layer(x, kv, plan, self.alibi_slopes)
        x = x if rows is None else x[:, rows]
        return self.lm_head(self.transformer.norm_f(x))
