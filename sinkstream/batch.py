"""Forward passes shared by many caches: the one path by which tokens reach a model, for one stream or many.

A `Feed` is tokens waiting to go into one cache: a prompt (fed in chunks) or one decoded token. `step` runs one
forward pass that advances several feeds: the planned caches' next chunks are packed along the sequence axis
(`CausalLM.forward_packed`), so embeddings, linear layers, norms and the output projection run over every
stream's tokens at once and each weight is read once per step instead of once per stream. Attention runs per
cache (`attention.cached_attention`): each keeps its own buffers, plan and positions, so a cache that is still
filling, a prefill chunk, a memory cache's recall and a full sink cache share one pass with no padding and no
mask (nothing is ever left-padded into a ring, where padding would become a sink).

Who calls `step` is the runner's business:

* `Direct` steps one feed in the calling thread (the CLI, eval and one Python stream).
* `Batcher` owns a thread that steps every feed submitted from any thread together (continuous batching).
  Streams join and leave between steps. A step waits a moment (`gather`) for every stream that is generating
  (`Batcher.stream`) to hand in its next token, so they decode together. Prompt chunks go beside the decode
  tokens: short prompts (up to `prefill_budget` tokens per step in all) whole, so a new chat turn starts at
  once; longer ones in chunks under a per-step token budget, so a long prompt delays the others by at most
  one such chunk per step. That budget adapts to the machine: as many prompt tokens as cost about
  `prefill_share` times a decode step (both timed as the batch runs). With no stream decoding, a prompt
  goes in chunks of its cache's chunk size.

`runner_for(model)` is the runner set for the current context (`using`), `DIRECT` otherwise. Caches' `run`
and `generate.stream_tokens` go through it, so sessions, the server, eval and the Python API share one path.
Sampling runs on the stepping thread too (a feed's `then`), so all torch work of a batch stays on one thread.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .errors import EmptyInputError, SinkstreamError
from .passrows import alone_sizes, rows_by_stream
from .quant import keeping_dequantized, release_dequantized

PREFILL_BUDGET = 256  # prompt tokens per step beside decoding streams that short prompts may take whole
PREFILL_SHARE = 1.0   # prompt tokens beside decoding streams cost about this many decode steps' time
GATHER_SECONDS = 0.005  # how long a step waits for generating streams to hand in their next token


class BadTokenError(SinkstreamError, ValueError):
    """Token ids outside the model's vocabulary."""


@dataclass(eq=False)
class Feed:
    """Tokens [batch, n] waiting to go into `cache`. ``logits``: "last" (the last position's) or "all";
    ``then`` maps the logits to the result on the stepping thread (e.g. a sampler); ``progress(done, n)``
    is called after each chunk and may raise to stop the feed (the cache has taken the chunks before)."""
    cache: object
    ids: torch.Tensor
    logits: str = "last"
    progress: Callable | None = None
    then: Callable | None = None
    member: bool = False          # submitted by a generating stream (see Batcher.stream)
    done: int = 0                 # tokens fed so far
    outs: list = field(default_factory=list)
    result: object = None
    error: BaseException | None = None
    finished: bool = False
    event: threading.Event = field(default_factory=threading.Event)

    @property
    def remaining(self) -> int:
        return self.ids.shape[1] - self.done

    def fail(self, e: BaseException) -> None:
        self.error, self.finished = e, True

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result

    def _finish(self) -> None:
        """All tokens are in: the cache's end-of-run hook, the logits, then `then`."""
        self.cache.after_run()
        logits = self.outs[-1] if self.logits == "last" else torch.cat(self.outs, dim=1)
        self.outs = []
        self.result = self.then(logits) if self.then is not None else logits
        self.finished = True


def new_feed(model, cache, ids: torch.Tensor, *, logits: str = "last", progress=None, then=None,
             member: bool = False) -> Feed:
    """A checked `Feed`: ids [n] or [batch, n] moved to the model's device; empty input or ids outside the
    vocabulary raise here, before any cache changes."""
    ids = ids.view(1, -1) if ids.dim() == 1 else ids
    if ids.shape[1] == 0:
        raise EmptyInputError("empty input: there are no tokens to feed (the cache is unchanged)")
    vocab = model.get_submodule(model.embedding_module).num_embeddings
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise BadTokenError(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary (0..{vocab - 1})")
    return Feed(cache, ids.to(model.device), logits, progress, then, member)


def _plan_chunks(feeds: list[Feed], budget: int | None, whole: int | None = None) -> list[tuple[Feed, int]]:
    """How many tokens each feed gives this step: decode tokens all; prompts in chunks of at most their
    cache's chunk size. Beside decode tokens, prompts that fit in what is left of `whole` tokens go whole
    (a chat turn's first token comes one step later), and longer prompts share what is left of `budget`
    tokens (a long prompt delays the others by about that much per step); some prompt always advances."""
    decode = [f for f in feeds if f.remaining == 1]
    prompts = [f for f in feeds if f.remaining > 1]
    parts = [(f, 1) for f in decode]
    limited = bool(decode) and budget is not None
    left, room, advanced = budget or 0, whole or 0, False
    for f in prompts:
        n = min(f.remaining, f.cache.chunk_size())
        if limited:
            if n == f.remaining and n <= room:
                room -= n
                left -= n
            else:
                n = min(n, left) if left > 0 else (0 if advanced else 1)
                left -= n
        if n > 0:
            parts.append((f, n))
            advanced = True
    return parts


@torch.inference_mode()
def step(model, feeds: list[Feed], *, budget: int | None = None, whole: int | None = None) -> None:
    """Advance unfinished feeds by one chunk each (see the module docstring); feeds that complete get their
    result, feeds that fail their error. Single-sequence feeds of planned caches share one forward pass;
    a feed of several sequences gets a pass of its own; a cache that is not planned runs its feed whole."""
    feeds = [f for f in feeds if not f.finished]
    for f in feeds:
        if not f.cache.planned:
            _run_alone(model, f)
    planned = [f for f in feeds if f.cache.planned]
    singles = [f for f in planned if f.ids.shape[0] == 1]
    if singles:
        _pass(model, singles, budget, whole)
    for f in planned:
        if f.ids.shape[0] > 1:
            _pass(model, [f], budget, whole)


def _pass(model, feeds: list[Feed], budget: int | None, whole: int | None) -> None:
    parts, plans = [], []
    for f, n in _plan_chunks(feeds, budget, whole):
        try:
            plans.append(f.cache.begin(n))  # raises before changing anything (e.g. a dense cache is full)
            parts.append((f, n))
        except Exception as e:  # noqa: BLE001 - this feed's own failure; the others go on
            f.fail(e)
    if not parts:
        return
    bounds, rows = [0], []
    for f, n in parts:
        a = bounds[-1]
        bounds.append(a + n)
        if f.logits == "all":
            rows.extend(range(a, a + n))
        elif n == f.remaining:
            rows.append(a + n - 1)
    ids = torch.cat([f.ids[:, f.done:f.done + n] for f, n in parts], dim=1)
    # quantized layers compute each stream's rows as they would alone, whoever shares the pass and however a
    # prompt was split between steps
    alone = alone_sizes([(f.done, n, f.ids.shape[1], f.cache.chunk_size()) for f, n in parts])
    # a prompt cut into budget-sized chunks beside decode tokens goes on next step: its quantized layers keep
    # their de-quantized weights until it is in (sinkstream.quant.keeping_dequantized)
    chunked = any(n == 1 for _, n in parts) and any(f.remaining > n > 0 and n < f.cache.chunk_size()
                                                    for f, n in parts)
    with rows_by_stream(alone, rows, [n for _, n in parts]), \
            (keeping_dequantized() if chunked else contextlib.nullcontext()):
        if len(parts) == 1:
            f = parts[0][0]
            sel = slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)
            logits = model.forward_layers(ids, f.cache.layers, plans[0], sel).float()
        else:
            sel = torch.tensor(rows, dtype=torch.long, device=ids.device)
            logits = model.forward_packed(ids, bounds, [f.cache.layers for f, _ in parts], plans, sel)
    if not chunked:
        release_dequantized()
    r = 0
    for f, n in parts:
        k = n if f.logits == "all" else int(n == f.remaining)
        if k:
            f.outs.append(logits[:, r:r + k])
            r += k
        f.done += n
        try:
            if f.progress is not None:
                f.progress(f.done, f.ids.shape[1])
            if f.remaining == 0:
                f._finish()
        except Exception as e:  # noqa: BLE001 - a cancelled or failing feed leaves; the others go on
            f.fail(e)


def _run_alone(model, f: Feed) -> None:
    try:
        logits = f.cache.run(model, f.ids, logits=f.logits, progress=f.progress)
        f.outs = [logits]
        f.done = f.ids.shape[1]
        f.result = f.then(logits) if f.then is not None else logits
        f.finished = True
    except Exception as e:  # noqa: BLE001
        f.fail(e)


class Direct:
    """Steps one feed at a time in the calling thread."""

    def run(self, model, cache, ids: torch.Tensor, *, logits: str = "last", progress=None, then=None):
        """Feed ids [n] or [batch, n] into `cache`; the logits (``then(logits)`` with `then`)."""
        f = new_feed(model, cache, ids, logits=logits, progress=progress, then=then)
        while not f.finished:
            step(model, [f])
        return f.outcome()

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        yield


DIRECT = Direct()
_RUNNER: contextvars.ContextVar = contextvars.ContextVar("sinkstream_runner", default=None)


def runner_for(model):
    """The runner set by `using` in this context if it runs `model`, else `DIRECT`."""
    r = _RUNNER.get()
    return r if r is not None and r.model is model else DIRECT


@contextlib.contextmanager
def using(runner) -> Iterator[None]:
    """Route this context's forward passes (for the runner's model) through `runner`."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


@dataclass
class StepStats:
    feeds: int        # streams advanced by the step
    tokens: int       # tokens it fed
    seconds: float
    prompt_tokens: int = 0  # tokens fed to feeds that had more than one left (prompts)


class Batcher:
    """Continuous batching: one thread steps every feed submitted to `run` from any thread, together.

    Beside decoding streams a step feeds prompts of up to ``prefill_budget`` tokens in all whole (None: no
    limit), and longer prompts in chunks of `budget()` tokens: those that cost about ``prefill_share`` times a
    decode-only step, from running averages of both. ``gather``: seconds a step waits for the streams inside `stream` to
    hand in their next token. ``on_step(StepStats)`` is called after each step (metrics). Use as a context
    manager, or call `close`.
    """

    def __init__(self, model, *, prefill_budget: int | None = PREFILL_BUDGET, prefill_share: float = PREFILL_SHARE,
                 gather: float = GATHER_SECONDS, on_step: Callable[[StepStats], None] | None = None,
                 start: bool = True):
        self.model, self.prefill_budget, self.gather, self.on_step = model, prefill_budget, gather, on_step
        self.prefill_share = prefill_share
        self.decode_seconds: float | None = None  # running average of decode-only steps
        self.token_seconds: float | None = None   # running average of what a prompt token adds to a step
        self.cond = threading.Condition()
        self.queue: list[Feed] = []
        self.streams = 0              # threads inside `stream` (they come back every step)
        self.closed = False
        self.local = threading.local()
        self.thread: threading.Thread | None = None
        if start:
            self.thread = threading.Thread(target=self.serve, name="sinkstream-batch", daemon=True)
            self.thread.start()

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, model, cache, ids: torch.Tensor, *, logits: str = "last", progress=None, then=None):
        """Like `Direct.run`, stepped on the batch thread together with everything else submitted."""
        f = new_feed(model, cache, ids, logits=logits, progress=progress, then=then,
                     member=getattr(self.local, "streaming", False))
        with self.cond:
            if self.closed:
                raise SinkstreamError("the batch runner is closed")
            self.queue.append(f)
            self.cond.notify_all()
        f.event.wait()
        return f.outcome()

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Mark this thread as a generating stream: steps wait (at most `gather`) for its next token."""
        with self.cond:
            self.streams += 1
        self.local.streaming = True
        try:
            yield
        finally:
            self.local.streaming = False
            with self.cond:
                self.streams -= 1
                self.cond.notify_all()

    def budget(self) -> int | None:
        """Prompt tokens that prompts too long to go whole may take per step beside decoding streams."""
        if self.prefill_budget is None or self.decode_seconds is None or self.token_seconds is None:
            return self.prefill_budget
        fit = int(self.prefill_share * self.decode_seconds / max(self.token_seconds, 1e-9))
        return max(1, min(self.prefill_budget, fit))

    def _timed(self, st: StepStats) -> None:
        """Update the running averages `budget` reads from a step's duration."""
        avg = lambda old, new: new if old is None else 0.8 * old + 0.2 * new
        if not st.prompt_tokens:
            self.decode_seconds = avg(self.decode_seconds, st.seconds)
        elif st.tokens > st.prompt_tokens and self.decode_seconds is not None:
            self.token_seconds = avg(self.token_seconds, max(st.seconds - self.decode_seconds, 0) / st.prompt_tokens)
        elif st.tokens == st.prompt_tokens:  # prompts only: an upper bound of what a prompt token adds
            self.token_seconds = avg(self.token_seconds, st.seconds / st.prompt_tokens)

    def close(self) -> None:
        """Fail whatever waits and end the thread."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None and threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)

    def serve(self) -> None:
        """Step whatever is submitted until `close`: the batch thread's loop, or the caller's with
        ``start=False`` (a thread that already runs torch work steps fastest: see `in_fresh_thread`)."""
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    for f in self.queue:
                        f.fail(SinkstreamError("the batch runner is closed"))
                        f.event.set()
                    self.queue.clear()
                    return
                deadline = time.monotonic() + self.gather
                while sum(f.member for f in self.queue) < self.streams and not self.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                feeds = list(self.queue)
            before = {id(f): f.done for f in feeds}
            prompts = {id(f) for f in feeds if f.remaining > 1}
            t0 = time.perf_counter()
            try:
                step(self.model, feeds, budget=self.budget(), whole=self.prefill_budget)
            except BaseException as e:  # noqa: BLE001 - the pass itself failed: every feed in it fails
                for f in feeds:
                    if not f.finished:
                        f.fail(e)
            seconds = time.perf_counter() - t0
            with self.cond:
                self.queue = [f for f in self.queue if not f.finished]
            advanced = [f for f in feeds if f.done != before[id(f)]]
            for f in feeds:
                if f.finished:
                    f.event.set()
            if advanced:
                fed = {id(f): f.done - before[id(f)] for f in advanced}
                st = StepStats(len(advanced), sum(fed.values()), seconds, sum(fed[i] for i in fed if i in prompts))
                self._timed(st)
                if self.on_step is not None:
                    self.on_step(st)


def map_batched(model, fn: Callable, items, *, max_batch: int = 8, **batcher_kw) -> list:
    """``[fn(item) for item in items]`` with up to `max_batch` calls running at once in threads whose forward
    passes for `model` are batched together (a `Batcher` stepped by the calling thread). `fn` may use any of
    the core's APIs (`generate`, `Session.chat`, ...). Results in order; the first exception is raised.
    Steps run fastest when `fn` allocates no large tensors (make caches and sessions beforehand, in the
    calling thread, as `generate_batch` does; `in_fresh_thread` says why)."""
    from concurrent.futures import ThreadPoolExecutor, wait
    items = list(items)
    batcher = Batcher(model, start=False, **batcher_kw)

    def call(item):
        with using(batcher):
            return fn(item)

    with ThreadPoolExecutor(max_workers=max(1, min(max_batch, len(items) or 1)),
                            thread_name_prefix="sinkstream-stream") as pool:
        futures = [pool.submit(call, item) for item in items]
        threading.Thread(target=lambda: (wait(futures), batcher.close()), daemon=True).start()
        batcher.serve()
    return [f.result() for f in futures]


def in_fresh_thread(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in a new thread that ends with it; returns its result or raises its error.

    For tensor work (a cache allocated, a session loaded or saved) that a long-lived thread does beside a
    `Batcher`: OpenMP (libgomp) keeps a team of worker threads for every live thread that has run a parallel
    region, and once there are more of them than CPUs, every team stops spin-waiting between regions. The
    batch thread's many small parallel regions then each wait for sleeping workers to wake (one server
    session: 56 against 31 ms a token in benchmarks/server_concurrency.py, docs/RESULTS.md). A thread that
    ends takes its team with it.

    The thread runs in a copy of the caller's context, so its forward passes take the caller's runner
    (`using`).
    """
    out: dict = {}
    context = contextvars.copy_context()

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            out["error"] = e

    t = threading.Thread(target=context.run, args=(run,), name="sinkstream-tensor-work")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
