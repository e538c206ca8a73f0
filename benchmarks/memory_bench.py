"""Decode speed and memory of `memory` vs `sink` at the same window, against stream position.

One stream per policy: chunked prefill to each position, then time single-token decoding there. Prints
ms/token, the process RSS, the cache's RAM bytes and the bytes spilled to disk.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_bench.py --positions 1000,4000,16000 --budget 64M
    # RAM bounded with spilling, on a tiny random model (the real one would need hours on a CPU):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_bench.py --tiny --positions 1000,100000,1000000 \\
        --policies memory --budget 16M
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import psutil
import torch

import sinkstream
from sinkstream.cache import CacheConfig
from sinkstream.cli_args import parse_size


def tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    from sinkstream.loading import build_model
    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return build_model(hf.config.to_dict(), hf.state_dict())


def stream_tokens_of(tok, n: int, vocab: int) -> torch.Tensor:
    if tok is None:
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    text = (Path(sinkstream.__file__).parent / "data" / "pride_and_prejudice_excerpt.txt").read_text()
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    return ids.repeat(n // len(ids) + 1)[:n]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", default="1000,4000,16000")
    ap.add_argument("--policies", default="sink,memory:attention,memory:mean")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=252)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--budget", type=parse_size, default=parse_size("64M"))
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed at each position")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    args = ap.parse_args()
    model, tok = (tiny_model(), None) if args.tiny else sinkstream.load(quiet=True)
    positions = [int(float(p)) for p in args.positions.split(",")]
    ids = stream_tokens_of(tok, positions[-1] + args.decode * len(positions), model.config.vocab_size)
    proc = psutil.Process(os.getpid())
    print(f"{'tiny random model' if args.tiny else 'SmolLM2-135M'}, cache {args.sinks}+{args.window}, block "
          f"{args.block_size}, top-k {args.top_k}, memory budget {args.budget / 2**20:.0f} MiB, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'policy':<18}{'position':>10}{'ms/token':>10}{'RSS MiB':>10}{'cache MiB':>11}{'disk MiB':>10}")
    for spec in args.policies.split(","):
        policy, _, rep = spec.partition(":")
        extra = dict(block_size=args.block_size, top_k=args.top_k, memory_budget=args.budget,
                     representative=rep or "attention") if policy == "memory" else {}
        cache = model.make_cache(CacheConfig(policy, args.sinks, args.window, **extra))
        fed = 0
        for pos in positions:
            while fed < pos:
                step = min(4096, pos - fed)
                cache.run(model, ids[None, fed:fed + step].to(model.device))
                fed += step
            t0 = time.perf_counter()
            for _ in range(args.decode):
                cache.run(model, ids[None, fed:fed + 1].to(model.device))
                fed += 1
            ms = (time.perf_counter() - t0) / args.decode * 1e3
            print(f"{spec:<18}{pos:>10}{ms:>10.2f}{proc.memory_info().rss / 2**20:>10.0f}"
                  f"{cache.nbytes / 2**20:>11.1f}{getattr(cache, 'disk_bytes', 0) / 2**20:>10.0f}", flush=True)
        del cache


if __name__ == "__main__":
    main()
