"""`Linear`: an ``nn.Linear`` whose passes of few rows on the CPU in float32 go through our kernel.

A decode step multiplies one row per stream by each weight. torch's CPU matrix multiply is built for
blocks of many rows: with 8 rows (8 streams of a batch) it spent about 2.3x the time of one row on
SmolLM2's float32 weights, compute rather than the weight bytes both read once. ``f32_mm``
(sinkstream/kernels/qmm.cpp) reads each weight row once for up to 4 activation rows, and computes every row
the same way whatever the number of rows, so a stream's logits are the same alone or batched. Rows that
would be in a pass of `MANY_TOKENS` or more alone (prefill; `sinkstream.passrows.few_rows` says which, as for
the quantized layers), other dtypes and devices use ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .passrows import few_rows


class Linear(nn.Linear):
    """Same parameters and state dict as ``nn.Linear`` (`use_kernel` turns a loaded one into this)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        w = self.weight
        if not (rows and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu" and w.is_contiguous()
                and kernels.available()):
            return F.linear(x, w, self.bias)
        few = few_rows(rows)  # in a batched pass: each row as its stream's own pass would take it
        if few is False:
            return F.linear(x, w, self.bias)
        x2 = x.reshape(rows, x.shape[-1]).contiguous()
        if few is True:
            y = self._kernel(x2)
        else:
            y = torch.empty(rows, w.shape[0], dtype=x.dtype)
            y[few] = self._kernel(x2[few].contiguous())
            y[~few] = F.linear(x2[~few], w, self.bias)
        return y.view(*x.shape[:-1], w.shape[0])

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        y = torch.ops.sinkstream.f32_mm(x2, self.weight)
        return y if self.bias is None else y + self.bias


def use_kernel(model: nn.Module) -> int:
    """Turn the model's plain ``nn.Linear`` layers holding float32 CPU weights into `Linear`; returns how
    many. Only the class changes: parameters, state dict and tied weights stay as they are."""
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu":
            mod.__class__ = Linear
            n += 1
    return n
