"""Profile 10 decode steps of sink(4,1020) and memory(4,1020, top-4 blocks of 64) at 6,000 tokens (1 thread):
total ms per step and the heaviest aten ops, to see what the retrieval memory adds per step.

    .venv/bin/python benchmarks/memory_profile.py
"""
import torch, time, sinkstream
from sinkstream.cache import CacheConfig
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(1)
model, tok = sinkstream.load()
ids = torch.randint(0, 40000, (1, 8000))
x = ids[:, 100:101]
with torch.inference_mode():
  for cfg in [CacheConfig("sink", sinks=4, window=1020), CacheConfig("memory", sinks=4, window=1020, block_size=64, top_k=4)]:
    c = model.make_cache(cfg); c.run(model, ids[:, :6000])
    for _ in range(3): c.run(model, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10): c.run(model, x)
    ev = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
    top = sorted(ev.items(), key=lambda kv: -kv[1][0])[:14]
    print(cfg.policy, round(sum(v[0] for v in ev.values())/1e4,1), [(k.replace('aten::',''), round(v[0]/1e4,1), v[1]//10) for k,v in top])
