"""Pinned system prompts (never evicted) and shared prefixes (a system prompt's KV computed once)."""
import threading

import httpx
import pytest
import torch

from inprocess import AppServer, shared_tiny_chat
from sinkstream import CacheConfig, SamplingConfig, Session
from sinkstream.errors import PinError, SinkstreamError
from sinkstream.prefix import PrefixStore
from sinkstream.session import system_prefix
from sinkstream.tokenizer import encode

SYSTEM = "You are a ship's cook. Every answer begins with the word Ahoy and names a vegetable."
CACHE = CacheConfig("sink", sinks=4, window=92)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return shared_tiny_chat(tmp_path_factory)


def greedy_chat(s: Session, messages, n=6):
    out = []
    for m in messages:
        out.append([r.token for r in s.chat(m, max_tokens=n) if r.token is not None])
    return out


def prefix_ids(tok, system=SYSTEM):
    return encode(tok, system_prefix(tok, system), start_of_stream=True)


# --- pinning ------------------------------------------------------------------------------------------
def test_pinned_config_keeps_the_cache_size_and_pins_the_prefix(tiny_chat):
    model, tok = tiny_chat
    n = len(prefix_ids(tok))
    s = Session(model, tok, CACHE, system=SYSTEM, pin_system=True, prefixes=False)
    assert s.pinned == n and s.stats().pinned == n
    assert s.cache.config.sinks == n and s.cache.config.sinks + s.cache.config.window == CACHE.sinks + CACHE.window
    assert s.cache_config == CACHE  # what the caller asked for; the cache runs the pinned derivation
    assert s.prefix_text.startswith("<|im_start|>system") and SYSTEM in s.prefix_text
    assert s.cache.seen == n  # fed when the session was made


def test_pinned_tokens_survive_any_number_of_evictions(tiny_chat):
    model, tok = tiny_chat
    ids = prefix_ids(tok)
    n = len(ids)
    alone = model.make_cache(CACHE.pinned(n))  # the prefix and nothing else
    alone.run(model, torch.tensor([ids]))
    s = Session(model, tok, CACHE, system=SYSTEM, pin_system=True, prefixes=False)
    greedy_chat(s, [f"tell me about item {i} in the galley" for i in range(12)], n=10)
    assert s.cache.seen > 4 * s.cache.capacity  # the window wrapped several times
    slots = next(iter(s.cache.groups.values()))
    assert torch.equal(slots.slot_token[:n], torch.arange(n))  # slots 0..n-1 still hold tokens 0..n-1
    assert bool((slots.slot_token[n:] >= n).all())
    for layer in range(len(s.cache.layers)):  # their keys and values are the prefix's own, un-rotated
        torch.testing.assert_close(s.cache.raw_keys(layer)[:, :, :n], alone.raw_keys(layer)[:, :, :n])
        assert torch.equal(s.cache.layers[layer].v[:, :, :n], alone.layers[layer].v[:, :, :n])


def test_pinned_positions_stay_bounded(tiny_chat):
    model, tok = tiny_chat
    s = Session(model, tok, CACHE, system=SYSTEM, pin_system=True, prefixes=False)
    greedy_chat(s, ["one", "two", "three", "four", "five", "six", "seven", "eight"], n=12)
    plan = s.cache.begin(1)[0]  # the next decode step (its pass is never run: the session is dropped)
    S, W = s.cache.config.sinks, s.cache.config.window
    assert torch.equal(plan.k_tokens[:S], torch.arange(S))
    assert plan.max_pos < S + 2 * W + 1  # the contract's bound, however long the chat (cache/plan.py)


def test_plain_sink_loses_the_system_prompt_pinned_keeps_it(tiny_chat):
    model, tok = tiny_chat
    n = len(prefix_ids(tok))
    msgs = [f"question {i} about the soup" for i in range(10)]
    plain = Session(model, tok, CACHE, system=SYSTEM, prefixes=False)
    greedy_chat(plain, msgs, n=10)
    kept = next(iter(plain.cache.groups.values())).slot_token
    assert not bool(((kept >= CACHE.sinks) & (kept < n)).any())  # the prompt beyond the 4 sinks is gone


def test_memory_policy_pins_too(tiny_chat):
    model, tok = tiny_chat
    cfg = CacheConfig("memory", sinks=4, window=92, block_size=8, top_k=2)
    s = Session(model, tok, cfg, system=SYSTEM, pin_system=True, prefixes=False)
    n = s.pinned
    greedy_chat(s, [f"more soup {i}" for i in range(8)], n=10)
    assert s.cache.blocks > 0  # evicted tokens went to memory blocks
    assert torch.equal(next(iter(s.cache.groups.values())).slot_token[:n], torch.arange(n))


def test_dense_keeps_everything_and_window_cannot_pin(tiny_chat):
    model, tok = tiny_chat
    dense = Session(model, tok, CacheConfig("dense"), system=SYSTEM, pin_system=True, prefixes=False)
    assert dense.cache.config == CacheConfig("dense") and dense.pinned == len(prefix_ids(tok))
    with pytest.raises(PinError, match="window cache keeps no sinks"):
        Session(model, tok, CacheConfig("window", window=96), system=SYSTEM, pin_system=True, prefixes=False)


def test_bad_pins_are_clear_errors_and_change_nothing(tiny_chat):
    model, tok = tiny_chat
    with pytest.raises(PinError, match="empty"):
        Session(model, tok, CACHE, system="   ", pin_system=True, prefixes=False)
    long = "Remember this. " * 40
    with pytest.raises(PinError, match=r"more than this cache's limit of 48"):
        Session(model, tok, CACHE, system=long, pin_system=True, prefixes=False)
    with pytest.raises(PinError, match="limit of 10"):
        Session(model, tok, CacheConfig("sink", 4, 92, max_pinned=10), system=SYSTEM, pin_system=True,
                prefixes=False)
    s = Session(model, tok, CACHE, pin_system=True, prefixes=False)  # no system prompt: nothing pinned
    assert s.pinned == 0 and s.cache.seen == 0
    with pytest.raises(PinError):
        s.use_system(long)
    assert s.cache.seen == 0 and s.system is None and s.cache.config == CACHE  # unchanged
    greedy_chat(s, ["hello"], n=3)
    with pytest.raises(SinkstreamError, match="already fed"):
        s.use_system(SYSTEM)


def test_pinned_session_saves_and_restores(tiny_chat, tmp_path):
    model, tok = tiny_chat
    a = Session(model, tok, CACHE, system=SYSTEM, pin_system=True, prefixes=False)
    greedy_chat(a, [f"turn {i}" for i in range(6)], n=8)
    a.save(tmp_path / "a.safetensors")
    b = Session.load(tmp_path / "a.safetensors", model, tok)
    assert (b.pinned, b.pin_system, b.system, b.prefix_text) == (a.pinned, True, SYSTEM, a.prefix_text)
    assert b.cache.config == a.cache.config and b.cache_config == CACHE
    later = [f"later {i}" for i in range(4)]
    assert greedy_chat(b, later, n=8) == greedy_chat(a, later, n=8)


# --- shared prefixes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pin", [False, True])
def test_shared_prefix_gives_the_same_state_and_tokens_as_prefilling_it(tiny_chat, pin):
    model, tok = tiny_chat
    store = PrefixStore()
    own = Session(model, tok, CACHE, system=SYSTEM, pin_system=pin, prefixes=False)
    first = Session(model, tok, CACHE, system=SYSTEM, pin_system=pin, prefixes=store)
    copied = Session(model, tok, CACHE, system=SYSTEM, pin_system=pin, prefixes=store)
    assert (store.misses, store.hits, len(store)) == (1, 1, 1)
    ref = own.cache.state()
    for s in (first, copied):
        st = s.cache.state()
        assert st.keys() == ref.keys() and all(torch.equal(st[k], ref[k]) for k in ref)
    msgs = ["What is for dinner?", "And after that?", "Thank you"]
    expect = greedy_chat(own, msgs)
    assert greedy_chat(copied, msgs) == expect
    assert greedy_chat(first, msgs) == expect
    # a session's turns never touch the stored entry: a new session still starts from the prefix alone
    again = Session(model, tok, CACHE, system=SYSTEM, pin_system=pin, prefixes=store)
    assert again.cache.seen == len(prefix_ids(tok))
    assert greedy_chat(again, msgs) == expect


def test_chats_without_a_system_prompt_share_the_templates_start(tiny_chat):
    """What the template renders before the first message's content (SmolLM2's default system prompt and
    the user turn's opening) starts every chat with no system prompt, through the store: the same tokens
    in the cache as the first turn rendered whole, the same replies."""
    from sinkstream.generate import stream_tokens
    from sinkstream.sampling import make_sampler
    from sinkstream.tokenizer import render_chat
    model, tok = tiny_chat
    head = system_prefix(tok, None)
    assert len(encode(tok, head, start_of_stream=True)) > 10  # the default system prompt is in it
    store = PrefixStore()
    a, b = Session(model, tok, CACHE, prefixes=store), Session(model, tok, CACHE, prefixes=store)
    msgs = ["What is for dinner?", "And after that?"]
    replies = greedy_chat(a, msgs)
    assert greedy_chat(b, msgs) == replies and (store.misses, store.hits) == (1, 1)
    assert a.prefix_text == head and a.system is None
    whole = render_chat(tok, [{"role": "user", "content": msgs[0]}])
    ids = encode(tok, whole, start_of_stream=True)
    assert encode(tok, head, start_of_stream=True) + encode(tok, whole[len(head):], start_of_stream=False) == ids
    alone = list(stream_tokens(model, model.make_cache(CACHE), torch.tensor(ids), sampler=make_sampler(SamplingConfig()),
                              max_tokens=6, stop_ids=set()))
    assert replies[0] == alone[:len(replies[0])]


def test_prefix_keys_by_config_and_tokens(tiny_chat):
    model, tok = tiny_chat
    store = PrefixStore()
    Session(model, tok, CACHE, system=SYSTEM, prefixes=store)
    Session(model, tok, CACHE, system=SYSTEM, pin_system=True, prefixes=store)  # another cache config
    Session(model, tok, CACHE, system=SYSTEM + " Be brief.", prefixes=store)   # other tokens
    Session(model, tok, CacheConfig("sink", 4, 92, kv_dtype="bfloat16"), system=SYSTEM, prefixes=store)
    assert (store.misses, store.hits) == (4, 0)
    Session(model, tok, CACHE, system=SYSTEM, prefixes=store)
    assert store.hits == 1


def test_prefix_store_memory_bound_and_lru(tiny_chat):
    model, tok = tiny_chat
    systems = [f"You are assistant number {i}. Be kind." for i in range(4)]
    probe = PrefixStore()
    Session(model, tok, CACHE, system=systems[0], prefixes=probe)
    one = probe.nbytes
    assert one > 0
    store = PrefixStore(max_bytes=int(2.5 * one))
    for system in systems:
        Session(model, tok, CACHE, system=system, prefixes=store)
        assert store.nbytes <= store.max_bytes
    assert len(store) == 2 and store.misses == 4
    Session(model, tok, CACHE, system=systems[3], prefixes=store)  # the newest is kept
    assert store.hits == 1
    Session(model, tok, CACHE, system=systems[0], prefixes=store)  # the oldest went: computed again
    assert store.misses == 5 and store.nbytes <= store.max_bytes
    tiny = PrefixStore(max_bytes=one // 2)  # an entry larger than the whole store is never kept
    s = Session(model, tok, CACHE, system=systems[1], prefixes=tiny)
    assert len(tiny) == 0 and tiny.nbytes == 0 and s.cache.seen > 0


def test_concurrent_sessions_compute_a_prefix_once(tiny_chat):
    model, tok = tiny_chat
    store = PrefixStore()
    made, errors = [], []

    def make():
        try:
            made.append(Session(model, tok, CACHE, system=SYSTEM, pin_system=True, prefixes=store))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 4
    assert (store.misses, store.hits) == (1, 3)


def test_recompute_sessions_feed_their_prefix_without_the_store(tiny_chat):
    model, tok = tiny_chat
    store = PrefixStore()
    s = Session(model, tok, CacheConfig("recompute", window=64), system=SYSTEM, prefixes=store)
    assert s.cache.seen == len(prefix_ids(tok)) and len(store) == 0


# --- server -------------------------------------------------------------------------------------------
def test_server_pins_system_prompts(tiny_chat, tmp_path):
    from sinkstream.server.app import Settings
    srv = AppServer(Settings(model_id="tiny", cache=CACHE, state_dir=str(tmp_path), pin_system=True), tiny_chat)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            n = len(prefix_ids(tiny_chat[1]))
            a = http.post("/v1/sessions", json={"id": "a", "system": SYSTEM}).json()
            assert a["pinned_tokens"] == n and a["cache"] == f"sink({n},{CACHE.sinks + CACHE.window - n})"
            b = http.post("/v1/sessions", json={"id": "b", "system": SYSTEM, "pin_system": False}).json()
            assert b["pinned_tokens"] == 0 and b["cache"] == CACHE.describe()
            assert srv.store.prefixes.misses == 2  # pinned and plain are different caches
            c = http.post("/v1/sessions", json={"id": "c", "system": SYSTEM}).json()
            assert c["pinned_tokens"] == n and srv.store.prefixes.hits == 1
            for i in range(8):  # the pinned prompt survives the window wrapping, and a restart from disk
                r = http.post("/v1/chat/completions", json={
                    "model": "tiny", "session": "a", "append": True, "max_tokens": 12,
                    "messages": [{"role": "user", "content": f"what is in pot number {i}?"}]})
                assert r.status_code == 200, r.text
            srv.store.rollback("a")  # drop the live copy: the next read is the file
            info = http.get("/v1/sessions/a").json()
            assert info["pinned_tokens"] == n and info["tokens_seen"] > 2 * (CACHE.sinks + CACHE.window)
            live = srv.store.get("a")
            assert torch.equal(next(iter(live.cache.groups.values())).slot_token[:n], torch.arange(n))
            # a system prompt in the first chat request is pinned too
            http.post("/v1/sessions", json={"id": "d"})
            r = http.post("/v1/chat/completions", json={
                "model": "tiny", "session": "d", "max_tokens": 4,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert http.get("/v1/sessions/d").json()["pinned_tokens"] == n
            # a session rebuilt from other messages ("resync") starts again from their system prompt, pinned
            r = http.post("/v1/chat/completions", json={
                "model": "tiny", "session": "d", "resync": True, "max_tokens": 4,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]})
            assert r.status_code == 200, r.text
            d = srv.store.get("d")
            assert d.pinned == len(prefix_ids(tiny_chat[1], "Be brief.")) and d.system == "Be brief."
            assert http.get("/v1/sessions/d").json()["pinned_tokens"] == d.pinned
            # bad input
            r = http.post("/v1/sessions", json={"id": "e", "system": "Remember this. " * 40})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_pin"
            assert "limit" in r.json()["error"]["message"]
            r = http.post("/v1/sessions", json={"id": "f", "pin_system": True})
            assert r.status_code == 400 and r.json()["error"]["code"] == "pin_without_system"
            assert http.get("/v1/sessions/e").status_code == 404
    finally:
        srv.stop()


def test_a_new_session_reads_the_vocabulary_once_per_tokenizer(tiny_chat, monkeypatch):
    """Reading a 49K-token vocabulary took 19 ms of every session made (and of every stateless request):
    the end-of-turn ids and the template check are worked out once per tokenizer."""
    from sinkstream.tokenizer import eos_token_ids, render_chat
    model, tok = tiny_chat
    expect = eos_token_ids(tok)
    calls = []
    real = type(tok).get_vocab
    monkeypatch.setattr(type(tok), "get_vocab", lambda self: calls.append(1) or real(self))
    for _ in range(3):
        Session(model, tok, CACHE, system=SYSTEM, prefixes=False)
        render_chat(tok, [{"role": "user", "content": "hi"}])
        assert eos_token_ids(tok) == expect
    assert calls == []
