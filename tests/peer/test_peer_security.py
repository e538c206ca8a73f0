"""Peer tests from llama.cpp's tools/server/tests/unit/test_security.py, against `sinkstream serve
--api-key`: which endpoints are public, the 401 answer, and CORS preflight."""
import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from peerkit import KEY, MODEL, openai_error, post_ok, server_fixture, user  # noqa: E402

ORIGIN = "https://web.mydomain.fr"


server = server_fixture("--api-key", KEY)


@pytest.mark.parametrize("endpoint", ["/health", "/metrics"])
def test_access_public_endpoint(server, endpoint):
    """mirrors test_security.py::test_access_public_endpoint: /health (and /metrics) answer without a key.
    Their list also has /models; our model list is /v1/models, behind the key like the rest of /v1/*
    (on purpose: everything under /v1 needs the key, as on OpenAI)."""
    r = httpx.get(server.url + endpoint)
    assert r.status_code == 200
    if endpoint == "/health":
        assert r.json() == {"status": "ok", "model": MODEL}
    assert "error" not in r.text
    openai_error(httpx.get(server.url + "/v1/models"), 401, "invalid_api_key")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer invalid-key"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"X-Api-Key": KEY}],
                         ids=["none", "wrong-key", "no-scheme", "basic", "x-api-key"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/sessions"])
def test_incorrect_api_key(server, headers, path):
    """mirrors test_security.py::test_incorrect_api_key: 401 with error type `authentication_error`.
    Their test_correct_api_key_anthropic_header accepts the key in `X-Api-Key`; we differ on purpose and
    take only OpenAI's `Authorization: Bearer`."""
    body = {"prompt": "I believe", "max_tokens": 2} if path == "/v1/completions" else \
        {"messages": [user("hi")], "max_tokens": 2} if path == "/v1/chat/completions" else {}
    r = httpx.post(server.url + path, json=body, headers=headers)
    err = openai_error(r, 401, "invalid_api_key")
    assert err["type"] == "authentication_error"
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")


def test_correct_api_key(server):
    """mirrors test_security.py::test_correct_api_key."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        body = post_ok(http, "/v1/completions", {"prompt": "I believe the meaning of life is", "max_tokens": 4})
    assert body["object"] == "text_completion" and "error" not in body


def test_openai_library_correct_api_key(server):
    """mirrors test_security.py::test_openai_library_correct_api_key (and a wrong key raising
    AuthenticationError)."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    res = c.chat.completions.create(model=MODEL, max_tokens=4, messages=[
        {"role": "system", "content": "You are a chatbot."}, user("What is the meaning of life?")])
    assert len(res.choices) == 1
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, max_tokens=4, messages=[user("hi")])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/sessions"])
def test_cors_options(server, path):
    """mirrors test_security.py::test_cors_options: a browser's preflight (no key: browsers never send one
    on OPTIONS) is answered 200 with the CORS headers, so a web page can then call the API with its key.
    llama.cpp echoes the origin and allows credentials; we answer `*` without credentials, since the key
    travels in a header, never in a cookie."""
    r = httpx.options(server.url + path, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "Authorization, Content-Type"})
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["access-control-allow-origin"] in ("*", ORIGIN)
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    assert allowed == "*" or ("authorization" in allowed and "content-type" in allowed)


def test_cors_actual_request_still_needs_the_key(server):
    """mirrors test_security.py::test_cors_options (the request after the preflight): the answer carries
    Access-Control-Allow-Origin, and CORS opens no way around the key."""
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", ORIGIN)
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN})
    openai_error(r, 401, "invalid_api_key")


@pytest.mark.parametrize("sid", ["../x", "..", "a/b", "%2e%2e%2fetc", "a.b"])
def test_local_media_file(server, sid):
    """mirrors test_security.py::test_local_media_file (its "no directory traversal" rows): the only
    names a client gives that become paths here are session ids, and one that could leave the state
    folder is refused with 400."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        openai_error(http.post("/v1/sessions", json={"id": sid}), 400)
        r = http.post("/v1/chat/completions", json={"messages": [user("x")], "session": sid, "max_tokens": 2})
        openai_error(r, 400)
