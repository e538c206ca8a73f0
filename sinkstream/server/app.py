"""The HTTP app: OpenAI-compatible endpoints, session endpoints, health and metrics.

`create_app(settings)` returns a FastAPI app that loads the model in a background thread (GET /health
answers 503 until it is ready). The handlers only translate HTTP <-> `Turn`/`Event`; the work happens in
`engine.Engine` on the one worker thread. Nothing on the event loop blocks: handlers that touch the disk
(sessions, /metrics) run in starlette's thread pool. See docs/SERVER.md for the API.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..batch import Batcher
from ..cache import CacheConfig
from ..errors import SinkstreamError
from ..prefix import PrefixStore
from ..sampling import SamplingConfig
from .engine import Engine
from .errors import ApiError, validation_error
from .metrics import Metrics
from .page import add_page_routes
from .responses import Reply, error_response, sse
from .schemas import ChatCompletionRequest, CompletionRequest, Limits, SessionCreate, to_turn
from .sessions import SessionStore, check_id
from .worker import Event, Job, Worker

log = logging.getLogger("sinkstream.server")


@dataclass
class Settings:
    model: str | None = None                # path or short name, as for sinkstream.load
    model_id: str = "smollm2"               # the name clients use in "model"
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "auto"                     # weight quantization, as load(quant=)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # defaults for omitted fields
    state_dir: str | None = None            # None: a temporary folder, sessions end with the process
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    pin_system: bool = False                # sessions keep their system prompt for ever unless they ask not to
    prefix_bytes: int = 256 << 20           # the shared-prefix store (system prompts computed once); 0: off
    replica: str | None = None              # a name: one of several replicas sharing state_dir (sessions leased)


class ServerState:
    """What the handlers share: the engine once the model is loaded, or why it failed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.error: str | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.batcher: Batcher | None = None

    def load(self, loader: Callable, on_error: Callable[[str], None]) -> None:
        s = self.settings
        try:
            extra = {} if s.quant in (None, "auto") else {"quant": s.quant}
            model, tokenizer = loader(s.model, dtype=s.dtype, device=s.device, quiet=True, **extra)
            folder = s.state_dir
            if folder is None:
                self.tmp = tempfile.TemporaryDirectory(prefix="sinkstream-sessions-")
                folder = self.tmp.name
            store = SessionStore(folder, model, tokenizer, model_id=s.model_id, cache_config=s.cache,
                                 sampling=s.sampling, max_live=s.limits.max_live, max_sessions=s.limits.max_sessions,
                                 pin_system=s.pin_system, prefixes=PrefixStore(s.prefix_bytes), holder=s.replica)
            self.batcher = Batcher(model, prefill_budget=s.limits.prefill_budget,
                                   on_step=lambda st: self.metrics.step(st.feeds, st.seconds))
            store.runner = self.batcher
            worker = Worker(s.limits.max_queue, threads=s.limits.max_batch, runner=self.batcher,
                            on_cancel=self.metrics.cancel,
                            on_start=lambda job: self.metrics.started(time.perf_counter() - job.submitted))
            self.engine = Engine(model, tokenizer, model_id=s.model_id, cache_config=s.cache, store=store,
                                 worker=worker, metrics=self.metrics, max_prompt_tokens=s.limits.max_prompt_tokens)
        except Exception as e:  # noqa: BLE001 - reported on /health and by the CLI
            self.error = str(e) if isinstance(e, SinkstreamError) else f"{type(e).__name__}: {e}"
            on_error(self.error)

    def close(self) -> None:
        """Stop the request threads (running turns roll back) and the batch thread; drop a temporary folder."""
        if self.engine is not None:
            self.engine.worker.stop()
        if self.batcher is not None:
            self.batcher.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    def need(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, "the model is still loading" if self.error is None else f"no model: {self.error}",
                           code="model_loading")
        return self.engine

    def gauges(self) -> dict:
        e = self.engine
        if e is None:
            return {"sinkstream_ready": ("1 once the model is loaded.", 0)}
        t = e.store.totals()
        return {"sinkstream_ready": ("1 once the model is loaded.", 1),
                "sinkstream_sessions_live": ("Sessions held in memory.", e.store.count_live()),
                "sinkstream_sessions_on_disk": ("Sessions saved in the state folder.", e.store.count_on_disk()),
                "sinkstream_queue_depth": ("Requests waiting for a request thread.", e.worker.depth),
                "sinkstream_requests_running": ("Requests being answered (their passes batched).",
                                                e.worker.active),
                "sinkstream_cache_tokens_cached": ("KV tokens held by the live sessions.", t["cached"]),
                "sinkstream_cache_tokens_capacity": ("KV capacity of the live sessions.", t["capacity"]),
                "sinkstream_cache_fill_ratio": ("cached / capacity over the live sessions.",
                                                t["cached"] / t["capacity"] if t["capacity"] else 0),
                "sinkstream_cache_bytes": ("KV cache memory of the live sessions.", t["bytes"])}


class Guard:
    """ASGI middleware: API key on /v1/*, body size limit (413), request counting for /metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.key = state.settings.api_key
        self.max_body = state.settings.limits.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            if error is not None:
                return await error_response(error)(scope, receive, counted_send)
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _TooLarge(self.max_body)
                return message

            try:
                await self.app(scope, limited_receive, counted_send)
            except _TooLarge:
                await error_response(self._too_large())(scope, receive, counted_send)
        finally:
            route = path if not path.startswith("/v1/sessions/") else "/v1/sessions/{id}"
            known = route in KNOWN_PATHS
            self.state.metrics.request(route if known else "other", method, status["code"])

    def _refuse(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.key and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
                return ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return self._too_large() if length.isdigit() else ApiError(400, "bad Content-Length header")
        return None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body is larger than {self.max_body} bytes", code="request_too_large")


class _TooLarge(StarletteHTTPException):
    """Raised while reading a body past the limit (FastAPI passes HTTP exceptions through unchanged)."""

    def __init__(self, limit: int = 0):
        super().__init__(413, f"request body is larger than {limit} bytes")


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/sessions",
               "/v1/sessions/{id}", "/openapi.json", "/"}


LOOPBACK_ORIGIN = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"

SESSION_HEADER = Header(None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description='session id (or "session" in the body)')


class ClientGone(Exception):
    pass


class Events:
    """A job's events for a handler that is not streaming: cancels the job if the client disconnects.

    Starlette notices a disconnect only when asked, so ask every half second, tokens flowing or not.
    """

    def __init__(self, job: Job, request: Request):
        self.job, self.request = job, request
        self.checked = time.monotonic()

    async def next(self) -> Event:
        while True:
            if time.monotonic() - self.checked > 0.5:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.job.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                pass


def create_app(settings: Settings, *, loader: Callable | None = None,
               on_load_error: Callable[[str], None] = lambda msg: None) -> FastAPI:
    """The app; `loader(model, dtype=, device=, quiet=[, quant=])` -> (model, tokenizer), default
    sinkstream.load."""
    state = ServerState(settings)

    async def lifespan(app):
        from ..loading import load
        t = threading.Thread(target=state.load, args=(loader or load, on_load_error), daemon=True,
                             name="sinkstream-load")
        t.start()
        yield
        state.close()

    app = FastAPI(title="sinkstream", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible server with endless, persistent sessions (see docs/SERVER.md).")
    app.state.sinkstream = state

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        codes = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return error_response(ApiError(e.status_code, str(e.detail), code=codes.get(e.status_code)))

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    # --- public ---------------------------------------------------------------------------------------
    @app.get("/health", summary="200 once the model is loaded, 503 before")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading" if state.error is None else "error", "error": state.error},
                                status_code=503)
        return {"status": "ok", "model": settings.model_id}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics():  # a thread: counting the sessions on disk is disk I/O
        return PlainTextResponse(state.metrics.render(state.gauges()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- OpenAI ---------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        state.need()
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": 0,
                                            "owned_by": "sinkstream"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               x_session_id: str | None = SESSION_HEADER):
        return await _complete(body, request, x_session_id, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          x_session_id: str | None = SESSION_HEADER):
        return await _complete(body, request, x_session_id, "text")

    async def _complete(body, request: Request, header_session, kind: str):
        engine = state.need()
        turn = to_turn(body, kind=kind, header_session=header_session, defaults=settings.sampling,
                       limits=settings.limits, model_id=settings.model_id)
        # a thread: reserving a session looks at the disk, which must never stall the event loop
        job = await run_in_threadpool(engine.submit, turn, asyncio.get_running_loop())
        events = Events(job, request)
        try:
            first = await events.next()
        except ClientGone:
            return Response(status_code=499)
        if first.kind == "error":
            raise first.error
        fmt = Reply(kind, settings.model_id)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(job, fmt, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts = []
        while True:
            try:
                ev = await events.next()
            except ClientGone:
                return Response(status_code=499)
            if ev.kind == "delta":
                parts.append(ev.text)
            elif ev.kind == "error":
                raise ev.error
            elif ev.kind == "done":
                return fmt.whole("".join(parts), ev)

    async def _stream(job: Job, fmt: Reply, include_usage: bool):
        try:
            yield sse(fmt.chunk(role=True, usage_field=include_usage))
            while True:
                ev = await job.events.get()
                if ev.kind == "delta":
                    yield sse(fmt.chunk(text=ev.text, usage_field=include_usage))
                elif ev.kind == "error":
                    yield sse(ev.error.body())
                    break
                elif ev.kind == "done":
                    yield sse(fmt.chunk(finish=ev.finish_reason, usage_field=include_usage, session=ev.session))
                    if include_usage:
                        yield sse(fmt.usage_chunk(ev.usage))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # no-op once the job is done; stops generation if the client went away

    # --- sessions -------------------------------------------------------------------------------------
    @app.post("/v1/sessions", summary="create a session")
    def create_session(body: SessionCreate | None = None):
        store = state.need().store
        body = body or SessionCreate()
        s = store.create(body.id, system=body.system, pin_system=body.pin_system)
        return store.describe(s.extra["id"])

    @app.get("/v1/sessions", summary="list sessions (in memory and on disk)")
    def list_sessions():
        store = state.need().store
        data = []
        for sid in store.ids():
            try:
                data.append(store.describe(sid))
            except ApiError:  # deleted meanwhile, or damaged: listed by id only
                data.append({"id": sid, "object": "session", "damaged": True})
        return {"object": "list", "data": data}

    @app.get("/v1/sessions/{session_id}", summary="inspect a session")
    def get_session(session_id: str):
        store = state.need().store
        return store.describe(check_id(session_id), messages=True)

    @app.delete("/v1/sessions/{session_id}", summary="delete a session")
    def delete_session(session_id: str):
        store = state.need().store
        store.delete(check_id(session_id))
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    add_page_routes(app, state)  # the web page at / and GET /v1/sessions/{id}/cache (server/page.py)

    app.openapi = lambda: _document(app, settings)
    app.add_middleware(Guard, state=state)
    # Outside Guard: a browser's preflight carries no key. With a key any page may ask (the key still
    # guards every call); without one only pages from this machine, so no website can drive the server.
    app.add_middleware(CORSMiddleware, allow_origins=["*"] if settings.api_key else [],
                       allow_origin_regex=None if settings.api_key else LOOPBACK_ORIGIN,
                       allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"], max_age=600)
    return app


def _document(app: FastAPI, settings: Settings) -> dict:
    """The OpenAPI document, with this server's model id and max_tokens limit written in."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            props = schema["components"]["schemas"][name]["properties"]
            props["model"]["anyOf"] = [{"type": "string", "enum": [settings.model_id]}, {"type": "null"}]
            for field_name in ("max_tokens", "max_completion_tokens"):
                for option in props.get(field_name, {}).get("anyOf", []):
                    if option.get("type") == "integer":
                        option["maximum"] = settings.limits.max_tokens
        app.openapi_schema = schema
    return app.openapi_schema


def settings_id(model: str | None) -> str:
    """The id clients use for a model argument: its short name, or the file/folder name."""
    if model is None:
        return "smollm2"
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name or str(model))
