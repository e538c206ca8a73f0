"""What a cache is asked to be: `CacheConfig` (policy and sizes) and `LayerSpec` (one layer's shape, from
the model)."""
from __future__ import annotations

from dataclasses import dataclass, replace

POLICIES = ("dense", "window", "sink", "recompute", "memory")
REPRESENTATIVES = ("attention", "mean")
KV_DTYPES = (None, "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CacheConfig:
    """`CacheConfig(policy="sink", sinks=4, window=1020)`: 4 sink tokens + 1020 recent = 1024 cached."""
    policy: str = "sink"
    sinks: int = 4
    window: int = 1020
    prefill_chunk: int = 512  # tokens per forward pass when a prompt is longer
    # memory policy only: evicted tokens form blocks of `block_size`; each layer recalls `top_k` of them
    block_size: int = 64
    top_k: int = 4
    memory_budget: int | None = None  # bytes of block K/V kept in RAM before spilling to disk; None = no limit
    memory_dir: str | None = None     # where spilled blocks go (a temporary folder when None)
    representative: str = "attention"  # block keys scored against queries: "attention" (most attended) or "mean"
    # the K/V buffers' dtype: None keeps the model's; "bfloat16" halves the bytes every decode step reads
    # (llama.cpp keeps its KV in float16 by default). Rotations and attention scores are computed as before
    # and rounded into the buffers' dtype only when stored.
    kv_dtype: str | None = None
    # the most tokens a session may pin as its sinks (`pinned`); None: half the cache (sinks + window)
    max_pinned: int | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.policy != "dense" and self.window < 1:
            raise ValueError(f"window must be at least 1 token, got {self.window}")
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if self.max_pinned is not None and self.max_pinned < 1:
            raise ValueError(f"max_pinned must be >= 1 token, got {self.max_pinned}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {self.kv_dtype!r} (choose from {', '.join(map(str, KV_DTYPES))})")
        if self.kv_dtype is not None and self.policy in ("memory", "recompute"):
            raise ValueError(f"kv_dtype is for the dense, window and sink policies, not {self.policy}")
        if self.policy == "memory":
            if self.block_size < 1 or self.top_k < 1:
                raise ValueError(f"block_size and top_k must be >= 1, got {self.block_size} and {self.top_k}")
            if self.memory_budget is not None and self.memory_budget < 0:
                raise ValueError(f"memory_budget must be >= 0 bytes, got {self.memory_budget}")
            if self.representative not in REPRESENTATIVES:
                raise ValueError(f"unknown representative {self.representative!r} "
                                 f"(choose from {', '.join(REPRESENTATIVES)})")

    @property
    def pin_limit(self) -> int:
        """The most tokens `pinned` accepts: ``max_pinned``, else half the cache."""
        if self.max_pinned is not None:
            return self.max_pinned
        return (self.sinks + self.window) // 2

    def pinned(self, n: int) -> "CacheConfig":
        """This config with the stream's first `n` tokens pinned (a system prompt that is never evicted).

        ``sink`` and ``memory``: those tokens become the sinks, kept for ever at positions 0..n-1, and the
        window gives up what they take beyond the configured sinks, so the cache keeps its size
        (sinks + window = n + new window). ``dense`` keeps every token anyway and is returned unchanged.
        ``window`` and ``recompute`` keep no sinks: they raise `PinError`, as does an `n` beyond
        `pin_limit`."""
        from ..errors import PinError
        if n < 1:
            raise PinError("nothing to pin: the pinned prefix is empty")
        if self.policy == "dense":
            return self
        if self.policy not in ("sink", "memory"):
            raise PinError(f"the {self.policy} cache keeps no sinks, so it cannot pin a system prompt; "
                           f"use --cache sink (or memory), or dense, which keeps everything")
        if n > self.pin_limit:
            raise PinError(f"the pinned prefix is {n} tokens, more than this cache's limit of {self.pin_limit} "
                           f"(sinks + window = {self.sinks + self.window}; raise --max-pinned or the window, or "
                           f"shorten the system prompt)")
        return replace(self, sinks=n, window=self.sinks + self.window - n)

    def describe(self) -> str:
        if self.policy == "dense":
            return "dense"
        if self.policy == "sink":
            return f"sink({self.sinks},{self.window})"
        if self.policy == "memory":
            return f"memory({self.sinks},{self.window},{self.top_k}x{self.block_size})"
        return f"{self.policy}({self.window})"


@dataclass(frozen=True)
class LayerSpec:
    """What a model tells the cache about one attention layer."""
    kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    sliding_window: int | None = None  # the model's own local window for this layer (Gemma 3 local, Mistral)
    rotary: object = None  # the layer's Rotary: lets bounded caches store keys pre-rotated (cache/plan.py)
