"""Retrieval memory (the InfLLM / ReKV idea): a sink cache that can recall what has left its window.

What is kept. Exactly what ``sink(S, W)`` keeps (same ring, same slots), plus every token that leaves the
window: its un-rotated K/V go into an open *block*; a full block of ``block_size`` (B) tokens is finalized
into a `BlockStore` (CPU RAM up to ``memory_budget`` bytes, then a file on disk) and leaves behind a few
*representative keys* per kv head:

* ``representative="attention"`` (InfLLM): the ``REP_KEYS`` keys of the block that received the most
  attention while they were in the window. Attention here is softmax(q·k/√d) of un-rotated queries and keys,
  summed over queries and over the query heads of each kv head (the same distance-0 score retrieval uses);
* ``representative="mean"``: the block's mean key.

Which blocks are recalled: `sinkstream.cache.memory_index`, a tree of key summaries. Finished blocks'
representative keys are grouped by ``SUPER_BLOCKS`` (G) into super-blocks, super-blocks by ``UPPER_GROUP``
into the next level, and so on; a grouped run's keys go to a page store (RAM up to
``memory_budget / PAGE_BUDGET_SHARE``, then disk) and ``SUMMARY_KEYS`` summary keys per kv head go up a
level. In every pass each layer walks the tree from the top with the stream's last ``VOTERS`` queries (a
decode step's own query and the 15 before it; a long chunk's last 16): per level each kv head probes its
best ``PROBES`` entries, whose pages compete with the level's not-yet-grouped entries one level down, and at the bottom each kv head takes its own top-k blocks; it
attends to sinks + those blocks + the window (a block's K/V are copied in only when it newly enters the
selection). Prompts are fed in chunks of at most W tokens, so a question at the end of a long prompt is
not outvoted by the text before it. A block is retrievable from the first decode step after it fills; in
a pass of several tokens only blocks filled before the pass count (its early queries still see some of its
evictions in the window). A block still being filled is not retrievable, so up to B tokens just past the
window are invisible until their block is full.

Cost per step and layer, whatever the stream length n: each level scores at most PROBES pages plus fewer
than two groups of recent entries (a decode step scores only its own query against them while they stay
the same: the other voters' scores are kept), and at most kv_heads * (top_k + PROBES * levels) blocks or
pages are read; there are about 1 + log_64(n / 2048) levels (a third after 131K tokens with B = 64, a fourth
after 8.4M). RAM: block K/V and pages are bounded by the budget plus small hot caches, and the index keeps O(levels * G)
keys on the device, so RAM stays bounded (up to that logarithm) however long the stream.

Positions (extending the contract of `sinkstream.cache.plan`). Retrieved blocks are treated like more
sinks: with ``R = k*B`` retrieved columns, sink ``s`` sits at ``s``, retrieved column ``j`` at ``S + j`` (a
kv head's blocks in the order of its recall slots: a block keeps its slot while it stays recalled, so blocks
are in stream order until one is dropped; tokens in order within a block), and the window is shifted right by
R: window token ``u`` at ``S + R + u - b``, the query at ``S + R + t - b``. Retrieved columns use the sink
query rotation ``S + R + t - o_t``, so every query sees all of memory just past its window (InfLLM gives all
memory the distance of the window) and a chunk's query matches token-by-token decoding whenever both recall
the same blocks. Positions stay below ``S + k*B + W + C`` for ever. With no block finalized yet nothing is
added: ``memory`` attends exactly as ``sink`` does.

How it plugs in. Model code is unchanged: `MemoryCache.begin` hands each memory layer a `MemoryPlan`;
``kv.update(k, v, plan)`` stores K/V in the ring and collects the tokens it evicts; ``attend`` calls
``plan.extend(q, k, v)``, where the layer, now holding the queries, scores its blocks and returns the view
with the retrieved blocks appended plus the extended plan (built once per pass, shared by all layers).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from .blockstore import BlockStore, fsync_dir
from .config import CacheConfig, LayerSpec
from .kv import KVBuffer
from .memory_index import BlockIndex, Voters, _reassign, level_shape
from .plan import Plan, RingSlots
from .stream import StreamCache

REP_KEYS = 4       # representative keys per block and kv head, representative="attention"
PAGE_BUDGET_SHARE = 8  # super-blocks' block keys may use memory_budget / 8 of RAM before spilling


def _rep_width(config: CacheConfig) -> int:
    """Representative keys per block and kv head."""
    return min(REP_KEYS, config.block_size) if config.representative == "attention" else 1


@dataclass
class MemoryPlan(Plan):
    """One memory layer's plan: the group's Plan plus this pass's evictions and the retrieval plan."""
    evict_slots: torch.Tensor | None = None  # [m_old] ring slots whose tokens leave the window in this pass
    evict_src: torch.Tensor | None = None    # [m_new] new tokens of this pass that leave it within the pass
    evict_cols: torch.Tensor | None = None   # [m] view columns of those tokens (read-then-write passes only)
    evict_one: int | None = None             # a decode step evicting one token: its slot
    blocks: int = 0                          # blocks retrievable in this pass
    extended: Plan | None = None             # plan over [view, retrieved columns]; None when blocks == 0
    layer: MemoryLayer | None = None
    extends_view: ClassVar[bool] = True

    def extend(self, q, k, v):
        return self.layer.extend(q, k, v, self)


class MemoryLayer:
    """One attention layer's ring (a `KVBuffer`), open block, two-level block index and retrieval buffer."""

    def __init__(self, index: int, ring: KVBuffer, config: CacheConfig, store: BlockStore, page_store):
        # index: this layer's key in the stores (its rank among memory layers); page_store(level) -> BlockStore
        self.index, self.ring, self.store = index, ring, store
        self.block_size, self.top_k = config.block_size, config.top_k
        self.by_attention = config.representative == "attention"
        self.reps_per_block = r = _rep_width(config)
        _, heads, slots, head_dim = ring.k.shape
        dv = ring.v.shape[-1]
        dev, dt, B = ring.k.device, ring.k.dtype, config.block_size
        self.scale = head_dim ** -0.5
        # attention received by each ring slot's token so far: [kv_heads, slots]
        self.acc = torch.zeros(heads, slots, device=dev) if self.by_attention else None
        self.open_k = torch.zeros(heads, B, head_dim, dtype=dt, device=dev)
        self.open_v = torch.zeros(heads, B, dv, dtype=dt, device=dev)
        self.open_acc = torch.zeros(heads, B, device=dev)
        self.open_fill = 0
        self.index_tree = BlockIndex(index, heads, head_dim, width=r, top_k=self.top_k,
                                     by_attention=self.by_attention, page_store=page_store, dtype=dt, device=dev)
        # what is currently retrieved: [1, kv_heads, top_k * B, d] and the block index in each (head, slot).
        # It lives in extra slots at the end of the ring's own buffers, so a decode step's view (the full
        # ring) and the recalled blocks are one contiguous slice: nothing is concatenated per step.
        self.ring_slots = slots
        for name in ("k", "v"):
            buf = getattr(ring, name)
            setattr(ring, name, torch.cat([buf, buf.new_zeros(*buf.shape[:2], self.top_k * B, buf.shape[3])], 2))
        self.ret_k, self.ret_v = ring.k[:, :, slots:], ring.v[:, :, slots:]
        self.ret_ids = [[-1] * self.top_k for _ in range(heads)]
        self.pending = None  # (k [kv_heads, m, d], v, acc [kv_heads, m]) evicted in this pass
        self.voters = Voters()  # the stream's last queries, which choose what is recalled
        self.block_loads = 0  # blocks copied into the recall buffers so far (how much the selection changes)

    @property
    def blocks(self) -> int:
        return self.index_tree.blocks

    @property
    def loads(self) -> tuple[int, int]:
        """Blocks and index pages copied in so far."""
        return self.block_loads, self.index_tree.page_loads

    # --- the per-layer protocol ---------------------------------------------------------------------
    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, plan: MemoryPlan):
        """Store this pass's K/V like a sink cache, keeping (not dropping) the tokens that leave the window."""
        parts = []
        if plan.evict_one is not None:  # a decode step: file the token now, before its slot is overwritten
            s = slice(plan.evict_one, plan.evict_one + 1)  # (its query does not see it: nothing to add)
            acc = self.acc[:, s] if self.acc is not None else None
            self._file(self.ring.k[0][:, s], self.ring.v[0][:, s], acc)
        elif plan.evict_slots.numel():
            s = plan.evict_slots
            parts.append((self.ring.k[0][:, s], self.ring.v[0][:, s],
                          self.acc[:, s] if self.acc is not None else None))
        if plan.evict_src.numel():
            i = plan.evict_src
            parts.append((k_new[0][:, i], v_new[0][:, i],
                          torch.zeros(k_new.shape[1], i.numel(), device=k_new.device) if self.acc is not None
                          else None))
        if len(parts) == 1:
            self.pending = parts[0]
        elif parts:
            self.pending = (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1),
                            None if self.acc is None else torch.cat([p[2] for p in parts], 1))
        view = self.ring.update(k_new, v_new, plan)
        if self.acc is not None and plan.decode_slot is not None:
            self.acc[:, plan.decode_slot] = 0
        elif self.acc is not None and plan.write_slots.numel():
            self.acc[:, plan.write_slots] = 0
        return view

    def extend(self, q, k, v, plan: MemoryPlan):
        """Called by `attend` with this pass's queries: update attention received, file evictions, retrieve."""
        heads = k.shape[1]
        # q: [1, heads * g, C, d] -> [kv_heads, g * C, d], query heads grouped by the kv head they read
        qg = q[0].reshape(heads, -1, q.shape[-1])
        if self.acc is not None:
            self._accumulate(qg, k, plan)
        if self.pending is not None:
            self._file(*self.pending)
            self.pending = None
        fresh = self.voters.add(qg, plan.n_new)
        if plan.extended is None:
            return k, v, plan
        R = min(self.top_k, plan.blocks) * self.block_size
        self._retrieve(plan.blocks, fresh)
        n = self.ring_slots
        if k.shape[2] == n and k.data_ptr() == self.ring.k.data_ptr():  # the whole ring (decode): one slice
            return self.ring.k[:, :, :n + R], self.ring.v[:, :, :n + R], plan.extended
        return (torch.cat([k, self.ret_k[:, :, :R]], dim=2), torch.cat([v, self.ret_v[:, :, :R]], dim=2),
                plan.extended)

    # --- internals ----------------------------------------------------------------------------------
    def _accumulate(self, qg, k, plan: MemoryPlan) -> None:
        s = torch.matmul(qg, k[0].transpose(1, 2)).float() * self.scale  # [kv_heads, g*C, Lk]
        if plan.mask is not None:
            g = qg.shape[1] // plan.mask.shape[0]
            s = s.masked_fill(~plan.mask.repeat(g, 1), float("-inf"))
        p = s.softmax(-1).sum(1)  # [kv_heads, Lk]
        n = plan.read_len
        self.acc[:, :n] += p[:, :n]
        if not plan.write_first:
            # view = old ring [:n] + new tokens; overwritten slots now hold new tokens (acc reset in update)
            if plan.write_slots.numel():
                self.acc[:, plan.write_slots] = p[:, n + plan.write_src]
            if self.pending is not None:
                self.pending[2].add_(p[:, plan.evict_cols])

    def _file(self, k, v, acc) -> None:
        """Append evicted tokens (in stream order) to the open block, finalizing each full block."""
        B, m, i = self.block_size, k.shape[1], 0
        while i < m:
            take = min(B - self.open_fill, m - i)
            sl = slice(self.open_fill, self.open_fill + take)
            self.open_k[:, sl] = k[:, i:i + take]
            self.open_v[:, sl] = v[:, i:i + take]
            if acc is not None:
                self.open_acc[:, sl] = acc[:, i:i + take]
            self.open_fill += take
            i += take
            if self.open_fill == B:
                self._finalize()

    def _finalize(self) -> None:
        """The open block is full: store its K/V, give its representative keys to the index."""
        r = self.reps_per_block
        if self.by_attention:
            top = self.open_acc.topk(r, dim=1)  # [kv_heads, r]
            rep = self.open_k.gather(1, top.indices[..., None].expand(-1, -1, self.open_k.shape[-1]))
            self.index_tree.add_block(rep, top.values)
        else:
            self.index_tree.add_block(self.open_k.float().mean(1, keepdim=True).to(self.open_k.dtype), None)
        self.store.put(self.index, self.blocks - 1, self.open_k.clone(), self.open_v.clone())
        self.open_fill = 0
        self.open_acc.zero_()

    def _retrieve(self, blocks: int, fresh: slice | None) -> None:
        """Fill ret_k/ret_v with each kv head's top-k blocks, copying in only blocks new to the selection."""
        chosen = self.index_tree.select(self.voters.current(), blocks, self.top_k, fresh)
        self._load_blocks(_reassign(self.ret_ids, chosen))

    def _load_blocks(self, loads: list[tuple[int, int, int]]) -> None:
        """Recall slot j of kv head h <- block n's K/V, for each (h, j, n)."""
        if not loads:
            return
        self.block_loads += len(loads)
        B = self.block_size
        blocks = {n: self.store.get(self.index, n) for n in {n for _, _, n in loads}}
        for h, j, n in loads:
            self.ret_k[0, h, j * B:(j + 1) * B] = blocks[n][0][h]
            self.ret_v[0, h, j * B:(j + 1) * B] = blocks[n][1][h]

    # --- accounting and persistence -----------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        ts = [self.open_k, self.open_v, self.open_acc]  # ret_k / ret_v are part of the ring's buffers
        if self.acc is not None:
            ts.append(self.acc)
        return self.ring.nbytes + sum(t.numel() * t.element_size() for t in ts) + self.index_tree.nbytes()

    def state(self, used: int) -> dict[str, torch.Tensor]:
        """Ring, open block, the index's unpaged keys, recall slots and voters: no finished block or index
        page (those are in the stores, which `MemoryCache.write_log` makes durable)."""
        f = self.open_fill
        out = self.ring.state(used)
        out.update(open_k=self.open_k[:, :f].clone(), open_v=self.open_v[:, :f].clone(),
                   open_acc=self.open_acc[:, :f].clone())
        out.update(self.index_tree.state())
        if self.acc is not None:
            out["acc"] = self.acc.clone()
        # which slot holds which recalled block (slot order is part of the positions)
        out["ret_ids"] = torch.tensor(self.ret_ids)
        out.update(self.voters.state())
        return {k: t.cpu() for k, t in out.items()}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        """Restore into a fresh layer whose stores hold the state's blocks and pages (`MemoryCache.open_log`)."""
        if "index0_count" not in st:
            raise ValueError("this memory state was saved by an older sinkstream (blocks inside the state)")
        if int(st["index0_count"]) != self.store.count[self.index]:
            raise ValueError(f"this memory state has {int(st['index0_count'])} blocks, the block store "
                             f"{self.store.count[self.index]}: open the state's block log first")
        self.ring.load_state(st)
        f = st["open_k"].shape[1]
        self.open_k[:, :f] = st["open_k"].to(self.open_k)
        self.open_v[:, :f] = st["open_v"].to(self.open_v)
        self.open_acc.zero_()
        self.open_acc[:, :f] = st["open_acc"].to(self.open_acc)
        self.open_fill = f
        if self.acc is not None and "acc" in st:
            self.acc.copy_(st["acc"])
        self.index_tree.load_state(st)
        self.ret_ids = st["ret_ids"].tolist()
        self.voters.load_state(st, self.ring.k)
        self._load_blocks([(h, j, x) for h, row in enumerate(self.ret_ids) for j, x in enumerate(row) if x >= 0])


class MemoryCache(StreamCache):
    """``sink(S, W)`` plus a retrieval memory of evicted blocks on every global attention layer.

    Layers with the model's own sliding window never look past it and stay plain ring buffers.
    """

    def __init__(self, config: CacheConfig, specs: list[LayerSpec], *, batch: int = 1, dtype=torch.float32,
                 device="cpu", max_context: int = 8192):
        if batch != 1:
            raise ValueError("the memory cache serves one stream (batch 1)")
        super().__init__(config, specs, batch=batch, dtype=dtype, device=device, max_context=max_context)
        self.specs, self.kv_dtype = specs, dtype
        self.memory_layers = [i for i, s in enumerate(specs) if s.sliding_window is None]
        self.memory_key = self.layer_group[self.memory_layers[0]] if self.memory_layers else None
        self.store, self.page_stores = self._new_block_store(), {}
        self.log_folder = None  # the block log this cache appends to (`write_log`, `open_log`)
        for j, i in enumerate(self.memory_layers):  # stores are keyed by j, the memory layer's rank
            self.layers[i] = MemoryLayer(j, self.layers[i], config, self.store, self._page_store)

    def _new_block_store(self) -> BlockStore:
        """Block K/V: RAM up to the budget, then disk; a hot cache of top_k blocks per layer (what is
        recalled is held in the recall buffers anyway)."""
        c = self.config
        if not self.memory_layers:
            return BlockStore(0, 1, c.block_size, 1, 1, dtype=torch.float32)
        spec, n = self.specs[self.memory_layers[0]], len(self.memory_layers)
        return BlockStore(n, spec.kv_heads, c.block_size, spec.head_dim, spec.v_head_dim or spec.head_dim,
                          dtype=self.kv_dtype, budget=c.memory_budget, directory=c.memory_dir, hot_blocks=c.top_k * n,
                          name="blocks")

    def _page_store(self, level: int) -> BlockStore:
        """The pages of index level `level` (`memory_index`), shared by the memory layers, created on first
        use: level 0's pages are super-blocks' block keys (budget / PAGE_BUDGET_SHARE), the levels above
        hold summary keys only and get a 16th of that each."""
        if level not in self.page_stores:
            c = self.config
            spec, n = self.specs[self.memory_layers[0]], len(self.memory_layers)
            keys, group, probes = level_shape(level, _rep_width(c), c.top_k)
            share = PAGE_BUDGET_SHARE if level == 0 else 16 * PAGE_BUDGET_SHARE
            self.page_stores[level] = BlockStore(
                n, spec.kv_heads, keys * group, spec.head_dim, 0, dtype=self.kv_dtype,
                budget=None if c.memory_budget is None else c.memory_budget // share,
                directory=c.memory_dir, hot_blocks=probes * n, name=f"pages{level}")
        return self.page_stores[level]

    def _stores(self) -> list[BlockStore]:
        return [self.store, *self.page_stores.values()]

    @property
    def blocks(self) -> int:
        """Blocks of evicted tokens in memory (per layer)."""
        return self.layers[self.memory_layers[0]].blocks if self.memory_layers else 0

    def begin(self, n_new: int) -> list[Plan]:
        if not self.memory_layers:
            return super().begin(n_new)
        for st in self._stores():  # between passes every layer holds the same blocks
            st.enforce_budget()
        ring: RingSlots = self.groups[self.memory_key]
        S, W, t0 = ring.sinks, ring.window, ring.seen
        # tokens leaving the window in this pass: [lo, hi); those before t0 sit in ring slots
        lo, hi = max(S, t0 - W), max(S, t0 + n_new - W)
        old = torch.arange(lo, max(lo, min(hi, t0)))
        new = torch.arange(max(lo, t0), max(lo, t0, hi)) - t0
        plans = super().begin(n_new)
        base = plans[self.memory_layers[0]]
        dev = self.device
        evict_slots = ring.slot_of(old)
        evict_cols = None if base.write_first else torch.cat([evict_slots, base.read_len + new]).to(dev)
        # A decode step's evicted token is already out of its query's window: its block may be recalled at
        # once. A longer pass still shows some of its evictions to its early queries: only older blocks.
        blocks = (hi if base.write_first else lo) - S
        blocks = blocks // self.config.block_size
        extended = self._extended(base, ring, blocks) if blocks else None
        # every field the base plan was built from (a subclass, so not `replace`); max_pos is derived again
        common = {f.name: getattr(base, f.name) for f in dataclasses.fields(Plan) if f.init}
        common.update(evict_slots=evict_slots.to(dev), evict_src=new.to(dev), evict_cols=evict_cols,
                      evict_one=int(evict_slots[0]) if n_new == 1 and evict_slots.numel() == 1 else None,
                      blocks=blocks, extended=extended)
        for i in self.memory_layers:
            plans[i] = MemoryPlan(**common, layer=self.layers[i])
        return plans

    def _extended(self, base: Plan, ring: RingSlots, blocks: int) -> Plan:
        """The plan over [view, R retrieved columns]: positions as in the module docstring (built on the
        host, like every plan's positions; only the masks go to the device)."""
        S, R, dev = ring.sinks, min(self.config.top_k, blocks) * self.config.block_size, self.device
        t = torch.arange(base.start, base.start + base.n_new)
        o = ring.oldest(t)
        tok = base.k_tokens
        window = tok >= S
        q_pos = base.q_pos + R
        q_sink = S + R + t - o
        q_pos_sink = None if bool((q_sink == q_pos).all()) else q_sink
        retrieved = torch.ones(R, dtype=torch.bool)
        on_dev = (lambda x: x.to(dev, non_blocking=True))
        return dataclasses.replace(
            base, k_tokens=torch.cat([tok, torch.full((R,), -1, dtype=tok.dtype)]),
            k_pos=torch.cat([base.k_pos + R * window, S + torch.arange(R)]),
            q_pos=q_pos, q_pos_sink=q_pos_sink,
            new_pos=None if base.new_pos is None else base.new_pos + R * (t >= S),
            sink_cols=None if q_pos_sink is None else on_dev(torch.cat([~window, retrieved])),
            mask=None if base.mask is None else torch.cat([base.mask, on_dev(retrieved).expand(base.n_new, R)], 1))

    # --- protocol -------------------------------------------------------------------------------------
    def chunk_size(self) -> int:
        """At most the window: a chunk's queries share one retrieval, and a question at the end of a long
        chunk would be outvoted by the text before it."""
        return max(1, min(self.config.prefill_chunk, self.config.window))

    def after_run(self) -> None:
        for st in self._stores():  # also at the end, so an idle session sits within its budget
            st.enforce_budget()

    @property
    def cached(self) -> int:
        return super().cached + min(self.config.top_k, self.blocks) * self.config.block_size

    @property
    def capacity(self) -> int:
        return super().capacity + self.config.top_k * self.config.block_size

    @property
    def nbytes(self) -> int:
        """Bytes in RAM / on the device: rings, representative keys, retrieval buffers, RAM-held blocks."""
        return super().nbytes + sum(st.nbytes for st in self._stores())

    @property
    def disk_bytes(self) -> int:
        return sum(st.disk_bytes for st in self._stores())

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        """Restore `state()` into a fresh cache: ring buffers as `StreamCache` does; blocks and index pages
        are read from the block log `open_log` opened (a state saved before any block needs none)."""
        super().load_state(st)
        for store in self._stores():
            store.enforce_budget()

    # --- the block log: a saved session's blocks and index pages, appended to as the stream goes -------
    def write_log(self, folder: str | os.PathLike | None = None, *, bind: bool = True) -> dict[str, dict]:
        """Make every finished block and index page durable (written and fsync'd, see `BlockStore`) and
        return what a session file records with `state()`: per store, the committed count and CRC digest.

        ``folder=None``: append what is new to this cache's log, O(new blocks). A folder (a new one): write
        a complete log there, copying this cache's log; with ``bind`` it becomes this cache's log."""
        if folder is None and self.log_folder is None:
            raise ValueError("this cache has no block log yet: write one to a folder")
        target = self.log_folder if folder is None else Path(folder)
        if folder is not None:
            target.mkdir(parents=True, mode=0o700)
        # a page store that appeared since the last save starts its files in the log folder
        out = {st.name: st.write_log(target if folder is not None or st.log is None else None, bind=bind)
               for st in self._stores()}
        fsync_dir(target)
        if folder is not None and bind:
            self.log_folder = target
        return out

    def open_log(self, folder: str | os.PathLike, stores: dict[str, dict]) -> None:
        """Read blocks and index pages from the committed log in `folder` (`stores`: what `write_log`
        returned), and append to it from now on; nothing is read into RAM. Call on a fresh cache, before
        `load_state`. Raises ValueError if the log is missing or damaged."""
        folder = Path(folder)
        for store in self._stores():
            store.close()
        self.store, self.page_stores = self._new_block_store(), {}
        for i in self.memory_layers:
            self.layers[i].store = self.store
        try:
            for name, state in stores.items():
                if name == "blocks":
                    self.store.open_log(folder, state)
                elif name.startswith("pages") and self.memory_layers:
                    self._page_store(int(name[5:])).open_log(folder, state)
                else:
                    raise ValueError(f"unknown store {name!r} in the block log")
        except OSError as e:
            raise ValueError(f"block log {folder} cannot be read: {e}") from None
        self.log_folder = folder
