"""`sinkstream eval ppl`: perplexity of a long token stream under one or several KV cache policies.

Three ways to feed the stream (``--mode``):

* ``exact``   token by token, one forward pass per token: the paper's protocol.
* ``banded``  chunks of C tokens in one pass, each query masked to exactly the sinks + window it would
              see decoding alone (see `sinkstream.cache.plan`): the same numbers as ``exact`` up to float
              rounding, C times fewer passes.
* ``chunked`` chunks of C tokens where every query of the chunk sees the whole cache as it stood before
              the chunk (sinks + window) plus the chunk causally, positions contiguous: the cheap protocol
              most long-context evaluations use. Queries late in a chunk see up to C-1 more tokens than
              ``exact`` allows, so its perplexity is slightly lower (optimistic) for bounded caches.

``recompute`` re-encodes a whole window per scored token, so it is scored on every k-th token only
(``--recompute-every``); every row also reports perplexity on exactly those positions for a fair match.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..cache import CacheConfig, StreamCache
from ..cache.plan import Plan
from ..perplexity import stream_nll
from .common import cache_row

MODES = ("exact", "banded", "chunked")


def _widen(plan: Plan, sinks: int, window: int) -> Plan:
    """The ``chunked`` view of a pass: no band, every new query sees the whole pre-chunk cache.

    Only passes that read the cache before writing (a chunk arriving at a full ring) differ from the
    banded plan. There the keys are laid out contiguously: sinks, then the cached window from its oldest
    token ``b' = max(S, t0 - W)``, then the chunk. Positions keep the plan's rotation base ``b`` (queries
    and window keys at ``S + u - b``, as stored), so only the sinks move: to ``s + (b' - b)``.
    """
    if plan.write_first:
        return plan  # single tokens, or chunks before the ring is full: nothing to widen
    t = torch.arange(plan.start, plan.start + plan.n_new)
    b = sinks + plan.start - int(plan.q_pos[0])  # query t sits at S + t - b (positions are host tensors)
    shift = max(sinks, plan.start - window) - b
    k_tok = plan.k_tokens
    changes = dict(k_pos=torch.where(k_tok < sinks, k_tok + shift, sinks + k_tok - b), q_pos_sink=None,
                   sink_cols=None, mask=(k_tok[None, :] <= t[:, None]).to(plan.write_slots.device))
    if plan.sink_pos is not None:  # caches that rotate sinks separately
        changes["sink_pos"] = torch.arange(sinks) + shift
    return dataclasses.replace(plan, **changes)


@torch.inference_mode()
def chunked_nll(model, cache: StreamCache, ids: torch.Tensor, *, chunk: int, progress=None) -> torch.Tensor:
    """NLL [n-1] of ids[1:] with the wide ``chunked`` protocol (see the module docstring)."""
    ids = ids.view(1, -1).to(model.device)
    n = ids.shape[1]
    out = torch.full((n - 1,), float("nan"))
    for i in range(0, n - 1, chunk):
        piece = ids[:, i:min(i + chunk, n - 1)]
        plans = cache.begin(piece.shape[1])
        wide = {}
        for key, plan in zip(cache.layer_group, plans):
            if id(plan) not in wide:
                slots = cache.groups[key]
                wide[id(plan)] = _widen(plan, slots.sinks, slots.window)
        logits = model.forward_layers(piece, cache.layers, [wide[id(p)] for p in plans]).float()
        target = ids[0, i + 1:i + 1 + piece.shape[1]]
        out[i:i + piece.shape[1]] = -torch.log_softmax(logits[0], -1).gather(-1, target[:, None])[:, 0].cpu()
        if progress is not None:
            progress(i + piece.shape[1], n - 1)
    return out


def policy_nll(model, config: CacheConfig, ids: torch.Tensor, *, mode: str = "banded", chunk: int = 512,
               recompute_every: int = 16, progress=None) -> torch.Tensor:
    """Per-token NLL [n-1] of a stream under one cache policy and feeding mode (NaN = not scored)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    cache = model.make_cache(config)
    if config.policy == "recompute":  # re-encodes each window from scratch: the mode makes no difference
        return stream_nll(model, cache, ids, chunk=chunk, every=recompute_every, progress=progress)
    if mode == "chunked":
        return chunked_nll(model, cache, ids, chunk=chunk, progress=progress)
    return stream_nll(model, cache, ids, chunk=1 if mode == "exact" else chunk, progress=progress)


def _mean(nll: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[float, int]:
    ok = ~torch.isnan(nll) if keep is None else keep & ~torch.isnan(nll)
    count = int(ok.sum())
    return (float(nll[ok].double().mean()) if count else float("nan")), count


def curve(nll: torch.Tensor, every: int) -> list[tuple[int, float, float]]:
    """(tokens so far, mean NLL of the last `every` tokens, mean NLL of everything so far) per block."""
    rows, total, count = [], 0.0, 0
    for end in range(every, len(nll) + every, every):
        block = nll[end - every:end]
        m, c = _mean(block)
        if not c:
            continue
        total += m * c
        count += c
        rows.append((min(end, len(nll)), m, total / count))
    return rows


def evaluate(model, ids: torch.Tensor, configs: list[CacheConfig], *, modes: tuple[str, ...] = ("banded",),
             chunk: int = 512, recompute_every: int = 16, every: int = 1000, progress_factory=None) -> dict:
    """Run every (mode, policy) on the same tokens. Returns the JSON-able result (rows + curves)."""
    runs = []
    for mode in modes:
        for cfg in configs:
            if cfg.policy == "recompute" and any(r["cache"] == "recompute" and r["window"] == cfg.window
                                                 for r, _ in runs):
                continue  # recompute is mode-independent: score it once
            span = ids
            if cfg.policy == "dense" and len(ids) > model.max_context:
                span = ids[:model.max_context]  # dense cannot go further; scored on the tokens it can hold
            bar = progress_factory(f"{mode} {cfg.describe()}") if progress_factory else None
            t0 = time.perf_counter()
            nll = policy_nll(model, cfg, span, mode=mode, chunk=chunk, recompute_every=recompute_every,
                             progress=bar)
            secs = time.perf_counter() - t0
            full = torch.full((len(ids) - 1,), float("nan"))
            full[:len(nll)] = nll
            runs.append(({**cache_row(cfg), "mode": "any" if cfg.policy == "recompute" else mode}, full))
            runs[-1][0]["seconds"] = round(secs, 2)
    sub = [nll for row, nll in runs if row["cache"] == "recompute"]
    common = None
    if sub:  # the positions every recompute run scored
        common = torch.stack([~torch.isnan(x) for x in sub]).all(0)
    results, curves = [], []
    for row, nll in runs:
        m, count = _mean(nll)
        row.update(nll=m, ppl=math.exp(m), scored=count)
        if common is not None:
            mc, cc = _mean(nll, common)
            row.update(nll_recompute_positions=mc, ppl_recompute_positions=math.exp(mc), recompute_positions=cc)
        results.append(row)
        if row["cache"] != "recompute":
            for end, block, cum in curve(nll, every):
                curves.append({"label": row["label"], "mode": row["mode"], "tokens": end, "nll": block,
                               "ppl": math.exp(block), "cumulative_ppl": math.exp(cum)})
    return {"tokens": int(len(ids)), "chunk": chunk, "recompute_every": recompute_every, "every": every,
            "results": results, "curve": curves}
