"""The retrieval memory's index: which evicted blocks a layer's queries should recall. A tree of key summaries.

Level 0 entries are the finished blocks, each with ``width`` representative keys per kv head. Every ``group``
consecutive entries of a level form one entry of the level above: their keys move to that level's page store
(RAM up to a budget, then disk, see `BlockStore`) as one *page*, and ``SUMMARY_KEYS`` summary keys per kv
head go up (attention representatives: the most attended keys; mean representatives: the mean key and the
keys farthest from it, since a needle in a haystack is an outlier, not the mean). Only the entries of each
level not yet grouped ("recent": fewer than ``group`` + the blocks of one pass) stay in device memory, so
what the index holds there is O(levels * group) keys: it grows with the logarithm of the stream, not with
the stream. Level 0 groups ``SUPER_BLOCKS`` blocks (one page = a *super-block*); higher levels group
``UPPER_GROUP`` entries, so a third level appears only after SUPER_BLOCKS * UPPER_GROUP blocks (131K tokens
with blocks of 64) and a fourth after 64 times more (8.4M). A level loses nothing while it has at most
``PROBES`` entries (all of them are probed): the third level starts to choose at 4 * 131K = 524K tokens.

Selection walks the tree from the top. Every candidate's score is its best key (max over its keys) under
q·k/√d, turned into a softmax over candidates per query head and query; the votes of a kv head's query heads
and queries are summed. At each level above 0 each kv head *probes* its best few entries: their pages (the
entries of the level below) are loaded into a per-head buffer, only when the probed set changes, and
compete with that level's recent entries; a probed page stays until an entry gets ``STICKY`` times its
votes, so pages are not swapped back and forth between near-equal entries on every decode step. At level 0
each kv head takes its top-k blocks.
"""
from __future__ import annotations

import torch

SUPER_BLOCKS = 32  # blocks per level-1 entry (super-block)
UPPER_GROUP = 64   # entries per entry of the next level, for levels 1 and up
SUMMARY_KEYS = 2   # summary keys per entry and kv head, levels 1 and up
PROBES = 4         # entries per kv head whose pages are scored at the level below
VOTERS = 16        # the stream's last queries, whose votes choose what a pass recalls
STICKY = 1.5       # a probed page is replaced only by an entry with STICKY times its votes


def level_shape(level: int, width: int, top_k: int) -> tuple[int, int, int]:
    """(keys per entry, entries per page, probes) of index level `level`; `width` = keys per block. Level 0
    gets enough probes that top_k blocks can always come from probed super-blocks."""
    if level == 0:
        return width, SUPER_BLOCKS, max(PROBES, -(-top_k // SUPER_BLOCKS) + 1)
    return SUMMARY_KEYS, UPPER_GROUP, PROBES


class _Level:
    """One level: its recent (ungrouped) entries' keys, its page store, and the pages probed into it."""

    def __init__(self, heads: int, head_dim: int, width: int, group: int, probes: int, *, dtype, device):
        self.width, self.group, self.probes = width, group, probes
        self.first = 0  # first entry not yet grouped
        self.count = 0  # entries so far
        self.keys = torch.zeros(heads, 2 * group * width, head_dim, dtype=dtype, device=device)  # grows
        self.acc = torch.zeros(heads, 2 * group * width, device=device)
        self.store = None  # pages of grouped entries; created with the first group
        # pages of the probed entries of the level above: keys, the entry id of each column group, and the
        # id of the entry above that each probe slot holds
        self.probed = torch.zeros(heads, probes * group * width, head_dim, dtype=dtype, device=device)
        self.probed_entry = torch.full((heads, probes * group), -1, dtype=torch.long, device=device)
        self.probed_ids = [[-1] * probes for _ in range(heads)]
        self.candidates = None  # (keys, ids, count) scored at this level last time; reused while unchanged
        self.version = 0        # bumped whenever `candidates` is rebuilt
        self.votes = None       # (what was scored, per-voter softmax rows [heads, g, voters, candidates])
        self.sticky = None      # (what it is for, vote multipliers of the probed entries [heads, candidates])

    @property
    def recent(self) -> int:
        return self.count - self.first

    def append(self, keys: torch.Tensor, acc: torch.Tensor | None) -> None:
        w, n = self.width, self.recent
        if (n + 1) * w > self.keys.shape[1]:
            self.keys = torch.cat([self.keys, torch.zeros_like(self.keys)], 1)
            self.acc = torch.cat([self.acc, torch.zeros_like(self.acc)], 1)
        self.keys[:, n * w:(n + 1) * w] = keys
        if acc is not None:
            self.acc[:, n * w:(n + 1) * w] = acc
        self.count += 1

    def pop_group(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the oldest `group` recent entries; return their keys and attention received."""
        gw, n = self.group * self.width, self.recent * self.width
        page, acc = self.keys[:, :gw].clone(), self.acc[:, :gw].clone()
        self.keys[:, :n - gw] = self.keys[:, gw:n].clone()
        self.acc[:, :n - gw] = self.acc[:, gw:n].clone()
        self.first += self.group
        return page, acc

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.acc, self.probed, self.probed_entry))


class Voters:
    """One layer's last VOTERS queries (un-rotated), [kv_heads, g, VOTERS, d], kept in ring order: votes are
    summed, so their order does not matter. A decode step replaces one, so what a step recalls follows the
    stream instead of jumping with every token's query; a chunk of VOTERS or more replaces them all."""

    def __init__(self):
        self.q, self.fill, self.pos = None, 0, 0

    def add(self, qg: torch.Tensor, chunk: int) -> slice | None:
        """Put a pass's last (up to VOTERS) queries [kv_heads, g * chunk, d] in; return the slots written
        (None: all of them, or a wrap-around), which `BlockIndex.select` re-scores."""
        heads, d = qg.shape[0], qg.shape[-1]
        q = qg.view(heads, -1, chunk, d)
        if self.q is None:
            self.q = q.new_zeros(heads, q.shape[1], VOTERS, d)
        m = min(chunk, VOTERS)
        first = min(m, VOTERS - self.pos)  # up to the end of the ring, then from its start
        self.q[:, :, self.pos:self.pos + first] = q[:, :, chunk - m:chunk - m + first]
        if m > first:
            self.q[:, :, :m - first] = q[:, :, chunk - m + first:]
        fresh = slice(self.pos, self.pos + m) if m == first < VOTERS else None
        self.pos = (self.pos + m) % VOTERS
        self.fill = min(VOTERS, self.fill + m)
        return fresh

    def current(self) -> torch.Tensor:
        return self.q if self.fill == VOTERS else self.q[:, :, :self.fill]

    def state(self) -> dict[str, torch.Tensor]:
        if self.q is None:
            return {}
        return {"voters": self.q.clone(), "voter_ring": torch.tensor([self.fill, self.pos])}

    def load_state(self, st: dict[str, torch.Tensor], like: torch.Tensor) -> None:
        if "voters" in st:
            self.q = st["voters"].to(like)
            self.fill, self.pos = (int(x) for x in st["voter_ring"])


class BlockIndex:
    """One memory layer's index over its finished blocks (see the module docstring).

    ``page_store(level)`` returns the shared `BlockStore` for the pages of `level` (created on first use);
    ``layer`` is this layer's key in those stores."""

    def __init__(self, layer: int, heads: int, head_dim: int, *, width: int, top_k: int, by_attention: bool,
                 page_store, dtype, device):
        self.layer, self.heads, self.head_dim = layer, heads, head_dim
        self.by_attention, self.page_store = by_attention, page_store
        self.dtype, self.device = dtype, device
        self.scale = head_dim ** -0.5
        self.width, self.top_k = width, top_k
        self.levels = [self._new_level(0)]
        self.page_loads = 0

    @property
    def blocks(self) -> int:
        return self.levels[0].count

    def add_block(self, keys: torch.Tensor, acc: torch.Tensor | None) -> None:
        """A finished block's representative keys [kv_heads, width, d] (and the attention they received)."""
        self.levels[0].append(keys, acc)

    # --- grouping -----------------------------------------------------------------------------------
    def _new_level(self, level: int) -> _Level:
        return _Level(self.heads, self.head_dim, *level_shape(level, self.width, self.top_k), dtype=self.dtype,
                      device=self.device)

    def _summarize(self, page: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        rs = SUMMARY_KEYS
        if self.by_attention:  # the group's most attended keys
            top = acc.topk(rs, dim=1)
            return page.gather(1, top.indices[..., None].expand(-1, -1, page.shape[-1])), top.values
        mean = page.float().mean(1, keepdim=True)
        far = (page.float() - mean).norm(dim=-1).topk(rs - 1, dim=1).indices[..., None]
        return torch.cat([mean.to(page.dtype), page.gather(1, far.expand(-1, -1, page.shape[-1]))], 1), None

    def promote(self, eligible: int) -> None:
        """Group every full run of recent entries, level by level; level 0 only up to `eligible` blocks
        (blocks filled during the current pass are not retrievable yet)."""
        lv = 0
        while lv < len(self.levels):
            level = self.levels[lv]
            limit = eligible if lv == 0 else level.count
            while level.first + level.group <= limit:
                index = level.first // level.group
                page, acc = level.pop_group()
                if level.store is None:
                    level.store = self.page_store(lv)
                level.store.put(self.layer, index, page, page.new_zeros(page.shape[0], page.shape[1], 0))
                if lv + 1 == len(self.levels):
                    self.levels.append(self._new_level(lv + 1))
                self.levels[lv + 1].append(*self._summarize(page, acc))
            lv += 1

    # --- selection ----------------------------------------------------------------------------------
    def _votes(self, qg: torch.Tensor, keys: torch.Tensor, width: int) -> torch.Tensor:
        """Scores [kv_heads, queries, candidates]: each candidate's best key under q·k/√d."""
        s = torch.matmul(qg, keys.transpose(1, 2))
        if width > 1:
            s = s.view(self.heads, qg.shape[1], -1, width).amax(-1)
        return s.float().mul_(self.scale)

    def _vote_sums(self, level: _Level, tag, voters: torch.Tensor, fresh: slice | None, keys: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """Votes [kv_heads, candidates] of `voters` [kv_heads, g, V, d] for `level`'s candidates `keys`: each
        voter's softmax over the candidates, summed. The per-voter rows are kept: while the candidates stay
        the same (`tag`), only the `fresh` voters (the queries of this pass) are scored again."""
        heads, g, V, d = voters.shape
        old = level.votes
        if mask is None and fresh is not None and old is not None and old[0] == tag and old[1].shape[2] == V:
            rows = old[1]
            q = voters[:, :, fresh]
            rows[:, :, fresh] = self._votes(q.reshape(heads, -1, d), keys, level.width).softmax(-1).view(
                heads, g, q.shape[2], -1)
        else:
            s = self._votes(voters.reshape(heads, -1, d), keys, level.width)
            if mask is not None:
                s = s.masked_fill(mask[:, None], float("-inf"))
            rows = s.softmax(-1).view(heads, g, V, -1)
            level.votes = None if mask is not None else (tag, rows)
        return rows.sum((1, 2))

    def _sticky(self, level: _Level, tag, probed: list[list[int]], ids: list[list[int]], device) -> torch.Tensor:
        """Per head and candidate: STICKY where the candidate's page is probed now, else 1 (kept while the
        candidates and the probed pages stay the same)."""
        key = (tag, tuple(map(tuple, probed)))
        if level.sticky is None or level.sticky[0] != key:
            held = [[e in row for e in cand] for row, cand in zip(probed, ids)]
            level.sticky = (key, torch.tensor(held, dtype=torch.float32, device=device).mul_(STICKY - 1).add_(1))
        return level.sticky[1]

    def select(self, voters: torch.Tensor, eligible: int, k: int, fresh: slice | None = None) -> list[list[int]]:
        """Each kv head's top-k block ids (sorted), voted by `voters` [kv_heads, g, V, d]; `fresh`: which of
        them are new since the last call (None: all)."""
        self.promote(eligible)
        dev = voters.device
        top = len(self.levels) - 1
        level = self.levels[top]
        keys = level.keys[:, :level.recent * level.width]
        ids = [list(range(level.first, level.count))] * self.heads  # each head's candidates' entry ids
        tag = ("top", level.first, level.count)
        for lv in range(top, 0, -1):
            level, below = self.levels[lv], self.levels[lv - 1]
            p = min(below.probes, len(ids[0]))
            if p == len(ids[0]):  # every entry gets probed: nothing to choose
                chosen = ids
            else:
                votes = self._vote_sums(level, tag, voters, fresh, keys)
                chosen = _pick(ids, votes * self._sticky(level, tag, below.probed_ids, ids, dev), p)
            keys, ids = self._candidates(below, _reassign(below.probed_ids, chosen), p)
            tag = ("probed", below.version)
        mask = None
        if eligible < self.levels[0].count:  # filled during this pass
            mask = torch.tensor(ids, device=dev) >= eligible
        votes = self._vote_sums(self.levels[0], tag, voters, fresh, keys, mask)
        return [sorted(row) for row in _pick(ids, votes, min(k, eligible))]

    def _candidates(self, level: _Level, loads, p: int) -> tuple[torch.Tensor, list[list[int]]]:
        """`level`'s candidates: the entries of the `p` probed pages and the recent entries (keys, and each
        head's entry ids). Rebuilt only when a page is loaded or an entry is added, so a decode step
        usually reuses them."""
        if not loads and level.candidates is not None and level.candidates[2] == (p, level.first, level.count):
            return level.candidates[:2]
        self._load_pages(level, loads)
        n = p * level.group
        keys = torch.cat([level.probed[:, :n * level.width], level.keys[:, :level.recent * level.width]], 1)
        recent = list(range(level.first, level.count))
        ids = [row + recent for row in level.probed_entry[:, :n].tolist()]
        level.candidates = (keys, ids, (p, level.first, level.count))
        level.version += 1
        return keys, ids

    def _load_pages(self, level: _Level, loads: list[tuple[int, int, int]]) -> None:
        """Probe slot j of kv head h <- page e of `level` (the entries of level-above entry e), per (h, j, e)."""
        if not loads:
            return
        self.page_loads += len(loads)
        dev, G = level.probed.device, level.group
        pages = {e: level.store.get(self.layer, e)[0] for e in {e for _, _, e in loads}}
        h, j, e = (torch.tensor(x, device=dev) for x in zip(*loads))
        keys = torch.stack([pages[x][hh] for hh, _, x in loads]).to(dev)  # [loads, G * width, d]
        level.probed.view(self.heads, level.probes, -1, keys.shape[-1])[h, j] = keys
        level.probed_entry.view(self.heads, level.probes, G)[h, j] = e[:, None] * G + torch.arange(G, device=dev)

    # --- accounting and persistence -----------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(level.nbytes() for level in self.levels)

    def state(self) -> dict[str, torch.Tensor]:
        """Per level: the recent (not yet grouped) entries' keys and attention received, where grouping
        stands and which pages are probed. O(levels * group) keys: the pages are in the page stores."""
        out = {}
        for lv, level in enumerate(self.levels):
            out[f"index{lv}_keys"] = level.keys[:, :level.recent * level.width].cpu()
            out[f"index{lv}_acc"] = level.acc[:, :level.recent * level.width].cpu()
            out[f"index{lv}_first"] = torch.tensor([level.first])
            out[f"index{lv}_count"] = torch.tensor([level.count])
            out[f"index{lv}_probed"] = torch.tensor(level.probed_ids)
        return out

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        """Restore into a fresh index whose page stores hold the state's pages (`MemoryCache.open_log`)."""
        lv = 0
        self.levels = self.levels[:1]
        while f"index{lv}_keys" in st:
            if lv == len(self.levels):
                self.levels.append(self._new_level(lv))
            level = self.levels[lv]
            first, count = int(st[f"index{lv}_first"]), int(st[f"index{lv}_count"])
            pages, gw = first // level.group, level.group * level.width
            level.store = self.page_store(lv) if pages else None
            if pages and level.store.count[self.layer] != pages:
                raise ValueError(f"index level {lv} has {pages} pages, its page store "
                                 f"{level.store.count[self.layer]}: open the state's block log first")
            recent = st[f"index{lv}_keys"].to(level.keys)
            m = max(2 * gw, 2 * recent.shape[1])
            level.keys = level.keys.new_zeros(self.heads, m, self.head_dim)
            level.acc = level.acc.new_zeros(self.heads, m)
            level.keys[:, :recent.shape[1]] = recent
            level.acc[:, :recent.shape[1]] = st[f"index{lv}_acc"].to(level.acc)
            level.first, level.count = first, count
            level.probed_ids = st[f"index{lv}_probed"].tolist()
            level.probed_entry.fill_(-1)
            level.candidates = level.votes = level.sticky = None
            lv += 1
        for lv in range(len(self.levels) - 1):  # re-load the probed pages of every level below the top
            below = self.levels[lv]
            self._load_pages(below, [(h, j, e) for h, row in enumerate(below.probed_ids)
                                     for j, e in enumerate(row) if e >= 0])


def _pick(ids: list[list[int]], votes: torch.Tensor, k: int) -> list[list[int]]:
    """Each head's k best-voted candidates, as entry ids."""
    best = votes.topk(k, dim=-1).indices.tolist()
    return [[row[i] for i in idx] for row, idx in zip(ids, best)]


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
