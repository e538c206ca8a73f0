"""`RecomputeCache`: the ``recompute`` policy, a sliding window re-encoded from scratch in every pass."""
from __future__ import annotations

import torch

from ..errors import EmptyInputError
from .config import CacheConfig


class RecomputeCache:
    """Sliding window with re-computation: the quality baseline, O(W) model work per token.

    Keeps only the last W token ids; every pass re-encodes the window ending at each wanted position
    from scratch (positions 0..W-1), exactly what a model with a W-token context would see.

    A `ModelCache` but not a `PlannedCache` (cache/protocol.py): it has no per-layer K/V or plans, so its
    passes cannot share a forward pass with other caches.
    """

    planned = False

    def __init__(self, config: CacheConfig):
        self.config = config
        self.window = config.window
        self.history = torch.empty(1, 0, dtype=torch.long)
        self.seen = 0

    def run(self, model, input_ids: torch.Tensor, *, logits: str = "last", progress=None,
            every: int = 1) -> torch.Tensor:
        """Feed input_ids [batch, n]; logits [batch, 1 or n, vocab]. logits="all" re-encodes one window per
        position, only for every `every`-th stream position and the last (the other rows are NaN)."""
        W, n = self.window, input_ids.shape[1]
        if n == 0:
            raise EmptyInputError("empty input: there are no tokens to feed (the cache is unchanged)")
        ids = torch.cat([self.history.to(input_ids.device).expand(input_ids.shape[0], -1), input_ids], dim=1)
        off = ids.shape[1] - n
        self.history = ids[:1, -(W - 1):].cpu() if W > 1 else ids[:1, :0].cpu()
        self.seen += n
        if logits == "last":
            return model(ids[:, -W:], None, last_only=True)
        rows = []
        for i in range(n):
            end = off + i + 1
            if (self.seen - n + i) % every and i != n - 1:
                rows.append(None)
                continue
            rows.append(model(ids[:, max(0, end - W):end], None)[:, -1:])
            if progress is not None:
                progress(i + 1, n)
        like = next(r for r in rows if r is not None)
        return torch.cat([r if r is not None else torch.full_like(like, float("nan")) for r in rows], dim=1)

    @property
    def cached(self) -> int:
        """Tokens in the window (at most W)."""
        return min(self.seen, self.window)

    @property
    def capacity(self) -> int:
        return self.window

    @property
    def nbytes(self) -> int:
        """Bytes of the kept token ids."""
        return self.history.numel() * self.history.element_size()

    def state(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "seen": torch.tensor([self.seen])}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        self.history = st["history"].clone().long()
        self.seen = int(st["seen"][0])
