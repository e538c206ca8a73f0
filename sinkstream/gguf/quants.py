"""GGUF tensor data -> torch: float tensors as they are, quantized tensors straight into `QuantWeight`.

`decode` reads one tensor's raw bytes (``gguf.GGUFReader``'s ``ReaderTensor.data``) in chunks of rows, so a
128256 x 4096 Q4_K embedding needs a few MB of temporaries, never a float32 copy of the tensor:

* F32, F16, BF16: a torch tensor in that dtype (a copy: torch never holds the reader's read-only memmap).
* Q4_0, Q4_1, Q4_K: ``int4`` with groups of 32, exactly. Q4_0 ``d * (q - 8)`` is scale d, zero 0; Q4_1
  ``d * q + m`` is scale d, zero m + 8d; Q4_K ``d * sc * q - dmin * m`` (per 32 elements) is scale d * sc,
  zero 8 * d * sc - dmin * m. The codes are the file's codes, two to a byte (`PackedInt4`, the kernels'
  layout): Q4_0's and Q4_1's bytes as they are, Q4_K's with their nibbles regrouped.
* Q8_0, Q5_0: ``int8`` with a scale per 32 columns, exactly (the file's codes; Q5_0's minus 16).
* Q5_1, Q5_K, Q6_K: neither runtime form holds these exactly; they are de-quantized a chunk of rows at a
  time and rounded again to the kind in `LOSSY_KIND` ("int8-32": int8, each group of 32 on its own grid).
* Tensors of more than 2 dimensions: float32 (``dequantize``).
* 1-D tensors (norms, biases): a float tensor (float32 for quantized types).

How `LOSSY_KIND` was chosen: weights [2048, 2048] drawn from N(0, 1), with 0 or 4 outliers a row (of
6-10 or 12-25 standard deviations), were quantized to each type (gguf.quants.quantize for Q8_0, Q5_0 and
Q5_1; for Q5_K and Q6_K, which gguf cannot quantize, the min/max quantizers of tests/test_gguf_quants.py),
de-quantized (the GGUF's values), and rounded to each runtime form. Relative RMS error ||a - b|| / ||b||:

            GGUF vs float   per-row int8 vs GGUF          int4 (groups of 32) vs GGUF
    outliers    6-10 sd     none    6-10 sd   12-25 sd    none    6-10 sd   12-25 sd
    Q8_0        0.0065      0.0082  0.0196    0.0389      0.0782  0.0841    0.0951
    Q6_K        0.0217      0.0081  0.0192    0.0390      0.0783  0.0842    0.0949
    Q5_1        0.0407      0.0083  0.0197    0.0392      0.0739  0.0810    0.0996
    Q5_K        0.0412      0.0083  0.0197    0.0392      0.0739  0.0818    0.1009
    Q5_0        0.0514      0.0080  0.0189    0.0370      0.0793  0.0855    0.0949

int8 with a scale per 32 columns (what sinkstream/kernels computes with) loses 0.0063-0.0064 on the 6-10 sd
case ([256, 2048]) for Q6_K, Q5_1 and Q5_K, and nothing for Q8_0 and Q5_0: a third of per-row int8's loss
and a quarter or less of each format's own error against the floats, so that is the choice. Per-row int8
("int8") is the form torch's own int8 kernel needs; int4 loses 2.4-10x more than either.

Throughput, MB of GGUF data a second through `decode` for [5632, 2048] of random blocks (one thread, CPU time,
outputs in fresh memory as while a model loads, on this shared 2-core machine): Q4_0 ~2350, Q4_1 ~2200, Q8_0
~1050, Q4_K ~700, Q5_0 ~230, Q6_K ~175, Q5_1 ~140, Q5_K ~135. Q4_0's and Q4_1's codes are copied as they
are, Q4_K's regrouped with bit operations on 64-bit words (8 bytes an operation); faulting in the outputs'
pages is much of their time (Q4_0 runs at ~6000, Q4_K at ~1200, when the memory is reused). The other types
spend most of their time on float32 passes (convert, scale, max, min, divide, round, narrow to int8).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import ModelLoadError
from ..quant import PackedInt4, QuantWeight

FLOAT_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
EXACT_INT4 = (T.Q4_0, T.Q4_1, T.Q4_K)
# The runtime form of each type that int4 groups cannot hold exactly (measured: the module docstring).
# "int8-32": int8 with a scale per 32 columns (our kernels' layout); "int8": one scale a row; "int4".
LOSSY_KIND = {T.Q8_0: "int8-32", T.Q6_K: "int8-32", T.Q5_0: "int8-32", T.Q5_1: "int8-32", T.Q5_K: "int8-32"}
SUPPORTED_TYPES = tuple(t.name for t in (*FLOAT_DTYPES, *EXACT_INT4, *LOSSY_KIND))
CHUNK_BYTES = 4 << 20  # float32 bytes of one chunk of rows: temporaries stay a few times this
GROUP = 32
# Each block is copied into a slot of `slot` bytes at offset `pad`, so that its code bytes start on 8-byte
# boundaries: the bit unpacking then works on int64 words, 8 codes an operation. (Q4_0 and Q4_1 are read where
# they lie: `_q4_0_1`.)
_SLOTS = {T.Q5_0: (2, 24), T.Q5_1: (0, 24), T.Q8_0: (6, 40), T.Q4_K: (0, 144), T.Q5_K: (0, 176), T.Q6_K: (0, 216)}
_LOW4 = 0x0F0F0F0F0F0F0F0F  # in every byte of a word: its low nibble
_LOW4_U, _HIGH4_U = np.uint64(_LOW4), np.uint64(_LOW4 << 4)  # the same, and the high nibbles, for numpy words
_V16 = np.dtype("V16")  # 16 bytes as one item: numpy copies these fast, whatever their alignment


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block [..., bytes] -> float32 [..., 1]."""
    return blocks[..., at:at + 2].view(torch.float16).float()


def _words(blocks: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """Bytes at..at+n of every block as int64 words [..., n / 8] (`at` is 8-aligned in the slot)."""
    return blocks[..., at:at + n].view(torch.int64)


def _nibbles(packed: torch.Tensor, out: torch.Tensor) -> None:
    """int64 words of packed nibbles [..., n] -> out (uint8 codes) [..., 2, 8n]: low nibbles, then high."""
    torch.stack([packed & _LOW4, (packed >> 4).bitwise_and_(_LOW4)], -2, out=out.view(torch.int64))


def _k_scales(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: d, dmin and 12 bytes of 6-bit scales and mins -> [..., 2, 8] float32: d * scale and
    dmin * min of each sub-block.

    Bytes 4-7 hold scales 0-3 and 8-11 mins 0-3 in their low 6 bits; bytes 12-15 hold the low 4 bits of
    scales 4-7 (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the top bits of bytes 4-11.
    Worked on as three int32 words, four 6-bit values an operation."""
    w = blocks[..., 4:16].view(torch.int32)  # [.., 3]
    low = w[..., :2] & 0x3F3F3F3F  # scales 0-3, mins 0-3
    high = (w[..., 2:] >> torch.tensor([0, 4], dtype=torch.int32)).bitwise_and_(0x0F0F0F0F)
    high |= (w[..., :2] >> 2).bitwise_and_(0x30303030)  # scales 4-7, mins 4-7
    both = torch.stack([low, high], -1).view(torch.uint8).view(*w.shape[:-1], 2, 8).float()
    return both.mul_(blocks[..., 0:4].view(torch.float16).float().unsqueeze(-1))


# int4-exact types: rows [N, bytes] -> packed codes [N, K / 2] in `PackedInt4`'s layout (in each 32 elements, byte
# j holds element j in its low nibble and j + 16 in its high one), scale and zero [N, K / 32]

def _q4_0_1(t: T, raw: np.ndarray, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Q4_0 / Q4_1: the 16 bytes of codes a block are the kernels' layout: one copy of 16-byte items, and d (and
    m) converted where they lie, straight into the outputs (no temporaries)."""
    blocks = raw.view(_Q4_0_1_BLOCK[t])  # [N, nb]
    packed.numpy().view(_V16)[...] = blocks["qs"]
    np.copyto(scale.numpy(), blocks["d"])
    if t == T.Q4_0:
        zero.zero_()
    else:
        np.copyto(zero.numpy(), blocks["m"])
        zero.add_(scale, alpha=8)


def _q4_k(raw: np.ndarray, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Q4_K, a chunk of rows at a time. Per 64 elements 32 bytes B: element j of sub-block 2c is B[j]'s low
    nibble, of sub-block 2c + 1 its high nibble. So byte j (0-15) of sub-block 2c is B[j] & 15 | (B[j + 16] &
    15) << 4, of sub-block 2c + 1 B[j] >> 4 | B[j + 16] & 0xF0. The halves B[:16] and B[16:] are gathered as
    16-byte items (a fast copy) into scratch words reused by every chunk, so that the bit operations run over
    long contiguous runs of 64-bit words, 8 bytes an operation, and allocate nothing (a load maps every block
    of 128 KiB or more afresh: sinkstream/_malloc.py)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    nb = k // 256
    lo, hi, tmp, odd = np.empty((4, min(n, _rows_per_chunk(k)), nb, 4, 2), np.uint64)  # [.., 64 elements, words]
    for a, b, blocks in _chunks(T.Q4_K, raw, k):
        r = b - a
        lo_, hi_, tmp_, odd_ = lo[:r], hi[:r], tmp[:r], odd[:r]
        halves = blocks[..., 16:144].numpy().view(_V16)  # [R, nb, 8]: B[:16], B[16:] of each 64 elements
        lo_.view(_V16)[..., 0] = halves[..., 0::2]
        hi_.view(_V16)[..., 0] = halves[..., 1::2]
        np.bitwise_and(hi_, _LOW4_U, out=tmp_)
        np.left_shift(tmp_, np.uint64(4), out=tmp_)  # B[j + 16] & 15 << 4
        np.bitwise_and(hi_, _HIGH4_U, out=hi_)  # B[j + 16] & 0xF0
        np.right_shift(lo_, np.uint64(4), out=odd_)
        np.bitwise_and(odd_, _LOW4_U, out=odd_)
        np.bitwise_or(odd_, hi_, out=odd_)  # sub-block 2c + 1
        np.bitwise_and(lo_, _LOW4_U, out=lo_)
        np.bitwise_or(lo_, tmp_, out=lo_)  # sub-block 2c
        out = packed[a:b].numpy().view(_V16).reshape(r, nb, 4, 2)  # [.., 64 elements, sub-block 2c | 2c + 1]
        out[..., 0] = lo_.view(_V16)[..., 0]
        out[..., 1] = odd_.view(_V16)[..., 0]
        scale_min = _k_scales(blocks)
        scale[a:b].view(r, nb, 8).copy_(scale_min[..., 0, :])
        torch.mul(scale_min[..., 0, :], 8, out=zero[a:b].view(r, nb, 8)).sub_(scale_min[..., 1, :])


# the other types: blocks [R, nb, bytes] -> float32 values [R, nb, block]

def _q5_codes(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """Q5_0/Q5_1: 32 high bits (a little-endian uint32 at byte `at`) over 16 bytes of nibbles -> 0..31."""
    q = torch.empty(*blocks.shape[:-1], 2, 16, dtype=torch.uint8)
    _nibbles(_words(blocks, at + 4, 16), q)
    shifts = torch.arange(8, dtype=torch.uint8)
    high = torch.bitwise_right_shift(blocks[..., at:at + 4].unsqueeze(-1), shifts)  # element 8 * byte + bit
    return q.flatten(-2).bitwise_or_(high.bitwise_and_(1).bitwise_left_shift_(4).flatten(-2))


def _q5_0(blocks):
    return _q5_codes(blocks, 2).float().sub_(16).mul_(_f16(blocks, 0))


def _q5_1(blocks):
    return _q5_codes(blocks, 4).float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q8_0(blocks):
    return blocks[..., 2:].view(torch.int8).float().mul_(_f16(blocks, 0))


def _high_bits(packed: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """int64 words [..., n] -> [..., groups, n]: group j holds bits j*bits.. of each byte, moved to bit 4
    (one shift and one mask a group: shifting whole words never mixes bytes inside the mask)."""
    packed = packed.contiguous()
    moved = [packed << (4 - s) if s <= 4 else packed >> (s - 4) for s in range(0, bits * groups, bits)]
    return torch.stack(moved, -2).bitwise_and_(0x1010101010101010 * ((1 << bits) - 1))


def _q5_k(blocks):
    lead = blocks.shape[:-1]
    q = torch.empty(*lead, 4, 2, 32, dtype=torch.uint8)
    _nibbles(_words(blocks, 48, 128).unflatten(-1, (4, 4)), q)
    # sub-block j's high bit of element l is bit j of byte l of the 32 bytes at 16
    q.view(torch.int64).view(*lead, 8, 4).bitwise_or_(_high_bits(_words(blocks, 16, 32), 1, 8))
    scale_min = _k_scales(blocks).unsqueeze(-1)
    return q.view(*lead, 8, 32).float().mul_(scale_min[..., 0, :, :]).sub_(scale_min[..., 1, :, :]).flatten(-2)


def _q6_k(blocks):
    # two halves of 128: 64 bytes of nibbles (quarters 0, 1 low, quarters 2, 3 high) and 32 bytes holding
    # the top 2 bits of quarter t at bits 2t
    lead = blocks.shape[:-1]
    q = torch.empty(*lead, 2, 2, 2, 32, dtype=torch.uint8)  # [.., half, nibble, part, 32]
    _nibbles(_words(blocks, 0, 128).unflatten(-1, (2, 2, 4)), q.transpose(-3, -2))
    high = _high_bits(_words(blocks, 128, 64).unflatten(-1, (2, 4)), 2, 4)  # [.., half, quarter, 4 words]
    q.view(torch.int64).view(*lead, 2, 4, 4).bitwise_or_(high)
    scales = blocks[..., 192:208].view(torch.int8).float().mul_(_f16(blocks, 208))
    return q.sub_(32).view(torch.int8).view(*lead, 16, 16).float().mul_(scales.unsqueeze(-1)).flatten(-2)


_Q4_0_1_BLOCK = {T.Q4_0: np.dtype([("d", "<f2"), ("qs", "V16")]),
                 T.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "V16")])}
_VALUES = {T.Q8_0: _q8_0, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q5_K: _q5_k, T.Q6_K: _q6_k}


def _type_name(ggml_type: int) -> str:
    try:
        return T(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def _rows(name: str, ggml_type: int, shape: tuple[int, ...], data) -> tuple[T, np.ndarray]:
    """Check the type and size; the data as bytes [rows, bytes per row] (a view where the data allows)."""
    if ggml_type not in FLOAT_DTYPES and ggml_type not in EXACT_INT4 and ggml_type not in _VALUES:
        raise ModelLoadError(f"tensor {name!r} has type {_type_name(ggml_type)}, which sinkstream cannot "
                             f"read (supported: {', '.join(SUPPORTED_TYPES)})")
    t = T(ggml_type)
    block, size = GGML_QUANT_SIZES[t]
    k = shape[-1] if shape else 1
    if k % block:
        raise ModelLoadError(f"tensor {name!r} ({t.name}, shape {list(shape)}): rows of {k} are not a "
                             f"multiple of the {block}-element block")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if shape else 1
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    if raw.size != rows * (k // block) * size:
        raise ModelLoadError(f"tensor {name!r} ({t.name}, shape {list(shape)}) has {raw.size} bytes of data, "
                             f"not {rows * (k // block) * size} (truncated or damaged file)")
    return t, raw.reshape(rows, k // block * size)


def _chunks(t: T, raw: np.ndarray, k: int):
    """(start, stop, blocks [R, k / block, size] uint8): each chunk of rows copied into aligned slots."""
    block, size = GGML_QUANT_SIZES[t]
    pad, slot = _SLOTS[t]
    step = _rows_per_chunk(k)
    buf = torch.empty(min(step, raw.shape[0]), k // block, slot, dtype=torch.uint8)
    for a in range(0, raw.shape[0], step):
        b = min(raw.shape[0], a + step)
        buf[:b - a].numpy()[..., pad:pad + size] = raw[a:b].reshape(b - a, k // block, size)
        yield a, b, buf[:b - a, :, pad:pad + size]


def _float(t: T, raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(raw.copy()).view(FLOAT_DTYPES[t]).reshape(shape)


def _round_int8(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Values [R, K] (overwritten) -> codes into q (int8 [R, K]); returns the row scales [R, 1]. The same
    rounding as ``QuantWeight.quantize(v, "int8")``, in two passes over v and no temporaries."""
    # max |v| as max(max, -min): two fast reductions where abs().amax() or an inf-norm is 3-10x slower
    top = torch.maximum(v.amax(1, keepdim=True), v.amin(1, keepdim=True).neg_())
    scale = top.div_(127).clamp_min_(1e-12)
    q.copy_(v.div_(scale).round_())  # |v / scale| <= 127 by construction
    return scale


def _rows_per_chunk(k: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(k, 1)))


def _int4(t: T, raw: np.ndarray, n: int, k: int) -> PackedInt4:
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale, zero = torch.empty(n, k // GROUP), torch.empty(n, k // GROUP)
    if t == T.Q4_K:
        _q4_k(raw, packed, scale, zero)
    else:
        _q4_0_1(t, raw, packed, scale, zero)
    return PackedInt4(packed, scale, zero)


def _round_int8_groups(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Values [R, K] (overwritten) -> int8 codes into q [R, K]; returns scales [R, K / 32]: each group of 32
    on its own symmetric grid of 255 levels."""
    r, k = v.shape
    g = v.view(r, k // GROUP, GROUP)
    scale = torch.maximum(g.amax(-1), g.amin(-1).neg_()).div_(127).clamp_min_(1e-12)
    q.view(r, k // GROUP, GROUP).copy_(g.div_(scale.unsqueeze(-1)).round_())
    return scale


def _int8_codes(t: T, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 and Q5_0 blocks [R, nb, size] are int8 with a scale per 32 exactly: (codes [R, nb, 32], d)."""
    if t == T.Q8_0:
        return blocks[..., 2:34].view(torch.int8), _f16(blocks, 0)
    return _q5_codes(blocks, 2).view(torch.int8).sub_(16), _f16(blocks, 0)


def _requantized(t: T, raw: np.ndarray, n: int, k: int, kind: str) -> QuantWeight:
    if kind == "int8-32":
        q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // GROUP)
        for a, b, blocks in _chunks(t, raw, k):
            if t in (T.Q8_0, T.Q5_0):
                codes, d = _int8_codes(t, blocks)
                q[a:b], scale[a:b] = codes.reshape(b - a, k), d.reshape(b - a, k // GROUP)
            else:
                scale[a:b] = _round_int8_groups(_VALUES[t](blocks).view(b - a, k), q[a:b])
        return QuantWeight("int8", q, scale, None, GROUP)
    if kind == "int8":
        q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n, 1)
        for a, b, blocks in _chunks(t, raw, k):
            scale[a:b] = _round_int8(_VALUES[t](blocks).view(b - a, k), q[a:b])
        return QuantWeight("int8", q, scale, None, k)
    q = torch.empty(n, k, dtype=torch.uint8)
    scale, zero = torch.empty(n, k // GROUP), torch.empty(n, k // GROUP)
    for a, b, blocks in _chunks(t, raw, k):
        part = QuantWeight.quantize(_VALUES[t](blocks).view(b - a, k), "int4", GROUP)
        q[a:b], scale[a:b], zero[a:b] = part.q, part.scale, part.zero
    return QuantWeight("int4", q, scale, zero, GROUP)


def dequantize(name: str, ggml_type: int, shape: tuple[int, ...], data) -> torch.Tensor:
    """A tensor's values as float32 of `shape` (torch order: rows first), for every supported type."""
    shape = tuple(int(s) for s in shape)
    t, raw = _rows(name, ggml_type, shape, data)
    if t in FLOAT_DTYPES:
        return _float(t, raw, shape).float()
    n, k = raw.shape[0], shape[-1]
    out = torch.empty(n, k)
    if t in EXACT_INT4:
        step = _rows_per_chunk(k)
        for a in range(0, n, step):
            out[a:a + step] = _int4(t, raw[a:a + step], min(step, n - a), k).dequantize()
    else:
        for a, b, blocks in _chunks(t, raw, k):
            out[a:b] = _VALUES[t](blocks).view(b - a, k)
    return out.reshape(shape)


def decode(name: str, ggml_type: int, shape: tuple[int, int] | tuple[int], data) -> torch.Tensor | QuantWeight:
    """One GGUF tensor in the runtime's form (see the module docstring). `shape` is in torch order (the
    reverse of GGUF's ``ne``); `data` is its raw data as ``ReaderTensor.data`` gives it."""
    shape = tuple(int(s) for s in shape)
    t, raw = _rows(name, ggml_type, shape, data)
    if t in FLOAT_DTYPES:
        return _float(t, raw, shape)
    if len(shape) != 2:
        return dequantize(name, ggml_type, shape, data)
    n, k = shape
    if t in EXACT_INT4:
        return _int4(t, raw, n, k)
    return _requantized(t, raw, n, k, LOSSY_KIND[t])
