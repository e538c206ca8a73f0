"""KV cache policies behind one protocol, written down in `sinkstream.cache.protocol`.

Every cache is a `ModelCache`: `run(model, ids)` (feed tokens, get logits), `seen`, `cached`, `capacity`,
`nbytes`, `state()` / `load_state()`, and `planned`. A `PlannedCache` also answers `begin(n)` (plan a pass
of n tokens, one Plan per layer) and holds `layers`, each a `LayerCache` whose `update(k, v, plan)` stores
and returns what that layer attends to. Policies:

* ``dense``     every token, up to the model's context (then ContextOverflowError)
* ``window``    the most recent W tokens (the baseline that collapses once the first token leaves)
* ``sink``      StreamingLLM: the first S tokens for ever + the most recent W
* ``recompute`` sliding window with re-computation: every step re-encodes the last W tokens from scratch
* ``memory``    ``sink`` + a retrieval memory of evicted blocks, top-k recalled per layer

``dense``, ``window`` and ``sink`` are a `StreamCache` (cache/stream.py), ``memory`` a `MemoryCache`
(cache/memory.py); both are planned. ``recompute`` is a `RecomputeCache` (cache/recompute.py), not planned.
Configuration: `CacheConfig` and `LayerSpec` (cache/config.py).

Positions follow the contract written in `sinkstream.cache.plan`.
"""
from __future__ import annotations

import torch

from .config import KV_DTYPES, POLICIES, REPRESENTATIVES, CacheConfig, LayerSpec
from .kv import KVBuffer
from .memory import MemoryCache
from .plan import Plan, RingSlots
from .protocol import LayerCache, ModelCache, PlannedCache
from .recompute import RecomputeCache
from .stream import StreamCache

__all__ = ["CacheConfig", "LayerSpec", "POLICIES", "REPRESENTATIVES", "KV_DTYPES",
           "LayerCache", "ModelCache", "PlannedCache", "StreamCache", "RecomputeCache", "MemoryCache",
           "KVBuffer", "Plan", "RingSlots", "make_cache"]


def make_cache(model, config: CacheConfig | None = None, *, batch: int = 1) -> ModelCache:
    """The cache a `config` asks for, shaped for `model` (its layer specs, dtype and device)."""
    config = config or CacheConfig()
    if config.policy == "recompute":
        return RecomputeCache(config)
    if config.policy == "memory":
        return MemoryCache(config, model.layer_specs(), batch=batch, dtype=model.dtype, device=model.device,
                           max_context=model.max_context)
    dtype = getattr(torch, config.kv_dtype) if config.kv_dtype else model.dtype
    return StreamCache(config, model.layer_specs(), batch=batch, dtype=dtype, device=model.device,
                       max_context=model.max_context)
