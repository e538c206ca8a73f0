"""Peer tests from llama.cpp's tools/server/tests/unit/test_ctx_shift.py, against `sinkstream serve` with a
64-token cache (4 sinks + a 60-token window).

llama.cpp's slot has a fixed context: a longer prompt is truncated (context shift on) or refused (off),
and generation stops when the context is full unless it may shift. We differ on purpose, and that
difference is the point of this project: the sink cache reads a prompt of any length in full, generates
for as long as asked, and holds the same memory the whole time.
"""
import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from peerkit import LONG_TEXT, events, http, model_folder, post_ok, server_fixture, stream_text, user  # noqa: E402

COMPLETIONS = "/v1/completions"
CAPACITY = 64  # --sinks 4 --window 60
LONG = "\n".join([LONG_TEXT] * 3)


server = server_fixture()


@pytest.fixture(scope="module")
def count_tokens(tmp_path_factory):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_folder(tmp_path_factory) / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def test_ctx_shift_enabled(http, count_tokens):
    """mirrors test_ctx_shift.py::test_ctx_shift_enabled: a prompt several times the cache, then 64 new
    tokens. llama.cpp keeps only the prompt's tail (`truncated: true`); every prompt token is read here,
    so usage counts all of them."""
    n_prompt = count_tokens(LONG)
    assert n_prompt > 3 * CAPACITY
    body = post_ok(http, COMPLETIONS, {"prompt": LONG, "max_tokens": 64, "temperature": 0})
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 64


@pytest.mark.parametrize("max_tokens", [64, 300])
def test_ctx_shift_disabled_short_prompt(http, max_tokens):
    """mirrors test_ctx_shift.py::test_ctx_shift_disabled_short_prompt: llama.cpp without context shift
    stops when its context is full (120 tokens there, `truncated`). Here generation goes on past the
    cache for every token asked (300 is more than four times the cache)."""
    body = post_ok(http, COMPLETIONS, {"prompt": "Hi how are you", "max_tokens": max_tokens, "temperature": 0})
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == max_tokens


def test_ctx_shift_disabled_long_prompt(http, count_tokens):
    """mirrors test_ctx_shift.py::test_ctx_shift_disabled_long_prompt: llama.cpp refuses a prompt that
    "exceeds the available context size"; we answer it, streaming or not, with the same text."""
    body = {"prompt": LONG, "max_tokens": 32, "temperature": 0}
    whole = post_ok(http, COMPLETIONS, body)
    chunks = events(http, COMPLETIONS, {**body, "stream_options": {"include_usage": True}})
    assert stream_text(chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"] == whole["usage"] and whole["usage"]["prompt_tokens"] == count_tokens(LONG)


def test_ctx_shift_disabled_stream(http):
    """mirrors test_ctx_shift.py::test_ctx_shift_disabled_stream: a 256-token stream from "Once" (four
    times the cache) ends with finish_reason "length", null before, and text in between."""
    chunks = events(http, COMPLETIONS, {"prompt": "Once", "max_tokens": 256, "temperature": 0,
                                        "stream_options": {"include_usage": True}})
    *choice_chunks, usage_chunk = chunks
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] == "length"
    assert stream_text(choice_chunks) and usage_chunk["usage"]["completion_tokens"] == 256


def test_ctx_shift_session_memory_stays_constant(http):
    """mirrors test_ctx_shift.py::test_ctx_shift_enabled, for the case llama.cpp cannot serve: a chat
    session that goes on far past its cache. Every turn is answered, the tokens seen keep growing, and
    the cache stays at its capacity and its size in bytes once full."""
    sid = post_ok(http, "/v1/sessions", {})["id"]
    seen, sizes = [], []
    for i in range(6):
        body = post_ok(http, "/v1/chat/completions", {"messages": [user(f"{i}: {LONG_TEXT}")], "session": sid,
                                                      "append": True, "max_tokens": 16, "temperature": 0})
        info = body["session"]
        assert info["turns"] == i + 1 and info["cache_capacity"] == CAPACITY
        assert info["tokens_cached"] <= CAPACITY
        seen.append(info["tokens_seen"])
        sizes.append(info["cache_bytes"])
    assert seen == sorted(seen) and seen[-1] > 6 * CAPACITY
    assert len(set(sizes[1:])) == 1  # full after the first turn: no growth after that
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200
