"""Weight-only quantization (sinkstream.quant): kernels against a de-quantized reference, the layers chosen,
and the real model's perplexity under int4."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sinkstream
from sinkstream.errors import SinkstreamError
from sinkstream.quant import QuantLinear, quantize

from conftest import hf_tiny, ours_from_hf


def _reference(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The de-quantized layer (fused=False)."""
    return F.linear(x, q.weight, q.bias)


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_kernel_matches_dequantized_weights(kind, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias)
    fused, plain = QuantLinear.from_linear(lin, kind), QuantLinear.from_linear(lin, kind, fused=False)
    assert fused.fused and not plain.fused
    for n in (1, 7):
        x = torch.randn(2, n, 96)
        got, want = fused(x), _reference(plain, x)
        assert got.shape == (2, n, 80) and got.dtype == torch.float32
        # the kernels quantize activations to int8 per block of 32 (bfloat16 for many-token passes)
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
    # quantization error itself is bounded by the grid: half a step per weight
    err = (plain.weight - lin.weight).abs()
    if kind == "int4":
        g = lin.weight.reshape(80, -1, 32)
        step = (g.amax(-1) - g.amin(-1)) / 15
        assert (err.reshape(80, -1, 32) <= step[..., None] * 0.51 + 1e-3).all()
    else:
        assert (err <= lin.weight.abs().amax(1, keepdim=True) / 254 * 1.01 + 1e-6).all()


def test_int4_reproduces_a_4bit_grid_exactly():
    """A Q4_1-style weight (per 32: min + d * q) comes back with the same q."""
    torch.manual_seed(1)
    q = torch.randint(0, 16, (64, 128)).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # every group spans the whole grid, as Q4_1's min/max rounding gives
    d = torch.rand(64, 4, 1).to(torch.bfloat16).float() / 8
    lo = (torch.randn(64, 4, 1) / 4)
    lo = ((lo + 8 * d).to(torch.bfloat16).float() - 8 * d)  # so that zero = lo + 8d is a bf16 number
    w = (lo + d * q.reshape(64, 4, 32)).reshape(64, 128)
    plain = QuantLinear.from_linear(_with_weight(w), "int4", fused=False)
    assert torch.allclose(plain.weight, w, atol=1e-6)


def _with_weight(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


def test_quantize_picks_layers_and_keeps_the_output_layer_at_int8():
    model = ours_from_hf(hf_tiny("smollm2-tied"))  # hidden 64: a multiple of 32
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert quantize(model, "int4") == n_linear
    kinds = {name: m.kind for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert kinds["lm_head"] == "int8" and kinds["model.layers.0.mlp.down_proj"] == "int4"
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # the tied lookup stays full precision
    assert quantize(model, "none") == 0
    with pytest.raises(SinkstreamError, match="unknown quantization"):
        quantize(model, "int3")
    with pytest.raises(SinkstreamError, match="group size"):
        quantize(ours_from_hf(hf_tiny("llama")), "int4", group=48)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_tiny_model_runs_the_kernels_on_its_quantized_weights(kind):
    """Whole model: the fused CPU kernels give the logits of the same model holding the de-quantized weights
    (the path other devices take), and both stay near float32 (random weights are far from a 4-bit grid)."""
    hf = hf_tiny("llama")
    ref, fused, plain = ours_from_hf(hf), ours_from_hf(hf), ours_from_hf(hf)
    quantize(fused, kind)
    quantize(plain, kind, fused=False)
    ids = torch.randint(0, 256, (1, 40))
    a, b, c = ref(ids), fused(ids), plain(ids)
    assert (b - c).abs().max() < 0.03 * c.abs().max()
    assert (a - c).abs().max() < (0.1 if kind == "int8" else 0.3) * a.abs().max()


def _ppl(model, ids) -> float:
    from sinkstream import CacheConfig
    from sinkstream.perplexity import mean_nll, stream_nll
    cache = model.make_cache(CacheConfig("dense", prefill_chunk=256))
    return math.exp(mean_nll(stream_nll(model, cache, ids)))


# Gemma 3 270M (262K-token vocabulary) takes ~40 s here: `make test-all` runs it
@pytest.mark.parametrize("name", ["smollm2", pytest.param("gemma3-270m", marks=pytest.mark.slow)])
def test_gguf_on_its_own_quantization_is_within_half_a_percent_of_float(name, sample_text):
    """Issue 12's quality bar: perplexity over 2K tokens of the bundled text, the GGUF's own quantized
    weights (exact 4-bit codes, int8 activations in the kernels) against the de-quantized float32 model."""
    from sinkstream.loading import resolve
    try:
        resolve(name)
    except SinkstreamError:
        pytest.skip(f"{name} is not installed")
    native, tok = sinkstream.load(name, device="cpu", dtype="float32", quiet=True)
    assert native.quant == "gguf"
    ids = torch.tensor(tok.encode(sample_text)[:2048])
    p_native = _ppl(native, ids)
    del native
    p_float = _ppl(sinkstream.load(name, device="cpu", dtype="float32", quant="none", quiet=True)[0], ids)
    assert abs(p_native / p_float - 1) < 0.005, (p_float, p_native)
