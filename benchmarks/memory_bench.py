"""Decode speed and memory of `memory` vs `sink` at the same window, against stream position.

Every policy reads the same stream in lockstep: chunked prefill to each position, then single-token decode
steps timed there, alternating between policies so the ratio to `sink` is measured under the same load.
Prints ms/token, the ratio, the process RSS, the cache's RAM bytes, the bytes spilled to disk, and how
many blocks + index pages each decode step copied into the recall buffers (all layers: the churn of the
selection, which a random model maximises).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_bench.py --positions 1000,4000 --budget 64M
    # long streams, RAM bounded by spilling, on a tiny random model (SmolLM2 would need hours on a CPU):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_bench.py --tiny --positions 1000,100000,1000000 \\
        --policies sink,memory --budget 16M
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


def loads_of(cache) -> int:
    """Blocks and pages copied into the recall buffers so far, summed over layers (0 for other policies)."""
    return sum(sum(layer.loads) for layer in cache.layers if hasattr(layer, "loads"))


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
    ap.add_argument("--quant", default="none", help="SmolLM2's weights: none, int8, int4 (see sinkstream.quant)")
    args = ap.parse_args()
    model, tok = (tiny_model(), None) if args.tiny else sinkstream.load(quiet=True, quant=args.quant)
    positions = [int(float(p)) for p in args.positions.split(",")]
    ids = stream_tokens_of(tok, positions[-1] + args.decode * len(positions), model.config.vocab_size)
    proc = psutil.Process(os.getpid())
    print(f"{'tiny random model' if args.tiny else 'SmolLM2-135M'}, cache {args.sinks}+{args.window}, block "
          f"{args.block_size}, top-k {args.top_k}, weights {args.quant}, memory budget {args.budget / 2**20:.0f} MiB, "
          f"{torch.get_num_threads()} thread(s)")
    specs = args.policies.split(",")
    caches = {}
    for spec in specs:
        policy, _, rep = spec.partition(":")
        extra = dict(block_size=args.block_size, top_k=args.top_k, memory_budget=args.budget,
                     representative=rep or "attention") if policy == "memory" else {}
        caches[spec] = model.make_cache(CacheConfig(policy, args.sinks, args.window, **extra))
    # All policies advance in lockstep and decode steps alternate between them, so a ratio is measured
    # under the same machine load. RSS is the whole process (every cache; `sink`'s is a few MiB).
    print(f"{'position':>10}{'policy':>18}{'ms/token':>10}{'x sink':>8}{'RSS MiB':>9}{'cache MiB':>11}"
          f"{'disk MiB':>10}{'prefill s':>11}{'loads/step':>12}")
    fed = 0
    for pos in positions:
        t0 = time.perf_counter()
        while fed < pos:
            step = min(4096, pos - fed)
            for cache in caches.values():
                cache.run(model, ids[None, fed:fed + step].to(model.device))
            fed += step
        prefill = time.perf_counter() - t0
        spent = dict.fromkeys(specs, 0.0)
        loads0 = {spec: loads_of(cache) for spec, cache in caches.items()}
        for i in range(args.decode):
            x = ids[None, fed + i:fed + i + 1].to(model.device)
            for spec, cache in caches.items():
                t = time.perf_counter()
                cache.run(model, x)
                spent[spec] += time.perf_counter() - t
        fed += args.decode
        base = spent.get("sink")
        for spec, cache in caches.items():
            ratio = f"{spent[spec] / base:>8.2f}" if base else f"{'':>8}"
            print(f"{pos:>10}{spec:>18}{spent[spec] / args.decode * 1e3:>10.2f}{ratio}"
                  f"{proc.memory_info().rss / 2**20:>9.0f}{cache.nbytes / 2**20:>11.1f}"
                  f"{getattr(cache, 'disk_bytes', 0) / 2**20:>10.0f}{prefill:>11.0f}"
                  f"{(loads_of(cache) - loads0[spec]) / args.decode:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
