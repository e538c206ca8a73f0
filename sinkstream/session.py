"""Multi-turn sessions: the cache lives across turns, so a chat never re-reads its history.

Each turn feeds only the new text: the model's chat template is rendered for the previous reply and the
new message alone, and the part after the reply is fed. Cost per turn does not grow with the number of
turns. `save`/`load` write the whole state (cache tensors, pending token, sampler RNG) atomically; a memory
cache's finished blocks go to an append-only log beside the file, so a save writes O(what changed).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cache import CacheConfig
from .cache.blockstore import fsync_dir
from .errors import EmptyInputError, PinError, SinkstreamError
from .generate import GenerationResponse, stream_generate
from .sampling import SamplingConfig, make_logits_processors, make_sampler
from .tokenizer import encode, eos_token_ids, render_chat

FORMAT_VERSION = 2  # 2: a memory cache's blocks and index pages are in a log folder named by the header


def system_prefix(tokenizer, system: str | None) -> str:
    """The template text every conversation with `system` (None: no system message) starts with: all that
    the chat template renders before the first user message's content (BOS, the system turn or the
    template's default one, the opening of the user turn)."""
    mark = f"<user-{secrets.token_hex(16)}>"
    head = [] if system is None else [{"role": "system", "content": system}]
    text = render_chat(tokenizer, head + [{"role": "user", "content": mark}])
    return text[:text.index(mark)]


def _digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 over every tensor (name and bytes) and the JSON metadata: any damage is detected."""
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes() if tensors[k].numel() else b"")
    return h.hexdigest()


class _Tail:
    """The last `keep` characters of a text that arrives in pieces, in amortised O(1) per character."""

    def __init__(self, keep: int):
        self.keep, self.buf, self.size = keep, [], 0

    def add(self, piece: str) -> None:
        if piece:
            self.buf.append(piece)
            self.size += len(piece)
            if self.size > 2 * self.keep:
                self.buf = [self.text()]
                self.size = len(self.buf[0])

    def text(self) -> str:
        return "".join(self.buf)[-self.keep:]


def _log_entry(path: Path, meta: dict | None = None) -> dict | None:
    """The block-log entry ({"folder", "stores"}) of the session file at `path` (from `meta`, its header, or
    read from the file); None if there is no such file, it has no log, or the entry does not name a folder
    ``<path name>.<hex>.kvlog`` beside it (a file never makes a save remove, or a load read, anything else)."""
    if meta is None:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["sinkstream"])
        except Exception:  # noqa: BLE001 - no file, or not one of ours
            return None
    log = meta.get("log") if isinstance(meta, dict) else None
    folder = log.get("folder") if isinstance(log, dict) and isinstance(log.get("stores"), dict) else None
    if not isinstance(folder, str) or not re.fullmatch(re.escape(path.name) + r"\.[0-9a-f]+\.kvlog", folder):
        return None
    return log


def saved_log_folder(path: str | os.PathLike) -> Path | None:
    """The block-log folder the session file at `path` uses (None: none, or the file cannot be read)."""
    log = _log_entry(Path(path))
    return None if log is None else Path(path).parent / log["folder"]


@dataclass
class SessionStats:
    tokens_seen: int
    tokens_cached: int
    cache_bytes: int
    turns: int
    capacity: int | None
    pinned: int = 0  # tokens at the stream's start kept for ever (a pinned system prompt)


@dataclass
class Session:
    """`Session(model, tokenizer, cache=CacheConfig("sink", 4, 1020))`; `for r in s.chat("hi"): print(r.text)`.

    A system prompt starts the stream when the session is made (or with `use_system`): the template text
    before the first user message (`system_prefix`) is fed at once, through a `PrefixStore`, so sessions
    with the same system prompt copy its cache state instead of computing it again. A chat with no system
    prompt starts the same way with what the template renders before the first message's content (a
    default system prompt, as SmolLM2's and Qwen's templates add, and the user turn's opening). With
    ``pin_system=True`` those tokens become the cache's sinks (`CacheConfig.pinned`): never evicted,
    however long the chat, in a cache of the same size.
    """
    model: object
    tokenizer: object
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None
    extra: dict = field(default_factory=dict)  # the caller's JSON-able metadata, saved with the session
    pin_system: bool = False  # keep the system prompt's tokens for ever (they become the sinks)
    prefixes: object = None   # a `PrefixStore` for system prompts; None: `prefix.default_store()`; False: none

    RECENT_MESSAGES = 64   # `messages` keeps this many, for inspection: a chat may go on for ever
    REPLY_KEEP = 16384     # `last_reply` keeps the last this-many characters of an (endless) reply

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        """Start again from nothing but the system prompt (fed as the stream's first tokens, if there is one)."""
        if self.system is None or not (self.system or self.pin_system):
            self._fresh(self.cache_config)
            return
        text, ids, config = self._prefix(self.system)
        self._fresh(config)
        self._start(self.system, text, ids)

    def use_system(self, system: str) -> None:
        """Begin the stream with `system`'s prefix (pinned with ``pin_system``); only on a session that has
        fed nothing yet. Raises `PinError` when it cannot be pinned (empty, longer than the cache allows)."""
        if self.cache.seen or self.pending is not None or self.turns:
            raise SinkstreamError("a system prompt starts a session: this one has already fed text")
        text, ids, config = self._prefix(system)
        if config != self.cache.config:
            self.cache = self.model.make_cache(config)
        self._start(system, text, ids)

    def _prefix(self, system: str) -> tuple[str, list[int], CacheConfig]:
        """(template text, its token ids, the cache config it needs) for a stream that starts with `system`."""
        if self.pin_system and not system.strip():
            raise PinError("the system prompt is empty: there is nothing to pin")
        text = system_prefix(self.tokenizer, system)
        ids = encode(self.tokenizer, text, start_of_stream=True)
        if not self.pin_system:
            return text, ids, self.cache_config
        if system.strip() not in text:
            raise PinError("this model's chat template does not put the system prompt before the first user "
                           "message, so it cannot be pinned")
        return text, ids, self.cache_config.pinned(len(ids))

    def _start(self, system: str, text: str, ids: list[int]) -> None:
        from .prefix import fill_prefix
        fill_prefix(self.model, self.cache, ids, self.prefixes)
        self.system, self.prefix_text = system, text
        self.pinned = len(ids) if self.pin_system else 0

    def _start_template(self) -> None:
        """Begin a chat with no system prompt with the template's own start (`system_prefix` of None), through
        the `PrefixStore`: every such chat starts with the same tokens. The store's copy runs on a thread that
        ends with it (`batch.in_fresh_thread`: a long-lived thread running tensor work slows a batch)."""
        from .batch import in_fresh_thread
        from .prefix import fill_prefix
        text = system_prefix(self.tokenizer, None)
        ids = encode(self.tokenizer, text, start_of_stream=True)
        if ids:
            in_fresh_thread(fill_prefix, self.model, self.cache, ids, self.prefixes)
            self.prefix_text = text

    def _fresh(self, config: CacheConfig) -> None:
        self.cache = self.model.make_cache(config)
        self.prefix_text: str | None = None  # the system prompt's template text, fed at the start
        self.pinned = 0
        self.sampler = make_sampler(self.sampling, self.model.device)
        self.processors = make_logits_processors(self.sampling)
        self.stop_ids = eos_token_ids(self.tokenizer)
        self.pending: int | None = None   # last sampled token, not yet in the cache
        self.recent = torch.empty(0, dtype=torch.long)  # recent ids for repetition penalties
        self.turns = 0
        self.last_reply: str | None = None  # the tail of the last reply (REPLY_KEEP characters)
        self.messages: list[dict] = []      # the last RECENT_MESSAGES messages

    # --- feeding ------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, start_of_stream=self.cache.seen == 0 and self.pending is None)

    def _turn_text(self, message: str) -> str:
        """Template text for the new user turn, including what closes the previous reply.

        The previous exchange is rendered with a marker as the reply; everything after the marker is the
        reply's closer plus the new turn, so only O(1) text is rendered and fed per turn. The marker is
        random per call, so no message can contain it.
        """
        user = {"role": "user", "content": message}
        if self.last_reply is None:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [user]
            text = render_chat(self.tokenizer, msgs)
            if self.prefix_text is None:
                return text
            if not text.startswith(self.prefix_text):  # a template that renders the system prompt per message
                raise SinkstreamError("the chat template renders this first message's system prompt unlike the "
                                      "one the session started with")
            return text[len(self.prefix_text):]
        mark = f"<reply-{secrets.token_hex(16)}>"
        prev = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}]
        full = render_chat(self.tokenizer, prev + [user])
        return full[full.index(mark) + len(mark):]

    def _run(self, ids: list[int], *, max_tokens, stop, progress) -> Iterator[GenerationResponse]:
        if self.pending is not None and self.pending not in self.stop_ids:
            ids = [self.pending] + ids
        if not ids:
            raise EmptyInputError("empty input: the session's last token is already in its cache and ended "
                                  "the reply; send some text to continue")
        self.pending = None
        reply = _Tail(self.REPLY_KEEP)
        for r in stream_generate(self.model, self.tokenizer, ids, cache=self.cache, max_tokens=max_tokens,
                                 sampler=self.sampler, logits_processors=self.processors, stop=stop,
                                 stop_ids=self.stop_ids, history=self.recent, progress=progress):
            reply.add(r.text)
            if r.token is not None:
                self.recent = torch.cat([self.recent[-255:], torch.tensor([r.token])])
            if r.finish_reason is not None:
                self.pending = r.token
            yield r
        self.last_reply = reply.text()

    def chat(self, message: str, *, max_tokens: int | None = 512, stop: list[str] | None = None,
             progress=None) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to one user message."""
        if not self.system and self.prefix_text is None and not self.cache.seen and self.pending is None:
            self._start_template()
        text = self._turn_text(message)
        self._remember({"role": "user", "content": message})
        yield from self._run(self._encode(text), max_tokens=max_tokens, stop=stop, progress=progress)
        self._remember({"role": "assistant", "content": self.last_reply})
        self.turns += 1

    def _remember(self, message: dict) -> None:
        """Append to the transcript of recent messages, which keeps the last RECENT_MESSAGES."""
        self.messages.append(message)
        del self.messages[:-self.RECENT_MESSAGES]

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
                            self.cache.capacity, self.pinned)

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write the session to `path` (a .safetensors file with a JSON header + checksum).

        A memory cache's finished blocks and index pages are not in that file but in a log folder beside it,
        ``<path>.<random hex>.kvlog``, which the header names with the committed length of each of its files.
        When this session saved or loaded `path` last, the save appends to that log only the blocks it lacks
        and fsyncs them before the file is replaced: O(new blocks + ring), and a kill at any point leaves the
        file at its last completed save, with all of that save's blocks in the log. Any other save (another
        path: an export; or `path` after another session saved it) writes a complete new log, a
        self-contained copy. The log the file named before goes once the file is replaced. One session at a
        time should save to a path: a second one's saves are full copies.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        before = _log_entry(path)
        log, appends = self._write_log(path, before) if hasattr(self.cache, "write_log") else (None, False)
        try:
            self._write_file(path, log)
        except BaseException:
            if log is not None and log["folder"] != (before or {}).get("folder"):  # a new log nothing names
                shutil.rmtree(path.parent / log["folder"], ignore_errors=True)
            raise
        if appends:
            self._log_commit = (str(path.resolve()), log)
        if before is not None and before["folder"] != (log or {}).get("folder"):
            shutil.rmtree(path.parent / before["folder"], ignore_errors=True)

    def _write_file(self, path: Path, log: dict | None) -> None:
        """Write the session file: to a temporary file, fsync'd, renamed over `path`, the folder fsync'd."""
        from safetensors.torch import save_file
        tensors = {f"cache.{k}": v.contiguous().cpu() for k, v in self.cache.state().items()}
        tensors["recent"] = self.recent.clone()
        gen = getattr(self.sampler, "generator", None)
        if gen is not None:
            tensors["rng"] = gen.get_state().cpu()
        meta = {"version": FORMAT_VERSION, "cache": asdict(self.cache_config), "sampling": asdict(self.sampling),
                "system": self.system, "pin_system": self.pin_system, "pinned": self.pinned,
                "prefix": self.prefix_text, "pending": self.pending, "turns": self.turns, "last_reply": self.last_reply,
                "messages": self.messages[-64:], "extra": self.extra}
        if log is not None:
            meta["log"] = log
        meta_json = json.dumps(meta)
        header = {"sinkstream": meta_json, "sha256": _digest(tensors, meta_json)}
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
        fsync_dir(path.parent)

    def _write_log(self, path: Path, before: dict | None) -> tuple[dict, bool]:
        """Write the memory cache's log for a save to `path`, whose file names the log `before` now: append to
        the cache's log if that is it and this session committed it last, else write a complete new one.
        Returns the header's log entry and whether the cache appends to this log from now on."""
        home, ours, key = self.cache.log_folder, getattr(self, "_log_commit", None), str(path.resolve())
        if (home is not None and before is not None and ours == (key, before)
                and Path(home).resolve() == (path.parent / before["folder"]).resolve()):
            return {"folder": before["folder"], "stores": self.cache.write_log()}, True
        folder = f"{path.name}.{secrets.token_hex(8)}.kvlog"
        # this log becomes the cache's unless the cache appends to a log of another path (this is an export)
        bind = home is None or ours is None or ours[0] == key
        try:
            return {"folder": folder, "stores": self.cache.write_log(path.parent / folder, bind=bind)}, bind
        except BaseException:
            shutil.rmtree(path.parent / folder, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, model, tokenizer) -> "Session":
        """Restore a saved session; raises ValueError if the file is damaged (checksum mismatch) or its block
        log is: its files shorter than committed, or their CRCs not the ones committed. No block is read
        into RAM here beyond what is recalled; each block read from the log later is checked against its
        CRC-32 and raises ValueError if it was damaged."""
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
        version = meta.get("version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"session file {path} has format version {version!r}; this sinkstream reads "
                             f"versions 1 to {FORMAT_VERSION}")
        config, pinned = CacheConfig(**meta["cache"]), int(meta.get("pinned") or 0)
        # made with the cache it had (pinned: the sinks its prefix took), the prefix not fed: the state has it
        s = cls(model, tokenizer, config.pinned(pinned) if pinned else config, SamplingConfig(**meta["sampling"]),
                None, pin_system=bool(meta.get("pin_system")), prefixes=False)
        s.cache_config, s.system, s.prefix_text, s.pinned = config, meta["system"], meta.get("prefix"), pinned
        if hasattr(s.cache, "open_log"):
            log = _log_entry(Path(path), meta)
            if log is None:
                raise ValueError(f"session file {path} names no block log: saved by an older sinkstream "
                                 f"(memory blocks inside the file) or damaged")
            s.cache.open_log(Path(path).parent / log["folder"], log["stores"])
            s._log_commit = (str(Path(path).resolve()), log)
        s.cache.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("cache.")})
        s.recent = tensors["recent"].long()
        if "rng" in tensors and getattr(s.sampler, "generator", None) is not None:
            s.sampler.generator.set_state(tensors["rng"])
        s.pending, s.turns, s.last_reply = meta["pending"], meta["turns"], meta["last_reply"]
        s.messages = meta["messages"]
        s.extra = meta.get("extra", {})
        return s
