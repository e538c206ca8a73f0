"""Gemma 3 (text): local sliding-window layers interleaved with global layers, each kind with its own RoPE.

Local layers never look further back than `sliding_window` tokens, so the cache gives them a plain ring of
that window (`LayerSpec.sliding_window`); global layers take the user's policy (sinks + window). Other
Gemma details: q/k RMSNorm, embeddings scaled by sqrt(hidden), GeGLU MLP, norms stored as weight - 1,
a norm after attention and after the MLP, and scores scaled by `query_pre_attn_scalar` ** -0.5.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import cached_attention
from ..cache import LayerSpec
from ..errors import UnsupportedModelError
from ..quant import projections
from ..rope import RopeConfig, Rotary
from . import register
from .base import CausalLM, RMSNorm, embedding
from .llama import ACTIVATIONS, GATE_UP, QKV

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' Gemma3TextConfig defaults, for the sparse text_config of multimodal checkpoints
TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                     sliding_window=4096, rms_norm_eps=1e-6, max_position_embeddings=131072)


@dataclass
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    local_rope: RopeConfig
    global_rope: RopeConfig
    sliding_window: int = 4096
    query_pre_attn_scalar: float = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "Gemma3Config":
        if d.get("model_type") == "gemma3" and "text_config" in d:  # the multimodal wrapper: its text half,
            # which Hub configs spell sparsely (only what differs from the defaults)
            d = {**TEXT_DEFAULTS, **d["text_config"], "tie_word_embeddings": d.get("tie_word_embeddings", True)}
        if d.get("attn_logit_softcapping") is not None:
            raise UnsupportedModelError("Gemma 3 with attn_logit_softcapping is not supported (SDPA cannot cap scores)")
        if d.get("use_bidirectional_attention"):
            raise UnsupportedModelError("bidirectional Gemma 3 (an embedding model) is not a causal LM")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        n = d["num_hidden_layers"]
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        layer_types = d.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        local, glob = _rope_dicts(d)
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        kw.update(head_dim=head_dim, num_key_value_heads=d.get("num_key_value_heads") or heads,
                  layer_types=list(layer_types), local_rope=RopeConfig.from_hf(local, head_dim),
                  global_rope=RopeConfig.from_hf(glob, head_dim),
                  hidden_activation=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
                  final_logit_softcapping=d.get("final_logit_softcapping"))
        return cls(**kw)


def _rope_dicts(d: dict) -> tuple[dict, dict]:
    """Config dicts `RopeConfig.from_hf` reads, for local and global layers, from either config style.

    transformers 5 writes `rope_parameters` keyed by layer type; older configs have `rope_theta` (global),
    `rope_local_base_freq` (local) and a `rope_scaling` that applies to global layers only.
    """
    mpe = {"max_position_embeddings": d.get("max_position_embeddings")}
    params = d.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:
        return ({**mpe, "rope_parameters": params.get(SLIDING) or {"rope_theta": 10000.0}},
                {**mpe, "rope_parameters": params.get(FULL) or {"rope_theta": 1000000.0}})
    local = {**mpe, "rope_theta": d.get("rope_local_base_freq", 10000.0)}
    glob = {**mpe, "rope_theta": d.get("rope_theta", 1000000.0), "rope_scaling": d.get("rope_scaling")}
    return local, glob


class Attention(nn.Module):
    def __init__(self, c: Gemma3Config, rotary: Rotary):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, offset=1.0)
        self.scale = float(c.query_pre_attn_scalar) ** -0.5
        self._rotary = [rotary]  # local or global, shared; a list so it is not registered per layer

    def forward(self, x, kv, plan):
        b, n, _ = x.shape
        # q: [batch, heads, n, head_dim]; k, v: [batch, kv_heads, n, head_dim]
        q, k, v = projections(self, x, QKV)
        q = self.q_norm(q.view(b, n, self.heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2))
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        o = cached_attention(kv, plan, q, k, v, scale=self.scale, rotary=self._rotary[0])
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, c: Gemma3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ACTIVATIONS[c.hidden_activation]

    def forward(self, x):
        gate, up = projections(self, x, GATE_UP)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, c: Gemma3Config, rotary: Rotary):
        super().__init__()
        self.self_attn = Attention(c, rotary)
        self.mlp = MLP(c)
        norm = lambda: RMSNorm(c.hidden_size, c.rms_norm_eps, offset=1.0)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x, kv, plan):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), kv, plan))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Backbone(nn.Module):
    def __init__(self, c: Gemma3Config, rotaries: dict[str, Rotary]):
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, rotaries[t]) for t in c.layer_types)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, offset=1.0)


@register("gemma3_text", "gemma3", family="gemma3",
          needs="config.json + safetensors or GGUF (short name gemma3-270m); text layers of Gemma 3")
class Gemma3ForCausalLM(CausalLM):
    config_class = Gemma3Config

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.rotary_local = Rotary(config.local_rope, device="cpu")
        self.rotary_global = Rotary(config.global_rope, device="cpu")
        self.model = Backbone(config, {SLIDING: self.rotary_local, FULL: self.rotary_global})
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def prepare_state_dict(self, sd):
        # The multimodal checkpoint nests the text model: model.language_model.* (or language_model.model.*).
        renamed = {}
        for k, v in sd.items():
            for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                             ("language_model.lm_head.", "lm_head.")):
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            renamed[k] = v
        return super().prepare_state_dict(renamed)

    def layer_specs(self) -> list[LayerSpec]:
        c = self.config
        return [LayerSpec(c.num_key_value_heads, c.head_dim, sliding_window=c.sliding_window if t == SLIDING else None,
                          rotary=self.rotary_local if t == SLIDING else self.rotary_global)
                for t in c.layer_types]

    def forward_layers(self, input_ids, kv_layers, plans, rows=None):
        x = self.model.embed_tokens(input_ids)
        # sqrt(hidden), rounded to the weights' dtype as the reference implementation does
        x = x * float(torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype))
        for layer, kv, plan in zip(self.model.layers, kv_layers, plans):
            x = layer(x, kv, plan)
        x = x if rows is None else x[:, rows]
        logits = self.lm_head(self.model.norm(x))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
