"""Peer tests from llama.cpp's tools/server/tests/unit/test_slot_save.py, against `sinkstream serve`.

llama.cpp saves and restores a slot's KV cache on request (`POST /slots/{id}?action=save|restore|erase`
with a file name). sinkstream has no slots: a session (`POST /v1/sessions`, then `"session"` in a
request) is saved to `<state-dir>/<id>.safetensors` after every completed turn and restored from that
file whenever it is used again after leaving memory. These tests mirror the intent with that API; the
server keeps one session in memory (--max-live-sessions 1), so using a second session sends the first
back to its file.
"""
import json
import struct

import httpx
import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from peerkit import LONG_TEXT, get_ok, http, openai_error, post_ok, server_fixture, user  # noqa: E402

CHAT = "/v1/chat/completions"
FRANCE, GERMANY, ITALY = "What is the capital of France?", "What is the capital of Germany?", "And of Italy?"


server = server_fixture("--max-live-sessions", "1")


def new_session(http, sid: str) -> str:
    return post_ok(http, "/v1/sessions", {"id": sid})["id"]


def say(http, sid: str, text: str, max_tokens: int = 8) -> dict:
    """One greedy turn that sends only the new message; the whole answer."""
    return post_ok(http, CHAT, {"messages": [user(text)], "session": sid, "append": True,
                                "max_tokens": max_tokens, "temperature": 0})


def evict(http, sid: str) -> None:
    """Use another session, so that `sid` leaves memory (only its file is left)."""
    other = f"evictor-{sid}"[:64]
    if http.get(f"/v1/sessions/{other}").status_code == 404:
        new_session(http, other)
    say(http, other, "hello", max_tokens=2)
    assert http.get(f"/v1/sessions/{sid}").json()["in_memory"] is False


def test_slot_save_restore(server, http):
    """mirrors test_slot_save.py::test_slot_save_restore: after a turn the session is on disk; restored
    from the file it continues exactly as the copy that never left memory, and its next turn reads only
    the new message (theirs: prompt_n == 6, "only the different part is processed"). Continuing the
    first copy afterwards shows the restore did not disturb it (theirs: slot 1 still works)."""
    kept, restored = new_session(http, "kept"), new_session(http, "restored")
    first_kept = say(http, kept, FRANCE)
    second_kept = say(http, kept, GERMANY)          # never left memory between its turns
    first_restored = say(http, restored, FRANCE)
    assert (server.state_dir / "restored.safetensors").exists()
    assert first_restored["choices"] == first_kept["choices"] and first_restored["usage"] == first_kept["usage"]
    evict(http, restored)
    info = http.get(f"/v1/sessions/{restored}").json()  # read from the file's header
    assert info["turns"] == 1 and info["messages_seen"] == 2
    second_restored = say(http, restored, GERMANY)  # loaded from its file
    assert second_restored["choices"] == second_kept["choices"]
    assert second_restored["usage"] == second_kept["usage"]
    assert second_restored["usage"]["prompt_tokens"] < first_restored["usage"]["prompt_tokens"] + 10
    assert second_restored["session"]["turns"] == 2
    assert say(http, kept, ITALY)["choices"] == say(http, restored, ITALY)["choices"]


def test_slot_restore_prompt_larger_than_slot_context(http):
    """mirrors test_slot_save.py::test_slot_restore_prompt_larger_than_slot_context, which must refuse a
    saved prompt longer than the slot. We differ on purpose: a session that has seen many times its
    cache saves only the cache, restores, and continues as if it had stayed in memory."""
    kept, restored = new_session(http, "long-kept"), new_session(http, "long-restored")
    for sid in (kept, restored):
        for i in range(3):
            say(http, sid, f"{i} {LONG_TEXT}", max_tokens=4)
    info = http.get(f"/v1/sessions/{restored}").json()
    assert info["tokens_seen"] > 4 * info["cache_capacity"] >= 4 * info["tokens_cached"]
    evict(http, restored)
    a, b = say(http, restored, ITALY, max_tokens=12), say(http, kept, ITALY, max_tokens=12)
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
    assert a["session"]["tokens_seen"] == b["session"]["tokens_seen"]


def test_slot_erase(server, http):
    """mirrors test_slot_save.py::test_slot_erase: after DELETE the session and its file are gone, and a
    new session of the same id reads the first prompt in full again and answers it as the first time."""
    sid = new_session(http, "erase-me")
    first = say(http, sid, FRANCE)
    say(http, sid, GERMANY)
    assert http.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
    assert not (server.state_dir / f"{sid}.safetensors").exists()
    openai_error(http.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    new_session(http, sid)
    again = say(http, sid, FRANCE)
    assert again["choices"] == first["choices"] and again["usage"] == first["usage"]
    assert again["session"]["turns"] == 1


def _truncate_in_header(data: bytes) -> bytes:
    return data[:12]


def _truncate_in_tensors(data: bytes) -> bytes:
    return data[: len(data) - (len(data) - 8 - struct.unpack("<Q", data[:8])[0]) // 2]


def _huge_header_size(data: bytes) -> bytes:
    return struct.pack("<Q", 0xFFFFFFF0) + data[8:]


def _flip_tensor_byte(data: bytes) -> bytes:
    i = len(data) - 3
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def _not_json(data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    return data[:8] + b"\x00" * n + data[8 + n:]


def _future_version(data: bytes) -> bytes:
    """A well-formed file, checksum and all, that says it was written by a later format version."""
    from safetensors.torch import load, save

    from sinkstream.session import _digest
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])["__metadata__"]
    meta = json.loads(header["sinkstream"])
    meta["version"] = 99
    meta_json = json.dumps(meta)
    tensors = load(data)
    return save(tensors, metadata={**header, "sinkstream": meta_json, "sha256": _digest(tensors, meta_json)})


@pytest.mark.parametrize("damage", [_truncate_in_header, _truncate_in_tensors, _huge_header_size, _not_json,
                                    _flip_tensor_byte, _future_version],
                         ids=["truncated-header", "truncated-tensors", "huge-header-size", "header-not-json",
                              "flipped-byte", "future-version"])
def test_slot_restore_damaged_file(server, http, damage):
    """mirrors test_slot_save.py::test_slot_restore_truncated_file, test_slot_restore_corrupt_payload_size
    and test_slot_restore_unsupported_state_version: a damaged session file is refused with a clear 4xx
    and OpenAI's error object, streaming or not; it is never loaded; the server goes on serving other
    sessions, and deleting the damaged one frees its id."""
    sid = new_session(http, f"damaged-{damage.__name__.strip('_').replace('_', '-')}")
    say(http, sid, FRANCE)
    evict(http, sid)
    path = server.state_dir / f"{sid}.safetensors"
    path.write_bytes(damage(path.read_bytes()))

    openai_error(http.post(CHAT, json={"messages": [user(GERMANY)], "session": sid, "append": True,
                                       "max_tokens": 4}), 4)
    with http.stream("POST", CHAT, json={"messages": [user(GERMANY)], "session": sid, "append": True,
                                         "max_tokens": 4, "stream": True}) as r:
        r.read()
    openai_error(r, 4)
    r = http.get(f"/v1/sessions/{sid}")  # reads only the file's header: an intact one may be shown
    if r.status_code == 200:
        assert r.json()["id"] == sid
    else:
        openai_error(r, 4)

    healthy = new_session(http, f"healthy-{sid}"[:64])
    assert say(http, healthy, FRANCE)["session"]["turns"] == 1
    assert post_ok(http, CHAT, {"messages": [user("stateless")], "max_tokens": 2})["object"] == "chat.completion"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert sid in [s["id"] for s in get_ok(http, "/v1/sessions")["data"]]

    assert http.delete(f"/v1/sessions/{sid}").status_code == 200
    new_session(http, sid)
    assert say(http, sid, FRANCE)["session"]["turns"] == 1
