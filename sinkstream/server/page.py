"""The server's web page and the one endpoint it adds to the API.

`add_page_routes(app, state)` serves:

* ``GET /``: ``static/index.html``, a chat page with a live view of the current session's cache (plain
  JS/CSS in ``static/``, no build step, nothing fetched from elsewhere: its Content-Security-Policy allows
  only this server). Public, like ``/health``: the page asks for the API key when the API answers 401.
* ``GET /static/<name>``: the page's other files (only the files in that folder; read once, at startup).
* ``GET /v1/sessions/{id}/cache``: a session's cache layout as of its last completed turn (see
  `sinkstream.server.layout`), from the view the session store publishes after each turn, or from the
  session file's header when the session is not in memory (``"in_memory": false``, no tensors read).
"""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, Field

from .errors import ApiError
from .sessions import check_id

STATIC = "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# the page talks to this server only; no inline script or style, no frames
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Ring(BaseModel):
    """One ring of cache slots: ``sinks`` kept for ever, then ``window`` slots reused in turn."""
    sinks: int
    window: int
    size: int = Field(description="sinks + window slots")
    filled: int = Field(description="slots holding a token")
    sinks_filled: int
    window_filled: int
    next_slot: int | None = Field(description="slot the next token fed is written to (null: none, e.g. a full "
                                              "dense cache or recompute)")
    wrapped: bool = Field(description="the window has been overwritten at least once")
    oldest: int | None = Field(description="stream index of the oldest token still in the window")
    layers: int | None = Field(None, description="layers using this ring (live sessions)")


class RecalledBlock(BaseModel):
    block: int = Field(description="block number (0 = the first tokens that left the window)")
    slots: int = Field(description="(layer, kv head) recall slots holding it")


class Memory(BaseModel):
    """``--cache memory``: blocks of evicted tokens and which of them are recalled."""
    block_size: int
    top_k: int
    blocks: int = Field(description="finished blocks of evicted tokens")
    open_block_fill: int | None = Field(description="evicted tokens waiting for the next block")
    recalled: list[RecalledBlock] | None = Field(description="blocks held in recall slots after the last turn "
                                                             "(null for a session not in memory)")
    recall_slots: int | None = Field(description="recall slots in all: memory layers x kv heads x top_k")
    disk_bytes: int | None = Field(description="bytes of blocks spilled to disk")


class CacheLayout(BaseModel):
    """A session's cache as of its last completed turn."""
    id: str
    object: str = "session.cache"
    in_memory: bool = Field(description="false: read from the session file's header")
    turns: int
    cache: str = Field(description='the policy in short, e.g. "sink(4,1020)"')
    policy: str
    sinks: int
    window: int
    capacity: int | None = Field(description="tokens the cache can hold")
    tokens_seen: int
    tokens_cached: int
    cache_bytes: int
    ring: Ring = Field(description="the ring of the layers with the largest cache")
    groups: list[Ring] | None = Field(description="every ring (models with local layers have two); null on disk")
    memory: Memory | None


def add_page_routes(app: FastAPI, state) -> None:
    """Add `/`, `/static/<name>` and `GET /v1/sessions/{id}/cache` to `app` (`state`: the ServerState)."""
    folder = resources.files(__package__) / STATIC
    files = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1] if "." in item.name else ""
        if item.is_file() and suffix in TYPES:
            files[item.name] = (item.read_bytes(), TYPES[suffix])

    def serve(name: str, *, page: bool = False) -> Response:
        if name not in files:
            raise ApiError(404, f"no file {name!r}", code="not_found")
        body, kind = files[name]
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
        if page:
            headers.update({"Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY"})
        return Response(body, media_type=kind, headers=headers)

    @app.get("/", include_in_schema=False)
    async def index():
        return serve("index.html", page=True)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        return serve(name, page=name.endswith(".html"))

    @app.get("/v1/sessions/{session_id}/cache", response_model=CacheLayout, summary="a session's cache layout",
             description="Sinks, ring window (fill and next write slot), tokens seen and cached, KV bytes and, "
                         "for `--cache memory`, blocks and recalled blocks, as of the last completed turn.")
    def session_cache(session_id: str):  # a thread: a session not in memory is read from its file header
        store = state.need().store
        sid = check_id(session_id)
        d = store.describe(sid, layout=True)
        return {**d["layout"], "id": sid, "object": "session.cache", "in_memory": d["in_memory"],
                "turns": d["turns"], "cache": d["cache"]}
