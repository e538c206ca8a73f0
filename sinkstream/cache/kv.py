"""Per-layer key/value buffers. Preallocated; a pass writes new tokens at the slots its plan names."""
from __future__ import annotations

import torch

from ..rope import Rotary, apply_rotary
from .plan import Plan


class KVBuffer:
    """Keys and values of one layer: k, v: [batch, kv_heads, slots, head_dim].

    Bounded policies allocate every slot up front. A growable buffer (``dense``) doubles when a plan
    needs more slots, never past ``max_slots``: growth is amortised, never a per-token concatenation.

    With a ``rotary`` module the buffer stores keys rotated (see "Rotation offset" in cache/plan.py): new
    keys are rotated once when written, the ``sinks`` are kept un-rotated in ``sink_k`` and rotated into
    slots 0..S-1 for each pass, and a re-base rotates the stored window back. Without one, keys are stored
    as they come and `attend` rotates the whole view.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, slots: int, *, dtype, device,
                 max_slots: int | None = None, v_head_dim: int | None = None, rotary: Rotary | None = None,
                 sinks: int = 0):
        self.max_slots = max_slots or slots
        self.rotary, self.sinks = rotary, sinks
        # uninitialised: a plan reads only slots it wrote (``read_len``), so memory is touched as the cache
        # fills (many short sessions cost what they hold, a new one copies its prefix without a memset first)
        self.k = torch.empty(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(batch, kv_heads, slots, v_head_dim or head_dim, dtype=dtype, device=device)
        self.sink_k = torch.empty(batch, kv_heads, sinks, head_dim, dtype=dtype, device=device) \
            if rotary is not None and sinks else None

    @property
    def nbytes(self) -> int:
        extra = self.sink_k.numel() * self.sink_k.element_size() if self.sink_k is not None else 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size() + extra

    def _grow(self, need: int) -> None:
        cap = self.k.shape[2]
        if need <= cap:
            return
        new = min(max(need, 2 * cap), self.max_slots)
        for name in ("k", "v"):
            old = getattr(self, name)
            buf = old.new_empty(*old.shape[:2], new, old.shape[3])
            buf[:, :, :cap] = old
            setattr(self, name, buf)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's K/V and return the keys and values it attends to (in plan.k_pos order)."""
        self._grow(plan.capacity)
        if self.rotary is not None:
            k_new = self._prerotate(k_new, plan)
        k_new, v_new = k_new.to(self.k.dtype), v_new.to(self.v.dtype)  # attention sees what is stored
        if plan.write_first:
            self._write(k_new, v_new, plan)
            return self.k[:, :, :plan.read_len], self.v[:, :, :plan.read_len]
        k_view = torch.cat([self.k[:, :, :plan.read_len], k_new], dim=2)
        v_view = torch.cat([self.v[:, :, :plan.read_len], v_new], dim=2)
        self._write(k_new, v_new, plan)
        return k_view, v_view

    def store_rotated(self, k_rot: torch.Tensor, v_new: torch.Tensor, plan: Plan,
                      sinks_rotated: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for one plain decode token (`Plan.plain_decode`) whose key, and the sinks, were already
        rotated for this pass (by `attention._decode_together`, for many caches at once): store them and
        return the view."""
        if sinks_rotated is not None:
            self.k[:, :, :self.sinks] = sinks_rotated
        s, n = plan.decode_slot, plan.read_len
        self.k[:, :, s:s + 1] = k_rot
        self.v[:, :, s:s + 1] = v_new
        return self.k[:, :, :n], self.v[:, :, :n]

    def _prerotate(self, k_new: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Re-base if due, keep new sink keys un-rotated, rotate sinks for this pass; return rotated k_new."""
        S, rot, inter = self.sinks, self.rotary, self.rotary.cfg.interleaved
        if plan.rebase:  # in the new keys' precision, rounded into the buffer once
            cos, sin = rot.shift(-plan.rebase, k_new.dtype)
            self.k[:, :, S:] = apply_rotary(self.k[:, :, S:].to(k_new.dtype), cos, sin, interleaved=inter)
        if S and plan.start < S:  # tokens that become sinks: remember them un-rotated
            n = min(S - plan.start, plan.n_new)
            self.sink_k[:, :, plan.start:plan.start + n] = k_new[:, :, :n]
        (cos, sin), sink_tab = plan.key_tables(rot, k_new.dtype)
        k_rot = apply_rotary(k_new, cos, sin, interleaved=inter)
        have = min(plan.start, S)  # sinks already stored (new ones arrive rotated in k_rot)
        if have:
            cos, sin = sink_tab[0][:have], sink_tab[1][:have]
            self.k[:, :, :have] = apply_rotary(self.sink_k[:, :, :have].to(k_new.dtype), cos, sin, interleaved=inter)
        return k_rot

    def _write(self, k_new, v_new, plan: Plan) -> None:
        if plan.n_new == 1:  # decode: one slot, a plain slice copy
            s = plan.decode_slot
            if s is not None:
                self.k[:, :, s:s + 1] = k_new
                self.v[:, :, s:s + 1] = v_new
            return
        self.k.index_copy_(2, plan.write_slots, k_new.index_select(2, plan.write_src))
        self.v.index_copy_(2, plan.write_slots, v_new.index_select(2, plan.write_src))

    def state(self, used: int) -> dict[str, torch.Tensor]:
        st = {"k": self.k[:, :, :used].contiguous(), "v": self.v[:, :, :used].contiguous()}
        if self.sink_k is not None:
            st["sink_k"] = self.sink_k.clone()
        return st

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        used = st["k"].shape[2]
        self._grow(used)
        self.k[:, :, :used] = st["k"].to(self.k)
        self.v[:, :, :used] = st["v"].to(self.v)
        if self.sink_k is not None and "sink_k" in st:
            self.sink_k.copy_(st["sink_k"].to(self.sink_k))
