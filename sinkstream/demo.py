"""`make demo`: stream a generation several times longer than a small sink cache, with live stats."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import CacheConfig, SamplingConfig, Session, load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=1200)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=252)
    p.add_argument("--every", type=int, default=150, help="print a stats line every N tokens")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model, tok = load()
    print(f"[loaded SmolLM2-135M-Instruct on {model.device} in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    cache = CacheConfig("sink", sinks=args.sinks, window=args.window)
    session = Session(model, tok, cache, SamplingConfig(temperature=0.8, top_p=0.95, repetition_penalty=1.15,
                                                        seed=0))
    print(f"[cache: {args.sinks} sinks + {args.window} recent = {args.sinks + args.window} tokens; generating "
          f"{args.tokens} tokens, {args.tokens / (args.sinks + args.window):.1f}x the cache]\n", file=sys.stderr)
    message = ("Write a very long story about a lighthouse keeper who finds a message in a bottle. "
               "Describe every day of her journey in detail.")
    total, t_last, n_last = 0, time.perf_counter(), 0
    while total < args.tokens:  # the model may end its story: ask for more in the same session
        for r in session.chat(message, max_tokens=args.tokens - total):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            n = total + r.generation_tokens
            if n // args.every > n_last // args.every or r.finish_reason:
                now = time.perf_counter()
                st = session.stats()
                rate = (n - n_last) / max(now - t_last, 1e-9)
                print(f"\n[{n} tokens | {rate:.1f} tok/s | seen {st.tokens_seen} | cached {st.tokens_cached}/"
                      f"{st.capacity} | KV {st.cache_bytes / 2**20:.1f} MiB]", file=sys.stderr, flush=True)
                t_last, n_last = now, n
        total = n
        message = "Continue the story."
    st = session.stats()
    print(f"\n[done: {st.tokens_seen} tokens through a {st.capacity}-token cache; "
          f"KV memory stayed at {st.cache_bytes / 2**20:.1f} MiB]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
