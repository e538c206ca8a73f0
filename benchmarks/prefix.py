"""Pinned and shared system prompts (issue 14): session creation, instruction keeping, perplexity cost.

Sections (``--sections create,decode,rules,ppl``), each printing a plain-text table:

  create  --sessions sessions made with the same system prompt of about --prompt-tokens tokens (the start of
          the bundled Pride and Prejudice excerpt after an instruction), pinned, cache sink(4, --create-window),
          KV in --kv-dtype: once with a `PrefixStore` (the first computes, the rest copy) and once without
          (every session prefills), each in a process of its own. Reports total and median time per session,
          the ratio, the KV bytes a session's buffers can hold and the RSS growth per session (sessions are
          kept alive until the variant ends; buffers are touched as they fill).
  decode  ms/token of decode steps on a full cache of --create-window + 4 tokens: 4 sinks against pinned
          prefixes of --decode-pins tokens (the sinks are rotated into place each pass: pinned tokens cost
          time per token too), runs alternating, median of --decode-repeats.
  rules   One session per cache policy at the same total cache size (--rules-cache tokens): pinned sink,
          sink(4, W-4), window(W). System prompt: RULE ("Your name is Zorblax."). Then the MT-Bench turns
          (--questions file, field "turns", 160 by default) one after another in that session, greedy,
          --rule-tokens tokens a reply; after each turn a copy of the session is asked PROBE ("What is your
          name?") and dropped, so the probes never enter the session. A turn counts when that answer names
          Zorblax; counted per block of --block turns. Style rules ("answer in one sentence") were tried
          first: SmolLM2 follows them for a few questions only, and a long chat carries a style on through
          its own replies, so they do not show whether the prompt is still seen. Baseline: a fresh session
          per question (first --block), asked the probe after one turn, with and without the prompt.
  ppl     Perplexity of --ppl-tokens tokens of a book (--text) with a pinned --pin-tokens-token prefix (the
          stream's first tokens kept as sinks) against 4 sinks, same total cache (--ppl-cache tokens).

    .venv/bin/python benchmarks/prefix.py                                  # everything, SmolLM2
    .venv/bin/python benchmarks/prefix.py --sections create --sessions 10  # a quick look

Times are wall clock on this machine; the load average is printed before each section. Nothing else
should run meanwhile.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

import sinkstream
from sinkstream import CacheConfig, SamplingConfig, Session
from sinkstream.perplexity import perplexity, stream_nll
from sinkstream.prefix import PrefixStore
from sinkstream.tokenizer import encode

DATA = Path(sinkstream.__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAME = "Zorblax"
RULE = f"Your name is {NAME}."  # SmolLM2-135M follows it while the prompt is in view, and never guesses it
PROBE = "What is your name?"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def long_system(tok, tokens: int) -> str:
    """An instruction plus the start of the bundled excerpt, cut to about `tokens` tokens."""
    text = (DATA / "pride_and_prejudice_excerpt.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    return "You are a literary assistant. Answer questions about this book:\n\n" + tok.decode(ids)


def rss() -> int:
    return psutil.Process().memory_info().rss


# --- create -----------------------------------------------------------------------------------------
def create_variant(model, tok, args) -> dict:
    """Make --sessions sessions (kept alive) with or without a store (--create-variant); in a process of its
    own, so the RSS growth is this variant's alone."""
    system = long_system(tok, args.prompt_tokens)
    cfg = CacheConfig("sink", 4, args.create_window, kv_dtype=args.kv_dtype)
    store = PrefixStore(1 << 30) if args.create_variant == "shared" else False
    gc.collect()
    base, times, sessions = rss(), [], []
    t0 = time.perf_counter()
    for _ in range(args.sessions):
        t = time.perf_counter()
        sessions.append(Session(model, tok, cfg, SamplingConfig(temperature=0), system=system, pin_system=True,
                                prefixes=store))
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    s = sessions[0]
    return {"total_s": total, "median_ms": statistics.median(times) * 1e3, "first_ms": times[0] * 1e3,
            "rest_mean_ms": statistics.mean(times[1:]) * 1e3 if len(times) > 1 else None,
            "pinned": s.pinned, "kv_bytes": s.cache.nbytes, "rss_per_session": (rss() - base) / args.sessions,
            "store_bytes": store.nbytes if store else 0, "cache": s.cache.config.describe()}


def create(model, tok, args) -> dict:
    out = {}
    print(f"\n== create: {args.sessions} sessions, one system prompt of about {args.prompt_tokens} tokens, pinned, "
          f"sink(4,{args.create_window}) (kv {args.kv_dtype or model.dtype}); each variant in its own process; "
          f"load {load_avg()}", flush=True)
    for name in ("shared", "not shared"):
        cmd = [sys.executable, __file__, "--create-variant", "shared" if name == "shared" else "unshared",
               "--sessions", str(args.sessions), "--prompt-tokens", str(args.prompt_tokens),
               "--create-window", str(args.create_window), "--kv-dtype", str(args.kv_dtype or "auto"),
               "--quant", args.quant] + (["--model", args.model] if args.model else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        out[name] = row
        print(f"  {name:11s} total {row['total_s']:7.2f} s  median {row['median_ms']:7.1f} ms/session  first "
              f"{row['first_ms']:6.1f} ms  others' mean {row['rest_mean_ms']:6.1f} ms  {row['cache']}  "
              f"KV {row['kv_bytes'] / 2**20:.1f} MiB/session  RSS +{row['rss_per_session'] / 2**20:.1f} MiB/session  "
              f"store {row['store_bytes'] / 2**20:.1f} MiB", flush=True)
    ratio = out["not shared"]["total_s"] / out["shared"]["total_s"]
    per = out["not shared"]["median_ms"] / out["shared"]["median_ms"]
    out["ratio_total"], out["ratio_median"] = ratio, per
    print(f"  shared is {ratio:.1f}x faster in total, {per:.1f}x per session (median); target >= 20x", flush=True)
    return out


# --- rules ------------------------------------------------------------------------------------------
def questions(path: Path, limit: int) -> list[str]:
    turns = [t for line in path.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]]
    return turns[:limit]


def reply(s: Session, text: str, tokens: int) -> str:
    return "".join(r.text for r in s.chat(text, max_tokens=tokens))


def fork(model, tok, s: Session) -> Session:
    """A copy of `s` (its cache state and where its chat stands) that can be asked a question and dropped."""
    f = Session(model, tok, s.cache.config, s.sampling, prefixes=False)
    f.cache.load_state(s.cache.state())
    f.pending, f.last_reply, f.system, f.prefix_text = s.pending, s.last_reply, s.system, s.prefix_text
    return f


def knows(model, tok, s: Session, tokens: int = 16) -> bool:
    return NAME.lower() in reply(fork(model, tok, s), PROBE, tokens).lower()


def rules(model, tok, args) -> dict:
    qs = questions(Path(args.questions), args.turns)
    W, greedy = args.rules_cache, SamplingConfig(temperature=0)
    print(f"\n== rules: system prompt {RULE!r}; {len(qs)} MT-Bench turns in one session (replies <= "
          f"{args.rule_tokens} tokens), after each a copy of the session is asked {PROBE!r} (not kept); cache "
          f"{W} tokens; load {load_avg()}", flush=True)
    big = CacheConfig("sink", 4, 2044)
    base = {}
    for label, system in (("no system prompt", None), ("with the rule", RULE)):
        hits = []
        for q in qs[:args.block]:
            s = Session(model, tok, big, greedy, system=system, prefixes=False)
            reply(s, q, args.rule_tokens)
            hits.append(knows(model, tok, s))
        base[label] = sum(hits)
    print(f"  fresh session per question (first {args.block}), the probe after one turn: "
          f"{'; '.join(f'{k} {v}/{args.block}' for k, v in base.items())}", flush=True)
    out = {"rule": RULE, "probe": PROBE, "baseline": base, "block": args.block, "policies": {}}
    policies = (("pinned sink", CacheConfig("sink", 4, W - 4), True), ("sink(4,W-4)", CacheConfig("sink", 4, W - 4), False),
                ("window(W)", CacheConfig("window", 0, W), False))
    for name, cfg, pin in policies:
        s = Session(model, tok, cfg, greedy, system=RULE, pin_system=pin, prefixes=False)
        last = len(encode(tok, s.prefix_text, start_of_stream=True)) - 1  # the prompt's last token
        blocks, t0, left = [], time.perf_counter(), None
        for i, q in enumerate(qs):
            reply(s, q, args.rule_tokens)
            if i % args.block == 0:
                blocks.append(0)
            blocks[-1] += knows(model, tok, s)
            if left is None and not bool((next(iter(s.cache.groups.values())).slot_token == last).any()):
                left = i + 1
        out["policies"][name] = {"blocks": blocks, "cache": s.cache.config.describe(), "pinned": s.pinned,
                                 "tokens_seen": s.cache.seen, "prompt_left_after_turn": left}
        print(f"  {name:12s} {s.cache.config.describe():15s} turns after which it knows its name, per {args.block}: "
              f"{' '.join(f'{b:3d}' for b in blocks)}   (prompt left the cache after turn {left}; "
              f"{s.cache.seen} tokens streamed, {time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# --- decode -----------------------------------------------------------------------------------------
def decode(model, tok, args) -> dict:
    """ms/token of decode steps on a full cache: 4 sinks against a pinned prefix, same total size. The sinks'
    keys are rotated into place every pass (cache/plan.py, "Rotation offset"), so pinned tokens cost work per
    token as well as memory."""
    C, reps = args.create_window + 4, args.decode_repeats
    ids = torch.randint(100, 10000, (1, C + 64), generator=torch.Generator().manual_seed(0))
    rows = {}
    print(f"\n== decode: ms/token at a full cache of {C} tokens, {args.decode_steps} steps, median of {reps} "
          f"alternating runs; load {load_avg()}", flush=True)
    configs = [("4 sinks", CacheConfig("sink", 4, C - 4))] + [
        (f"{p} pinned", CacheConfig("sink", 4, C - 4).pinned(p)) for p in args.decode_pins]
    times = {name: [] for name, _ in configs}
    with torch.inference_mode():
        caches = {}
        for name, cfg in configs:
            caches[name] = model.make_cache(cfg)
            caches[name].run(model, ids)
        x = torch.tensor([[42]])
        for _ in range(reps):
            for name, _ in configs:
                cache = caches[name]
                for _ in range(3):
                    cache.run(model, x)
                t = time.perf_counter()
                for _ in range(args.decode_steps):
                    cache.run(model, x)
                times[name].append((time.perf_counter() - t) / args.decode_steps * 1e3)
    base = statistics.median(times["4 sinks"])
    for name, cfg in configs:
        m = statistics.median(times[name])
        rows[name] = {"cache": cfg.describe(), "ms_per_token": m, "runs": times[name], "relative": m / base}
        print(f"  {name:11s} {cfg.describe():15s} {m:6.2f} ms/token  ({m / base:.2f}x)", flush=True)
    return rows


# --- ppl ----------------------------------------------------------------------------------------------
def ppl(model, tok, args) -> dict:
    text = Path(args.text).read_text()
    ids = torch.tensor(tok.encode(text, add_special_tokens=False)[:args.ppl_tokens])
    C, P = args.ppl_cache, args.pin_tokens
    print(f"\n== ppl: {len(ids)} tokens of {Path(args.text).name}, cache {C} tokens; load {load_avg()}", flush=True)
    out = {}
    for name, cfg in (("4 sinks", CacheConfig("sink", 4, C - 4)),
                      (f"{P} pinned", CacheConfig("sink", 4, C - 4).pinned(P))):
        t0 = time.perf_counter()
        nll = stream_nll(model, model.make_cache(cfg), ids)
        out[name] = {"cache": cfg.describe(), "ppl": perplexity(nll),
                     "ppl_after_cache": perplexity(nll[C:]) if len(nll) > C else None}
        print(f"  {name:11s} {cfg.describe():14s} ppl {out[name]['ppl']:.3f}   (beyond the first {C} tokens: "
              f"{out[name]['ppl_after_cache']:.3f})   {time.perf_counter() - t0:.0f} s", flush=True)
    a, b = out["4 sinks"]["ppl"], out[f"{P} pinned"]["ppl"]
    out["relative"] = b / a - 1
    print(f"  pinning {P} tokens changes perplexity by {100 * (b / a - 1):+.2f}%", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path or short name (default: SmolLM2)")
    p.add_argument("--quant", default="auto")
    p.add_argument("--sections", default="create,decode,rules,ppl")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--create-window", type=int, default=2044)
    p.add_argument("--kv-dtype", default="bfloat16", help="KV dtype of the create section's sessions")
    p.add_argument("--questions", default=str(SHARED / "mt_bench.jsonl"))
    p.add_argument("--turns", type=int, default=160)
    p.add_argument("--block", type=int, default=40)
    p.add_argument("--rule-tokens", type=int, default=48)
    p.add_argument("--rules-cache", type=int, default=512)
    p.add_argument("--text", default=str(SHARED / "pg1342_pride_and_prejudice.txt")
                   if (SHARED / "pg1342_pride_and_prejudice.txt").exists()
                   else str(DATA / "pride_and_prejudice_excerpt.txt"))
    p.add_argument("--ppl-tokens", type=int, default=20000)
    p.add_argument("--ppl-cache", type=int, default=1024)
    p.add_argument("--pin-tokens", type=int, default=256)
    p.add_argument("--decode-pins", type=lambda v: [int(x) for x in v.split(",")], default=[256, 1000])
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--decode-repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--create-variant", choices=["shared", "unshared"], default=None,
                   help=argparse.SUPPRESS)  # one variant of the create section, run by it in a subprocess
    args = p.parse_args()
    extra = {} if args.quant == "auto" else {"quant": args.quant}
    model, tok = sinkstream.load(args.model, quiet=True, **extra)
    args.kv_dtype = None if args.kv_dtype in ("auto", "none") else args.kv_dtype
    if args.create_variant:
        print(json.dumps(create_variant(model, tok, args)))
        return
    print(f"model {args.model or 'SmolLM2-135M-Instruct'} ({model.dtype}, quant {args.quant}), torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)
    results = {}
    for section in args.sections.split(","):
        results[section] = {"create": create, "decode": decode, "rules": rules, "ppl": ppl}[section](model, tok, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
