"""Loading tensor by tensor (sinkstream.loading.build_model): quantized sources become quantized layers with
the logits of their de-quantized floats, re-quantization and de-quantization happen per tensor, a bf16
safetensors folder loads under int4 at about the final size plus one tensor, and state dicts still work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sinkstream
from sinkstream.errors import ModelLoadError
from sinkstream.loading import build_model
from sinkstream.linear import Linear
from sinkstream.models import model_class
from sinkstream.quant import QuantEmbedding, QuantLinear, QuantWeight, quantize

V = 256


def llama_config(*, tied: bool, **shape) -> dict:
    c = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
             rope_theta=10000.0, tie_word_embeddings=tied)
    return {**c, **shape}


def random_weights(config: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of the family's state dict (a tied head left out, as
    checkpoints do)."""
    with torch.device("meta"):
        model = model_class(config["model_type"]).from_hf_config(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if config["tie_word_embeddings"] and name == "lm_head.weight":
            continue
        w = torch.randn(t.shape, generator=g) * (0.1 if t.dim() > 1 else 0.02) + (t.dim() == 1)
        out[name] = w.to(dtype)
    return out


class FakeSource:
    """The interface of sinkstream.gguf's GGUFModel that build_model uses, recording what it reads."""

    def __init__(self, tensors: dict):
        self.tensors, self.loaded = tensors, []

    def names(self) -> list[str]:
        return list(self.tensors)

    def load(self, name: str):
        self.loaded.append(name)
        return self.tensors[name]


def gguf_like(weights: dict[str, torch.Tensor], embedding_kind: str) -> dict:
    """Linear weights as int4 (Q4-style), the output projection int8, the embedding `embedding_kind`."""
    out = {}
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            out[name] = QuantWeight.quantize(w, embedding_kind)
        elif name == "lm_head.weight":
            out[name] = QuantWeight.quantize(w, "int8")
        elif w.dim() == 2:
            out[name] = QuantWeight.quantize(w, "int4")
        else:
            out[name] = w
    return out


def floats_of(source: dict) -> dict[str, torch.Tensor]:
    return {k: v.dequantize() if isinstance(v, QuantWeight) else v for k, v in source.items()}


def linears(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


IDS = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(0))


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


class DequantizedQuantLinear(QuantLinear):
    """QuantLinear on the path other devices take (its de-quantized weights, a plain matmul)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "fused": False})


@pytest.mark.parametrize("tied,embedding_kind", [(True, "int8"), (False, "int4")])
def test_quantized_source_builds_quantized_layers_with_the_logits_of_its_floats(tied, embedding_kind, monkeypatch):
    config = llama_config(tied=tied, model_type="llama" if tied else "qwen2")  # qwen2: q/k/v with biases
    tensors = gguf_like(random_weights(config), embedding_kind)
    src = FakeSource(tensors)
    ours = build_model(config, src)
    ref = build_model(config, floats_of(tensors))
    assert sorted(src.loaded) == sorted(tensors)  # every tensor read once: a tied matrix too
    assert ours.quant == "gguf" and ref.quant is None
    layers = linears(ours)
    assert all(type(m) is QuantLinear and m.fused for m in layers.values())
    assert layers["lm_head"].kind == "int8" and layers["model.layers.0.mlp.down_proj"].kind == "int4"
    emb = ours.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.kind == embedding_kind
    # the CPU kernels round activations (bfloat16 or int8): the whole model stays near the float one
    assert close(ours(IDS), ref(IDS), 0.03)
    # each layer got the right weight and bias: de-quantized, the same model gives the float logits
    monkeypatch.setattr(sinkstream.loading, "QuantLinear", DequantizedQuantLinear)
    plain = build_model(config, FakeSource(tensors))
    assert all(not m.fused for m in linears(plain).values())
    assert close(plain(IDS), ref(IDS), 1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_quant_none_dequantizes_each_tensor_into_plain_layers(tied):
    config = llama_config(tied=tied)
    tensors = gguf_like(random_weights(config), "int8")
    ours = build_model(config, FakeSource(tensors), quant="none")
    ref = build_model(config, floats_of(tensors))
    assert ours.quant is None
    assert all(type(m) is Linear for m in linears(ours).values())  # float weights (our kernel for decode steps)
    assert type(ours.model.embed_tokens) is nn.Embedding
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert torch.equal(ours(IDS), ref(IDS))


def test_requested_kind_keeps_or_requantizes_the_sources_tensors():
    config = llama_config(tied=False)
    tensors = gguf_like(random_weights(config), "int4")
    native = build_model(config, FakeSource(tensors))
    as_int4 = build_model(config, FakeSource(tensors), quant="int4")
    as_int8 = build_model(config, FakeSource(tensors), quant="int8")
    assert as_int4.quant == "int4" and as_int8.quant == "int8"
    assert torch.equal(as_int4(IDS), native(IDS))  # its int4 tensors (and int8 head) used as they are
    assert {m.kind for m in linears(as_int8).values()} == {"int8"}
    assert isinstance(as_int8.model.embed_tokens, QuantEmbedding)  # the table keeps its own form
    assert close(as_int8(IDS), native(IDS), 0.05)


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("tied", [True, False])
def test_float_weights_quantized_per_tensor_equal_quantizing_the_built_model(kind, tied):
    config = llama_config(tied=tied, hidden_size=96, intermediate_size=144)  # 144 % 32: int4 leaves down_proj
    weights = random_weights(config)
    lazy = build_model(config, FakeSource(weights), quant=kind)
    whole = build_model(config, weights)
    quantize(whole, kind)
    assert lazy.quant == whole.quant == kind
    got, want = linears(lazy), linears(whole)
    assert {n: type(m) for n, m in got.items()} == {n: type(m) for n, m in want.items()}
    assert type(got["model.layers.0.mlp.down_proj"]) is (Linear if kind == "int4" else QuantLinear)
    assert got["lm_head"].kind == "int8"
    assert type(lazy.model.embed_tokens) is nn.Embedding  # a float embedding stays float
    assert torch.equal(lazy(IDS), whole(IDS))


def test_state_dict_input_still_works_and_is_checked():
    config = llama_config(tied=False)
    weights = random_weights(config)
    a = build_model(config, {**weights, "model.rotary_emb.inv_freq": torch.ones(8), "extra.bias": torch.ones(3)})
    assert a.quant is None  # float32 tensors are used as they are, not copied:
    assert a.model.embed_tokens.weight.data_ptr() == weights["model.embed_tokens.weight"].data_ptr()
    bf16 = build_model(config, weights, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and close(bf16(IDS), a(IDS), 0.05)
    with pytest.raises(ModelLoadError, match="weights missing for 1 tensors"):
        build_model(config, {k: v for k, v in weights.items() if k != "model.norm.weight"})
    with pytest.raises(ModelLoadError, match="weights missing: 'model.embed_tokens.weight'"):
        build_model(llama_config(tied=True), {k: v for k, v in weights.items() if "embed" not in k})
    with pytest.raises(ModelLoadError, match="has shape"):
        build_model(config, {**weights, "model.norm.weight": torch.ones(63)})


def save_folder(path: Path, config: dict, weights: dict[str, torch.Tensor], shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    names = list(weights)
    for i in range(shards):
        part = {k: weights[k].contiguous() for k in names[i::shards]}
        save_file(part, str(path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_safetensors_folder_loads_lazily_and_reports_damaged_files(tmp_path):
    config = llama_config(tied=True)
    weights = random_weights(config, dtype=torch.bfloat16)
    folder = save_folder(tmp_path / "m", config, weights, shards=2)
    model = build_model(config, sinkstream.loading._SafetensorsFolder(folder))
    ref = build_model(config, weights)
    assert model.dtype == torch.float32 and torch.equal(model(IDS), ref(IDS))
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors is truncated or corrupt"):
        build_model(config, sinkstream.loading._SafetensorsFolder(folder))
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="only pickled weights"):
        sinkstream.loading._SafetensorsFolder(pickled)


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "<unk>"}))


MEASURE = r"""
import json, os, sys
import torch
from sinkstream.loading import build_model, load, tokenizer_for
from test_loading_lazy import llama_config, random_weights

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

# one-time costs before the baseline: the tokenizer's imports, and a tiny int4 model (nn.init on meta
# tensors imports torch._dynamo; the quantized kernels load)
tokenizer_for(sys.argv[1])
build_model(llama_config(tied=False), random_weights(llama_config(tied=False)), quant="int4")
base = rss()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to now
    f.write("5")
model, tok = load(sys.argv[1], device="cpu", dtype="float32", quant="int4")
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
size = sum(t.nbytes for t in model.state_dict().values())
print(json.dumps({"peak": peak - base, "model": size, "quant": model.quant, "tokens": tok("a b")["input_ids"]}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peak RSS the Linux way")
def test_bf16_folder_loads_as_int4_at_about_its_final_size(tmp_path):
    """~170 MB of bf16 (340 MB in float32) become ~95 MB of int4 body, int8 head and float32 embedding;
    loading in a fresh process peaks at about that plus one tensor."""
    config = llama_config(tied=False, vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                          num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4)
    weights = random_weights(config, dtype=torch.bfloat16)
    f32_bytes = sum(w.numel() * 4 for w in weights.values())
    largest_f32 = max(w.numel() * 4 for w in weights.values())
    folder = save_folder(tmp_path / "big", config, weights, shards=2)
    del weights
    write_tokenizer(folder)
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": path}  # the script imports this module
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["quant"] == "int4" and r["tokens"] == [1, 2]
    print(f"peak over baseline {r['peak'] / 2**20:.0f} MiB, int4 model {r['model'] / 2**20:.0f} MiB, "
          f"largest tensor (f32) {largest_f32 / 2**20:.0f} MiB, float32 model {f32_bytes / 2**20:.0f} MiB")
    assert r["model"] < 0.35 * f32_bytes
    assert r["peak"] < 1.5 * (r["model"] + largest_f32)
    assert r["peak"] < 0.6 * f32_bytes
