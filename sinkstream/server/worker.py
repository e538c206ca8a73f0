"""Request threads fed by a bounded queue; their forward passes are batched by one `Batcher`.

Up to ``threads`` requests run at once, each on its own thread: it checks the request, drives its session
(replay, generation, the save after the turn) and talks to its client. Every forward pass they need goes
through the `Batcher` set for the thread (`sinkstream.batch.using`), whose single thread runs the passes of
all running requests together; the torch work of a batch stays on that thread. A save runs on the
request's thread, off the batch's path. More requests wait in the queue (``max_queue``; beyond it, 503).
The HTTP side talks to a `Job` only through its event queue (request thread -> event loop) and its cancel
flag (event loop -> request thread, checked between tokens and between prefill chunks).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ContextOverflowError, EmptyInputError, SinkstreamError
from .errors import ApiError

log = logging.getLogger("sinkstream.server")


class Cancelled(Exception):
    """Raised inside a job when its client went away."""


@dataclass
class Event:
    kind: str                       # "start" | "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    session: dict | None = None
    error: ApiError | None = None


@dataclass(eq=False)  # hashed by identity: the worker keeps a set of running jobs
class Job:
    run: Callable[["Job"], Event]   # runs on the worker thread, emits "start"/"delta", returns the last event
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    on_finish: list[Callable[[], None]] = field(default_factory=list)

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()

    def check(self, *_) -> None:
        """Raise `Cancelled` if the client went away; usable as a prefill progress callback."""
        if self.cancelled.is_set():
            raise Cancelled()


class Worker:
    def __init__(self, max_queue: int = 8, *, threads: int = 1, runner=None,
                 on_cancel: Callable[[], None] = lambda: None, on_start: Callable[[Job], None] = lambda job: None):
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, max_queue))
        self.on_cancel, self.on_start, self.runner = on_cancel, on_start, runner
        self.running: set[Job] = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, name=f"sinkstream-request-{i}", daemon=True)
                        for i in range(max(1, threads))]
        for t in self.threads:
            t.start()

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    @property
    def active(self) -> int:
        with self.lock:
            return len(self.running)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self._finish(job)
            raise ApiError(503, f"the server is busy ({self.queue.maxsize} requests waiting); retry shortly",
                           code="queue_full") from None

    def stop(self) -> None:
        """Cancel the running and the waiting requests (their turns roll back), then end the thread."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                self._finish(job)
                job.emit(Event("error", error=ApiError(503, "the server is shutting down", code="shutting_down")))
        with self.lock:
            for job in self.running:
                job.cancel()
        for _ in self.threads:
            try:
                self.queue.put(None, timeout=5)
            except queue.Full:  # a request slipped in meanwhile; the threads are daemons and end with the process
                return
        for t in self.threads:
            t.join(timeout=10)

    def _loop(self) -> None:
        if self.runner is None:
            return self._serve()
        from ..batch import using
        with using(self.runner):
            return self._serve()

    def _serve(self) -> None:
        while (job := self.queue.get()) is not None:
            with self.lock:
                self.running.add(job)
            try:
                self.on_start(job)
                job.check()
                last = job.run(job)
            except Cancelled:
                self.on_cancel()
                last = Event("error", error=ApiError(499, "client closed the request", code="cancelled"))
            except ApiError as e:
                last = Event("error", error=e)
            except EmptyInputError as e:
                last = Event("error", error=ApiError(400, str(e), code="empty_input"))
            except ContextOverflowError as e:  # a dense cache that is full
                last = Event("error", error=ApiError(400, str(e), code="context_length_exceeded"))
            except SinkstreamError as e:
                last = Event("error", error=ApiError(400, str(e), code="invalid_request"))
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the worker
                log.exception("generation failed")
                last = Event("error", error=ApiError(500, f"generation failed: {type(e).__name__}: {e}",
                                                     code="generation_failed"))
            with self.lock:
                self.running.discard(job)
            self._finish(job)  # release the session before the client hears the end and sends its next turn
            job.emit(last)

    @staticmethod
    def _finish(job: Job) -> None:
        for fn in job.on_finish:
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("cleanup failed")
