"""GGUF files in llama.cpp's layout load to the same weights as the safetensors they were converted from.

Each test builds a tiny random model with transformers, writes it twice -- as a Hugging Face folder and as a
GGUF the way llama.cpp's converter does (its tensor names, q/k rows permuted for Llama, Gemma norms stored
as weight + 1) -- then loads the GGUF through `sinkstream.load(path)` and compares with the folder.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import sinkstream  # noqa: E402
from sinkstream.loading import build_model  # noqa: E402
from test_gguf_arch import add_tokenizer  # noqa: E402  (the same small vocabulary, V tokens)

hf_logging.set_verbosity_error()
V = 64


def tiny_hf(config, folder):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15)
    hf.save_pretrained(folder)
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return build_model(json.loads((folder / "config.json").read_text()), sd), hf.state_dict()


def llama_cpp_permute(w: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows as interleaved pairs: within each head, row order (0, d/2, 1, d/2+1, ...)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).numpy()


def write_gguf(path, arch: str, meta: dict, tensors: dict[str, np.ndarray]) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    add_tokenizer(w)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def compare(ours_gguf, ours_st) -> None:
    a, b = ours_gguf.state_dict(), ours_st.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    ids = torch.randint(3, V, (1, 20), generator=torch.Generator().manual_seed(0))
    assert (ours_gguf(ids) - ours_st(ids)).abs().max().item() <= 1e-4


def test_llama_gguf_with_qk_permutation(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CACHE", str(tmp_path / "cache"))
    H, KV, D, L = 4, 2, 16, 2
    cfg = LlamaConfig(vocab_size=V, hidden_size=H * D, intermediate_size=96, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=128,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    (tmp_path / "hf").mkdir()
    ours_st, sd = tiny_hf(cfg, tmp_path / "hf")
    t = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
         "output.weight": sd["lm_head.weight"]}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], H),
            f"blk.{i}.attn_k.weight": llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], KV),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
        })
    meta = dict(context_length=128, embedding_length=H * D, block_count=L, feed_forward_length=96,
                head_count=H, head_count_kv=KV, layer_norm_rms_eps=1e-5, rope_freq_base=10000.0,
                rope_dimension_count=D, vocab_size=V)
    write_gguf(tmp_path / "tiny-llama.gguf", "llama", meta, {k: np.asarray(v) for k, v in t.items()})
    ours_gguf, tok = sinkstream.load(str(tmp_path / "tiny-llama.gguf"), device="cpu", dtype="float32", quiet=True)
    assert type(ours_gguf).__name__ == "LlamaForCausalLM" and not ours_gguf.config.tie_word_embeddings
    compare(ours_gguf, ours_st)
    assert len(tok("abc")["input_ids"]) >= 1  # the tokenizer came along


def test_gemma3_gguf_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CACHE", str(tmp_path / "cache"))
    H, KV, D, L, HID = 4, 1, 16, 6, 64
    # What a Gemma 3 GGUF does not record takes llama.cpp's rules (pattern 6: five local layers, one global;
    # local RoPE base 10000; query_pre_attn_scalar = head_dim), so the reference uses the same.
    cfg = Gemma3TextConfig(vocab_size=V, hidden_size=HID, intermediate_size=96, num_hidden_layers=L,
                           num_attention_heads=H, num_key_value_heads=KV, head_dim=D, sliding_window=8,
                           max_position_embeddings=128, query_pre_attn_scalar=D, rms_norm_eps=1e-6,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    (tmp_path / "hf").mkdir()
    ours_st, sd = tiny_hf(cfg, tmp_path / "hf")
    assert [s.sliding_window for s in ours_st.layer_specs()] == [8, 8, 8, 8, 8, None]
    plus1 = lambda x: (x + 1).numpy()  # llama.cpp stores Gemma norms as 1 + weight
    t = {"token_embd.weight": sd["model.embed_tokens.weight"].numpy(),
         "output_norm.weight": plus1(sd["model.norm.weight"])}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({
            f"blk.{i}.attn_norm.weight": plus1(sd[p + "input_layernorm.weight"]),
            f"blk.{i}.attn_q.weight": sd[p + "self_attn.q_proj.weight"].numpy(),
            f"blk.{i}.attn_k.weight": sd[p + "self_attn.k_proj.weight"].numpy(),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"].numpy(),
            f"blk.{i}.attn_q_norm.weight": plus1(sd[p + "self_attn.q_norm.weight"]),
            f"blk.{i}.attn_k_norm.weight": plus1(sd[p + "self_attn.k_norm.weight"]),
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"].numpy(),
            f"blk.{i}.post_attention_norm.weight": plus1(sd[p + "post_attention_layernorm.weight"]),
            f"blk.{i}.ffn_norm.weight": plus1(sd[p + "pre_feedforward_layernorm.weight"]),
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"].numpy(),
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"].numpy(),
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"].numpy(),
            f"blk.{i}.post_ffw_norm.weight": plus1(sd[p + "post_feedforward_layernorm.weight"]),
        })
    meta = dict(context_length=128, embedding_length=HID, block_count=L, feed_forward_length=96, head_count=H,
                head_count_kv=KV, key_length=D, value_length=D, layer_norm_rms_eps=1e-6,
                rope_freq_base=1000000.0, sliding_window=8)
    write_gguf(tmp_path / "tiny-gemma3.gguf", "gemma3", meta, t)
    ours_gguf, _ = sinkstream.load(str(tmp_path / "tiny-gemma3.gguf"), device="cpu", dtype="float32", quiet=True)
    assert type(ours_gguf).__name__ == "Gemma3ForCausalLM"
    assert [s.sliding_window for s in ours_gguf.layer_specs()] == [8, 8, 8, 8, 8, None]
    compare(ours_gguf, ours_st)
    # a second load (the tokenizer folder cached) gives the same model
    again, _ = sinkstream.load(str(tmp_path / "tiny-gemma3.gguf"), device="cpu", dtype="float32", quiet=True)
    compare(again, ours_st)
