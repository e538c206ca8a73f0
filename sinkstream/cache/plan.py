"""Which cached key sits in which buffer slot, at which position it is attended, and where RoPE is applied.
Written down once, here; `sinkstream.rope`, `sinkstream.attention` and the caches point to it.

Position contract (the StreamingLLM re-indexing, Xiao et al. §3.2):

* Stream token ``u`` (0, 1, 2, ... for ever) is stored in slot ``u`` if ``u < S`` (a sink, kept for ever)
  and otherwise in ring slot ``S + (u - S) % W``. The slot is a pure function of ``u``.
* When token ``t`` is the query, it sees the sinks ``0..S-1`` and the window ``o_t..t`` where
  ``o_t = max(S, t - W + 1)``: at most ``S + W`` keys, itself included.
* Positions are assigned *inside the cache*: sink ``s`` sits at ``s``, window token ``u`` at ``S + u - o_t``
  and the query at ``S + t - o_t``. Nothing ever sits beyond ``S + W - 1``, however long the stream.
* Where RoPE is applied (one `sinkstream.rope.Rotary` per model does all of it). Queries: always at attention
  time, to ``q_pos`` (and ``q_pos_sink``). Keys depend on the policy:

  - ``dense``, ``window``, ``sink`` store keys *rotated*: each new key is rotated once when written, at
    ``new_pos`` (cache/kv.py), so a decode step rotates one key, not the whole cache. The sinks' positions
    change with every pass, so their un-rotated keys are kept aside and rotated into slots ``0..S-1`` each
    pass (at ``sink_pos``). ``keys_rotated`` is True and `attend` leaves the view's keys alone. The window
    keys' positions are fixed by an offset (the "rotation offset" below), re-based once per W tokens.
  - ``memory`` stores keys *un-rotated* (its blocks are scored and recalled without positions) and
    `attend` rotates every key of the view to ``k_pos`` each pass; so does every cache on a layer without
    a rotary module. ``recompute`` keeps no keys: it re-encodes its window from scratch every pass.

  Either way a key attended by a query sits at the same position *difference* from it, which is all RoPE
  scores depend on.

A chunk of ``C`` new tokens is processed in one forward pass with the same result as ``C`` single steps:
each query gets a banded mask (its own sinks + window), window keys are placed at ``S + u - b`` with
``b = o_{t0}`` of the chunk's first query (relative distances ``t - u`` are then exact for every query),
and because the sink distance ``S + t - o_t - s`` differs between queries once the ring is full, queries are
rotated a second time, at ``S + t - o_t``, for the sink columns (``q_pos_sink``). Positions in a chunk stay
below ``S + W + C``.

``dense`` is the same with ``S = 0`` and ``W`` = the model's context (an error once it is full); ``window``
is ``S = 0``.

Rotation offset. RoPE scores depend only on the difference of the query's and the key's positions, so every
position above may carry one common offset: the Plan places window keys at ``S + u - base`` and the query at
``S + t - base``, and gives sinks ``s + (o_t0 - base)``; all *differences* are exactly the in-cache ones.
Caches that rotate keys at attention time use ``base = o_t0`` each pass (the plain formulas). Pre-rotating
caches (``lazy_base=True``: dense/window/sink) store window keys already rotated and keep ``base`` fixed,
so a decode step rotates one new key and the S sinks instead of the whole cache; once ``t - base`` reaches
``2W`` they re-base (rotate the stored window back by ``delta``, once per W tokens, a key is re-rotated at
most twice in its life) so positions stay below ``S + 2W + C``.

Positions are host tensors. They are built on the CPU and stay there: the Plan computes ``max_pos`` (how
far the rotary table must reach) from them without a device sync, and so does every plan derived from it
with `dataclasses.replace`. They reach the device only as table look-ups (`Plan.rope`, `Plan.key_tables`)
or ALiBi distances (`Plan.distances`), each made once per pass and plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ContextOverflowError


@dataclass
class Plan:
    """What one forward pass of ``n_new`` tokens does with one group of layer caches. Built once per pass.

    Index and mask tensors live on the cache's device; positions (``*_pos``) and ``k_tokens`` on the host
    (see the module docstring). Derive a plan with `dataclasses.replace`: ``max_pos`` and the per-pass
    memo of rotary tables are then made afresh for it, never copied.
    """
    n_new: int
    start: int                      # stream index of the first new token
    write_first: bool               # write new K/V, then read the buffer (decode); else read, then write
    read_len: int                   # buffer slots [0, read_len) are part of the view
    write_slots: torch.Tensor       # [m] buffer slots receiving new tokens
    write_src: torch.Tensor         # [m] which of the new tokens go there
    capacity: int                   # buffer slots needed after this pass
    k_tokens: torch.Tensor          # [Lk] stream index of every key in the view
    k_pos: torch.Tensor             # [Lk] in-cache position of every key (host, like every position)
    q_pos: torch.Tensor             # [C] query positions (for all non-sink columns)
    q_pos_sink: torch.Tensor | None  # [C] query positions for sink columns; None when equal to q_pos
    sink_cols: torch.Tensor | None  # [Lk] bool, columns that use q_pos_sink
    mask: torch.Tensor | None       # [C, Lk] bool, True = may attend; None = everything visible
    decode_slot: int | None = None  # the one slot written by a single-token pass (no device sync needed)
    keys_rotated: bool = False      # the view's keys come rotated from the buffer (lazy-base caches)
    rebase: int = 0                 # pre-rotated caches: rotate stored window keys by -rebase before this pass
    new_pos: torch.Tensor | None = None   # [C] rotation positions of the new keys
    sink_pos: torch.Tensor | None = None  # [S] rotation positions of the sink keys for this pass
    max_pos: int = field(init=False, default=0)  # largest position above; computed from the host positions
                                                 # here (table look-ups need no device sync), never passed

    def __post_init__(self):
        positions = [p for p in (self.k_pos, self.q_pos, self.q_pos_sink, self.new_pos, self.sink_pos)
                     if p is not None]
        if any(p.device.type != "cpu" for p in positions):
            raise ValueError("Plan positions are host tensors (their maximum is read without a device sync)")
        self.max_pos = max((int(p.max()) for p in positions if p.numel()), default=0)
        # what this pass derives from its positions, per rotary module / device: not a field, so a plan
        # made with `dataclasses.replace` starts with its own
        self._memo: dict = {}

    def rope(self, rotary, dtype: torch.dtype):
        """cos/sin for keys (None when the buffer stored them rotated), queries and sink-column queries;
        computed once per pass per rotary module and shared by every layer using this plan."""
        key = ("rope", id(rotary), dtype)
        if key not in self._memo:
            m = self.max_pos
            tk = None if self.keys_rotated else rotary.tables(self.k_pos, dtype, max_pos=m)
            tq = rotary.tables(self.q_pos, dtype, max_pos=m)
            ts = None if self.q_pos_sink is None else rotary.tables(self.q_pos_sink, dtype, max_pos=m)
            self._memo[key] = (tk, tq, ts)
        return self._memo[key]

    def key_tables(self, rotary, dtype: torch.dtype):
        """cos/sin for the new keys and for the sinks (pre-rotating buffers), once per pass per rotary module."""
        key = ("keys", id(rotary), dtype)
        if key not in self._memo:
            m = self.max_pos
            self._memo[key] = (rotary.tables(self.new_pos, dtype, max_pos=m),
                               None if self.sink_pos is None else rotary.tables(self.sink_pos, dtype, max_pos=m))
        return self._memo[key]

    def distances(self, device: torch.device) -> torch.Tensor:
        """[C, Lk] query position minus key position (sink columns from ``q_pos_sink``), for ALiBi; once
        per pass per device."""
        key = ("distances", device)
        if key not in self._memo:
            on = (lambda x: x.to(device, non_blocking=True))
            qp = on(self.q_pos)[:, None]
            if self.q_pos_sink is not None:
                qp = torch.where(self.sink_cols[None, :], on(self.q_pos_sink)[:, None], qp)
            self._memo[key] = qp - on(self.k_pos)[None, :]
        return self._memo[key]

    extends_view: ClassVar[bool] = False  # True where `extend` adds to the view (the retrieval memory)

    def extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Hook for per-layer additions to the view (the retrieval memory adds recalled blocks); no-op here."""
        return k, v, self

    @property
    def plain_decode(self) -> bool:
        """One token written first into a slot known on the host, no mask, one query rotation, no re-base,
        nothing added to the view: what `attention.cached_attention` can run for many caches together."""
        return (self.n_new == 1 and self.write_first and self.decode_slot is not None and self.mask is None
                and self.q_pos_sink is None and not self.rebase and not self.extends_view)


class RingSlots:
    """Slot bookkeeping of one cache group: ``sinks`` kept for ever plus a ring of ``window`` recent tokens.

    Holds only integers (stream length and which token each slot holds); layer buffers hold the tensors.
    """

    def __init__(self, sinks: int, window: int, *, growable: bool = False, name: str = "sink",
                 lazy_base: bool = False):
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.sinks, self.window, self.growable, self.name = sinks, window, growable, name
        self.lazy_base = lazy_base
        self.seen = 0
        self.base = sinks  # rotation offset (see the module docstring)
        self.slot_token = torch.full((sinks + window,), -1, dtype=torch.long)

    @property
    def size(self) -> int:
        return self.sinks + self.window

    @property
    def filled(self) -> int:
        return min(self.seen, self.size)

    def slot_of(self, u: torch.Tensor) -> torch.Tensor:
        S, W = self.sinks, self.window
        return torch.where(u < S, u, S + (u - S).remainder(W))

    def oldest(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.window + 1).clamp(min=self.sinks)

    def plan(self, n_new: int, device: torch.device | str = "cpu") -> Plan:
        """Plan a pass over ``n_new`` tokens and advance the bookkeeping (the pass must then run)."""
        S, W, t0 = self.sinks, self.window, self.seen
        t_last = t0 + n_new - 1
        if self.growable and t_last >= self.size:
            raise ContextOverflowError(
                f"context full: {self.name} cache holds {self.size} tokens and this needs {t_last + 1}; "
                "use --cache sink to stream past the model's context")
        t = torch.arange(t0, t0 + n_new)
        o = self.oldest(t)
        o0 = int(o[0])
        rebase = 0
        if not self.lazy_base:
            self.base = o0
        elif t_last - self.base >= 2 * W:
            rebase, self.base = o0 - self.base, o0
        b = self.base
        shift = o0 - b
        q_pos = S + t - b
        q_pos_sink = None if (S == 0 or bool((o == o0).all())) else S + t - o + shift
        survivors = t[(t < S) | (t >= t_last - W + 1)]
        write_slots = self.slot_of(survivors)
        write_first = n_new == 1 or t_last < self.size
        if write_first:
            self.slot_token[write_slots] = survivors
            read_len = min(t_last + 1, self.size)
            k_tok = self.slot_token[:read_len].clone()
        else:
            read_len = self.filled
            k_tok = torch.cat([self.slot_token[:read_len], t])
            self.slot_token[write_slots] = survivors
        self.seen = t_last + 1
        k_pos = torch.where(k_tok < S, k_tok + shift, S + k_tok - b).clamp(min=0)
        new_pos = torch.where(t < S, t + shift, S + t - b)
        vis = (k_tok[None, :] >= 0) & (k_tok[None, :] <= t[:, None]) & (
            (k_tok[None, :] < S) | (k_tok[None, :] >= o[:, None]))
        mask = None if bool(vis.all()) else vis
        sink_cols = None if q_pos_sink is None else (k_tok < S)
        dev = torch.device(device)
        mv = (lambda x: None if x is None else x.to(dev, non_blocking=True))
        return Plan(n_new=n_new, start=t0, write_first=write_first, read_len=read_len,
                    write_slots=mv(write_slots), write_src=mv(survivors - t0), capacity=min(t_last + 1, self.size),
                    k_tokens=k_tok, k_pos=k_pos, q_pos=q_pos, q_pos_sink=q_pos_sink,
                    sink_cols=mv(sink_cols), mask=mv(mask),
                    decode_slot=int(write_slots[0]) if n_new == 1 and write_slots.numel() else None,
                    keys_rotated=self.lazy_base, rebase=rebase, new_pos=new_pos,
                    sink_pos=torch.arange(S) + shift if S else None)

    def state(self) -> dict:
        return {"seen": self.seen, "base": self.base, "slot_token": self.slot_token.clone()}

    def load_state(self, st: dict) -> None:
        self.seen = int(st["seen"])
        self.base = int(st.get("base", self.sinks))
        self.slot_token = st["slot_token"].clone().long()
