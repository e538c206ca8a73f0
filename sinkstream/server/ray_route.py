"""Plumbing for the Ray Serve deployment (`sinkstream.deploy`) that needs no Ray: which session a request
belongs to, and running the server's ASGI app on a request that arrives as a plain dict.

`session_of` is what the gateway routes by. A request names its session in the ``X-Session-Id`` header, in a
completion body's ``"session"``, or in the path of the session endpoints (``/v1/sessions/{id}`` and below); a
``POST /v1/sessions`` without an ``"id"`` gets a new one here (written into the body), so that the replica
that creates a session is the one its id routes to. Requests without a session (stateless completions,
listings, /health, /metrics, the page) go to any replica.

`call_app` runs an ASGI app in-process on such a dict and yields the response as it comes: first
``{"status", "headers"}``, then body chunks (bytes; chunks already waiting are joined). When the caller stops
reading (its client left, or it was cancelled) the app's next ``receive()`` answers ``http.disconnect``, so
the app notices as it would under uvicorn and cancels the turn.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re

from .errors import ApiError
from .sessions import SESSION_ID, new_id

log = logging.getLogger("sinkstream.server")

SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)(?:/.*)?$")
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")
HOP_BY_HOP = {b"connection", b"content-length", b"transfer-encoding", b"keep-alive"}
RUNNING: set[asyncio.Task] = set()  # apps answering forwarded requests


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def session_of(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[str | None, bytes]:
    """(the session id the request belongs to or None, the body to forward). Ids that are not valid session
    ids route nowhere in particular: the replica answers them with its usual 400."""
    sid = header(headers, b"x-session-id")
    if sid is None:
        m = SESSION_PATH.match(path)
        if m:
            sid = m.group(1)
        elif method == "POST" and path in COMPLETIONS + ("/v1/sessions",):
            try:
                obj = json.loads(body) if body.strip() else {}
            except (ValueError, UnicodeDecodeError):
                obj = None  # the replica answers 400
            if isinstance(obj, dict):
                if path == "/v1/sessions":
                    sid = obj.get("id")
                    if sid is None:
                        sid = new_id()
                        body = json.dumps({**obj, "id": sid}).encode()
                else:
                    sid = obj.get("session")
    return (sid if isinstance(sid, str) and SESSION_ID.match(sid) else None), body


async def read_body(receive, limit: int) -> bytes | None:
    """The whole request body; None if the client left first. Raises 413 past `limit` bytes."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def error_messages(e: ApiError, extra_headers: list[tuple[bytes, bytes]] = ()) -> list[dict]:
    """The ASGI messages of an OpenAI-shaped error response."""
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    return [{"type": "http.response.start", "status": e.status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]


async def call_app(app, request: dict, *, extra_headers: list[tuple[bytes, bytes]] = ()):
    """Run ASGI `app` on `request` ({"method", "path", "query", "headers", "body", "client"}); an async
    generator of ``{"status", "headers"}`` (`extra_headers` added) and then the body's chunks."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"],
             "raw_path": request["path"].encode(), "query_string": request.get("query", b""), "root_path": "",
             "headers": [tuple(h) for h in request["headers"]], "client": request.get("client"),
             "server": ("127.0.0.1", 80), "state": {}}
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.get("body", b""), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set():
            raise OSError("the client went away")
        out.put_nowait(message)

    async def run():
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - the app renders its own errors; this is a bug, reported as 500
            log.exception("the app failed on a forwarded request")
            for m in error_messages(ApiError(500, "internal error", code="internal_error")):
                out.put_nowait(m)
        finally:
            out.put_nowait(None)

    task = asyncio.ensure_future(run())
    RUNNING.add(task)  # a strong reference: the app may run on after the caller stopped reading
    task.add_done_callback(RUNNING.discard)
    started = False
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                if started:
                    continue
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in HOP_BY_HOP]
                yield {"status": message["status"], "headers": headers + list(extra_headers)}
                continue
            if message["type"] != "http.response.body" or not started:
                continue
            parts, more = [message.get("body", b"")], message.get("more_body", False)
            while more and not out.empty():  # join what is already waiting: fewer, larger chunks
                nxt = out.get_nowait()
                if nxt is None or nxt["type"] != "http.response.body":
                    out.put_nowait(nxt)  # never happens in practice: a body ends before anything else
                    break
                parts.append(nxt.get("body", b""))
                more = nxt.get("more_body", False)
            chunk = b"".join(parts)
            if chunk:
                yield chunk
            if not more:
                break
        if not started:
            for m in error_messages(ApiError(500, "the app sent no response", code="internal_error")):
                if m["type"] == "http.response.start":
                    yield {"status": m["status"], "headers": m["headers"] + list(extra_headers)}
                else:
                    yield m["body"]
    finally:
        gone.set()  # the app sees http.disconnect and cancels what it was doing; it ends on its own
