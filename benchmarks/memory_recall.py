"""Passkey recall far beyond the window: `memory` vs `sink` (and the two representative-key choices).

A pass key sits N tokens before the question, N = 10x .. 100x the window; filler is the usual repeated
sentences. Each trial greedily decodes a few tokens after "The pass key is" and counts a hit when the key
appears. Also prints the perplexity of `memory` vs `sink` on a long text (the 2% acceptance check).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_recall.py --distances 10,30,100 --trials 5
"""
from __future__ import annotations

import argparse
import random
import time

import torch

import sinkstream
from sinkstream.cache import CacheConfig
from sinkstream.generate import stream_tokens
from sinkstream.perplexity import stream_nll
from sinkstream.sampling import SamplingConfig, make_sampler

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def passkey_ids(tok, distance: int, key: int, *, prefix: int = 200) -> list[int]:
    """~prefix filler tokens, the needle, ~distance filler tokens, the question."""
    fill = tok.encode(FILLER, add_special_tokens=False)
    reps = lambda n: (fill * (n // len(fill) + 1))[:n]
    return (reps(prefix) + tok.encode(NEEDLE.format(key=key), add_special_tokens=False) + reps(distance)
            + tok.encode(QUESTION, add_special_tokens=False))


def answer(model, tok, cache, ids: list[int], max_tokens: int = 8) -> str:
    sampler = make_sampler(SamplingConfig(temperature=0.0), model.device)
    out = list(stream_tokens(model, cache, torch.tensor(ids), sampler=sampler, max_tokens=max_tokens))
    return tok.decode(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=252)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--distances", default="10,30,100", help="needle distances, in multiples of the window")
    ap.add_argument("--trials", type=int, default=5, help="per distance; 0 = perplexity only")
    ap.add_argument("--policies", default="sink,memory:attention,memory:mean")
    ap.add_argument("--ppl-tokens", type=int, default=0, help="also compare perplexity on this many tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, tok = sinkstream.load()
    W = args.window + args.sinks
    rng = random.Random(args.seed)
    distances = [int(float(d) * W) for d in args.distances.split(",")]
    keys = {d: [rng.randrange(10000, 99999) for _ in range(args.trials)] for d in distances}

    def config(spec: str) -> CacheConfig:
        policy, _, rep = spec.partition(":")
        extra = dict(block_size=args.block_size, top_k=args.top_k, representative=rep or "attention")
        return CacheConfig(policy, args.sinks, args.window, **(extra if policy == "memory" else {}))

    if args.trials:
        print(f"passkey recall, SmolLM2-135M, cache {args.sinks}+{args.window}, block {args.block_size}, "
              f"top-k {args.top_k}, {args.trials} trials per distance")
        print(f"{'policy':<18}" + "".join(f"{f'{d} tok':>12}" for d in distances) + f"{'s/trial':>10}")
    for spec in args.policies.split(",") if args.trials else []:
        row, t0, n = [], time.perf_counter(), 0
        for d in distances:
            hits = 0
            for key in keys[d]:
                cache = model.make_cache(config(spec))
                reply = answer(model, tok, cache, passkey_ids(tok, d, key))
                hits += str(key) in reply
                n += 1
            row.append(hits / len(keys[d]))
        print(f"{spec:<18}" + "".join(f"{a:>12.0%}" for a in row) + f"{(time.perf_counter() - t0) / n:>10.1f}",
              flush=True)

    if args.ppl_tokens:
        text = open(sinkstream.__path__[0] + "/data/pride_and_prejudice_excerpt.txt").read()
        ids = torch.tensor(tok.encode(text, add_special_tokens=False)[:args.ppl_tokens])
        print(f"\nperplexity on {len(ids)} tokens of the bundled Austen excerpt (chunked, 512)")
        base = None
        for spec in args.policies.split(","):
            nll = stream_nll(model, model.make_cache(config(spec)), ids)
            ppl = float(torch.exp(nll.mean()))
            base = base or ppl
            print(f"{spec:<18}{ppl:>10.3f}{ppl / base - 1:>+10.2%}", flush=True)


if __name__ == "__main__":
    main()
