"""`Linear`: an ``nn.Linear`` whose passes of few rows on the CPU in float32 go through our kernel.

A decode step multiplies one row per stream by each weight. torch's CPU matrix multiply is built for
blocks of many rows: with 8 rows (8 streams of a batch) it spent about 2.3x the time of one row on
SmolLM2's float32 weights, compute rather than the weight bytes both read once. ``f32_mm``
(sinkstream/kernels/qmm.cpp) reads each weight row once for up to 4 activation rows, and computes every row
the same way whatever the number of rows, so a stream's logits are the same alone or batched. Passes of
`MANY_TOKENS` rows or more (prefill), other dtypes and devices use ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .quant import MANY_TOKENS


class Linear(nn.Linear):
    """Same parameters and state dict as ``nn.Linear`` (`use_kernel` turns a loaded one into this)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        w = self.weight
        if (0 < rows < MANY_TOKENS and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"
                and w.is_contiguous() and kernels.available()):
            y = torch.ops.sinkstream.f32_mm(x.reshape(rows, x.shape[-1]).contiguous(), w)
            y = y.view(*x.shape[:-1], w.shape[0])
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


def use_kernel(model: nn.Module) -> int:
    """Turn the model's plain ``nn.Linear`` layers holding float32 CPU weights into `Linear`; returns how
    many. Only the class changes: parameters, state dict and tied weights stay as they are."""
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu":
            mod.__class__ = Linear
            n += 1
    return n
