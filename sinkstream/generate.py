"""The generation loop, in layers: token ids -> text pieces -> blocking helpers.

`stream_tokens` knows nothing about text. `stream_generate` adds the streaming detokenizer, stop
strings and timing. `generate` collects a whole reply. The CLI, server and eval all consume these.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .batch import runner_for
from .sampling import LogitsProcessor, Sampler, SamplingConfig, make_logits_processors, make_sampler
from .tokenizer import StreamingDetokenizer, encode, eos_token_ids


@torch.inference_mode()
def stream_tokens(model, cache, prompt_ids: torch.Tensor, *, sampler: Sampler,
                  logits_processors: list[LogitsProcessor] = (), max_tokens: int | None = 256,
                  stop_ids: set[int] = frozenset(), history: torch.Tensor | None = None,
                  progress=None) -> Iterator[int]:
    """Feed prompt_ids [n] (or [1, n]) into `cache`, then yield sampled ids until a stop id or max_tokens.

    max_tokens None or < 0 = endless. The last sampled id is *not* yet in the cache when the loop
    stops (the caller feeds it with the next turn, see Session). Every pass goes through the context's
    runner (`batch.runner_for`): alone in this thread, or batched with other streams; the logits processors
    and the sampler run where the pass runs.
    """
    ids = prompt_ids.view(1, -1).to(model.device)
    hist = ids if history is None else torch.cat([history.view(1, -1).to(ids.device), ids], dim=1)
    runner = runner_for(model)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, -1]
        for proc in logits_processors:
            logits = proc(hist, logits)
        return sampler(logits)

    with runner.stream():
        tok = runner.run(model, cache, ids, progress=progress, then=pick)
        n = 0
        while max_tokens is None or max_tokens < 0 or n < max_tokens:
            t = int(tok[0])
            n += 1
            yield t
            if t in stop_ids:
                return
            nxt = tok.view(1, 1)
            hist = torch.cat([hist[:, -255:], nxt], dim=1)  # penalties only look at a recent window
            tok = runner.run(model, cache, nxt, then=pick)


@dataclass
class GenerationResponse:
    text: str                  # the new piece (may be empty while a character is incomplete)
    token: int | None
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: str | None  # None while running, then "stop" or "length"
    cache_seen: int = 0
    cache_cached: int = 0


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports where one completes."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(model, tokenizer, prompt: str | list[int] | torch.Tensor, *, cache=None,
                    max_tokens: int | None = 256, sampling: SamplingConfig | None = None,
                    sampler: Sampler | None = None, logits_processors: list[LogitsProcessor] | None = None,
                    stop: list[str] | None = None, stop_ids: set[int] | None = None,
                    history: torch.Tensor | None = None, progress=None) -> Iterator[GenerationResponse]:
    """Stream a completion of `prompt` (text gets the tokenizer's BOS only at the start of a stream)."""
    sampling = sampling or SamplingConfig()
    if cache is None:
        cache = model.make_cache()
    if sampler is None:
        sampler = make_sampler(sampling, model.device)
    if logits_processors is None:
        logits_processors = make_logits_processors(sampling)
    if isinstance(prompt, str):
        ids = torch.tensor(encode(tokenizer, prompt, start_of_stream=getattr(cache, "seen", 0) == 0),
                           dtype=torch.long)
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).view(-1)
    stop_ids = eos_token_ids(tokenizer) if stop_ids is None else stop_ids
    detok = StreamingDetokenizer(tokenizer)
    matcher = StopMatcher(stop or [])
    t0 = time.perf_counter()
    t_first = None
    n = 0
    prompt_tps = 0.0
    stream = stream_tokens(model, cache, ids, sampler=sampler, logits_processors=logits_processors,
                           max_tokens=max_tokens, stop_ids=stop_ids, history=history, progress=progress)

    def response(text, tok, finish):
        now = time.perf_counter()
        gen_tps = (n - 1) / (now - t_first) if t_first and n > 1 and now > t_first else 0.0
        return GenerationResponse(text, tok, len(ids), n, prompt_tps, gen_tps, finish,
                                  getattr(cache, "seen", 0), getattr(cache, "cached", 0))

    with contextlib.closing(stream):  # a reply that ends leaves the batch at once
        for tok in stream:
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
                prompt_tps = len(ids) / max(t_first - t0, 1e-9)
            if tok in stop_ids:
                yield response(matcher.flush() + detok.flush(), tok, "stop")
                return
            text, hit = matcher.push(detok.add(tok))
            if hit:
                yield response(text, tok, "stop")
                return
            if max_tokens is not None and 0 <= max_tokens <= n:
                yield response(text + matcher.push(detok.flush())[0] + matcher.flush(), tok, "length")
                return
            yield response(text, tok, None)


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole completion as one string."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def generate_batch(model, tokenizer, prompts: list, *, max_batch: int = 8, cache_config=None, **kwargs) -> list[str]:
    """Complete every prompt, up to `max_batch` at once with their forward passes batched (`batch.map_batched`);
    `generate`'s keywords apply to each (a ``cache`` or ``sampler`` would be shared: give none; the caches
    are made here, from `cache_config`). Each completion is what `generate` gives alone (greedy, or sampling
    with a seed)."""
    from .batch import map_batched
    if "cache" in kwargs or "sampler" in kwargs:
        raise ValueError("generate_batch makes a cache and a sampler per prompt; pass sampling= instead")
    # allocated in this thread, which steps the batch: see batch.in_fresh_thread on why that matters
    jobs = [(p, model.make_cache(cache_config)) for p in prompts]
    return map_batched(model, lambda job: generate(model, tokenizer, job[0], cache=job[1], **kwargs), jobs,
                       max_batch=max_batch)
