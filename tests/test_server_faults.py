"""The server under faults, in process: what GET /v1/sessions/{id} reports for a restored session, a slow
disk during a save, reads of live sessions while the worker decodes, a full or read-only disk during a
save, and a damaged session file. The tiny random model with SmolLM2's tokenizer; a real uvicorn on a
loopback port (tests/inprocess.py) where streaming matters."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from inprocess import shared_tiny_chat  # noqa: E402
from sinkstream import CacheConfig, SamplingConfig  # noqa: E402

SINK = CacheConfig("sink", sinks=4, window=60)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return shared_tiny_chat(tmp_path_factory)


def store_for(folder, loaded, cache):
    from sinkstream.server.sessions import SessionStore
    model, tok = loaded
    return SessionStore(folder, model, tok, model_id="tiny", cache_config=cache, sampling=SamplingConfig())


# --- defect 6: the session's own cache config ----------------------------------------------------------
def test_describe_reports_the_sessions_own_cache_not_the_servers(tiny_chat, tmp_path):
    """A session saved under one cache config and restored by a server started with another keeps its own."""
    store_for(tmp_path, tiny_chat, SINK).create("old")
    store = store_for(tmp_path, tiny_chat, CacheConfig("window", window=100))
    assert store.describe("old")["cache"] == "sink(4,60)"            # from the file's header
    assert store.get("old").cache_config == SINK
    assert store.describe("old")["cache"] == "sink(4,60)"            # live
    assert store.describe("old")["cache_capacity"] == 64
    store.create("new")
    assert store.describe("new")["cache"] == "window(100)"


# --- the in-process server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_chat, tmp_path_factory):
    from inprocess import AppServer
    from sinkstream.server.app import Settings
    from sinkstream.server.schemas import Limits
    srv = AppServer(Settings(model_id="tiny", cache=SINK, state_dir=str(tmp_path_factory.mktemp("state")),
                             limits=Limits(max_tokens=5000, max_queue=4)), tiny_chat)
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def user(text):
    return {"role": "user", "content": text}


def in_thread(fn):
    """Run `fn` on a thread; `.join()` returns its result."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t.start()
    t.result = lambda timeout=60: (t.join(timeout), box.get("r"))[1]
    return t


class Stream:
    """A streaming request on a thread that notes when each SSE event arrived; `close()` hangs up."""

    def __init__(self, url: str, path: str, body: dict):
        self.times: list[float] = []
        self.events: list[str] = []
        self.status: int | None = None
        self.hang_up = threading.Event()

        def read():
            with httpx.stream("POST", url + path, json=body, timeout=60) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.times.append(time.monotonic())
                        self.events.append(line[6:])
                    if self.hang_up.is_set():
                        break

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) < n:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the stream did not start"
            time.sleep(0.01)

    def max_gap(self, start: float, end: float) -> float:
        ts = [start] + [t for t in self.times if start < t < end] + [end]
        return max(b - a for a, b in zip(ts, ts[1:]))

    def close(self) -> None:
        self.hang_up.set()
        self.thread.join(timeout=30)


def wait_idle(store, sid, timeout=30):
    """Until the worker has let go of `sid` (a hung-up stream is cancelled between tokens)."""
    deadline = time.monotonic() + timeout
    while sid in store.busy:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# --- defect 7: no lock across disk I/O, nothing blocking on the event loop -------------------------------
SLOW_FSYNC = 2.5


def test_a_slow_disk_during_create_stalls_no_stream(server, http, monkeypatch):
    """A create whose fsync takes 2.5 s; meanwhile /metrics and a session request arrive. Neither /health
    nor a running stream may notice."""
    assert http.post("/v1/sessions", json={"id": "bystander"}).status_code == 200
    slow = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        if slow.is_set():  # once: a save may fsync its file and then its folder
            slow.clear()
            time.sleep(SLOW_FSYNC)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    stream = Stream(server.url, "/v1/chat/completions",
                    {"messages": [user("go on forever")], "max_tokens": 5000, "stream": True})
    try:
        stream.wait_for(5)
        slow.set()
        t0 = time.monotonic()
        create = in_thread(lambda: httpx.post(server.url + "/v1/sessions", json={"id": "slow-disk"}, timeout=60))
        time.sleep(0.3)  # the create is inside fsync now
        metrics = in_thread(lambda: httpx.get(server.url + "/metrics", timeout=60))
        turn = in_thread(lambda: httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [user("hi")], "session": "bystander", "max_tokens": 2}))
        time.sleep(0.2)
        t_health = time.monotonic()
        health = httpx.get(server.url + "/health", timeout=60)
        health_s = time.monotonic() - t_health
        created = create.result()
        t1 = time.monotonic()
        slow.clear()
        gap = stream.max_gap(t0, t1)
        assert metrics.result().status_code == 200
    finally:
        slow.clear()
        stream.close()
    assert created.status_code == 200 and t1 - t0 >= SLOW_FSYNC
    assert health.status_code == 200 and health_s < 1.0, f"/health took {health_s:.2f} s"
    assert gap < 1.0, f"the stream stalled for {gap:.2f} s"
    assert turn.result().status_code == 200  # ran once the stream was cancelled


def test_reads_never_touch_a_session_while_it_decodes(server, http, monkeypatch):
    """/metrics, listing and inspection during a turn read what the worker published, not the live
    Session it is changing (which raised a rare 'dictionary changed size during iteration')."""
    from sinkstream.session import Session
    sid = "decoding"
    assert http.post("/v1/sessions", json={"id": sid}).status_code == 200
    store, foreign = server.store, []
    real_stats = Session.stats

    def spy(self):
        if sid in store.busy and self.extra.get("id") == sid and \
                threading.current_thread() is not server.state.engine.worker.thread:
            foreign.append(threading.current_thread().name)
        return real_stats(self)

    monkeypatch.setattr(Session, "stats", spy)
    stream = Stream(server.url, "/v1/chat/completions",
                    {"messages": [user("keep talking")], "max_tokens": 5000, "stream": True, "session": sid})
    try:
        stream.wait_for(3)
        for _ in range(10):
            for path in ("/metrics", "/v1/sessions", f"/v1/sessions/{sid}"):
                r = http.get(path)
                assert r.status_code == 200, (path, r.text)
            assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 0  # the last completed turn
    finally:
        stream.close()
    wait_idle(store, sid)
    assert foreign == []


# --- a full or read-only disk during a save -------------------------------------------------------------
def failing_fsync(err: int):
    def fsync(fd):
        raise OSError(err, os.strerror(err))
    return fsync


def is_error(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_a_save_that_fails_ends_the_turn_and_keeps_the_last_saved_one(server, http, monkeypatch, err):
    sid = f"disk-{errno.errorcode[err]}"
    assert http.post("/v1/sessions", json={"id": sid}).status_code == 200
    history = [user("first")]
    r = http.post("/v1/chat/completions", json={"messages": history, "session": sid, "max_tokens": 4})
    history.append(r.json()["choices"][0]["message"])
    monkeypatch.setattr(os, "fsync", failing_fsync(err))
    turn = {"messages": history + [user("second")], "session": sid, "max_tokens": 4}
    e = is_error(http.post("/v1/chat/completions", json=turn), 507, "session_save_failed")
    assert os.strerror(err) in e["message"] and e["type"] == "server_error"
    stream = Stream(server.url, "/v1/chat/completions", {**turn, "stream": True})
    stream.thread.join(30)
    assert stream.status == 200 and stream.events[-1] == "[DONE]"  # the stream had begun: the error is an event
    assert json.loads(stream.events[-2])["error"]["code"] == "session_save_failed"
    is_error(http.post("/v1/sessions", json={"id": sid + "-new"}), 507, "session_save_failed")
    # the server goes on: stateless requests, inspection; the session is at its last saved turn
    assert http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2}).status_code == 200
    assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 1
    assert http.get(f"/v1/sessions/{sid}-new").status_code == 404
    monkeypatch.undo()
    r = http.post("/v1/chat/completions", json=turn)
    assert r.status_code == 200 and r.json()["session"]["turns"] == 2
    assert not list(server.store.folder.glob(".*.tmp"))


# --- a damaged session file -----------------------------------------------------------------------------
def test_a_damaged_session_file_is_a_4xx_for_that_session_only(tiny_chat, tmp_path):
    from inprocess import AppServer
    from sinkstream.server.app import Settings
    store = store_for(tmp_path, tiny_chat, SINK)
    for sid in ("fine", "truncated", "flipped"):
        s = store.create(sid)
        list(s.chat("hello", max_tokens=3))
        s.extra["kind"] = "chat"
        store.commit(sid, s)
    whole = (tmp_path / "truncated.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    raw = bytearray((tmp_path / "flipped.safetensors").read_bytes())
    raw[-5] ^= 0xFF  # tensor bytes: the header still reads, the checksum fails
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    srv = AppServer(Settings(model_id="tiny", cache=SINK, state_dir=str(tmp_path)), tiny_chat)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            listed = {s["id"]: s for s in http.get("/v1/sessions").json()["data"]}
            assert set(listed) == {"fine", "truncated", "flipped"}
            assert listed["truncated"].get("damaged") and not listed["fine"].get("damaged")
            is_error(http.get("/v1/sessions/truncated"), 422, "session_damaged")
            for sid in ("truncated", "flipped", "flipped"):  # twice: a failed load does not leave it busy
                e = is_error(http.post("/v1/chat/completions", json={"messages": [user("more")], "session": sid,
                                                                     "append": True}), 422, "session_damaged")
                assert sid in e["message"] and e["type"] == "invalid_request_error"
                assert str(tmp_path) not in e["message"]
            r = http.post("/v1/chat/completions", json={"messages": [user("more")], "session": "fine",
                                                        "append": True, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["session"]["turns"] == 2
            assert http.delete("/v1/sessions/truncated").status_code == 200  # a damaged session can go
            assert http.post("/v1/sessions", json={"id": "truncated"}).status_code == 200
    finally:
        srv.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount; skipped elsewhere): a disk that really fills up."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_really_full_then_read_only_disk(tiny_chat, small_disk):
    """The same on a real filesystem: safetensors reports a full disk its own way, not as OSError."""
    from inprocess import AppServer
    from sinkstream.server.app import Settings
    state = small_disk / "state"
    srv = AppServer(Settings(model_id="tiny", cache=SINK, state_dir=str(state)), tiny_chat)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.post("/v1/sessions", json={"id": "a"}).status_code == 200
            turn = {"messages": [user("hello")], "session": "a", "append": True, "max_tokens": 3}
            assert http.post("/v1/chat/completions", json=turn).status_code == 200
            filler = small_disk / "filler"
            with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
                try:
                    while f.write(b"\0" * 4096):
                        pass
                except OSError:
                    pass
            e = is_error(http.post("/v1/chat/completions", json=turn), 507, "session_save_failed")
            assert "No space left on device" in e["message"]
            is_error(http.post("/v1/sessions", json={"id": "b"}), 507, "session_save_failed")
            assert http.get("/v1/sessions/a").json()["turns"] == 1
            filler.unlink()
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
            e = is_error(http.post("/v1/chat/completions", json=turn), 507, "session_save_failed")
            assert "Read-only file system" in e["message"]
            assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
            r = http.post("/v1/chat/completions", json=turn)
            assert r.status_code == 200 and r.json()["session"]["turns"] == 2
            assert sorted(p.name for p in state.iterdir()) == ["a.safetensors"]
    finally:
        srv.stop()


def test_a_full_disk_during_a_memory_cache_save(tiny_chat, small_disk):
    """The memory cache's block log is appended to by the save that fails: the reloaded session and a fresh
    store both see only the committed turns."""
    from sinkstream.server.errors import ApiError
    memory = CacheConfig("memory", sinks=4, window=32, block_size=8, top_k=2)
    store = store_for(small_disk / "state", tiny_chat, memory)
    s = store.create("m")
    for _ in range(3):
        list(s.chat("tell me a long story " * 5, max_tokens=20))
        store.commit("m", s)
    seen = s.cache.seen
    with open(small_disk / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    list(s.chat("more " * 30, max_tokens=20))
    with pytest.raises(ApiError) as e:
        store.commit("m", s)
    assert e.value.status == 507
    store.rollback("m")
    (small_disk / "filler").unlink()
    s = store.get("m")
    assert (s.turns, s.cache.seen) == (3, seen)
    list(s.chat("again", max_tokens=10))
    store.commit("m", s)
    fresh = store_for(small_disk / "state", tiny_chat, memory).get("m")
    assert (fresh.turns, fresh.cache.seen) == (4, s.cache.seen)
