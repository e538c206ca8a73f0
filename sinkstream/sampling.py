"""Sampling as injected callables: `make_sampler(...)` -> (logits [batch, vocab]) -> ids [batch]."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Sampler = Callable[[torch.Tensor], torch.Tensor]
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (history ids [batch, n], logits)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_window: int = 64  # recent tokens the penalties look at
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.01 <= self.repetition_penalty <= 100:  # beyond, logits overflow to inf and sampling to NaN
            raise ValueError("repetition_penalty must be in [0.01, 100]")


NUCLEUS_CANDIDATES = 256  # top-p looks at the most likely tokens first: sorting 49K-262K costs 3+ ms a token


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [..., V] with everything outside the smallest most-likely prefix whose mass reaches top_p set
    to 0. The prefix is searched among the NUCLEUS_CANDIDATES most likely tokens (a top-k, no sort of the
    vocabulary); only where their mass does not pass top_p is the whole vocabulary sorted. Same result."""
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    sp, idx = probs.topk(k, dim=-1)  # descending
    if k < probs.shape[-1] and bool((sp.sum(-1) <= top_p).any()):
        sp, idx = probs.sort(dim=-1, descending=True)
    drop = (sp.cumsum(-1) - sp) > top_p  # keep the smallest prefix reaching top_p
    return torch.zeros_like(probs).scatter(-1, idx, sp.masked_fill(drop, 0))


def make_sampler(cfg: SamplingConfig, device: torch.device | str = "cpu") -> Sampler:
    if cfg.temperature == 0:
        return lambda logits: logits.argmax(dim=-1)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / cfg.temperature
        if cfg.top_k > 0:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if cfg.min_p > 0:
            probs = probs.masked_fill(probs < cfg.min_p * probs.max(dim=-1, keepdim=True).values, 0)
        if cfg.top_p < 1:
            probs = nucleus(probs, cfg.top_p)
        return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)

    sample.generator = gen  # sessions save and restore its state
    return sample


def make_logits_processors(cfg: SamplingConfig) -> list[LogitsProcessor]:
    procs: list[LogitsProcessor] = []
    if cfg.repetition_penalty != 1.0:
        def repetition(history, logits, p=cfg.repetition_penalty, n=cfg.penalty_window):
            recent = history[:, -n:]
            if recent.numel() == 0:
                return logits
            sel = logits.gather(-1, recent)
            return logits.scatter(-1, recent, torch.where(sel > 0, sel / p, sel * p))
        procs.append(repetition)
    if cfg.frequency_penalty or cfg.presence_penalty:
        def penalties(history, logits, f=cfg.frequency_penalty, pr=cfg.presence_penalty, n=cfg.penalty_window):
            recent = history[:, -n:]
            if recent.numel() == 0:
                return logits
            counts = torch.zeros_like(logits).scatter_add_(-1, recent, torch.ones_like(recent, dtype=logits.dtype))
            return logits - f * counts - pr * (counts > 0).to(logits.dtype)
        procs.append(penalties)
    return procs
