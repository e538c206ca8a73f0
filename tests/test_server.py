"""The OpenAI-compatible server, started for real on a loopback port, driven by the official `openai` client.

One server (tiny random model with SmolLM2's tokenizer, small limits) serves every test here; tests that
change shared state (busy queue, session limit) clean up after themselves.
"""
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serverkit import Server, tiny_chat_model  # noqa: E402

KEY = "test-key-123"
MAX_TOKENS = 5000
MAX_SESSIONS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server("--model", str(model_dir), "--model-name", "tiny", "--api-key", KEY,
                 "--state-dir", str(tmp_path_factory.mktemp("state")), "--sinks", "4", "--window", "60",
                 "--max-tokens", str(MAX_TOKENS), "--max-body-bytes", "65536", "--max-queue", "1",
                 "--max-batch", "1",  # one request at a time: the queue tests below fill the queue with two
                 "--max-live-sessions", "2", "--max-sessions", str(MAX_SESSIONS), "--max-prompt-tokens", "3000")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def new_session(http, sid=None, **body):
    r = http.post("/v1/sessions", json={"id": sid, **body})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def is_openai_error(r, status, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def user(text):
    return {"role": "user", "content": text}


# --- OpenAI endpoints, stateless -----------------------------------------------------------------------
def test_health_is_public_and_v1_needs_the_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    is_openai_error(httpx.get(server.url + "/v1/models"), 401, "invalid_api_key")
    is_openai_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    is_openai_error(httpx.get(server.url + "/v1/sessions", headers={"Authorization": KEY}), 401)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_non_streaming_is_deterministic_when_greedy(client):
    kw = dict(model="tiny", messages=[user("Hello there")], max_tokens=8, temperature=0)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.object == "chat.completion" and a.id.startswith("chatcmpl-")
    assert a.choices[0].message.role == "assistant"
    assert a.choices[0].finish_reason in ("stop", "length")
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 8 and a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", messages=[user("Stream me")], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_sse_wire_format(server):
    body = {"model": "tiny", "messages": [user("wire format")], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({p["id"] for p in payloads}) == 1 and len({p["created"] for p in payloads}) == 1
    finishes = [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] in ("stop", "length")
    assert all(p["usage"] is None for p in payloads[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1


def test_completions_streaming_and_not(client):
    a = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert a.object == "text_completion" and a.choices[0].finish_reason in ("stop", "length")
    parts = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0,
                                           stream=True))
    assert len({p.id for p in parts}) == 1
    assert "".join(p.choices[0].text for p in parts) == a.choices[0].text
    assert parts[-1].choices[0].finish_reason == a.choices[0].finish_reason


def test_stop_string_cuts_the_reply(client):
    kw = dict(model="tiny", messages=[user("stop somewhere")], max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 12
    stop = full[6:10]
    r = client.chat.completions.create(**kw, stop=[stop, "never-seen"])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model="tiny", messages=[user("pick words")], max_tokens=10, temperature=1.0, seed=7)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content


# --- sessions ------------------------------------------------------------------------------------------
def test_session_full_history_append_and_header(client, http):
    sid = new_session(http)
    msgs = [user("first question")]
    r1 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, extra_body={"session": sid})
    assert r1.model_extra["session"]["turns"] == 1
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, user("second question")]
    r2 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, extra_headers={"X-Session-Id": sid})
    msgs += [{"role": "assistant", "content": r2.choices[0].message.content}]
    # streaming, only the new message
    stream = client.chat.completions.create(model="tiny", messages=[user("third")], max_tokens=6, stream=True,
                                            extra_body={"session": sid, "append": True})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    info = http.get(f"/v1/sessions/{sid}").json()
    assert info["turns"] == 3 and info["messages_seen"] == 6
    assert info["tokens_seen"] > info["tokens_cached"] > 0  # more than the 64-token cache has gone through
    assert info["tokens_cached"] <= info["cache_capacity"] == 64
    assert info["recent_messages"][:4] == [{"role": m["role"], "content": m["content"]} for m in msgs]
    assert sid in [s["id"] for s in http.get("/v1/sessions").json()["data"]]
    # the prompt of a later turn holds only the new turn's tokens, not the history
    assert r2.usage.prompt_tokens < 30


def test_history_mismatch_409_then_resync(client, http):
    sid = new_session(http)
    r1 = client.chat.completions.create(model="tiny", messages=[user("a")], max_tokens=4, extra_body={"session": sid})
    edited = [user("a, edited"), {"role": "assistant", "content": r1.choices[0].message.content}, user("b")]
    with pytest.raises(openai.ConflictError) as e:
        client.chat.completions.create(model="tiny", messages=edited, max_tokens=4, extra_body={"session": sid})
    assert e.value.body["code"] == "session_history_mismatch"
    r = client.chat.completions.create(model="tiny", messages=edited, max_tokens=4,
                                       extra_body={"session": sid, "resync": True})
    assert r.model_extra["session"]["turns"] == 2 and r.model_extra["session"]["messages_seen"] == 4


def test_sessions_are_isolated_and_survive_lru_eviction(client, http):
    """Same conversation in A and C; B interleaves other text and 3 sessions exceed the 2 kept in memory."""
    a, b, c = (new_session(http) for _ in range(3))

    def say(sid, text):
        r = client.chat.completions.create(model="tiny", messages=[user(text)], max_tokens=8,
                                           extra_body={"session": sid, "append": True})
        return r.choices[0].message.content

    first = [say(a, "one"), say(b, "something else entirely"), say(a, "two"), say(b, "more noise"), say(a, "three")]
    ref = [say(c, "one"), say(c, "two"), say(c, "three")]
    assert [first[0], first[2], first[4]] == ref
    live = [s["in_memory"] for s in http.get("/v1/sessions").json()["data"]]
    assert sum(live) <= 2
    assert say(a, "four") == say(c, "four")  # a was evicted while c ran: reloaded from disk


def test_session_delete_and_unknown(client, http):
    sid = new_session(http, "to-delete", system="be brief")
    assert http.get(f"/v1/sessions/{sid}").json()["messages_seen"] == 1
    assert http.delete(f"/v1/sessions/{sid}").json() == {"id": sid, "object": "session.deleted", "deleted": True}
    is_openai_error(http.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    is_openai_error(http.delete(f"/v1/sessions/{sid}"), 404)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny", messages=[user("x")], extra_body={"session": sid})
    new_session(http, "dup")
    is_openai_error(http.post("/v1/sessions", json={"id": "dup"}), 409, "session_exists")


# --- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [user("x")], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"messages": [user("x")], "n": 2}, 400, "n"),
    ({"messages": [user("x")], "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ({"messages": [user("x")], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [user("x")], "model": "gpt-4"}, 404, "model"),
    ({"messages": [user("x")], "session": "nope"}, 404, "session"),
    ({"messages": [user("x")], "session": "../../etc/passwd"}, 400, "session"),
    ({"messages": [user("x")], "session": "a/b"}, 400, "session"),
    ({"messages": [user("x" * 20000)]}, 400, "messages"),   # > --max-prompt-tokens
])
def test_bad_chat_requests(http, body, status, param):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) else {"json": body}
    err = is_openai_error(http.post("/v1/chat/completions", **kw), status)
    if param is not None:
        assert err["param"] == param, err


def test_malicious_session_ids(http, server):
    for bad in ("..", "...", "a.b", "x" * 65, "%2e%2e%2fetc", "a b", "con\\\\x"):
        r = http.post("/v1/chat/completions", json={"messages": [user("x")]}, headers={"X-Session-Id": bad})
        is_openai_error(r, 400)
        assert http.get(f"/v1/sessions/{bad}").status_code in (400, 404)
        is_openai_error(http.post("/v1/sessions", json={"id": bad}), 400)
    r = http.get("/v1/sessions/..%2F..%2Fetc%2Fpasswd")
    assert r.status_code in (400, 404) and "error" in r.json()


def test_body_too_large_413(http):
    is_openai_error(http.post("/v1/chat/completions", json={"messages": [user("x" * 70000)]}), 413,
                    "request_too_large")

    def chunks():  # no Content-Length: counted while reading
        for _ in range(20):
            yield b" " * 8192

    r = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    is_openai_error(r, 413)


def test_session_limit_429(http):
    made = []
    try:
        for i in range(MAX_SESSIONS + 1):
            r = http.post("/v1/sessions", json={})
            if r.status_code != 200:
                is_openai_error(r, 429, "too_many_sessions")
                break
            made.append(r.json()["id"])
        else:
            pytest.fail("no session limit")
    finally:
        for sid in made:
            http.delete(f"/v1/sessions/{sid}")


def test_busy_queue_503_session_429_and_disconnect_cancels(server, http):
    """A long streaming turn holds the worker; one request may wait; the next gets 503; dropping the
    stream cancels the generation at once, and the session keeps only its completed turns."""
    sid = new_session(http)
    cancelled, rejected = metric(server, "sinkstream_cancelled_total"), metric(server, "sinkstream_rejected_total")
    long_body = {"messages": [user("go on forever")], "max_tokens": MAX_TOKENS, "stream": True, "session": sid}
    queued: dict = {}

    def wait_in_queue():
        queued["response"] = http.post("/v1/completions", json={"prompt": "queued", "max_tokens": 4})

    with httpx.stream("POST", server.url + "/v1/chat/completions", json=long_body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as stream:
        lines = stream.iter_lines()
        got = 0
        for line in lines:  # a few tokens are out: the worker is busy with this turn
            got += line.startswith("data: ")
            if got >= 4:
                break
        is_openai_error(http.post("/v1/chat/completions", json={"messages": [user("me too")], "session": sid}),
                        429, "session_busy")
        is_openai_error(http.delete(f"/v1/sessions/{sid}"), 429, "session_busy")
        t = threading.Thread(target=wait_in_queue)
        t.start()
        for _ in range(100):
            if "sinkstream_queue_depth 1" in httpx.get(server.url + "/metrics").text:
                break
            time.sleep(0.05)
        else:
            pytest.fail("second request never queued")
        is_openai_error(http.post("/v1/completions", json={"prompt": "one too many", "max_tokens": 2}), 503,
                        "queue_full")
        t_close = time.monotonic()
    # leaving the `with` closes the connection mid-generation
    t.join(timeout=30)
    assert queued["response"].status_code == 200
    assert time.monotonic() - t_close < 10  # far less than MAX_TOKENS tokens would take
    assert metric(server, "sinkstream_cancelled_total") == cancelled + 1
    assert metric(server, "sinkstream_rejected_total") == rejected + 1
    for _ in range(50):  # the cancelled turn is rolled back and the session is free again
        info = http.get(f"/v1/sessions/{sid}").json()
        if http.post("/v1/chat/completions", json={"messages": [user("after")], "session": sid,
                                                   "max_tokens": 2}).status_code == 200:
            break
        time.sleep(0.1)
    assert info["turns"] == 0
    assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 1


def metric(server, name):
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_non_streaming_client_that_leaves_cancels(server, http):
    before = metric(server, "sinkstream_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"prompt": "long", "max_tokens": MAX_TOKENS}, timeout=1.0)
    t0 = time.monotonic()
    r = http.post("/v1/completions", json={"prompt": "short", "max_tokens": 2})
    assert r.status_code == 200 and time.monotonic() - t0 < 10  # the long one (~25 s) was stopped
    assert metric(server, "sinkstream_cancelled_total") == before + 1


def test_metrics_names(server, client):
    client.chat.completions.create(model="tiny", messages=[user("count me")], max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("sinkstream_requests_total", "sinkstream_prompt_tokens_total", "sinkstream_generated_tokens_total",
                 "sinkstream_time_to_first_token_seconds_bucket", "sinkstream_inter_token_latency_seconds_count",
                 "sinkstream_sessions_live", "sinkstream_sessions_on_disk", "sinkstream_cache_fill_ratio"):
        assert name in text, name
    assert 'sinkstream_requests_total{method="POST",path="/v1/chat/completions",status="200"}' in text


def test_chat_cli_client(server, http):
    out = subprocess.run([sys.executable, "-m", "sinkstream", "chat", "--server", server.url, "--session", "cli-s",
                          "--api-key", KEY, "--max-tokens", "5"], input="hello there\n/stats\n/exit\n",
                         capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "[turns 1 |" in out.stderr and "tok/s" in out.stderr
    assert http.get("/v1/sessions/cli-s").json()["turns"] == 1
