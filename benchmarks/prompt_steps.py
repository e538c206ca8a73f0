"""One batched step of prompts with quantized weights, by where prompt rows leave our int8 kernels.

    .venv/bin/python benchmarks/prompt_steps.py [--model M] [--quant int4] [--shapes 1x21,1x46,8x21,8x46,1x63]
                                                [--thresholds 16,64] [--repeats 5]

Each shape NxL is N fresh sink(4, 1020) caches fed L random token ids each in one `batch.step` (all prompts
whole, as the server packs short prompts beside each other). For each threshold T,
`sinkstream.quant.QUANT_MANY_TOKENS` is set to T: a stream whose pass alone would have T tokens or more
multiplies through de-quantized bfloat16 weights (one call per stream), one with fewer through our int8
kernels. Prints the median step time over --repeats (after 2 warm-up steps). Nothing else may run meanwhile.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sinkstream
from sinkstream import CacheConfig, quant
from sinkstream.batch import new_feed, step


def timed_step(model, n: int, length: int) -> float:
    caches = [model.make_cache(CacheConfig("sink", sinks=4, window=1020)) for _ in range(n)]
    feeds = [new_feed(model, c, torch.randint(100, 40000, (1, length))) for c in caches]
    t = time.perf_counter()
    step(model, feeds, budget=None, whole=None)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--quant", default="int4")
    p.add_argument("--shapes", default="1x21,1x46,8x21,8x46,1x63")
    p.add_argument("--thresholds", default="16,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = sinkstream.load(args.model, device="cpu", dtype="float32", quant=args.quant, quiet=True)
    thresholds = [int(t) for t in args.thresholds.split(",")]
    print(f"{model.source}, quant {model.quant}, {args.threads} threads; median of {args.repeats} steps")
    print(f"{'prompts x tokens':>16}  " + "  ".join(f"{'threshold ' + str(t):>13}" for t in thresholds))
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            n, length = (int(v) for v in shape.split("x"))
            cells = []
            for t in thresholds:
                quant.QUANT_MANY_TOKENS = t
                for _ in range(2):
                    timed_step(model, n, length)
                cells.append(statistics.median(timed_step(model, n, length) for _ in range(args.repeats)))
            print(f"{shape:>16}  " + "  ".join(f"{c * 1e3:>10.1f} ms" for c in cells))


if __name__ == "__main__":
    main()
