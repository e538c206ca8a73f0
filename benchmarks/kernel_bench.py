"""The CPU kernels alone, on the shapes of real models: the time of one decode step's products and attention.

    .venv/bin/python benchmarks/kernel_bench.py [--shape smollm2|1b] [--rows 1,8] [--threads 2]

- products: every projection of every layer once (random weights of the shape's sizes), `--rows` activation
  rows a call (1: one stream; 8: a batch of 8), int4 through `QuantLinear` (q4_mm) and float32 through
  `sinkstream.linear.Linear` (f32_mm) against torch's F.linear; best of 5 passes, with the GB/s of weights.
- attention: `decode_attention` of one token over a 2,048-key cache of each layer in turn (float32 and
  bfloat16 KV), best of 5 passes, per layer.

Only our kernels and torch run, so it also runs against an older checkout (``PYTHONPATH=that checkout``)
for before/after figures. Nothing else may run meanwhile: spin-waiting thread pools.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sinkstream import kernels
from sinkstream.quant import QuantLinear, QuantWeight

SHAPES = {  # (hidden, ffn, heads, kv heads, head dim, layers, vocab)
    "smollm2": (576, 1536, 9, 3, 64, 30, 49152),
    "1b": (2048, 5632, 32, 4, 64, 22, 49152),
}


def best(fn, n: int = 5) -> float:
    fn()
    out = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--rows", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    assert kernels.load(), "the kernels are not built"
    hidden, ffn, heads, kvh, hd, layers, _ = SHAPES[args.shape]
    mats = [(heads * hd + 2 * kvh * hd, hidden), (hidden, heads * hd), (2 * ffn, hidden), (hidden, ffn)]
    g = torch.Generator().manual_seed(0)
    q4 = [[QuantLinear(QuantWeight("int4", torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                                   torch.rand(n, k // 32, generator=g) / 10, torch.randn(n, k // 32, generator=g) / 10,
                                   32)) for n, k in mats] for _ in range(layers)]
    f32 = [[torch.randn(n, k, generator=g) for n, k in mats] for _ in range(layers)]
    q4_mb = sum(n * k for n, k in mats) * layers * (0.5 + 4 / 32) / 1e6
    f32_mb = sum(n * k for n, k in mats) * layers * 4 / 1e6
    print(f"{args.shape}: {layers} layers, projections {mats}, {args.threads} threads")
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g) for _, k in mats}
        t = best(lambda: [lin._few(xs[lin.in_features]) for layer in q4 for lin in layer])
        print(f"  products int4 (q4_mm), {m} row(s): {t * 1e3:7.2f} ms a step ({q4_mb / t / 1e3:.1f} GB/s)")
        for name, fn in [("F.linear", F.linear)] + ([("f32_mm", lambda x, w: torch.ops.sinkstream.f32_mm(x, w))]
                                                     if hasattr(torch.ops.sinkstream, "f32_mm") else []):
            t = best(lambda: [fn(xs[w.shape[1]], w) for layer in f32 for w in layer])
            print(f"  products float32 ({name}), {m} row(s): {t * 1e3:7.2f} ms a step ({f32_mb / t / 1e3:.1f} GB/s)")
    q = torch.randn(1, kvh, heads // kvh, hd, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        kv = [(torch.randn(1, kvh, 2048, hd, generator=g).to(dtype), torch.randn(1, kvh, 2048, hd, generator=g).to(dtype))
              for _ in range(layers)]
        t = best(lambda: [torch.ops.sinkstream.decode_attention(q, k, v, hd ** -0.5) for k, v in kv])
        print(f"  attention over 2048 keys, {str(dtype)[6:]} KV: {t / layers * 1e6:7.1f} us a layer")


if __name__ == "__main__":
    main()
