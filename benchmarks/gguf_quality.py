"""Perplexity of a GGUF on its own quantized weights against the same file de-quantized to float32.

    .venv/bin/python benchmarks/gguf_quality.py [--models smollm2,gemma3-270m] [--tokens 2048] [--text FILE]

Text: the bundled excerpt unless --text names another file. Dense cache, prefill chunks of 256. Prints
perplexity for quant none (float32), auto (the file's own quantization, our kernels), int8 and int4.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import sinkstream
from sinkstream import CacheConfig
from sinkstream.perplexity import mean_nll, stream_nll


def ppl(model, ids: torch.Tensor) -> float:
    return math.exp(mean_nll(stream_nll(model, model.make_cache(CacheConfig("dense", prefill_chunk=256)), ids)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma3-270m")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--quants", default="none,auto,int8,int4")
    p.add_argument("--text", default=str(Path(sinkstream.__file__).parent / "data" / "pride_and_prejudice_excerpt.txt"))
    args = p.parse_args()
    text = Path(args.text).read_text()
    for name in args.models.split(","):
        ref = None
        for quant in args.quants.split(","):
            t = time.perf_counter()
            model, tok = sinkstream.load(name, device="cpu", dtype="float32", quant=quant, quiet=True)
            ids = torch.tensor(tok.encode(text)[:args.tokens])
            value = ppl(model, ids)
            ref = value if quant == "none" else ref
            rel = "" if ref is None or quant == "none" else f"  ({(value / ref - 1) * 100:+.2f}% vs none)"
            print(f"{name:12s} {len(ids)} tokens  quant {quant:5s} ({model.quant}): ppl {value:.4f}{rel}"
                  f"  [{time.perf_counter() - t:.0f} s]", flush=True)
            del model


if __name__ == "__main__":
    main()
