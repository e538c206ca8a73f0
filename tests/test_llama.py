"""Llama family: logits equal transformers'; caches equal dense below capacity; chunked == step-by-step;
cache state after many evictions equals a slow from-scratch reference."""
import math

import pytest
import torch

from conftest import LLAMA_VARIANTS, hf_tiny, ours_from_hf
from sinkstream import CacheConfig
from sinkstream.rope import apply_rotary


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_logits_match_transformers(variant):
    hf = hf_tiny(variant)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    ref = hf(ids).logits
    out = ours(ids)
    assert (ref - out).abs().max().item() <= 1e-4


@pytest.mark.parametrize("policy", ["dense", "window", "sink"])
def test_caches_equal_dense_below_capacity(tiny, policy):
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(2))
    ref = tiny(ids)
    for chunk in (1, 7, 64):
        cache = tiny.make_cache(CacheConfig(policy, sinks=4, window=60, prefill_chunk=chunk))
        out = cache.run(tiny, ids, logits="all")
        assert (ref - out).abs().max().item() <= 1e-4, (policy, chunk)


@pytest.mark.parametrize("S", [0, 4])
def test_chunked_equals_token_by_token_past_capacity(tiny, S):
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(3))
    cfg = dict(policy="sink" if S else "window", sinks=S, window=20)
    step = tiny.make_cache(CacheConfig(**cfg, prefill_chunk=1))
    chunked = tiny.make_cache(CacheConfig(**cfg, prefill_chunk=17))
    a = step.run(tiny, ids, logits="all")
    b = chunked.run(tiny, ids, logits="all")
    assert (a - b).abs().max().item() <= 1e-4
    for i, (la, lb) in enumerate(zip(step.layers, chunked.layers)):
        assert torch.allclose(step.raw_keys(i), chunked.raw_keys(i), atol=1e-5)
        assert torch.allclose(la.v, lb.v, atol=1e-5)


def reference_stream(model, ids, S, W):
    """Slow reference: per token, rebuild sinks + window from scratch in order, positions 0..n-1."""
    m, c = model.model, model.config
    store = [dict() for _ in m.layers]  # layer -> token -> (k, v) un-rotated
    logits = []
    for t in range(ids.shape[1]):
        keep = list(range(min(S, t + 1))) + list(range(max(S, t - W + 1), t + 1))
        x = m.embed_tokens(ids[:, t:t + 1])
        for li, layer in enumerate(m.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(1, 1, c.num_attention_heads, c.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(1, 1, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(1, 1, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            store[li][t] = (k, v)
            for u in list(store[li]):
                if u not in keep:
                    del store[li][u]
            K = torch.cat([store[li][u][0] for u in keep], dim=2)
            V = torch.cat([store[li][u][1] for u in keep], dim=2)
            cos, sin = model.rotary.tables(torch.arange(len(keep)), K.dtype)
            K = apply_rotary(K, cos, sin)
            q = apply_rotary(q, cos[-1:], sin[-1:])
            rep = c.num_attention_heads // c.num_key_value_heads
            K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
            att = (q @ K.transpose(-1, -2) / math.sqrt(c.head_dim)).softmax(-1)
            o = (att @ V).transpose(1, 2).reshape(1, 1, -1)
            x = x + a.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits.append(model.lm_head(m.norm(x)))
    return torch.cat(logits, dim=1), store


@pytest.mark.parametrize("S,W", [(4, 12), (0, 12)])
def test_state_after_many_evictions_equals_reference(tiny, S, W):
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(4))
    ref_logits, ref_store = reference_stream(tiny, ids, S, W)
    cache = tiny.make_cache(CacheConfig("sink" if S else "window", sinks=S, window=W, prefill_chunk=13))
    out = cache.run(tiny, ids, logits="all")
    assert (out - ref_logits).abs().max().item() <= 1e-4
    slots = next(iter(cache.groups.values())).slot_token.tolist()
    for li, layer in enumerate(cache.layers):
        assert sorted(slots) == sorted(ref_store[li])
        keys = cache.raw_keys(li)
        for j, u in enumerate(slots):
            assert torch.allclose(keys[:, :, j:j + 1], ref_store[li][u][0], atol=1e-5)
            assert torch.allclose(layer.v[:, :, j:j + 1], ref_store[li][u][1], atol=1e-5)


def test_recompute_equals_fresh_window(tiny):
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = tiny.make_cache(CacheConfig("recompute", window=16))
    out = cache.run(tiny, ids, logits="all")
    for t in (5, 20, 39):
        ref = tiny(ids[:, max(0, t - 15):t + 1])[:, -1]
        assert (out[:, t] - ref).abs().max().item() <= 1e-5


def test_memory_stays_flat(tiny):
    cache = tiny.make_cache(CacheConfig("sink", sinks=4, window=28))
    before = cache.nbytes
    ids = torch.randint(0, 256, (1, 500))
    cache.run(tiny, ids)
    for _ in range(50):
        cache.run(tiny, ids[:, :1])
    assert cache.nbytes == before and cache.cached == 32 and cache.seen == 550


def test_prerotated_storage_equals_rotation_at_attention(tiny):
    """Keys stored rotated with a lazily re-based offset give the same logits as rotating every pass."""
    from dataclasses import replace

    from sinkstream.cache import StreamCache
    ids = torch.randint(0, 256, (1, 260), generator=torch.Generator().manual_seed(6))
    cfg = CacheConfig("sink", sinks=4, window=12, prefill_chunk=9)
    fast = tiny.make_cache(cfg)
    plain = StreamCache(cfg, [replace(s, rotary=None) for s in tiny.layer_specs()])
    assert fast.layers[0].rotary is not None and plain.layers[0].rotary is None
    qmax = 0
    for i in range(0, 200, 9):  # chunks, then single steps: both paths cross several re-bases
        a, b = fast.run(tiny, ids[:, i:i + 9], logits="all"), plain.run(tiny, ids[:, i:i + 9], logits="all")
        assert (a - b).abs().max().item() <= 1e-4
    for t in range(200, 260):
        a, b = fast.run(tiny, ids[:, t:t + 1]), plain.run(tiny, ids[:, t:t + 1])
        assert (a - b).abs().max().item() <= 1e-4
        qmax = max(qmax, t - next(iter(fast.groups.values())).base)
    assert qmax < 2 * 12 + 1  # positions stay bounded: the offset is re-based every W tokens
