"""`sinkstream eval recall`: what a cache keeps and what it forgets.

* Pass key: filler text with one planted sentence (``The pass key is K. Remember it. K is the pass key.``)
  at a chosen depth, then ``What is the pass key? The pass key is``; the reply is right when its first
  number is K. Accuracy by context length, depth and distance (tokens between the key and the question).
* StreamEval (Xiao et al. §4.3): LongEval-style lines ``line <i>: REGISTER_CONTENT is <n>`` streamed into
  one chat session, ten lines per user turn, each turn ending with a question about the line L lines
  back; the reply is right when its first number is n. Lines are generated from a seed, or read from a
  LongEval jsonl file.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..cache import CacheConfig
from ..errors import ContextOverflowError, SinkstreamError
from ..generate import stream_generate
from ..session import Session
from .common import cache_row

FILLER = ("The morning was grey and the road was long. A dog slept by the door of the inn. "
          "The carts went by, one after another, and nobody looked up. ")
INTRO = ("There is one important fact hidden in the long text below, among many unimportant sentences. "
         "Find it and remember it, because I will ask you about it at the end.\n\n")
KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> int | None:
    m = _NUMBER.search(text)
    return int(m.group()) if m else None


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """(prompt ids of about `length` tokens with the key at `depth` in the filler, tokens from key to end)."""
    per = len(tokenizer.encode(FILLER, add_special_tokens=False))
    fixed = len(tokenizer.encode(INTRO + KEY.format(key=key) + QUESTION, add_special_tokens=False))
    reps = max(1, (length - fixed) // per)
    before = round(reps * min(max(depth, 0.0), 1.0))
    head = INTRO + FILLER * before
    text = head + KEY.format(key=key) + FILLER * (reps - before) + QUESTION
    ids = tokenizer.encode(text, add_special_tokens=False)
    key_at = len(tokenizer.encode(head, add_special_tokens=False))
    return ids, len(ids) - key_at


def passkey(model, tokenizer, configs: list[CacheConfig], *, lengths: list[int], depths: list[float],
            trials: int = 2, seed: int = 0, max_tokens: int = 8, progress=None) -> list[dict]:
    """Accuracy per cache, context length and depth. Dense is skipped past the model's context."""
    rng = random.Random(seed)
    cases = [(length, depth, rng.randint(10000, 99999)) for length in lengths for depth in depths
             for _ in range(trials)]
    rows = []
    total = len(cases) * len(configs)
    bar = progress("passkey") if progress else None
    done = 0
    for cfg in configs:
        cells: dict[tuple, dict] = {}
        for length, depth, key in cases:
            ids, distance = passkey_prompt(tokenizer, length, depth, key)
            cell = cells.setdefault((length, depth), {**cache_row(cfg), "length": length, "depth": depth,
                                                      "tokens": len(ids), "distances": [], "correct": 0,
                                                      "trials": 0, "answers": []})
            done += 1
            if cfg.policy == "dense" and len(ids) + max_tokens > model.max_context:
                cell["note"] = f"longer than the model's context ({model.max_context})"
                continue
            reply = "".join(r.text for r in stream_generate(model, tokenizer, ids, cache=model.make_cache(cfg),
                                                             max_tokens=max_tokens))
            cell["trials"] += 1
            cell["distances"].append(distance)
            cell["correct"] += first_number(reply) == key
            cell["answers"].append(reply.strip()[:40])
            if bar is not None:
                bar(done, total)
        for cell in cells.values():
            d = cell.pop("distances")
            cell["distance"] = round(sum(d) / len(d)) if d else None
            cell["accuracy"] = cell["correct"] / cell["trials"] if cell["trials"] else None
            rows.append(cell)
    return [r for r in rows if r["accuracy"] is not None] + [r for r in rows if r["accuracy"] is None]


# --- StreamEval -----------------------------------------------------------------------------------------
LINE = "line {label}: REGISTER_CONTENT is <{value}>"
_LINE_RE = re.compile(r"line ([^\s:]+): REGISTER_CONTENT is <(\d+)>")
PREAMBLE = ("Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
            "contains a REGISTER_CONTENT at the end of the line as a number. For each line index, memorize its "
            "REGISTER_CONTENT. I will send the record a few lines at a time and ask about earlier lines.\n\n")


def generated_lines(n: int, *, seed: int = 0) -> list[tuple[str, int]]:
    """n lines with labels 1..n and random 5-digit contents (no data files needed)."""
    rng = random.Random(seed)
    return [(str(i + 1), rng.randint(10000, 99999)) for i in range(n)]


def lines_from_file(path: str | Path) -> list[tuple[str, int]]:
    """Every distinct line of a LongEval lines jsonl (fields `prompt`), in file order."""
    seen, out = set(), []
    try:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                if raw.strip():
                    for label, value in _LINE_RE.findall(json.loads(raw).get("prompt", "")):
                        if label not in seen:
                            seen.add(label)
                            out.append((label, int(value)))
    except (OSError, json.JSONDecodeError) as e:
        raise SinkstreamError(f"cannot read LongEval lines from {path}: {e}") from None
    if not out:
        raise SinkstreamError(f"{path} has no LongEval lines ('line X: REGISTER_CONTENT is <N>')")
    return out


def streameval(model, tokenizer, configs: list[CacheConfig], pool: list[tuple[str, int]], *,
               distances: list[int], n_lines: int = 100, query_every: int = 10, max_tokens: int = 40,
               progress=None) -> tuple[list[dict], list[dict]]:
    """Accuracy per cache and distance L; one session per (cache, L) streams `n_lines` lines.

    After every `query_every` lines the turn asks for the line L lines before the end of the stream so
    far. Returns (summary rows, one row per question).
    """
    lines = pool[:n_lines]
    if len(lines) < n_lines:
        raise SinkstreamError(f"only {len(lines)} lines available, {n_lines} requested")
    summary, queries = [], []
    for cfg in configs:
        for dist in distances:
            bar = progress(f"streameval {cfg.describe()} L={dist}") if progress else None
            s = Session(model, tokenizer, cfg)
            pos: list[int] = []  # approximate stream position of each line
            correct = asked = 0
            tok_dist: list[int] = []
            overflow = None
            for start in range(0, n_lines, query_every):
                block = lines[start:start + query_every]
                text = PREAMBLE if start == 0 else ""
                for label, value in block:
                    # approximate: the chat template adds a few tokens before the text
                    pos.append(s.cache.seen + len(tokenizer.encode(text, add_special_tokens=False)))
                    text += LINE.format(label=label, value=value) + "\n"
                target = start + len(block) - dist
                ask = target >= 0
                if ask:
                    label, value = lines[target]
                    text += f"\nWhat is the REGISTER_CONTENT in line {label}? Answer with the number only."
                else:  # nothing that far back yet: the turn only streams lines
                    text += "\nMore lines will follow. Reply with OK."
                seen0 = s.cache.seen
                try:
                    rs = list(s.chat(text, max_tokens=max_tokens if ask else 4))
                except ContextOverflowError as e:
                    overflow = str(e)
                    break
                if not ask:
                    continue
                reply = "".join(r.text for r in rs)
                ok = first_number(reply) == value
                d = seen0 + (rs[0].prompt_tokens if rs else 0) - pos[target]
                correct += ok
                asked += 1
                tok_dist.append(d)
                queries.append({**cache_row(cfg), "distance_lines": dist, "line": label, "expected": value,
                                "reply": reply.strip()[:60], "correct": ok, "distance_tokens": d})
                if bar is not None:
                    bar(start + len(block), n_lines)
            row = {**cache_row(cfg), "distance_lines": dist,
                   "distance_tokens": round(sum(tok_dist) / len(tok_dist)) if tok_dist else None,
                   "correct": correct, "queries": asked, "accuracy": correct / asked if asked else None}
            if overflow:
                row["note"] = overflow
            summary.append(row)
    return summary, queries
