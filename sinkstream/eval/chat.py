"""`sinkstream eval chat`: MT-Bench-style questions, every turn in ONE endless session per cache policy.

Per turn: reply length, latency, tokens in cache. A reply is degenerate when it has fewer than 3 words
or falls into a loop (a span of words repeated back to back, at least 3 times and 12 words in all).
`dense` stops when the model's context is full; `window` tends to degrade once the first tokens leave;
`sink` should do neither.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..cache import CacheConfig
from ..errors import ContextOverflowError, SinkstreamError
from ..sampling import SamplingConfig
from ..session import Session
from .common import DATA, cache_row

SAMPLE = DATA / "chat_sample.jsonl"


def read_questions(path: str | Path | None, *, limit: int | None = None) -> list[list[str]]:
    """The `turns` of every line of a JSONL file (MT-Bench's question.jsonl has this shape)."""
    path = Path(path) if path else SAMPLE
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                turns = json.loads(raw).get("turns")
                if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                    raise SinkstreamError(f"{path}:{n}: expected a `turns` list of strings")
                out.append(turns)
    except OSError as e:
        raise SinkstreamError(f"cannot read questions from {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise SinkstreamError(f"{path} is not valid JSONL: {e}") from None
    if not out:
        raise SinkstreamError(f"{path} has no questions")
    return out[:limit] if limit else out


def has_loop(words: list[str], *, min_repeats: int = 3, min_words: int = 12, max_span: int = 24) -> bool:
    """True when some span of n words repeats back to back >= min_repeats times, covering >= min_words."""
    for n in range(1, max_span + 1):
        need = max(min_repeats, -(-min_words // n)) * n  # length of the periodic stretch
        run = 0
        for j in range(len(words) - n):
            run = run + 1 if words[j] == words[j + n] else 0
            if run + n >= need:
                return True
    return False


def judge(text: str) -> tuple[bool, bool]:
    """(too short, looping) for one reply."""
    words = [w.strip(".,;:!?\"'()").lower() for w in text.split()]
    words = [w for w in words if w]
    return len(words) < 3, has_loop(words)


def evaluate(model, tokenizer, configs: list[CacheConfig], questions: list[list[str]], *, max_tokens: int = 128,
             sampling: SamplingConfig | None = None, system: str | None = None,
             progress=None) -> tuple[list[dict], list[dict]]:
    """Feed every turn of every question into one session per cache. Returns (summary rows, turn rows)."""
    turns = [t for q in questions for t in q]
    summary, rows = [], []
    for cfg in configs:
        s = Session(model, tokenizer, cfg, sampling or SamplingConfig(), system=system)
        bar = progress(f"chat {cfg.describe()}") if progress else None
        overflow = None
        mine = []
        for i, message in enumerate(turns, 1):
            t0 = time.perf_counter()
            try:
                rs = list(s.chat(message, max_tokens=max_tokens))
            except ContextOverflowError:
                overflow = i
                break
            latency = time.perf_counter() - t0
            reply = "".join(r.text for r in rs)
            short, loop = judge(reply)
            mine.append({**cache_row(cfg), "turn": i, "reply_tokens": rs[-1].generation_tokens if rs else 0,
                         "reply_words": len(reply.split()), "latency_s": round(latency, 3),
                         "tokens_cached": s.cache.cached, "tokens_seen": s.cache.seen, "short": short,
                         "loop": loop, "degenerate": short or loop, "reply": reply.strip()[:80]})
            if bar is not None:
                bar(i, len(turns))
        if bar is not None:
            bar(len(turns), len(turns))
        rows += mine
        n = len(mine)
        summary.append({**cache_row(cfg), "turns_total": len(turns), "turns_done": n, "overflow_at": overflow,
                        "degenerate": sum(r["degenerate"] for r in mine), "short": sum(r["short"] for r in mine),
                        "loops": sum(r["loop"] for r in mine),
                        "mean_reply_tokens": sum(r["reply_tokens"] for r in mine) / n if n else None,
                        "mean_latency_s": sum(r["latency_s"] for r in mine) / n if n else None,
                        "final_cached": s.cache.cached, "tokens_seen": s.cache.seen,
                        "capacity": s.cache.capacity})
    return summary, rows
