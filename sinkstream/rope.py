"""The one rotary-embedding implementation. Models and caches both use it; nothing else rotates.

Every query and key is rotated to the in-cache position its cache policy assigns, never to its position
in the stream. Which positions, and whether a key is rotated when it is stored (dense/window/sink) or at
attention time (memory), is the contract written down once in `sinkstream.cache.plan`. Because RoPE scores
depend only on position differences, this is what makes a ring buffer with sinks behave like the paper's
re-indexed cache while positions stay bounded, however long the stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    rotary_dim: int  # < head_dim for partial rotary (Phi, GPT-NeoX); the tail is left unrotated
    base: float = 10000.0
    scaling: dict | None = None  # HF rope_scaling / rope_parameters dict ("rope_type": linear, llama3, ...)
    interleaved: bool = False  # GPT-J style pairs (x0,x1),(x2,x3); False = rotate_half (Llama/HF)

    @staticmethod
    def from_hf(cfg: dict, head_dim: int, rotary_dim: int | None = None, *, base_key: str = "rope_theta",
                default_base: float = 10000.0) -> "RopeConfig":
        """Read theta and scaling from either the transformers-5 `rope_parameters` or the older keys."""
        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        base = params.get("rope_theta", cfg.get(base_key, default_base))
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = params
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        if rotary_dim is None:
            rotary_dim = int(head_dim * params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
        if scaling is not None:  # older configs (Phi-3) keep the original context at the top level
            for key in ("max_position_embeddings", "original_max_position_embeddings"):
                if cfg.get(key) is not None:
                    scaling.setdefault(key, cfg[key])
        return RopeConfig(head_dim, rotary_dim, float(base), _freeze(scaling))


def _freeze(d):
    return None if d is None else dict(sorted(d.items()))


def inverse_frequencies(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """inv_freq [rotary_dim/2] (float32, computed as the reference implementations do) and the attention
    scaling factor applied to cos/sin."""
    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = cfg.scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(s["factor"]), 1.0
    if kind == "llama3":
        factor = float(s["factor"])
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(mid, smoothed, scaled), 1.0
    if kind in ("longrope", "su"):
        # Phi-3 "su"/longrope: per-dimension rescale factors; short factors inside the original context.
        # In-cache positions stay below the cache size, so the short factors apply (transformers switches
        # to the long ones only once a sequence is longer than the original context).
        orig = float(s.get("original_max_position_embeddings") or s.get("max_position_embeddings"))
        mpe = float(s.get("max_position_embeddings", orig))
        ext = torch.tensor(s["short_factor"], dtype=torch.float32, device="cpu")
        scale = float(s.get("factor") or mpe / orig)
        attn = s.get("attention_factor")
        if attn is None:
            attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
        return inv / ext, float(attn)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3, longrope)")


class Rotary(torch.nn.Module):
    """cos/sin for arbitrary integer positions, and their application to queries or keys."""

    NEG = 8  # tables also cover positions -NEG..-1 (the eval's ``chunked`` view puts sink 0 at -1)

    def __init__(self, cfg: RopeConfig, device=None):
        super().__init__()
        self.cfg = cfg
        inv, self.attention_scaling = inverse_frequencies(cfg)
        self.register_buffer("inv_freq", inv.to(device), persistent=False)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, *, max_pos: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [n] ints >= -NEG -> cos, sin: [n, rotary_dim], looked up in a table grown by doubling.

        `max_pos` (`Plan.max_pos`, computed from host positions) spares a device sync. Angles are float32
        products, as in the reference implementations the models were trained with (our logits match
        theirs bit for bit); in-cache positions stay small, so float32 stays precise.
        """
        if max_pos is None:
            max_pos = int(positions.max()) if positions.numel() else 0
        positions = positions.to(self.inv_freq.device, non_blocking=True)
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] - self.NEG <= max_pos:
            size = max(max_pos + 1, 2 * (table[0].shape[0] - self.NEG) if table is not None else 4096)
            table = self._compute(torch.arange(-self.NEG, size, device=self.inv_freq.device), dtype)
            self._tables[dtype] = table
        idx = positions + self.NEG
        return table[0][idx], table[1][idx]

    def shift(self, delta: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [1, rotary_dim] that move an already rotated vector by `delta` positions (no scaling)."""
        return self._compute(torch.tensor([delta], device=self.inv_freq.device), dtype, scaled=False)

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype, *, scaled: bool = True):
        ang = positions.to(torch.float32)[:, None] * self.inv_freq[None, :].float()
        if self.cfg.interleaved:
            ang = ang.repeat_interleave(2, dim=-1)
        else:
            ang = torch.cat([ang, ang], dim=-1)
        s = self.attention_scaling if scaled else 1.0
        return (ang.cos() * s).to(dtype), (ang.sin() * s).to(dtype)

    def _apply(self, fn, *args, **kwargs):  # .to(device) etc.: drop tables built on the old device
        self._tables = {}
        return super()._apply(fn, *args, **kwargs)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """x: [batch, heads, n, head_dim]; cos/sin: [n, rotary_dim]. Rotates the first rotary_dim dims.

    Written as two multiply-adds per half into one output tensor: no rotate-half copy, no temporaries
    (this runs on every key of a view for caches that rotate at attention time). float32 on the CPU with 2-D
    tables: one call of our kernel (sinkstream/kernels/norm.cpp), the same formula."""
    if (x.device.type == "cpu" and x.dtype == cos.dtype == sin.dtype == torch.float32 and x.dim() == 4
            and cos.dim() == 2 and cos.shape[0] == x.shape[2] and x.stride(-1) == 1 and cos.is_contiguous()
            and sin.is_contiguous()
            and kernels.available()):
        return torch.ops.sinkstream.rotary(x, cos, sin, interleaved)
    rd = cos.shape[-1]
    half = rd // 2
    out = torch.empty_like(x)
    if interleaved:
        a, b, oa, ob = x[..., 0:rd:2], x[..., 1:rd:2], out[..., 0:rd:2], out[..., 1:rd:2]
        c, s = cos[..., 0::2], sin[..., 0::2]
    else:
        a, b, oa, ob = x[..., :half], x[..., half:rd], out[..., :half], out[..., half:rd]
        c, s = cos[..., :half], sin[..., :half]
    torch.mul(a, c, out=oa)
    oa.addcmul_(b, s, value=-1)  # a cos - b sin
    torch.mul(b, c, out=ob)
    ob.addcmul_(a, s)            # b cos + a sin
    if rd != x.shape[-1]:
        out[..., rd:] = x[..., rd:]
    return out
