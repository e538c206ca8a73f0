"""sinkstream.gguf reads every supported architecture from a GGUF in llama.cpp's layout, natively.

Each case builds a tiny random model with transformers and writes it the way llama.cpp's converter does:
tensor names from gguf's own TensorNameMap, the converter's reorderings (Llama q/k rows, Falcon and
GPT-NeoX fused qkv, Gemma norms + 1), its metadata keys, RoPE scaling as the tensors it writes, matrices
F16 and vectors F32. Then `open_gguf` must give a config our family builds, the HF state dict's tensors
under its names, and logits equal to transformers' -- with transformers building no model and
de-quantizing nothing; and quantized tensors. test_gguf_files.py has the tokenizer folder, damaged files
and the real models.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from transformers import (AutoModelForCausalLM, FalconConfig,  # noqa: E402
                          Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, MptConfig, Phi3Config,
                          Qwen2Config, Qwen3Config)
from transformers.utils import logging as hf_logging  # noqa: E402

from sinkstream.gguf import open_gguf  # noqa: E402
from sinkstream.loading import build_model  # noqa: E402
from sinkstream.models import model_class  # noqa: E402
from sinkstream.quant import QuantWeight  # noqa: E402

hf_logging.set_verbosity_error()
V = 64
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
USER_CACHE = os.environ.get("SINKSTREAM_CACHE")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_weights_outside(monkeypatch):
    """Inside this, transformers may build no model and neither it nor gguf may de-quantize a tensor."""
    def refuse(*args, **kwargs):
        raise AssertionError("transformers or gguf built a model or de-quantized a tensor")
    import transformers.integrations.gguf.dequant as hf_dequant
    for owner, name in ((transformers.PreTrainedModel, "__init__"), (AutoModelForCausalLM, "from_pretrained"),
                        (hf_dequant, "dequantize"), (gguf, "dequantize"), (gguf.quants, "dequantize")):
        monkeypatch.setattr(owner, name, refuse)


# --- writing a GGUF as llama.cpp's converter does -------------------------------------------------------

def tiny_hf(config):
    """A random transformers model whose weights are exact in float16 (the GGUFs store matrices as F16)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p).mul_(0.15).half().float())
    return hf


def add_tokenizer(w: gguf.GGUFWriter, template: str | None = None) -> None:
    """A small sentencepiece-style vocabulary (``tokenizer.ggml.model = llama``)."""
    special = ["<unk>", "<s>", "</s>"]
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("a") + V - len(special) - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_token_list(special + pieces)
    w.add_token_scores([0.0] * len(special) + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [1] * len(pieces))  # unknown, control, control, normal
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if template:
        w.add_chat_template(template)


def write_gguf(path, arch: str, meta: dict, tensors: dict, *, quant: dict | None = None,
               template: str | None = None) -> None:
    """`meta`: GGUFWriter.add_<key> -> value; matrices F16 unless `quant` names a type; vectors F32."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    add_tokenizer(w, template)
    for name, t in tensors.items():
        t = np.ascontiguousarray(np.asarray(t, dtype=np.float32))
        qtype = (quant or {}).get(name)
        if qtype is not None:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t.astype(np.float16) if t.ndim == 2 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's q/k permutation: rows (i, i + d/2) of each head side by side."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(p: dict, dim: int) -> torch.Tensor:
    """``rope_freqs.weight`` as the converter computes it from the HF llama3 parameters."""
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                              p["factor"])
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        smooth = (old / wl - low) / (high - low)
        out.append(1 if wl < old / high else factor if wl > old / low else 1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(hf, arch: str, transform=lambda name, t: t) -> dict[str, torch.Tensor]:
    """The HF state dict under llama.cpp's names (gguf's TensorNameMap, as the converter maps them); a tied
    head is left out, as it is absent from the checkpoint the converter reads."""
    names = gguf.get_tensor_name_map(ARCH[arch], hf.config.num_hidden_layers)
    out = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        stem, suffix = name.rsplit(".", 1)
        out[f"{names.get_name(stem)}.{suffix}"] = transform(name, t.detach().clone())
    return out


def base_meta(c, *, ff=None, ctx=None) -> dict:
    heads = c.num_attention_heads
    return dict(block_count=c.num_hidden_layers, context_length=ctx or c.max_position_embeddings,
                embedding_length=c.hidden_size, feed_forward_length=ff or c.intermediate_size, head_count=heads,
                head_count_kv=getattr(c, "num_key_value_heads", None) or heads)


def llama_case(c, arch="llama"):
    hf = tiny_hf(c)
    H, KV = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // H

    def permute(name, t):
        if arch == "llama" and name.endswith("q_proj.weight"):
            return llama_permute(t, H)
        if arch == "llama" and name.endswith("k_proj.weight"):
            return llama_permute(t, KV)
        return t
    tensors = gguf_tensors(hf, arch, permute)
    p = c.rope_parameters
    meta = {**base_meta(c), "rope_freq_base": p["rope_theta"], "layer_norm_rms_eps": c.rms_norm_eps,
            "key_length": head_dim, "value_length": head_dim}
    if arch == "llama":
        meta.update(vocab_size=V, rope_dimension_count=head_dim)
    if p.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_freqs(p, head_dim)
    if getattr(c, "sliding_window", None):
        meta["sliding_window"] = c.sliding_window
    return hf, arch, meta, tensors


def gemma3_case():
    c = Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                         query_pre_attn_scalar=16, max_position_embeddings=128, final_logit_softcapping=30.0,
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                          "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                             "rope_theta": 1e6}}, **SPECIAL)
    hf = tiny_hf(c)
    tensors = gguf_tensors(hf, "gemma3", lambda n, t: t + 1 if n.endswith("norm.weight") else t)
    meta = {**base_meta(c), "layer_norm_rms_eps": c.rms_norm_eps, "key_length": 16, "value_length": 16,
            "rope_freq_base": 1e6, "rope_freq_base_swa": 20000.0, "rope_scaling_type": gguf.RopeScalingType.LINEAR,
            "rope_scaling_factor": 4.0, "final_logit_softcapping": 30.0, "sliding_window": 8}
    return hf, "gemma3", meta, tensors


def phi3_case():
    c = Phi3Config(vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                   intermediate_size=96, partial_rotary_factor=0.5, max_position_embeddings=256,
                   original_max_position_embeddings=64, **SPECIAL,
                   rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [2.0] * 4})
    hf = tiny_hf(c)
    tensors = gguf_tensors(hf, "phi3")
    tensors["rope_factors_long.weight"] = torch.tensor([2.0] * 4)
    tensors["rope_factors_short.weight"] = torch.tensor([1.0, 1.3, 1.7, 2.2])
    meta = {**base_meta(c), "rope_scaling_orig_ctx_len": 64, "layer_norm_rms_eps": c.rms_norm_eps,
            "rope_dimension_count": 8, "rope_freq_base": 10000.0, "sliding_window": 0,
            "rope_scaling_attn_factors": math.sqrt(1 + math.log(4) / math.log(64))}
    return hf, "phi3", meta, tensors


def falcon_case(new_arch: bool):
    kw = dict(new_decoder_architecture=True, num_kv_heads=2) if new_arch else dict(multi_query=True)
    c = FalconConfig(vocab_size=V, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, **kw, **SPECIAL)
    hf = tiny_hf(c)
    H, G, d = 4, (2 if new_arch else 1), 16

    def regroup(name, t):  # the converter: per kv group [queries, key, value] -> [all q; all k; all v]
        if "query_key_value" not in name:
            return t
        qkv = t.view(G, H // G + 2, d, 64)
        return torch.cat([qkv[:, :-2].reshape(H * d, 64), qkv[:, [-2]].reshape(G * d, 64),
                          qkv[:, [-1]].reshape(G * d, 64)])
    meta = {**base_meta(c, ff=4 * 64, ctx=2048), "head_count_kv": G, "layer_norm_eps": c.layer_norm_epsilon,
            "tensor_data_layout": "jploski"}
    return hf, "falcon", meta, gguf_tensors(hf, "falcon", regroup)


def neox_case(parallel: bool):
    c = GPTNeoXConfig(vocab_size=V, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
                      rotary_pct=0.25, use_parallel_residual=parallel, max_position_embeddings=128)
    hf = tiny_hf(c)

    def regroup(name, t):  # the converter: per head [q, k, v] -> [all q; all k; all v]
        if "query_key_value" not in name:
            return t
        return t.reshape(4, 3, 16, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    meta = {**base_meta(c), "rope_dimension_count": 4, "parallel_residual": parallel,
            "layer_norm_eps": c.layer_norm_eps}
    return hf, "gptneox", meta, gguf_tensors(hf, "gptneox", regroup)


def mpt_case():
    c = MptConfig(vocab_size=V, d_model=64, n_heads=4, n_layers=2, max_seq_len=128, **SPECIAL)
    hf = tiny_hf(c)
    meta = dict(context_length=128, embedding_length=64, block_count=2, feed_forward_length=256, head_count=4,
                layer_norm_eps=1e-5, max_alibi_bias=8.0)
    return hf, "mpt", meta, gguf_tensors(hf, "mpt")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0,
          "original_max_position_embeddings": 512}
CASES = {
    "llama-llama3-rope": lambda: llama_case(LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rope_scaling=dict(LLAMA3),
        tie_word_embeddings=False, **SPECIAL)),
    "mistral-sliding": lambda: llama_case(MistralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, **SPECIAL)),
    "qwen2-tied": lambda: llama_case(Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **SPECIAL), "qwen2"),
    "qwen3": lambda: llama_case(Qwen3Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, tie_word_embeddings=False, **SPECIAL),
        "qwen3"),
    "gemma3": gemma3_case,
    "phi3-longrope": phi3_case,
    "falcon-7b-style": lambda: falcon_case(False),
    "falcon-40b-style": lambda: falcon_case(True),
    "gptneox-parallel": lambda: neox_case(True),
    "gptneox-sequential": lambda: neox_case(False),
    "mpt": mpt_case,
}


def prepared(config: dict, sd: dict) -> dict:
    with torch.device("meta"):
        model = model_class(config["model_type"]).from_hf_config(config)
    return model.prepare_state_dict(dict(sd))


def ids_for(n: int) -> torch.Tensor:
    return torch.randint(3, V, (1, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_architecture_matches_transformers(case, tmp_path, request):
    hf, arch, meta, tensors = CASES[case]()
    path = tmp_path / f"{case}.gguf"
    write_gguf(path, arch, meta, tensors)
    request.getfixturevalue("no_weights_outside")
    gm = open_gguf(path)
    weights = {n: gm.load(n, native=False) for n in gm.names()}
    assert all(w.dtype == torch.float32 for w in weights.values())
    ours, ref = prepared(gm.config, weights), prepared(gm.config, hf.state_dict())
    assert sorted(ours) == sorted(ref)
    for name in ours:
        assert torch.allclose(ours[name], ref[name].float(), atol=1e-6), name
    native = {n: gm.load(n) for n in gm.names()}
    assert {n for n, w in native.items() if w.dtype == torch.float16} == {n for n in native if native[n].dim() == 2}
    model = build_model(gm.config, weights)
    ids = ids_for(20)  # longer than the sliding windows above
    with torch.no_grad():
        want = hf(ids).logits[0]
    assert want.abs().max() > 0.3  # not two near-zero tensors
    assert (model(ids)[0] - want).abs().max().item() <= 1e-4


def test_configs_carry_what_the_families_need(tmp_path):
    """The metadata the logits test relies on indirectly, checked directly."""
    hf, arch, meta, tensors = CASES["llama-llama3-rope"]()
    write_gguf(tmp_path / "l.gguf", arch, meta, tensors)
    cfg = open_gguf(tmp_path / "l.gguf").config
    assert cfg["rope_scaling"] == LLAMA3 and not cfg["tie_word_embeddings"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    hf, arch, meta, tensors = gemma3_case()
    write_gguf(tmp_path / "g.gguf", arch, meta, tensors)
    ours = model_class("gemma3_text").from_hf_config(open_gguf(tmp_path / "g.gguf").config)
    assert [s.sliding_window for s in ours.layer_specs()] == [8] * 5 + [None]
    assert ours.config.local_rope.base == 20000.0 and ours.config.global_rope.scaling["factor"] == 4.0
    assert ours.config.query_pre_attn_scalar == 16 and ours.config.final_logit_softcapping == 30.0


def test_quantized_tensors(tmp_path, request):
    """Q4_0 matrices load as exact int4 (permuted q/k rows included), a Q8_0 embedding as int8, and the model
    built from their values matches transformers given the same values."""
    hf, arch, meta, tensors = CASES["llama-llama3-rope"]()
    ref = AutoModelForCausalLM.from_config(hf.config).eval()  # takes the GGUF's values below
    quant = {n: Q.Q4_0 for n, t in tensors.items() if t.dim() == 2 and n != "token_embd.weight"}
    quant["token_embd.weight"] = Q.Q8_0
    write_gguf(tmp_path / "q.gguf", arch, meta, tensors, quant=quant)
    # quantization works on rows, so it commutes with llama.cpp's row permutation: HF order, then rounded
    checked = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
               "model.layers.0.mlp.down_proj.weight")
    rounded = {n: gguf.quants.dequantize(gguf.quants.quantize(hf.state_dict()[n].numpy(), Q.Q4_0), Q.Q4_0)
               for n in checked}
    request.getfixturevalue("no_weights_outside")
    gm = open_gguf(tmp_path / "q.gguf")
    for name in checked:
        w = gm.load(name)
        assert isinstance(w, QuantWeight) and w.kind == "int4"
        values = gm.load(name, native=False)
        assert torch.equal(w.dequantize(), values)
        assert np.allclose(values.numpy(), rounded[name], atol=1e-6)
    emb = gm.load("model.embed_tokens.weight")
    assert isinstance(emb, QuantWeight) and emb.kind == "int8" and emb.shape == (V, 64)
    weights = {n: gm.load(n, native=False) for n in gm.names()}
    ref.load_state_dict({**hf.state_dict(), **{k: v for k, v in weights.items() if k in hf.state_dict()}})
    ids = ids_for(20)
    with torch.no_grad():
        want = ref(ids).logits[0]
    assert (build_model(gm.config, weights)(ids)[0] - want).abs().max().item() <= 1e-4
