"""GGUF tensor decoding (sinkstream.gguf.quants) against gguf's own de-quantization.

Blocks come from gguf.quants.quantize where it can quantize the type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), from
the min/max quantizers below (Q4_K, Q5_K, Q6_K, which gguf only de-quantizes), or are random valid bytes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402

from sinkstream.errors import ModelLoadError  # noqa: E402
from sinkstream.gguf import quants  # noqa: E402
from sinkstream.gguf.quants import LOSSY_KIND, decode, dequantize  # noqa: E402
from sinkstream.quant import PackedInt4, QuantEmbedding, QuantLinear, QuantWeight  # noqa: E402

QUANTIZED = [T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0]
GGUF_QUANTIZES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
# relative RMS error of the int8 weights vs the GGUF's values on `realistic_weights`: measured 0.0189-0.0197
# for [2048, 2048] (quants.py's table), 0.0176-0.0186 for the [64, 1024] here
LOSSY_BOUND = 0.021
# the same for int8 with a scale per 32 (Q6_K, Q5_1, Q5_K): measured 0.0063-0.0064 for [256, 2048]
INT8_32_BOUND = 0.008


def realistic_weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    """N(0, 1) with 4 outliers of 6-10 standard deviations a row (the middle case of quants.py's table)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    cols = rng.integers(0, k, (n, 4))
    w[np.arange(n)[:, None], cols] = rng.uniform(6, 10, (n, 4)) * rng.choice([-1, 1], (n, 4))
    return w


def _f16(x: np.ndarray) -> np.ndarray:
    """float -> its float16 bytes [..., 2]."""
    return np.ascontiguousarray(x, dtype=np.float16)[..., None].view(np.uint8)


def _k_scale_bytes(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [B, 8] -> Q4_K/Q5_K's 12 bytes [B, 12]."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def quantize_k(w: np.ndarray, t: T) -> np.ndarray:
    """Q4_K, Q5_K or Q6_K blocks [rows, bytes per row] of w, by min/max (or max |w|) per sub-block."""
    n, k = w.shape
    if t == T.Q6_K:
        x = w.reshape(-1, 16, 16)
        amax = np.abs(x).max(-1)
        d = (amax.max(-1) / 31 / 127).astype(np.float16)
        sc = np.clip(np.round(amax / 31 / np.where(d == 0, 1, d.astype(np.float32))[:, None]), 0, 127)
        step = (d.astype(np.float32)[:, None] * sc)[..., None]
        q = (np.clip(np.round(x / np.where(step == 0, 1, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
        low = q & 15
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], -1)
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), _f16(d)]
        return np.concatenate(parts, -1).reshape(n, -1)
    top = 15 if t == T.Q4_K else 31
    x = w.reshape(-1, 8, 32)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    step, low = (hi - lo) / top, -lo
    d, dmin = (step.max(-1) / 63).astype(np.float16), (low.max(-1) / 63).astype(np.float16)
    sc = np.clip(np.round(step / np.where(d == 0, 1, d.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(low / np.where(dmin == 0, 1, dmin.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    s = (d.astype(np.float32)[:, None] * sc)[..., None]
    m = (dmin.astype(np.float32)[:, None] * mn)[..., None]
    q = np.clip(np.round((x + m) / np.where(s == 0, 1, s)), 0, top).astype(np.uint8).reshape(-1, 4, 2, 32)
    parts = [_f16(d), _f16(dmin), _k_scale_bytes(sc, mn)]
    if t == T.Q5_K:
        bits = (q.reshape(-1, 8, 32) >> 4) << np.arange(8, dtype=np.uint8)[:, None]
        parts.append(np.bitwise_or.reduce(bits, axis=1))
    parts.append(((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(-1, 128))
    return np.concatenate(parts, -1).reshape(n, -1)


def quantize(w: np.ndarray, t: T) -> np.ndarray:
    return gguf.quants.quantize(w, t) if t in GGUF_QUANTIZES else quantize_k(w, t)


def random_blocks(t: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes [n, bytes per row], with sane float16 fields (random bytes there would be NaN or huge)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    signed = {T.Q4_0: 0, T.Q5_0: 0, T.Q8_0: 0, T.Q6_K: 208}
    unsigned = {T.Q4_1: (0, 2), T.Q5_1: (0, 2), T.Q4_K: (0, 2), T.Q5_K: (0, 2)}
    if t in signed:
        b[..., signed[t]:signed[t] + 2] = _f16(rng.uniform(-0.1, 0.1, b.shape[:2]))
    else:
        d, m = unsigned[t]
        b[..., d:d + 2] = _f16(rng.uniform(0, 0.1, b.shape[:2]))
        b[..., m:m + 2] = _f16(rng.uniform(-0.1, 0.1, b.shape[:2]) if t == T.Q4_1 else rng.uniform(0, 0.1, b.shape[:2]))
    return b.reshape(n, -1)


def reference(data: np.ndarray, t: T) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, t).copy())


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("t", QUANTIZED, ids=lambda t: t.name)
def test_dequantize_matches_gguf(t):
    data = random_blocks(t, 24, 512)
    ref = reference(data, t)
    got = dequantize("blk.0.w", t, (24, 512), data)
    assert got.dtype == torch.float32 and got.shape == (24, 512)
    # int4-exact types go through (q - 8) * scale + zero: float32 rounding of the same numbers
    assert (got - ref).abs().max() <= 1e-6 * ref.abs().max()
    if t not in (T.Q4_1, T.Q4_K):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["quantized", "random"])
def test_4bit_types_load_as_int4_exactly(t, source):
    data = quantize(realistic_weights(32, 512), t) if source == "quantized" else random_blocks(t, 32, 512)
    ref = reference(data, t)
    w = decode("blk.0.ffn_up.weight", t, (32, 512), data)
    assert isinstance(w, QuantWeight) and w.kind == "int4" and w.group == 32 and w.shape == (32, 512)
    assert w.q.dtype == torch.uint8 and int(w.q.max()) <= 15
    size = (w.scale.abs() * 8 + w.zero.abs()).amax()
    assert (w.dequantize() - ref).abs().max() <= 4e-7 * size
    if t == T.Q4_0:
        assert torch.equal(w.dequantize(), ref) and not w.zero.any()


def int4_codes(data: np.ndarray, t: T, n: int, k: int) -> QuantWeight:
    """Q4_0, Q4_1 or Q4_K bytes [n, bytes per row] read the way gguf's de-quantization reads them, in numpy:
    codes [n, k], and scale and zero per 32 (the runtime's ``(q - 8) * scale + zero``)."""
    block, size = GGML_QUANT_SIZES[t]
    b = data.reshape(n, k // block, size)

    def f16(at):
        return b[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]

    if t in (T.Q4_0, T.Q4_1):  # 16 bytes: elements 0-15 in the low nibbles, 16-31 in the high ones
        qs = b[..., 2:18] if t == T.Q4_0 else b[..., 4:20]
        q = np.concatenate([qs & 15, qs >> 4], -1)
        scale = f16(0)
        zero = np.zeros_like(scale) if t == T.Q4_0 else f16(2) + np.float32(8) * scale
    else:  # per 64 elements 32 bytes: elements 0-31 in the low nibbles, 32-63 in the high ones
        qs = b[..., 16:144].reshape(n, -1, 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], -2)
        s = b[..., 4:16].astype(np.int64)
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
        mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        scale = f16(0) * sc.astype(np.float32)
        zero = np.float32(8) * scale - f16(2) * mn.astype(np.float32)
    return QuantWeight("int4", torch.from_numpy(q.reshape(n, k).astype(np.uint8)),
                       torch.from_numpy(scale.reshape(n, -1)), torch.from_numpy(zero.reshape(n, -1)), 32)


@pytest.mark.parametrize("t,k", [(T.Q4_0, 576), (T.Q4_1, 576), (T.Q4_K, 768)], ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("source", ["quantized", "random"])
def test_int4_types_stay_packed_as_the_kernels_read_them(t, k, source):
    """The codes stay two to a byte in the kernels' layout (Q4_0's and Q4_1's bytes as they are, Q4_K's
    regrouped): the same codes, scales and zeros as the file's, read independently, so every layer buffer is
    what unpacked codes give; rows and stacking (fused projections) keep them packed."""
    data = quantize(realistic_weights(40, k), t) if source == "quantized" else random_blocks(t, 40, k)
    w, want = decode("blk.0.ffn_up.weight", t, (40, k), data), int4_codes(data, t, 40, k)
    assert isinstance(w, PackedInt4) and w.shape == (40, k) and w.nbytes == 40 * k // 2 + 2 * 40 * k // 32 * 4
    assert torch.equal(w.q, want.q) and torch.equal(w.scale, want.scale) and torch.equal(w.zero, want.zero)
    assert torch.equal(w.dequantize(), want.dequantize())
    assert torch.equal(dequantize("blk.0.ffn_up.weight", t, (40, k), data), want.dequantize())
    ref = reference(data, t)
    assert (w.dequantize() - ref).abs().max() <= 4e-7 * (w.scale.abs() * 8 + w.zero.abs()).amax()
    for fused in (None, False):
        fast, slow = (dict(QuantLinear(x, fused=fused).named_buffers()) for x in (w, want))
        assert fast.keys() == slow.keys() and all(torch.equal(fast[b], slow[b]) for b in fast), fused
    ids = torch.tensor([[3, 0, 39], [7, 7, 12]])
    emb = QuantEmbedding(w)(ids)
    assert torch.equal(emb, QuantEmbedding(want)(ids)) and torch.equal(emb, want.dequantize()[ids])
    both = QuantWeight.concat([w.rows(slice(0, 10)), w.rows(slice(10, 40))])
    assert isinstance(both, PackedInt4) and torch.equal(both.packed, w.packed)
    perm = torch.randperm(40)
    assert torch.equal(w.rows(perm).q, want.q[perm])
    assert torch.equal(QuantWeight.concat([w, want]).dequantize(), torch.cat([want.dequantize()] * 2))


@pytest.mark.parametrize("t", list(LOSSY_KIND), ids=lambda t: t.name)
def test_other_types_load_as_int8_with_a_scale_per_32(t):
    data = quantize(realistic_weights(64, 1024), t)
    ref = reference(data, t)
    w = decode("blk.0.attn_v.weight", t, (64, 1024), data)
    assert w.kind == "int8" and w.group == 32 and w.shape == (64, 1024)
    if t in (T.Q8_0, T.Q5_0):  # the file's codes and scales: exact
        assert torch.equal(w.dequantize(), ref)
        return
    assert rel_rms(w.dequantize(), ref) < INT8_32_BOUND
    # the module docstring's table: a scale per 32 loses less than one a row, and far less than int4
    for kind in ("int8", "int4"):
        assert rel_rms(w.dequantize(), ref) < rel_rms(QuantWeight.quantize(ref, kind).dequantize(), ref)


def test_per_row_int8_is_the_runtime_rounding():
    """LOSSY_KIND "int8" (one scale a row) rounds as QuantWeight.quantize does."""
    data = quantize(realistic_weights(64, 1024), T.Q6_K)
    ref = reference(data, T.Q6_K)
    w = quants._requantized(T.Q6_K, quants._rows("x", T.Q6_K, (64, 1024), data)[1], 64, 1024, "int8")
    want = QuantWeight.quantize(ref, "int8")
    assert torch.equal(w.q, want.q) and torch.allclose(w.scale, want.scale, rtol=1e-6, atol=0)
    assert rel_rms(w.dequantize(), ref) < LOSSY_BOUND


def test_lossy_kind_is_swappable(monkeypatch):
    """LOSSY_KIND is the one switch: Q6_K as int4 is the runtime's own int4 rounding of the GGUF values."""
    monkeypatch.setitem(quants.LOSSY_KIND, T.Q6_K, "int4")
    data = quantize_k(realistic_weights(16, 512), T.Q6_K)
    ref = reference(data, T.Q6_K)
    w, want = decode("x", T.Q6_K, (16, 512), data), QuantWeight.quantize(ref, "int4")
    assert w.kind == "int4" and torch.equal(w.q, want.q)
    assert torch.equal(w.scale, want.scale) and torch.equal(w.zero, want.zero)


def test_own_k_quantizers_are_close_to_the_weights():
    """The Q4_K/Q5_K/Q6_K blocks the other tests use are real quantizations, not just valid bytes."""
    w = realistic_weights(16, 512)
    for t, bound in ((T.Q4_K, 0.1), (T.Q5_K, 0.055), (T.Q6_K, 0.032)):  # measured 0.094, 0.046, 0.026
        assert rel_rms(reference(quantize_k(w, t), t), torch.from_numpy(w)) < bound, t.name


@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_int4_weights_run_in_the_fused_kernel(t):
    data = quantize(realistic_weights(64, 512, seed=3), t)
    ref = reference(data, t)
    layer = QuantLinear(decode("blk.0.attn_q.weight", t, (64, 512), data))
    assert layer.fused
    x = torch.randn(5, 512)
    want = x @ ref.T
    # the kernel rounds activations on its way (measured: 0.3-0.55% of the largest output)
    assert (layer(x) - want).abs().max() <= 0.01 * want.abs().max()
    plain = QuantLinear(decode("blk.0.attn_q.weight", t, (64, 512), data), fused=False)
    assert torch.allclose(plain(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_chunks_cover_every_row(monkeypatch):
    """Rows are decoded a chunk at a time through one reused buffer; a short last chunk included."""
    data = {t: quantize(realistic_weights(11, 512), t) for t in (T.Q4_0, T.Q4_K, T.Q8_0, T.Q6_K)}
    whole = {t: decode("x", t, (11, 512), d) for t, d in data.items()}
    monkeypatch.setattr(quants, "CHUNK_BYTES", 3 * 512 * 4)  # 3 rows a chunk
    for t, want in whole.items():
        got = decode("x", t, (11, 512), data[t])
        assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
        values = want.dequantize() if want.kind == "int4" else reference(data[t], t)
        assert torch.equal(dequantize("x", t, (11, 512), data[t]), values)


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_keep_their_dtype(t):
    w = torch.randn(6, 40).to(quants.FLOAT_DTYPES[t])
    data = w.view(torch.uint8).numpy() if t == T.BF16 else w.numpy()  # gguf holds BF16 as bytes
    data = np.lib.stride_tricks.as_strided(data, writeable=False)  # like the reader's memmap
    got = decode("token_embd.weight", t, (6, 40), data)
    assert got.dtype == w.dtype and torch.equal(got, w)
    got.add_(1)  # a copy: writable, and the file's data is untouched
    assert torch.equal(dequantize("token_embd.weight", t, (6, 40), data), w.float())


def test_1d_tensors_are_float():
    w = realistic_weights(1, 256)[0]
    for t in (T.Q8_0, T.Q4_K, T.Q6_K):
        data = quantize(w[None], t)[0]
        got = decode("blk.0.attn_norm.weight", t, (256,), data)
        assert got.dtype == torch.float32 and got.shape == (256,)
        assert torch.allclose(got, reference(data[None], t)[0], rtol=1e-6, atol=1e-6)
    norm = np.ones(64, np.float16)
    assert decode("output_norm.weight", T.F16, (64,), norm).dtype == torch.float16


@pytest.mark.parametrize("t", [T.Q2_K, T.Q3_K, T.IQ4_NL], ids=lambda t: t.name)
def test_unsupported_types_name_the_tensor(t):
    data = np.zeros((4, 256 // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1]), np.uint8)
    with pytest.raises(ModelLoadError) as e:
        decode("blk.3.ffn_down.weight", t, (4, 256), data)
    msg = str(e.value)
    assert "\n" not in msg and "blk.3.ffn_down.weight" in msg and t.name in msg and "Q4_K" in msg


def test_damaged_data_names_the_tensor():
    data = random_blocks(T.Q4_K, 4, 512)
    with pytest.raises(ModelLoadError, match=r"blk\.1\.attn_k\.weight.*Q4_K.*truncated"):
        decode("blk.1.attn_k.weight", T.Q4_K, (4, 512), data.reshape(-1)[:-7])
    with pytest.raises(ModelLoadError, match=r"blk\.1\.attn_k\.weight.*Q4_K"):
        dequantize("blk.1.attn_k.weight", T.Q4_K, (4, 512), data[:3])
    with pytest.raises(ModelLoadError, match=r"blk\.1\.x.*Q4_0.*multiple"):
        decode("blk.1.x", T.Q4_0, (4, 48), np.zeros((4, 27), np.uint8))


def test_tensors_read_from_a_gguf_file(tmp_path):
    """Through gguf's writer and reader: ReaderTensor.shape is GGUF's ne (columns first) and a quantized
    tensor's data is its bytes [rows, bytes per row]."""
    w = realistic_weights(48, 512, seed=5)
    tensors = {"blk.0.ffn_up.weight": (T.Q4_K, quantize_k(w, T.Q4_K)),
               "blk.0.ffn_down.weight": (T.Q6_K, quantize_k(w, T.Q6_K)),
               "blk.0.attn_q.weight": (T.Q4_0, gguf.quants.quantize(w, T.Q4_0)),
               "token_embd.weight": (T.BF16, gguf.quants.quantize(w, T.BF16)),
               "output.weight": (T.F16, w.astype(np.float16)),
               "output_norm.weight": (T.F32, w[0])}
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (t, data) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=t if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    assert {r.name for r in reader.tensors} == set(tensors)
    for r in reader.tensors:
        shape = tuple(reversed(r.shape.tolist()))
        assert shape == ((512,) if r.name == "output_norm.weight" else (48, 512))
        got = decode(r.name, r.tensor_type, shape, r.data)
        want = reference(np.asarray(r.data), r.tensor_type) if r.tensor_type != T.F32 else torch.from_numpy(w[0])
        if isinstance(got, QuantWeight):
            assert r.data.shape == tensors[r.name][1].shape and r.data.dtype == np.uint8
            assert rel_rms(got.dequantize(), want) < (1e-6 if got.kind == "int4" else LOSSY_BOUND)
        else:
            assert got.dtype == quants.FLOAT_DTYPES[r.tensor_type] and torch.equal(got.float(), want.reshape(shape))
