"""Weight-only quantization of the linear layers, for decoding speed and RAM (``load(..., quant="int4")``).

Decoding one token reads every weight once, so on a CPU its time is the weight bytes over the memory
bandwidth. A GGUF such as the default SmolLM2 Q4_1 file holds 4-bit weights; de-quantized to float32 they
are 8x the bytes. ``quant`` puts them back into few bits:

* ``int4``: groups of ``group`` (32) input columns share a scale and a zero point; ``w = (q - 8) * scale +
  zero`` with q in 0..15 and bfloat16 scale and zero. A Q4_1/Q4_K source is itself 4-bit with per-32
  scale and minimum, so re-quantizing its de-quantized weights finds the same q (the scale and zero are
  rounded to bfloat16).
* ``int8``: one symmetric scale per output row, ``w = q * scale``.

With ``int4`` the output projection (the linear layer that produces the vocabulary logits) gets ``int8``,
as llama.cpp keeps the output layer at higher precision: GGUF files store it at 6-8 bits (SmolLM2's tied
embedding is Q8_0), and 4 bits there cost SmolLM2 8% perplexity where int8 costs 0.3%.

Activations enter the kernels in bfloat16 and the result returns in the model's dtype; norms, attention,
residuals and the cache keep the model's dtype. On the CPU the fused kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) read the packed weights directly. Other
devices hold the de-quantized weights in the model's dtype and use a plain matmul: the same numbers,
without the speed or memory gain. Layers whose input width is not a multiple of ``group`` stay as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SinkstreamError

QUANT_TYPES = ("none", "int8", "int4")
KERNEL_DTYPE = torch.bfloat16


def _int4_params(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K] int32 in 0..15, scale and zero [N, K/group] in bfloat16, for w [N, K]."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12).to(KERNEL_DTYPE)
    zero = (lo + 8 * scale.float()).to(KERNEL_DTYPE)  # the value of q = 8
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    return q.to(torch.int32).reshape(n, k), scale, zero


def _int8_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.float().abs().amax(1) / 127).clamp_min(1e-12).to(KERNEL_DTYPE)
    q = torch.round(w.float() / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class QuantLinear(nn.Module):
    """A drop-in for nn.Linear holding int4 or int8 weights (see the module docstring)."""

    def __init__(self, linear: nn.Linear, kind: str, group: int = 32, fused: bool | None = None):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kind, self.group, self.out_dtype = kind, group, w.dtype
        self.fused = w.device.type == "cpu" if fused is None else fused  # False: de-quantized weights
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        if kind == "int4":
            q, scale, zero = _int4_params(w, group)
            if self.fused:
                self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
                # the kernel wants [K/group, N, 2] = (scale, zero) per group and output row
                self.register_buffer("scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())
            else:
                deq = ((q.reshape(*scale.shape, group).float() - 8) * scale.float()[..., None]
                       + zero.float()[..., None]).reshape(w.shape)
                self.register_buffer("weight", deq.to(w.dtype))
        elif kind == "int8":
            q, scale = _int8_params(w)
            if self.fused:
                self.register_buffer("qweight", q)
                self.register_buffer("scale", scale)
            else:
                self.register_buffer("weight", (q.float() * scale.float()[:, None]).to(w.dtype))
        else:
            raise SinkstreamError(f"unknown quantization {kind!r} (choose from {', '.join(QUANT_TYPES)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(KERNEL_DTYPE)
        if self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        y = y.to(self.out_dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}, group={self.group}, fused={self.fused}"


def quantize(model: nn.Module, kind: str | None, group: int = 32, *, fused: bool | None = None) -> int:
    """Replace the model's nn.Linear layers in place; returns how many were replaced. Tied embeddings stay
    in full precision for the lookup (only the output projection is quantized, int8 under int4)."""
    if kind in (None, "none"):
        return 0
    if kind not in QUANT_TYPES:
        raise SinkstreamError(f"unknown quantization {kind!r} (choose from {', '.join(QUANT_TYPES)})")
    if kind == "int4" and (group < 32 or group & (group - 1)):
        raise SinkstreamError(f"int4 group size must be a power of two >= 32, not {group}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    done = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            k = "int8" if child.out_features == vocab else kind
            if k == "int8" or child.in_features % group == 0:
                setattr(parent, name, QuantLinear(child, k, group, fused=fused))
                done += 1
    model.quant = kind
    return done
