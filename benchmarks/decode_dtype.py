"""Decode ms/token of SmolLM2 in float32 vs bfloat16 at a full 4+2044 sink cache (1 thread): on CPUs
without fast bf16 matrix-vector kernels bf16 decodes more slowly even though it prefills faster.

    .venv/bin/python benchmarks/decode_dtype.py
"""
import torch, time, sinkstream, sys
from sinkstream.cache import CacheConfig
torch.set_num_threads(1)
for dt in ["float32","bfloat16"]:
    model, tok = sinkstream.load(dtype=dt)
    cache = model.make_cache(CacheConfig("sink", sinks=4, window=2044))
    ids = torch.randint(0, 40000, (1, 3000))
    with torch.inference_mode():
        cache.run(model, ids[:, :2100])
        x = ids[:, 2900:2901]
        for _ in range(3): cache.run(model, x)
        t=time.perf_counter()
        for _ in range(20): cache.run(model, x)
        print(dt, "ms/token", (time.perf_counter()-t)*50)
