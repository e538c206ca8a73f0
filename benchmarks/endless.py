"""Endless streams through every public API: resident memory and time per token must stay flat.

Three drivers, each in its own process, one after the other (never two at once):

* ``generate``  one `stream_generate(..., max_tokens=-1)` call, read until --tokens tokens are out;
* ``chat``      one `Session`, many `chat` turns (a user message cut from the bundled book excerpt, then a
                reply of at most --reply tokens), until the session has seen --tokens tokens;
* ``server``    one session of a real `sinkstream serve` (its own process), many chat turns sent with
                ``"append": true``, until the session has seen --tokens tokens (each turn is saved, as always).

Tokens are counted as they pass through the cache (prompt and reply alike). For each tenth of the run the
script notes the wall time per token and the resident set size (RSS) of the process that holds the model;
it prints them at 10%, 50% and 100%, then RSS growth after warm-up (100% against 10%) and the ratio of
ms/token in the last tenth to the first. Targets (issue 11): growth < 2%, ratio <= 1.1.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/endless.py --model tiny --tokens 1000000
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/endless.py --model smollm2 --quant int4 --tokens 100000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

DRIVERS = ("generate", "chat", "server")
EXCERPT = Path(__file__).resolve().parent.parent / "sinkstream" / "data" / "pride_and_prejudice_excerpt.txt"


class Tenths:
    """Wall time and RSS at each tenth of a run of `total` tokens."""

    def __init__(self, total: int, pid: int, label: str):
        self.total, self.proc, self.label = total, psutil.Process(pid), label
        self.marks: list[tuple[int, float, float]] = []  # (tokens, seconds since start, RSS MiB)
        self.t0 = time.perf_counter()
        self.next = 1

    def update(self, done: int) -> bool:
        """Record every tenth boundary `done` has crossed; True once the run is complete."""
        while self.next <= 10 and done >= self.total * self.next // 10:
            rss = self.proc.memory_info().rss / 2**20
            self.marks.append((done, time.perf_counter() - self.t0, rss))
            if self.next in (1, 5, 10):
                print(f"[{self.label}] {self.next * 10:3d}%: {done:>9,d} tokens, "
                      f"{self.ms_per_token(len(self.marks) - 1):6.2f} ms/token in this tenth, RSS {rss:7.1f} MiB",
                      flush=True)
            self.next += 1
        return self.next > 10

    def ms_per_token(self, i: int) -> float:
        n0, s0 = (0, 0.0) if i == 0 else self.marks[i - 1][:2]
        n1, s1 = self.marks[i][:2]
        return 1000 * (s1 - s0) / max(1, n1 - n0)

    def summary(self) -> dict:
        growth = 100 * (self.marks[-1][2] - self.marks[0][2]) / self.marks[0][2]
        ratio = self.ms_per_token(len(self.marks) - 1) / self.ms_per_token(0)
        out = {"driver": self.label, "tokens": self.marks[-1][0], "seconds": round(self.marks[-1][1], 1),
               "rss_mib": [round(m[2], 1) for m in self.marks], "rss_growth_pct": round(growth, 2),
               "ms_per_token": [round(self.ms_per_token(i), 3) for i in range(len(self.marks))],
               "last_over_first": round(ratio, 3)}
        ok = growth < 2 and ratio <= 1.1
        print(f"[{self.label}] {out['tokens']:,d} tokens in {out['seconds']:.0f} s: RSS growth after warm-up "
              f"{growth:+.2f}% (target < 2%), ms/token last tenth / first tenth {ratio:.3f} (target <= 1.1): "
              f"{'met' if ok else 'NOT met'}", flush=True)
        print("RESULT " + json.dumps(out), flush=True)
        return out


def user_messages(chars: int):
    """Consecutive slices of the bundled excerpt, for ever."""
    text = " ".join(EXCERPT.read_text().split())
    i = 0
    while True:
        if i + chars > len(text):
            i = 0
        yield text[i:i + chars]
        i += chars


def load(args):
    import sinkstream
    model = args.model_path
    return sinkstream.load(model, quiet=True, quant=None if args.quant == "none" else args.quant)


def cache_config(args):
    from sinkstream import CacheConfig
    return CacheConfig("sink", sinks=args.sinks, window=args.window)


def sampling(args):
    from sinkstream import SamplingConfig
    return SamplingConfig(temperature=args.temp, top_k=40, seed=0)


def drive_generate(args) -> None:
    import sinkstream
    model, tok = load(args)
    cache = model.make_cache(cache_config(args))
    tenths = Tenths(args.tokens, os.getpid(), "generate")
    stream = sinkstream.stream_generate(model, tok, "Once upon a time", cache=cache, max_tokens=-1,
                                        sampling=sampling(args), stop_ids=set())
    for r in stream:
        if tenths.update(cache.seen):
            break
    stream.close()
    tenths.summary()


def drive_chat(args) -> None:
    from sinkstream import Session
    model, tok = load(args)
    s = Session(model, tok, cache_config(args), sampling(args))
    tenths = Tenths(args.tokens, os.getpid(), "chat")
    for msg in user_messages(args.turn_chars):
        for _ in s.chat(msg, max_tokens=args.reply):
            pass
        if tenths.update(s.cache.seen):
            break
    print(f"[chat] {s.turns} turns; messages kept {len(s.messages)}, last reply kept {len(s.last_reply)} chars")
    tenths.summary()


def drive_server(args) -> None:
    import httpx

    from server_turns import start_server
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(_ServerArgs(args), str(Path(tmp) / "state"))
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                sid = http.post("/v1/sessions", json={"id": "endless"}).json()["id"]
                tenths = Tenths(args.tokens, proc.pid, "server")
                turns = 0
                for msg in user_messages(args.turn_chars):
                    body = {"messages": [{"role": "user", "content": msg}], "max_tokens": args.reply,
                            "temperature": args.temp, "top_k": 40, "seed": 0, "session": sid, "append": True}
                    r = http.post("/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        raise SystemExit(f"[server] turn {turns + 1}: HTTP {r.status_code} {r.text[:300]}")
                    turns += 1
                    if tenths.update(r.json()["session"]["tokens_seen"]):
                        break
                print(f"[server] {turns} turns; session file "
                      f"{sum(p.stat().st_size for p in (Path(tmp) / 'state').rglob('*') if p.is_file()) / 2**20:.1f} MiB")
                tenths.summary()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


class _ServerArgs:
    """What server_turns.start_server reads, from this script's arguments."""

    def __init__(self, args):
        self.sinks, self.window, self.model_path = args.sinks, args.window, args.model_path
        self.quant = args.quant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random weights, built here), 'smollm2', or a path")
    p.add_argument("--quant", default="none", choices=("none", "int8", "int4"))
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens through the cache, per driver")
    p.add_argument("--drivers", default=",".join(DRIVERS))
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--turn-chars", type=int, default=800, help="characters of each user message (chat, server)")
    p.add_argument("--reply", type=int, default=64, help="max tokens of each reply (chat, server)")
    p.add_argument("--temp", type=float, default=0.8, help="sampling temperature (top-k 40); 0 = greedy")
    p.add_argument("--driver", help=argparse.SUPPRESS)        # run one driver in this process
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        {"generate": drive_generate, "chat": drive_chat, "server": drive_server}[args.driver](args)
        return
    drivers = [d for d in args.drivers.split(",") if d]
    bad = [d for d in drivers if d not in DRIVERS]
    if bad:
        p.error(f"unknown driver(s) {', '.join(bad)}; choose from {', '.join(DRIVERS)}")
    load_avg = os.getloadavg()
    print(f"endless: model {args.model}, quant {args.quant}, sink({args.sinks},{args.window}), {args.tokens:,d} "
          f"tokens per driver, temperature {args.temp} top-k 40, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} CPUs, load average before {load_avg[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            sys.path.insert(0, str(Path(__file__).parent))
            from server_turns import tiny_model
            path = str(tiny_model(Path(tmp) / "tiny"))
        else:
            path = None if args.model == "smollm2" else args.model
        for d in drivers:
            cmd = [sys.executable, __file__, "--driver", d, "--tokens", str(args.tokens), "--quant", args.quant,
                   "--sinks", str(args.sinks), "--window", str(args.window), "--turn-chars", str(args.turn_chars),
                   "--reply", str(args.reply), "--temp", str(args.temp)] + (["--model-path", path] if path else [])
            rc = subprocess.call(cmd)
            if rc:
                raise SystemExit(f"driver {d} failed with exit code {rc}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
