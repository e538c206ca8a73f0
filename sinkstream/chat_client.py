"""`sinkstream chat --server URL --session ID`: the interactive chat, against a running `sinkstream serve`.

Standard library only (urllib). Each turn sends just the new user message to the server session
(``"append": true``), so requests stay small however long the conversation runs; the server keeps the
rest in the session's cache and on disk.
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

from .errors import SinkstreamError
from .repl import HELP, run_repl, stats_line



class Remote:
    def __init__(self, url: str, api_key: str | None, *, timeout: float = 600):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None, *, stream: bool = False):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 - the user's own server URL
        except urllib.error.HTTPError as e:
            raise RemoteError(e.code, _message(e.read())) from None
        except (urllib.error.URLError, OSError) as e:
            raise SinkstreamError(f"cannot reach the server at {self.url}: {getattr(e, 'reason', e)}") from None
        if stream:
            return resp
        with resp:
            return json.loads(resp.read())

    def stream_chat(self, body: dict):
        """Yield parsed SSE data objects of a streaming chat completion."""
        with self.request("POST", "/v1/chat/completions", {**body, "stream": True}, stream=True) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    raise RemoteError(500, obj["error"].get("message", "generation failed"))
                yield obj


class RemoteError(SinkstreamError):
    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status


def _message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:200]


def _create_body(args, sid: str | None) -> dict:
    body = {"id": sid, "system": args.system}
    if getattr(args, "pin_system", False):
        body["pin_system"] = True
    return body


def _open_session(remote: Remote, args) -> dict:
    if args.session is not None:
        try:
            return remote.request("GET", f"/v1/sessions/{args.session}")
        except RemoteError as e:
            if e.status != 404:
                raise
    return remote.request("POST", "/v1/sessions", _create_body(args, args.session))


def _sampling(args) -> dict:
    out = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.top_k:
        out["top_k"] = args.top_k
    if args.min_p:
        out["min_p"] = args.min_p
    if args.repetition_penalty != 1.0:
        out["repetition_penalty"] = args.repetition_penalty
    if args.seed is not None:
        out["seed"] = args.seed
    return out


def chat_remote(args) -> int:
    remote = Remote(args.server, args.api_key or os.environ.get("SINKSTREAM_API_KEY"))
    info = _open_session(remote, args)
    sid = info["id"]
    print(f"sinkstream chat: session {sid} on {remote.url} ({info['turns']} turns so far, cache {info['cache']}). "
          f"{HELP}", file=sys.stderr)
    state = {"first": True, "info": info}

    def reset() -> str:
        remote.request("DELETE", f"/v1/sessions/{sid}")
        state["info"] = remote.request("POST", "/v1/sessions", _create_body(args, sid))
        return f"[session {sid} started over]"

    def stats() -> str:
        st = remote.request("GET", f"/v1/sessions/{sid}")
        return stats_line(st["turns"], st["tokens_seen"], st["tokens_cached"], st["cache_capacity"],
                          st["cache_bytes"])

    def reply(line: str) -> None:
        messages = [{"role": "user", "content": line}]
        if state["first"] and args.system and state["info"].get("messages_seen", 0) == 0:
            messages.insert(0, {"role": "system", "content": args.system})
        body = {"session": sid, "append": True, "messages": messages, "stream_options": {"include_usage": True},
                **_sampling(args)}
        t0, usage, t_first = time.perf_counter(), None, None
        try:
            for chunk in remote.stream_chat(body):
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        t_first = t_first or time.perf_counter()
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                usage = chunk.get("usage") or usage
        except RemoteError as e:
            print(f"\n[{e}]", file=sys.stderr)
            return
        state["first"] = False
        sys.stdout.write("\n")
        dt = time.perf_counter() - t0
        if usage:
            n = usage["completion_tokens"]
            gen = time.perf_counter() - (t_first or t0)
            print(f"[{n} tok, {n / gen if gen > 0 else 0:.1f} tok/s, {dt:.1f}s]", file=sys.stderr)

    return run_repl(reply=reply, reset=reset, stats=stats)
