"""Bytes one `Session.save` writes for a `--cache memory` session (SmolLM2, fp32, the memory defaults): the
first save after an N-token stream (the whole log), then the save after one more 256-token turn (what the
turn evicted, plus the small session file). The second should not depend on N.

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_save.py 20000 [BUDGET]

(the malloc setting keeps glibc's heap from fragmenting while the memory cache is fed; without it RSS
grows far past the live tensors on long streams.)
"""
import os, resource, sys, time, tempfile
from pathlib import Path
import torch
import sinkstream
from sinkstream import CacheConfig, Session
model, tok = sinkstream.load(device="cpu", quiet=True)
text = (Path(sinkstream.__file__).parent / "data" / "pride_and_prejudice_excerpt.txt").read_text()
ids = tok.encode(text, add_special_tokens=False)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
s = Session(model, tok, CacheConfig("memory", memory_budget=int(sys.argv[2]) if len(sys.argv) > 2 else None))
d = Path(tempfile.mkdtemp(prefix="sinkstream-memory-save-"))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
fed, t0 = 0, time.time()
with torch.inference_mode():
    while fed < N:
        chunk = ids[: min(len(ids), N - fed, 2048)]
        s.cache.run(model, torch.tensor([chunk]))
        fed += len(chunk)
        print(f"  {fed} tokens, {time.time()-t0:.0f}s, max RSS {rss():.2f} GiB", flush=True)
print(f"fed {fed} tokens in {time.time()-t0:.0f}s, blocks {s.cache.blocks}, dtype {model.dtype}", flush=True)
written, real = [0], os.pwrite
def counting(fd, data, off):
    n = real(fd, data, off); written[0] += n; return n
os.pwrite = counting
def save():
    written[0] = 0
    t = time.time()
    s.save(d / "s.safetensors")
    return (d / "s.safetensors").stat().st_size, written[0], time.time() - t
for name, extra in (("save 1 (the whole stream so far)", 0), ("save 2 (after one more 256-token turn)", 256)):
    if extra:
        with torch.inference_mode():
            s.cache.run(model, torch.tensor([ids[:extra]]))
    f, w, t = save()
    print(f"{name}: session file {f/2**20:.1f} MiB + log appends {w/2**20:.1f} MiB = {(f+w)/2**20:.1f} MiB "
          f"in {t:.2f}s ({s.cache.seen} tokens, {s.cache.blocks} blocks)", flush=True)
