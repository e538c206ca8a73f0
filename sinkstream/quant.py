"""Quantized weights for the linear layers and embeddings: the runtime format and its layers.

Decoding one token reads every weight once, so on a CPU its time is the weight bytes over the memory
bandwidth. A `QuantWeight` holds a matrix [N, K] in few bits, in one of two forms:

* ``int4``: groups of ``group`` (32) input columns share a scale and a zero point: ``w = (q - 8) * scale +
  zero`` with q in 0..15 and float32 scale and zero (zero is the value of q = 8). GGUF's Q4_0 (``d * (q -
  8)``), Q4_1 (``d * q + m``) and Q4_K (``d * sc * q - dmin * m`` per 32) are this form exactly, so a GGUF's
  4-bit tensors load bit-exactly (sinkstream.gguf).
* ``int8``: ``w = q * scale``, one scale per output row or per group of 32 columns (GGUF's Q8_0 is the
  latter exactly).

Both come from a GGUF as they are, or from float weights with ``QuantWeight.quantize`` (``load(...,
quant="int4")``). Under ``int4`` the output projection gets ``int8``: GGUF files store it at 6-8 bits, and 4
bits there cost SmolLM2 8% perplexity where int8 costs 0.3%.

On the CPU, `QuantLinear` keeps the weights in 32-column blocks (4-bit codes two to a byte, or int8, with
float16 scales) and runs our kernels (sinkstream/kernels): activations quantized to int8 per block, integer
dot products, as llama.cpp computes; passes of `QUANT_MANY_TOKENS` or more de-quantize a slice of rows to
bfloat16 for a matrix multiply. Without our kernels it uses torch's packed kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``, bfloat16 activations). Other devices hold the
de-quantized weights in the model's dtype and use a plain matmul: the same numbers, without the speed or
memory gain. `fuse_projections` lets
q/k/v and gate/up share one call. `QuantEmbedding` keeps an embedding table quantized and de-quantizes only
the rows it looks up.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SinkstreamError
from .passrows import QUANT_MANY_TOKENS, few_rows, many_splits

QUANT_TYPES = ("none", "int8", "int4")
KERNEL_DTYPE = torch.bfloat16  # the activations that torch's packed kernels take


@dataclass
class QuantWeight:
    """A weight matrix [N, K] in the runtime's quantized form (see the module docstring)."""
    kind: str                   # "int4" | "int8"
    q: torch.Tensor             # [N, K]: uint8 in 0..15 (int4) or int8 (int8)
    scale: torch.Tensor         # float32 [N, K // group]
    zero: torch.Tensor | None   # int4: float32 [N, K // group], the value of q = 8; int8: None
    group: int                  # int4: 32 or more; int8: 32 or K (one scale per row)

    def __post_init__(self):
        n, k = self.q.shape
        if self.kind not in ("int4", "int8"):
            raise SinkstreamError(f"unknown quantized weight kind {self.kind!r}")
        if k % self.group or self.scale.shape != (n, k // self.group):
            raise SinkstreamError(f"quantized weight [{n}, {k}]: scales {tuple(self.scale.shape)} do not "
                                  f"match groups of {self.group}")
        if self.kind == "int8" and self.group not in (32, k):
            raise SinkstreamError("int8 weights have one scale per row or per 32 columns")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        bits = 4 if self.kind == "int4" else 8
        extra = self.scale.nbytes + (0 if self.zero is None else self.zero.nbytes)
        return self.q.numel() * bits // 8 + extra

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        g = self.q.view(n, k // self.group, self.group).float()
        if self.kind == "int8":
            return (g * self.scale[..., None]).view(n, k).to(dtype)
        g = (g - 8) * self.scale[..., None]
        return (g + self.zero[..., None]).view(n, k).to(dtype)

    def rows(self, index: torch.Tensor | slice) -> "QuantWeight":
        """The weight of the selected output rows (a permutation, a split of a fused projection)."""
        return QuantWeight(self.kind, self.q[index], self.scale[index],
                           None if self.zero is None else self.zero[index], self.group)

    @staticmethod
    def concat(parts: list["QuantWeight"]) -> "QuantWeight":
        """Stack the rows of several weights of one kind and group (fusing q, k and v projections)."""
        kinds = {(p.kind, p.group, p.shape[1]) for p in parts}
        if len(kinds) != 1:
            raise SinkstreamError(f"cannot fuse quantized weights of different forms: {sorted(kinds)}")
        if all(isinstance(p, PackedInt4) for p in parts):
            return PackedInt4(torch.cat([p.packed for p in parts]), torch.cat([p.scale for p in parts]),
                              torch.cat([p.zero for p in parts]))
        zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
        return QuantWeight(parts[0].kind, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                           zero, parts[0].group)

    @classmethod
    def quantize(cls, w: torch.Tensor, kind: str, group: int = 32) -> "QuantWeight":
        """Round a float matrix [N, K] to `kind` (int4: each group's min..max onto 16 levels)."""
        w = w.detach()
        n, k = w.shape
        if kind == "int8":
            scale = (w.float().abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
            q = torch.round(w.float() / scale).clamp_(-127, 127).to(torch.int8)
            return cls("int8", q, scale, None, k)
        if kind != "int4":
            raise SinkstreamError(f"unknown quantization {kind!r} (choose from {', '.join(QUANT_TYPES)})")
        g = w.float().reshape(n, k // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        zero = lo + 8 * scale
        q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15)
        return cls("int4", q.to(torch.uint8).reshape(n, k), scale, zero, group)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 (K a multiple of 32) -> [N, K/2]: in each 32 columns, byte j holds code j in
    its low nibble and code j + 16 in its high one (our kernels' layout; GGUF's Q4_0 and Q4_1 blocks')."""
    n, k = q.shape
    g = q.view(n, k // 32, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4`'s bytes [N, K/2] -> the codes [N, K]."""
    n, half = packed.shape
    p = packed.view(n, half // 16, 16)
    return torch.cat([p & 15, p >> 4], -1).view(n, 2 * half)


class PackedInt4(QuantWeight):
    """An int4 weight (groups of 32) whose codes are held two to a byte as our kernels read them (`pack_int4`'s
    layout, [N, K/2] uint8). GGUF's Q4_0 and Q4_1 blocks hold their codes that way and Q4_K's regroup into it
    with a few bit operations (sinkstream.gguf.quants), so a file's bytes become a layer's without unpacking.
    `q` unpacks the codes when something asks for them (de-quantizing, other backends)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        n, half = packed.shape
        self.kind, self.group, self.packed, self.scale, self.zero = "int4", 32, packed, scale, zero
        if packed.dtype != torch.uint8 or half % 16 or scale.shape != (n, half // 16) or zero.shape != scale.shape:
            raise SinkstreamError(f"packed int4 weight {tuple(packed.shape)}: scales {tuple(scale.shape)} and "
                                  f"zeros {tuple(zero.shape)} do not match groups of 32")

    @property
    def q(self) -> torch.Tensor:
        return unpack_int4(self.packed)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], 2 * self.packed.shape[1])

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.nbytes + self.zero.nbytes

    def rows(self, index: torch.Tensor | slice) -> "PackedInt4":
        return PackedInt4(self.packed[index], self.scale[index], self.zero[index])


def pack_int4_for_cpu(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> the layout of ``_convert_weight_to_int4pack_for_cpu`` ([N, K/2] uint8).

    That op takes int32 input (4 bytes a weight); this builds the same bytes from uint8 for every block of
    64 rows (byte j of column k holds row j in its low and row j + 32 in its high nibble), and leaves only a
    tail of fewer than 64 rows to the op."""
    n, k = q.shape
    full = n - n % 64
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    step = 64 * max(1, (1 << 24) // (64 * k))  # rows per chunk: bounded temporaries for big matrices
    for a in range(0, full, step):
        b = min(full, a + step)
        blk = q[a:b].view((b - a) // 64, 2, 32, k)
        out[a:b] = (blk[:, 0] | (blk[:, 1] << 4)).transpose(1, 2).reshape(b - a, k // 2)
    if full < n:
        out[full:] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[full:].to(torch.int32), 1)
    return out


ROWS_PER_SLICE = 4096  # bounds the bfloat16 temporary of a many-token pass


# A prompt fed in small chunks beside decoding streams (sinkstream.batch) takes the matrix-multiply path in
# every step, as it would alone in large chunks; de-quantizing every weight for each such step costs more than
# the step itself. Inside `keeping_dequantized()` a layer keeps the bfloat16 weight it de-quantized, up to
# KEEP_DEQUANTIZED_BYTES in the process (the same numbers: the same rows multiplied the same way);
# `release_dequantized()` drops them.
KEEP_DEQUANTIZED_BYTES = int(os.environ.get("SINKSTREAM_KEEP_DEQUANTIZED_BYTES", 1 << 30))
_KEEP: contextvars.ContextVar = contextvars.ContextVar("sinkstream_keep_dequantized", default=False)
_kept: "weakref.WeakKeyDictionary[QuantLinear, torch.Tensor]" = weakref.WeakKeyDictionary()


def _kept_bytes() -> int:
    return sum(w.numel() * w.element_size() for w in _kept.values())


@contextlib.contextmanager
def keeping_dequantized():
    """Within the block, quantized layers keep the bfloat16 weights their many-token passes de-quantize."""
    token = _KEEP.set(True)
    try:
        yield
    finally:
        _KEEP.reset(token)


def release_dequantized() -> None:
    """Drop the de-quantized weights `keeping_dequantized` kept."""
    _kept.clear()


def _backend(device: torch.device, fused: bool | None) -> str:
    """"qmm": our int8-activation kernels (sinkstream.kernels); "torch": torch's packed CPU kernels with
    bfloat16 activations (where ours are not built); "dequant": de-quantized weights, plain matmul."""
    if fused is False or device.type != "cpu":
        return "dequant"
    from . import kernels
    return "qmm" if kernels.available() else "torch"


class QuantLinear(nn.Module):
    """A drop-in for nn.Linear holding a `QuantWeight` (see the module docstring)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None, *,
                 out_dtype: torch.dtype = torch.float32, fused: bool | None = None):
        super().__init__()
        n, k = weight.shape
        self.in_features, self.out_features = k, n
        self.kind, self.group, self.out_dtype = weight.kind, weight.group, out_dtype
        self.backend = _backend(weight.scale.device, fused)
        if self.backend == "qmm" and (k % 32 or (weight.kind == "int4" and weight.group != 32)):
            self.backend = "dequant"  # our kernels' blocks are 32 columns
        if self.backend == "torch" and (n % 16 if weight.kind == "int4" else weight.group != k):
            self.backend = "dequant"  # torch packs int4 rows in sixteens; its int8 kernel takes one scale a row
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        if self.backend == "dequant":
            self.register_buffer("weight", weight.dequantize(out_dtype))
        elif self.backend == "qmm":
            if weight.kind == "int4":
                qs = weight.packed if isinstance(weight, PackedInt4) else pack_int4(weight.q)  # the kernel's layout
                self.register_buffer("qs", qs.contiguous())
                self.register_buffer("d", weight.scale.to(torch.float16))
                self.register_buffer("m", (weight.zero - 8 * weight.scale).to(torch.float16))
            else:
                self.register_buffer("qs", weight.q.contiguous())
                self.register_buffer("d", weight.scale.expand(n, k // 32).to(torch.float16).contiguous())  # per row or 32
        elif weight.kind == "int4":
            self.register_buffer("packed", pack_int4_for_cpu(weight.q))
            # the kernel wants [K/group, N, 2] = (scale, zero) per group and output row, in its input dtype
            self.register_buffer("scale_zero", torch.stack([weight.scale, weight.zero], -1).transpose(0, 1)
                                 .to(KERNEL_DTYPE).contiguous())
        else:
            self.register_buffer("qweight", weight.q)
            self.register_buffer("scale", weight.scale.view(-1).to(KERNEL_DTYPE))

    @property
    def fused(self) -> bool:
        return self.backend != "dequant"

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str, group: int = 32, fused: bool | None = None) -> "QuantLinear":
        w = linear.weight.detach()
        return cls(QuantWeight.quantize(w, kind, group), linear.bias, out_dtype=w.dtype, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "dequant":
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.backend == "qmm":
            y = self._qmm(x2)
        elif self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE), self.packed, self.group,
                                                           self.scale_zero)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.qweight, self.scale)
        y = y.to(self.out_dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _qmm(self, x: torch.Tensor) -> torch.Tensor:
        few = few_rows(x.shape[0], QUANT_MANY_TOKENS)
        if few is True:
            return self._few(x)
        if few is False:
            return self._many(x, many_splits(x.shape[0], QUANT_MANY_TOKENS))
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        y[few] = self._few(x[few])
        y[~few] = self._many(x[~few], many_splits(x.shape[0], QUANT_MANY_TOKENS))
        return y

    def _few(self, x: torch.Tensor) -> torch.Tensor:
        """Our kernels: activations quantized to int8 per 32-column block, row by row."""
        ops = torch.ops.sinkstream
        x = x.float().contiguous()
        return ops.q4_mm(x, self.qs, self.d, self.m) if self.kind == "int4" else ops.q8_mm(x, self.qs, self.d)

    def _many(self, x: torch.Tensor, splits: list[int] | None = None) -> torch.Tensor:
        """A bfloat16 matrix multiply over de-quantized slices of rows (kept between passes inside
        `keeping_dequantized`, within KEEP_DEQUANTIZED_BYTES). The library's multiply rounds a row
        differently with the number of rows in the call (never with their values or its place among a
        fixed number of them): `splits` (row counts, one per stream of a batched pass) gives each stream a
        call of its own, the call it makes alone."""
        xb = x.to(torch.bfloat16)
        n = self.out_features
        kept = self._kept_bf16() if _KEEP.get() else None
        bounds = [0]
        for c in splits or [x.shape[0]]:
            bounds.append(bounds[-1] + c)
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        for r0 in range(0, n, ROWS_PER_SLICE):
            r1 = min(n, r0 + ROWS_PER_SLICE)
            w = kept[r0:r1] if kept is not None else self._dequant(r0, r1)
            for a, b in zip(bounds, bounds[1:]):
                y[a:b, r0:r1] = F.linear(xb[a:b], w)
        return y

    def _dequant(self, r0: int, r1: int) -> torch.Tensor:
        ops = torch.ops.sinkstream
        return ops.q4_dequant(self.qs, self.d, self.m, r0, r1) if self.kind == "int4" else \
            ops.q8_dequant(self.qs, self.d, r0, r1)

    def _kept_bf16(self) -> torch.Tensor | None:
        """This layer's de-quantized bfloat16 weight, made once and kept while the budget allows (else None)."""
        w = _kept.get(self)
        if w is None and _kept_bytes() + self.out_features * self.in_features * 2 <= KEEP_DEQUANTIZED_BYTES:
            w = _kept[self] = self._dequant(0, self.out_features)
        return w

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}, group={self.group}, backend={self.backend}"


class QuantEmbedding(nn.Module):
    """An embedding table kept as a `QuantWeight`; a lookup de-quantizes only the rows it returns.
    int4 codes are stored two to a byte (`pack_int4`'s layout: a `PackedInt4`'s bytes as they are)."""

    def __init__(self, weight: QuantWeight, *, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.kind, self.group, self.out_dtype = weight.kind, weight.group, out_dtype
        if weight.kind == "int8":
            codes = weight.q
        else:
            codes = weight.packed if isinstance(weight, PackedInt4) else pack_int4(weight.q)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", weight.scale)
        self.register_buffer("zero", weight.zero if weight.zero is not None else torch.zeros(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = self.codes[flat]
        if self.kind == "int4":
            codes = unpack_int4(codes)
        rows = QuantWeight(self.kind, codes, self.scale[flat], self.zero[flat] if self.kind == "int4" else None,
                           self.group)
        return rows.dequantize(self.out_dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.kind}, group={self.group}"


def layer_kind(kind: str, layer: nn.Linear, vocab: int | None, group: int) -> str | None:
    """The quantization a linear layer gets under `kind`, or None where it stays float: the output projection
    is int8 under int4, and int4 layers need whole groups of input columns."""
    if layer.out_features == vocab or kind == "int8":
        return "int8"
    return kind if layer.in_features % group == 0 else None


def quantize(model: nn.Module, kind: str | None, group: int = 32, *, fused: bool | None = None) -> int:
    """Replace the model's nn.Linear layers in place; returns how many were replaced. Tied embeddings stay
    in full precision for the lookup (only the output projection is quantized, int8 under int4)."""
    if kind in (None, "none"):
        return 0
    check_quant(kind, group)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    done = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):  # plain or sinkstream.linear.Linear: float weights
                continue
            k = layer_kind(kind, child, vocab, group)
            if k is not None:
                setattr(parent, name, QuantLinear.from_linear(child, k, group, fused=fused))
                done += 1
    fuse_projections(model)
    model.quant = kind
    return done


def check_quant(kind: str, group: int = 32) -> None:
    if kind not in QUANT_TYPES:
        raise SinkstreamError(f"unknown quantization {kind!r} (choose from {', '.join(QUANT_TYPES)})")
    if kind == "int4" and (group < 32 or group & (group - 1)):
        raise SinkstreamError(f"int4 group size must be a power of two >= 32, not {group}")


def stack_rows(parts: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear computing all of `parts` (one input, their outputs side by side), or None where they
    cannot share one kernel call. Afterwards each part's buffers are row views of the stacked ones, so the
    weights are held once and the parts still work (and save) on their own."""
    first = parts[0]
    same = {(p.kind, p.backend, p.in_features, p.out_dtype, p.bias is None) for p in parts}
    if len(same) != 1 or first.backend != "qmm":
        return None
    fused = QuantLinear.__new__(QuantLinear)
    nn.Module.__init__(fused)
    fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
    fused.kind, fused.group, fused.out_dtype, fused.backend = first.kind, first.group, first.out_dtype, "qmm"
    fused.split_sizes = [p.out_features for p in parts]
    fused.bias = None if first.bias is None else nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    for name, _ in first.named_buffers(recurse=False):
        whole = torch.cat([getattr(p, name) for p in parts])
        fused.register_buffer(name, whole)
        row = 0
        for p in parts:
            setattr(p, name, whole[row:row + p.out_features])
            row += p.out_features
    return fused


FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_projections(model: nn.Module) -> int:
    """Give modules whose projections read one input (q/k/v; gate/up) one stacked QuantLinear for them
    (`projections` uses it): one kernel call and one activation quantization instead of two or three.
    Returns how many groups were fused."""
    done = 0
    for mod in model.modules():
        for names in FUSABLE:
            parts = [getattr(mod, n, None) for n in names]
            if all(isinstance(p, QuantLinear) for p in parts):
                fused = stack_rows(parts)
                if fused is not None:
                    mod.__dict__.setdefault("_fused", {})[names] = fused  # not a submodule: no second copy in state
                    done += 1
    return done


def projections(mod: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
    """`[mod.<name>(x) for name in names]`, as one matmul where `fuse_projections` stacked them."""
    fused = mod.__dict__.get("_fused", {}).get(names)
    if fused is None:
        return [getattr(mod, n)(x) for n in names]
    return list(fused(x).split(fused.split_sizes, -1))
