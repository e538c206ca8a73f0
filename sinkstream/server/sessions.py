"""Server sessions: a few live `Session`s in memory (LRU), every session on disk in the state folder.

A session is the file ``<state-dir>/<id>.safetensors``, written by `Session.save` (write-then-rename, a
SHA-256 over the tensors): once when it is created and after every completed turn, *before* the client
is told the turn ended. So the file always holds the last completed turn. A turn that is cancelled,
fails or dies with the process never reaches the file; undoing it is dropping the live copy, and the
next request reloads the file. A save killed half-way leaves only a ``.<id>.safetensors.*.tmp`` file,
which `SessionStore` ignores and removes on start. With the memory cache, the session's finished blocks
are in a log folder beside the file, ``<id>.safetensors.<hex>.kvlog``, to which a turn's save appends only
the new blocks, fsync'd before the file is replaced (see `Session.save`); what a killed save appended past
the file's committed length is ignored. Deleting a session removes its log; a log no file names (left by a
kill during a session's first save) is removed on start.

Threads: the store's lock guards only the in-memory tables (live sessions, their published views, busy
ids) and is never held across disk I/O, so a slow disk stalls no other request. A live `Session` is read
and changed only by the thread running its request; everyone else reads its *view*, a copy the owning
thread publishes after each completed turn (`describe`, `totals`).

Chat history is checked, not stored: ``extra["history"]`` holds the number of messages the session has
seen and a hash chain over them (role + stripped text), so a client that re-sends its whole history
(as OpenAI clients do) can be checked against the session in O(1) memory, however long it runs.

Shared folders (several replicas, `sinkstream.deploy`): every save writes ``extra["lease"] = {"epoch": n,
"holder": name}``, n counting the session's saves (a file without one, from before leases, is epoch 0). A
store given a `holder` name shares its folder: each save is a compare-and-swap under an exclusive lock
(``flock``) on ``.<id>.safetensors.lock``, made only if the file still holds the epoch the live copy was
loaded at or last saved (no file at all for a create). So two replicas never both write one session: the
later one's turn is refused (409 ``session_conflict``) and its live copy dropped. Before a turn such a store
compares its live copy's epoch with the file's header and reloads the session if another replica moved it
on; and on start it removes only leftovers (tmp files, unnamed logs) older than an hour, which no replica's
save in progress can own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError

from ..batch import in_fresh_thread, using
from ..cache import CacheConfig
from ..errors import PinError
from ..session import Session, saved_log_folder
from .errors import ApiError, bad_request
from .layout import disk_layout, session_layout
from .lease import conflict, exclusive, lease_epoch, old_leftover

SUFFIX = ".safetensors"
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # no dots or slashes: never a path outside the folder
HISTORY_START = hashlib.sha256(b"sinkstream chat history").hexdigest()
RECENT_MESSAGES = Session.RECENT_MESSAGES  # messages kept in memory and on disk for inspection


def check_id(sid: str) -> str:
    if not isinstance(sid, str) or not SESSION_ID.match(sid):
        raise bad_request("invalid session id: use 1-64 characters from A-Z a-z 0-9 _ -", param="session",
                          code="invalid_session_id")
    return sid


def new_id() -> str:
    return "sess_" + secrets.token_hex(12)


def chain(digest: str, messages: list[dict]) -> str:
    """Extend the history hash by `messages` ({"role", "content": str}), ignoring surrounding whitespace."""
    for m in messages:
        item = json.dumps([m["role"], m["content"].strip()], ensure_ascii=False)
        digest = hashlib.sha256((digest + item).encode("utf-8")).hexdigest()
    return digest


class ReplyChain:
    """`chain(digest, [{"role": "assistant", "content": reply}])` computed from the reply's pieces as they
    stream, so a reply of any length is hashed without being kept. Surrounding whitespace is dropped as
    `chain` does: leading whitespace is skipped, trailing whitespace is held back until more text follows."""

    def __init__(self, digest: str, role: str = "assistant"):
        self.base = digest
        head = json.dumps([role, ""], ensure_ascii=False)  # '["assistant", ""]': content goes before '"]'
        self.tail = head[head.rindex('"'):]
        self.h = hashlib.sha256((digest + head[:head.rindex('"')]).encode("utf-8"))
        self.started = False
        self.held = ""  # whitespace that ends the text so far

    def add(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        body = piece.rstrip()
        if body:
            self.h.update(json.dumps(self.held + body, ensure_ascii=False)[1:-1].encode("utf-8"))
            self.held = piece[len(body):]
        else:
            self.held += piece

    def digest(self) -> str:
        h = self.h.copy()
        h.update(self.tail.encode("utf-8"))
        return h.hexdigest()


def damaged(sid: str, path: Path, e: Exception) -> ApiError:
    why = str(e).replace(str(path), path.name)  # clients need not learn where the state folder is
    return ApiError(422, f"session {sid!r} cannot be restored, its file is damaged ({why}); delete it to reuse "
                         f"the id", param="session", code="session_damaged")


def new_session(*args, **kwargs) -> Session:
    """`Session(...)`, with a system prompt that cannot be pinned answered as a 400."""
    try:
        return Session(*args, **kwargs)
    except PinError as e:
        raise bad_request(str(e), param="system", code="invalid_pin") from None


def fresh_extra(model_id: str, created: int | None = None) -> dict:
    return {"model": model_id, "created": created or int(time.time()), "kind": None,
            "history": {"count": 0, "digest": HISTORY_START}}


class SessionStore:
    """Create, find, save, roll back and delete sessions. Thread-safe; one request per session at a time."""

    def __init__(self, folder: str | Path, model, tokenizer, *, model_id: str, cache_config, sampling,
                 max_live: int = 8, max_sessions: int = 1000, pin_system: bool = False, prefixes=None,
                 runner=None, holder: str | None = None):
        self.holder = holder          # a name: one of several replicas sharing the folder (see the lease above)
        self.shared = holder is not None
        self.pin_system = pin_system  # the default for sessions created with a system prompt
        self.prefixes = prefixes      # `PrefixStore` for system prompts (None: the process's default store)
        self.runner = runner          # the `Batcher` a new session's system prompt is fed through
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.cache_config, self.sampling = cache_config, sampling
        self.max_live, self.max_sessions = max(1, max_live), max_sessions
        self.live: OrderedDict[str, Session] = OrderedDict()
        self.views: dict[str, dict] = {}   # sid -> what `describe` shows of a live session (see `_view`)
        self.busy: set[str] = set()
        self.lock = threading.RLock()      # the tables above; never held across disk I/O
        self.creating = threading.Lock()   # one create at a time (id and limit checks + the first save)
        for tmp in self.folder.glob(f".*{SUFFIX}.*.tmp"):  # saves cut short by a crash
            if self._leftover(tmp):
                tmp.unlink(missing_ok=True)
        for log in self.folder.glob(f"*{SUFFIX}.*.kvlog"):  # block logs no session file names
            if saved_log_folder(log.parent / log.name[:log.name.index(SUFFIX) + len(SUFFIX)]) != log \
                    and self._leftover(log):
                shutil.rmtree(log, ignore_errors=True)

    # --- names ----------------------------------------------------------------------------------------
    def path(self, sid: str) -> Path:
        return self.folder / f"{check_id(sid)}{SUFFIX}"

    def ids(self) -> list[str]:
        return sorted(p.name[:-len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}")
                      if SESSION_ID.match(p.name[:-len(SUFFIX)]))

    def exists(self, sid: str) -> bool:
        return self.path(sid).exists()

    def count_on_disk(self) -> int:
        return len(self.ids())

    def count_live(self) -> int:
        return len(self.live)

    # --- lifecycle ------------------------------------------------------------------------------------
    def create(self, sid: str | None = None, *, system: str | None = None,
               pin_system: bool | None = None) -> Session:
        """A new session, saved before it is returned; a system prompt is fed now (copied from the prefix
        store when another session started with it), pinned when `pin_system` (None: the server default)."""
        pin = self.pin_system if pin_system is None else pin_system
        if pin_system and system is None:
            raise bad_request("pin_system needs a system prompt", param="pin_system", code="pin_without_system")
        sid = check_id(sid) if sid is not None else new_id()
        with self.creating:
            with self.lock:
                if sid in self.busy:
                    raise ApiError(409, f"session {sid!r} already exists", param="id", code="session_exists")
                self.busy.add(sid)  # nobody uses or deletes it before its file is there
            try:
                if self.exists(sid):
                    raise ApiError(409, f"session {sid!r} already exists", param="id", code="session_exists")
                if self.count_on_disk() >= self.max_sessions:
                    raise ApiError(429, f"the server holds its limit of {self.max_sessions} sessions; delete some",
                                   code="too_many_sessions")
                with using(self.runner):
                    s = in_fresh_thread(new_session, self.model, self.tokenizer, self.cache_config, self.sampling,
                                        system, pin_system=pin, prefixes=self.prefixes)
                s.extra = fresh_extra(self.model_id)
                s.extra["id"] = sid
                if system is not None:
                    s.messages = [{"role": "system", "content": system}]
                    s.extra["history"] = {"count": 1, "digest": chain(HISTORY_START, s.messages)}
                self._save(sid, s, new=True)
                self._keep(sid, s)
            finally:
                self.release(sid)
            return s

    def get(self, sid: str) -> Session:
        """The live session, loading it from disk if it is not in memory (404 if there is none).

        Called for a reserved session (see `acquire`), so nobody else loads or changes it meanwhile; the
        file is read outside the lock, which other requests need. A store sharing its folder first checks
        that the file still holds its live copy's epoch, and reloads the session if another replica saved it.
        """
        with self.lock:
            live = self.live.get(sid)
            if live is not None:
                self.live.move_to_end(sid)
        if live is not None:
            if not self.shared or self._file_epoch(sid) == lease_epoch(live.extra):
                return live
            self.rollback(sid)  # moved on (or deleted) by another replica: its file is the session now
        path = self.path(sid)
        if not path.exists():
            raise ApiError(404, f"session {sid!r} not found", param="session", code="session_not_found")
        try:
            s = in_fresh_thread(Session.load, path, self.model, self.tokenizer)
        except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the loader raise
            raise damaged(sid, path, e) from None
        if s.extra.get("model") != self.model_id:
            raise ApiError(409, f"session {sid!r} was made with model {s.extra.get('model')!r}, "
                                f"this server runs {self.model_id!r}", code="session_model_mismatch")
        self._keep(sid, s)
        return s

    def commit(self, sid: str, s: Session) -> None:
        """Persist a completed turn (before the client hears that it completed)."""
        s.messages = s.messages[-RECENT_MESSAGES:]
        self._save(sid, s)
        self._keep(sid, s)

    def rollback(self, sid: str) -> None:
        """Forget the live copy; the next `get` reloads the last completed turn from disk."""
        with self.lock:
            self.live.pop(sid, None)
            self.views.pop(sid, None)

    def delete(self, sid: str) -> None:
        path = self.path(sid)
        with self.lock:
            if sid in self.busy:
                raise ApiError(429, f"session {sid!r} is answering a request; try again", code="session_busy")
            self.busy.add(sid)  # held while the file goes (outside the lock)
        try:
            with self._exclusive(sid, remove=True):  # sharing: no replica's save runs meanwhile
                if not path.exists():
                    raise ApiError(404, f"session {sid!r} not found", param="session_id",
                                   code="session_not_found")
                with self.lock:
                    self.live.pop(sid, None)
                    self.views.pop(sid, None)
                path.unlink()
                for log in self.folder.glob(f"{sid}{SUFFIX}.*.kvlog"):  # its block log (memory cache)
                    shutil.rmtree(log, ignore_errors=True)
        finally:
            self.release(sid)

    def acquire(self, sid: str) -> None:
        if not self.exists(sid):  # outside the lock, as all disk I/O; a delete meanwhile makes `get` say 404
            raise ApiError(404, f"session {sid!r} not found", param="session", code="session_not_found")
        with self.lock:
            if sid in self.busy:
                raise ApiError(429, f"session {sid!r} is answering another request", code="session_busy")
            self.busy.add(sid)

    def release(self, sid: str) -> None:
        with self.lock:
            self.busy.discard(sid)

    # --- inspection -----------------------------------------------------------------------------------
    def describe(self, sid: str, *, messages: bool = False, layout: bool = False) -> dict:
        """What a client may see of a session, as of its last completed turn: the view published by the
        thread that ran it, or the file's header (no tensors read). Any thread; never touches a live Session.
        ``layout=True`` adds ``"layout"``: the cache layout (`sinkstream.server.layout`) of that turn.
        Sharing the folder, the view counts only while the file holds its epoch (no other replica saved)."""
        with self.lock:
            view = self.views.get(sid)
        disk = None
        if view is not None and self.shared:
            disk = self._header(sid)
            if lease_epoch(disk["extra"]) != lease_epoch(view["extra"]):
                view = None
        in_memory = view is not None
        if view is None:
            view = disk or self._header(sid)
        extra, stats = view["extra"], view["stats"]
        out = {"id": sid, "object": "session", "created": extra.get("created"), "model": extra.get("model"),
               "kind": extra.get("kind"), "in_memory": in_memory, "turns": view["turns"],
               "messages_seen": extra.get("history", {}).get("count", 0), "tokens_seen": stats.get("tokens_seen", 0),
               "tokens_cached": stats.get("tokens_cached", 0), "cache_capacity": stats.get("capacity"),
               "cache_bytes": stats.get("cache_bytes", 0), "cache": view["cache"],
               "pinned_tokens": stats.get("pinned", 0)}
        if messages:
            out["recent_messages"] = view["messages"][-RECENT_MESSAGES:]
        if layout:
            out["layout"] = view["layout"]
        return out

    @staticmethod
    def _view(s: Session) -> dict:
        """A copy of what `describe` shows of `s`; made by the thread that owns `s`, read by any."""
        stats = asdict(s.stats())
        return {"extra": json.loads(json.dumps(s.extra)), "turns": s.turns,
                "messages": [dict(m) for m in s.messages[-RECENT_MESSAGES:]], "stats": stats,
                "cache": s.cache.config.describe(), "layout": session_layout(s, stats)}

    def _header(self, sid: str) -> dict:
        from safetensors import safe_open
        path = self.path(sid)
        if not path.exists():
            raise ApiError(404, f"session {sid!r} not found", param="session_id", code="session_not_found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["sinkstream"])
            extra = meta.get("extra") or fresh_extra("?")
            config, stats = CacheConfig(**meta["cache"]), extra.get("stats", {})
            if meta.get("pinned"):  # the cache it runs: the pinned prompt took the sinks' place
                config = config.pinned(int(meta["pinned"]))
            return {"extra": extra, "turns": meta["turns"], "messages": meta["messages"],
                    "stats": stats, "cache": config.describe(), "layout": disk_layout(config, stats)}
        except Exception as e:  # noqa: BLE001 - any unreadable header is a damaged file
            raise damaged(sid, path, e) from None

    def totals(self) -> dict:
        """Cache fill over the live sessions, for /metrics."""
        with self.lock:
            stats = [v["stats"] for v in self.views.values()]
        return {"cached": sum(st["tokens_cached"] for st in stats),
                "capacity": sum(st["capacity"] or 0 for st in stats),
                "bytes": sum(st["cache_bytes"] for st in stats)}

    # --- internals ------------------------------------------------------------------------------------
    def _save(self, sid: str, s: Session, *, new: bool = False) -> None:
        """Save `s` with the next epoch (`new`: the first save, of a session no file holds yet). Sharing the
        folder, the save is made under the session's lock and only if the file still holds the epoch `s` came
        with (409 otherwise); on any failure `s` keeps its old lease."""
        s.extra["stats"] = asdict(s.stats())
        held = None if new else lease_epoch(s.extra)
        old = s.extra.get("lease")
        s.extra["lease"] = {"epoch": (held or 0) + 1, "holder": self.holder}
        try:
            with self._exclusive(sid):
                on_disk = self._file_epoch(sid) if self.shared else held
                if on_disk != held:
                    raise conflict(sid, held, on_disk)
                in_fresh_thread(s.save, self.path(sid))
        except BaseException as e:
            if old is None:
                s.extra.pop("lease", None)
            else:
                s.extra["lease"] = old
            if isinstance(e, (OSError, SafetensorError)):  # a full or read-only disk (safetensors has its own)
                raise ApiError(507, f"cannot save session {sid!r}: {getattr(e, 'strerror', None) or e}; this "
                                    f"turn is not kept, the session stays at its last saved turn",
                               code="session_save_failed") from None
            raise

    def _exclusive(self, sid: str, *, remove: bool = False):
        """Sharing the folder: the session's lock (`lease.exclusive` on ``.<id>.safetensors.lock``); else
        nothing to hold."""
        if not self.shared:
            return contextlib.nullcontext()
        return exclusive(self.folder / f".{check_id(sid)}{SUFFIX}.lock", remove=remove)

    def _leftover(self, path: Path) -> bool:
        """Whether a tmp file or unnamed log found on start is safe to remove: always when this store is the
        folder's only user; sharing it, only when older than any save in progress could be."""
        return not self.shared or old_leftover(path)

    def _file_epoch(self, sid: str) -> int | None:
        """The epoch in the session file's header (reads no tensors); None if there is no file."""
        try:
            return lease_epoch(self._header(sid)["extra"])
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def _keep(self, sid: str, s: Session) -> None:
        """Publish `s` (called by the thread that owns it) at the young end of the LRU and drop the oldest
        idle sessions beyond max_live."""
        view = self._view(s)
        with self.lock:
            self.live[sid], self.views[sid] = s, view
            self.live.move_to_end(sid)
            for old in list(self.live):
                if len(self.live) <= self.max_live:
                    break
                if old not in self.busy and old != sid:
                    del self.live[old]  # already on disk: every completed turn was saved
                    self.views.pop(old, None)
