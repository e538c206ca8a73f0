"""Per-token negative log-likelihood of a stream under a cache policy (used by tests and `eval ppl`)."""
from __future__ import annotations

import math

import torch

from .cache import ModelCache


@torch.inference_mode()
def stream_nll(model, cache: ModelCache, ids: torch.Tensor, *, chunk: int | None = None, every: int = 1,
               progress=None) -> torch.Tensor:
    """NLL [n-1] of ids[1:] given everything before, as the cache lets the model see it.

    Streams ids [n] through `cache` in chunks (exact: a chunk attends as token-by-token decoding would,
    see cache/plan.py). `every` goes to `cache.run`: `recompute` re-encodes a window per position, so it
    scores only every `every`-th position (the rest are NaN; `mean_nll` skips them); other caches score all.
    """
    ids = ids.view(1, -1).to(model.device)
    n = ids.shape[1]
    out = torch.full((n - 1,), float("nan"))
    step = chunk or cache.config.prefill_chunk
    for i in range(0, n - 1, step):
        piece = ids[:, i:min(i + step, n - 1)]
        logits = cache.run(model, piece, logits="all", every=every)
        target = ids[0, i + 1:i + 1 + piece.shape[1]]
        lp = torch.log_softmax(logits[0].float(), dim=-1)
        out[i:i + piece.shape[1]] = -lp.gather(-1, target[:, None])[:, 0].cpu()
        if progress is not None:
            progress(i + piece.shape[1], n - 1)
    return out


def mean_nll(nll: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    keep = ~torch.isnan(nll) if mask is None else mask & ~torch.isnan(nll)
    return float(nll[keep].mean())


def perplexity(nll: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    return math.exp(mean_nll(nll, mask))
