"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama-shaped, with fused qkv and gate/up projections, partial rotary where
configured, longrope ("su") scaling and an optional model-wide sliding window."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..attention import cached_attention
from ..rope import RopeConfig, Rotary
from . import register
from . import llama
from .llama import ACTIVATIONS, LlamaForCausalLM


@dataclass
class Phi3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, d: dict) -> "Phi3Config":
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        kw.update(head_dim=head_dim, num_key_value_heads=d.get("num_key_value_heads") or heads,
                  rope=RopeConfig.from_hf(d, head_dim), sliding_window=d.get("sliding_window"),
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
        return cls(**kw)


class Attention(nn.Module):
    def __init__(self, c: Phi3Config, rotary: Rotary):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        # rows: all query heads, then all key heads, then all value heads
        self.qkv_proj = nn.Linear(c.hidden_size, (self.heads + 2 * self.kv_heads) * c.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * c.head_dim, c.hidden_size, bias=False)
        self._rotary = [rotary]

    def forward(self, x, kv, plan):
        b, n, _ = x.shape
        qkv = self.qkv_proj(x).view(b, n, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        o = cached_attention(kv, plan, q, k, v, scale=self.head_dim ** -0.5, rotary=self._rotary[0])
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, c: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)  # [gate; up]
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Block(llama.Block):
    attention_class, mlp_class = Attention, MLP


class Backbone(llama.Backbone):
    block_class = Block


@register("phi3", family="phi3",
          needs="config.json + safetensors or GGUF; Phi-3/3.5 mini and medium, Phi-4-mini (longrope, partial RoPE)")
class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama's model class around Phi-3's blocks (fused projections, partial RoPE, longrope)."""
    config_class = Phi3Config
    backbone_class = Backbone
