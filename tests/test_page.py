"""The web page at `/` and the endpoint it adds, `GET /v1/sessions/{id}/cache`.

Server side (httpx against a real `sinkstream serve` with the tiny random model): the page is public HTML,
the cache layout needs the key, follows the ring (sinks, window fill, next write slot) and is read from the
file header for a session not in memory; `live_layout`/`disk_layout` agree on a `--cache memory` cache.

In a real browser: headless Chromium from Debian's packages (`chromium`, `chromium-driver`; `make test`
tries to install them once) driven by selenium. Without them the browser test is SKIPPED with the reason,
never passed. The scenario: open `/`, give a wrong then the right API key, create a session, send two
turns, see the reply stream in and the cache view move while it streams (tokens seen and window fill
grow; `--window 48` fills in the second turn), stop a third turn with Escape, reload and find the session
again, check the layout at phone width (375 px), delete the session. With ``SINKSTREAM_SCREENSHOTS=1`` it
streams longer turns and saves mid-stream screenshots to docs/img/page-desktop.png and
docs/img/page-phone.png (the ones README shows).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from serverkit import Server, tiny_chat_model  # noqa: E402

KEY = "page-key-42"
SINKS, WINDOW = 4, 48
SHOTS = os.environ.get("SINKSTREAM_SCREENSHOTS") == "1"
IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    srv = Server("--model", str(model), "--model-name", "tiny", "--api-key", KEY,
                 "--state-dir", str(tmp_path_factory.mktemp("state")), "--sinks", str(SINKS), "--window", str(WINDOW),
                 "--max-live-sessions", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def slot_of(u: int) -> int:
    return u if u < SINKS else SINKS + (u - SINKS) % WINDOW


def chat(http, sid: str, text: str, max_tokens: int) -> dict:
    r = http.post("/v1/chat/completions", headers={"X-Session-Id": sid},
                  json={"messages": [{"role": "user", "content": text}], "append": True, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()


# --- server side ------------------------------------------------------------------------------------
def test_page_is_public_and_self_contained(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in r.text and "/static/style.css" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert "http" not in r.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000
        assert "://" not in r.text  # no CDN, no remote font
    assert httpx.get(server.url + "/static/nope.js").status_code == 404
    assert httpx.get(server.url + "/static/..%2Fapp.py").status_code == 404
    doc = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/sessions/{session_id}/cache" in doc["paths"] and "/" not in doc["paths"]


def test_cache_layout_needs_the_key_and_follows_the_ring(server, http):
    sid = http.post("/v1/sessions", json={}).json()["id"]  # no system prompt: an empty ring to start
    r = httpx.get(f"{server.url}/v1/sessions/{sid}/cache")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    lay = http.get(f"/v1/sessions/{sid}/cache").json()
    assert lay["id"] == sid and lay["object"] == "session.cache" and lay["in_memory"] is True
    assert (lay["policy"], lay["sinks"], lay["window"], lay["capacity"]) == ("sink", SINKS, WINDOW, SINKS + WINDOW)
    assert lay["tokens_seen"] == lay["tokens_cached"] == 0 and lay["turns"] == 0 and lay["memory"] is None
    assert lay["ring"]["next_slot"] == 0 and lay["ring"]["filled"] == 0 and lay["cache_bytes"] > 0
    fills = []
    for turn, n in enumerate((6, 40), start=1):
        body = chat(http, sid, f"turn {turn}", n)
        lay = http.get(f"/v1/sessions/{sid}/cache").json()
        seen = lay["tokens_seen"]
        assert seen == body["session"]["tokens_seen"] and lay["turns"] == turn
        assert lay["tokens_cached"] == min(seen, SINKS + WINDOW) == lay["ring"]["filled"]
        ring = lay["ring"]
        assert ring["sinks_filled"] == SINKS and ring["window_filled"] == min(seen - SINKS, WINDOW)
        assert ring["next_slot"] == slot_of(seen) and ring["wrapped"] == (seen > SINKS + WINDOW)
        assert ring["oldest"] == max(SINKS, seen - WINDOW) and lay["groups"] == [ring]
        fills.append(ring["window_filled"])
    assert fills[0] < fills[1] == WINDOW  # the second turn fills the window and wraps around


def test_cache_layout_of_a_session_on_disk_and_unknown_ids(server, http):
    sid = http.post("/v1/sessions", json={}).json()["id"]
    chat(http, sid, "hello", 8)
    live = http.get(f"/v1/sessions/{sid}/cache").json()
    for _ in range(2):  # --max-live-sessions 2: two newer sessions push it out of memory (still on disk)
        http.post("/v1/sessions", json={})
    disk = http.get(f"/v1/sessions/{sid}/cache").json()
    assert live["in_memory"] is True and disk["in_memory"] is False and disk["groups"] is None
    for k in ("policy", "sinks", "window", "capacity", "tokens_seen", "tokens_cached", "cache_bytes", "turns"):
        assert disk[k] == live[k], k
    assert disk["ring"] == {k: v for k, v in live["ring"].items() if k != "layers"} | {"layers": None}
    r = http.get("/v1/sessions/no-such-session/cache")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    assert http.get("/v1/sessions/bad.id/cache").status_code == 400


def test_memory_cache_layout_live_and_from_counts(tiny):
    """`live_layout` of a `--cache memory` cache: blocks of evicted tokens and the ones recalled; the counts a
    session file keeps give the same blocks and ring position."""
    import torch

    from sinkstream.cache import CacheConfig, make_cache
    from sinkstream.server.layout import disk_layout, live_layout
    cfg = CacheConfig("memory", sinks=4, window=16, block_size=8, top_k=2)
    cache = make_cache(tiny, cfg)
    torch.manual_seed(0)
    cache.run(tiny, torch.randint(0, 256, (1, 100)))
    for _ in range(3):  # decode steps recall blocks
        cache.run(tiny, torch.randint(0, 256, (1, 1)))
    lay = live_layout(cache)
    assert lay["tokens_seen"] == 103 and lay["ring"]["next_slot"] == 4 + (103 - 4) % 16
    mem = lay["memory"]
    assert mem["blocks"] == (103 - 4 - 16) // 8 == 10 and mem["open_block_fill"] == (103 - 4 - 16) % 8
    assert mem["recall_slots"] == 2 * 2 * 2  # layers x kv heads x top_k
    assert mem["recalled"] and all(0 <= r["block"] < 10 and r["slots"] >= 1 for r in mem["recalled"])
    assert sum(r["slots"] for r in mem["recalled"]) <= mem["recall_slots"]
    stats = {"tokens_seen": cache.seen, "tokens_cached": cache.cached, "cache_bytes": cache.nbytes,
             "capacity": cache.capacity}
    disk = disk_layout(cfg, stats)
    assert disk["ring"] == {k: v for k, v in lay["ring"].items() if k != "layers"}
    assert (disk["memory"]["blocks"], disk["memory"]["open_block_fill"]) == (10, mem["open_block_fill"])
    assert disk["memory"]["recalled"] is None


# --- in a browser ------------------------------------------------------------------------------------
def chromium_and_driver() -> tuple[str, str]:
    """Paths of Chromium and its chromedriver, or skip (with the reason) where they are missing."""
    browser = os.environ.get("SINKSTREAM_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("SINKSTREAM_CHROMEDRIVER") or shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver",) if os.path.exists(p)), None)
    if not (browser and os.path.exists(browser) and driver and os.path.exists(driver)):
        pytest.skip("BROWSER TEST NOT RUN: no Chromium and chromedriver found (install Debian's `chromium` and "
                    "`chromium-driver`; `make test` tries once)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="BROWSER TEST NOT RUN: selenium is not installed "
                                                                  "(requirements-dev.txt)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    binary, driver = chromium_and_driver()
    opts = Options()
    opts.binary_location = binary  # with both paths given, selenium fetches nothing
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(30)
    viewport(d, 1280, 800, mobile=False)
    yield d
    d.quit()


def viewport(d, width: int, height: int, *, mobile: bool) -> None:
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def wait(d, what, timeout: float = 30, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(d, timeout, poll_frequency=0.05).until(what, message)


def js(d, script: str, *args):
    return d.execute_script(script, *args)


WATCH = """
window.__samples = [];
const take = () => {
  const last = document.querySelector('#messages li.msg.assistant:last-child .text');
  window.__samples.push({seen: +document.getElementById('stat-seen').dataset.value,
                         fill: +document.getElementById('stat-fill').dataset.value,
                         streaming: document.body.dataset.streaming === 'true',
                         text: last ? last.textContent.length : 0});
};
if (window.__watch) window.__watch.disconnect();
window.__watch = new MutationObserver(take);
for (const id of ['stat-seen', 'messages'])
  window.__watch.observe(document.getElementById(id), {subtree: true, childList: true, characterData: true,
                                                       attributes: true});
"""


def send_turn(d, http, sid: str, text: str, max_tokens: int, *, shot: str | None = None) -> list[dict]:
    """Type a message and press Enter; return what the page showed while the reply streamed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    turns = http.get(f"/v1/sessions/{sid}").json()["turns"]
    box = d.find_element(By.ID, "max-tokens")
    js(d, "arguments[0].value = arguments[1]", box, str(max_tokens))
    js(d, WATCH)
    base = int(d.find_element(By.ID, "stat-seen").get_attribute("data-value"))
    d.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)
    if shot:  # a screenshot once a good part of the reply is there
        wait(d, lambda d: js(d, "return document.body.dataset.streaming === 'true' && "
                                "+document.getElementById('stat-seen').dataset.value >= arguments[0]", base + 90),
             message="the reply did not stream long enough for a screenshot")
        if shot == "page-phone.png":
            js(d, "document.getElementById('cache-title').scrollIntoView({block: 'start'})")
        IMG.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(IMG / shot))
    wait(d, lambda d: http.get(f"/v1/sessions/{sid}").json()["turns"] == turns + 1, message="turn never ended")
    seen = http.get(f"/v1/sessions/{sid}/cache").json()["tokens_seen"]
    wait(d, lambda d: d.find_element(By.ID, "stat-seen").get_attribute("data-value") == str(seen)
         and not js(d, "return document.body.dataset.streaming"), message="the cache view missed the turn's end")
    return js(d, "return window.__samples")


def test_page_in_a_browser(server, http, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    d = browser
    started = time.monotonic()
    d.get(server.url + "/")
    # the key is asked for when the API answers 401; a wrong one is refused and asked again
    key = wait(d, lambda d: (e := d.find_element(By.ID, "key")).is_displayed() and e, message="no key dialog")
    key.send_keys("wrong", Keys.ENTER)
    wait(d, lambda d: "refused" in d.find_element(By.ID, "key-why").text
         and d.find_element(By.ID, "key").is_displayed())
    d.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    wait(d, lambda d: not d.find_element(By.ID, "key-dialog").is_displayed())
    assert js(d, "return sessionStorage.getItem('sinkstream.key')") == KEY
    assert js(d, "return localStorage.length") == 0 and KEY not in d.current_url
    # every control has a label
    assert js(d, "return [...document.querySelectorAll('input, textarea')].filter(e => !e.labels.length)"
                 ".map(e => e.id)") == []

    # create a session (Enter in the form) with a system prompt; the message box gets the focus
    d.find_element(By.ID, "system").send_keys("You are terse.", Keys.ENTER)
    wait(d, lambda d: d.find_element(By.ID, "prompt").is_enabled())
    sid = js(d, "return sessionStorage.getItem('sinkstream.session')")
    assert sid and http.get(f"/v1/sessions/{sid}").json()["messages_seen"] == 1
    wait(d, lambda d: js(d, "return document.activeElement.id") == "prompt")
    item = d.find_element(By.CSS_SELECTOR, f'#session-list li[data-id="{sid}"] .pick')
    assert item.get_attribute("aria-current") == "true"
    fed = http.get(f"/v1/sessions/{sid}").json()["tokens_seen"]  # the system prompt, fed when it was made
    assert fed > 0 and d.find_element(By.ID, "stat-seen").get_attribute("data-value") == str(fed)

    # two turns: text streams in, tokens seen and the window fill grow while it streams
    fills, seens = [], []
    for turn, (text, n) in enumerate((("Hello there.", 24), ("Tell me more.", 500 if SHOTS else 60))):
        samples = send_turn(d, http, sid, text, n, shot="page-desktop.png" if SHOTS and turn else None)
        during = [s for s in samples if s["streaming"]]
        assert len({s["text"] for s in during if s["text"]}) >= 2, "the reply did not appear piece by piece"
        assert len({s["seen"] for s in during}) >= 2, "tokens seen did not move while the reply streamed"
        assert all(a["seen"] <= b["seen"] for a, b in zip(during, during[1:]))
        lay = http.get(f"/v1/sessions/{sid}/cache").json()
        shown = lambda i: d.find_element(By.ID, i).get_attribute("data-value")  # noqa: E731
        assert shown("stat-seen") == str(lay["tokens_seen"]) and shown("stat-cached") == str(lay["tokens_cached"])
        assert shown("stat-fill") == str(lay["ring"]["window_filled"])
        assert d.find_element(By.ID, "stat-slot").text == str(lay["ring"]["next_slot"])
        assert float(shown("stat-tps")) > 0
        seens.append(lay["tokens_seen"])
        fills.append(lay["ring"]["window_filled"])
        reply = d.find_elements(By.CSS_SELECTOR, "#messages li.msg.assistant .text")[-1].text
        assert reply.strip(), "no reply text"
    assert seens[0] < seens[1] and fills[0] < fills[1] == WINDOW  # the window filled up
    assert d.find_element(By.ID, "stat-fill").text == f"{WINDOW}/{WINDOW}"

    # Escape stops a reply: the turn is not kept
    js(d, "arguments[0].value = '3000'", d.find_element(By.ID, "max-tokens"))
    prompt = d.find_element(By.ID, "prompt")
    prompt.send_keys("Go on and on.", Keys.ENTER)
    wait(d, lambda d: js(d, "return document.body.dataset.streaming === 'true' && "
                            "+document.getElementById('stat-seen').dataset.value >= arguments[0]", seens[1] + 20))
    prompt.send_keys(Keys.ESCAPE)
    wait(d, lambda d: "stopped" in d.find_element(By.ID, "status").text)
    assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 2

    # reload: no key asked again (sessionStorage), the session is listed and shown with its messages
    d.refresh()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f'#session-list li[data-id="{sid}"]'))
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages li.msg")) == 5)  # system + 2 x 2
    assert not d.find_element(By.ID, "key-dialog").is_displayed()
    assert "2 turns" in d.find_element(By.CSS_SELECTOR, f'#session-list li[data-id="{sid}"]').text
    wait(d, lambda d: d.find_element(By.ID, "stat-seen").get_attribute("data-value") == str(seens[1]))

    # phone width: one column, nothing wider than the screen; mid-stream screenshot of the cache view
    viewport(d, 375, 812, mobile=True)
    d.refresh()
    wait(d, lambda d: d.find_element(By.ID, "prompt").is_enabled())
    assert js(d, "return document.documentElement.scrollWidth") <= 375
    for el in ("prompt", "send", "ring", "stat-seen"):
        assert d.find_element(By.ID, el).rect["width"] <= 375
    if SHOTS:
        send_turn(d, http, sid, "And then?", 500, shot="page-phone.png")
    viewport(d, 1280, 800, mobile=False)
    js(d, "document.body.scrollIntoView()")

    # delete: two presses (the first arms the button)
    if d.find_element(By.ID, "sessions-box").get_attribute("open") is None:  # folded after a pick at phone width
        d.find_element(By.CSS_SELECTOR, "#sessions-box summary").click()
    delete = d.find_element(By.CSS_SELECTOR, f'#session-list li[data-id="{sid}"] .delete')
    delete.click()
    assert delete.text == "Delete?"
    delete.click()
    wait(d, lambda d: not d.find_elements(By.CSS_SELECTOR, f'#session-list li[data-id="{sid}"]'))
    assert http.get(f"/v1/sessions/{sid}").status_code == 404
    assert not d.find_element(By.ID, "prompt").is_enabled()
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert errors == [], errors
    assert time.monotonic() - started < 60
