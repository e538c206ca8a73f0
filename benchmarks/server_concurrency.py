"""Many users at once against a real `sinkstream serve` (issue 13's targets): throughput, latency, cross-talk.

Starts `python -m sinkstream serve --port 0` in a subprocess for each --quant (default: float32 weights,
then int4), waits for /health, runs the sections below with streaming chat clients (asyncio + httpx, each
client in its own session, created with POST /v1/sessions and named by the X-Session-Id header), prints
plain-text tables and stops the server at the end (also on Ctrl-C or an error).

  agg        N clients at once (--sessions 1,8), each a streaming chat asking for --tokens tokens.
             Aggregate tokens/s = completion tokens (from usage) / wall time from the first request sent
             to the last one finished; time to first token (TTFT) median/worst over the clients;
             inter-token latency (ITL) median. Target: aggregate(8) >= 4x aggregate(1).
  ttft       --bg-sessions long generations (--long-tokens) decode; once all have produced tokens (or
             --settle s passed), a short chat in a new session is sent: its TTFT, --ttft-repeats times,
             median reported. Target <= 2 s.
  itl        --itl-sessions sessions decode: their ITL alone (over --itl-window s), then while one more
             session sends a --prefill-tokens prompt (from sinkstream/data/pride_and_prejudice_excerpt.txt,
             counted with the model's tokenizer; the server's usage.prompt_tokens is reported too).
             Target: ITL during the prefill <= 3x ITL alone (ratio of medians; the worst gap is shown).
  crosstalk  --crosstalk-sessions sessions, server run with --max-live-sessions (rest on disk); each told
             "Remember: my name is <name> and my favourite number is <n>." in turn 1 and asked "What is my
             favourite number?" in turn 2, turns of all sessions interleaved at random (--seed), up to
             --crosstalk-inflight requests at once, greedy, --crosstalk-tokens tokens. Then the same turns
             one at a time against a reference server started with --max-batch 1 (when the server has that
             flag; otherwise the same server, fresh sessions). Every answer must equal its reference byte
             for byte; also counted: answers holding the session's own number, and answers holding another
             session's number (or name) but not its own (cross-talk evidence).

The server has no ignore_eos/min_tokens field, so generation prompts ask for long answers and every rate
uses the tokens actually generated (usage.completion_tokens). --extra-body adds fields to every chat body
(e.g. '{"ignore_eos": true}' once a server takes it). The clients run in this process and share the CPUs
with the server: on a 2-core machine they cost a little; the load average is printed before each section.

    python benchmarks/server_concurrency.py                           # SmolLM2, float32 then int4
    python benchmarks/server_concurrency.py --max-batch 8 --quant int4 --json /tmp/conc.json
    python benchmarks/server_concurrency.py --model /tmp/tiny-chat --quant none --sessions 1,2 --tokens 8 \\
        --crosstalk-sessions 4                                         # a smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from sinkstream.server.process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "sinkstream" / "data" / "pride_and_prejudice_excerpt.txt"

TOPICS = ["a lighthouse keeper who finds a message in a bottle", "a city built on the back of a giant turtle",
          "the first winter of a colony on Mars", "a clockmaker who can repair time itself",
          "two rival bakers in a small mountain village", "a ship's cat on a voyage around the world",
          "a library that rearranges itself every night", "a detective who solves crimes by smell",
          "a forest where the trees keep a diary", "an old train that runs only on leap days"]
FIRST = ["Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Kira",
         "Lucas", "Maya", "Nikolai", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara"]
LAST = ["Abbott", "Berg", "Castillo", "Duval", "Eriksen", "Fischer", "Garcia", "Horvat", "Ivanova", "Jansen",
        "Kowalski", "Larsen", "Moreau", "Novak", "Okafor", "Petrov", "Quist", "Rossi", "Silva", "Tanaka"]


# --- the server ---------------------------------------------------------------------------------------------

def server_help() -> str:
    r = subprocess.run([sys.executable, "-m", "sinkstream", "serve", "--help"], capture_output=True, text=True)
    return r.stdout + r.stderr


def has_flag(flags: list[str], name: str) -> bool:
    return any(f == name or f.startswith(name + "=") for f in flags)


def without_flag(flags: list[str], name: str) -> list[str]:
    """flags minus `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f == name:
            skip = True
        elif not f.startswith(name + "="):
            out.append(f)
    return out


RUNNING: list["Server"] = []  # stopped by main() whatever happens


class Server(ServeProcess):
    """`python -m sinkstream serve --port 0 --state-dir TMP FLAGS` in a subprocess; `.url` once /health is 200."""

    def __init__(self, flags: list[str], *, threads: int | None, ready_timeout: float):
        self.state = tempfile.TemporaryDirectory(prefix="sinkstream-conc-")
        super().__init__(["--port", "0", "--state-dir", self.state.name, *flags],
                         env={"OMP_NUM_THREADS": str(threads)} if threads else None)
        RUNNING.append(self)
        t0 = time.perf_counter()
        try:
            self.wait_healthy(ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> None:
        super().stop(15)
        self.state.cleanup()
        if self in RUNNING:
            RUNNING.remove(self)


# --- clients ------------------------------------------------------------------------------------------------

@dataclass
class Stream:
    """One streaming chat request as the client saw it (perf_counter times)."""
    session: str | None = None
    sent: float | None = None
    first: float | None = None
    end: float | None = None
    times: list[float] = field(default_factory=list)   # arrival of each chunk with non-empty content
    text: str = ""
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish: str | None = None
    status: int | None = None
    error: str | None = None
    cancelled: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.times)

    def gaps(self, lo: float = float("-inf"), hi: float = float("inf")) -> list[float]:
        """Gaps between consecutive content chunks whose interval overlaps [lo, hi]."""
        return [b - a for a, b in zip(self.times, self.times[1:]) if b > lo and a < hi]

    def decoding_at(self, t: float) -> bool:
        return self.first is not None and self.first <= t and (self.end is None or self.end > t)

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("times", "text")}
        d.update(ttft=self.ttft, gaps=len(self.times) - 1 if self.times else 0, text_chars=len(self.text))
        return d


class Client:
    def __init__(self, url: str, extra_body: dict, timeout: float):
        self.http = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout, connect=30),
                                      limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        self.extra = extra_body
        self.made = 0

    async def close(self) -> None:
        await self.http.aclose()

    async def session(self, prefix: str, sid: str | None = None) -> str:
        if sid is None:
            self.made += 1
            sid = f"{prefix}-{self.made}"
        r = await self.http.post("/v1/sessions", json={"id": sid})
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/sessions {sid}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()["id"]

    async def stream(self, messages: list[dict], max_tokens: int, *, session: str | None, rec: Stream | None = None,
                     temperature: float | None = None) -> Stream:
        rec = rec or Stream()
        rec.session = session
        body = {"messages": messages, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **self.extra}
        if temperature is not None:
            body["temperature"] = temperature
        headers = {"X-Session-Id": session} if session else {}
        rec.sent = time.perf_counter()
        try:
            async with self.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                rec.status = r.status_code
                if r.status_code != 200:
                    rec.error = f"HTTP {r.status_code} {(await r.aread()).decode(errors='replace')[:300]}"
                    return rec
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if "error" in obj:
                        rec.error = json.dumps(obj["error"])[:300]
                        continue
                    if obj.get("usage"):
                        rec.completion_tokens = obj["usage"].get("completion_tokens")
                        rec.prompt_tokens = obj["usage"].get("prompt_tokens")
                    for ch in obj.get("choices") or []:
                        text = (ch.get("delta") or {}).get("content")
                        if text:
                            rec.times.append(now)
                            rec.text += text
                            if rec.first is None:
                                rec.first = now
                        if ch.get("finish_reason"):
                            rec.finish = ch["finish_reason"]
        except asyncio.CancelledError:
            rec.cancelled = True
            raise
        except httpx.HTTPError as e:
            rec.error = f"{type(e).__name__}: {e}"
        finally:
            rec.end = time.perf_counter()
        return rec

    async def chat(self, messages: list[dict], max_tokens: int, *,
                   session: str | None) -> tuple[str | None, str | None]:
        """A greedy non-streaming turn: (reply text, error)."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **self.extra}
        try:
            r = await self.http.post("/v1/chat/completions", json=body,
                                     headers={"X-Session-Id": session} if session else {})
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"
        if r.status_code != 200:
            return None, f"HTTP {r.status_code} {r.text[:300]}"
        return r.json()["choices"][0]["message"]["content"], None


def long_prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}. Use many "
                                        "paragraphs, at least 800 words, with dialogue and description. "
                                        "Do not stop early."}]


async def wait_until(cond, timeout: float) -> bool:
    deadline = time.perf_counter() + timeout
    while not cond():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- statistics and tables ----------------------------------------------------------------------------------

def med(xs):
    return statistics.median(xs) if xs else None


def pct(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def num(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]])


def load_note(results: dict, section: str) -> None:
    a, b, c = os.getloadavg()
    results.setdefault("load_average", {})[section] = [a, b, c]
    print(f"\n== {section}   (load average {a:.2f} {b:.2f} {c:.2f} over 1/5/15 min, {os.cpu_count()} CPUs)",
          flush=True)


def errors_of(recs: list[Stream]) -> list[str]:
    return [f"{r.session}: {r.error}" for r in recs if r.error]


def show_errors(errs: list[str]) -> None:
    for e in errs[:10]:
        print(f"   error: {e}")
    if len(errs) > 10:
        print(f"   ... {len(errs) - 10} more errors")


# --- sections -----------------------------------------------------------------------------------------------

async def section_agg(c: Client, args, out: dict) -> None:
    load_note(out, "agg: aggregate tokens/s")
    rows, runs = [], {}
    for n in args.sessions:
        sids = [await c.session(f"agg{n}") for _ in range(n)]
        recs = [Stream() for _ in range(n)]
        await asyncio.gather(*(c.stream(long_prompt(i), args.tokens, session=s, rec=r)
                               for i, (s, r) in enumerate(zip(sids, recs))))
        ok = [r for r in recs if not r.error]
        wall = max(r.end for r in recs) - min(r.sent for r in recs)
        total = sum(r.tokens for r in ok)
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        gaps = [g for r in ok for g in r.gaps()]
        per_session_itl = [med(r.gaps()) for r in ok if len(r.times) > 1]
        runs[n] = dict(sessions=n, wall_s=wall, completion_tokens=total, tok_s=total / wall if wall else None,
                       tokens_min=min((r.tokens for r in ok), default=None),
                       tokens_max=max((r.tokens for r in ok), default=None),
                       ttft_median=med(ttfts), ttft_worst=max(ttfts, default=None), itl_median=med(gaps),
                       itl_p90=pct(gaps, 0.9), itl_worst=max(gaps, default=None),
                       itl_median_per_session=per_session_itl, errors=errors_of(recs),
                       requests=[r.summary() for r in recs])
    base = runs.get(1, {}).get("tok_s")
    for n, r in runs.items():
        r["vs_1"] = r["tok_s"] / base if base and r["tok_s"] else None
        rows.append([n, num(r["tok_s"], "{:.1f}"), num(r["vs_1"], "{:.2f}x"), r["completion_tokens"],
                     f"{r['tokens_min']}-{r['tokens_max']}", f"{r['wall_s']:.2f} s",
                     f"{ms(r['ttft_median'])} / {ms(r['ttft_worst'])}", ms(r["itl_median"]), ms(r["itl_p90"]),
                     len(r["errors"])])
    print(table(["sessions", "agg tok/s", "vs 1", "tokens", "per session", "wall", "TTFT median / worst",
                 "ITL median", "ITL p90", "errors"], rows))
    for r in runs.values():
        show_errors(r["errors"])
    top = max(runs)
    ratio = runs[top]["vs_1"]
    print(f"aggregate({top}) / aggregate(1) = {num(ratio, '{:.2f}')}   (target >= 4)")
    out["agg"] = {"runs": {str(k): v for k, v in runs.items()}, "ratio": ratio, "ratio_sessions": top,
                  "target_met": None if ratio is None or top < 8 else ratio >= 4}


async def section_ttft(c: Client, args, out: dict) -> None:
    load_note(out, f"ttft: short request while {args.bg_sessions} sessions decode")
    rows, reps = [], []
    for rep in range(args.ttft_repeats):
        sids = [await c.session(f"bg{rep}") for _ in range(args.bg_sessions)]
        short_sid = await c.session(f"short{rep}")
        recs = [Stream() for _ in sids]
        tasks = [asyncio.create_task(c.stream(long_prompt(i), args.long_tokens, session=s, rec=r))
                 for i, (s, r) in enumerate(zip(sids, recs))]
        settled = await wait_until(lambda: all(r.first is not None or r.end is not None for r in recs), args.settle)
        t = time.perf_counter()
        decoding_sent = sum(r.decoding_at(t) for r in recs)
        short = await c.stream([{"role": "user", "content": "Say hello in five words."}], args.short_tokens,
                               session=short_sid)
        probe = short.first if short.first is not None else short.end
        decoding_first = sum(r.decoding_at(probe) for r in recs)
        await cancel_all(tasks)
        rep_out = dict(repeat=rep + 1, ttft=short.ttft, all_started=settled, settle_s=t - min(r.sent for r in recs),
                       decoding_at_send=decoding_sent, decoding_at_first_token=decoding_first,
                       short=short.summary(), background=[r.summary() for r in recs],
                       errors=errors_of([short]) + [e for e in errors_of(recs)])
        reps.append(rep_out)
        rows.append([rep + 1, ms(short.ttft), f"{decoding_sent}/{len(recs)}", f"{decoding_first}/{len(recs)}",
                     f"{rep_out['settle_s']:.2f} s" + ("" if settled else " (timed out)"), short.tokens,
                     len(rep_out["errors"])])
    print(table(["repeat", "short TTFT", "decoding at send", "at its 1st token", "background start",
                 "short tokens", "errors"], rows))
    for r in reps:
        show_errors(r["errors"])
    ttfts = [r["ttft"] for r in reps if r["ttft"] is not None]
    m = med(ttfts)
    if any(r["decoding_at_send"] < args.bg_sessions for r in reps):
        print(f"note: fewer than {args.bg_sessions} sessions were decoding when the short request was sent (a server "
              "that runs one request at a time queues the rest; see --settle)")
    print(f"median TTFT of the short request = {ms(m)}   (target <= 2 s)")
    out["ttft"] = {"repeats": reps, "median": m, "target_met": None if m is None else m <= 2}


def prefill_text(model: str | None, target: int) -> tuple[str, int | None, str]:
    """About `target` tokens of the bundled novel excerpt: (text, tokens by the tokenizer, how counted)."""
    text = TEXT.read_text(encoding="utf-8")
    try:
        from sinkstream.loading import tokenizer_for
        tok = tokenizer_for(model)
        ids = tok.encode(text, add_special_tokens=False)
        while len(ids) < target:
            ids = ids + tok.encode("\n\n" + text, add_special_tokens=False)
        out = tok.decode(ids[:target])
        return out, len(tok.encode(out, add_special_tokens=False)), "tokenizer"
    except Exception as e:  # noqa: BLE001 - a benchmark: fall back to an estimate and say so
        chars = target * 4
        while len(text) < chars:
            text += "\n\n" + text
        return text[:chars], None, f"approximated as 4 characters per token ({type(e).__name__}: {e})"


async def section_itl(c: Client, args, out: dict) -> None:
    m = args.itl_sessions
    load_note(out, f"itl: inter-token latency of {m} decoding sessions, alone and during a "
                   f"{args.prefill_tokens}-token prefill")
    text, counted, how = prefill_text(args.model, args.prefill_tokens)
    print(f"long prompt: {len(text)} characters, {counted if counted is not None else '~' + str(args.prefill_tokens)} "
          f"tokens ({how})")

    async def start(tag: str):
        sids = [await c.session(tag) for _ in range(m)]
        recs = [Stream() for _ in sids]
        tasks = [asyncio.create_task(c.stream(long_prompt(i + 3), args.long_tokens, session=s, rec=r))
                 for i, (s, r) in enumerate(zip(sids, recs))]
        settled = await wait_until(lambda: all(len(r.times) >= 2 or r.end is not None for r in recs), args.settle)
        return recs, tasks, settled

    # alone
    recs_a, tasks_a, settled_a = await start("itlA")
    lo = time.perf_counter()
    await asyncio.sleep(args.itl_window)
    hi = time.perf_counter()
    await cancel_all(tasks_a)
    gaps_a = [g for r in recs_a for g in r.gaps(lo, hi)]
    active_a = sum(r.decoding_at(lo) for r in recs_a)
    # during a long prefill
    long_sid = await c.session("prefill")
    recs_b, tasks_b, settled_b = await start("itlB")
    active_b = sum(r.decoding_at(time.perf_counter()) for r in recs_b)
    msg = [{"role": "user", "content": "Here is a passage from a novel:\n\n" + text +
            "\n\nIn one sentence: who is speaking at the end?"}]
    long = await c.stream(msg, args.prefill_max_tokens, session=long_sid)
    lo_b, hi_b = long.sent, (long.first if long.first is not None else long.end)
    active_end = sum(r.decoding_at(hi_b) for r in recs_b)
    await cancel_all(tasks_b)
    gaps_b = [g for r in recs_b for g in r.gaps(lo_b, hi_b)]
    alone, during = med(gaps_a), med(gaps_b)
    ratio = during / alone if alone and during is not None else None
    worst = max(gaps_b, default=None)
    worst_ratio = worst / alone if alone and worst is not None else None
    rows = [["alone", f"{active_a}/{m}", len(gaps_a), ms(alone), ms(pct(gaps_a, 0.9)), ms(max(gaps_a, default=None)),
             f"{hi - lo:.2f} s"],
            ["during prefill", f"{active_b}/{m} -> {active_end}/{m}", len(gaps_b), ms(during), ms(pct(gaps_b, 0.9)),
             ms(worst), f"{hi_b - lo_b:.2f} s"]]
    print(table(["phase", "decoding", "gaps", "ITL median", "ITL p90", "worst gap", "window"], rows))
    show_errors(errors_of(recs_a + recs_b + [long]))
    print(f"long request: prompt_tokens {long.prompt_tokens} (server's count), TTFT {ms(long.ttft)}")
    print(f"ITL during prefill / alone = {num(ratio, '{:.2f}x')} (medians; target <= 3x), "
          f"worst gap {ms(worst)} = {num(worst_ratio, '{:.2f}x')} the median alone")
    if not (settled_a and settled_b) or min(active_a, active_b) < m:
        print(f"note: only {min(active_a, active_b)} of {m} sessions were decoding when measured (a server that runs "
              "one request at a time queues the rest; see --settle)")
    out["itl"] = dict(sessions=m, prompt_chars=len(text), prompt_tokens_tokenizer=counted, counted_by=how,
                      prompt_tokens_server=long.prompt_tokens, long=long.summary(), alone_median=alone,
                      alone_p90=pct(gaps_a, 0.9), alone_worst=max(gaps_a, default=None), alone_gaps=len(gaps_a),
                      alone_window_s=hi - lo, alone_decoding=active_a, during_median=during,
                      during_p90=pct(gaps_b, 0.9), during_worst=worst, during_gaps=len(gaps_b),
                      during_window_s=hi_b - lo_b, during_decoding_at_send=active_b,
                      during_decoding_at_first_token=active_end, ratio=ratio, worst_ratio=worst_ratio,
                      all_started=settled_a and settled_b, errors=errors_of(recs_a + recs_b + [long]),
                      target_met=None if ratio is None else ratio <= 3)


def crosstalk_plan(n: int, seed: int) -> tuple[list[tuple[str, int]], list[int]]:
    rng = random.Random(seed)
    names = [f"{f} {l}" for f, l in rng.sample([(f, l) for f in FIRST for l in LAST], n)]
    numbers = rng.sample(range(1000, 10000), n)
    order = [i for i in range(n) for _ in range(2)]
    rng.shuffle(order)  # the first time a session appears is its turn 1, the second its turn 2
    return list(zip(names, numbers)), order


async def run_crosstalk(c: Client, facts, order, sids, inflight: int, max_tokens: int) -> dict:
    """Both turns of every session in `order`, at most `inflight` requests at once: {session index: [r1, r2]}."""
    answers = {i: [None, None] for i in range(len(facts))}
    errors = {}
    done1 = {i: asyncio.Event() for i in range(len(facts))}
    seen = set()
    sem = asyncio.Semaphore(inflight)

    async def turn(i: int, t: int):
        try:
            name, n = facts[i]
            first = {"role": "user", "content": f"Remember: my name is {name} and my favourite number is {n}."}
            if t == 0:
                msgs = [first]
            else:
                await done1[i].wait()
                if answers[i][0] is None:
                    errors[(i, 1)] = "turn 1 failed"
                    return
                msgs = [first, {"role": "assistant", "content": answers[i][0]},
                        {"role": "user", "content": "What is my favourite number?"}]
            text, err = await c.chat(msgs, max_tokens, session=sids[i])
            answers[i][t] = text
            if err:
                errors[(i, t)] = err
        finally:
            if t == 0:
                done1[i].set()
            sem.release()

    tasks = []
    t0 = time.perf_counter()
    for i in order:
        t = 1 if i in seen else 0
        seen.add(i)
        await sem.acquire()
        tasks.append(asyncio.create_task(turn(i, t)))
    await asyncio.gather(*tasks)
    return dict(answers=answers, errors=errors, wall_s=time.perf_counter() - t0)


def crosstalk_check(facts, answers) -> dict:
    own, leaks = [0, 0], []
    pats = [(re.compile(rf"(?<!\d){n}(?!\d)"), name) for name, n in facts]
    for i, pair in answers.items():
        for t, text in enumerate(pair):
            if text is None:
                continue
            mine = bool(pats[i][0].search(text))
            own[t] += mine
            others = [j for j, (p, name) in enumerate(pats) if j != i and (p.search(text) or name in text)]
            if others and not mine and facts[i][0] not in text:
                leaks.append(dict(session=i, turn=t + 1, others=others, text=text))
    return dict(own_number_turn1=own[0], own_number_turn2=own[1], crosstalk=leaks)


async def section_crosstalk(c: Client, args, out: dict, reference) -> None:
    n = args.crosstalk_sessions
    load_note(out, f"crosstalk: {n} sessions, {args.max_live_sessions} in memory, turns interleaved, "
                   f"{args.crosstalk_inflight} in flight")
    facts, order = crosstalk_plan(n, args.seed)
    sids = [await c.session("ct", f"ct-{i:03d}") for i in range(n)]
    batched = await run_crosstalk(c, facts, order, sids, args.crosstalk_inflight, args.crosstalk_tokens)
    # reference: one request at a time, on a --max-batch 1 server or (without that flag) this one
    ref_client, how = await reference()
    try:
        prefix = "ct" if ref_client is not c else "ref"
        ref_sids = [await ref_client.session(prefix, f"{prefix}-{i:03d}") for i in range(n)]
        ref = await run_crosstalk(ref_client, facts, order, ref_sids, 1, args.crosstalk_tokens)
    finally:
        if ref_client is not c:
            await ref_client.close()
    mismatches = []
    for i in range(n):
        for t in range(2):
            a, b = batched["answers"][i][t], ref["answers"][i][t]
            if a != b:
                mismatches.append(dict(session=i, turn=t + 1, batched=a, reference=b))
    chk_b, chk_r = crosstalk_check(facts, batched["answers"]), crosstalk_check(facts, ref["answers"])
    rows = [["batched", f"{batched['wall_s']:.2f} s", len(batched["errors"]), f"{chk_b['own_number_turn1']}/{n}",
             f"{chk_b['own_number_turn2']}/{n}", len(chk_b["crosstalk"])],
            ["reference", f"{ref['wall_s']:.2f} s", len(ref["errors"]), f"{chk_r['own_number_turn1']}/{n}",
             f"{chk_r['own_number_turn2']}/{n}", len(chk_r["crosstalk"])]]
    print(f"reference: {how}")
    print(table(["run", "wall", "errors", "own number, turn 1", "turn 2", "other's fact, not own"], rows))
    for label, run in (("batched", batched), ("reference", ref)):
        for (i, t), e in list(run["errors"].items())[:10]:
            print(f"   {label} error: session {i} turn {t + 1}: {e}")
    for leak in chk_b["crosstalk"][:10]:
        print(f"   CROSS-TALK? session {leak['session']} turn {leak['turn']} names session(s) {leak['others']}: "
              f"{leak['text']!r}")
    for mm in mismatches[:10]:
        print(f"   MISMATCH session {mm['session']} turn {mm['turn']}:\n     batched   {mm['batched']!r}\n"
              f"     reference {mm['reference']!r}")
    if len(mismatches) > 10:
        print(f"   ... {len(mismatches) - 10} more mismatches")
    print(f"answers differing from the one-at-a-time reference: {len(mismatches)} of {2 * n}   (target 0); "
          f"batched answers holding another session's fact but not their own: {len(chk_b['crosstalk'])}")
    out["crosstalk"] = dict(sessions=n, seed=args.seed, reference=how, facts=facts, order=order,
                            batched=dict(wall_s=batched["wall_s"], answers=batched["answers"],
                                         errors={f"{i}:{t + 1}": e for (i, t), e in batched["errors"].items()},
                                         **chk_b),
                            reference_run=dict(wall_s=ref["wall_s"], answers=ref["answers"],
                                               errors={f"{i}:{t + 1}": e for (i, t), e in ref["errors"].items()},
                                               **chk_r),
                            mismatches=mismatches,
                            target_met=not mismatches and not chk_b["crosstalk"] and not batched["errors"])


# --- driver -------------------------------------------------------------------------------------------------

def server_flags(args, quant: str) -> list[str]:
    flags = ["--quant", quant, "--dtype", args.dtype, "--cache", "sink", "--sinks", str(args.sinks),
             "--window", str(args.window), "--model-name", "bench"]
    if args.model:
        flags += ["--model", args.model]
    extra = list(args.server_args)
    if args.max_batch is not None:
        extra = without_flag(extra, "--max-batch") + ["--max-batch", str(args.max_batch)]
    if not has_flag(extra, "--max-live-sessions"):
        flags += ["--max-live-sessions", str(args.max_live_sessions)]
    if not has_flag(extra, "--max-queue"):  # today's server queues all but one request: room for every client
        need = max([*args.sessions, args.bg_sessions + 1, args.itl_sessions + 1, args.crosstalk_inflight])
        flags += ["--max-queue", str(max(8, need + 2))]
    return flags + extra


async def run_quant(args, quant: str, results: dict, supports_batch: bool) -> None:
    flags = server_flags(args, quant)
    print(f"\n######## --quant {quant}: python -m sinkstream serve --port 0 --state-dir TMP {shlex.join(flags)}",
          flush=True)
    out = results.setdefault("runs", {}).setdefault(quant, {})
    out["server_flags"] = flags
    servers: list[Server] = []
    try:
        server = Server(flags, threads=args.threads, ready_timeout=args.ready_timeout)
        servers.append(server)
        out["ready_s"] = server.ready_s
        print(f"server {server.url} ready in {server.ready_s:.1f} s", flush=True)
        c = Client(server.url, args.extra_body, args.request_timeout)
        try:
            try:  # pays first-request costs (in a session: the first chat of a server computes the template's
                # start, which later sessions copy from its prefix store); a server that cannot answer this is
                # not worth waiting for
                warm = await asyncio.wait_for(c.stream([{"role": "user", "content": "Hi"}], 4,
                                                       session=await c.session("warm")), args.ready_timeout)
            except asyncio.TimeoutError:
                raise RuntimeError(f"warm-up request: no answer in {args.ready_timeout:.0f} s") from None
            if warm.error:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
            if "agg" in args.section:
                await section_agg(c, args, out)
            if "ttft" in args.section:
                await section_ttft(c, args, out)
            if "itl" in args.section:
                await section_itl(c, args, out)
            if "crosstalk" in args.section:
                async def reference():
                    if not supports_batch:
                        return c, "the same server, one request at a time (this server has no --max-batch flag)"
                    ref_flags = without_flag(flags, "--max-batch") + ["--max-batch", "1"]
                    s = await asyncio.to_thread(Server, ref_flags, threads=args.threads,
                                                ready_timeout=args.ready_timeout)
                    servers.append(s)
                    return (Client(s.url, args.extra_body, args.request_timeout),
                            f"a second server with --max-batch 1, one request at a time ({shlex.join(ref_flags)})")
                await section_crosstalk(c, args, out, reference)
            try:
                r = await c.http.get("/metrics")
                out["metrics"] = [ln for ln in r.text.splitlines()
                                  if re.match(r"sinkstream_(batch|queue_wait|generated_tokens_total|rejected|cancel)",
                                              ln)]
            except httpx.HTTPError:
                pass
        finally:
            await c.close()
    except Exception:
        for s in servers:
            print(f"--- server log ({shlex.join(s.cmd[3:])}), last lines:\n" + "".join(s.log[-20:]), file=sys.stderr)
        raise
    finally:
        for s in servers:
            s.stop()


def summary(results: dict) -> None:
    rows = []
    for quant, out in results.get("runs", {}).items():
        def cell(key, val, fmt):
            sec = out.get(key)
            if not sec:
                return "-"
            v = sec.get(val)
            mark = {True: " ok", False: " MISSED", None: ""}[sec.get("target_met")]
            return ("-" if v is None else fmt(v)) + mark
        ct = out.get("crosstalk")
        rows.append([quant, cell("agg", "ratio", lambda v: f"{v:.2f}x"), cell("ttft", "median", ms),
                     cell("itl", "ratio", lambda v: f"{v:.2f}x"),
                     "-" if not ct else f"{len(ct['mismatches'])} / {len(ct['batched']['crosstalk'])}"
                     + (" ok" if ct["target_met"] else " MISSED")])
    print("\n== targets (issue 13)")
    print(table(["quant", "agg(8)/agg(1) >= 4", "short TTFT <= 2 s", "ITL prefill/alone <= 3",
                 "crosstalk: mismatches / leaks = 0"], rows))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    g = p.add_argument_group("server")
    g.add_argument("--model", default=None, help="what `serve --model` takes (default: none, i.e. SmolLM2)")
    g.add_argument("--quant", default="none,int4",
                   help="comma-separated weight modes, one server each, in turn: none (float weights in --dtype), "
                        "int4, int8 (default: none,int4)")
    g.add_argument("--dtype", default="float32", help="serve --dtype (default: float32)")
    g.add_argument("--sinks", type=int, default=4, help="attention sinks (default: 4)")
    g.add_argument("--window", type=int, default=1020, help="recent-token window (default: 1020)")
    g.add_argument("--max-batch", type=int, default=None,
                   help="forwarded as serve --max-batch N (requests decoded together); only when given, so the "
                        "script also runs against a server without that flag")
    g.add_argument("--max-live-sessions", type=int, default=8,
                   help="serve --max-live-sessions: sessions kept in memory (default: 8; the rest go to disk)")
    g.add_argument("--server-args", default="",
                   help="more serve flags, one shell-quoted string, e.g. --server-args=\"--prefill-chunk 256\"; "
                        "--max-queue given here replaces the script's (by default max(8, clients + 2), so "
                        "that today's one-at-a-time server queues every client instead of answering 503)")
    g.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the server (default: inherited; torch then uses every core)")
    g.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for /health (default: 300)")
    g.add_argument("--request-timeout", type=float, default=1800, help="httpx timeout per request (default: 1800)")
    g.add_argument("--extra-body", type=json.loads, default={},
                   help="JSON object merged into every chat request body, e.g. '{\"ignore_eos\": true}'")
    s = p.add_argument_group("sections")
    s.add_argument("--section", default="agg,ttft,itl,crosstalk",
                   help="comma-separated sections to run (default: all: agg,ttft,itl,crosstalk)")
    s.add_argument("--sessions", type=ints, default=[1, 8], help="agg: concurrent sessions to try (default: 1,8)")
    s.add_argument("--tokens", type=int, default=64, help="agg: max_tokens of each request (default: 64)")
    s.add_argument("--bg-sessions", type=int, default=7, help="ttft: sessions decoding meanwhile (default: 7)")
    s.add_argument("--long-tokens", type=int, default=256,
                   help="ttft, itl: max_tokens of the background generations (default: 256)")
    s.add_argument("--short-tokens", type=int, default=16, help="ttft: max_tokens of the short request (default: 16)")
    s.add_argument("--ttft-repeats", type=int, default=3, help="ttft: repeats, median reported (default: 3)")
    s.add_argument("--settle", type=float, default=60,
                   help="ttft, itl: seconds to wait for every background session to produce tokens before "
                        "measuring (default: 60; a server that runs one request at a time never gets there)")
    s.add_argument("--itl-sessions", type=int, default=3, help="itl: decoding sessions (default: 3)")
    s.add_argument("--itl-window", type=float, default=5, help="itl: seconds of decoding measured alone (default: 5)")
    s.add_argument("--prefill-tokens", type=int, default=4096, help="itl: tokens of the long prompt (default: 4096)")
    s.add_argument("--prefill-max-tokens", type=int, default=4,
                   help="itl: max_tokens of the long-prompt request (default: 4)")
    s.add_argument("--crosstalk-sessions", type=int, default=64, help="crosstalk: sessions (default: 64)")
    s.add_argument("--crosstalk-inflight", type=int, default=8, help="crosstalk: requests at once (default: 8)")
    s.add_argument("--crosstalk-tokens", type=int, default=24, help="crosstalk: max_tokens per turn (default: 24)")
    s.add_argument("--seed", type=int, default=0, help="crosstalk: names, numbers and turn order (default: 0)")
    p.add_argument("--json", metavar="PATH", help="write every number (and per-request details) here")
    args = p.parse_args(argv)
    args.quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    args.section = {x.strip() for x in args.section.split(",") if x.strip()}
    unknown = args.section - {"agg", "ttft", "itl", "crosstalk"}
    if unknown:
        p.error(f"--section: unknown {', '.join(sorted(unknown))}")
    if not args.sessions or min(args.sessions) < 1:
        p.error("--sessions: positive integers, e.g. 1,8")
    if args.crosstalk_sessions > len(FIRST) * len(LAST):
        p.error(f"--crosstalk-sessions: at most {len(FIRST) * len(LAST)}")
    if args.model and Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    args.server_args = shlex.split(args.server_args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: the servers stop
    help_text = server_help()
    supports_batch = "--max-batch" in help_text
    if (args.max_batch is not None or has_flag(args.server_args, "--max-batch")) and not supports_batch:
        print("error: this server has no --max-batch flag (python -m sinkstream serve --help)", file=sys.stderr)
        return 2
    results = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
               "omp_num_threads": str(args.threads) if args.threads else os.environ.get("OMP_NUM_THREADS"),
               "server_has_max_batch": supports_batch, "model": args.model or "default (SmolLM2)"}
    print(f"model {results['model']}, cache sink({args.sinks},{args.window}), quant {', '.join(args.quants)}, "
          f"dtype {args.dtype}, server --max-batch {'supported' if supports_batch else 'not supported'}, "
          f"OMP_NUM_THREADS={results['omp_num_threads'] or 'unset'}, {os.cpu_count()} CPUs")
    code = 0
    try:
        for quant in args.quants:
            asyncio.run(run_quant(args, quant, results, supports_batch))
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        results["interrupted"] = True
        code = 130
    finally:
        for server in list(RUNNING):
            server.stop()
        if results.get("runs"):
            summary(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
            print(f"wrote {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
