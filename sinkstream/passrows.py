"""Which rows of a pass that packs several streams' tokens (sinkstream.batch) take the few-token kernels,
and how the others split between the streams, so that each stream's numbers are those of its own pass.

Quantized and float layers (sinkstream.quant, sinkstream.linear) ask `few_rows` and `many_splits` with the
row count of their input; `rows_by_stream` answers for a pass's tokens and for the rows that get logits.
"""
from __future__ import annotations

import bisect
import contextlib
import contextvars

import torch

# Passes with at least this many tokens (prefill) go through a matrix multiply library rather than our
# few-row kernels: float32 layers (torch's sgemm against f32_mm), and quantized ones, which de-quantize a
# slice of rows at a time to bfloat16 (oneDNN; AMX where the CPU has it). Below it the kernels are faster
# (the quantized threshold: benchmarks/prompt_steps.py, docs/RESULTS.md "Many sessions at once").
MANY_TOKENS = 16
QUANT_MANY_TOKENS = 64


# A pass that packs several streams' tokens (sinkstream.batch) sets, per row count of the activations it
# multiplies (all tokens; the rows that get logits), the size of the pass each row would be in if its stream
# were fed alone. A layer with threshold `many` sends rows of passes smaller than `many` to its kernel and
# the others to the matrix multiply, as alone: a stream's numbers do not depend on who shares its pass or on
# how its prompt is split between steps.
_ROW_GROUPS: contextvars.ContextVar = contextvars.ContextVar("sinkstream_row_groups", default=None)


def alone_sizes(chunks: list[tuple[int, int, int, int]]) -> list[int]:
    """For packed tokens given as (first offset, count, stream length, the stream's chunk size) per stream:
    the size of the pass each token would be in if its stream were fed alone (in chunks of its chunk size
    from offset 0)."""
    out = []
    for start, n, total, chunk in chunks:
        for o in range(start, start + n):
            out.append(min(chunk, total - (o // chunk) * chunk))
    return out


class _Group:
    """The rows of one row count: their alone-pass sizes, the stream each belongs to; per threshold, which
    rows are few-row rows and how the others split by stream (worked out once per pass and threshold)."""

    def __init__(self, sizes: list[int], stream: list[int], streams: int):
        self.sizes, self.stream, self.streams = sizes, stream, streams
        self.memo: dict[int, tuple] = {}

    def answer(self, many: int) -> tuple:
        hit = self.memo.get(many)
        if hit is None:
            marks = [n < many for n in self.sizes]
            few = True if all(marks) else False if not any(marks) else torch.tensor(marks, dtype=torch.bool)
            splits = None
            if self.streams > 1:
                counts = [0] * self.streams
                for m, st in zip(marks, self.stream):
                    if not m:
                        counts[st] += 1
                counts = [c for c in counts if c]
                splits = counts if len(counts) > 1 else None
            hit = self.memo[many] = (few, splits)
        return hit


@contextlib.contextmanager
def rows_by_stream(alone: list[int], rows: list[int] | None = None, sizes: list[int] | None = None):
    """Within the block, a layer multiplying packed tokens whose alone-pass sizes are `alone` (see
    `alone_sizes`), or the `rows` of them that get logits, computes each row as its stream would alone.
    `sizes`: the streams' token counts in packing order, which lets the matrix multiply of the rows that are
    not few-row rows run stream by stream (`many_splits`)."""
    starts = [0]
    for size in sizes or []:
        starts.append(starts[-1] + size)
    streams = len(starts) - 1

    def group(picked) -> _Group:
        stream = [bisect.bisect_right(starts, r) - 1 for r in picked] if streams > 1 else [0] * len(picked)
        return _Group([alone[r] for r in picked], stream, streams)

    groups = {len(alone): group(range(len(alone)))}
    if rows is not None and len(rows) != len(alone):
        groups[len(rows)] = group(rows)
    token = _ROW_GROUPS.set(groups)
    try:
        yield
    finally:
        _ROW_GROUPS.reset(token)


def few_rows(n: int, many: int = MANY_TOKENS) -> bool | torch.Tensor:
    """Whether each of the n rows of a layer's input takes the few-row kernels of a layer whose threshold is
    `many`: True or False for all of them, or a mask; inside `rows_by_stream`, as each row's stream would
    alone, else by n."""
    groups = _ROW_GROUPS.get()
    g = groups.get(n) if groups is not None else None
    return n < many if g is None else g.answer(many)[0]


def many_splits(n: int, many: int = MANY_TOKENS) -> list[int] | None:
    """Inside `rows_by_stream` with the streams' sizes: how many of the n rows that are not few-row rows
    (threshold `many`) each stream has (in order; streams with none left out), when more than one has some;
    else None."""
    groups = _ROW_GROUPS.get()
    g = groups.get(n) if groups is not None else None
    return None if g is None else g.answer(many)[1]
