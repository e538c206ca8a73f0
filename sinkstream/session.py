"""Multi-turn sessions: the cache lives across turns, so a chat never re-reads its history.

Each turn feeds only the new text: the model's chat template is rendered for the previous reply and the
new message alone, and the part after the reply is fed. Cost per turn does not grow with the number of
turns. `save`/`load` write the whole state (cache tensors, pending token, sampler RNG) atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cache import CacheConfig
from .generate import GenerationResponse, stream_generate
from .sampling import SamplingConfig, make_logits_processors, make_sampler
from .tokenizer import encode, eos_token_ids, render_chat

FORMAT_VERSION = 1


def _digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 over every tensor (name and bytes) and the JSON metadata: any damage is detected."""
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes() if tensors[k].numel() else b"")
    return h.hexdigest()


@dataclass
class SessionStats:
    tokens_seen: int
    tokens_cached: int
    cache_bytes: int
    turns: int
    capacity: int | None


@dataclass
class Session:
    """`Session(model, tokenizer, cache=CacheConfig("sink", 4, 1020))`; `for r in s.chat("hi"): print(r.text)`."""
    model: object
    tokenizer: object
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None
    extra: dict = field(default_factory=dict)  # the caller's JSON-able metadata, saved with the session

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.make_cache(self.cache_config)
        self.sampler = make_sampler(self.sampling, self.model.device)
        self.processors = make_logits_processors(self.sampling)
        self.stop_ids = eos_token_ids(self.tokenizer)
        self.pending: int | None = None   # last sampled token, not yet in the cache
        self.recent = torch.empty(0, dtype=torch.long)  # recent ids for repetition penalties
        self.turns = 0
        self.last_reply: str | None = None
        self.messages: list[dict] = []

    # --- feeding ------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, start_of_stream=self.cache.seen == 0 and self.pending is None)

    _REPLY_MARK = "SINKSTREAM_REPLY_MARK"

    def _turn_text(self, message: str) -> str:
        """Template text for the new user turn, including what closes the previous reply.

        The previous exchange is rendered with a marker as the reply; everything after the marker is the
        reply's closer plus the new turn, so only O(1) text is rendered and fed per turn.
        """
        user = {"role": "user", "content": message}
        if self.last_reply is None:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [user]
            return render_chat(self.tokenizer, msgs)
        mark = self._REPLY_MARK
        prev = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}]
        full = render_chat(self.tokenizer, prev + [user])
        return full[full.rindex(mark) + len(mark):]

    def _run(self, ids: list[int], *, max_tokens, stop, progress) -> Iterator[GenerationResponse]:
        if self.pending is not None and self.pending not in self.stop_ids:
            ids = [self.pending] + ids
        self.pending = None
        reply = []
        for r in stream_generate(self.model, self.tokenizer, ids, cache=self.cache, max_tokens=max_tokens,
                                 sampler=self.sampler, logits_processors=self.processors, stop=stop,
                                 stop_ids=self.stop_ids, history=self.recent, progress=progress):
            reply.append(r.text)
            if r.token is not None:
                self.recent = torch.cat([self.recent, torch.tensor([r.token])])[-256:]
            if r.finish_reason is not None:
                self.pending = r.token
            yield r
        self.last_reply = "".join(reply)

    def chat(self, message: str, *, max_tokens: int | None = 512, stop: list[str] | None = None,
             progress=None) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to one user message."""
        text = self._turn_text(message)
        self.messages.append({"role": "user", "content": message})
        yield from self._run(self._encode(text), max_tokens=max_tokens, stop=stop, progress=progress)
        self.messages.append({"role": "assistant", "content": self.last_reply})
        self.turns += 1

    def send(self, text: str, *, max_tokens: int | None = 256, stop: list[str] | None = None,
             progress=None) -> Iterator[GenerationResponse]:
        """Raw continuation: feed text (no template) and stream what follows."""
        yield from self._run(self._encode(text), max_tokens=max_tokens, stop=stop, progress=progress)
        self.turns += 1

    def feed(self, text: str, *, progress=None) -> None:
        """Add text to the context without generating (e.g. a log line, a document)."""
        ids = ([self.pending] if self.pending is not None and self.pending not in self.stop_ids else [])
        ids += self._encode(text)
        self.pending = None
        if ids:
            with torch.inference_mode():
                self.cache.run(self.model, torch.tensor([ids], device=self.model.device), progress=progress)

    # --- stats and persistence ----------------------------------------------------------------------
    def stats(self) -> SessionStats:
        return SessionStats(self.cache.seen, self.cache.cached, self.cache.nbytes, self.turns,
                            self.cache.capacity)

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write the session to `path` (a .safetensors file with a JSON header + checksum)."""
        from safetensors.torch import save_file
        tensors = {f"cache.{k}": v.contiguous().cpu() for k, v in self.cache.state().items()}
        tensors["recent"] = self.recent.clone()
        gen = getattr(self.sampler, "generator", None)
        if gen is not None:
            tensors["rng"] = gen.get_state().cpu()
        meta = {"version": FORMAT_VERSION, "cache": asdict(self.cache_config), "sampling": asdict(self.sampling),
                "system": self.system, "pending": self.pending, "turns": self.turns, "last_reply": self.last_reply,
                "messages": self.messages[-64:], "extra": self.extra}
        meta_json = json.dumps(meta)
        header = {"sinkstream": meta_json, "sha256": _digest(tensors, meta_json)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, model, tokenizer) -> "Session":
        """Restore a saved session; raises ValueError if the file is damaged (checksum mismatch)."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read session file {path}: {e}") from None
        if "sinkstream" not in header or _digest(tensors, header["sinkstream"]) != header.get("sha256"):
            raise ValueError(f"session file {path} is damaged (checksum mismatch)")
        meta = json.loads(header["sinkstream"])
        s = cls(model, tokenizer, CacheConfig(**meta["cache"]), SamplingConfig(**meta["sampling"]), meta["system"])
        s.cache.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("cache.")})
        s.recent = tensors["recent"].long()
        if "rng" in tensors and getattr(s.sampler, "generator", None) is not None:
            s.sampler.generator.set_state(tensors["rng"])
        s.pending, s.turns, s.last_reply = meta["pending"], meta["turns"], meta["last_reply"]
        s.messages = meta["messages"]
        s.extra = meta.get("extra", {})
        return s
