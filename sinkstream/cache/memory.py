"""Retrieval memory (the InfLLM / ReKV idea): a sink cache that can recall what has left its window.

What is kept. Exactly what ``sink(S, W)`` keeps (same ring, same slots), plus every token that leaves the
window: its un-rotated K/V go into an open *block*; a full block of ``block_size`` (B) tokens is finalized
into a `BlockStore` (CPU RAM up to ``memory_budget`` bytes, then a file on disk) and leaves behind a few
*representative keys* per kv head:

* ``representative="attention"`` (InfLLM): the ``REP_KEYS`` keys of the block that received the most
  attention while they were in the window. Attention here is softmax(q·k/√d) of un-rotated queries and keys,
  summed over queries and over the query heads of each kv head (the same distance-0 score retrieval uses);
* ``representative="mean"``: the block's mean key.

A two-level index over the blocks. Every ``SUPER_BLOCKS`` (G) consecutive finished blocks form a
*super-block*: its blocks' representative keys move to a second `BlockStore` ("pages": RAM up to
``memory_budget / PAGE_BUDGET_SHARE``, then disk) and ``SUMMARY_KEYS`` summary keys per kv head stay on the
model's device (attention: the super-block's most attended representative keys; mean: its mean key and the
block keys farthest from it, since a needle in a haystack is an outlier, not the mean). The blocks not yet
in a super-block ("recent", fewer than G + the blocks of one pass) keep their representative keys there too.

What is attended. In every pass each layer scores candidates with the queries: per query head and query, a
candidate's score is its best key (max over them) under q·k/√d, turned into a softmax over candidates; the
votes of a kv head's query heads and of the pass's last ``VOTERS`` queries are summed. Stage 1 scores the
super-block summaries and *probes* each kv head's best ``PROBES`` super-blocks (their pages are loaded only
when the probed set changes). Stage 2 scores the blocks of the probed super-blocks plus the recent blocks,
and each kv head attends to sinks + its own top-k blocks + the window (a block's K/V are copied in only when
it newly enters the selection). Prompts are fed in chunks of at most W tokens, so a question at the end of a
long prompt is not outvoted by the text before it. A block is retrievable from the first decode step after
it fills; in a pass of several tokens only blocks filled before the pass count (its early queries still see
some of its evictions in the window). A block still being filled is not retrievable, so up to B tokens just
past the window are invisible until their block is full.

Cost per step and layer, with n tokens evicted so far: stage 1 is one matmul over n / (B*G) super-blocks x
``SUMMARY_KEYS`` keys (the only part that grows: ~1,000 keys per kv head at 1M tokens with B=64, under a
millisecond of work even then); stage 2 is one matmul over at most (PROBES + 1) * G blocks' keys, and at most kv_heads *
(top_k + PROBES) blocks or pages are read per step, whatever n. RAM: block K/V and pages are bounded by the
budget plus small hot caches; what stays on the device grows only by the summaries, SUMMARY_KEYS keys per kv
head and layer per B*G tokens (1/1024 of a dense K cache at B=64: for SmolLM2 in fp32, 22.5 bytes per
token, 22 MiB per 1M tokens; a third level would bound this too, at the price of another lossy stage).

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
from dataclasses import dataclass

import torch

from . import CacheConfig, LayerSpec, StreamCache
from .blockstore import BlockStore
from .kv import KVBuffer
from .plan import Plan, RingSlots

REP_KEYS = 4       # representative keys per block and kv head, representative="attention"
VOTERS = 16        # queries of a chunk (its last ones) whose votes choose the chunk's blocks
SUPER_BLOCKS = 32  # blocks per super-block (the first level of the index)
SUMMARY_KEYS = 2   # summary keys per super-block and kv head
PROBES = 4         # super-blocks per kv head whose blocks are scored in the second stage
PAGE_BUDGET_SHARE = 8  # super-blocks' block keys may use memory_budget / 8 of RAM before spilling


@dataclass
class MemoryPlan(Plan):
    """One memory layer's plan: the group's Plan plus this pass's evictions and the retrieval plan."""
    evict_slots: torch.Tensor | None = None  # [m_old] ring slots whose tokens leave the window in this pass
    evict_src: torch.Tensor | None = None    # [m_new] new tokens of this pass that leave it within the pass
    evict_cols: torch.Tensor | None = None   # [m] view columns of those tokens (read-then-write passes only)
    blocks: int = 0                          # blocks retrievable in this pass
    extended: Plan | None = None             # plan over [view, retrieved columns]; None when blocks == 0
    layer: MemoryLayer | None = None

    def extend(self, q, k, v):
        return self.layer.extend(q, k, v, self)


class MemoryLayer:
    """One attention layer's ring (a `KVBuffer`), open block, two-level block index and retrieval buffer."""

    def __init__(self, index: int, ring: KVBuffer, config: CacheConfig, store: BlockStore, pages: BlockStore):
        # index: this layer's key in the stores (its rank among memory layers)
        self.index, self.ring, self.store, self.pages = index, ring, store, pages
        self.block_size, self.top_k = config.block_size, config.top_k
        self.by_attention = config.representative == "attention"
        self.reps_per_block = r = min(REP_KEYS, config.block_size) if self.by_attention else 1
        # enough probes that top_k blocks can always come from probed super-blocks
        self.probes = max(PROBES, -(-config.top_k // SUPER_BLOCKS) + 1)
        _, heads, slots, head_dim = ring.k.shape
        dv = ring.v.shape[-1]
        dev, dt, B, G = ring.k.device, ring.k.dtype, config.block_size, SUPER_BLOCKS
        self.scale = head_dim ** -0.5
        # attention received by each ring slot's token so far: [kv_heads, slots]
        self.acc = torch.zeros(heads, slots, device=dev) if self.by_attention else None
        self.open_k = torch.zeros(heads, B, head_dim, dtype=dt, device=dev)
        self.open_v = torch.zeros(heads, B, dv, dtype=dt, device=dev)
        self.open_acc = torch.zeros(heads, B, device=dev)
        self.open_fill = 0
        self.blocks = 0
        # Index level 2: representative keys of the blocks not yet in a super-block ("recent", at most
        # G + the blocks of one pass), and their attention received (which picks super-block summaries).
        self.recent_first = 0  # block index of recent column 0 (= supers * G)
        self.recent = torch.zeros(heads, 2 * G * r, head_dim, dtype=dt, device=dev)  # grows
        self.recent_acc = torch.zeros(heads, 2 * G * r, device=dev)
        # Index level 1: SUMMARY_KEYS keys per finished super-block (its block keys live in `pages`).
        self.supers = 0
        self.summary = torch.zeros(heads, 64 * SUMMARY_KEYS, head_dim, dtype=dt, device=dev)  # grows
        # The probed super-blocks' block keys: [kv_heads, probes * G * r, d], super-block ids per slot
        self.probed = torch.zeros(heads, self.probes * G * r, head_dim, dtype=dt, device=dev)
        self.probed_block = torch.full((heads, self.probes * G), -1, dtype=torch.long, device=dev)
        self.probed_ids = [[-1] * self.probes for _ in range(heads)]
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
        self.loads = [0, 0]  # blocks and pages copied in so far (how much the selection changes)

    # --- the per-layer protocol ---------------------------------------------------------------------
    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, plan: MemoryPlan):
        """Store this pass's K/V like a sink cache, keeping (not dropping) the tokens that leave the window."""
        parts = []
        if plan.evict_slots.numel():
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
        if self.acc is not None and plan.write_slots.numel():
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
        if plan.extended is None:
            return k, v, plan
        R = min(self.top_k, plan.blocks) * self.block_size
        self._retrieve(qg, plan.blocks, plan.n_new)
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
        """The open block is full: store its K/V, add its representative keys to the recent ones."""
        r = self.reps_per_block
        if self.by_attention:
            top = self.open_acc.topk(r, dim=1)  # [kv_heads, r]
            rep = self.open_k.gather(1, top.indices[..., None].expand(-1, -1, self.open_k.shape[-1]))
            self._add_recent(rep, top.values)
        else:
            self._add_recent(self.open_k.float().mean(1, keepdim=True).to(self.open_k.dtype), None)
        self.store.put(self.index, self.blocks, self.open_k.clone(), self.open_v.clone())
        self.blocks += 1
        self.open_fill = 0
        self.open_acc.zero_()

    def _add_recent(self, rep: torch.Tensor, acc: torch.Tensor | None) -> None:
        r, n = self.reps_per_block, self.blocks - self.recent_first
        if (n + 1) * r > self.recent.shape[1]:
            self.recent = torch.cat([self.recent, torch.zeros_like(self.recent)], 1)
            self.recent_acc = torch.cat([self.recent_acc, torch.zeros_like(self.recent_acc)], 1)
        self.recent[:, n * r:(n + 1) * r] = rep
        if acc is not None:
            self.recent_acc[:, n * r:(n + 1) * r] = acc

    def _promote(self, eligible: int) -> None:
        """Turn the oldest G recent blocks into a super-block once all of them are retrievable: their keys
        go to `pages` (RAM, then disk), and SUMMARY_KEYS keys per kv head stay here for the first stage."""
        G, r, rs = SUPER_BLOCKS, self.reps_per_block, SUMMARY_KEYS
        while self.recent_first + G <= eligible:
            page = self.recent[:, :G * r]
            if self.by_attention:  # the super-block's most attended representative keys
                top = self.recent_acc[:, :G * r].topk(rs, dim=1).indices
                summ = page.gather(1, top[..., None].expand(-1, -1, page.shape[-1]))
            else:  # the mean key, and the block keys farthest from it (a needle is an outlier, not the mean)
                mean = page.float().mean(1, keepdim=True)
                far = (page.float() - mean).norm(dim=-1).topk(rs - 1, dim=1).indices[..., None]
                summ = torch.cat([mean.to(page.dtype), page.gather(1, far.expand(-1, -1, page.shape[-1]))], 1)
            if (self.supers + 1) * rs > self.summary.shape[1]:
                self.summary = torch.cat([self.summary, torch.zeros_like(self.summary)], 1)
            self.summary[:, self.supers * rs:(self.supers + 1) * rs] = summ
            self.pages.put(self.index, self.supers, page.clone(), page.new_zeros(page.shape[0], G * r, 0))
            n = (self.blocks - self.recent_first) * r
            self.recent[:, :n - G * r] = self.recent[:, G * r:n].clone()
            self.recent_acc[:, :n - G * r] = self.recent_acc[:, G * r:n].clone()
            self.supers += 1
            self.recent_first += G

    def _retrieve(self, qg, blocks: int, chunk: int) -> None:
        """Fill ret_k/ret_v with each kv head's top-k blocks, copying in only blocks new to the selection.

        Two stages: score the super-block summaries and probe each kv head's best `probes` super-blocks;
        then score the blocks of those super-blocks and the recent blocks, and take the top k."""
        self._promote(blocks)
        r, heads, G = self.reps_per_block, qg.shape[0], SUPER_BLOCKS
        if chunk > VOTERS:  # the chunk's last queries vote: scoring cost does not grow with the chunk
            qg = qg.view(heads, -1, chunk, qg.shape[-1])[:, :, -VOTERS:].reshape(heads, -1, qg.shape[-1])
        p = min(self.probes, self.supers)
        if p:
            self._probe(qg, p)
        n_recent = self.blocks - self.recent_first
        keys = torch.cat([self.probed[:, :p * G * r], self.recent[:, :n_recent * r]], 1)
        ids = torch.cat([self.probed_block[:, :p * G],
                         torch.arange(self.recent_first, self.blocks, device=qg.device).expand(heads, -1)], 1)
        s = torch.matmul(qg, keys.transpose(1, 2)).float() * self.scale
        s = s.view(heads, qg.shape[1], -1, r).amax(-1)  # [kv_heads, g*C, candidates]
        s = s.masked_fill((ids >= blocks)[:, None], float("-inf"))  # filled during this pass
        votes = s.softmax(-1).sum(1)  # [kv_heads, candidates]
        kk = min(self.top_k, blocks)
        chosen = ids.gather(1, votes.topk(kk, dim=-1).indices).sort(-1).values.tolist()
        self._load_blocks(_reassign(self.ret_ids, chosen))

    def _probe(self, qg, p: int) -> None:
        """Stage 1: each kv head's best p super-blocks by summary score; load the block keys of new ones."""
        rs, heads = SUMMARY_KEYS, qg.shape[0]
        s = torch.matmul(qg, self.summary[:, :self.supers * rs].transpose(1, 2)).float() * self.scale
        votes = s.view(heads, qg.shape[1], self.supers, rs).amax(-1).softmax(-1).sum(1)  # [kv_heads, supers]
        self._load_pages(_reassign(self.probed_ids, votes.topk(p, dim=-1).indices.tolist()))

    def _load_pages(self, loads: list[tuple[int, int, int]]) -> None:
        """Probe slot j of kv head h <- super-block sb's block keys, for each (h, j, sb)."""
        if not loads:
            return
        self.loads[1] += len(loads)
        G, heads, dev = SUPER_BLOCKS, self.probed.shape[0], self.probed.device
        pages = {sb: self.pages.get(self.index, sb)[0] for sb in {sb for _, _, sb in loads}}
        h, j, sb = (torch.tensor(x, device=dev) for x in zip(*loads))
        keys = torch.stack([pages[s][hh] for hh, _, s in loads]).to(dev)  # [loads, G * r, d]
        self.probed.view(heads, self.probes, -1, keys.shape[-1])[h, j] = keys
        self.probed_block.view(heads, self.probes, G)[h, j] = sb[:, None] * G + torch.arange(G, device=dev)

    def _load_blocks(self, loads: list[tuple[int, int, int]]) -> None:
        """Recall slot j of kv head h <- block n's K/V, for each (h, j, n)."""
        if not loads:
            return
        self.loads[0] += len(loads)
        heads, dev = self.ret_k.shape[1], self.ret_k.device
        blocks = {n: self.store.get(self.index, n) for n in {n for _, _, n in loads}}
        h, j = (torch.tensor(x, device=dev) for x in list(zip(*loads))[:2])
        for i, buf in enumerate((self.ret_k, self.ret_v)):
            kv = torch.stack([blocks[n][i][hh] for hh, _, n in loads]).to(dev)  # [loads, B, d]
            buf[0].view(heads, self.top_k, self.block_size, kv.shape[-1])[h, j] = kv

    # --- accounting and persistence -----------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        ts = [self.open_k, self.open_v, self.open_acc, self.recent, self.recent_acc, self.summary, self.probed,
              self.probed_block]  # ret_k / ret_v are part of the ring's buffers
        if self.acc is not None:
            ts.append(self.acc)
        return self.ring.nbytes + sum(t.numel() * t.element_size() for t in ts)

    def state(self, used: int) -> dict[str, torch.Tensor]:
        r, n, f, rs = self.reps_per_block, self.blocks, self.open_fill, SUMMARY_KEYS
        out = self.ring.state(used)
        blocks = [self.store.get(self.index, i) for i in range(n)]
        n_recent = (n - self.recent_first) * r
        reps = [self.pages.get(self.index, s)[0] for s in range(self.supers)] + [self.recent[:, :n_recent]]
        out.update(open_k=self.open_k[:, :f].clone(), open_v=self.open_v[:, :f].clone(),
                   open_acc=self.open_acc[:, :f].clone(), reps=torch.cat([t.to(self.recent) for t in reps], 1),
                   recent_acc=self.recent_acc[:, :n_recent].clone(),
                   summary=self.summary[:, :self.supers * rs].clone(),
                   blocks_k=torch.stack([b[0] for b in blocks]) if blocks else
                   torch.zeros(0, *self.store.k_shape, dtype=self.store.dtype),
                   blocks_v=torch.stack([b[1] for b in blocks]) if blocks else
                   torch.zeros(0, *self.store.v_shape, dtype=self.store.dtype))
        if self.acc is not None:
            out["acc"] = self.acc.clone()
        # which slot holds which recalled block / probed super-block (slot order is part of the positions)
        out["ret_ids"], out["probed_ids"] = torch.tensor(self.ret_ids), torch.tensor(self.probed_ids)
        return {k: t.cpu() for k, t in out.items()}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        """Restore into a fresh layer (its stores empty)."""
        G, r, rs = SUPER_BLOCKS, self.reps_per_block, SUMMARY_KEYS
        self.ring.load_state(st)
        f = st["open_k"].shape[1]
        self.open_k[:, :f] = st["open_k"].to(self.open_k)
        self.open_v[:, :f] = st["open_v"].to(self.open_v)
        self.open_acc.zero_()
        self.open_acc[:, :f] = st["open_acc"].to(self.open_acc)
        self.open_fill = f
        if self.acc is not None and "acc" in st:
            self.acc.copy_(st["acc"])
        n, supers = st["blocks_k"].shape[0], st["summary"].shape[1] // rs
        for i in range(n):
            self.store.put(self.index, i, st["blocks_k"][i], st["blocks_v"][i])
        reps = st["reps"].to(self.recent)
        for s in range(supers):
            page = reps[:, s * G * r:(s + 1) * G * r]
            self.pages.put(self.index, s, page, page.new_zeros(page.shape[0], G * r, 0))
        self.summary = self.summary.new_zeros(self.summary.shape[0], max(64, 2 * supers) * rs,
                                              self.summary.shape[2])
        self.summary[:, :supers * rs] = st["summary"].to(self.summary)
        recent = reps[:, supers * G * r:]
        m = max(2 * G * r, 2 * recent.shape[1])
        self.recent = self.recent.new_zeros(self.recent.shape[0], m, self.recent.shape[2])
        self.recent_acc = self.recent_acc.new_zeros(self.recent_acc.shape[0], m)
        self.recent[:, :recent.shape[1]] = recent
        self.recent_acc[:, :recent.shape[1]] = st["recent_acc"].to(self.recent_acc)
        self.blocks, self.supers, self.recent_first = n, supers, supers * G
        self.probed_ids, self.ret_ids = st["probed_ids"].tolist(), st["ret_ids"].tolist()
        self.probed_block.fill_(-1)
        for ids, load in ((self.probed_ids, self._load_pages), (self.ret_ids, self._load_blocks)):
            load([(h, j, x) for h, row in enumerate(ids) for j, x in enumerate(row) if x >= 0])


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
        self.store, self.pages = self._new_stores(specs)
        for j, i in enumerate(self.memory_layers):  # stores are keyed by j, the memory layer's rank
            self.layers[i] = MemoryLayer(j, self.layers[i], config, self.store, self.pages)

    def _new_stores(self, specs) -> tuple[BlockStore, BlockStore]:
        """Block K/V, and the super-blocks' block keys (index level 2, "pages"), each RAM then disk."""
        c = self.config
        if not self.memory_layers:
            empty = lambda: BlockStore(0, 1, c.block_size, 1, 1, dtype=torch.float32)
            return empty(), empty()
        spec, n = specs[self.memory_layers[0]], len(self.memory_layers)
        page = SUPER_BLOCKS * (min(REP_KEYS, c.block_size) if c.representative == "attention" else 1)
        probes = max(PROBES, -(-c.top_k // SUPER_BLOCKS) + 1)
        # hot caches of top_k blocks / `probes` pages per layer (what is recalled is held in ret_k/probed)
        store = BlockStore(n, spec.kv_heads, c.block_size, spec.head_dim, spec.v_head_dim or spec.head_dim,
                           dtype=self.kv_dtype, budget=c.memory_budget, directory=c.memory_dir,
                           hot_blocks=c.top_k * n)
        pages = BlockStore(n, spec.kv_heads, page, spec.head_dim, 0, dtype=self.kv_dtype,
                           budget=None if c.memory_budget is None else c.memory_budget // PAGE_BUDGET_SHARE,
                           directory=c.memory_dir, hot_blocks=probes * n)
        return store, pages

    @property
    def blocks(self) -> int:
        """Blocks of evicted tokens in memory (per layer)."""
        return self.layers[self.memory_layers[0]].blocks if self.memory_layers else 0

    def begin(self, n_new: int) -> list[Plan]:
        if not self.memory_layers:
            return super().begin(n_new)
        self.store.enforce_budget()  # between passes every layer holds the same blocks
        self.pages.enforce_budget()
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
        common = {f.name: getattr(base, f.name) for f in dataclasses.fields(Plan)}
        common.update(evict_slots=evict_slots.to(dev), evict_src=new.to(dev), evict_cols=evict_cols,
                      blocks=blocks, extended=extended)
        for i in self.memory_layers:
            plans[i] = MemoryPlan(**common, layer=self.layers[i])
        return plans

    def _extended(self, base: Plan, ring: RingSlots, blocks: int) -> Plan:
        """The plan over [view, R retrieved columns]: positions as in the module docstring."""
        S, R, dev = ring.sinks, min(self.config.top_k, blocks) * self.config.block_size, self.device
        t = torch.arange(base.start, base.start + base.n_new)
        o = ring.oldest(t)
        tok = base.k_tokens
        window = (tok >= S).to(dev)
        q_pos = base.q_pos + R
        q_sink = (S + R + t - o).to(dev)
        q_pos_sink = None if bool((q_sink == q_pos).all()) else q_sink
        retrieved = torch.ones(R, dtype=torch.bool, device=dev)
        return Plan(n_new=base.n_new, start=base.start, write_first=base.write_first, read_len=base.read_len,
                    write_slots=base.write_slots, write_src=base.write_src, capacity=base.capacity,
                    k_tokens=torch.cat([tok, torch.full((R,), -1, dtype=tok.dtype)]),
                    k_pos=torch.cat([base.k_pos + R * window, S + torch.arange(R, device=dev)]),
                    q_pos=q_pos, q_pos_sink=q_pos_sink,
                    sink_cols=None if q_pos_sink is None else torch.cat([~window, retrieved]),
                    mask=None if base.mask is None else
                    torch.cat([base.mask, retrieved.expand(base.n_new, R)], dim=1))

    # --- protocol -------------------------------------------------------------------------------------
    def chunk_size(self) -> int:
        """At most the window: a chunk's queries share one retrieval, and a question at the end of a long
        chunk would be outvoted by the text before it."""
        return max(1, min(self.config.prefill_chunk, self.config.window))

    def after_run(self) -> None:
        self.store.enforce_budget()  # also at the end, so an idle session sits within its budget
        self.pages.enforce_budget()

    @property
    def cached(self) -> int:
        return super().cached + min(self.config.top_k, self.blocks) * self.config.block_size

    @property
    def capacity(self) -> int:
        return super().capacity + self.config.top_k * self.config.block_size

    @property
    def nbytes(self) -> int:
        """Bytes in RAM / on the device: rings, representative keys, retrieval buffers, RAM-held blocks."""
        return super().nbytes + self.store.nbytes + self.pages.nbytes

    @property
    def disk_bytes(self) -> int:
        return self.store.disk_bytes + self.pages.disk_bytes

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        """Restore `state()`: ring buffers as `StreamCache` does, memory blocks into a fresh store."""
        self.store.close()
        self.pages.close()
        self.store, self.pages = self._new_stores(self.specs)
        for i in self.memory_layers:
            self.layers[i].store, self.layers[i].pages = self.store, self.pages
        super().load_state(st)
        self.store.enforce_budget()
        self.pages.enforce_budget()


def _reassign(slots: list[list[int]], chosen: list[list[int]]) -> list[tuple[int, int, int]]:
    """Per head, put the chosen ids into slots[h][:len(chosen[h])] by set, not by order: an id already in a
    slot stays there (nothing to load); the others take the slots of ids no longer chosen. Returns the
    (head, slot, id) loads to do; `slots` is updated."""
    loads = []
    for h, row in enumerate(chosen):
        have, k = slots[h], len(row)
        new = [x for x in row if x not in have[:k]]
        for j in range(k):
            if new and have[j] not in row:
                have[j] = new.pop(0)
                loads.append((h, j, have[j]))
    return loads
