"""Per-layer key/value buffers. Preallocated; a pass writes new tokens at the slots its plan names."""
from __future__ import annotations

import torch

from .plan import Plan


class KVBuffer:
    """Keys (un-rotated) and values of one layer: k, v: [batch, kv_heads, slots, head_dim].

    Bounded policies allocate every slot up front. A growable buffer (``dense``) doubles when a plan
    needs more slots, never past ``max_slots``: growth is amortised, never a per-token concatenation.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, slots: int, *, dtype, device,
                 max_slots: int | None = None, v_head_dim: int | None = None):
        self.max_slots = max_slots or slots
        self.k = torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, slots, v_head_dim or head_dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def _grow(self, need: int) -> None:
        cap = self.k.shape[2]
        if need <= cap:
            return
        new = min(max(need, 2 * cap), self.max_slots)
        for name in ("k", "v"):
            old = getattr(self, name)
            buf = old.new_zeros(*old.shape[:2], new, old.shape[3])
            buf[:, :, :cap] = old
            setattr(self, name, buf)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's K/V and return the keys and values it attends to (in plan.k_pos order)."""
        self._grow(plan.capacity)
        if plan.write_first:
            self._write(k_new, v_new, plan)
            return self.k[:, :, :plan.read_len], self.v[:, :, :plan.read_len]
        k_view = torch.cat([self.k[:, :, :plan.read_len], k_new], dim=2)
        v_view = torch.cat([self.v[:, :, :plan.read_len], v_new], dim=2)
        self._write(k_new, v_new, plan)
        return k_view, v_view

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
        return {"k": self.k[:, :, :used].contiguous(), "v": self.v[:, :, :used].contiguous()}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        used = st["k"].shape[2]
        self._grow(used)
        self.k[:, :, :used] = st["k"].to(self.k)
        self.v[:, :, :used] = st["v"].to(self.v)
