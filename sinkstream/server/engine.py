"""What a request does on the worker thread: stateless chat/completion, or one turn of a session.

Knows nothing about HTTP: it reads a `Turn`, talks to the core (`Session`, `stream_generate`) and
reports `Event`s to the job. Every check that can fail runs before the session changes; anything that
goes wrong after that (cancel, error) rolls the session back to its last saved turn.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..batch import in_fresh_thread
from ..errors import PinError
from ..generate import GenerationResponse, stream_generate
from ..sampling import SamplingConfig, make_logits_processors, make_sampler
from ..session import Session
from ..tokenizer import render_chat
from .errors import ApiError, bad_request
from .metrics import Metrics
from .sessions import HISTORY_START, ReplyChain, SessionStore, chain
from .worker import Event, Job, Worker


@dataclass
class Turn:
    """One request, parsed and validated against the server's limits (see schemas.py)."""
    kind: str                            # "chat" or "text"
    max_tokens: int
    sampling: SamplingConfig
    reseed: bool = False                 # a seed was given: restart the session's sampler from it
    stop: list[str] = field(default_factory=list)
    messages: list[dict] | None = None   # chat: [{"role", "content": str}]
    prompt: str | None = None            # text
    session: str | None = None
    append: bool = False                 # messages hold only the new turn, not the whole history
    resync: bool = False                 # rebuild the session from messages if they disagree with it


class Engine:
    def __init__(self, model, tokenizer, *, model_id: str, cache_config, store: SessionStore, worker: Worker,
                 metrics: Metrics, max_prompt_tokens: int):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.cache_config, self.store, self.worker, self.metrics = cache_config, store, worker, metrics
        self.max_prompt_tokens = max_prompt_tokens

    def submit(self, turn: Turn, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue `turn`; 404/429 for a missing or busy session, 503 when the queue is full."""
        job = Job(run=lambda j: self._run(j, turn), loop=loop)
        if turn.session is not None:
            self.store.acquire(turn.session)
            job.on_finish.append(lambda: self.store.release(turn.session))
        try:
            self.worker.submit(job)
        except ApiError:
            self.metrics.reject()
            raise
        return job

    # --- dispatch -------------------------------------------------------------------------------------
    def _run(self, job: Job, turn: Turn) -> Event:
        if turn.session is None:
            final = self._stateless(job, turn)
            return Event("done", finish_reason=final.finish_reason, usage=self._usage(final))
        sid = turn.session
        s = self.store.get(sid)
        try:
            final = self._session_chat(job, s, turn) if turn.kind == "chat" else self._session_text(job, s, turn)
            job.check()  # the client left before the end: the turn does not count
            s.extra["kind"] = turn.kind
            self.store.commit(sid, s)
        except BaseException:
            self.store.rollback(sid)
            raise
        return Event("done", finish_reason=final.finish_reason, usage=self._usage(final),
                     session=self.store.describe(sid))

    def _stateless(self, job: Job, turn: Turn) -> GenerationResponse:
        text = self._render(turn.messages) if turn.kind == "chat" else turn.prompt
        ids = self._encode(text)
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        self._check_length(len(ids))
        cache = in_fresh_thread(self.model.make_cache, self.cache_config)  # see in_fresh_thread
        return self._pump(job, stream_generate(self.model, self.tokenizer, ids, cache=cache,
                                               max_tokens=turn.max_tokens, sampling=turn.sampling,
                                               stop=turn.stop, progress=job.check))

    # --- sessions -------------------------------------------------------------------------------------
    def _session_chat(self, job: Job, s: Session, turn: Turn) -> GenerationResponse:
        self._check_kind(s, "chat")
        new = self._new_messages(s, turn)
        if new[-1]["role"] != "user":
            raise bad_request("the last message must be a user message", param="messages")
        user, head = new[-1], new[:-1]
        if s.last_reply is not None and head:
            raise bad_request("after the session's history, send exactly one new user message", param="messages")
        replay = self._replay_text(s, head) if head else None
        n = len(self._encode(user["content"])) + (len(self._encode(replay)) if replay else 0)
        self._check_length(n)
        if replay is not None:
            self._replay(job, s, head, replay)
        elif head:  # a system prompt before the first user message: the stream starts with it
            self._use_system(s, head[0]["content"])
            s.messages = s.messages + head
        self._use_sampling(s, turn)
        h = s.extra["history"]
        reply = ReplyChain(chain(h["digest"], new))  # hashes the reply as it streams: it is not kept whole
        final = self._pump(job, s.chat(user["content"], max_tokens=turn.max_tokens, stop=turn.stop,
                                       progress=job.check), on_text=reply.add)
        s.extra["history"] = {"count": h["count"] + len(new) + 1, "digest": reply.digest()}
        return final

    def _new_messages(self, s: Session, turn: Turn) -> list[dict]:
        """The messages after what the session has seen; resets the session when asked to re-sync."""
        msgs = turn.messages
        if turn.append:
            return msgs
        h = s.extra["history"]
        n = h["count"]
        if len(msgs) > n and chain(HISTORY_START, msgs[:n]) == h["digest"]:
            return msgs[n:]
        if turn.resync:
            s.system = None
            in_fresh_thread(s.reset)
            s.extra["history"] = {"count": 0, "digest": HISTORY_START}
            return msgs
        raise ApiError(409, f"messages do not continue session {turn.session!r}, which has seen {n} messages: "
                            f"send the whole conversation including the server's replies, or only the new "
                            f"message with \"append\": true, or \"resync\": true to rebuild the session from "
                            f"these messages", param="messages", code="session_history_mismatch")

    def _replay_text(self, s: Session, head: list[dict]) -> str | None:
        """Template text that brings a session with no completed turn up to `head` (ends with a reply)."""
        full = s.messages + head
        if head[-1]["role"] != "assistant":
            if all(m["role"] == "system" for m in full) and len(full) == 1:
                return None  # a system prompt alone is rendered with the first user message
            raise bad_request("a history must end with an assistant message before the new user message",
                              param="messages")
        return self._render(full[:-1]) + full[-1]["content"]

    def _replay(self, job: Job, s: Session, head: list[dict], text: str) -> None:
        full = s.messages + head
        if full[0]["role"] == "system" and s.prefix_text is None:
            self._use_system(s, full[0]["content"])
        if s.prefix_text is not None and text.startswith(s.prefix_text):  # already in the cache
            text = text[len(s.prefix_text):]
        s.feed(text, progress=job.check)
        s.last_reply = full[-1]["content"]  # as if the model had just said it (Session closes it next turn)
        s.messages = list(full)
        s.turns = sum(m["role"] == "assistant" for m in full)
        if full[0]["role"] == "system":
            s.system = full[0]["content"]

    def _session_text(self, job: Job, s: Session, turn: Turn) -> GenerationResponse:
        self._check_kind(s, "text")
        ids = self._encode(turn.prompt)
        if not ids and (s.pending is None or s.pending in s.stop_ids):
            raise bad_request("the prompt is empty", param="prompt")
        self._check_length(len(ids))
        self._use_sampling(s, turn)
        return self._pump(job, s.send(turn.prompt, max_tokens=turn.max_tokens, stop=turn.stop,
                                      progress=job.check))

    @staticmethod
    def _use_system(s: Session, system: str) -> None:
        """Start the session's stream with `system` (pinned if the session pins), on a short-lived thread."""
        try:
            in_fresh_thread(s.use_system, system)
        except PinError as e:
            raise bad_request(str(e), param="messages", code="invalid_pin") from None

    @staticmethod
    def _check_kind(s: Session, kind: str) -> None:
        used = s.extra.get("kind")
        if used is not None and used != kind:
            where = "/v1/chat/completions" if used == "chat" else "/v1/completions"
            raise bad_request(f"this session holds a {used} stream; continue it with {where}", param="session",
                              code="session_kind_mismatch")

    def _use_sampling(self, s: Session, turn: Turn) -> None:
        """Per-request sampling; without a seed the session's random stream carries on across turns."""
        if turn.sampling == s.sampling and not turn.reseed:
            return
        old = getattr(s.sampler, "generator", None)
        s.sampling = turn.sampling
        s.sampler = make_sampler(turn.sampling, self.model.device)
        s.processors = make_logits_processors(turn.sampling)
        new = getattr(s.sampler, "generator", None)
        if new is not None and old is not None and not turn.reseed:
            new.set_state(old.get_state())

    # --- shared ---------------------------------------------------------------------------------------
    def _pump(self, job: Job, stream, on_text=None) -> GenerationResponse:
        """Forward a generation to the job as events; stop (raising Cancelled) if the client leaves."""
        job.emit(Event("start"))
        final, last = None, None
        try:
            for r in stream:
                now = time.perf_counter()
                if last is None:
                    self.metrics.first_token(now - job.submitted)
                else:
                    self.metrics.next_token(now - last)
                last, final = now, r
                if r.text:
                    job.emit(Event("delta", text=r.text))
                    if on_text is not None:
                        on_text(r.text)
                if r.finish_reason is None:
                    job.check()
        finally:
            stream.close()
        self.metrics.tokens(final.prompt_tokens, final.generation_tokens)
        return final

    def _render(self, messages: list[dict]) -> str:
        try:
            return render_chat(self.tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - templates raise their own errors for unsupported shapes
            raise bad_request(f"the model's chat template rejected these messages: {e}", param="messages") from None

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_length(self, n: int) -> None:
        if n > self.max_prompt_tokens:
            raise bad_request(f"the prompt has {n} tokens; this server accepts at most {self.max_prompt_tokens} "
                              f"per request", param="messages", code="prompt_too_long")

    @staticmethod
    def _usage(final: GenerationResponse) -> dict:
        return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.generation_tokens,
                "total_tokens": final.prompt_tokens + final.generation_tokens}
