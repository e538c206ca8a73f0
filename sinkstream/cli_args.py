"""Flags shared by every subcommand (model, cache, sampling) and turning them into core objects."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from .cache import POLICIES, CacheConfig
from .errors import SinkstreamError
from .sampling import SamplingConfig


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="a .gguf file, a Hugging Face folder, or a short name (default: smollm2)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    g.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weights: auto (default) runs a GGUF on its own quantization and a Hugging Face "
                        "folder in --dtype; none de-quantizes to --dtype; int4 (groups of 32, output layer "
                        "int8) or int8 quantize the linear layers, about 2x faster decoding on a CPU")


def add_cache_args(p: argparse.ArgumentParser, *, default_policy: str = "sink", extra_policies=()) -> None:
    g = p.add_argument_group("cache")
    g.add_argument("--cache", default=default_policy, choices=list(POLICIES) + list(extra_policies),
                   help="KV policy: sink = StreamingLLM (default), window, dense, recompute, "
                        "memory = sink + recall of evicted blocks")
    g.add_argument("--sinks", type=int, default=4, help="attention-sink tokens kept for ever (default 4)")
    g.add_argument("--window", type=int, default=1020, help="recent tokens kept (default 1020)")
    g.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the cached keys and values (auto: the model's; bfloat16 halves the bytes a "
                        "decode step reads; dense, window and sink caches)")
    g.add_argument("--prefill-chunk", type=int, default=512, help="tokens per forward pass in long prompts")
    g.add_argument("--max-pinned", type=int, default=None,
                   help="most tokens a pinned system prompt may take (default: half of sinks + window)")
    m = p.add_argument_group("memory cache (--cache memory)")
    m.add_argument("--block-size", type=int, default=64, help="evicted tokens per memory block (default 64)")
    # not --top-k: that flag is the sampler's
    m.add_argument("--memory-top-k", type=int, default=4, help="blocks each layer recalls per step (default 4)")
    m.add_argument("--memory-budget", type=parse_size, default=None, metavar="BYTES",
                   help="RAM for evicted blocks before they spill to disk, e.g. 512M, 2G (default: no limit)")
    m.add_argument("--memory-dir", default=None, help="folder for spilled blocks (default: a temporary folder)")
    m.add_argument("--representative", default="attention", choices=["attention", "mean"],
                   help="keys a block is found by: the most attended (default) or the mean key")


# --- argparse types: a bad value is a one-line error naming the flag, before any model is loaded ---------
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    """A count or size that must be at least 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def max_tokens(text: str) -> int:
    """Tokens to generate: 0 or more, or -1 for endless."""
    value = _int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (endless) or at least 0, got {text!r}")
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must fit in 64 bits, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _float_between(text: str, low: float, high: float) -> float:
    value = finite_float(text)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    return _float_between(text, 0, 1)


def penalty(text: str) -> float:
    """A repetition penalty in [0.01, 100] (beyond, logits overflow to inf and sampling to NaN)."""
    return _float_between(text, 0.01, 100)


def port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0-65535 (0 picks a free one), got {text!r}")
    return value


def out_folder(text: str) -> str:
    """A folder to write into: made later if missing, but never an existing file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return text


def parse_size(text: str) -> int:
    """`4096`, `512K`, `512M`, `1.5G`, `2GiB` -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M or 2G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must be >= 0, got {text!r}")
    return int(value * mult)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", "--temperature", dest="temperature", type=finite_float, default=0.0,
                   help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=finite_float, default=1.0)
    g.add_argument("--min-p", type=finite_float, default=0.0)
    g.add_argument("--repetition-penalty", type=penalty, default=1.0)
    g.add_argument("--seed", type=seed, default=None)


def cache_config(args) -> CacheConfig:
    try:
        return CacheConfig(args.cache, sinks=args.sinks, window=args.window,
                           prefill_chunk=getattr(args, "prefill_chunk", 512),
                           block_size=getattr(args, "block_size", 64), top_k=getattr(args, "memory_top_k", 4),
                           memory_budget=getattr(args, "memory_budget", None),
                           memory_dir=getattr(args, "memory_dir", None),
                           representative=getattr(args, "representative", "attention"),
                           kv_dtype=None if getattr(args, "kv_dtype", "auto") == "auto" else args.kv_dtype,
                           max_pinned=getattr(args, "max_pinned", None))
    except ValueError as e:
        raise SinkstreamError(str(e)) from None


def sampling_config(args) -> SamplingConfig:
    try:
        return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        raise SinkstreamError(str(e)) from None


def check_device(name: str) -> None:
    """A one-line error for a --device torch cannot parse or does not have (before any loading)."""
    import torch
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SinkstreamError(f"--device {name!r}: unknown device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise SinkstreamError(f"--device {name!r}: this torch sees {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SinkstreamError(f"--device {name!r}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SinkstreamError(f"--device {name!r}: sinkstream runs on cpu, cuda or mps")


def load_model(args):
    """(model, tokenizer) for --model/--device/--dtype/--quant."""
    import torch

    from .loading import load
    check_device(args.device)
    if getattr(args, "seed", None) is not None:
        torch.manual_seed(args.seed)
    return load(args.model, dtype=args.dtype, device=args.device, quant=getattr(args, "quant", "auto"))


class Progress:
    """A tqdm bar for long prefills/evals, on stderr, only when the work is long enough to matter."""

    def __init__(self, desc: str, *, min_total: int = 1024, disable: bool = False, unit: str = "tok"):
        self.desc, self.min_total, self.disable, self.bar, self.unit = desc, min_total, disable, None, unit

    def __call__(self, done: int, total: int) -> None:
        if self.disable or total < self.min_total:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=False)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
