"""eval ppl: feeding modes, the wide `chunked` view, direct-computation match, CLI JSON schema."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _eval_tiny import tiny_folder, tiny_model  # noqa: E402

from sinkstream.cache import CacheConfig  # noqa: E402
from sinkstream.cache.plan import RingSlots  # noqa: E402
from sinkstream.cli import main  # noqa: E402
from sinkstream.eval.common import parse_cache_specs  # noqa: E402
from sinkstream.eval.ppl import _widen, curve, evaluate, policy_nll  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49152, (120,), generator=torch.Generator().manual_seed(1))


def test_dense_nll_matches_direct_computation(model, ids):
    nll = policy_nll(model, CacheConfig("dense"), ids, mode="banded", chunk=32)
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids[None])[0].float(), -1)
    direct = -logp[:-1].gather(-1, ids[1:, None])[:, 0]
    assert torch.allclose(nll, direct, atol=1e-4)
    res = evaluate(model, ids, [CacheConfig("dense")], chunk=32, every=50)
    assert res["results"][0]["ppl"] == pytest.approx(float(direct.double().mean().exp()), rel=1e-4)


def test_banded_equals_exact_and_chunked_sees_the_whole_pre_chunk_cache(model, ids):
    cfg = CacheConfig("sink", sinks=2, window=8)
    exact = policy_nll(model, cfg, ids[:40], mode="exact")
    banded = policy_nll(model, cfg, ids[:40], mode="banded", chunk=5)
    assert torch.allclose(exact, banded, atol=1e-4)
    # chunk 1: nothing to widen
    assert torch.allclose(policy_nll(model, cfg, ids[:40], mode="chunked", chunk=1), exact, atol=1e-4)
    # chunks of 10 then 5: the second chunk sees tokens 0..9 in full (nothing evicted before it), so it
    # equals dense attention there, while exact/banded decoding drops tokens 2..(t-8).
    dense = policy_nll(model, CacheConfig("dense"), ids[:40], mode="banded", chunk=40)
    wide = policy_nll(model, cfg, ids[:16], mode="chunked", chunk=10)  # passes: 0..9, then 10..14
    assert torch.allclose(wide[:15], dense[:15], atol=1e-4)
    assert not torch.allclose(exact[10:15], dense[10:15], atol=1e-3)


@pytest.mark.parametrize("policy", ["sink", "memory"])
def test_chunked_view_with_sink_zero_at_position_minus_one(model, ids, policy):
    # passes 0..9 then 10..19 with S+W = 10: the second pass sees everything, i.e. dense attention. Its
    # rotation base is the oldest query's window start (a re-base for pre-rotated caches, always for
    # memory), which puts sink 0 at position -1: once looked up at the wrong end of the RoPE table.
    cfg = CacheConfig(policy, sinks=2, window=8, block_size=4)
    dense = policy_nll(model, CacheConfig("dense"), ids[:21], mode="banded", chunk=21)
    wide = policy_nll(model, cfg, ids[:21], mode="chunked", chunk=10)
    assert torch.allclose(wide, dense, atol=1e-4)


def test_widen_places_keys_contiguously():
    slots = RingSlots(2, 4)
    slots.plan(8)  # ring now holds tokens 4..7
    plan = _widen(slots.plan(3), 2, 4)
    layout = {0: 0, 1: 1, 4: 2, 5: 3, 6: 4, 7: 5, 8: 6, 9: 7, 10: 8}  # sinks, cached window, chunk
    want = torch.tensor([[6 + i - layout[int(u)] for u in plan.k_tokens] for i in range(3)])
    assert torch.equal(plan.q_pos[:, None] - plan.k_pos[None, :], want)
    assert torch.equal(plan.mask, plan.k_tokens[None, :] <= torch.arange(8, 11)[:, None])
    assert plan.q_pos_sink is None


def test_cache_specs_and_curve():
    base = CacheConfig("sink", sinks=4, window=252)
    got = parse_cache_specs("sink,window,recompute:128,dense,sink(1,255)", base)
    assert [c.describe() for c in got] == ["sink(4,252)", "window(256)", "recompute(128)", "dense", "sink(1,255)"]
    with pytest.raises(Exception):
        parse_cache_specs("sink:4", base)
    rows = curve(torch.tensor([1.0, 3.0, float("nan"), 2.0, 2.0]), 2)
    assert rows == [(2, 2.0, 2.0), (4, 2.0, 2.0), (5, 2.0, 2.0)]


def test_cli_json(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 20)
    rc = main(["eval", "ppl", str(text), "--model", str(folder), "--tokens", "200", "--chunk", "64",
               "--compare", "sink:2+30,window:32,dense,recompute:32", "--recompute-every", "25", "--json", "-q",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 200
    assert [r["cache"] for r in res["results"]] == ["sink", "window", "dense", "recompute"]
    for r in res["results"]:
        assert {"cache", "sinks", "window", "ppl", "nll"} <= set(r)
        assert r["ppl"] == pytest.approx(2.718281828 ** r["nll"], rel=1e-6)
    assert res["results"][0]["sinks"] == 2 and res["results"][0]["window"] == 30
    assert res["results"][3]["scored"] < 199  # recompute scored on a subset
    assert (tmp_path / "out" / "ppl_curve.png").stat().st_size > 0
    assert (tmp_path / "out" / "ppl.csv").read_text().startswith("cache,")
