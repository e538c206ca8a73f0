"""`sinkstream bench`: decode latency and process memory against stream position, per cache policy.

Far positions are reached by chunked prefill (exact, fast; its tokens/s is reported), then a few single
tokens are decoded and timed there. Token ids are random: speed does not depend on the text. `recompute`
costs the same at every position (it re-encodes the last W tokens per token), so it is timed once, at
position W. Peers (optional): HF transformers dense decoding on the same weights, llama-cpp-python on the
same GGUF when that package is installed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time

import torch

from ..cache import CacheConfig
from .common import cache_row, rss_bytes

MiB = 2 ** 20


def default_points(tokens: int) -> list[int]:
    """1K, 3K, 10K, 30K, ... up to `tokens` (which is always the last point)."""
    pts, base = [], 1000
    while base < tokens:
        pts += [p for p in (base, 3 * base) if p < tokens]
        base *= 10
    return pts + [tokens]


def _timed_decode(step, first_token: int, steps: int, warmup: int = 2) -> float:
    """Median ms per step of `step(token) -> next token` (the int conversion waits for the device)."""
    tok = first_token
    for _ in range(warmup):
        tok = step(tok)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = step(tok)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def run(model, configs: list[CacheConfig], *, tokens: int = 100_000, points: list[int] | None = None,
        decode_steps: int = 16, chunk: int = 512, seed: int = 0, progress=None) -> list[dict]:
    """One row per (cache, position): decode ms/token, RSS, cache bytes, prefill tokens/s on the way."""
    points = sorted(points or default_points(tokens))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    dev = model.device
    rows = []
    for cfg in configs:
        cfg = dataclasses.replace(cfg, prefill_chunk=chunk)  # keeps the memory settings
        cache = model.make_cache(cfg)

        def step(tok: int) -> int:
            return int(cache.run(model, torch.tensor([[tok]], device=dev))[0, -1].argmax())

        if cfg.policy == "recompute":
            cache.run(model, torch.randint(vocab, (1, cfg.window), generator=gen).to(dev))
            ms = _timed_decode(step, 0, decode_steps)
            rows.append({**cache_row(cfg), "position": cfg.window, "ms_per_token": ms, "rss_mib": rss_bytes() / MiB,
                         "cache_mib": cache.nbytes / MiB, "prefill_tps": None,
                         "note": "same at every position (re-encodes the last W tokens per token)"})
            continue
        bar = progress(f"bench {cfg.describe()}") if progress else None
        for p in points:
            if cfg.policy == "dense" and p + decode_steps + 2 > model.max_context:
                rows.append({**cache_row(cfg), "position": p, "ms_per_token": None, "rss_mib": None,
                             "cache_mib": None, "prefill_tps": None,
                             "note": f"context full ({model.max_context} tokens)"})
                break
            need, t0, fed = p - cache.seen, time.perf_counter(), 0
            while fed < need:
                n = min(chunk, need - fed)
                out = cache.run(model, torch.randint(vocab, (1, n), generator=gen).to(dev))
                fed += n
                if bar is not None:
                    bar(cache.seen, points[-1])
            tps = None
            if fed:
                float(out[0, -1, 0])  # wait for the device before reading the clock
                tps = fed / (time.perf_counter() - t0)
            ms = _timed_decode(step, 0, decode_steps)
            rows.append({**cache_row(cfg), "position": p, "ms_per_token": ms, "rss_mib": rss_bytes() / MiB,
                         "cache_mib": cache.nbytes / MiB, "prefill_tps": tps, "note": ""})
        if bar is not None:
            bar(points[-1], points[-1])
        del cache
    return rows


def summarize(rows: list[dict]) -> dict:
    """Flatness (last/first ms and RSS per cache) and the speed-up of each cache over recompute."""
    out: dict = {}
    timed = [r for r in rows if r.get("ms_per_token") is not None]
    for label in dict.fromkeys(r["label"] for r in timed):
        pts = [r for r in timed if r["label"] == label]
        if len(pts) > 1:
            out[f"{label} ms/token ratio {pts[-1]['position']}/{pts[0]['position']}"] = (
                pts[-1]["ms_per_token"] / pts[0]["ms_per_token"])
            out[f"{label} RSS MiB growth {pts[0]['position']}->{pts[-1]['position']}"] = (
                pts[-1]["rss_mib"] - pts[0]["rss_mib"])
    for rec in (r for r in timed if r["cache"] == "recompute"):
        for label in dict.fromkeys(r["label"] for r in timed if r["cache"] in ("sink", "window")):
            pts = [r for r in timed if r["label"] == label]
            ms = statistics.median(r["ms_per_token"] for r in pts)
            out[f"{rec['label']} / {label} ms per token"] = rec["ms_per_token"] / ms
    return out


# --- peers ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def peer_rows(model_arg, *, positions: list[int], max_position: int = 8192, decode_steps: int = 16,
              seed: int = 0, progress=None) -> list[dict]:
    """HF transformers dense decoding on the same weights; llama-cpp-python on the GGUF when installed."""
    from ..loading import resolve
    src = resolve(model_arg)
    positions = sorted({p for p in positions if p + decode_steps + 2 < max_position})
    rows = _hf_rows(src, positions, decode_steps, seed)
    if importlib.util.find_spec("llama_cpp") is None:
        rows.append({"cache": "peer", "label": "llama-cpp-python", "sinks": None, "window": None, "position": None,
                     "ms_per_token": None, "rss_mib": None, "cache_mib": None, "prefill_tps": None,
                     "note": "not installed: row skipped"})
    elif src.is_file():
        rows += _llama_cpp_rows(src, positions, decode_steps, seed)
    return rows


def _hf_rows(src, positions, decode_steps, seed) -> list[dict]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    import inspect
    # a GGUF through transformers' own reader (de-quantized to float32), as a HF user would run it
    gguf = {"gguf_file": src.name} if src.is_file() else {}
    hf = AutoModelForCausalLM.from_pretrained(str(src.parent if gguf else src), dtype=torch.float32, **gguf).eval()
    # transformers renamed `past_key_values` to `cache` during 5.x; use whichever this version takes
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in positions:
        ids = torch.randint(hf.config.vocab_size, (1, p), generator=gen)
        t0 = time.perf_counter()
        out = hf(ids, use_cache=True)
        tps = p / (time.perf_counter() - t0)
        state = {"past": _hf_cache(out)}

        def step(tok: int) -> int:
            o = hf(torch.tensor([[tok]]), **{cache_kw: state["past"]}, use_cache=True)
            state["past"] = _hf_cache(o)
            return int(o.logits[0, -1].argmax())

        ms = _timed_decode(step, int(out.logits[0, -1].argmax()), decode_steps)
        rows.append({"cache": "peer", "label": "transformers dense", "sinks": None, "window": None, "position": p,
                     "ms_per_token": ms, "rss_mib": rss_bytes() / MiB, "cache_mib": None, "prefill_tps": tps,
                     "note": "HF transformers, same weights, DynamicCache"})
        del state, out
    return rows


def _hf_cache(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def _llama_cpp_rows(gguf_path, positions, decode_steps, seed) -> list[dict]:
    from llama_cpp import Llama  # optional peer, never a dependency
    llm = Llama(model_path=str(gguf_path), n_ctx=max(positions) + decode_steps + 8, verbose=False, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in positions:
        llm.reset()
        ids = torch.randint(llm.n_vocab(), (p,), generator=gen).tolist()
        t0 = time.perf_counter()
        llm.eval(ids)
        tps = p / (time.perf_counter() - t0)

        def step(tok: int) -> int:
            llm.eval([tok])
            return int(llm.scores[llm.n_tokens - 1].argmax())

        ms = _timed_decode(step, ids[-1], decode_steps)
        rows.append({"cache": "peer", "label": "llama-cpp-python", "sinks": None, "window": None, "position": p,
                     "ms_per_token": ms, "rss_mib": rss_bytes() / MiB, "cache_mib": None, "prefill_tps": tps,
                     "note": "llama.cpp on the same GGUF (quantized weights)"})
    return rows
