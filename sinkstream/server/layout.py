"""A session's cache layout as plain JSON: what `GET /v1/sessions/{id}/cache` and the page at `/` show.

`live_layout(cache)` reads a live cache through its public attributes (``seen``, ``cached``, ``capacity``,
``nbytes``, ``config``, the ring groups' `RingSlots`, and for ``memory`` the block count and each layer's
recall slots). It runs on the thread that owns the session (`SessionStore._view`), so it never races a turn.
`disk_layout(config, stats)` is what a session file's header tells without reading a tensor: the counts
saved with the session, and the ring position, which is a pure function of the stream length
(see `sinkstream.cache.plan`); which blocks a memory session recalls is not in the header (``null``).

The ring: stream token ``u`` sits in slot ``u`` while ``u < sinks`` and in ``sinks + (u - sinks) % window``
after that, so ``next_slot`` (where the next token fed goes) is that slot for ``u = tokens_seen``.
"""
from __future__ import annotations

import logging

log = logging.getLogger("sinkstream.server")


def _ring(sinks: int, window: int, seen: int, *, growable: bool = False, layers: int | None = None) -> dict:
    """One ring of ``sinks`` + ``window`` slots after ``seen`` stream tokens."""
    size = sinks + window
    if growable and seen >= size:
        nxt = None  # a dense cache that is full takes no more tokens
    elif seen < sinks:
        nxt = seen
    else:
        nxt = sinks + (seen - sinks) % window
    out = {"sinks": sinks, "window": window, "size": size, "filled": min(seen, size),
           "sinks_filled": min(seen, sinks), "window_filled": min(max(seen - sinks, 0), window),
           "next_slot": nxt, "wrapped": seen > size,
           # the oldest stream token still in the window (None while the window is empty)
           "oldest": max(sinks, seen - window) if seen > sinks else None}
    if layers is not None:
        out["layers"] = layers
    return out


def _memory(config, *, blocks: int, open_fill: int | None, recalled: list[dict] | None,
            disk_bytes: int | None) -> dict:
    return {"block_size": config.block_size, "top_k": config.top_k, "blocks": blocks, "open_block_fill": open_fill,
            "recalled": recalled, "disk_bytes": disk_bytes}


def live_layout(cache) -> dict:
    """The layout of a live cache (any policy). Reads only; call on the thread that owns the cache."""
    config = cache.config
    seen = int(cache.seen)
    out = {"policy": config.policy, "tokens_seen": seen, "tokens_cached": int(cache.cached),
           "capacity": cache.capacity, "cache_bytes": int(cache.nbytes)}
    groups = getattr(cache, "groups", None)
    if groups:
        keys = list(groups)
        counts = {k: 0 for k in keys}
        for k in getattr(cache, "layer_group", []):
            counts[k] = counts.get(k, 0) + 1
        rings = [_ring(g.sinks, g.window, g.seen, growable=g.growable, layers=counts.get(k)) for k, g in groups.items()]
        main = max(rings, key=lambda r: r["size"])  # the layers with the largest cache (global layers)
        out["groups"] = rings
    else:  # recompute: keeps token ids, no KV slots to write
        main = _ring(0, config.window, seen)
        main["next_slot"] = None
        out["groups"] = [main]
    out["sinks"], out["window"], out["ring"] = main["sinks"], main["window"], main
    out["memory"] = None
    if config.policy == "memory":
        mem_layers = [cache.layers[i] for i in getattr(cache, "memory_layers", [])]
        heads: dict[int, int] = {}
        for layer in mem_layers:  # how many (layer, kv head) recall slots hold each block
            for row in layer.ret_ids:
                for b in row:
                    if b >= 0:
                        heads[b] = heads.get(b, 0) + 1
        out["memory"] = _memory(config, blocks=int(cache.blocks),
                                open_fill=mem_layers[0].open_fill if mem_layers else None,
                                recalled=[{"block": b, "slots": n} for b, n in sorted(heads.items())],
                                disk_bytes=int(getattr(cache, "disk_bytes", 0)))
        out["memory"]["recall_slots"] = sum(len(row) for layer in mem_layers for row in layer.ret_ids)
    return out


def disk_layout(config, stats: dict) -> dict:
    """The layout a saved session's header tells (`config`: its CacheConfig; `stats`: the saved counts)."""
    seen = int(stats.get("tokens_seen", 0))
    capacity = stats.get("capacity")
    if config.policy == "dense":
        ring = _ring(0, int(capacity or 0) or 1, seen, growable=True)
    elif config.policy in ("window", "recompute"):
        ring = _ring(0, config.window, seen)
        if config.policy == "recompute":
            ring["next_slot"] = None
    else:
        ring = _ring(config.sinks, config.window, seen)
    out = {"policy": config.policy, "tokens_seen": seen, "tokens_cached": int(stats.get("tokens_cached", 0)),
           "capacity": capacity, "cache_bytes": int(stats.get("cache_bytes", 0)),
           "sinks": ring["sinks"], "window": ring["window"], "ring": ring, "groups": None, "memory": None}
    if config.policy == "memory":
        evicted = max(0, seen - config.sinks - config.window)
        out["memory"] = _memory(config, blocks=evicted // config.block_size, open_fill=evicted % config.block_size,
                                recalled=None, disk_bytes=None)
        out["memory"]["recall_slots"] = None
    return out


def session_layout(session, stats: dict) -> dict:
    """`live_layout` of a live Session's cache; should a cache lack what it reads (a policy added later),
    what `disk_layout` computes from the session's config and counts instead, so a turn never fails here."""
    try:
        return live_layout(session.cache)
    except Exception:  # noqa: BLE001 - the layout is for display; the turn must not fail over it
        log.exception("cannot read the cache layout; reporting the counts only")
        return disk_layout(session.cache_config, stats)
