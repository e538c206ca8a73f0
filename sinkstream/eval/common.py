"""What every eval command shares: cache specs, reading token streams, output files, memory readings."""
from __future__ import annotations

from dataclasses import replace

import csv
import json
import os
import re
import sys
from pathlib import Path

import torch

from ..cache import POLICIES, CacheConfig
from ..errors import SinkstreamError

DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TEXT = DATA / "pride_and_prejudice_excerpt.txt"

_SPEC = re.compile(r"^\s*(\w+)\s*(?:[:(]\s*(\d+)\s*(?:[+,]\s*(\d+))?\s*\)?)?\s*$")


def parse_cache_specs(text: str, default: CacheConfig) -> list[CacheConfig]:
    """`"sink,window,dense,recompute"` or explicit sizes: `"sink:4+252,window:256,recompute:256,dense"`.

    A bare name takes its sizes from `default` (--sinks/--window); bare `window` and `recompute` get the
    same total cache size as the sink cache (sinks + window), as in the paper's comparisons.
    `sink:S+W` (or `sink(S,W)`), `memory:S+W`, `window:W`, `recompute:W` name the sizes; other settings
    (prefill chunk, memory block size, top-k, budget) come from `default`.
    """
    out = []
    for item in _split_parens(text):
        m = _SPEC.match(item)
        if not m or m.group(1) not in POLICIES:
            raise SinkstreamError(f"bad cache spec {item!r}: use one of {', '.join(POLICIES)}, "
                                  "optionally with sizes like sink:4+252, window:256, recompute:256")
        policy, a, b = m.group(1), m.group(2), m.group(3)
        try:
            if policy == "dense":
                cfg = replace(default, policy="dense", sinks=0, window=0)
            elif policy in ("sink", "memory"):  # memory keeps --block-size/--memory-* from `default`
                if a is not None and b is None:
                    raise SinkstreamError(f"bad cache spec {item!r}: a {policy} cache needs {policy}:SINKS+WINDOW")
                sinks, window = (int(a), int(b)) if a is not None else (default.sinks, default.window)
                cfg = replace(default, policy=policy, sinks=sinks, window=window)
            else:
                total = default.window + (default.sinks if default.policy in ("sink", "memory") else 0)
                cfg = replace(default, policy=policy, sinks=0, window=int(a) if a is not None else total)
        except ValueError as e:
            raise SinkstreamError(f"bad cache spec {item!r}: {e}") from None
        out.append(cfg)
    if not out:
        raise SinkstreamError("no cache policies given")
    return out


def _split_parens(text: str) -> list[str]:
    """Split on commas outside parentheses (for `sink(4,252),window(256)`)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [s.strip() for s in items + [cur] if s.strip()]


def cache_row(cfg: CacheConfig) -> dict:
    """How results name a cache: policy, sinks and window (dense has neither)."""
    if cfg.policy == "dense":
        return {"cache": "dense", "label": "dense", "sinks": 0, "window": None}
    sinks = cfg.sinks if cfg.policy in ("sink", "memory") else 0  # the policies that keep sinks
    return {"cache": cfg.policy, "label": cfg.describe(), "sinks": sinks, "window": cfg.window}


def read_text_files(paths: list[str | os.PathLike] | None) -> list[Path]:
    files = [Path(p) for p in paths] if paths else [DEFAULT_TEXT]
    for f in files:
        if not f.is_file():
            raise SinkstreamError(f"no such text file: {f}")
    return files


def read_tokens(tokenizer, paths: list[str | os.PathLike] | None, limit: int | None = None) -> torch.Tensor:
    """Token ids of the files concatenated in order (a blank line between files), at most `limit` ids.

    Text is encoded in pieces cut at line ends, so a multi-million-token stream never needs one huge
    tokenizer call and reading stops as soon as `limit` ids are there.
    """
    ids: list[int] = []
    for fi, f in enumerate(read_text_files(paths)):
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise SinkstreamError(f"cannot read {f}: {e}") from None
        if fi:
            text = "\n\n" + text
        pos = 0
        while pos < len(text) and (limit is None or len(ids) < limit):
            end = text.find("\n", pos + 200_000)
            end = len(text) if end < 0 else end + 1
            ids += tokenizer.encode(text[pos:end], add_special_tokens=False)
            pos = end
        if limit is not None and len(ids) >= limit:
            break
    if limit is not None:
        ids = ids[:limit]
    if len(ids) < 2:
        raise SinkstreamError("the text is too short: need at least 2 tokens")
    return torch.tensor(ids, dtype=torch.long)


def out_dir(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def emit(args, result: dict, lines: list[str]) -> None:
    """--json: one JSON object on stdout; otherwise the human-readable lines."""
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, default=_jsonable)
        sys.stdout.write("\n")
    else:
        print("\n".join(lines))


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def rss_bytes() -> int:
    """Resident memory of this process now (psutil if present, else /proc)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
    """Plain text table: cols = (key, header, format spec)."""
    def fmt(v, spec):
        if v is None:
            return "-"
        return format(v, spec) if spec else str(v)
    cells = [[h for _, h, _ in cols]] + [[fmt(r.get(k), s) for k, _, s in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
