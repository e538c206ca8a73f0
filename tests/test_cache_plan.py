"""Ring-buffer slots and in-cache positions, exactly, for S > 0 and S = 0."""
import pytest
import torch

from sinkstream.cache.plan import RingSlots
from sinkstream.errors import ContextOverflowError


def step(r: RingSlots):
    return r.plan(1)


@pytest.mark.parametrize("S,W", [(4, 6), (0, 5), (1, 3)])
def test_single_steps_slots_and_positions(S, W):
    r = RingSlots(S, W)
    for t in range(40):
        p = step(r)
        # the token goes to its slot: sinks in 0..S-1, then a ring of W
        want_slot = t if t < S else S + (t - S) % W
        assert p.write_slots.tolist() == [want_slot] and p.decode_slot == want_slot
        # the view holds exactly the sinks and the last W tokens (itself included)
        visible = set(range(min(S, t + 1))) | set(range(max(S, t - W + 1), t + 1))
        assert set(p.k_tokens.tolist()) == visible and p.mask is None
        # in-cache positions: sinks 0..S-1, window contiguous after them, query last
        pos = dict(zip(p.k_tokens.tolist(), p.k_pos.tolist()))
        ordered = sorted(visible)
        assert [pos[u] for u in ordered] == list(range(len(ordered)))
        assert p.q_pos.tolist() == [len(ordered) - 1]
        assert max(p.k_pos.tolist()) <= S + W - 1


def test_slot_table_after_many_evictions():
    r = RingSlots(4, 6)
    for _ in range(103):
        step(r)
    # tokens 0..102: sinks 0-3, window 97..102 in ring slots 4 + (u-4) % 6
    want = [0, 1, 2, 3] + [None] * 6
    for u in range(97, 103):
        want[4 + (u - 4) % 6] = u
    assert r.slot_token.tolist() == want


def test_chunk_plan_matches_single_steps():
    S, W, C = 4, 8, 5
    a, b = RingSlots(S, W), RingSlots(S, W)
    for _ in range(13):
        a.plan(1)
        b.plan(1)
    p = a.plan(C)  # a chunk spanning evictions: read first, then write
    assert not p.write_first and p.k_tokens.shape[0] == S + W + C
    for i in range(C):
        q = b.plan(1)
        vis = p.k_tokens[p.mask[i]].tolist()
        assert sorted(vis) == sorted(q.k_tokens.tolist())
        # relative distances query-key are identical to token-by-token decoding
        qpos = torch.where(p.sink_cols[p.mask[i]], p.q_pos_sink[i], p.q_pos[i])
        d_chunk = dict(zip(vis, (qpos - p.k_pos[p.mask[i]]).tolist()))
        d_step = dict(zip(q.k_tokens.tolist(), (q.q_pos[0] - q.k_pos).tolist()))
        assert d_chunk == d_step
    assert a.slot_token.tolist() == b.slot_token.tolist()
    assert int(p.q_pos.max()) < S + W + C


def test_positions_bounded_forever():
    r = RingSlots(4, 16)
    r.seen = 10**9  # a billion tokens in: nothing depends on how long the stream is
    r.slot_token = torch.arange(20)
    p = r.plan(7)
    assert int(p.k_pos.max()) < 4 + 16 + 7 and int(p.q_pos.max()) < 4 + 16 + 7


def test_dense_overflows_with_clear_error():
    r = RingSlots(0, 8, growable=True, name="dense")
    r.plan(8)
    with pytest.raises(ContextOverflowError, match="context full"):
        r.plan(1)


def test_bad_sizes():
    with pytest.raises(ValueError):
        RingSlots(-1, 4)
    with pytest.raises(ValueError):
        RingSlots(4, 0)


def test_max_pos_is_computed_by_the_plan_itself():
    """`max_pos` sizes the rotary table; a derived plan (`dataclasses.replace`) must get its own, and the
    per-pass rope memo must not be carried over from the plan it was derived from."""
    import dataclasses

    from sinkstream.rope import RopeConfig, Rotary
    r = RingSlots(4, 16)
    r.plan(100)
    p = r.plan(7)
    positions = [p.k_pos, p.q_pos, p.new_pos, p.sink_pos] + ([p.q_pos_sink] if p.q_pos_sink is not None else [])
    assert p.max_pos == max(int(x.max()) for x in positions)
    rot = Rotary(RopeConfig(8, 8))
    tk, _, _ = p.rope(rot, torch.float32)
    far = dataclasses.replace(p, k_pos=p.k_pos + 5000)
    assert far.max_pos == int(p.k_pos.max()) + 5000
    tk_far, _, _ = far.rope(rot, torch.float32)  # its own tables, past the first 4096 positions
    assert torch.equal(tk_far[0], rot.tables(p.k_pos + 5000, torch.float32)[0])


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_narrow_kv_cache_stays_close_to_float32_and_saves_as_it_runs(kv_dtype, tmp_path):
    """CacheConfig.kv_dtype: buffers in that dtype, logits of a long sink stream near the float32 cache's,
    and a session saved mid-stream continues exactly as the uninterrupted one."""
    from conftest import hf_tiny, ours_from_hf
    from sinkstream import CacheConfig
    model = ours_from_hf(hf_tiny("llama"))
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(0))
    out = {}
    for dt in (None, kv_dtype):
        cache = model.make_cache(CacheConfig("sink", sinks=2, window=14, prefill_chunk=5, kv_dtype=dt))
        assert cache.layers[0].k.dtype == (getattr(torch, dt) if dt else torch.float32)
        out[dt] = torch.cat([cache.run(model, ids[:, :40])] + [cache.run(model, ids[:, i:i + 1])
                                                              for i in range(40, 90)], dim=1)
    ref = out[None]
    assert (out[kv_dtype] - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(ValueError, match="kv_dtype"):
        CacheConfig("memory", kv_dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown kv_dtype"):
        CacheConfig("sink", kv_dtype="int8")


def test_narrow_kv_session_round_trip(real, tmp_path):
    from sinkstream import CacheConfig, SamplingConfig, Session
    model, tok = real
    cfg = CacheConfig("sink", sinks=2, window=14, kv_dtype="bfloat16")
    a = Session(model, tok, cfg, SamplingConfig(temperature=0))
    a.feed("a b c d e f g h i j k l m n o p q r")
    a.save(tmp_path / "s.safetensors")
    b = Session.load(tmp_path / "s.safetensors", model, tok)
    assert b.cache_config.kv_dtype == "bfloat16"
    assert b.cache.layers[0].k.dtype == torch.bfloat16
    first, second = ("".join(r.text for r in s.send("s t u", max_tokens=8)) for s in (a, b))
    assert first == second
