"""GPT-NeoX / Pythia: LayerNorm, fused per-head qkv, partial rotary (`rotary_pct`), parallel residual flag."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..attention import cached_attention
from ..cache import LayerSpec
from ..rope import RopeConfig, Rotary
from . import register
from .base import CausalLM, embedding

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_fast": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


@dataclass
class GPTNeoXConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rope: RopeConfig
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    use_parallel_residual: bool = True
    attention_bias: bool = True
    hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "GPTNeoXConfig":
        head_dim = d["hidden_size"] // d["num_attention_heads"]
        params = d.get("rope_parameters") or {}
        pct = params.get("partial_rotary_factor", d.get("rotary_pct", 0.25))  # new name, then the Hub's
        rope = RopeConfig.from_hf(d, head_dim, int(head_dim * pct), base_key="rotary_emb_base")
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d.get("intermediate_size") or 4 * d["hidden_size"],
                   num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
                   rope=rope, layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   use_parallel_residual=bool(d.get("use_parallel_residual", True)),
                   attention_bias=bool(d.get("attention_bias", True)), hidden_act=d.get("hidden_act", "gelu"),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))


class Attention(nn.Module):
    def __init__(self, c: GPTNeoXConfig, rotary: Rotary):
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        # output rows are per head: [q_h, k_h, v_h] for h = 0..heads-1
        self.query_key_value = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.attention_bias)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)
        self._rotary = [rotary]

    def forward(self, x, kv, plan):
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # each [batch, heads, n, head_dim]
        o = cached_attention(kv, plan, q, k, v, scale=self.head_dim ** -0.5, rotary=self._rotary[0])
        return self.dense(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, c: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, c.intermediate_size)
        self.dense_4h_to_h = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, c: GPTNeoXConfig, rotary: Rotary):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = Attention(c, rotary)
        self.mlp = MLP(c)
        self.parallel = c.use_parallel_residual

    def forward(self, x, kv, plan):
        a = self.attention(self.input_layernorm(x), kv, plan)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.post_attention_layernorm(x))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: GPTNeoXConfig, rotary: Rotary):
        super().__init__()
        self.embed_in = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, rotary) for _ in range(c.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


@register("gpt_neox", family="gpt_neox",
          needs="config.json + safetensors; Pythia, GPT-NeoX-20B, RedPajama-INCITE, StableLM-alpha")
class GPTNeoXForCausalLM(CausalLM):
    config_class = GPTNeoXConfig
    embedding_module, head_module = "gpt_neox.embed_in", "embed_out"

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.rotary = Rotary(config.rope, device="cpu")
        self.gpt_neox = Backbone(config, self.rotary)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def prepare_state_dict(self, sd):
        if "lm_head.weight" in sd:  # transformers 5 renames embed_out -> lm_head
            sd["embed_out.weight"] = sd.pop("lm_head.weight")
        return super().prepare_state_dict(sd)

    def layer_specs(self) -> list[LayerSpec]:
        c = self.config
        return [LayerSpec(c.num_attention_heads, c.head_dim, rotary=self.rotary) for _ in range(c.num_hidden_layers)]

    def forward_layers(self, input_ids, kv_layers, plans, rows=None):
        x = self.gpt_neox.embed_in(input_ids)
        for layer, kv, plan in zip(self.gpt_neox.layers, kv_layers, plans):
            x = layer(x, kv, plan)
        x = x if rows is None else x[:, rows]
        return self.embed_out(self.gpt_neox.final_layer_norm(x))
