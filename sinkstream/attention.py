"""Scaled dot-product attention over a cache view. Policy-agnostic: everything comes from the Plan."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import kernels
from .cache.plan import Plan
from .rope import Rotary, apply_rotary


@dataclass
class Packed:
    """One layer's caches in a pass that packs several caches' new tokens along the sequence axis: the
    tokens of cache i are positions ``bounds[i]:bounds[i + 1]``; ``layers[i]`` and ``plans[i]`` are its layer
    cache and this pass's plan for it. Everything but attention is position-wise, so only attention splits.
    ``memo`` is shared by every layer of the pass (rotary tables gathered once per pass)."""
    bounds: list[int]
    layers: list
    plans: list
    memo: dict = field(default_factory=dict)

    def decode_together(self, rotary, alibi_slopes) -> bool:
        """Whether every cache takes one plain decode token into a buffer that stores keys rotated with
        `rotary`, all with their sinks in place: then `_decode_together` applies."""
        if rotary is None or alibi_slopes is not None:
            return False
        sinks = getattr(self.layers[0], "sinks", None)
        return all(p.plain_decode and p.keys_rotated and p.start >= sinks and getattr(l, "rotary", None) is rotary
                   and l.sinks == sinks for l, p in zip(self.layers, self.plans))


def cached_attention(kv, plan: Plan | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     **kw) -> torch.Tensor:
    """Store this pass's k, v in the layer cache `kv` as `plan` says and attend q over what it returns
    (`attend`'s keywords). With a `Packed` kv (plan None) each cache's segment does so on its own.

    Packed attention runs per segment: each cache keeps its own buffers, plan and positions, so caches of any
    policy, fill level and pass length (prefill chunks beside decode tokens) share one pass with no padding.
    """
    if isinstance(kv, Packed):
        if kv.decode_together(kw.get("rotary"), kw.get("alibi_slopes")):
            return _decode_together(kv, q, k, v, scale=kw["scale"], rotary=kw["rotary"])
        outs = []
        for i, (layer, p) in enumerate(zip(kv.layers, kv.plans)):
            a, b = kv.bounds[i], kv.bounds[i + 1]
            outs.append(cached_attention(layer, p, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **kw))
        return torch.cat(outs, dim=2)
    k, v = kv.update(k, v, plan)
    return attend(q, k, v, plan, **kw)


def _decode_together(kv: Packed, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                     rotary: Rotary) -> torch.Tensor:
    """`cached_attention` for caches that each take one plain decode token (`Packed.decode_together`): the
    rotations of the queries, the new keys and the sinks, which `KVBuffer.update` and `attend` do per cache,
    run once for all of them with each plan's own tables (the same element-wise products, so the same
    numbers); each cache then stores its token in its slot and attends over its own buffer, on the CPU in
    one call of our kernel for all of them (`_many_kernel`), the same arithmetic as one cache alone."""
    inter, dtype = rotary.cfg.interleaved, q.dtype
    key = ("decode", id(rotary), dtype, tuple(map(id, kv.plans)))
    tables = kv.memo.get(key)
    if tables is None:
        tq = [p.rope(rotary, dtype)[1] for p in kv.plans]
        tk = [p.key_tables(rotary, dtype) for p in kv.plans]
        cat = lambda ts: torch.cat(list(ts))
        tables = (cat(t[0] for t in tq), cat(t[1] for t in tq), cat(t[0][0] for t in tk), cat(t[0][1] for t in tk),
                  None if tk[0][1] is None else torch.stack([t[1][0] for t in tk])[:, None],
                  None if tk[0][1] is None else torch.stack([t[1][1] for t in tk])[:, None])
        kv.memo[key] = tables
    cq, sq, ck, sk, cs, ss = tables
    q = apply_rotary(q, cq, sq, interleaved=inter)
    k = apply_rotary(k, ck, sk, interleaved=inter)
    sinks = kv.layers[0].sinks
    rotated = None
    if sinks:  # [caches, kv_heads, S, d]: each cache's sinks at this pass's positions
        rotated = apply_rotary(torch.cat([layer.sink_k for layer in kv.layers]).to(dtype), cs, ss, interleaved=inter)
    if _many_kernel(kv, q, k):  # stores and attends for every cache in one call of our kernel
        b, h, n, d = q.shape  # n: one token per cache
        kvh = k.shape[1]
        o = torch.ops.sinkstream.decode_attention_many(
            q[0].transpose(0, 1).reshape(n, kvh, h // kvh, d).contiguous(), k[0].transpose(0, 1).contiguous(),
            v[0].transpose(0, 1).contiguous(), None if rotated is None else rotated.contiguous(),
            [layer.k for layer in kv.layers], [layer.v for layer in kv.layers],
            [p.decode_slot for p in kv.plans], [p.read_len for p in kv.plans], scale)
        return o.view(n, h, -1).transpose(0, 1).unsqueeze(0)
    outs = []
    for i, (layer, plan) in enumerate(zip(kv.layers, kv.plans)):
        kb, vb = layer.store_rotated(k[:, :, i:i + 1], v[:, :, i:i + 1], plan,
                                     None if rotated is None else rotated[i:i + 1])
        outs.append(_attend_view(q[:, :, i:i + 1], kb, vb, plan, None, None, scale))
    return torch.cat(outs, dim=2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, *, scale: float,
           rotary: Rotary | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """q: [batch, heads, C, d] un-rotated and k, v: [batch, kv_heads, Lk, d] as the cache returns them
    -> [batch, heads, C, dv].

    RoPE: rotates the queries to the plan's in-cache positions, and the keys too unless the cache stored
    them rotated (``plan.keys_rotated``; where each policy rotates is the contract in cache/plan.py).
    ALiBi: biases scores by in-cache distance. Sink columns use ``plan.q_pos_sink`` when a chunk needs it;
    for RoPE this is done with one SDPA call by stacking two rotations of q along the feature axis.
    """
    k, v, plan = plan.extend(q, k, v)  # retrieval memory adds blocks picked by q; a no-op otherwise
    mask = plan.mask
    q_sink = None
    if rotary is not None:
        tk, (cq, sq), ts = plan.rope(rotary, q.dtype)
        inter = rotary.cfg.interleaved
        if tk is not None:  # else the buffer stored them rotated (cache/kv.py)
            k = apply_rotary(k, tk[0], tk[1], interleaved=inter)
        if ts is not None:
            q_sink = apply_rotary(q, ts[0], ts[1], interleaved=inter)
        q = apply_rotary(q, cq, sq, interleaved=inter)
    if alibi_slopes is not None:
        dist = plan.distances(q.device).to(q.dtype)  # [C, Lk]
        bias = -alibi_slopes.to(q.dtype)[:, None, None] * dist  # [heads, C, Lk]
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        mask = bias
    return _attend_view(q, k, v, plan, mask, q_sink, scale)


def _attend_view(q, k, v, plan: Plan, mask, q_sink, scale: float) -> torch.Tensor:
    """`_sdpa` for rotated queries; a cache kept in a narrower dtype (CacheConfig.kv_dtype) is attended in
    its dtype, except by our decode kernel, which reads bfloat16 keys and values into float32 products."""
    if k.dtype == q.dtype or (mask is None and q_sink is None and q.shape[2] == 1 and _decode_kernel(q, k, v)):
        return _sdpa(q, k, v, plan, mask, q_sink, scale)
    out_dtype, q = q.dtype, q.to(k.dtype)
    q_sink = None if q_sink is None else q_sink.to(k.dtype)
    mask = mask.to(k.dtype) if mask is not None and mask.dtype != torch.bool else mask
    return _sdpa(q, k, v, plan, mask, q_sink, scale).to(out_dtype)


def _decode_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether our CPU decode-attention kernel (sinkstream/kernels/attn.cpp) takes these tensors: one batch
    row, float32 queries, float32 or bfloat16 keys/values with contiguous rows. It reads each key and value
    once for all the query heads sharing it (torch's CPU SDPA is built for blocks of many queries); its
    effect on decode is in docs/RESULTS.md (benchmarks/vs_llamacpp.py, before and after)."""
    return (q.device.type == "cpu" and q.shape[0] == 1 and q.dtype == torch.float32 and k.dtype == v.dtype
            and k.dtype in (torch.float32, torch.bfloat16) and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1]
            and v.stride(-1) == 1 and v.stride(-2) == v.shape[-1] and kernels.available())


def _many_kernel(kv: Packed, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `_decode_together`'s caches can store and attend in one call of our kernel
    (``decode_attention_many``, which does `KVBuffer.store_rotated`'s writes itself): float32 queries on the
    CPU, every buffer one contiguous batch row in one dtype that `_decode_kernel` takes."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or q.shape[0] != 1 or not kernels.available():
        return False
    dtype = kv.layers[0].k.dtype
    return dtype in (torch.float32, torch.bfloat16) and all(
        layer.k.dtype == dtype and layer.v.dtype == dtype and layer.k.shape[0] == 1
        and layer.k.is_contiguous() and layer.v.is_contiguous() for layer in kv.layers)


def _sdpa(q, k, v, plan: Plan, mask, q_sink, scale: float) -> torch.Tensor:
    """SDPA of rotated queries over the view; with `q_sink`, sink columns see the sink rotation."""
    gqa = q.shape[1] != k.shape[1]
    if q_sink is not None:
        sink = plan.sink_cols[None, None, :, None]
        q = torch.cat([q_sink, q], dim=-1)
        k = torch.cat([k * sink, k * ~sink], dim=-1)
        if v.shape[-1] != q.shape[-1]:  # fused kernels want one head size for q, k and v: pad v with zeros
            dv = v.shape[-1]
            v = torch.cat([v, v.new_zeros(*v.shape[:-1], q.shape[-1] - dv)], dim=-1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)[..., :dv]
    if mask is None and q.shape[2] == 1 and (gqa or _decode_kernel(q, k, v)):
        # one query per head (decode): the heads sharing a kv head become that head's query rows, so each
        # cached key and value is read once per kv head, not once per query head
        b, h, _, d = q.shape
        qg = q.reshape(b, k.shape[1], h // k.shape[1], d)
        if _decode_kernel(q, k, v):
            o = torch.ops.sinkstream.decode_attention(qg.contiguous(), k, v, scale)
        else:
            o = F.scaled_dot_product_attention(qg, k, v, scale=scale)
        return o.reshape(b, h, 1, v.shape[-1])  # CUDA's kernels may return it strided
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
