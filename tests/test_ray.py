"""Several replicas sharing one state folder, and sinkstream on Ray Serve (sinkstream.deploy).

Without Ray: the core and the single-machine server never import ray; two session stores sharing a folder
(two replicas) never both save one session (the lease's epoch, also raced from two processes); files from
before leases still load; the gateway's routing key for each kind of request.

With Ray (skipped, saying so, where ray cannot be imported): `sinkstream serve --ray --replicas 2` on a Ray
cluster it starts on this machine (loopback only), 6 sessions of the tiny model: each session's turns stay
on its replica (named by a response header); a full replica's queue is 503 and a busy session 429; SIGKILL
one replica's process while it streams: that stream ends with a clear error, every session continues with
all its completed turns (greedy replies equal to a fresh session's), turns stay on one replica once a
replacement replica has joined; SIGINT shuts the cluster down.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from inprocess import shared_tiny_chat  # noqa: E402
from sinkstream.server.process import ServeProcess  # noqa: E402
from sinkstream import CacheConfig, SamplingConfig  # noqa: E402

SINK = CacheConfig("sink", sinks=4, window=60)
GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return shared_tiny_chat(tmp_path_factory)


def store_for(folder, loaded, holder):
    from sinkstream.server.sessions import SessionStore
    model, tok = loaded
    return SessionStore(folder, model, tok, model_id="tiny", cache_config=SINK, sampling=GREEDY, holder=holder)


# --- no Ray ----------------------------------------------------------------------------------------------------
NO_RAY = """
import sys
import sinkstream, sinkstream.server.app, sinkstream.server.sessions, sinkstream.server.ray_route
from sinkstream.cli import build_parser
from sinkstream.server.app import Settings, create_app
build_parser().parse_args(["serve", "--ray", "--replicas", "3", "--affinity", "multiplex"])
create_app(Settings())
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
assert not loaded, loaded
print("ok")
"""


def test_core_and_single_machine_server_do_not_import_ray():
    proc = subprocess.run([sys.executable, "-c", NO_RAY], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_routing_key_of_each_request():
    from sinkstream.server.ray_route import session_of
    hdr = [(b"content-type", b"application/json")]
    chat = json.dumps({"messages": [], "session": "abc"}).encode()
    assert session_of("POST", "/v1/chat/completions", hdr, chat) == ("abc", chat)
    assert session_of("POST", "/v1/completions", hdr + [(b"X-Session-Id", b"h1")], chat)[0] == "h1"
    assert session_of("POST", "/v1/completions", hdr, b'{"prompt": "x"}')[0] is None  # stateless: any replica
    assert session_of("GET", "/v1/sessions/s-1", [], b"")[0] == "s-1"
    assert session_of("GET", "/v1/sessions/s-1/cache", [], b"")[0] == "s-1"
    assert session_of("DELETE", "/v1/sessions/s-1", [], b"")[0] == "s-1"
    assert session_of("GET", "/v1/sessions", [], b"")[0] is None
    assert session_of("POST", "/v1/sessions", hdr, b'{"id": "mine"}')[0] == "mine"
    sid, body = session_of("POST", "/v1/sessions", hdr, b'{"system": "be brief"}')  # the gateway names it
    assert sid.startswith("sess_") and json.loads(body) == {"system": "be brief", "id": sid}
    sid, body = session_of("POST", "/v1/sessions", [], b"")
    assert json.loads(body) == {"id": sid}
    assert session_of("POST", "/v1/chat/completions", hdr, b"{not json") == (None, b"{not json")
    assert session_of("GET", "/v1/sessions/../etc", [], b"")[0] is None


# --- leases: two replicas, one session -------------------------------------------------------------------------
def test_two_replicas_never_both_save_a_session(tiny_chat, tmp_path):
    from sinkstream.server.errors import ApiError
    from sinkstream.server.sessions import lease_epoch
    a, b = store_for(tmp_path, tiny_chat, "a"), store_for(tmp_path, tiny_chat, "b")
    a.create("s")
    sa, sb = a.get("s"), b.get("s")
    assert lease_epoch(sa.extra) == lease_epoch(sb.extra) == 1
    list(sa.send("one", max_tokens=3))
    list(sb.send("two", max_tokens=3))
    a.commit("s", sa)
    with pytest.raises(ApiError) as e:
        b.commit("s", sb)  # b's copy is at epoch 1, the file at 2: refused, nothing written
    assert (e.value.status, e.value.code) == (409, "session_conflict")
    assert lease_epoch(sb.extra) == 1 and a.describe("s")["turns"] == 1
    b.rollback("s")
    fresh = b.get("s")
    assert fresh is not sb and fresh.turns == 1 and fresh.last_reply == sa.last_reply
    assert fresh.extra["lease"] == {"epoch": 2, "holder": "a"}
    # b now holds the session live; a continues it twice: b's next turn starts from a's file, not b's copy
    for text in ("three", "four"):
        sa = a.get("s")
        list(sa.send(text, max_tokens=3))
        a.commit("s", sa)
    assert b.describe("s")["in_memory"] is False and b.describe("s")["turns"] == 3
    again = b.get("s")
    assert again is not fresh and again.turns == 3 and lease_epoch(again.extra) == 4
    list(again.send("five", max_tokens=3))
    b.commit("s", again)
    assert b.describe("s")["in_memory"] is True and a.describe("s")["turns"] == 4
    # creating an id another replica made is refused even when this one never saw it
    with pytest.raises(ApiError) as e:
        store_for(tmp_path, tiny_chat, "c").create("s")
    assert e.value.code == "session_exists"
    # deleted by one replica: the other's live copy is gone with it, and so is the lock file
    a.delete("s")
    with pytest.raises(ApiError) as e:
        b.get("s")
    assert e.value.status == 404
    assert not list(tmp_path.glob(".s.safetensors.lock")) and not list(tmp_path.glob("s.safetensors*"))


def test_files_from_before_leases_still_load(tiny_chat, tmp_path):
    from sinkstream import Session
    from sinkstream.server.sessions import fresh_extra, lease_epoch
    model, tok = tiny_chat
    s = Session(model, tok, SINK, GREEDY)
    s.extra = {**fresh_extra("tiny"), "id": "old"}
    list(s.send("written by an older sinkstream", max_tokens=3))
    s.save(tmp_path / "old.safetensors")
    assert "lease" not in s.extra
    for store in (store_for(tmp_path, tiny_chat, "r1"), store_for(tmp_path, tiny_chat, None)):
        got = store.get("old")
        assert got.turns == 1 and lease_epoch(got.extra) == 0
        list(got.send(" more", max_tokens=2))
        store.commit("old", got)
        assert store.describe("old")["turns"] == 2
        (tmp_path / "old.safetensors").unlink()
        s.save(tmp_path / "old.safetensors")  # back to the lease-less file for the next store
    assert lease_epoch(got.extra) == 1


def _race(model_dir, folder, name, rounds, barrier, results):
    """One replica in its own process: every round, load the session when the other does, add a turn, save."""
    import torch
    torch.set_num_threads(1)
    import sinkstream
    from sinkstream.server.errors import ApiError
    store = store_for(folder, sinkstream.load(model_dir, device="cpu", quiet=True), name)
    wins = conflicts = 0
    for i in range(rounds):
        barrier.wait(timeout=120)
        s = store.get("race")
        barrier.wait(timeout=120)  # both hold the same epoch now; both finish a turn and save at once
        list(s.send(f" {name}{i}", max_tokens=2))
        try:
            store.commit("race", s)
            wins += 1
        except ApiError as e:
            if e.code != "session_conflict":
                raise
            store.rollback("race")
            conflicts += 1
    results.put((name, wins, conflicts))


def test_two_replica_processes_race_for_one_session(tiny_chat, tmp_path, tmp_path_factory):
    """Two processes, one session, 12 rounds in which both load the same save and then both save a turn:
    exactly one wins each round, and the file holds every winning turn (none lost, none doubled)."""
    from sinkstream.server.sessions import lease_epoch
    rounds = 12
    store_for(tmp_path, tiny_chat, "maker").create("race")
    model_dir = str(tmp_path_factory.getbasetemp() / "tiny-chat-shared")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(model_dir, str(tmp_path), name, rounds, barrier, results))
             for name in ("r1", "r2")]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert sum(w for _, w, _ in got) == rounds and sum(c for _, _, c in got) == rounds, got
    final = store_for(tmp_path, tiny_chat, "check").get("race")
    assert final.turns == rounds and lease_epoch(final.extra) == 1 + rounds


# --- Ray Serve -------------------------------------------------------------------------------------------------
class RayServer(ServeProcess):
    """`sinkstream serve --ray` in its own process group (the Ray cluster it starts is in it too)."""

    def __init__(self, *args: str, ready_timeout: float = 240):
        self.tmp = tempfile.mkdtemp(prefix="ssray-")  # Ray's socket paths must stay short
        super().__init__(["--ray", "--port", "0", *args], new_session=True,
                         env={"OMP_NUM_THREADS": "1", "RAY_TMPDIR": self.tmp, "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            self.wait_url(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def group(self) -> list[int]:
        """The pids still alive in the server's process group."""
        out = subprocess.run(["ps", "-o", "pid=", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> int | None:
        """SIGINT, as a user would; SIGKILL the whole group if it is not gone within 60 s."""
        self.interrupt(60)
        deadline = time.monotonic() + 20
        while self.group() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.group():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            return None
        return self.proc.returncode


def chat(http, sid, history, text, n=6):
    """One greedy turn sent OpenAI-style (the whole history); returns the replica that answered."""
    history.append({"role": "user", "content": text})
    r = http.post("/v1/chat/completions", json={"messages": history, "session": sid, "max_tokens": n,
                                                "temperature": 0})
    assert r.status_code == 200, r.text
    history.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    return r.headers["x-sinkstream-replica"]


class Stream:
    """A long streaming turn on a thread: its replica (headers), its SSE events; `close()` hangs up."""

    def __init__(self, url, sid, history, max_tokens=100_000):
        self.events: list[str] = []
        self.headers = None
        self.status = None
        self.hang_up = threading.Event()
        body = {"messages": history + [{"role": "user", "content": "Go on for ever."}], "session": sid,
                "max_tokens": max_tokens, "temperature": 0, "stream": True}

        def read():
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                    self.status, self.headers = r.status_code, r.headers
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            self.events.append(line[6:])
                        if self.hang_up.is_set():
                            break
            except httpx.TransportError as e:  # the server went away: the events so far say how
                self.events.append(f"transport error: {e!r}")

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()

    def wait_for(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.events) < n:
            assert time.monotonic() < deadline and self.thread.is_alive(), (self.status, self.events[-3:])
            time.sleep(0.01)

    def close(self):
        self.hang_up.set()
        self.thread.join(timeout=60)


def in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t.start()
    t.result = lambda timeout=120: (t.join(timeout), box.get("r"))[1]
    return t


def test_ray_cluster_sessions_stay_put_and_survive_a_replica_kill(tmp_path, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'sinkstream[ray]'")
    from serverkit import tiny_chat_model
    model_dir = tiny_chat_model(tmp_path_factory.getbasetemp() / "tiny-chat-shared")
    t0, passed, pids = time.monotonic(), False, set()
    # 2 requests answered at once per replica and 1 waiting there; 1 x 2 replicas more wait in Ray's queue
    srv = RayServer("--replicas", "2", "--model", str(model_dir), "--model-name", "tiny", "--state-dir",
                    str(tmp_path / "state"), "--sinks", "4", "--window", "60", "--max-tokens", "100000",
                    "--max-batch", "2", "--max-queue", "1")
    try:
        started = time.monotonic() - t0
        pids, nodes = set(), set()

        def seen(r):  # every replica process that answered, to check that none outlives the cluster
            if "x-sinkstream-pid" in r.headers:
                pids.add(int(r.headers["x-sinkstream-pid"]))
                nodes.add(r.headers["x-sinkstream-node"])

        http = httpx.Client(base_url=srv.url, timeout=120, event_hooks={"response": [seen]})
        assert http.get("/health").status_code == 200
        # six sessions, three on each replica where the ring lets the first ids do it
        owner: dict[str, str] = {}
        for i in range(60):
            if len(owner) == 6:
                break
            r = http.post("/v1/sessions", json={"id": f"s{i}"})
            assert r.status_code == 200, r.text
            rep = r.headers["x-sinkstream-replica"]
            if list(owner.values()).count(rep) >= 3:
                assert http.delete(f"/v1/sessions/s{i}").status_code == 200
            else:
                owner[f"s{i}"] = rep
        assert len(owner) == 6
        replicas = sorted(set(owner.values()))
        hist = {sid: [] for sid in owner}
        for turn in range(2):
            for sid in owner:
                assert chat(http, sid, hist[sid], f"Turn {turn} of {sid}.") == owner[sid]
                got = http.get(f"/v1/sessions/{sid}")
                assert got.headers["x-sinkstream-replica"] == owner[sid] and got.json()["in_memory"] is True

        # back-pressure: a busy session is 429; a full replica fills Ray's queue, then 503
        victim_rep = owner[next(iter(owner))]
        mine = [sid for sid in owner if owner[sid] == victim_rep]
        first = Stream(srv.url, mine[0], hist[mine[0]])
        first.wait_for(3)
        busy = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "session": mine[0], "append": True, "max_tokens": 2})
        assert (busy.status_code, busy.json()["error"]["code"]) == (429, "session_busy"), busy.text
        others = [Stream(srv.url, mine[1], hist[mine[1]])]
        others[0].wait_for(3)  # the replica's second request thread
        others.append(Stream(srv.url, mine[2], hist[mine[2]]))
        time.sleep(2.0)  # the third waits in the replica's own queue: three requests, its max_ongoing_requests
        # three more requests for this replica's sessions: Ray's queue (max_queued_requests = 1 x 2 replicas)
        # holds two, whichever come first, and the third is refused at once: 503 with Retry-After
        extra = [in_thread(lambda sid=sid: http.post("/v1/completions", json={
            "prompt": "x", "max_tokens": 2, "session": sid}, timeout=60)) for sid in mine]
        deadline = time.monotonic() + 30
        while all(t.is_alive() for t in extra):
            assert time.monotonic() < deadline, "no request was refused"
            time.sleep(0.05)
        time.sleep(1.0)
        refused = [t for t in extra if not t.is_alive()]
        assert len(refused) == 1, [t.result().text for t in refused]
        full = refused[0].result()
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full", full.text
        assert full.headers.get("retry-after") == "1"
        for s in [first, *others]:
            s.close()
        for w in extra:  # the queued two are answered once the streams let go: a chat session refuses a
            if w is not refused[0]:  # text turn (400), or its cancelled turn is still letting go (429)
                assert w.result().status_code in (400, 429), w.result().text
        for sid in mine:  # the hung-up turns were not kept
            deadline = time.monotonic() + 30
            while http.get(f"/v1/sessions/{sid}").json()["turns"] != 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)

        # SIGKILL the replica answering a stream, mid-stream (once the session's hung-up turn has let go:
        # until then a new turn is 429 session_busy)
        cut_sid = mine[0]
        deadline = time.monotonic() + 30
        while True:
            cut = Stream(srv.url, cut_sid, hist[cut_sid])
            while cut.status is None and cut.thread.is_alive():
                time.sleep(0.01)
            if cut.status != 429:
                break
            assert time.monotonic() < deadline, "the session stayed busy"
            time.sleep(0.2)
        cut.wait_for(5)
        assert cut.headers["x-sinkstream-replica"] == victim_rep
        pid = int(cut.headers["x-sinkstream-pid"])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        cut.thread.join(timeout=60)
        last = json.loads(cut.events[-2])
        assert cut.events[-1] == "[DONE]" and last["error"]["code"] == "replica_died", cut.events[-3:]
        assert not any('"finish_reason": "' in e for e in cut.events)  # it never claimed to have finished
        # every session continues with all its completed turns (the whole history is accepted)
        failover = None
        for sid in [cut_sid] + [s for s in owner if s != cut_sid]:
            rep = chat(http, sid, hist[sid], f"After the kill, {sid}.")
            failover = failover or time.monotonic() - killed
            assert rep != victim_rep
            info = http.get(f"/v1/sessions/{sid}").json()
            assert (info["turns"], info["messages_seen"]) == (3, 6), info
            assert info["recent_messages"] == hist[sid]
        # the cut session answers as an uninterrupted one does (greedy)
        assert http.post("/v1/sessions", json={"id": "ref"}).status_code == 200
        ref: list = []
        for msg in [m["content"] for m in hist[cut_sid] if m["role"] == "user"]:
            chat(http, "ref", ref, msg)
        assert ref == hist[cut_sid]
        assert http.delete("/v1/sessions/ref").status_code == 200
        # Ray starts a replacement; once it answers, each session's turns stay on one replica again
        deadline = time.monotonic() + 120
        seen = set()
        while not (seen - set(replicas)):
            assert time.monotonic() < deadline, f"no replacement replica: {seen}"
            seen.add(http.get("/health").headers.get("x-sinkstream-replica"))
            time.sleep(0.2)
        after = {}
        for turn in range(2):
            for sid in owner:
                rep = chat(http, sid, hist[sid], f"Later turn {turn} of {sid}.")
                assert after.setdefault(sid, rep) == rep
        for sid in owner:
            assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 5
        assert victim_rep not in after.values()
        assert nodes == {"127.0.0.1"}  # a cluster of this machine alone, on loopback
        print(f"\nray: cluster up in {started:.1f} s, kill -> next answered turn {failover:.2f} s; "
              f"sessions on another replica than before: {sum(after[s] != owner[s] for s in owner)}/6")
        passed = True
    finally:
        code = srv.stop()
        if passed:  # else Ray's logs stay for a look
            shutil.rmtree(srv.tmp, ignore_errors=True)
    assert code == 0, "".join(srv.log[-40:])
    assert not srv.group()
    alive = []
    for pid in pids:  # replicas run in process groups of their own: Ray's shutdown must have ended them
        try:
            os.kill(pid, 0)
            alive.append(pid)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not alive, f"replica processes outlived the cluster: {alive}"
