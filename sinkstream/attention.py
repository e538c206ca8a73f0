"""Scaled dot-product attention over a cache view. Policy-agnostic: everything comes from the Plan."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache.plan import Plan
from .rope import Rotary, apply_rotary


@dataclass
class Packed:
    """One layer's caches in a pass that packs several caches' new tokens along the sequence axis: the
    tokens of cache i are positions ``bounds[i]:bounds[i + 1]``; ``layers[i]`` and ``plans[i]`` are its layer
    cache and this pass's plan for it. Everything but attention is position-wise, so only attention splits."""
    bounds: list[int]
    layers: list
    plans: list


def cached_attention(kv, plan: Plan | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     **kw) -> torch.Tensor:
    """Store this pass's k, v in the layer cache `kv` as `plan` says and attend q over what it returns
    (`attend`'s keywords). With a `Packed` kv (plan None) each cache's segment does so on its own.

    Packed attention runs per segment: each cache keeps its own buffers, plan and positions, so caches of any
    policy, fill level and pass length (prefill chunks beside decode tokens) share one pass with no padding.
    """
    if isinstance(kv, Packed):
        outs = []
        for i, (layer, p) in enumerate(zip(kv.layers, kv.plans)):
            a, b = kv.bounds[i], kv.bounds[i + 1]
            outs.append(cached_attention(layer, p, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **kw))
        return torch.cat(outs, dim=2)
    k, v = kv.update(k, v, plan)
    return attend(q, k, v, plan, **kw)


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
    if k.dtype != q.dtype:  # a cache kept in a narrower dtype (CacheConfig.kv_dtype): attend in its dtype
        out_dtype, q = q.dtype, q.to(k.dtype)
        q_sink = None if q_sink is None else q_sink.to(k.dtype)
        mask = mask.to(k.dtype) if mask is not None and mask.dtype != torch.bool else mask
        return _sdpa(q, k, v, plan, mask, q_sink, scale).to(out_dtype)
    return _sdpa(q, k, v, plan, mask, q_sink, scale)


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
    if gqa and mask is None and q.shape[2] == 1:
        # one query per head (decode): the heads sharing a kv head become that head's query rows, so each
        # cached key and value is read once per kv head, not once per query head
        b, h, _, d = q.shape
        o = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], h // k.shape[1], d), k, v, scale=scale)
        return o.reshape(b, h, 1, v.shape[-1])  # CUDA's kernels may return it strided
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
