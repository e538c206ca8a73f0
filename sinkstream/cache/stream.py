"""`StreamCache`: the ring-buffer policies ``dense``, ``window`` and ``sink``, one `KVBuffer` per layer.

Layers with the same slot layout share one `RingSlots` (their bookkeeping and plans); positions follow
the contract in `sinkstream.cache.plan`.
"""
from __future__ import annotations

import torch

from .config import CacheConfig, LayerSpec
from .kv import KVBuffer
from .plan import Plan, RingSlots
from .protocol import LayerCache


class StreamCache:
    """Ring-buffer caches (dense/window/sink) for every layer of a model, grouped by slot layout.

    A `PlannedCache` (cache/protocol.py): `begin` plans each pass per layer, ``layers[i]`` stores K/V.
    """

    planned = True
    PREROTATE = ("dense", "window", "sink")  # policies whose buffers store keys rotated (see cache/plan.py)

    def __init__(self, config: CacheConfig, specs: list[LayerSpec], *, batch: int = 1, dtype=torch.float32,
                 device="cpu", max_context: int = 8192):
        self.config, self.device = config, torch.device(device)
        self.max_context = max_context
        self.groups: dict[tuple, RingSlots] = {}
        self.layer_group: list[tuple] = []
        self.layers: list[LayerCache] = []  # KVBuffers (MemoryCache swaps some for MemoryLayers)
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
        """One Plan per layer for a pass of `n_new` tokens; advances `seen` by them."""
        plans = {key: slots.plan(n_new, self.device) for key, slots in self.groups.items()}
        return [plans[key] for key in self.layer_group]

    def run(self, model, input_ids: torch.Tensor, *, logits: str = "last", progress=None,
            every: int = 1) -> torch.Tensor:
        """Feed input_ids [batch, n] in chunks of `chunk_size()`; logits [batch, 1 or n, vocab].

        The passes go through the context's runner (`sinkstream.batch.runner_for`): in this thread, or
        batched with other caches' passes. Every position is scored: `every` is accepted for the
        `ModelCache` protocol and ignored."""
        from ..batch import runner_for
        return runner_for(model).run(model, self, input_ids, logits=logits, progress=progress)

    def chunk_size(self) -> int:
        """Tokens per forward pass when feeding many."""
        return self.config.prefill_chunk

    def after_run(self) -> None:
        """Hook run once a `run` call has fed everything (the memory policy enforces its RAM budget)."""

    def raw_keys(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s stored keys [batch, kv_heads, filled slots, head_dim] as the model produced them
        (un-rotated), slot by slot: for inspection, tests and policies that need positionless keys."""
        buf, slots = self.layers[layer], self.groups[self.layer_group[layer]]
        k = buf.k[:, :, :slots.filled].clone()
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
        """Tokens fed so far."""
        return next(iter(self.groups.values())).seen

    @property
    def cached(self) -> int:
        """Tokens held by the layers with the largest cache (global layers on mixed models)."""
        return max(g.filled for g in self.groups.values())

    @property
    def capacity(self) -> int | None:
        """Slots of the largest ring (dense: the model's context)."""
        if self.config.policy == "dense":
            return self.max_context
        return max(g.size for g in self.groups.values())

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's buffers."""
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
        """Restore what `state` returned, into a fresh cache of the same config and layer specs."""
        for gi, slots in enumerate(self.groups.values()):
            slots.load_state({"seen": int(st[f"group{gi}.seen"][0]), "base": int(st[f"group{gi}.base"][0]),
                              "slot_token": st[f"group{gi}.slot_token"]})
        for li, layer in enumerate(self.layers):
            layer.load_state({k.split(".", 1)[1]: v for k, v in st.items() if k.startswith(f"layer{li}.")})
