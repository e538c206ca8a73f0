"""Persistence: kill -9 the server mid-generation, restart it on the same --state-dir: every completed turn
of every session is back and greedy continuation is what an uninterrupted run gives. A save killed half-way
never damages the previous good file."""
import os
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("fastapi")

from serverkit import Server, tiny_chat_model  # noqa: E402

FLAGS = ("--model-name", "tiny", "--sinks", "4", "--window", "60", "--max-tokens", "5000")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def chat(http, sid, history, text, n=8):
    """One greedy turn sent OpenAI-style (whole history); appends the user message and the reply."""
    history.append({"role": "user", "content": text})
    r = http.post("/v1/chat/completions", json={"messages": history, "session": sid, "max_tokens": n,
                                                "temperature": 0})
    assert r.status_code == 200, r.text
    history.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    return history[-1]["content"]


def complete(http, sid, prompt, n=8):
    r = http.post("/v1/completions", json={"prompt": prompt, "session": sid, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


SCRIPT = {"s1": ["Hello!", "Tell me more.", "And then?"],
          "s2": ["A different talk.", "Second turn here.", "Third one."]}
TEXT = ["It was a dark and stormy night", "; the rain", " and then"]


def test_kill9_mid_generation_then_restart(model_dir, tmp_path):
    state = tmp_path / "state"
    a = Server("--model", str(model_dir), "--state-dir", str(state), *FLAGS)
    try:
        with httpx.Client(base_url=a.url, timeout=60) as http:
            hist = {sid: [] for sid in SCRIPT}
            before = {}
            for sid in SCRIPT:
                assert http.post("/v1/sessions", json={"id": sid}).status_code == 200
                before[sid] = [chat(http, sid, hist[sid], text) for text in SCRIPT[sid][:2]]
            assert http.post("/v1/sessions", json={"id": "t1"}).status_code == 200
            text_before = [complete(http, "t1", p) for p in TEXT[:2]]
            # a third, long turn for s1: kill -9 while it streams
            body = {"messages": hist["s1"] + [{"role": "user", "content": "Never stop."}], "session": "s1",
                    "max_tokens": 5000, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                n = 0
                for line in r.iter_lines():
                    n += line.startswith("data: ")
                    if n >= 5:
                        a.kill9()
                        break
    finally:
        a.stop()
    leftovers = list(state.glob(".*.tmp"))
    b = Server("--model", str(model_dir), "--state-dir", str(state), *FLAGS)
    try:
        assert not any(p.exists() for p in leftovers)
        with httpx.Client(base_url=b.url, timeout=60) as http:
            listed = {s["id"]: s for s in http.get("/v1/sessions").json()["data"]}
            assert set(listed) == {"s1", "s2", "t1"}
            for sid in SCRIPT:
                assert listed[sid]["turns"] == 2 and listed[sid]["messages_seen"] == 4, listed[sid]
                assert http.get(f"/v1/sessions/{sid}").json()["recent_messages"] == hist[sid]
            assert listed["t1"]["turns"] == 2
            # continue after the restart: the whole history is accepted as it stood before the kill
            after = {sid: chat(http, sid, hist[sid], SCRIPT[sid][2]) for sid in SCRIPT}
            text_after = complete(http, "t1", TEXT[2])
            # the uninterrupted reference: the same conversations from scratch in fresh sessions
            for sid in SCRIPT:
                ref_id = "ref-" + sid
                assert http.post("/v1/sessions", json={"id": ref_id}).status_code == 200
                ref_hist: list = []
                ref = [chat(http, ref_id, ref_hist, text) for text in SCRIPT[sid]]
                assert ref == before[sid] + [after[sid]], sid
            assert http.post("/v1/sessions", json={"id": "ref-t1"}).status_code == 200
            assert [complete(http, "ref-t1", p) for p in TEXT] == text_before + [text_after]
    finally:
        b.stop()


KILL_DURING_SAVE = r"""
import os, signal, sys
import safetensors.torch as st
from sinkstream import Session, load
model, tok = load(sys.argv[1], device="cpu", quiet=True)
s = Session.load(sys.argv[2], model, tok)
list(s.chat("one more turn", max_tokens=4))
real = st.save_file
def save_half_then_die(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
st.save_file = save_half_then_die
s.save(sys.argv[2])
"""


def test_save_killed_half_way_keeps_previous_state(model_dir, tmp_path):
    import sinkstream
    from sinkstream import CacheConfig, Session
    from sinkstream.server.sessions import SessionStore
    model, tok = sinkstream.load(str(model_dir), device="cpu", quiet=True)
    s = Session(model, tok, CacheConfig("sink", sinks=4, window=60))
    s.extra = {"model": "tiny", "history": {"count": 0, "digest": ""}}
    list(s.chat("hello", max_tokens=6))
    path = tmp_path / "k1.safetensors"
    s.save(path)
    good = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(model_dir), str(path)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    tmp = list(tmp_path.glob(".k1.safetensors.*.tmp"))
    assert len(tmp) == 1 and tmp[0].stat().st_size < len(good)
    assert path.read_bytes() == good
    assert Session.load(path, model, tok).turns == 1
    store = SessionStore(tmp_path, model, tok, model_id="tiny", cache_config=s.cache_config, sampling=s.sampling)
    assert not tmp[0].exists() and store.ids() == ["k1"] and store.get("k1").turns == 1
    # a file damaged some other way is refused, not loaded
    bad = tmp_path / "k2.safetensors"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError):
        Session.load(bad, model, tok)
