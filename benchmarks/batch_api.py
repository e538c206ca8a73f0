"""Many streams through the Python API, no HTTP: what `batch.map_batched` gives the engine alone.

    .venv/bin/python benchmarks/batch_api.py [--model M] [--quant int4] [--sessions 1,8] [--tokens 64] [--rounds 3]

Each stream is a chat prompt (the model's template, a different subject each) completed with
`stream_generate` to exactly --tokens tokens (end-of-text ignored), greedy, sink(4, 1020) caches made
beforehand in the calling thread. For each count of streams it prints the aggregate tokens/s (all tokens /
wall time from the start to the last token, prompts included), the first-token times and the median
inter-token latency, medians over --rounds; then the ratio to one stream, and the median time of a step
that decodes a token for every stream and of the time between two such steps (the streams' threads handing
in their next tokens). benchmarks/server_concurrency.py measures the same through `sinkstream serve` (HTTP,
request threads, clients sharing the CPUs); the difference between the two is the server's share. Nothing else may run meanwhile.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import sinkstream
from sinkstream import CacheConfig
from sinkstream.batch import map_batched
from sinkstream.generate import stream_generate

SUBJECTS = ["a cat", "a dog", "a bird", "a fish", "a king", "a queen", "a robot", "a tree", "a river", "a ship",
            "a clock", "a baker", "a violin", "a lighthouse", "a comet", "a fox"]


def run(model, tok, n: int, tokens: int) -> dict:
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a long story about {SUBJECTS[i % 16]} "
                                         "who travels far away."}], add_generation_prompt=True, tokenize=False)
               for i in range(n)]
    jobs = [(p, model.make_cache(CacheConfig("sink", sinks=4, window=1020))) for p in prompts]

    def one(job):
        times = []
        for _ in stream_generate(model, tok, job[0], cache=job[1], max_tokens=tokens, stop_ids=set()):
            times.append(time.perf_counter())
        return times

    steps = []  # (end time, seconds) of the steps that decoded one token for every stream
    on_step = lambda st: steps.append((time.perf_counter(), st.seconds)) if st.feeds == st.tokens == n else None  # noqa: E731
    t0 = time.perf_counter()
    res = map_batched(model, one, jobs, max_batch=n, on_step=on_step)
    wall = time.perf_counter() - t0
    gaps = [b - a for ts in res for a, b in zip(ts, ts[1:])]
    between = [(b - sb) - a for (a, _), (b, sb) in zip(steps, steps[1:])]
    return dict(tok_s=sum(map(len, res)) / wall, ttft_first=min(ts[0] for ts in res) - t0,
                ttft_last=max(ts[0] for ts in res) - t0, itl=statistics.median(gaps),
                step=statistics.median(s for _, s in steps), between=statistics.median(between))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--quant", default="int4")
    p.add_argument("--sessions", default="1,8")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = sinkstream.load(args.model, device="cpu", dtype="float32", quant=args.quant, quiet=True)
    counts = [int(s) for s in args.sessions.split(",")]
    run(model, tok, max(counts), 8)  # warm-up: kernels, allocator
    print(f"{model.source}, quant {model.quant}, {args.tokens} tokens a stream, {args.threads} threads, "
          f"{args.rounds} round(s); load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'streams':>7}  {'agg tok/s':>9}  {'vs 1':>6}  {'first token, first / last':>25}  {'ITL median':>10}  "
          f"{'step':>8}  {'between steps':>13}")
    base = None
    for n in counts:
        rows = [run(model, tok, n, args.tokens) for _ in range(args.rounds)]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        base = base or med["tok_s"]
        print(f"{n:>7}  {med['tok_s']:>9.1f}  {med['tok_s'] / base:>5.2f}x  "
              f"{med['ttft_first'] * 1e3:>10.0f} / {med['ttft_last'] * 1e3:>5.0f} ms  {med['itl'] * 1e3:>7.1f} ms  "
              f"{med['step'] * 1e3:>5.1f} ms  {med['between'] * 1e3:>10.2f} ms")


if __name__ == "__main__":
    main()
