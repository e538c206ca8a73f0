"""Bad input everywhere: every CLI command answers a user mistake with one line `sinkstream: error: ...` and
exit status 2 (no traceback, no usage dump); every endpoint answers with a 4xx in OpenAI's error shape, and
a session named by a bad request is left as it was.

The CLI runs in this process (`sinkstream.cli.main`), so a case that is wrongly accepted and runs for ever
fails on an alarm instead of hanging; a subprocess case checks the real entry point once."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from inprocess import shared_tiny_chat

TINY = "{tiny}"  # replaced by the tiny model's folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    shared_tiny_chat(tmp_path_factory)
    return tmp_path_factory.getbasetemp() / "tiny-chat-shared"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    (d / "bad.jsonl").write_text("{not json\n")
    (d / "a-file").write_text("x")
    return d


class Alarm(Exception):
    pass


def run_cli(capsys, argv: list[str], seconds: int = 30) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `sinkstream ARGV`; an exception escaping main is a test failure."""
    from sinkstream.cli import main

    def ring(*_):
        raise Alarm(f"`sinkstream {' '.join(argv)}` still running after {seconds} s: the bad input was accepted")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, needle):
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("sinkstream")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("sinkstream: error: "), (rc, err)
    assert needle in lines[0], lines[0]


MISSING = "/no/such/file.txt"
CLI_CASES = [
    ([], "required"),
    (["bogus"], "invalid choice"),
    # generate
    (["generate", "hi", "--max-tokens", "abc"], "--max-tokens"),
    (["generate", "hi", "--max-tokens", "-5", "--model", TINY], "--max-tokens"),
    (["generate", "hi", "--temp", "nan", "--model", TINY], "--temp"),
    (["generate", "hi", "--top-p", "inf"], "--top-p"),
    (["generate", "hi", "--temp", "1", "--repetition-penalty", "1e-320", "--model", TINY], "--repetition-penalty"),
    (["generate", "hi", "--repetition-penalty", "1000", "--model", TINY], "--repetition-penalty"),
    (["generate", "hi", "--seed", "1" + "0" * 25, "--model", TINY], "--seed"),
    (["generate", "hi", "--device", "tpu", "--model", TINY], "--device"),
    pytest.param(["generate", "hi", "--device", "cuda", "--model", TINY], "--device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="there is a CUDA device")),
    (["generate", "hi", "--quant", "int2"], "--quant"),
    (["generate", "hi", "--window", "0", "--model", TINY], "window"),
    (["generate", "hi", "--memory-budget", "lots"], "--memory-budget"),
    (["generate", "hi", "--model", "/no/such/model.gguf"], "not found"),
    (["generate", "hi", "--nope"], "unrecognized arguments"),
    # chat
    (["chat", "--server", "notaurl"], "--server"),
    (["chat", "--server", "http://127.0.0.1:1"], "cannot reach"),
    (["chat", "--max-tokens", "x"], "--max-tokens"),
    # models
    (["models", "extra"], "unrecognized arguments"),
    # eval ppl / recall / chat
    (["eval"], "required"),
    (["eval", "ppl", MISSING, "--model", TINY], "no such text file"),
    (["eval", "ppl", "--every", "0", "--tokens", "50", "--model", TINY], "--every"),
    (["eval", "ppl", "--recompute-every", "0", "--tokens", "50", "--compare", "recompute:16", "--model", TINY],
     "--recompute-every"),
    (["eval", "ppl", "--chunk", "0", "--model", TINY], "--chunk"),
    (["eval", "ppl", "--tokens", "-1", "--model", TINY], "--tokens"),
    (["eval", "ppl", "--mode", "x", "--model", TINY], "--mode"),
    (["eval", "ppl", "--compare", "bogus", "--model", TINY], "bad cache spec"),
    (["eval", "ppl", "--out", "{files}/a-file", "--tokens", "50", "--model", TINY], "--out"),
    (["eval", "recall", "--task", "streameval", "--distances", "0", "--model", TINY], "--distances"),
    (["eval", "recall", "--task", "streameval", "--query-every", "0", "--model", TINY], "--query-every"),
    (["eval", "recall", "--task", "passkey", "--lengths", "-5", "--model", TINY], "--lengths"),
    (["eval", "recall", "--task", "passkey", "--lengths", "100", "--depths", "2", "--model", TINY], "--depths"),
    (["eval", "recall", "--task", "passkey", "--trials", "0", "--model", TINY], "--trials"),
    (["eval", "recall", "--task", "streameval", "--lines-file", MISSING, "--model", TINY], "cannot read"),
    (["eval", "recall", "--task", "x"], "--task"),
    (["eval", "chat", "--questions", MISSING, "--model", TINY], "cannot read"),
    (["eval", "chat", "--questions", "{files}/bad.jsonl", "--model", TINY], "not valid JSONL"),
    (["eval", "chat", "--limit", "0", "--model", TINY], "--limit"),
    # bench, sinks
    (["bench", "--decode-steps", "0", "--tokens", "100", "--model", TINY], "--decode-steps"),
    (["bench", "--tokens", "0", "--model", TINY], "--tokens"),
    (["bench", "--points", "x", "--model", TINY], "integers"),
    (["bench", "--points", "-5", "--tokens", "100", "--model", TINY], "--points"),
    (["bench", "--compare", "nope", "--model", TINY], "bad cache spec"),
    (["sinks", "--tokens", "0", "--model", TINY], "--tokens"),
    (["sinks", "--first-k", "0", "--tokens", "32", "--model", TINY], "--first-k"),
    (["sinks", "--epsilon", "2", "--tokens", "32", "--model", TINY], "--epsilon"),
    (["sinks", MISSING, "--model", TINY], "no such text file"),
    # serve (each fails before it listens)
    (["serve", "--port", "99999", "--model", TINY], "--port"),
    (["serve", "--port", "-1", "--model", TINY], "--port"),
    (["serve", "--max-queue", "0", "--model", TINY], "--max-queue"),
    (["serve", "--state-dir", "{files}/a-file", "--port", "0", "--model", TINY], "--state-dir"),
    (["serve", "--host", "no.such.host.invalid", "--model", TINY], "cannot listen"),
    (["serve", "--model", "/no/such/model.gguf"], "not found"),
    (["serve", "--device", "tpu", "--model", TINY], "--device"),
    (["serve", "--log-level", "loud"], "--log-level"),
]


def _case_id(case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(a for a in argv if a != TINY and a != "--model") or "(none)"


@pytest.mark.parametrize("argv,needle", CLI_CASES, ids=[_case_id(c) for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, tiny_folder, files, argv, needle):
    argv = [a.replace(TINY, str(tiny_folder)).replace("{files}", str(files)) for a in argv]
    rc, out, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, needle)


def test_cli_bad_flag_through_the_real_entry_point():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "sinkstream", "bench", "--decode-steps", "zero"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "--decode-steps")
    assert re.search(r"see .*sinkstream bench --help", p.stderr)


# --- endpoints ------------------------------------------------------------------------------------------
SESSION = "kept"
MAX_TOKENS, MAX_PROMPT, MAX_BODY = 8, 200, 1 << 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from inprocess import AppServer
    from sinkstream import CacheConfig
    from sinkstream.server.app import Settings
    from sinkstream.server.schemas import Limits
    srv = AppServer(Settings(model_id="tiny", cache=CacheConfig("sink", sinks=4, window=60),
                             state_dir=str(tmp_path_factory.mktemp("state")),
                             limits=Limits(max_tokens=MAX_TOKENS, max_prompt_tokens=MAX_PROMPT,
                                           max_body_bytes=MAX_BODY)),
                    shared_tiny_chat(tmp_path_factory))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    import httpx
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/sessions", json={"id": SESSION}).status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": [user("hello")], "session": SESSION, "max_tokens": 4})
        assert r.status_code == 200
        yield c


def user(text):
    return {"role": "user", "content": text}


C, T, S = "/v1/chat/completions", "/v1/completions", "/v1/sessions"
OK = [user("x")]
HTTP_CASES = [  # (method, path, body: bytes | JSON | None, status, param)
    # not JSON, or not an object
    ("POST", C, b"{not json", 400, None),
    ("POST", C, b"\xff\xfe", 400, None),
    ("POST", C, b"null", 400, None),
    ("POST", C, b"[]", 400, None),
    ("POST", C, b"[" * 50_000, 400, None),
    ("POST", S, b"{bad", 400, None),
    ("POST", S, b'"id"', 400, None),
    # wrong types
    ("POST", C, {"messages": "hi"}, 400, "messages"),
    ("POST", C, {"messages": [1]}, 400, "messages.0"),
    ("POST", C, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("POST", C, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400,
     "messages.0.content.0.type"),
    ("POST", C, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("POST", C, {"messages": OK, "max_tokens": "x"}, 400, "max_tokens"),
    ("POST", C, {"messages": OK, "temperature": "hot"}, 400, "temperature"),
    ("POST", C, {"messages": OK, "stop": 5}, 400, "stop"),
    ("POST", C, {"messages": OK, "stop": [1]}, 400, "stop.0"),
    ("POST", C, {"messages": OK, "stream_options": 5}, 400, "stream_options"),
    ("POST", C, {"messages": OK, "session": 5}, 400, "session"),
    ("POST", T, {"prompt": 5}, 400, "prompt"),
    ("POST", T, {"prompt": [1]}, 400, "prompt.0"),
    ("POST", T, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", T, {}, 400, "prompt"),
    ("POST", S, {"id": 5}, 400, "id"),
    ("POST", S, {"system": ["x"]}, 400, "system"),
    # values out of range, unsupported options, lone surrogates
    ("POST", C, {"messages": []}, 400, "messages"),
    ("POST", C, {"messages": OK, "max_tokens": 0}, 400, "max_tokens"),
    ("POST", C, {"messages": OK, "temperature": -1}, 400, "temperature"),
    ("POST", C, {"messages": OK, "temperature": 1, "repetition_penalty": 5e-324}, 400, "repetition_penalty"),
    ("POST", C, {"messages": OK, "n": 2}, 400, "n"),
    ("POST", C, {"messages": OK, "logprobs": True}, 400, "logprobs"),
    ("POST", C, {"messages": OK, "tools": [{"type": "function"}]}, 400, "tools"),
    ("POST", T, {"prompt": "x", "echo": True}, 400, "echo"),
    ("POST", T, {"prompt": ""}, 400, "prompt"),
    ("POST", C, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content"),
    ("POST", S, b'{"system": "\\udfff"}', 400, "system"),
    ("POST", C, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    # oversized
    ("POST", C, {"messages": OK, "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ("POST", C, {"messages": OK, "max_tokens": 10**30}, 400, "max_tokens"),
    ("POST", C, {"messages": OK, "seed": 2**70}, 400, "seed"),
    ("POST", C, {"messages": OK, "stop": ["a"] * 5}, 400, "stop"),
    ("POST", C, {"messages": OK, "stop": "x" * 300}, 400, "stop"),
    ("POST", C, {"messages": [user("x " * (MAX_PROMPT + 10))]}, 400, "messages"),
    ("POST", C, {"messages": [user("x" * MAX_BODY)]}, 413, None),
    ("POST", T, {"prompt": "x " * (MAX_PROMPT + 10)}, 400, "messages"),
    # unknown and bad session ids, unknown model
    ("POST", C, {"messages": OK, "session": "nope"}, 404, "session"),
    ("POST", C, {"messages": OK, "session": "../x"}, 400, "session"),
    ("POST", T, {"prompt": "x", "session": "a" * 65}, 400, "session"),
    ("POST", C, {"messages": OK, "model": "gpt-4"}, 404, "model"),
    ("POST", S, {"id": "../x"}, 400, "id"),
    ("POST", S, {"id": SESSION}, 409, "id"),
    ("GET", S + "/nope", None, 404, "session_id"),
    ("GET", S + "/a.b", None, 400, "session"),
    ("GET", S + "/" + "x" * 65, None, 400, "session"),
    ("GET", S + "/%00", None, 400, "session"),
    ("DELETE", S + "/nope", None, 404, "session_id"),
    ("DELETE", S + "/a.b", None, 400, "session"),
    # the session in the wrong way
    ("POST", T, {"prompt": "x", "session": SESSION}, 400, "session"),
    ("POST", C, {"messages": [user("edited"), {"role": "assistant", "content": "?"}, user("y")], "session": SESSION},
     409, "messages"),
    ("POST", C, {"messages": [{"role": "assistant", "content": "x"}], "session": SESSION, "append": True}, 400,
     "messages"),
    # methods and paths
    ("PUT", S, None, 405, None),
    ("GET", C, None, 405, None),
    ("POST", "/health", None, 405, None),
    ("POST", "/v1/models", None, 405, None),
    ("GET", "/v1/nothing", None, 404, None),
]
PARAM = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)*$")


@pytest.mark.parametrize("method,path,body,status,param", HTTP_CASES,
                         ids=[f"{m} {p[:30]} {str(b)[:50]}" for m, p, b, *_ in HTTP_CASES])
def test_endpoint_bad_input_is_a_4xx_in_openai_shape(http, method, path, body, status, param):
    kw = {}
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kw = {"json": body}
    r = http.request(method, path, **kw)
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("rate_limit_error" if status == 429 else "invalid_request_error")
    assert err["param"] == param, err
    # a message for people: no validator internals
    assert not re.search(r"function-after|functools|<function| at 0x|\[str\]|list\[", err["message"]), err["message"]


def test_bad_headers(http, server):
    import socket
    for sid in ("../x", "", "a" * 65):
        r = http.post(C, json={"messages": OK}, headers={"X-Session-Id": sid})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-session-id", r.text
    r = http.post(C, json={"messages": OK, "session": SESSION}, headers={"X-Session-Id": "other"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "session"
    r = http.post(C, content=b'{"messages": [{"role": "user", "content": "x"}]}',
                  headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "error" in r.json()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # uvicorn answers this one itself (plain 400)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


def test_bad_requests_leave_the_session_as_it_was(http):
    """Run after the cases above (pytest keeps file order): the session they named is unchanged."""
    info = http.get(f"{S}/{SESSION}").json()
    assert info["turns"] == 1 and info["messages_seen"] == 2
    r = http.post(C, json={"messages": [user("and now?")], "session": SESSION, "append": True, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["session"]["turns"] == 2
    assert http.get("/health").status_code == 200
