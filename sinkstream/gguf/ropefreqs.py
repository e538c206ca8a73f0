"""Llama 3.1+ RoPE scaling, recovered from the ``rope_freqs.weight`` tensor of a GGUF.

llama.cpp's converter does not write the ``llama3`` scaling parameters as metadata; it writes one divisor per
frequency: 1 for wavelengths below ``original / high_freq_factor``, ``factor`` above ``original /
low_freq_factor``, and ``1 / ((1 - s) / factor + s)`` in between, with ``s = (original / wavelength - low) /
(high - low)``. Those divisors depend on (original, low, high) only through where the ramp starts and ends,
so any triple with the same ends gives the same frequencies. We take low = 1 (every Llama 3.x release),
fit the ends from the ramp's divisors, snap to whole numbers when they reproduce the tensor (giving Llama's
own 1, 4, 8192), and check that the result reproduces every divisor before using it.
"""
from __future__ import annotations

import math

import torch

from ..errors import ModelLoadError

TOLERANCE = 1e-5  # relative; the divisors are float32 computed from float32 frequencies


def _wavelengths(base: float, dim: int) -> torch.Tensor:
    return 2 * math.pi * base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def llama3_divisors(base: float, dim: int, factor: float, low: float, high: float, original: float) -> torch.Tensor:
    """The per-frequency divisors llama.cpp writes for these HF ``llama3`` parameters (float64)."""
    wl = _wavelengths(base, dim)
    smooth = (original / wl - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wl < original / high, torch.ones_like(wl), torch.where(wl > original / low, factor, ramp))


def _snap(v: float) -> float:
    r = round(v)
    return float(r) if abs(v - r) <= 1e-3 * max(1.0, abs(v)) else v


def llama3_scaling(divisors: torch.Tensor, base: float, dim: int) -> dict | None:
    """The HF rope_scaling dict (``rope_type: llama3``) whose frequencies are these divisors', or None when
    every divisor is 1. Raises ModelLoadError when no llama3 scaling gives them."""
    r = divisors.double().reshape(-1)
    if r.numel() != dim // 2:
        raise ModelLoadError(f"rope_freqs.weight has {r.numel()} values; RoPE over {dim} dims needs {dim // 2}")
    factor = float(r.max())
    if factor <= 1 + TOLERANCE and float(r.min()) >= 1 - TOLERANCE:
        return None
    x = 1 / _wavelengths(base, dim)  # the ramp is linear in 1 / wavelength
    one, full = (r - 1).abs() <= TOLERANCE, (r - factor).abs() <= TOLERANCE * factor
    ramp = ~(one | full)
    lo = float(x[full].max()) if full.any() else float(x.min()) / 2  # ramp starts above this ...
    hi = float(x[one].min()) if one.any() else float(x.max()) * 2    # ... and ends below this
    s = (1 / r - 1 / factor) / (1 - 1 / factor)                       # 0 at the ramp's start, 1 at its end
    if ramp.sum() >= 2:
        a, b = torch.linalg.lstsq(torch.stack([x[ramp], torch.ones_like(x[ramp])], 1), s[ramp, None]).solution[:, 0]
        x0, x1 = float(-b / a), float((1 - b) / a)
    elif ramp.sum() == 1:  # any line through the one point that starts and ends inside (lo, hi)
        xm, sm = float(x[ramp]), float(s[ramp])
        t = 0.5 * min((xm - lo) / sm, (hi - xm) / (1 - sm))
        x0, x1 = xm - sm * t, xm + (1 - sm) * t
    else:  # a step: any ramp between the last 1 and the first full factor
        x0, x1 = lo * (hi / lo) ** (1 / 3), lo * (hi / lo) ** (2 / 3)
    original, high = 1 / x0, x1 / x0
    for f, h, o in ((_snap(factor), _snap(high), _snap(original)), (factor, high, original)):
        if h > 1 and torch.allclose(llama3_divisors(base, dim, f, 1.0, h, o), r, rtol=TOLERANCE, atol=0):
            return {"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": h,
                    "original_max_position_embeddings": int(o) if o == int(o) else o}
    raise ModelLoadError("rope_freqs.weight does not follow Llama 3's RoPE scaling; sinkstream cannot run it")
