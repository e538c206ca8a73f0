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

# Passes with at least this many tokens (prefill) de-quantize a slice of rows at a time to bfloat16 and
# use a matrix multiply (oneDNN; AMX where the CPU has it): there compute, not weight bytes, is the cost.
MANY_TOKENS = 16


# A pass that packs several streams' tokens (sinkstream.batch) sets, per row count of the activations it
# multiplies (all tokens; the rows that get logits), which rows a stream alone would pass in a chunk of fewer
# than MANY_TOKENS tokens. Those rows take the kernel path and the others the matrix multiply, as alone: a
# stream's numbers do not depend on who shares its pass or on how its prompt is split between steps.
_ROW_GROUPS: contextvars.ContextVar = contextvars.ContextVar("sinkstream_row_groups", default=None)


def few_token_rows(chunks: list[tuple[int, int, int, int]]) -> list[bool]:
    """For packed tokens given as (first offset, count, stream length, the stream's chunk size) per stream:
    whether each token would be in a pass of fewer than MANY_TOKENS tokens if its stream were fed alone
    (in chunks of its chunk size from offset 0)."""
    out = []
    for start, n, total, chunk in chunks:
        for o in range(start, start + n):
            out.append(min(chunk, total - (o // chunk) * chunk) < MANY_TOKENS)
    return out


@contextlib.contextmanager
def rows_by_stream(few: list[bool], rows: list[int] | None = None, sizes: list[int] | None = None):
    """Within the block, a quantized linear layer multiplying packed tokens whose rows `few` marks (see
    `few_token_rows`), or the `rows` of them that get logits, computes each row as its stream would alone.
    `sizes`: the streams' token counts in packing order, which lets the matrix multiply of the rows that
    are not `few` run stream by stream (`many_splits`)."""
    def summary(marks: list[bool]):  # True or False when every row agrees (no tensor work per layer), else a mask
        return True if all(marks) else False if not any(marks) else torch.tensor(marks, dtype=torch.bool)

    starts = [0]
    for size in sizes or []:
        starts.append(starts[-1] + size)

    def splits(picked):  # rows not `few` per stream (in order, streams with none left out); None: one call
        if len(starts) < 3:
            return None
        counts = [0] * (len(starts) - 1)
        for r in picked:
            if not few[r]:
                counts[bisect.bisect_right(starts, r) - 1] += 1
        counts = [c for c in counts if c]
        return counts if len(counts) > 1 else None

    groups = {len(few): (summary(few), splits(range(len(few))))}
    if rows is not None and len(rows) != len(few):
        groups[len(rows)] = (summary([few[r] for r in rows]), splits(rows))
    token = _ROW_GROUPS.set(groups)
    try:
        yield
    finally:
        _ROW_GROUPS.reset(token)


def few_rows(n: int) -> bool | torch.Tensor:
    """Whether each of the n rows of a layer's input takes the few-token kernels: True or False for all of
    them, or a mask; inside `rows_by_stream`, as each row's stream would alone, else by n."""
    groups = _ROW_GROUPS.get()
    few = groups.get(n) if groups is not None else None
    return n < MANY_TOKENS if few is None else few[0]


def many_splits(n: int) -> list[int] | None:
    """Inside `rows_by_stream` with the streams' sizes: how many of the n rows that are not few-token rows
    each stream has (in order; streams with none left out), when more than one has some; else None."""
    groups = _ROW_GROUPS.get()
    hit = groups.get(n) if groups is not None else None
    return None if hit is None else hit[1]
