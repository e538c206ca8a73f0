"""sinkstream on Ray Serve (issue 15): throughput with 1 and 2 replicas, session affinity, failover, and what a
K-machine deployment asks of the shared state folder.

Starts `python -m sinkstream serve --ray --replicas R --cpus-per-replica C --state-dir TMP ...` (a Ray cluster
on this machine) for each configuration below, waits for /health, runs streaming chat clients (asyncio +
httpx, one session each, named by "session" in the body as an OpenAI client's extra_body does), prints
plain-text tables and stops the cluster (SIGINT; also on Ctrl-C or an error).

  scale     --sessions sessions at once, each --turns streaming turns of --tokens tokens (a story prompt,
            sampled, so replies rarely end early; rates use usage.completion_tokens), after one untimed
            1-token warm-up turn per session. Aggregate tokens/s = completion tokens / wall time of the
            timed turns; TTFT median; the turns per replica. Once per --replicas-list entry (default 1,2),
            each replica reserving --cpus-per-replica CPUs and running that many torch threads, so on this
            2-core machine 2 replicas have 2x the cores of 1 but share memory bandwidth, the proxy, the
            gateway and the clients: expect below 2x. --baseline adds the single-machine server (no Ray)
            with the same torch threads as one replica: the cost of Ray's proxy and our gateway.
  affinity  --affinity-sessions sessions, --affinity-turns turns each (--affinity-tokens tokens), all sessions
            at once, with 2 replicas run with small limits (--affinity-max-batch, --affinity-max-queue) so
            that a replica is often full: the share of turns answered by the replica that answered the
            session's previous turn, and sessions seen on more than one replica, for consistent hashing
            (--affinity hash) and for Ray's model multiplexing (--affinity multiplex), each its own cluster.
  state     in the scale run with the most replicas: each session's file in the state folder and its cached
            tokens (GET /v1/sessions/{id}) after the warm-up and after the timed turns; from the two, the
            file's bytes per cached token and fixed part, and the file of the session with its cache full.
  failover  on the hash affinity cluster (2 replicas), after its affinity run, --failover-sessions sessions
            with one completed turn each. A long stream on one
            session; after 5 chunks its replica's process is SIGKILLed. Reported: kill -> the stream's error
            event; kill -> first token and end of that session's next turn (on another replica, restored
            from its last completed turn); kill -> every session of the dead replica answered once;
            kill -> Ray's replacement replica answering.

The scaling estimate at the end multiplies the measured per-replica turn rate and per-turn write (each
completed turn rewrites the session's file: write, fsync, rename, fsync of the folder; plus a lock file
flock and three header reads) by K machines x replicas per machine (--machines, --replicas-per-machine).

    python benchmarks/ray_scale.py                                          # SmolLM2, the full measurement
    python benchmarks/ray_scale.py --json /tmp/ray_scale.json --baseline
    python benchmarks/ray_scale.py --model /tmp/tiny-chat --quant none --tokens 8 --sessions 2 \\
        --affinity-sessions 4 --affinity-turns 3 --failover-sessions 2           # a smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from sinkstream.server.process import ServeProcess

TOPICS = ["a lighthouse keeper who finds a message in a bottle", "a city built on the back of a giant turtle",
          "the first winter of a colony on Mars", "a clockmaker who can repair time itself",
          "two rival bakers in a small mountain village", "a ship's cat on a voyage around the world",
          "a library that rearranges itself every night", "a detective who solves crimes by smell"]

RUNNING: list["Cluster"] = []  # stopped by main() whatever happens


class Cluster(ServeProcess):
    """`sinkstream serve --ray` (or the plain server) in its own process group; `.url` once /health is 200."""

    def __init__(self, flags: list[str], *, ray: bool, threads: int, ready_timeout: float):
        self.state = tempfile.TemporaryDirectory(prefix="sinkstream-ray-state-")
        self.raytmp = tempfile.TemporaryDirectory(prefix="ssray-")  # Ray's socket paths must stay short
        super().__init__((["--ray"] if ray else []) + ["--port", "0", "--state-dir", self.state.name, *flags],
                         env={"RAY_TMPDIR": self.raytmp.name, "RAY_USAGE_STATS_ENABLED": "0",
                              "OMP_NUM_THREADS": str(threads)}, new_session=True)
        RUNNING.append(self)
        self.pids: set[int] = set()  # replica processes seen in answers
        t0 = time.perf_counter()
        try:
            self.wait_healthy(ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> None:
        super().stop(60, group=True)
        for pid in self.pids:  # replicas run in their own process groups; SIGINT normally ends them
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.state.cleanup()
        self.raytmp.cleanup()
        if self in RUNNING:
            RUNNING.remove(self)


class Turn:
    """One streaming chat turn as the client saw it."""

    def __init__(self, sid: str):
        self.sid, self.status, self.replica, self.pid = sid, None, None, None
        self.sent = time.perf_counter()
        self.first = self.end = None
        self.text, self.tokens, self.error = "", 0, None

    @property
    def ttft(self):
        return None if self.first is None else self.first - self.sent


async def chat(http: httpx.AsyncClient, sid: str, history: list, text: str, max_tokens: int, *,
               sampling: dict, on_chunk=None, cluster: Cluster | None = None) -> Turn:
    """One streaming turn with the whole history; on success appends the user message and the reply."""
    t = Turn(sid)
    body = {"messages": history + [{"role": "user", "content": text}], "session": sid, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **sampling}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            t.status, t.replica = r.status_code, r.headers.get("x-sinkstream-replica")
            if r.headers.get("x-sinkstream-pid"):
                t.pid = int(r.headers["x-sinkstream-pid"])
                if cluster is not None:
                    cluster.pids.add(t.pid)
            if r.status_code != 200:
                raw = (await r.aread()).decode()
                try:
                    t.error = json.loads(raw)["error"]["code"] or raw[:200]
                except (ValueError, KeyError, TypeError):
                    t.error = f"{r.status_code}: {raw[:200]}"
                t.end = time.perf_counter()
                return t
            n = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    t.error = obj["error"].get("code") or obj["error"].get("message")
                    t.end = time.perf_counter()
                    break
                if obj.get("usage"):
                    t.tokens = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices", []):
                    piece = ch.get("delta", {}).get("content")
                    if piece:
                        if t.first is None:
                            t.first = time.perf_counter()
                        t.text += piece
                        n += 1
                        if on_chunk is not None:
                            on_chunk(n, t)
    except httpx.TransportError as e:
        t.error = f"transport: {e!r}"
    t.end = t.end or time.perf_counter()
    if t.error is None:
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": t.text}]
    return t


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=30),
                             limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))


def model_flags(a, *, max_batch: int | None = None, max_queue: int | None = None) -> list[str]:
    flags = ["--model-name", "bench", "--max-tokens", str(max(a.tokens, a.long_tokens) + 16),
             "--max-batch", str(max_batch or a.max_batch), "--max-queue", str(max_queue or a.max_queue)]
    if a.model:
        flags += ["--model", a.model]
    if a.quant:
        flags += ["--quant", a.quant]
    return flags + a.server_flag


def ray_flags(a, replicas: int, affinity: str = "hash") -> list[str]:
    return ["--replicas", str(replicas), "--cpus-per-replica", str(a.cpus_per_replica), "--affinity", affinity]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


async def make_sessions(http, n: int, prefix: str) -> dict[str, list]:
    hist = {}
    for i in range(n):
        sid = f"{prefix}{i}"
        r = await http.post("/v1/sessions", json={"id": sid})
        r.raise_for_status()
        hist[sid] = []
    return hist


# --- sections ---------------------------------------------------------------------------------------------------
async def scale_run(a, cluster: Cluster, label: str, replicas: int) -> dict:
    """`replicas`: 0 for the plain server."""
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 1}
    async with client(cluster.url) as http:
        hist = await make_sessions(http, a.sessions, "scale")
        warm = await asyncio.gather(*(chat(http, sid, hist[sid], "Hello.", 1, sampling=sampling, cluster=cluster)
                                      for sid in hist))
        bad = [t.error for t in warm if t.error]
        assert not bad, bad
        points = {sid: [await file_point(http, cluster, sid)] for sid in hist}
        t0 = time.perf_counter()

        async def user(i, sid):
            out = []
            for k in range(a.turns):
                text = (f"Write a long story about {TOPICS[(i + k) % len(TOPICS)]}." if k == 0 else
                        "Go on with the story, in much more detail.")
                out.append(await chat(http, sid, hist[sid], text, a.tokens, sampling=sampling, cluster=cluster))
            return out

        turns = [t for ts in await asyncio.gather(*(user(i, sid) for i, sid in enumerate(hist))) for t in ts]
        wall = time.perf_counter() - t0
        errors = [t.error for t in turns if t.error]
        tokens = sum(t.tokens for t in turns if not t.error)
        per_replica = Counter(t.replica for t in turns)
        stay = sum(len({t.replica for t in turns if t.sid == sid}) == 1 for sid in hist)
        for sid in hist:
            points[sid].append(await file_point(http, cluster, sid))
    return {"label": label, "replicas": replicas, "ready_s": cluster.ready_s, "sessions": a.sessions,
            "turns": len(turns),
            "errors": errors, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "turns_s": (len(turns) - len(errors)) / wall, "ttft_median_s": median(t.ttft for t in turns),
            "per_replica": dict(per_replica), "sessions_on_one_replica": stay, "points": points}


async def file_point(http, cluster: Cluster, sid: str) -> dict:
    """A session's cache (GET /v1/sessions/{id}) and the size of its file in the state folder."""
    info = (await http.get(f"/v1/sessions/{sid}")).json()
    size = (Path(cluster.state.name) / f"{sid}.safetensors").stat().st_size
    return {"tokens_cached": info["tokens_cached"], "capacity": info["cache_capacity"], "cache": info["cache"],
            "cache_bytes": info["cache_bytes"], "file_bytes": size}


def state_report(points: dict[str, list[dict]]) -> dict:
    """Per session: the file's bytes per cached token (between the two points) and its fixed part, and the
    file of the same session with its cache full."""
    rows = []
    for sid, (p0, p1) in points.items():
        grew = p1["tokens_cached"] - p0["tokens_cached"]
        per_token = (p1["file_bytes"] - p0["file_bytes"]) / grew if grew > 0 else float("nan")
        fixed = p1["file_bytes"] - per_token * p1["tokens_cached"]
        rows.append({"id": sid, **p1, "bytes_per_cached_token": per_token, "fixed_bytes": fixed,
                     "full_file_bytes": fixed + per_token * p1["capacity"] if p1["capacity"] else float("nan")})
    return {"sessions": rows, "file_bytes_median": median(r["file_bytes"] for r in rows),
            "full_file_bytes": median(r["full_file_bytes"] for r in rows),
            "cache": rows[0]["cache"] if rows else None}


async def affinity_run(a, cluster: Cluster, mode: str) -> dict:
    sampling = {"temperature": 0}
    async with client(cluster.url) as http:
        hist = await make_sessions(http, a.affinity_sessions, "aff")

        async def user(sid):
            return [await chat(http, sid, hist[sid], f"Turn {k}: say something.", a.affinity_tokens,
                               sampling=sampling, cluster=cluster) for k in range(a.affinity_turns)]

        per_session = await asyncio.gather(*(user(sid) for sid in hist))
    same = total = 0
    multi = 0
    for turns in per_session:
        reps = [t.replica for t in turns if not t.error]
        same += sum(x == y for x, y in zip(reps, reps[1:]))
        total += max(0, len(reps) - 1)
        multi += len(set(reps)) > 1
    errors = [t.error for ts in per_session for t in ts if t.error]
    return {"mode": mode, "sessions": len(per_session), "turns": sum(len(ts) for ts in per_session),
            "errors": errors, "stay_share": same / total if total else float("nan"),
            "sessions_on_several_replicas": multi}


async def failover_run(a, cluster: Cluster) -> dict:
    sampling = {"temperature": 0}
    async with client(cluster.url) as http:
        hist = await make_sessions(http, a.failover_sessions, "fo")
        first = {sid: await chat(http, sid, hist[sid], "Hello there.", 4, sampling=sampling, cluster=cluster)
                 for sid in hist}
        victim_sid = next(iter(hist))
        victim = first[victim_sid].replica
        theirs = [sid for sid in hist if first[sid].replica == victim]
        killed = {}

        def kill(n, t):
            if n == 5 and not killed:
                os.kill(t.pid, signal.SIGKILL)
                killed["t"] = time.perf_counter()

        cut = await chat(http, victim_sid, list(hist[victim_sid]), "Tell me everything, at length.", a.long_tokens,
                         sampling=sampling, on_chunk=kill, cluster=cluster)
        assert killed, f"the stream ended before 5 chunks: {cut.error or cut.text[:100]}"
        t_kill = killed["t"]
        nxt = await chat(http, victim_sid, hist[victim_sid], "Are you still there?", 4, sampling=sampling,
                         cluster=cluster)
        rest = {}
        for sid in theirs[1:]:
            rest[sid] = await chat(http, sid, hist[sid], "And you?", 4, sampling=sampling, cluster=cluster)
        all_done = max([nxt.end] + [t.end for t in rest.values()]) - t_kill
        replicas = {t.replica for t in first.values()}
        replacement = None
        deadline = time.perf_counter() + a.replacement_timeout
        while time.perf_counter() < deadline:
            r = await http.get("/health")
            rep = r.headers.get("x-sinkstream-replica")
            if rep and rep not in replicas:
                replacement = time.perf_counter() - t_kill
                break
            await asyncio.sleep(0.2)
    return {"sessions": len(hist), "victim_sessions": len(theirs), "cut_error": cut.error,
            "kill_to_stream_error_s": cut.end - t_kill, "next_turn_status": nxt.status, "next_turn_error": nxt.error,
            "next_turn_replica_is_other": nxt.replica not in (None, victim),
            "kill_to_next_first_token_s": (nxt.first - t_kill) if nxt.first else None,
            "kill_to_next_turn_done_s": nxt.end - t_kill, "kill_to_all_victim_sessions_answered_s": all_done,
            "errors_after": [t.error for t in rest.values() if t.error], "kill_to_replacement_s": replacement}


# --- report -------------------------------------------------------------------------------------------------------
def estimate(scale: list[dict], state: dict, a) -> list[dict]:
    """Writes the shared folder must take for K machines, from the most-replica scale run's rates."""
    top = max((r for r in scale if r["replicas"]), key=lambda r: r["replicas"])
    reps = top["replicas"]
    turns_per_replica = top["turns_s"] / reps
    full = state.get("full_file_bytes") or float("nan")
    now = state.get("file_bytes_median") or float("nan")
    rows = []
    for k in a.machines:
        r = k * a.replicas_per_machine
        turns = r * turns_per_replica
        rows.append({"machines": k, "replicas": r, "turns_s": turns, "tok_s": turns * top["tok_s"] / top["turns_s"],
                     "write_MB_s_now": turns * now / 1e6, "write_MB_s_full": turns * full / 1e6,
                     "fsync_s": 2 * turns, "renames_s": turns, "locks_s": turns, "header_reads_s": 3 * turns,
                     "store_GB_for_sessions": a.sessions_per_machine * k * full / 1e9})
    return rows


def print_report(res: dict, a) -> None:
    print("\n== scale (aggregate tokens/s, all sessions at once)")
    print(f"{'run':<22}{'ready s':>9}{'turns':>7}{'tokens':>8}{'wall s':>8}{'tok/s':>9}{'TTFT med':>10}"
          f"{'1 replica/session':>19}  turns per replica")
    for r in res.get("scale", []):
        errors = f"  errors {dict(Counter(r['errors']))}" if r["errors"] else ""
        print(f"{r['label']:<22}{r['ready_s']:>9.1f}{r['turns']:>7}{r['tokens']:>8}{r['wall_s']:>8.1f}"
              f"{r['tok_s']:>9.1f}{r['ttft_median_s']:>10.3f}{r['sessions_on_one_replica']:>13}/{r['sessions']:<5}  "
              f"{sorted(r['per_replica'].values())}{errors}")
    ray_runs = {r["replicas"]: r for r in res.get("scale", []) if r["replicas"]}
    if 1 in ray_runs:
        for n in sorted(ray_runs)[1:]:
            ratio = ray_runs[n]["tok_s"] / ray_runs[1]["tok_s"]
            print(f"{n} replicas / 1 replica: {ratio:.2f}x aggregate tokens/s")
    if res.get("affinity"):
        print("\n== affinity (2 replicas, sessions at once)")
        for r in res["affinity"]:
            print(f"{r['mode']:<10} turns {r['turns']:>4}  on the previous turn's replica {r['stay_share']:.1%}  "
                  f"sessions seen on 2 replicas {r['sessions_on_several_replicas']}/{r['sessions']}"
                  + (f"  errors {dict(Counter(r['errors']))}" if r["errors"] else ""))
    if res.get("state"):
        s = res["state"]
        print(f"\n== state (cache {s['cache']})")
        for r in s["sessions"][:4]:
            print(f"{r['id']}: file {r['file_bytes'] / 1e6:.3f} MB for {r['tokens_cached']}/{r['capacity']} cached "
                  f"tokens ({r['bytes_per_cached_token']:.0f} B/token + {r['fixed_bytes'] / 1e3:.1f} kB; cache "
                  f"buffers in memory {r['cache_bytes'] / 1e6:.2f} MB); with the cache full: "
                  f"{r['full_file_bytes'] / 1e6:.2f} MB")
    if res.get("failover"):
        f = res["failover"]
        print("\n== failover (SIGKILL of the replica answering a stream)")
        for k, v in f.items():
            print(f"{k:<40} {v:.3f}" if isinstance(v, float) else f"{k:<40} {v}")
    if res.get("estimate"):
        print("\n== K machines (measured per-replica rates x replicas; shared-folder load per second)")
        print(f"{'K':>3}{'replicas':>9}{'turns/s':>9}{'tok/s':>9}{'MB/s now':>10}{'MB/s full':>11}{'fsync/s':>9}"
              f"{'renames/s':>10}{'header reads/s':>15}{'GB for sessions':>16}")
        for r in res["estimate"]:
            print(f"{r['machines']:>3}{r['replicas']:>9}{r['turns_s']:>9.1f}{r['tok_s']:>9.0f}"
                  f"{r['write_MB_s_now']:>10.1f}{r['write_MB_s_full']:>11.1f}{r['fsync_s']:>9.1f}"
                  f"{r['renames_s']:>10.1f}{r['header_reads_s']:>15.1f}{r['store_GB_for_sessions']:>16.1f}")
        print(f"('now': the files as this run left them; 'full': every session's cache full; GB: "
              f"{a.sessions_per_machine} sessions per machine)")


async def run(a) -> dict:
    res: dict = {"args": {k: v for k, v in vars(a).items()}, "scale": [], "affinity": []}
    sections = set(a.sections)
    if "scale" in sections or "state" in sections:
        if a.baseline:
            c = Cluster(model_flags(a), ray=False, threads=a.cpus_per_replica, ready_timeout=a.ready_timeout)
            try:
                r = await scale_run(a, c, f"plain, {a.cpus_per_replica} thread(s)", 0)
                r.pop("points")
                res["scale"].append(r)
            finally:
                c.stop()
        for reps in a.replicas_list:
            c = Cluster(model_flags(a) + ray_flags(a, reps), ray=True, threads=a.cpus_per_replica,
                        ready_timeout=a.ready_timeout)
            try:
                r = await scale_run(a, c, f"ray {reps} replica{'s' if reps > 1 else ''}", reps)
                points = r.pop("points")
                res["scale"].append(r)
                if reps == max(a.replicas_list) and "state" in sections:
                    res["state"] = state_report(points)
            finally:
                c.stop()
    modes = a.affinity if "affinity" in sections else []
    if "failover" in sections and "hash" not in modes:
        modes = modes + ["hash"]
    for mode in modes:  # small limits, so that a replica is often full (see --affinity-max-batch)
        flags = model_flags(a, max_batch=a.affinity_max_batch, max_queue=a.affinity_max_queue)
        c = Cluster(flags + ray_flags(a, 2, mode), ray=True, threads=a.cpus_per_replica,
                    ready_timeout=a.ready_timeout)
        try:
            if "affinity" in sections:
                res["affinity"].append(await affinity_run(a, c, mode))
            if mode == "hash" and "failover" in sections:
                res["failover"] = await failover_run(a, c)  # last: it kills a replica
        finally:
            c.stop()
    if res.get("state") and any(r["replicas"] for r in res["scale"]):
        res["estimate"] = estimate(res["scale"], res["state"], a)
    return res


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="as `sinkstream serve --model` (default: smollm2)")
    p.add_argument("--quant", default=None, help="as `sinkstream serve --quant`")
    p.add_argument("--server-flag", action="append", default=[], help="one more flag for the server (repeatable)")
    p.add_argument("--sections", type=lambda s: s.split(","), default=["scale", "state", "affinity", "failover"])
    p.add_argument("--replicas-list", type=ints, default=[1, 2])
    p.add_argument("--cpus-per-replica", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--baseline", action="store_true", help="also the plain server, same torch threads as a replica")
    p.add_argument("--affinity", type=lambda s: s.split(","), default=["hash", "multiplex"])
    p.add_argument("--affinity-sessions", type=int, default=16)
    p.add_argument("--affinity-turns", type=int, default=6)
    p.add_argument("--affinity-tokens", type=int, default=32)
    p.add_argument("--affinity-max-batch", type=int, default=2, help="--max-batch of the affinity clusters")
    p.add_argument("--affinity-max-queue", type=int, default=4, help="--max-queue of the affinity clusters")
    p.add_argument("--failover-sessions", type=int, default=6)
    p.add_argument("--long-tokens", type=int, default=2000, help="the stream cut by the kill")
    p.add_argument("--replacement-timeout", type=float, default=120)
    p.add_argument("--machines", type=ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--replicas-per-machine", type=int, default=2)
    p.add_argument("--sessions-per-machine", type=int, default=1000)
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    print(f"load average {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    try:
        res = asyncio.run(run(a))
    finally:
        for c in list(RUNNING):
            c.stop()
    print_report(res, a)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
