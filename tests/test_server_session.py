"""In-process pieces of the server: save/load continuation is token-identical, the chat template runs in a
Jinja sandbox, /health is 503 while the model loads, the history hash and session ids."""
import threading

import pytest

import sinkstream
from serverkit import tiny_chat_model
from sinkstream import CacheConfig, SamplingConfig, Session


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    folder = tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    return sinkstream.load(str(folder), device="cpu", quiet=True)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, top_p=0.9, seed=5)])
def test_continuation_after_save_load_is_token_identical(tiny_chat, tmp_path, sampling):
    model, tok = tiny_chat
    s = Session(model, tok, CacheConfig("sink", sinks=4, window=40), sampling)
    for text in ("first", "second turn goes past the window"):
        list(s.chat(text, max_tokens=12))
    assert s.cache.seen > s.cache.capacity  # evictions happened before the save
    s.save(tmp_path / "s.safetensors")
    t = Session.load(tmp_path / "s.safetensors", model, tok)
    assert t.stats() == s.stats()
    for text in ("third", "fourth"):
        a = [r.token for r in s.chat(text, max_tokens=16)]
        b = [r.token for r in t.chat(text, max_tokens=16)]
        assert a == b


def test_chat_template_is_sandboxed(tiny_chat):
    """render_chat goes through transformers' apply_chat_template, whose Jinja environment is sandboxed."""
    from jinja2.sandbox import SecurityError

    from sinkstream.tokenizer import render_chat
    _, tok = tiny_chat
    saved = tok.chat_template
    try:
        tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        with pytest.raises(SecurityError):
            render_chat(tok, [{"role": "user", "content": "hi"}])
    finally:
        tok.chat_template = saved


def test_health_503_while_loading_then_200(tiny_chat, tmp_path):
    from starlette.testclient import TestClient

    from sinkstream.server.app import Settings, create_app
    release = threading.Event()

    def slow_loader(*_, **__):
        release.wait(30)
        return tiny_chat

    app = create_app(Settings(model_id="tiny", state_dir=str(tmp_path)), loader=slow_loader)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.get("/v1/models")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        for _ in range(100):
            if c.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert c.get("/health").json() == {"status": "ok", "model": "tiny"}
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_history_hash_ignores_whitespace_only():
    from sinkstream.server.sessions import HISTORY_START, chain
    a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello\n"}]
    b = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    c = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]
    assert chain(HISTORY_START, a) == chain(HISTORY_START, b) != chain(HISTORY_START, c)
    assert chain(chain(HISTORY_START, a[:1]), a[1:]) == chain(HISTORY_START, a)


@pytest.mark.parametrize("sid", ["..", "../x", "a/b", "a.b", "", "x" * 65, "nul\x00", "é"])
def test_session_ids_cannot_name_paths(sid):
    from sinkstream.server.errors import ApiError
    from sinkstream.server.sessions import check_id
    with pytest.raises(ApiError) as e:
        check_id(sid)
    assert e.value.status == 400


def test_memory_session_block_log_goes_with_the_session(tiny_chat, tmp_path):
    """A memory session's blocks live in a log folder beside its file: deleting the session removes it, and a
    log that no file names (a kill during a first save) is removed when a store opens the folder."""
    from sinkstream.server.sessions import SessionStore
    from sinkstream.session import saved_log_folder
    model, tok = tiny_chat
    cfg = CacheConfig("memory", sinks=4, window=32, block_size=8, top_k=2)
    store = SessionStore(tmp_path, model, tok, model_id="tiny", cache_config=cfg, sampling=SamplingConfig())
    s = store.create("m1")
    s.feed(" ".join(f"word{i}" for i in range(120)))
    store.commit("m1", s)
    log = saved_log_folder(store.path("m1"))
    assert s.cache.blocks > 10 and log.parent == tmp_path and (log / "blocks.kv").stat().st_size > 0
    orphan = tmp_path / "m1.safetensors.0123abcd.kvlog"
    orphan.mkdir()
    (orphan / "blocks.kv").write_bytes(b"x")
    store = SessionStore(tmp_path, model, tok, model_id="tiny", cache_config=cfg, sampling=SamplingConfig())
    assert not orphan.exists() and log.exists() and store.ids() == ["m1"]
    assert store.get("m1").cache.blocks == s.cache.blocks
    store.delete("m1")
    assert list(tmp_path.iterdir()) == []
