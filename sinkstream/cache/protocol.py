"""The cache protocol: what a model, a session or an evaluation may ask of a cache, and nothing more.

Three `typing.Protocol` classes, checkable at run time with ``isinstance``:

* `LayerCache`   one attention layer's K/V store (`KVBuffer`, `MemoryLayer`);
* `ModelCache`   what every policy answers (dense, window, sink, recompute, memory);
* `PlannedCache` a `ModelCache` whose passes are planned per layer (`begin` hands out one `Plan` per layer
  and the model calls ``layers[i].update``), so its forward passes can be shared with other caches:
  `StreamCache` (dense, window, sink) and `MemoryCache`. `RecomputeCache` is only a `ModelCache`: it
  re-encodes its window from scratch in every pass and must run on its own.

Code outside ``sinkstream.cache`` tells the two kinds apart by ``cache.planned``, never by ``isinstance``
on a cache class. Positions follow the contract written in `sinkstream.cache.plan`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch

from .config import CacheConfig
from .plan import Plan

if TYPE_CHECKING:
    from ..models.base import CausalLM


@runtime_checkable
class LayerCache(Protocol):
    """The keys and values of one attention layer."""

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's K/V [batch, kv_heads, n_new, dim] at the slots `plan` names; return the keys and
        values the layer attends to in this pass (columns in ``plan.k_pos`` order)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds in RAM / on the device."""
        ...

    def state(self, used: int) -> dict[str, torch.Tensor]:
        """Name -> tensor dict of this layer's first `used` slots (and whatever else it keeps)."""
        ...

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned, into a fresh layer of the same shape."""
        ...


@runtime_checkable
class ModelCache(Protocol):
    """What every cache policy answers."""

    planned: bool  # True for a `PlannedCache`, False for a cache that must run its passes alone (recompute)

    @property
    def config(self) -> CacheConfig:
        """The configuration the cache was made from."""
        ...

    @property
    def seen(self) -> int:
        """Tokens fed so far (the stream's length)."""
        ...

    @property
    def cached(self) -> int:
        """Tokens the next query can attend to (at most `capacity`)."""
        ...

    @property
    def capacity(self) -> int | None:
        """The most tokens the cache ever holds (dense: the model's context)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds in RAM / on the device."""
        ...

    def state(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict (safetensors-ready) that `load_state` restores exactly."""
        ...

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned, into a fresh cache made from the same config and model."""
        ...

    def run(self, model: CausalLM, input_ids: torch.Tensor, *, logits: str = "last",
            progress: Callable[[int, int], None] | None = None, every: int = 1) -> torch.Tensor:
        """Feed input_ids [batch, n] (n >= 1, else EmptyInputError); return logits [batch, 1, vocab] for
        ``logits="last"`` or [batch, n, vocab] for ``"all"``. ``progress(done, n)`` is called as tokens go
        in. ``every``: with ``"all"``, only every `every`-th position must be scored (the others may be NaN
        rows); planned caches score every position and ignore it."""
        ...


@runtime_checkable
class PlannedCache(ModelCache, Protocol):
    """A cache whose passes are planned per layer: the model asks `begin` for one `Plan` per layer and calls
    ``layers[i].update(k, v, plans[i])``. Such a pass can share a forward pass with other planned caches."""

    layers: list[LayerCache]  # one per attention layer of the model, in order

    def begin(self, n_new: int) -> list[Plan]:
        """Plan a pass of `n_new` tokens, one Plan per layer, and advance the bookkeeping (`seen`) by them."""
        ...

    def chunk_size(self) -> int:
        """Tokens per forward pass when feeding many."""
        ...

    def after_run(self) -> None:
        """Called once a `run` has fed all its tokens (housekeeping, such as enforcing a RAM budget)."""
        ...
