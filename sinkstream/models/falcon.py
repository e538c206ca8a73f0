"""Falcon: fused qkv in three layouts (multi-head, multi-query, grouped "new decoder architecture"),
attention and MLP in parallel, RoPE or (Falcon-RW) ALiBi."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import cached_attention
from ..cache import LayerSpec
from ..rope import RopeConfig, Rotary
from . import register
from .base import CausalLM, embedding


@dataclass
class FalconConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    rope: RopeConfig | None  # None with ALiBi
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int = 2  # new architecture only: separate norms for attention and MLP
    bias: bool = False
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "FalconConfig":
        hidden = d.get("hidden_size") or d["n_embed"]
        heads = d.get("num_attention_heads") or d["n_head"]
        new_arch = bool(d.get("new_decoder_architecture", False))
        multi_query = bool(d.get("multi_query", True))
        if new_arch:
            kv_heads = d.get("num_kv_heads") or d.get("n_head_kv") or heads
        else:
            kv_heads = 1 if multi_query else heads
        alibi = bool(d.get("alibi", False))
        head_dim = hidden // heads
        return cls(vocab_size=d["vocab_size"], hidden_size=hidden,
                   num_hidden_layers=d.get("num_hidden_layers") or d["n_layer"], num_attention_heads=heads,
                   num_kv_heads=kv_heads, ffn_hidden_size=d.get("ffn_hidden_size") or 4 * hidden,
                   rope=None if alibi else RopeConfig.from_hf(d, head_dim),
                   new_decoder_architecture=new_arch, multi_query=multi_query,
                   parallel_attn=bool(d.get("parallel_attn", True)),
                   num_ln_in_parallel_attn=d.get("num_ln_in_parallel_attn") or 2, bias=bool(d.get("bias", False)),
                   layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", True)))


def alibi_slopes(heads: int) -> torch.Tensor:
    """Falcon/BLOOM ALiBi slopes, rounded to bfloat16 as the reference implementation does."""
    p2 = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-(2 ** -(math.log2(p2) - 3)) * i) for i in range(1, p2 + 1)]
    if p2 != heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * p2) - 3)))
        slopes += [extra ** i for i in range(1, 1 + 2 * min(p2, heads - p2), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu").bfloat16().float()  # not meta: a constant


class Attention(nn.Module):
    def __init__(self, c: FalconConfig, rotary: Rotary | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_kv_heads, c.head_dim
        self.new_arch = c.new_decoder_architecture
        self.query_key_value = nn.Linear(c.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim,
                                         bias=c.bias)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=c.bias)
        self._rotary = [rotary]
        if rotary is None:  # ALiBi: the bias is added to scores before the 1/sqrt(d) scaling
            self.register_buffer("alibi", alibi_slopes(self.heads) / math.sqrt(self.head_dim), persistent=False)
        else:
            self.alibi = None

    def split(self, qkv: torch.Tensor):
        """qkv [b, n, fused] -> q [b, heads, n, d], k and v [b, kv_heads, n, d], from the checkpoint's layout."""
        b, n, _ = qkv.shape
        H, G, d = self.heads, self.kv_heads, self.head_dim
        if self.new_arch:  # per kv group: its H/G queries, then its key, then its value
            x = qkv.view(b, n, G, H // G + 2, d)
            q, k, v = x[:, :, :, :-2].reshape(b, n, H, d), x[:, :, :, -2], x[:, :, :, -1]
        elif G == 1:  # multi-query: all queries, one key, one value
            x = qkv.view(b, n, H + 2, d)
            q, k, v = x[:, :, :H], x[:, :, H:H + 1], x[:, :, H + 1:]
        else:  # multi-head: per head q, k, v
            x = qkv.view(b, n, H, 3, d)
            q, k, v = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, kv, plan):
        b, n, _ = x.shape
        q, k, v = self.split(self.query_key_value(x))
        o = cached_attention(kv, plan, q, k, v, scale=self.head_dim ** -0.5, rotary=self._rotary[0], alibi_slopes=self.alibi)
        return self.dense(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, c: FalconConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, c.ffn_hidden_size, bias=c.bias)
        self.dense_4h_to_h = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=c.bias)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, c: FalconConfig, rotary: Rotary | None):
        super().__init__()
        self.self_attention = Attention(c, rotary)
        self.mlp = MLP(c)
        ln = lambda: nn.LayerNorm(c.hidden_size, eps=c.layer_norm_epsilon)
        # new architecture with two norms: ln_attn/ln_mlp; otherwise input_layernorm (+ post_attention_layernorm
        # when attention and MLP run one after the other)
        self.two_norms = c.new_decoder_architecture and c.num_ln_in_parallel_attn == 2
        self.parallel = c.new_decoder_architecture or c.parallel_attn
        if self.two_norms:
            self.ln_attn, self.ln_mlp = ln(), ln()
        else:
            self.input_layernorm = ln()
            if not self.parallel:
                self.post_attention_layernorm = ln()

    def forward(self, x, kv, plan):
        if self.two_norms:
            h_attn, h_mlp = self.ln_attn(x), self.ln_mlp(x)
        else:
            h_attn = h_mlp = self.input_layernorm(x)
        a = self.self_attention(h_attn, kv, plan)
        if self.parallel:
            return x + a + self.mlp(h_mlp)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: FalconConfig, rotary: Rotary | None):
        super().__init__()
        self.word_embeddings = embedding(c.vocab_size, c.hidden_size)
        self.h = nn.ModuleList(Block(c, rotary) for _ in range(c.num_hidden_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_epsilon)


@register("falcon", family="falcon",
          needs="config.json + safetensors or GGUF; Falcon 7B/40B/180B (RoPE), Falcon-RW (ALiBi)")
class FalconForCausalLM(CausalLM):
    config_class = FalconConfig
    embedding_module = "transformer.word_embeddings"

    def __init__(self, config: FalconConfig):
        super().__init__()
        self.config = config
        self.rotary = None if config.rope is None else Rotary(config.rope, device="cpu")
        self.transformer = Backbone(config, self.rotary)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def layer_specs(self) -> list[LayerSpec]:
        c = self.config
        return [LayerSpec(c.num_kv_heads, c.head_dim, rotary=self.rotary) for _ in range(c.num_hidden_layers)]

    def forward_layers(self, input_ids, kv_layers, plans, rows=None):
        x = self.transformer.word_embeddings(input_ids)
        for layer, kv, plan in zip(self.transformer.h, kv_layers, plans):
            x = layer(x, kv, plan)
        x = x if rows is None else x[:, rows]
        return self.lm_head(self.transformer.ln_f(x))
