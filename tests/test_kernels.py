"""Our CPU kernels (sinkstream/kernels/qmm.cpp) against de-quantized references, and the layers around them."""
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sinkstream import kernels
from sinkstream.passrows import MANY_TOKENS, QUANT_MANY_TOKENS, rows_by_stream
from sinkstream.quant import QuantLinear, QuantWeight, fuse_projections, projections, quantize

from conftest import hf_tiny, ours_from_hf

# Where a C++ compiler and x86 AVX2 are there (make builds the kernels), they must have been built: a
# failed build is a failure, not a skip.
pytestmark = pytest.mark.skipif(shutil.which("c++") is None or "avx2" not in kernels._cpu_flags().split(),
                                reason="no C++ compiler or no AVX2: sinkstream uses torch's kernels here")


def test_kernels_were_built():
    assert kernels.available()


def int4_weight(n: int, k: int, seed: int = 0) -> QuantWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // 32, generator=g) / 10
    zero = torch.randn(n, k // 32, generator=g) / 10
    # values the kernel layout (float16 d and m = zero - 8 * scale) holds exactly
    scale = scale.half().float()
    zero = ((zero - 8 * scale).half().float() + 8 * scale)
    return QuantWeight("int4", q, scale, zero, 32)


def int8_weight(n: int, k: int, group: int, seed: int = 0) -> QuantWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=g) / 50).half().float()
    return QuantWeight("int8", q, scale, None, group)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("make", [lambda: int4_weight(80, 256), lambda: int4_weight(48, 96),
                                  lambda: int8_weight(80, 256, 32), lambda: int8_weight(48, 96, 96)],
                         ids=["int4", "int4-odd-blocks", "int8-per-32", "int8-per-row"])
@pytest.mark.parametrize("tokens", [1, 3, 20, QUANT_MANY_TOKENS + 5])
def test_kernel_matches_the_dequantized_matmul(make, tokens):
    w = make()
    layer = QuantLinear(w)
    assert layer.backend == "qmm"
    x = torch.randn(2, tokens, w.shape[1], generator=torch.Generator().manual_seed(tokens))
    want = x @ w.dequantize().t()
    got = layer(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    # int8 activations per block of 32 (bfloat16 for many-token passes): llama.cpp's error level, not worse
    assert rel_err(got, want) < 0.01


def test_dequant_kernels_are_exact_up_to_bfloat16():
    for w in (int4_weight(64, 128), int8_weight(64, 128, 32)):
        layer = QuantLinear(w)
        ops = torch.ops.sinkstream
        got = ops.q4_dequant(layer.qs, layer.d, layer.m, 16, 48) if w.kind == "int4" else \
            ops.q8_dequant(layer.qs, layer.d, 16, 48)
        assert torch.equal(got, w.dequantize()[16:48].to(torch.bfloat16))


def test_kernel_rejects_bad_shapes():
    w = int4_weight(32, 64)
    layer = QuantLinear(w)
    with pytest.raises(RuntimeError, match="multiple of 32|qs shape"):
        torch.ops.sinkstream.q4_mm(torch.randn(1, 48), layer.qs, layer.d, layer.m)


def test_fused_projections_give_the_same_logits_and_keep_the_state_dict():
    hf = hf_tiny("llama")
    a, b = ours_from_hf(hf), ours_from_hf(hf)
    quantize(a, "int4")
    for m in a.modules():  # undo the fusion quantize() did, for the reference
        m.__dict__.pop("_fused", None)
    quantize(b, "int4")
    assert sum(len(m.__dict__.get("_fused", {})) for m in b.modules()) == 2 * b.config.num_hidden_layers
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(a(ids), b(ids)) and torch.equal(a(ids[:, :1]), b(ids[:, :1]))
    assert sorted(a.state_dict()) == sorted(b.state_dict())
    # one copy of the weights: the parts are views of the stacked buffers
    attn = b.model.layers[0].self_attn
    fused = attn.__dict__["_fused"][("q_proj", "k_proj", "v_proj")]
    assert attn.k_proj.qs.data_ptr() == fused.qs[attn.q_proj.out_features:].data_ptr()
    q, k, v = projections(attn, torch.randn(1, 2, 64), ("q_proj", "k_proj", "v_proj"))
    assert q.shape[-1] == attn.q_proj.out_features and v.shape[-1] == attn.v_proj.out_features


def test_fuse_projections_skips_mixed_kinds():
    hf = hf_tiny("llama")
    model = ours_from_hf(hf)
    quantize(model, "int4")
    for m in model.modules():
        m.__dict__.pop("_fused", None)
    attn = model.model.layers[0].self_attn
    attn.v_proj = QuantLinear.from_linear(torch.nn.Linear(64, attn.v_proj.out_features, bias=False), "int8")
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers - 1


def test_without_our_kernels_torch_kernels_or_dequantized_weights_are_used():
    code = ("import torch; from sinkstream.quant import QuantLinear, QuantWeight;"
            "q = torch.randint(0, 16, (32, 64), dtype=torch.uint8); s = torch.rand(32, 2);"
            "print(QuantLinear(QuantWeight('int4', q, s, s, 32)).backend,"
            "QuantLinear(QuantWeight('int8', q.to(torch.int8), s, None, 32)).backend)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"SINKSTREAM_KERNELS": "0", "PATH": ""}).stdout.split()
    assert out == ["torch", "dequant"]


def test_float_reference_of_quantized_linear_is_close():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    layer = QuantLinear.from_linear(lin, "int8")
    x = torch.randn(4, 128)
    assert rel_err(layer(x), F.linear(x, lin.weight, lin.bias)) < 0.02


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_kernel_matches_the_formula(offset):
    x, w = torch.randn(3, 5, 96), torch.randn(96)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + w)
    assert torch.allclose(torch.ops.sinkstream.rms_norm(x, w, 1e-6, offset), want, atol=1e-5)


@pytest.mark.parametrize("heads,group,dim,n,dtype", [(3, 3, 64, 1024, torch.float32), (8, 4, 128, 777, torch.float32),
                                                     (1, 4, 256, 5, torch.float32), (4, 1, 72, 300, torch.float32),
                                                     (3, 3, 64, 1000, torch.bfloat16), (2, 2, 64, 1, torch.float32)])
def test_decode_attention_matches_sdpa(heads, group, dim, n, dtype):
    """Keys in chunks of 256 merged by their maxima (n not a multiple of it), head sizes that are not a
    multiple of 8, one key, a slice of a longer buffer, large scores (the exponential's range)."""
    assert kernels.available()
    g = torch.Generator().manual_seed(n)
    kbuf = (torch.randn(1, heads, n + 9, dim, generator=g) * 3).to(dtype)
    vbuf = torch.randn(1, heads, n + 9, dim, generator=g).to(dtype)
    k, v = kbuf[:, :, :n], vbuf[:, :, :n]
    q = torch.randn(1, heads, group, dim, generator=g) * 3
    want = F.scaled_dot_product_attention(q, k.float(), v.float(), scale=dim ** -0.5)
    got = torch.ops.sinkstream.decode_attention(q, k, v, dim ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_decode_attention_in_a_model_matches_torch(monkeypatch, tiny):
    """A decode step through the kernel gives the logits torch's SDPA gives; with bfloat16 KV the kernel
    (float32 queries and products) is at least as close to float32 KV as torch's bfloat16 SDPA."""
    import sinkstream.attention as attention
    from sinkstream import CacheConfig
    assert kernels.available()
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(1))

    def step(kv_dtype, kernel):
        if not kernel:
            monkeypatch.setattr(attention, "_decode_kernel", lambda q, k, v: False)
        cache = tiny.make_cache(CacheConfig("sink", 4, 20, kv_dtype=kv_dtype))
        cache.run(tiny, ids)
        out = cache.run(tiny, ids[:, :1])
        monkeypatch.undo()
        return out

    exact = step(None, False)
    torch.testing.assert_close(step(None, True), exact, atol=1e-5, rtol=1e-4)
    ours, theirs = step("bfloat16", True), step("bfloat16", False)
    assert (ours - exact).abs().max() <= (theirs - exact).abs().max() + 1e-4


@pytest.mark.parametrize("dtype,sinks", [(torch.float32, 4), (torch.bfloat16, 4), (torch.float32, 0)])
def test_decode_attention_many_stores_and_attends_like_one_cache_at_a_time(dtype, sinks):
    """One call for caches of different fill levels and capacities (one past a chunk of 256): the buffers
    end as `KVBuffer.store_rotated`'s slice copies leave them, and each output is `decode_attention`'s over
    that cache alone, bit for bit."""
    assert kernels.available()
    heads, group, dim = 2, 3, 64
    g = torch.Generator().manual_seed(7)
    caps, lens, slots = [40, 300, 300], [12, 300, 257], [11, 4 + 100, 256]
    kbufs = [torch.randn(1, heads, c, dim, generator=g).to(dtype) for c in caps]
    vbufs = [torch.randn(1, heads, c, dim, generator=g).to(dtype) for c in caps]
    q = torch.randn(3, heads, group, dim, generator=g) * 2
    k_new, v_new = torch.randn(3, heads, dim, generator=g), torch.randn(3, heads, dim, generator=g)
    rot = torch.randn(3, heads, sinks, dim, generator=g) if sinks else None
    want_k, want_v, want = [b.clone() for b in kbufs], [b.clone() for b in vbufs], []
    for i in range(3):
        if sinks:
            want_k[i][:, :, :sinks] = rot[i:i + 1]
        want_k[i][:, :, slots[i]] = k_new[i:i + 1]
        want_v[i][:, :, slots[i]] = v_new[i:i + 1]
        want.append(torch.ops.sinkstream.decode_attention(q[i:i + 1].contiguous(), want_k[i][:, :, :lens[i]],
                                                          want_v[i][:, :, :lens[i]], dim ** -0.5))
    got = torch.ops.sinkstream.decode_attention_many(q, k_new, v_new, rot, kbufs, vbufs, slots, lens, dim ** -0.5)
    assert torch.equal(got, torch.cat(want))
    for a, b in zip(kbufs + vbufs, want_k + want_v):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="slot"):
        torch.ops.sinkstream.decode_attention_many(q, k_new, v_new, rot, kbufs, vbufs, [11, 300, 256], lens, 0.1)


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("k", [576, 1056, 2048])  # 18 blocks (a group of 16, then 2), 33 (an odd tail), 64
def test_rows_are_the_same_alone_or_batched(k, kind):
    """Several activation rows share each weight row's unpacking; every row's result is bit for bit what it
    gives alone (the batched server's greedy streams rely on it), and close to the de-quantized product."""
    w = int4_weight(40, k) if kind == "int4" else int8_weight(40, k, 32)
    layer = QuantLinear(w)
    x = torch.randn(20, k)
    with torch.inference_mode():  # the kernel path for every row count (QUANT_MANY_TOKENS and up go to _many)
        alone = torch.cat([layer._few(x[i:i + 1]) for i in range(20)])
        for m in (2, 3, 4, 5, 8, 9, 15, 16, 17, 20):  # one-at-a-time rows, tiles, a tile and one more row
            assert torch.equal(layer._few(x[:m]), alone[:m]), m
    assert rel_err(alone, x @ w.dequantize().t()) < 0.01


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_tile_products_equal_vnni_products(kind):
    """Where the CPU has AMX, batches of rows go through tile products; turned off, the VNNI path must give
    the same bits (the integer dot products are exact, the float steps shared)."""
    ops = torch.ops.sinkstream
    w = int4_weight(37, 1056) if kind == "int4" else int8_weight(37, 1056, 32)
    layer = QuantLinear(w)
    x = torch.randn(20, 1056)
    was = ops.qmm_amx(-1)
    try:
        if not ops.qmm_amx(1):
            pytest.skip("no AMX tiles on this CPU (or not granted by the kernel): one path only")
        tiles = [layer._few(x[:m]) for m in (4, 8, 16, 20)]
        ops.qmm_amx(0)
        assert not ops.qmm_amx(-1)
        for m, got in zip((4, 8, 16, 20), tiles):
            assert torch.equal(layer._few(x[:m]), got), m
    finally:
        ops.qmm_amx(int(was))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rd", [64, 32])  # whole head, or a partial rotary (Phi-3, GPT-NeoX)
def test_rotary_kernel_equals_torchs_rotation(monkeypatch, interleaved, rd):
    """RoPE of a transposed (non-contiguous) [b, heads, n, d] view: bit for bit what `rope.apply_rotary`
    computes with torch's operators, and the rotation formula."""
    from sinkstream import rope
    assert kernels.available()
    g = torch.Generator().manual_seed(rd)
    x = torch.randn(2, 5, 3, 64, generator=g).transpose(1, 2)  # [2, 3 heads, 5 tokens, 64]
    ang = torch.rand(5, rd // 2, generator=g) * 6
    ang = ang.repeat_interleave(2, -1) if interleaved else torch.cat([ang, ang], -1)
    cos, sin = ang.cos(), ang.sin()
    got = rope.apply_rotary(x, cos, sin, interleaved=interleaved)
    assert got.is_contiguous()
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert torch.equal(got, rope.apply_rotary(x, cos, sin, interleaved=interleaved))
    a, b = (x[..., 0:rd:2], x[..., 1:rd:2]) if interleaved else (x[..., :rd // 2], x[..., rd // 2:rd])
    c, s = (cos[:, 0::2], sin[:, 0::2]) if interleaved else (cos[:, :rd // 2], sin[:, :rd // 2])
    want = x.clone()
    if interleaved:
        want[..., 0:rd:2], want[..., 1:rd:2] = a * c - b * s, b * c + a * s
    else:
        want[..., :rd // 2], want[..., rd // 2:rd] = a * c - b * s, b * c + a * s
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_float_linear_rows_are_the_same_alone_or_batched():
    """A loaded float32 model's linear layers take few-row passes through `f32_mm`: close to torch's matmul,
    and each row bit for bit what it gives alone; many-row passes stay torch's."""
    from sinkstream.linear import Linear
    lin = torch.nn.Linear(600, 70)  # 600 columns: 37 steps of 16, and a tail of 8
    lin.__class__ = Linear
    x = torch.randn(9, 600)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(9)])
    for m in (2, 4, 5, 8, 9):
        assert torch.equal(lin(x[:m]), alone[:m]), m
    torch.testing.assert_close(alone, torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    many = torch.randn(MANY_TOKENS, 600)
    assert torch.equal(lin(many), torch.nn.functional.linear(many, lin.weight, lin.bias))
    # a batched pass of 3 decode rows beside a 16-token prompt chunk: each row as its own pass would take it
    with rows_by_stream([1] * 3 + [MANY_TOKENS] * MANY_TOKENS):
        mixed = lin(torch.cat([x[:3], many]))
    assert torch.equal(mixed[:3], alone[:3]) and torch.equal(mixed[3:], lin(many))


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_many_token_rows_of_a_stream_do_not_depend_on_the_other_streams(kind):
    """Prompt rows (passes of QUANT_MANY_TOKENS or more) go through a bfloat16 matrix multiply, which rounds a
    row differently with the number of rows in the call: in a batched pass each stream's rows get a call of
    their own (rows_by_stream's sizes), so a prompt packed with others comes out as alone."""
    w = int4_weight(300, 576) if kind == "int4" else int8_weight(300, 576, 32)
    layer = QuantLinear(w)
    x = torch.randn(250, 576)
    alone_sizes = [80] * 80 + [7] * 7 + [163] * 163
    with torch.inference_mode():
        alone = [layer(x[a:b]) for a, b in ((0, 80), (80, 87), (87, 250))]
        with rows_by_stream(alone_sizes, sizes=[80, 7, 163]):
            packed = layer(x)
        assert torch.equal(packed, torch.cat(alone))
        with rows_by_stream(alone_sizes, [79, 86, 249], sizes=[80, 7, 163]):
            logits = layer(x[[79, 86, 249]])  # the rows that get logits: one from each stream
        # alone, a prompt's last row gets its logits in a many-token pass of one row; the 7-token stream's by the kernel
        assert torch.equal(logits, torch.cat([layer._many(x[i:i + 1]) if i != 86 else layer._few(x[i:i + 1])
                                              for i in (79, 86, 249)]))
