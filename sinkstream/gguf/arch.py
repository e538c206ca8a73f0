"""Each GGUF architecture in our terms: the HF-style config its metadata describes, and for each of our
state-dict names, which of the file's tensors it is made of and how to undo what llama.cpp's converter did.

What the converter changes, per architecture (convert_hf_to_gguf.py):

* llama: q/k rows interleaved per head for llama.cpp's pairwise RoPE; Llama 3.1+ RoPE scaling written as
  a ``rope_freqs.weight`` tensor of per-frequency divisors instead of metadata (see `ropefreqs`).
* gemma3: every norm weight stored as 1 + w; query scale and local RoPE base not recorded (llama.cpp's
  rules apply: head_dim ** -0.5 except 27B's hidden / heads, local base 10000, five local layers in six).
* phi3: longrope factors written as ``rope_factors_long/short.weight`` tensors.
* falcon: fused qkv regrouped from per-kv-group [queries, key, value] to [all q; all k; all v].
* gptneox: fused qkv regrouped from per-head [q, k, v] to [all q; all k; all v].
* qwen2, qwen3, mpt: names only.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ModelLoadError
from .layout import Layout, Metadata, common_config, fraction, map_names, rope_scaling
from .ropefreqs import llama3_scaling

SLIDING, FULL = "sliding_attention", "full_attention"


# Row orders that undo llama.cpp's reorderings. Each returns, for every row of ours, the file's row.

def llama_qk_rows(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp stores each head's rows as pairs (i, i + d/2) side by side: file row h*d + 2i + t holds
    our row h*d + t*d/2 + i."""
    d = rows // heads
    h, t, i = torch.meshgrid(torch.arange(heads), torch.arange(2), torch.arange(d // 2), indexing="ij")
    return (h * d + 2 * i + t).reshape(-1)


def falcon_qkv_rows(heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """File: [all q; all k; all v]; ours (HF Falcon): per kv group, its heads/kv_heads queries, key, value."""
    per, d = heads // kv_heads, torch.arange(head_dim)
    order = []
    for g in range(kv_heads):
        order += [(g * per + j) * head_dim + d for j in range(per)]
        order += [(heads + g) * head_dim + d, (heads + kv_heads + g) * head_dim + d]
    return torch.cat(order)


def neox_qkv_rows(heads: int, head_dim: int) -> torch.Tensor:
    """File: [all q; all k; all v]; ours (HF GPT-NeoX): per head, its q, k and v rows."""
    which = torch.arange(3).view(1, 3, 1) * heads * head_dim
    return (which + torch.arange(heads).view(-1, 1, 1) * head_dim + torch.arange(head_dim).view(1, 1, -1)).reshape(-1)


LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def llama(m: Metadata, model_type: str = "llama") -> Layout:
    """llama (also Mistral, SmolLM), qwen2, qwen3: one family; only llama's files have q/k permuted."""
    cfg = common_config(m, model_type)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = m.count("attention.key_length", cfg["hidden_size"] // heads)
    rope_dim = m.count("rope.dimension_count", head_dim)
    base = float(m.get("rope.freq_base", 10000.0))
    cfg.update(intermediate_size=m.count("feed_forward_length"), head_dim=head_dim, rope_theta=base,
               rms_norm_eps=float(m.get("attention.layer_norm_rms_epsilon", 1e-6)), hidden_act="silu",
               attention_bias=m.has("*.attn_q.bias") and model_type != "qwen2", mlp_bias=m.has("*.ffn_up.bias"))
    if rope_dim != head_dim:
        cfg["partial_rotary_factor"] = fraction(rope_dim, head_dim)
    scaling = rope_scaling(m)
    consumed: tuple[str, ...] = ()
    if "rope_freqs.weight" in m.shapes:  # Llama 3.1+: scaling as per-frequency divisors
        if scaling is not None:
            raise ModelLoadError("the GGUF has both rope_freqs.weight and RoPE scaling metadata")
        scaling = llama3_scaling(m.read("rope_freqs.weight"), base, rope_dim)
        consumed = ("rope_freqs.weight",)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    if model_type == "llama" and m.get("attention.sliding_window"):  # Mistral, when the file records it
        cfg["sliding_window"] = m.count("attention.sliding_window")
    rows = {}
    if model_type == "llama":
        rows = {"self_attn.q_proj": llama_qk_rows(heads * head_dim, heads),
                "self_attn.k_proj": llama_qk_rows(kv_heads * head_dim, kv_heads)}
    return Layout(cfg, map_names(m, LLAMA_TOP, LLAMA_BLOCK, "model.layers", rows=rows, consumed=consumed))


def gemma3(m: Metadata) -> Layout:
    cfg = common_config(m, "gemma3_text")
    n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    head_dim = m.count("attention.key_length", cfg["hidden_size"] // heads)
    window = m.get("attention.sliding_window")
    pattern = m.get("attention.sliding_window_pattern", 6)
    if not window:
        types = [FULL] * n
    elif isinstance(pattern, (list, tuple)):  # per layer: true = sliding window
        if len(pattern) != n:
            raise ModelLoadError(f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries for {n} layers")
        types = [SLIDING if p else FULL for p in pattern]
    else:
        types = [SLIDING if (i + 1) % int(pattern) else FULL for i in range(n)]
    scale = m.get("attention.scale")
    if scale:  # score scale = query_pre_attn_scalar ** -0.5
        qpas = float(scale) ** -2
    else:  # llama.cpp's rule; it agrees with every released Gemma 3 config
        qpas = cfg["hidden_size"] // heads if n == 62 else head_dim
    cfg.update(intermediate_size=m.count("feed_forward_length"), head_dim=head_dim, layer_types=types,
               rms_norm_eps=float(m.get("attention.layer_norm_rms_epsilon", 1e-6)), query_pre_attn_scalar=qpas,
               rope_theta=float(m.get("rope.freq_base", 1000000.0)),
               rope_local_base_freq=float(m.get("rope.freq_base_swa", 10000.0)), rope_scaling=rope_scaling(m),
               final_logit_softcapping=m.get("final_logit_softcapping"), hidden_activation="gelu_pytorch_tanh")
    if window:
        cfg["sliding_window"] = int(window)
    block = {**LLAMA_BLOCK, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"}
    minus_one = lambda key: -1.0 if key.endswith("norm") else 0.0  # stored as 1 + w; ours hold w
    return Layout(cfg, map_names(m, LLAMA_TOP, block, "model.layers", shift=minus_one))


def phi3(m: Metadata) -> Layout:
    cfg = common_config(m, "phi3")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rope_dim = m.count("rope.dimension_count", head_dim)
    window = m.get("attention.sliding_window")
    cfg.update(intermediate_size=m.count("feed_forward_length"), rope_theta=float(m.get("rope.freq_base", 10000.0)),
               rms_norm_eps=float(m.get("attention.layer_norm_rms_epsilon", 1e-5)), hidden_act="silu",
               partial_rotary_factor=fraction(rope_dim, head_dim), sliding_window=int(window) if window else None)
    consumed: tuple[str, ...] = ()
    if "rope_factors_long.weight" in m.shapes:
        consumed = ("rope_factors_long.weight", "rope_factors_short.weight")
        cfg["original_max_position_embeddings"] = m.count("rope.scaling.original_context_length")
        cfg["rope_scaling"] = {"rope_type": "longrope", "long_factor": m.read(consumed[0]).tolist(),
                               "short_factor": m.read(consumed[1]).tolist()}
    elif rope_scaling(m) is not None:
        cfg["rope_scaling"] = rope_scaling(m)
    block = {**LLAMA_BLOCK, "attn_qkv": "self_attn.qkv_proj", "attn_q": ("self_attn.qkv_proj", 0),
             "attn_k": ("self_attn.qkv_proj", 1), "attn_v": ("self_attn.qkv_proj", 2),
             "ffn_up": ("mlp.gate_up_proj", 1) if m.has("*.ffn_gate.weight") else "mlp.gate_up_proj",
             "ffn_gate": ("mlp.gate_up_proj", 0)}
    return Layout(cfg, map_names(m, LLAMA_TOP, block, "model.layers", consumed=consumed))


def falcon(m: Metadata) -> Layout:
    cfg = common_config(m, "falcon")
    heads, kv_heads = cfg["num_attention_heads"], m.count("attention.head_count_kv", 1)
    two_norms = m.has("*.attn_norm_2.weight")
    new_arch = two_norms or kv_heads > 1  # Falcon-7B: multi-query, one norm; 40B/180B: kv groups
    cfg.update(num_kv_heads=kv_heads, new_decoder_architecture=new_arch, multi_query=kv_heads == 1,
               num_ln_in_parallel_attn=2 if two_norms else 1, parallel_attn=True, alibi=False,
               bias=m.has("*.attn_qkv.bias"), ffn_hidden_size=m.rows("blk.0.ffn_up.weight"),
               layer_norm_epsilon=float(m.get("attention.layer_norm_epsilon", 1e-5)),
               rope_theta=float(m.get("rope.freq_base", 10000.0)))
    # with two norms, llama.cpp's attn_norm feeds the MLP and attn_norm_2 the attention
    block = {"attn_norm": "ln_mlp" if two_norms else "input_layernorm", "attn_norm_2": "ln_attn",
             "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
             "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
    top = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"}
    rows = {"self_attention.query_key_value": falcon_qkv_rows(heads, kv_heads, cfg["hidden_size"] // heads)}
    return Layout(cfg, map_names(m, top, block, "transformer.h", rows=rows))


def gptneox(m: Metadata) -> Layout:
    cfg = common_config(m, "gpt_neox")
    heads = cfg["num_attention_heads"]
    head_dim = cfg["hidden_size"] // heads
    cfg.update(intermediate_size=m.count("feed_forward_length"),
               rotary_pct=fraction(m.count("rope.dimension_count", head_dim), head_dim),
               rotary_emb_base=float(m.get("rope.freq_base", 10000.0)),
               layer_norm_eps=float(m.get("attention.layer_norm_epsilon", 1e-5)),
               use_parallel_residual=bool(m.get("use_parallel_residual", True)),
               attention_bias=m.has("*.attn_qkv.bias"), hidden_act="gelu")
    if rope_scaling(m) is not None:
        cfg["rope_scaling"] = rope_scaling(m)
    block = {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
             "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
             "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
    top = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm", "output": "embed_out"}
    rows = {"attention.query_key_value": neox_qkv_rows(heads, head_dim)}
    return Layout(cfg, map_names(m, top, block, "gpt_neox.layers", rows=rows))


def mpt(m: Metadata) -> Layout:
    cfg = common_config(m, "mpt")
    if cfg["num_key_value_heads"] != cfg["num_attention_heads"]:
        raise ModelLoadError("MPT with grouped key/value heads is not supported")
    if not cfg.pop("tie_word_embeddings"):
        raise ModelLoadError("MPT with a separate output matrix (output.weight) is not supported")
    hidden = cfg.pop("hidden_size")
    alibi_max = float(m.get("attention.max_alibi_bias", 0.0))
    clip = m.get("attention.clamp_kqv")
    cfg.update(d_model=hidden, n_layers=cfg.pop("num_hidden_layers"), n_heads=cfg.pop("num_attention_heads"),
               expansion_ratio=fraction(m.rows("blk.0.ffn_up.weight"), hidden),
               max_seq_len=cfg.pop("max_position_embeddings", 2048), no_bias=True,
               layer_norm_epsilon=float(m.get("attention.layer_norm_epsilon", 1e-5)),
               attn_config={"alibi": alibi_max > 0, "alibi_bias_max": alibi_max,
                            "clip_qkv": None if clip is None else float(clip)})
    cfg.pop("num_key_value_heads")
    block = {"attn_norm": "norm_1", "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj", "ffn_norm": "norm_2",
             "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}
    top = {"token_embd": "transformer.wte", "output_norm": "transformer.norm_f"}
    return Layout(cfg, map_names(m, top, block, "transformer.blocks"))


# GGUF general.architecture -> how to read it
ARCHITECTURES: dict[str, Callable[[Metadata], Layout]] = {
    "llama": llama,
    "qwen2": lambda m: llama(m, "qwen2"),
    "qwen3": lambda m: llama(m, "qwen3"),
    "gemma3": gemma3,
    "phi3": phi3,
    "falcon": falcon,
    "gptneox": gptneox,
    "mpt": mpt,
}


def describe(m: Metadata) -> Layout:
    """The layout of a file of a supported architecture (`ARCHITECTURES`)."""
    return ARCHITECTURES[m.arch](m)
