"""Shared prefixes: the cache state after a prompt's first tokens (a system prompt), computed once and copied
into every new cache that starts with the same tokens.

`PrefixStore.fill(model, cache, ids)` brings a fresh cache to the state it would have after feeding `ids`:
from the store when an entry matches (model object, the cache's config, the token ids), else by feeding
them and keeping the result. An entry is the cache's own `state()` (host tensors), so a hit is one
`load_state` copy and gives the same tensors, bit for bit, as the prefill it replaces. Entries are bounded
by bytes and evicted least recently used. Concurrent fills of one key compute it once; the others wait and
copy.

Each session gets its own copy: the sinks are re-rotated into every session's buffer slots in each pass
(cache/plan.py, "Rotation offset") and attention reads one contiguous buffer per layer, so the prefix's
K/V cannot be one tensor referenced by many live caches. What is held once is the store's entry.

Only caches whose state is self-contained are stored: ring-buffer caches, and memory caches before they
finalize a block (a block lives in a session's block log). Others (recompute; a memory cache whose prefix
outgrew its window) are fed the prefix directly.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch

DEFAULT_BYTES = int(os.environ.get("SINKSTREAM_PREFIX_BYTES", 256 << 20))


@dataclass
class _Entry:
    model: weakref.ref
    state: dict[str, torch.Tensor]
    nbytes: int


class PrefixStore:
    """Cache states after shared prefixes, at most `max_bytes` of them (LRU). Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(model, cache, ids: list[int]) -> tuple:
        """(model object, the cache's config, a SHA-256 of the token ids): what makes two prefills equal."""
        digest = hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()
        config = json.dumps(asdict(cache.config), sort_keys=True) if hasattr(cache, "config") else ""
        return id(model), str(model.dtype), str(model.device), config, len(ids), digest

    @staticmethod
    def storable(cache) -> bool:
        """Whether `cache`'s state is self-contained (see the module docstring)."""
        return (getattr(cache, "planned", False) and hasattr(cache, "state")
                and getattr(cache, "blocks", 0) == 0)

    def fill(self, model, cache, ids: list[int]) -> bool:
        """Bring a fresh `cache` to its state after `ids`; True when it was copied from the store."""
        if not ids:
            return False
        if self.max_bytes == 0 or not self.storable(cache):
            _feed(model, cache, ids)
            return False
        key = self.key(model, cache, ids)
        entry = self._get(key, model)
        if entry is None:
            with self._lock:  # a key being computed has a lock here until it is stored
                building = self._building.setdefault(key, threading.Lock())
            with building:  # one fill per key computes; the others wait here, then copy
                entry = self._get(key, model)
                if entry is None:
                    self.misses += 1
                    _feed(model, cache, ids)
                    if self.storable(cache):
                        self._put(key, model, cache.state())
                    with self._lock:
                        self._building.pop(key, None)
                    return False
        cache.load_state(entry.state)
        return True

    def _get(self, key: tuple, model) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.model() is not model:  # another model now has that id
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def _put(self, key: tuple, model, state: dict[str, torch.Tensor]) -> None:
        state = {k: v.clone() for k, v in state.items()}  # owned: never a view of a live cache's buffer
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = _Entry(weakref.ref(model), state, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


def fill_prefix(model, cache, ids: list[int], store: "PrefixStore | None | bool" = None) -> bool:
    """Feed `ids` into a fresh `cache` through `store` (None: `default_store()`; False: no store, just feed);
    True when the state was copied from the store."""
    store = default_store() if store is None else store
    if store is False:
        _feed(model, cache, ids)
        return False
    return store.fill(model, cache, ids)


def _feed(model, cache, ids: list[int]) -> None:
    with torch.inference_mode():
        cache.run(model, torch.tensor([ids], device=model.device))


_DEFAULT: PrefixStore | None = None
_DEFAULT_LOCK = threading.Lock()


def default_store() -> PrefixStore:
    """The process's store (``$SINKSTREAM_PREFIX_BYTES`` bytes, default 256 MiB), made on first use."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = PrefixStore(DEFAULT_BYTES)
        return _DEFAULT
