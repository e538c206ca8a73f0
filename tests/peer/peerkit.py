"""Shared pieces of the peer tests: llama.cpp's server test suite (tools/server/tests/unit), re-read and
re-written against `sinkstream serve`.

Each module starts one server (tiny random model with SmolLM2's tokenizer) for all its tests; the model
folder is built once per pytest run and shared. Assertions are structural (fields, equalities, status
codes), never the tiny model's exact words.
"""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from serverkit import Server, tiny_chat_model

KEY = "sk-peer-test-key"
MODEL = "tiny"
# llama.cpp's tests also feed a Latin paragraph that is longer than their slot's context
LONG_TEXT = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
             "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut "
             "aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse "
             "cillum dolore eu fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in "
             "culpa qui officia deserunt mollit anim id est laborum.")


def model_folder(tmp_path_factory) -> Path:
    """The tiny chat model, built on first use and reused by every module of this pytest run."""
    return tiny_chat_model(tmp_path_factory.getbasetemp() / "peer-tiny-chat")


def start(tmp_path_factory, *flags: str) -> Server:
    """A server on the tiny model with a 64-token sink cache; `.state_dir` is its session folder."""
    state = tmp_path_factory.mktemp("peer-state")
    srv = Server("--model", str(model_folder(tmp_path_factory)), "--model-name", MODEL,
                 "--state-dir", str(state), "--sinks", "4", "--window", "60", *flags)
    srv.state_dir = state
    return srv


def stop(server: Server) -> None:
    """End a module's server at once: its sessions live in a pytest temporary folder, so a graceful
    shutdown (a few seconds each) would buy nothing here."""
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(timeout=30)


def server_fixture(*flags: str):
    """A module-scoped `server` fixture: one server started with `flags` for all of a module's tests."""
    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        srv = start(tmp_path_factory, *flags)
        yield srv
        stop(srv)
    return server


@pytest.fixture(scope="module")
def http(server):
    """A client of the module's server (import it next to the module's `server`)."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def user(text) -> dict:
    return {"role": "user", "content": text}


def openai_error(r: httpx.Response, status: int | None = None, code: str | None = None) -> dict:
    """The body's OpenAI-shaped error; checks the status (a number, or 4 for any 4xx) and code."""
    if status == 4:
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
    elif status is not None:
        assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    if code is not None:
        assert err["code"] == code, err
    return err


def events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """POST a streaming request; the JSON payloads of its server-sent events, checking the [DONE] end."""
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", raw[-300:]
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


def post_ok(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def get_ok(http: httpx.Client, path: str) -> dict:
    r = http.get(path)
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(chunks: list[dict]) -> str:
    """The text of a chat or text-completion stream."""
    out = []
    for c in chunks:
        for ch in c.get("choices", []):
            out.append((ch["delta"].get("content") or "") if "delta" in ch else ch["text"])
    return "".join(out)


def metric(server: Server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)

