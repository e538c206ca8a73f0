"""Llama family: Llama 2/3.x, SmolLM/SmolLM2, Mistral (incl. sliding_window), Qwen2 (qkv bias), Qwen3 (q/k norm)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..attention import cached_attention
from ..cache import LayerSpec
from ..quant import projections
from ..rope import RopeConfig, Rotary
from . import register
from .base import CausalLM, RMSNorm, embedding

QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu}


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        mt = d.get("model_type", "llama")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        bias = bool(d.get("attention_bias", False))
        sliding = d.get("sliding_window")
        if mt in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            sliding = None
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.update(head_dim=head_dim, num_key_value_heads=d.get("num_key_value_heads") or heads,
                  rope=RopeConfig.from_hf(d, head_dim), qkv_bias=bias or mt == "qwen2",
                  o_bias=bias and mt != "qwen3", mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=mt == "qwen3",
                  sliding_window=sliding, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
        return cls(**kw)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, rotary: Rotary):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm = c.qk_norm
        self._rotary = [rotary]  # shared; a list so it is not registered once per layer

    def forward(self, x, kv, plan):
        b, n, _ = x.shape
        # q: [batch, heads, n, head_dim]; k, v: [batch, kv_heads, n, head_dim]
        q, k, v = projections(self, x, QKV)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        o = cached_attention(kv, plan, q, k, v, scale=self.head_dim ** -0.5, rotary=self._rotary[0])
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        gate, up = projections(self, x, GATE_UP)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    attention_class, mlp_class = Attention, MLP  # families with other projections swap these (Phi-3)

    def __init__(self, c: LlamaConfig, rotary: Rotary):
        super().__init__()
        self.self_attn = self.attention_class(c, rotary)
        self.mlp = self.mlp_class(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, kv, plan):
        x = x + self.self_attn(self.input_layernorm(x), kv, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    block_class = Block

    def __init__(self, c: LlamaConfig, rotary: Rotary):
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(self.block_class(c, rotary) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


@register("llama", "mistral", "qwen2", "qwen3", family="llama",
          needs="config.json + safetensors or GGUF; Llama 2/3.x, SmolLM/SmolLM2, Mistral, Qwen2, Qwen3")
class LlamaForCausalLM(CausalLM):
    """Also the base of families that differ only inside their blocks (Phi-3): set the two classes."""
    config_class = LlamaConfig
    backbone_class = Backbone

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.rotary = Rotary(config.rope, device="cpu")
        self.model = self.backbone_class(config, self.rotary)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def layer_specs(self) -> list[LayerSpec]:
        c = self.config
        return [LayerSpec(c.num_key_value_heads, c.head_dim, sliding_window=c.sliding_window, rotary=self.rotary)
                for _ in range(c.num_hidden_layers)]

    def forward_layers(self, input_ids, kv_layers, plans, rows=None):
        x = self.model.embed_tokens(input_ids)
        for layer, kv, plan in zip(self.model.layers, kv_layers, plans):
            x = layer(x, kv, plan)
        x = x if rows is None else x[:, rows]
        return self.lm_head(self.model.norm(x))
