"""KV cache policies behind one protocol.

A model cache answers: `begin(n)` (plan a pass of n tokens, one Plan per layer), `layers[i].update(k, v,
plan)` (store and return what layer i attends to), `run(model, ids)` (feed tokens, get logits), `seen`,
`cached`, `nbytes`, `state()` / `load_state()`. Policies:

* ``dense``     every token, up to the model's context (then ContextOverflowError)
* ``window``    the most recent W tokens (the baseline that collapses once the first token leaves)
* ``sink``      StreamingLLM: the first S tokens for ever + the most recent W
* ``recompute`` sliding window with re-computation: every step re-encodes the last W tokens from scratch
* ``memory``    ``sink`` + a retrieval memory of evicted blocks, top-k recalled per layer (cache/memory.py)

Positions follow the contract written in `sinkstream.cache.plan`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EmptyInputError
from .kv import KVBuffer
from .plan import Plan, RingSlots

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

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.policy != "dense" and self.window < 1:
            raise ValueError(f"window must be at least 1 token, got {self.window}")
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
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


class StreamCache:
    """Ring-buffer caches (dense/window/sink) for every layer of a model, grouped by slot layout."""

    PREROTATE = ("dense", "window", "sink")  # policies whose buffers store keys rotated (see cache/plan.py)

    def __init__(self, config: CacheConfig, specs: list[LayerSpec], *, batch: int = 1, dtype=torch.float32,
                 device="cpu", max_context: int = 8192):
        self.config, self.device = config, torch.device(device)
        self.max_context = max_context
        self.groups: dict[tuple, RingSlots] = {}
        self.layer_group: list[tuple] = []
        self.layers: list[KVBuffer] = []
        for spec in specs:
            rotary = spec.rotary if config.policy in self.PREROTATE else None
            key = self._slots_for(spec) + (rotary,)
            sinks, window, growable, _ = key
            if key not in self.groups:
                self.groups[key] = RingSlots(sinks, window, growable=growable, name=config.policy,
                                             lazy_base=rotary is not None)
            self.layer_group.append(key)
            slots = min(256, sinks + window) if growable else sinks + window
            self.layers.append(KVBuffer(batch, spec.kv_heads, spec.head_dim, slots, dtype=dtype, device=device,
                                        max_slots=sinks + window, v_head_dim=spec.v_head_dim, rotary=rotary,
                                        sinks=sinks))

    def _slots_for(self, spec: LayerSpec) -> tuple[int, int, bool]:
        c = self.config
        if spec.sliding_window is not None:
            # The model never looks further back than its own window on this layer: a plain ring of it.
            if c.policy == "dense" or c.window + c.sinks >= spec.sliding_window:
                return (0, spec.sliding_window, False)
            return (c.sinks if c.policy in ("sink", "memory") else 0, c.window, False)
        if c.policy == "dense":
            return (0, self.max_context, True)
        if c.policy == "window":
            return (0, c.window, False)
        return (c.sinks, c.window, False)

    # --- protocol -------------------------------------------------------------------------------------
    def begin(self, n_new: int) -> list[Plan]:
        plans = {key: slots.plan(n_new, self.device) for key, slots in self.groups.items()}
        return [plans[key] for key in self.layer_group]

    def run(self, model, input_ids: torch.Tensor, *, logits: str = "last", progress=None) -> torch.Tensor:
        """Feed input_ids [batch, n] in chunks of `prefill_chunk`; logits [batch, 1 or n, vocab]."""
        n = input_ids.shape[1]
        if n == 0:
            raise EmptyInputError("empty input: there are no tokens to feed (the cache is unchanged)")
        chunk = self.chunk_size()
        outs = []
        for i in range(0, n, chunk):
            out = model(input_ids[:, i:i + chunk], self, last_only=logits == "last")
            outs.append(out)
            if progress is not None:
                progress(min(i + chunk, n), n)
        self.after_run()
        return outs[-1] if logits == "last" else torch.cat(outs, dim=1)

    def chunk_size(self) -> int:
        """Tokens per forward pass when feeding many."""
        return self.config.prefill_chunk

    def after_run(self) -> None:
        """Hook run once a `run` call has fed everything (the memory policy enforces its RAM budget)."""

    def raw_keys(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s stored keys [batch, kv_heads, slots, head_dim] as the model produced them
        (un-rotated), slot by slot: for inspection, tests and policies that need positionless keys."""
        buf, slots = self.layers[layer], self.groups[self.layer_group[layer]]
        k = buf.k[:, :, :slots.size].clone()
        if buf.rotary is None:
            return k
        S, tok = slots.sinks, slots.slot_token[:k.shape[2]]
        pos = (S + tok - slots.base).clamp(min=0).to(k.device)
        cos, sin = buf.rotary._compute(-pos, k.dtype, scaled=False)
        from ..rope import apply_rotary
        k = apply_rotary(k, cos, sin, interleaved=buf.rotary.cfg.interleaved) / buf.rotary.attention_scaling
        if S:
            k[:, :, :S] = buf.sink_k
        return k

    @property
    def seen(self) -> int:
        return next(iter(self.groups.values())).seen

    @property
    def cached(self) -> int:
        """Tokens held by the layers with the largest cache (global layers on mixed models)."""
        return max(g.filled for g in self.groups.values())

    @property
    def capacity(self) -> int | None:
        if self.config.policy == "dense":
            return self.max_context
        return max(g.size for g in self.groups.values())

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def state(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict (safetensors-ready) that `load_state` restores exactly."""
        out: dict[str, torch.Tensor] = {}
        for gi, (key, slots) in enumerate(self.groups.items()):
            out[f"group{gi}.seen"] = torch.tensor([slots.seen])
            out[f"group{gi}.base"] = torch.tensor([slots.base])
            out[f"group{gi}.slot_token"] = slots.slot_token.clone()
        for li, (layer, key) in enumerate(zip(self.layers, self.layer_group)):
            for name, t in layer.state(self.groups[key].filled).items():
                out[f"layer{li}.{name}"] = t.cpu()
        return out

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        for gi, slots in enumerate(self.groups.values()):
            slots.load_state({"seen": int(st[f"group{gi}.seen"][0]), "base": int(st[f"group{gi}.base"][0]),
                              "slot_token": st[f"group{gi}.slot_token"]})
        for li, layer in enumerate(self.layers):
            layer.load_state({k.split(".", 1)[1]: v for k, v in st.items() if k.startswith(f"layer{li}.")})


class RecomputeCache:
    """Sliding window with re-computation: the quality baseline, O(W) model work per token.

    Keeps only the last W token ids; every pass re-encodes the window ending at each wanted position
    from scratch (positions 0..W-1), exactly what a model with a W-token context would see.
    """

    def __init__(self, config: CacheConfig):
        self.config = config
        self.window = config.window
        self.history = torch.empty(1, 0, dtype=torch.long)
        self.seen = 0

    def run(self, model, input_ids: torch.Tensor, *, logits: str = "last", progress=None,
            every: int = 1) -> torch.Tensor:
        """logits="all" re-encodes one window per position (every `every`-th; others get NaN rows)."""
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
        return min(self.seen, self.window)

    @property
    def capacity(self) -> int:
        return self.window

    @property
    def nbytes(self) -> int:
        return self.history.numel() * self.history.element_size()

    def state(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "seen": torch.tensor([self.seen])}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        self.history = st["history"].clone().long()
        self.seen = int(st["seen"][0])


def make_cache(model, config: CacheConfig | None = None, *, batch: int = 1):
    """The cache a `config` asks for, shaped for `model` (its layer specs, dtype and device)."""
    config = config or CacheConfig()
    if config.policy == "recompute":
        return RecomputeCache(config)
    if config.policy == "memory":
        from .memory import MemoryCache  # imports this module
        return MemoryCache(config, model.layer_specs(), batch=batch, dtype=model.dtype, device=model.device,
                           max_context=model.max_context)
    dtype = getattr(torch, config.kv_dtype) if config.kv_dtype else model.dtype
    return StreamCache(config, model.layer_specs(), batch=batch, dtype=dtype, device=model.device,
                       max_context=model.max_context)
