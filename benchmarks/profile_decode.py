"""Where a decode step's time goes: torch's profiler over a few steps of a full sink cache.

    .venv/bin/python benchmarks/profile_decode.py [MODEL] [--context 2048] [--steps 5] [--quant auto] [--kv-dtype bfloat16]

Prints the median ms/token of 10 steps, then the operators by their own CPU time over `--steps` steps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import sinkstream
from sinkstream import CacheConfig


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quant", default="auto")
    p.add_argument("--kv-dtype", default=None, help="CacheConfig.kv_dtype (default: the model's dtype)")
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = sinkstream.load(args.model, device="cpu", dtype="float32", quant=args.quant, quiet=True)
    cache = model.make_cache(CacheConfig("sink", sinks=4, window=args.context - 4, kv_dtype=args.kv_dtype))
    ids = torch.randint(100, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    cache.run(model, ids)
    one = ids[:, :1]
    times = []
    for _ in range(10):
        t = time.perf_counter()
        cache.run(model, one)
        times.append(time.perf_counter() - t)
    print(f"{model.source}: {statistics.median(times) * 1e3:.2f} ms/token at a full sink(4,{args.context - 4}), "
          f"quant {model.quant}, kv {cache.layers[0].k.dtype}, {args.threads} threads")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            cache.run(model, one)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
