"""The server answers many requests at once, their forward passes batched: every answer is what the same
request gets alone (no cross-talk, sessions evicted to disk and back included), a client that leaves and a
`kill -9` during batched steps lose no other session's completed turn, and /metrics shows the batches."""
import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")

from serverkit import Server, tiny_chat_model  # noqa: E402

FLAGS = ("--model-name", "tiny", "--sinks", "4", "--window", "60", "--max-tokens", "5000",
         "--max-live-sessions", "3")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def stream_chat(url: str, body: dict, session: str | None = None, stop_after: int | None = None) -> str:
    """A streaming request; the text it streamed (stops reading after `stop_after` chunks)."""
    headers = {"X-Session-Id": session} if session else {}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    parts, n = [], 0
    with httpx.stream("POST", url + path, json={**body, "stream": True, "temperature": 0}, headers=headers,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            parts.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
            n += 1
            if stop_after is not None and n >= stop_after:
                break
    return "".join(parts)


def script(n_sessions: int, seed: int = 0) -> list[tuple[str, int, dict]]:
    """Turns of chat sessions, completion sessions and stateless requests, interleaved at random; a session's
    own turns keep their order."""
    rng = random.Random(seed)
    turns = []
    for i in range(n_sessions):
        sid = f"s{i}"
        if i % 3 == 2:  # a completion stream
            turns.append([(sid, k, {"prompt": f"Log line {i}.{k}: value={rng.randint(0, 999)}", "max_tokens": 12}) for k in range(2)])
        else:
            turns.append([(sid, k, {"messages": [{"role": "user", "content": f"My number is {i * 7 + k}."}],
                                    "max_tokens": 12 + i % 4, "append": True}) for k in range(2)])
    turns.append([(None, k, {"messages": [{"role": "user", "content": f"Stateless {k}"}], "max_tokens": 10})
                  for k in range(3)])
    order = []
    queues = [list(t) for t in turns]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        order.append(q.pop(0))
    return order


def run_script(url: str, order, parallel: int) -> dict:
    """Run `order` with up to `parallel` requests in flight (a session's next turn waits for its previous)."""
    out, done = {}, {}
    lock = threading.Lock()
    cond = threading.Condition(lock)

    def one(item):
        sid, k, body = item
        with cond:
            cond.wait_for(lambda: sid is None or k == 0 or (sid, k - 1) in done)
        text = stream_chat(url, body, session=sid)
        with cond:
            out[(sid, k)] = text
            done[(sid, k)] = True
            cond.notify_all()

    with httpx.Client(base_url=url, timeout=60) as http:
        for sid in {s for s, _, _ in order if s is not None}:
            assert http.post("/v1/sessions", json={"id": sid}).status_code == 200
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, order))
    return out


def test_batched_answers_equal_one_at_a_time_no_cross_talk(model_dir, tmp_path):
    order = script(9)
    batched = Server("--model", str(model_dir), "--state-dir", str(tmp_path / "a"), "--max-batch", "4", *FLAGS)
    try:
        got = run_script(batched.url, order, parallel=4)
        metrics = httpx.get(batched.url + "/metrics").text
    finally:
        batched.stop()
    alone = Server("--model", str(model_dir), "--state-dir", str(tmp_path / "b"), "--max-batch", "1", *FLAGS)
    try:
        want = run_script(alone.url, order, parallel=1)
    finally:
        alone.stop()
    assert got == want
    assert len(set(want.values())) > len(want) // 2  # the answers differ: a mix-up would show
    one = float(re.search(r'sinkstream_batch_size_bucket\{le="1"\} (\S+)', metrics).group(1))
    total = float(re.search(r"sinkstream_batch_size_count (\S+)", metrics).group(1))
    assert total > one > 0  # some passes advanced several requests
    for name in ("sinkstream_queue_wait_seconds_count", "sinkstream_time_to_first_token_seconds_count",
                 "sinkstream_inter_token_latency_seconds_count", "sinkstream_requests_running"):
        assert name in metrics


def test_client_leaving_and_kill9_mid_batch_lose_no_completed_turn(model_dir, tmp_path):
    state = tmp_path / "state"
    a = Server("--model", str(model_dir), "--state-dir", str(state), "--max-batch", "4", *FLAGS)
    sids = ["k0", "k1", "k2", "k3"]
    first = {}
    try:
        with httpx.Client(base_url=a.url, timeout=60) as http:
            for sid in sids:
                assert http.post("/v1/sessions", json={"id": sid}).status_code == 200
        with ThreadPoolExecutor(4) as pool:  # a first turn for every session, all at once
            texts = pool.map(lambda s: stream_chat(a.url, {"messages": [{"role": "user", "content": f"hi {s}"}],
                                                           "max_tokens": 10, "append": True}, session=s), sids)
            first = dict(zip(sids, texts))
        long = {"messages": [{"role": "user", "content": "Never stop."}], "max_tokens": 5000, "append": True}
        started = threading.Barrier(4)
        errors = []

        def long_turn(sid):
            try:
                if sid == "k0":  # leaves after a few chunks while the others decode
                    stream_chat(a.url, long, session=sid, stop_after=3)
                    started.wait(timeout=60)
                    return
                with httpx.stream("POST", a.url + "/v1/chat/completions", json={**long, "stream": True},
                                  headers={"X-Session-Id": sid}, timeout=120) as r:
                    n = 0
                    for line in r.iter_lines():
                        n += line.startswith("data: ")
                        if n == 5:
                            started.wait(timeout=60)
            except (httpx.HTTPError, threading.BrokenBarrierError) as e:
                errors.append(e)

        threads = [threading.Thread(target=long_turn, args=(s,)) for s in sids]
        for t in threads:
            t.start()
        started_all = threading.Event()
        threading.Thread(target=lambda: (started.wait(timeout=60), started_all.set()), daemon=True).start()
        assert started_all.wait(90), "the long turns did not all start"
        a.kill9()  # three sessions mid-turn, in batched steps
        for t in threads:
            t.join(timeout=60)
    finally:
        a.stop()
    b = Server("--model", str(model_dir), "--state-dir", str(state), "--max-batch", "4", *FLAGS)
    try:
        with httpx.Client(base_url=b.url, timeout=60) as http:
            for sid in sids:
                s = http.get(f"/v1/sessions/{sid}").json()
                assert s["turns"] == 1, s
                assert s["recent_messages"][-1]["content"].strip() == first[sid].strip()
            # every session goes on from its last completed turn
            with ThreadPoolExecutor(4) as pool:
                texts = list(pool.map(lambda s: stream_chat(b.url, {"messages": [{"role": "user", "content": "again"}],
                                                                     "max_tokens": 6, "append": True}, session=s),
                                      sids))
            assert all(isinstance(t, str) for t in texts)
            assert all(http.get(f"/v1/sessions/{sid}").json()["turns"] == 2 for sid in sids)
    finally:
        b.stop()
