"""Every cache policy answers the protocol of sinkstream/cache/protocol.py: ModelCache for all, PlannedCache
(with LayerCache layers) for the planned ones, and `planned` says which."""
import inspect

import pytest
import torch

from sinkstream.cache import POLICIES, CacheConfig, LayerCache, LayerSpec, ModelCache, PlannedCache, make_cache

PLANNED = {"dense": True, "window": True, "sink": True, "recompute": False, "memory": True}

# The protocol's members, pinned: removing one from a protocol (or adding one) is a deliberate change here too.
LAYER_MEMBERS = {"update", "nbytes", "state", "load_state"}
MODEL_MEMBERS = {"planned", "config", "seen", "cached", "capacity", "nbytes", "state", "load_state", "run"}
PLANNED_MEMBERS = MODEL_MEMBERS | {"layers", "begin", "chunk_size", "after_run"}


def config(policy: str) -> CacheConfig:
    return CacheConfig(policy, sinks=2, window=12, prefill_chunk=5, block_size=4, top_k=2)


class Without:
    """`cache` with one attribute missing: what a policy that lost a protocol member looks like."""

    def __init__(self, cache, missing: str):
        self._cache, self._missing = cache, missing

    def __getattr__(self, name):
        if name == self._missing:
            raise AttributeError(name)
        return getattr(self._cache, name)


def test_every_policy_is_covered():
    assert set(PLANNED) == set(POLICIES)


def test_pinned_members_are_the_protocols():
    get_members = pytest.importorskip("typing_extensions").get_protocol_members
    assert get_members(LayerCache) == LAYER_MEMBERS
    assert get_members(ModelCache) == MODEL_MEMBERS
    assert get_members(PlannedCache) == PLANNED_MEMBERS


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_answers_the_protocol(tiny, policy):
    cache = make_cache(tiny, config(policy))
    members = PLANNED_MEMBERS if PLANNED[policy] else MODEL_MEMBERS
    assert not [m for m in members if not hasattr(cache, m)], policy  # names the missing member
    assert isinstance(cache, ModelCache)
    assert cache.planned is PLANNED[policy]
    assert isinstance(cache, PlannedCache) is PLANNED[policy]
    if cache.planned:
        assert len(cache.layers) == len(tiny.layer_specs())
        for layer in cache.layers:
            assert isinstance(layer, LayerCache), (policy, type(layer).__name__)
    # `every` is part of every cache's run (planned caches accept it and score every position)
    params = inspect.signature(cache.run).parameters
    for name in ("logits", "progress", "every"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (policy, name)
    assert params["every"].default == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_runs_through_the_protocol(tiny, policy, tmp_path):
    """Feed past the window with every=2, save, restore into a fresh cache, feed one more token to both."""
    cache = make_cache(tiny, config(policy))
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    out = cache.run(tiny, ids, logits="all", every=2)
    assert out.shape == (1, 20, tiny.config.vocab_size)
    scored = (~torch.isnan(out[0, :, 0])).tolist()
    assert scored == [True] * 20 if cache.planned else [i % 2 == 0 or i == 19 for i in range(20)]
    assert cache.seen == 20 and 0 < cache.cached <= cache.capacity and cache.nbytes > 0
    restored = make_cache(tiny, config(policy))
    if policy == "memory":  # finished blocks live in a block log beside the state
        restored.open_log(tmp_path / "log", cache.write_log(tmp_path / "log"))
    restored.load_state(cache.state())
    nxt = torch.tensor([[7]])
    assert torch.equal(cache.run(tiny, nxt), restored.run(tiny, nxt))
    assert restored.seen == 21


@pytest.mark.parametrize("policy", POLICIES)
def test_a_cache_missing_any_member_fails_the_check(tiny, policy):
    cache = make_cache(tiny, config(policy))
    protocol, members = (PlannedCache, PLANNED_MEMBERS) if PLANNED[policy] else (ModelCache, MODEL_MEMBERS)
    assert isinstance(Without(cache, "nothing"), protocol)
    for member in members:
        assert not isinstance(Without(cache, member), protocol), (policy, member)
    if cache.planned:
        layer = cache.layers[0]
        for member in LAYER_MEMBERS:
            assert not isinstance(Without(layer, member), LayerCache), (policy, member)


class MixedModel:
    """What make_cache reads of a model: Gemma-3-like, a sliding-window layer beside a global one."""
    dtype, device, max_context = torch.float32, torch.device("cpu"), 64

    def layer_specs(self):
        return [LayerSpec(2, 16, sliding_window=8), LayerSpec(2, 16), LayerSpec(2, 16, sliding_window=8)]


@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_layer_layouts_answer_the_protocol(policy):
    cache = make_cache(MixedModel(), config(policy))
    assert isinstance(cache, ModelCache) and isinstance(cache, PlannedCache) is PLANNED[policy]
    if cache.planned:
        assert all(isinstance(layer, LayerCache) for layer in cache.layers)
        assert len(cache.begin(3)) == 3 and cache.seen == 3
