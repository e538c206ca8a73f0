"""Schemathesis over the server's own /openapi.json: generated requests (valid and invalid) to every operation
of an in-process server with the tiny model; none may get a 5xx. About 100 cases, derandomized so `make test`
is repeatable; the long, random run is benchmarks' business."""
from __future__ import annotations

import zlib

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from sinkstream import CacheConfig  # noqa: E402
from sinkstream.server.app import Settings, create_app  # noqa: E402
from sinkstream.server.schemas import Limits  # noqa: E402

EXAMPLES = 12  # per operation; the app has 10


def server_settings(state_dir: str | None = None) -> Settings:
    return Settings(model_id="tiny", cache=CacheConfig("sink", sinks=4, window=60), state_dir=state_dir,
                    limits=Limits(max_tokens=8, max_prompt_tokens=512, max_sessions=50))


# the document needs no model: build it from an app that is never started
schema = schemathesis.openapi.from_dict(create_app(server_settings()).openapi())


SESSIONS = {"/v1/chat/completions": "fuzz-chat", "/v1/completions": "fuzz-text"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    from inprocess import AppServer, shared_tiny_chat
    srv = AppServer(server_settings(str(tmp_path_factory.mktemp("state"))), shared_tiny_chat(tmp_path_factory))
    for sid in SESSIONS.values():
        assert httpx.post(srv.url + "/v1/sessions", json={"id": sid}).status_code == 200
    yield srv
    srv.stop()


def steer(case) -> None:
    """A generated session id almost never names a session, so valid bodies would all end in 404: send half
    of them stateless and half into a real session, so generation and session turns run too."""
    if case.path not in SESSIONS or case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    if not isinstance(case.body, dict):
        return
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "x-session-id"}
    if zlib.crc32(repr(case.body).encode()) % 2:
        case.body.pop("session", None)
    else:
        case.body["session"] = SESSIONS[case.path]


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_5xx(case, server):
    steer(case)
    response = case.call(base_url=server.url, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
