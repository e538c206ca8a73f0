"""Weight-only quantization (sinkstream.quant): kernels against a de-quantized reference, the layers chosen,
and the real model's perplexity under int4."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sinkstream
from sinkstream.errors import SinkstreamError
from sinkstream.quant import QuantLinear, quantize

from conftest import hf_tiny, ours_from_hf


def _reference(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The de-quantized layer (fused=False) fed the bf16-rounded input the kernels see."""
    return F.linear(x.to(torch.bfloat16).float(), q.weight, q.bias)


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_kernel_matches_dequantized_weights(kind, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias)
    fused, plain = QuantLinear(lin, kind), QuantLinear(lin, kind, fused=False)
    assert fused.fused and not plain.fused
    for n in (1, 7):
        x = torch.randn(2, n, 96)
        got, want = fused(x), _reference(plain, x)
        assert got.shape == (2, n, 80) and got.dtype == torch.float32
        # the kernels accumulate in bf16-ish precision: compare relative to the output scale
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
    # quantization error itself is bounded by the grid: half a step per weight
    err = (plain.weight - lin.weight).abs()
    if kind == "int4":
        g = lin.weight.reshape(80, -1, 32)
        step = (g.amax(-1) - g.amin(-1)) / 15
        assert (err.reshape(80, -1, 32) <= step[..., None] * 0.51 + 1e-3).all()
    else:
        assert (err <= lin.weight.abs().amax(1, keepdim=True) / 254 * 1.01 + 1e-6).all()


def test_int4_reproduces_a_4bit_grid_exactly_up_to_bf16_scales():
    """A Q4_1-style weight (per 32: min + d * q) comes back with the same q."""
    torch.manual_seed(1)
    q = torch.randint(0, 16, (64, 128)).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # every group spans the whole grid, as Q4_1's min/max rounding gives
    d = torch.rand(64, 4, 1).to(torch.bfloat16).float() / 8
    lo = (torch.randn(64, 4, 1) / 4)
    lo = ((lo + 8 * d).to(torch.bfloat16).float() - 8 * d)  # so that zero = lo + 8d is a bf16 number
    w = (lo + d * q.reshape(64, 4, 32)).reshape(64, 128)
    plain = QuantLinear(_with_weight(w), "int4", fused=False)
    assert torch.allclose(plain.weight, w, atol=1e-6)


def _with_weight(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


def test_quantize_picks_layers_and_keeps_the_output_layer_at_int8():
    model = ours_from_hf(hf_tiny("smollm2-tied"))  # hidden 64: a multiple of 32
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
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


def test_real_model_int4_perplexity_within_one_percent(real, sample_text):
    """The default GGUF is Q4_1 (body) + Q8_0 (tied embedding): int4 holds it almost losslessly."""
    model, tok = real
    q4, _ = sinkstream.load(device="cpu", dtype="float32", quant="int4", quiet=True)
    ids = torch.tensor(tok.encode(sample_text)[:768]).view(1, -1)

    def ppl(m):
        return F.cross_entropy(m(ids)[0, :-1], ids[0, 1:]).exp().item()
    p32, p4 = ppl(model), ppl(q4)
    assert abs(p4 / p32 - 1) < 0.01, (p32, p4)
