"""Issue 2 acceptance benchmark: constant time and memory per token, and speed against baselines.

Prints, from one run on one machine:
  * sink(S, W) decode ms/token and process RSS at stream positions 1K, 10K, 100K (positions are reached by
    chunked prefill, then `--steps` decode steps are timed there); ratio of the last to the first;
  * HF transformers dense decoding ms/token at 2K context (same weights, same process); ours / HF, for
    ours in float32 (the same weights and dtype as HF) and with int4 weights (`--hf-ours`; the GGUF's own
    4-bit precision, as llama.cpp runs it, see sinkstream/quant.py);
  * recompute(W2) vs sink(4, W2-4) decode ms/token at a full window; ratio.

    .venv/bin/python benchmarks/bench_core.py                      # the full run (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_core.py --positions 1000,3000 --steps 8   # a quick check
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import psutil
import torch

import sinkstream
from sinkstream import CacheConfig
from sinkstream.loading import resolve


def rss_mib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_decode(step, steps: int, device) -> float:
    """Median ms per call of `step()` over `steps` calls, after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def stream_tokens(tok, n: int) -> torch.Tensor:
    """n token ids of real text (the bundled sample, repeated as needed)."""
    from pathlib import Path
    text = (Path(sinkstream.__file__).parent / "data" / "pride_and_prejudice_excerpt.txt").read_text()
    ids = torch.tensor(tok.encode(text))
    return ids.repeat(n // len(ids) + 1)[:n]


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=2044)
    p.add_argument("--positions", default="1000,10000,100000")
    p.add_argument("--steps", type=int, default=24, help="decode steps timed at each position")
    p.add_argument("--hf-context", type=int, default=2048)
    p.add_argument("--quant", default="none", help="weights of the model in the positions/recompute sections")
    p.add_argument("--hf-ours", default="none,int4",
                   help="weight quantizations of our model timed against HF (comma-separated: none, int8, int4)")
    p.add_argument("--recompute-window", type=int, default=1024)
    p.add_argument("--recompute-steps", type=int, default=4)
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk used to reach far positions")
    p.add_argument("--sections", default="positions,hf,recompute",
                   help="which parts to run (comma-separated: positions, hf, recompute)")
    args = p.parse_args()

    model, tok = sinkstream.load(args.model, device=args.device, quant=args.quant)
    dev = model.device
    print(f"# model {model.source} | device {dev} | dtype {model.dtype} | quant {args.quant} "
          f"| torch threads {torch.get_num_threads()}")
    positions = [int(x) for x in args.positions.split(",")]
    ids = stream_tokens(tok, max(positions) + args.steps + 8).to(dev)
    x1 = ids[:1].view(1, 1)

    sections = set(args.sections.split(","))
    if "positions" in sections:
        positions_section(model, args, positions, ids, x1, dev)
    if "hf" in sections:
        hf_section(model, args, ids, x1, dev)
    if "recompute" in sections:
        recompute_section(model, args, ids, x1, dev)


def positions_section(model, args, positions, ids, x1, dev) -> None:
    """1. sink(S, W) at growing stream positions."""
    cache = model.make_cache(CacheConfig("sink", args.sinks, args.window, prefill_chunk=args.chunk))
    rows, done = [], 0
    t_prefill = time.perf_counter()
    for pos in positions:
        cache.run(model, ids[done:pos].view(1, -1))
        done = pos
        ms = time_decode(lambda: cache.run(model, x1), args.steps, dev)
        gc.collect()
        rows.append((pos, ms, rss_mib(), cache.cached, cache.seen))
    t_prefill = time.perf_counter() - t_prefill
    print(f"\n## sink({args.sinks},{args.window}): decode ms/token vs stream position")
    print(f"{'position':>10} {'ms/token':>9} {'RSS MiB':>8} {'cached':>7} {'seen':>8}")
    for pos, ms, rss, cached, seen in rows:
        print(f"{pos:>10} {ms:>9.2f} {rss:>8.0f} {cached:>7} {seen:>8}")
    print(f"ratio ms/token {rows[-1][0]} / {rows[0][0]}: {rows[-1][1] / rows[0][1]:.3f}")
    if len(rows) > 2:
        print(f"ratio ms/token {rows[-1][0]} / {rows[1][0]} (both with a full cache): {rows[-1][1] / rows[1][1]:.3f}")
    print(f"RSS growth {rows[0][0]} -> {rows[-1][0]}: {rows[-1][2] - rows[0][2]:+.0f} MiB")
    print(f"(prefill of {done} tokens took {t_prefill:.0f}s, {done / t_prefill:.0f} tok/s)")
    del cache
    gc.collect()


def hf_section(model, args, ids, x1, dev) -> None:
    """2. HF transformers dense decoding at 2K context, same weights, steps interleaved with ours (a full
    sink cache of the same size, for each of --hf-ours), so all see the same machine load."""
    from transformers import AutoModelForCausalLM, DynamicCache
    src = resolve(args.model)
    gguf = {"gguf_file": src.name} if src.is_file() else {}  # transformers' reader de-quantizes it
    hf = AutoModelForCausalLM.from_pretrained(str(src.parent if gguf else src), dtype=model.dtype, **gguf)
    hf = hf.to(dev).eval()
    state = DynamicCache(config=hf.config)
    hf(ids[:args.hf_context].view(1, -1), past_key_values=state, use_cache=True)
    runs = {"HF dense": (lambda: hf(x1, past_key_values=state, use_cache=True), [])}
    for quant in args.hf_ours.split(","):
        m = model if quant == (getattr(model, "quant", None) or "none") else \
            sinkstream.load(args.model, device=args.device, dtype=model.dtype, quant=quant, quiet=True)[0]
        ours = m.make_cache(CacheConfig("sink", args.sinks, args.window, prefill_chunk=args.chunk))
        ours.run(m, ids[:2 * (args.sinks + args.window)].view(1, -1))  # full, and past its first eviction
        runs[f"ours {quant}"] = (lambda m=m, ours=ours: ours.run(m, x1), [])
    for i in range(args.steps + 2):
        for fn, acc in runs.values():
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            if i >= 2:
                acc.append(time.perf_counter() - t)
    ms = {name: statistics.median(acc) * 1e3 for name, (fn, acc) in runs.items()}
    print(f"\n## HF transformers dense decoding at {args.hf_context} context ({model.dtype}) vs ours "
          f"sink({args.sinks},{args.window}) with a full cache, interleaved steps")
    for name, v in ms.items():
        print(f"{name:>12}: {v:7.2f} ms/token | / HF: {v / ms['HF dense']:.3f}")
    del hf, state, runs
    gc.collect()


def recompute_section(model, args, ids, x1, dev) -> None:
    """3. recompute(W) vs sink(4, W-4) at a full window."""
    W = args.recompute_window
    sink = model.make_cache(CacheConfig("sink", 4, W - 4))
    sink.run(model, ids[:W + 64].view(1, -1))
    sink_ms = time_decode(lambda: sink.run(model, x1), args.steps, dev)
    rec = model.make_cache(CacheConfig("recompute", window=W))
    rec.run(model, ids[:W + 64].view(1, -1))
    rec_ms = time_decode(lambda: rec.run(model, x1), args.recompute_steps, dev)
    print(f"\n## recompute({W}) vs sink(4,{W - 4}) decode")
    print(f"sink {sink_ms:.2f} ms/token | recompute {rec_ms:.2f} ms/token | recompute / sink: {rec_ms / sink_ms:.1f}x")


if __name__ == "__main__":
    main()
