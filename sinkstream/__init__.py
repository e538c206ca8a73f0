"""sinkstream: run a pretrained LLM on an endless stream in constant memory and time per token.

    import sinkstream
    model, tokenizer = sinkstream.load()              # SmolLM2-135M-Instruct by default
    s = sinkstream.Session(model, tokenizer, sinkstream.CacheConfig("sink", sinks=4, window=1020))
    for r in s.chat("Tell me a story"):
        print(r.text, end="", flush=True)

    replies = sinkstream.generate_batch(model, tokenizer, ["Hi", "Name a colour"])  # decoded together

Sessions (or anything else calling the core) run batched with `sinkstream.batch.map_batched`.
"""
from .cache import CacheConfig
from .errors import SinkstreamError
from .generate import generate, generate_batch, stream_generate
from .loading import load
from .prefix import PrefixStore
from .sampling import SamplingConfig
from .session import Session

__all__ = ["load", "Session", "CacheConfig", "SamplingConfig", "PrefixStore", "stream_generate", "generate", "generate_batch",
           "SinkstreamError"]
__version__ = "0.1.0"
