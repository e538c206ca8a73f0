"""Peer tests from llama.cpp's tools/server/tests/unit/test_completion.py, against `sinkstream serve`.

llama.cpp's own /completion endpoint (n_predict, timings, slots) has no counterpart here; its tests are
read for what they ask of OpenAI's /v1/completions: fields, stream = non-stream, seeds, concurrency and
cancellation.
"""
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from peerkit import MODEL, events, http, metric, openai_error, post_ok, server_fixture, start, stream_text  # noqa: E402

COMPLETIONS = "/v1/completions"
PROMPT = "I believe the meaning of life is"
MAX_TOKENS = 5000


server = server_fixture("--max-tokens", str(MAX_TOKENS), "--max-queue", "4")


@pytest.mark.parametrize("prompt,max_tokens", [(PROMPT, 8), ([PROMPT], 8),
                                                ("Write a joke about AI from a very long prompt which will not be "
                                                 "truncated", 64)])
def test_completion(http, prompt, max_tokens):
    """mirrors test_completion.py::test_completion: OpenAI's text_completion fields, and usage counting
    the prompt and every generated token (theirs: timings.prompt_n / predicted_n)."""
    body = post_ok(http, COMPLETIONS, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == max_tokens
    assert usage["completion_tokens"] <= max_tokens


def test_completion_stream(http):
    """mirrors test_completion.py::test_completion_stream: every chunk has the same id and a text piece;
    finish_reason is null until the last chunk."""
    chunks = events(http, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert all(isinstance(c["choices"][0]["text"], str) for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] in ("stop", "length")
    assert stream_text(chunks)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 42}],
                         ids=["greedy", "seeded"])
def test_completion_stream_vs_non_stream(http, sampling):
    """mirrors test_completion.py::test_completion_stream_vs_non_stream (theirs greedy only)."""
    body = {"prompt": PROMPT, "max_tokens": 16, **sampling}
    whole = post_ok(http, COMPLETIONS, body)
    chunks = events(http, COMPLETIONS, {**body, "stream_options": {"include_usage": True}})
    assert stream_text(chunks) == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completion_with_openai_library(server):
    """mirrors test_completion.py::test_completion_with_openai_library and
    test_completion_stream_with_openai_library (their model name "davinci-002" would be 404 here: see
    test_peer_chat_completion.py::test_chat_completion_with_openai_library_unknown_model)."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    res = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert res.object == "text_completion" and res.choices[0].finish_reason in ("stop", "length")
    assert res.choices[0].text is not None
    text = ""
    for part in c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True):
        if part.choices[0].finish_reason is None:
            text += part.choices[0].text
    assert text == res.choices[0].text


def test_consistent_result_same_seed(http):
    """mirrors test_completion.py::test_consistent_result_same_seed: four requests, seed 42, one text.
    Theirs samples greedily; ours samples at temperature 1, which only the seed keeps repeatable."""
    texts = {post_ok(http, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 12, "seed": 42,
                                         "temperature": 1.0})["choices"][0]["text"] for _ in range(4)}
    assert len(texts) == 1


def test_different_result_different_seed(http):
    """mirrors test_completion.py::test_different_result_different_seed: seeds 0..3 at temperature 1."""
    texts = [post_ok(http, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 12, "seed": seed,
                                         "temperature": 1.0})["choices"][0]["text"] for seed in range(4)]
    assert all(a != b for a, b in zip(texts, texts[1:])), texts


def test_completion_parallel_slots(server, http):
    """mirrors test_completion.py::test_completion_parallel_slots. llama.cpp decodes requests side by side
    in slots; so do we (--max-batch requests share each forward pass, more wait in --max-queue), and each
    request gets what it gets alone."""
    prompts = ["Write a very long book.", "Write another a poem.", "What is LLM?", "The sky is blue and I love it."]
    bodies = [{"prompt": p, "max_tokens": 12, "seed": 42, "temperature": 1.0} for p in prompts]
    results: dict[int, httpx.Response] = {}

    def send(i):
        results[i] = httpx.post(server.url + COMPLETIONS, json=bodies[i], timeout=60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(len(bodies)))
    for i, body in enumerate(bodies):
        assert results[i].status_code == 200, results[i].text
        alone = post_ok(http, COMPLETIONS, body)
        assert results[i].json()["choices"][0]["text"] == alone["choices"][0]["text"]


def test_cancel_request(server, http):
    """mirrors test_completion.py::test_cancel_request: a client that times out on a long request cancels
    it, and the next request is answered at once (theirs checks the slot is idle via /slots; we read the
    cancellation counter, which counts once the server notices the client left: it checks every 0.5 s)."""
    before = metric(server, "sinkstream_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        http.post(COMPLETIONS, json={"prompt": PROMPT, "max_tokens": MAX_TOKENS}, timeout=0.5)
    t0 = time.monotonic()
    r = http.post(COMPLETIONS, json={"prompt": "short", "max_tokens": 2})
    assert r.status_code == 200 and time.monotonic() - t0 < 10  # the long one would take far longer
    for _ in range(50):
        if metric(server, "sinkstream_cancelled_total") == before + 1:
            break
        time.sleep(0.1)
    assert metric(server, "sinkstream_cancelled_total") == before + 1


def test_cancel_request_stream(server, http):
    """mirrors test_completion.py::test_cancel_request, for a stream: closing a stream mid-generation
    frees the worker for the next request."""
    before = metric(server, "sinkstream_cancelled_total")
    with http.stream("POST", COMPLETIONS, json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    t0 = time.monotonic()
    body = post_ok(http, COMPLETIONS, {"prompt": "short", "max_tokens": 2})
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and time.monotonic() - t0 < 10
    for _ in range(50):
        if metric(server, "sinkstream_cancelled_total") == before + 1:
            break
        time.sleep(0.1)
    assert metric(server, "sinkstream_cancelled_total") == before + 1


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2, 3]], [PROMPT, PROMPT], []])
def test_completion_with_tokens_input(http, prompt):
    """mirrors test_completion.py::test_completion_with_tokens_input. We differ on purpose: prompts are
    text (a string or a list of one string); token ids and batches of prompts are refused with 400."""
    openai_error(http.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 2}), 400)
