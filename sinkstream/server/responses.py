"""OpenAI's response shapes: whole answers, streaming chunks (server-sent events) and errors."""
from __future__ import annotations

import json
import secrets
import time

from fastapi.responses import JSONResponse

from .errors import ApiError
from .worker import Event


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """OpenAI's response and chunk shapes for one request (same id and created in every chunk)."""

    def __init__(self, kind: str, model_id: str):
        self.kind, self.model = kind, model_id
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chunk(self, *, text: str = "", role: bool = False, finish: str | None = None, usage_field: bool = False,
              session: dict | None = None) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            out = {**self._head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage_field:
            out["usage"] = None
        if session is not None:
            out["session"] = session
        return out

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

    def whole(self, text: str, ev: Event) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": ev.finish_reason}
            out = {**self._head("chat.completion"), "choices": [choice], "usage": ev.usage}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ev.finish_reason}
            out = {**self._head("text_completion"), "choices": [choice], "usage": ev.usage}
        if ev.session is not None:
            out["session"] = ev.session
        return out
