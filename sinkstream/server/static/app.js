// sinkstream's page: chat in persistent sessions, with a live view of the session's KV cache.
// Plain JS, no build step, no library; talks only to the server that served it (see docs/SERVER.md).
"use strict";

const KEY_ITEM = "sinkstream.key";          // sessionStorage: this tab only, never in a URL
const CURRENT_ITEM = "sinkstream.session";
const TIMINGS_ITEM = "sinkstream.timings.";  // + session id: ms/token samples for the plot
const MAX_POINTS = 2000;                     // ms/token samples kept per session

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem(KEY_ITEM),
  current: null,      // session id shown
  sessions: [],       // GET /v1/sessions data
  layout: null,       // GET /v1/sessions/{id}/cache of the current session (last completed turn)
  live: null,         // while a turn streams: {generated, first, last, base, ...}
  timings: [],        // ms/token samples of the current session: numbers, or "|" for a turn boundary
  lastRate: null,     // tokens/s of the last turn
  lastTtft: null,     // ms to the first token of the last turn
};

// --- API ------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

let keyPrompt = null;  // one dialog for every request that got 401 meanwhile

function askKey(refused) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog"), input = $("key");
  $("key-why").textContent = refused
    ? "That key was refused. Enter the server's API key (kept in this tab only)."
    : "This server needs an API key. It is kept in this tab only (sessionStorage), never in a URL.";
  input.value = "";
  keyPrompt = new Promise((resolve, reject) => {
    const done = (ok) => {
      $("key-form").removeEventListener("submit", onSubmit);
      dialog.removeEventListener("cancel", onCancel);
      keyPrompt = null;
      if (dialog.open) dialog.close();
      $("key-button").hidden = false;  // to give (or change) the key later
      ok ? resolve() : reject(new ApiError(401, "an API key is needed", "invalid_api_key"));
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      state.key = key;
      sessionStorage.setItem(KEY_ITEM, key);
      done(true);
    };
    const onCancel = () => done(false);
    $("key-form").addEventListener("submit", onSubmit);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

async function api(path, { method = "GET", body, headers = {}, signal, raw = false } = {}) {
  for (let tries = 0; ; tries++) {
    const h = { ...headers };
    if (state.key) h.Authorization = "Bearer " + state.key;
    if (body !== undefined) h["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers: h, signal, cache: "no-store",
                                  body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401 && tries < 5) {
      const refused = Boolean(state.key);
      state.key = null;
      sessionStorage.removeItem(KEY_ITEM);
      await askKey(refused);
      continue;
    }
    if (raw && r.ok) return r;
    const data = await r.json().catch(() => null);
    if (!r.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(r.status, err.message || `${r.status} ${r.statusText}`, err.code);
    }
    return data;
  }
}

// --- status and formatting ------------------------------------------------------------------------
function status(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.dataset.kind = kind;
}

function fail(e) {
  if (e && e.name === "AbortError") return;
  status(e instanceof ApiError ? `${e.status}: ${e.message}` : String(e), "error");
}

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 100 ? 1 : 0)} ${units[i]}`;
}

function setStat(id, value, text) {
  const el = $(id);
  el.textContent = text === undefined ? String(value) : text;
  if (value !== null && value !== undefined) el.dataset.value = String(value);
}

// --- sessions -------------------------------------------------------------------------------------
async function loadSessions() {
  const data = await api("/v1/sessions");
  state.sessions = data.data || [];
  renderSessions();
  return state.sessions;
}

function renderSessions() {
  const list = $("session-list");
  list.replaceChildren();
  $("session-count").textContent = `(${state.sessions.length})`;
  for (const s of state.sessions) {
    const li = document.createElement("li");
    li.className = "session";
    li.dataset.id = s.id;
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "pick";
    if (s.id === state.current) pick.setAttribute("aria-current", "true");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = s.id;
    const meta = document.createElement("span");
    meta.className = "meta muted";
    meta.textContent = s.damaged ? "damaged"
      : `${s.turns} turn${s.turns === 1 ? "" : "s"} · ${s.tokens_seen} tokens · ${s.cache}`;
    pick.append(name, meta);
    pick.addEventListener("click", () => select(s.id).catch(fail));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete quiet";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete session ${s.id}`);
    del.addEventListener("click", () => confirmDelete(del, s.id));
    li.append(pick, del);
    list.append(li);
  }
}

function confirmDelete(button, sid) {
  // two presses: the first arms the button for 4 s, the second deletes
  if (button.dataset.armed) {
    deleteSession(sid).catch(fail);
    return;
  }
  button.dataset.armed = "1";
  button.textContent = "Delete?";
  button.setAttribute("aria-label", `Press again to delete session ${sid}`);
  setTimeout(() => {
    if (!button.isConnected) return;
    delete button.dataset.armed;
    button.textContent = "Delete";
    button.setAttribute("aria-label", `Delete session ${sid}`);
  }, 4000);
}

async function deleteSession(sid) {
  await api(`/v1/sessions/${encodeURIComponent(sid)}`, { method: "DELETE" });
  sessionStorage.removeItem(TIMINGS_ITEM + sid);
  if (sid === state.current) showSession(null);
  status(`deleted ${sid}`);
  await loadSessions();
  $("system").focus();
}

async function createSession(system) {
  const body = system ? { system } : {};
  const s = await api("/v1/sessions", { method: "POST", body });
  status(`created ${s.id}`);
  await loadSessions();
  await select(s.id);
}

function showSession(sid) {
  state.current = sid;
  state.layout = null;
  state.lastRate = state.lastTtft = null;
  if (sid) sessionStorage.setItem(CURRENT_ITEM, sid);
  else sessionStorage.removeItem(CURRENT_ITEM);
  $("current").textContent = sid ? `· ${sid}` : "";
  $("messages").replaceChildren();
  $("prompt").disabled = $("send").disabled = !sid;
  $("cache-view").hidden = !sid;
  $("cache-empty").hidden = Boolean(sid);
  try {
    state.timings = sid ? JSON.parse(sessionStorage.getItem(TIMINGS_ITEM + sid) || "[]") : [];
  } catch (e) {
    state.timings = [];
  }
  renderSessions();
}

async function select(sid) {
  if (state.live) return;  // not while a turn streams
  showSession(sid);
  const info = await api(`/v1/sessions/${encodeURIComponent(sid)}`);
  if (state.current !== sid) return;
  for (const m of info.recent_messages || []) addMessage(m.role, m.content);
  await refreshLayout();
  if (window.matchMedia("(max-width: 760px)").matches) $("sessions-box").open = false;
  $("prompt").focus();
}

// --- chat -----------------------------------------------------------------------------------------
function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  const list = $("messages");
  const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(li);
  if (atEnd) list.scrollTop = list.scrollHeight;
  return body;
}

function parseEvents(buffer, onEvent) {
  // server-sent events: "data: <json>\n\n"; returns what is left of an incomplete event
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
    if (data) onEvent(data);
  }
  return buffer;
}

async function send(text) {
  const sid = state.current;
  if (!sid || state.live) return;
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  const maxTokens = Math.max(1, parseInt($("max-tokens").value, 10) || 128);
  const temperature = Math.max(0, parseFloat($("temperature").value) || 0);
  const live = state.live = { generated: 0, started: performance.now(), first: null, last: null,
                              base: state.layout, abort: new AbortController(), usage: null, finish: null };
  document.body.dataset.streaming = "true";
  $("send").disabled = true;
  $("stop").hidden = false;
  status("waiting for the first token…");
  pushTiming("|");
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST", raw: true, signal: live.abort.signal, headers: { "X-Session-Id": sid },
      body: { messages: [{ role: "user", content: text }], append: true, stream: true, max_tokens: maxTokens,
              temperature, stream_options: { include_usage: true } },
    });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (data) => {
        if (data === "[DONE]") { finished = true; return; }
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError("stream", obj.error.message, obj.error.code);
        if (obj.usage) live.usage = obj.usage;
        const choice = (obj.choices || [])[0];
        if (!choice) return;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          out.append(piece);  // a text node per piece: no copying of the reply so far
          token();
        }
        if (choice.finish_reason) live.finish = choice.finish_reason;
      });
    }
    const n = live.usage ? live.usage.completion_tokens : live.generated;
    if (live.first !== null && live.last > live.first && n > 1) {
      state.lastRate = (n - 1) / ((live.last - live.first) / 1000);
    }
    status(`${n} tokens${live.finish ? ` (${live.finish})` : ""}` +
           (live.usage ? `, ${live.usage.prompt_tokens} prompt tokens` : ""));
  } catch (e) {
    out.parentElement.classList.add("error");
    if (e.name === "AbortError") status("stopped; the turn was not kept");
    else fail(e);
  } finally {
    out.parentElement.classList.remove("streaming");
    state.live = null;
    delete document.body.dataset.streaming;
    $("send").disabled = !state.current;
    $("stop").hidden = true;
    saveTimings(sid);
    if (state.current === sid) {
      await refreshLayout().catch(fail);
      loadSessions().catch(fail);
    }
  }
}

function token() {
  // one streamed chunk = one generated token; the cache takes each token in as the next one is made
  const live = state.live, now = performance.now();
  if (live.first === null) {
    live.first = now;
    state.lastTtft = now - live.started;
  } else {
    pushTiming(now - live.last);
  }
  live.last = now;
  live.generated += 1;
  scheduleRender();
}

function pushTiming(x) {
  state.timings.push(typeof x === "number" ? Math.round(x * 100) / 100 : x);
  if (state.timings.length > MAX_POINTS) state.timings.splice(0, state.timings.length - MAX_POINTS);
}

function saveTimings(sid) {
  try { sessionStorage.setItem(TIMINGS_ITEM + sid, JSON.stringify(state.timings)); } catch (e) { /* full */ }
}

async function refreshLayout() {
  const sid = state.current;
  if (!sid) return;
  const layout = await api(`/v1/sessions/${encodeURIComponent(sid)}/cache`);
  if (state.current !== sid) return;
  state.layout = layout;
  renderCache();
}

// --- the cache view -------------------------------------------------------------------------------
// at most one redraw per 40 ms while tokens stream: the first at once, the rest on a timer
let renderPending = false, renderedAt = 0;
function scheduleRender() {
  if (renderPending) return;
  const wait = renderedAt + 40 - performance.now();
  const run = () => { renderPending = false; renderedAt = performance.now(); renderCache(); };
  if (wait <= 0) { run(); return; }
  renderPending = true;
  setTimeout(run, wait);
}

function slotOf(u, sinks, window) {
  return u < sinks ? u : sinks + ((u - sinks) % window);
}

// What the cache holds now: the last completed turn's layout, advanced by the tokens streamed since.
function currentView() {
  const L = state.layout;
  if (!L) return null;
  const live = state.live;
  const ring = L.ring;
  const extra = live ? Math.max(0, live.generated - 1) : 0;  // the newest token is not in the cache yet
  const seen = L.tokens_seen + extra;
  const size = ring.size;
  const filled = Math.min(seen, size);
  let next = ring.next_slot;
  if (live && next !== null) next = seen >= size && L.policy === "dense" ? null : slotOf(seen, ring.sinks, ring.window);
  return {
    seen, cached: L.tokens_cached + Math.min(extra, Math.max(0, size - ring.filled)),
    sinks: ring.sinks, window: ring.window, size, filled, next,
    sinksFilled: Math.min(seen, ring.sinks), windowFilled: Math.min(Math.max(seen - ring.sinks, 0), ring.window),
  };
}

function renderCache() {
  const L = state.layout, v = currentView();
  if (!L || !v) return;
  const live = state.live;
  $("cache-policy").textContent = `· ${L.cache}`;
  setStat("stat-seen", v.seen);
  setStat("stat-cached", v.cached);
  setStat("stat-capacity", L.capacity, L.capacity == null ? "–" : String(L.capacity));
  setStat("stat-bytes", L.cache_bytes, bytes(L.cache_bytes));
  setStat("stat-sinks", v.sinksFilled, `${v.sinksFilled}/${v.sinks}`);
  setStat("stat-fill", v.windowFilled, `${v.windowFilled}/${v.window}`);
  setStat("stat-slot", v.next, v.next == null ? "–" : String(v.next));
  let rate = state.lastRate;
  if (live && live.first !== null && live.last > live.first && live.generated > 1) {
    rate = (live.generated - 1) / ((live.last - live.first) / 1000);
  }
  setStat("stat-tps", rate == null ? null : Math.round(rate * 10) / 10, rate == null ? "–" : rate.toFixed(1));
  const gone = Math.max(0, v.seen - v.filled);
  $("cache-summary").textContent = `The ring holds ${v.filled} of the ${v.seen} tokens seen` + (gone
    ? `; ${gone} left the window${L.memory ? ` into memory blocks of ${L.memory.block_size}` : ""}.`
    : ".");
  if (live) status(`streaming… ${live.generated} tokens`);
  $("stat-ttft").textContent = state.lastTtft == null ? "–" : `${Math.round(state.lastTtft)} ms`;
  $("cache-note").textContent = live
    ? "Streaming: counts follow the generated tokens; the prompt's tokens join when the turn ends."
    : (L.in_memory ? "As of the last completed turn." : "From the session file (not in memory).");
  drawRing(v, L);
  drawBlocks(L);
  drawPlot();
}

function canvasFor(id, cssHeight) {
  const c = $(id);
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(120, c.clientWidth || 320);
  if (cssHeight) c.style.height = `${cssHeight}px`;
  const h = cssHeight || c.clientHeight || 100;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { c, ctx, w, h };
}

const COLORS = { sink: "#f0a030", empty: "#2a2f3a", win: [70, 140, 255], next: "#ff4d6d", recalled: "#3ddc97",
                 block: "#56607a", text: "#c8ccd4", grid: "#3a4050", line: "#7fb2ff" };

function drawRing(v, L) {
  // every slot of the ring: sinks first, then the window; a window slot's brightness is its token's age
  const total = v.size;
  const width = Math.max(120, $("ring").clientWidth || 320);
  let cell = 14;
  while (cell > 3 && Math.ceil(total / Math.floor(width / cell)) * cell > 150) cell--;
  const cols = Math.max(1, Math.floor(width / cell));
  const per = Math.max(1, Math.ceil(total / (cols * Math.floor(150 / cell))));  // slots per cell when huge
  const cells = Math.ceil(total / per);
  const rows = Math.ceil(cells / cols);
  const { ctx } = canvasFor("ring", rows * cell + 2);
  const newest = v.seen - 1;
  for (let i = 0; i < cells; i++) {
    const slot = i * per;
    const x = (i % cols) * cell, y = Math.floor(i / cols) * cell;
    let color = COLORS.empty;
    if (slot < v.sinks) {
      if (slot < v.sinksFilled) color = COLORS.sink;
    } else {
      const j = slot - v.sinks;
      const back = newest - v.sinks - j;  // the newest token u with slot_of(u) == slot: u = S + j + W*k
      if (back >= 0) {
        const u = v.sinks + j + v.window * Math.floor(back / v.window);
        const age = (newest - u) / Math.max(1, v.window);
        const a = 1 - 0.75 * Math.min(1, age);
        color = `rgba(${COLORS.win[0]},${COLORS.win[1]},${COLORS.win[2]},${a.toFixed(3)})`;
      }
    }
    ctx.fillStyle = color;
    ctx.fillRect(x + 0.5, y + 0.5, cell - (cell > 4 ? 1.5 : 0.5), cell - (cell > 4 ? 1.5 : 0.5));
  }
  if (v.next != null) {
    const i = Math.floor(v.next / per);
    const x = (i % cols) * cell, y = Math.floor(i / cols) * cell;
    ctx.strokeStyle = COLORS.next;
    ctx.lineWidth = 2;
    ctx.strokeRect(x + 1, y + 1, Math.max(2, cell - 2), Math.max(2, cell - 2));
  }
  $("ring").setAttribute("aria-label",
    `${v.sinksFilled} of ${v.sinks} sink slots and ${v.windowFilled} of ${v.window} window slots filled; ` +
    `next token goes to slot ${v.next == null ? "none" : v.next}`);
}

function drawBlocks(L) {
  const m = L.memory;
  $("memory").hidden = !m;
  if (!m) return;
  const recalled = new Set((m.recalled || []).map((r) => r.block));
  setStat("stat-blocks", m.blocks);
  setStat("stat-recalled", recalled.size, m.recalled == null ? "?" : String(recalled.size));
  $("stat-open").textContent = m.open_block_fill == null ? "?" : String(m.open_block_fill);
  const { ctx, w, h } = canvasFor("blocks", 28);
  if (!m.blocks) {
    ctx.fillStyle = COLORS.text;
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(`no block yet: one forms after ${m.block_size} tokens leave the window`, 4, 18);
    return;
  }
  const cellW = Math.max(1, w / m.blocks);
  const per = Math.max(1, Math.ceil(m.blocks / w));
  for (let b = 0; b < m.blocks; b += per) {
    let hit = false;
    for (let k = b; k < b + per && k < m.blocks; k++) hit = hit || recalled.has(k);
    ctx.fillStyle = hit ? COLORS.recalled : COLORS.block;
    ctx.fillRect((b / per) * cellW * per + 0.5, 2, Math.max(1, cellW * per - (cellW > 4 ? 1.5 : 0)), h - 4);
  }
  $("blocks").setAttribute("aria-label", `${m.blocks} memory blocks, ${recalled.size} recalled`);
}

function drawPlot() {
  const { ctx, w, h } = canvasFor("plot", 110);
  const pts = state.timings;
  const values = pts.filter((x) => typeof x === "number");
  ctx.font = "11px system-ui, sans-serif";
  if (!values.length) {
    ctx.fillStyle = COLORS.text;
    ctx.fillText("ms/token appears here while tokens stream", 4, h / 2);
    return;
  }
  const sorted = [...values].sort((a, b) => a - b);
  const top = Math.max(1, sorted[Math.floor(0.98 * (sorted.length - 1))] * 1.2);
  const left = 34, bottom = h - 14, plotW = w - left - 4;
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.text;
  ctx.lineWidth = 1;
  for (const f of [0, 0.5, 1]) {
    const y = bottom - f * (bottom - 6);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - 4, y); ctx.stroke();
    ctx.fillText((top * f).toFixed(top * f < 10 ? 1 : 0), 2, y + 4);
  }
  const n = pts.length;
  const x = (i) => left + (n <= 1 ? 0 : (i / (n - 1)) * plotW);
  ctx.strokeStyle = COLORS.grid;
  pts.forEach((p, i) => {  // turn boundaries
    if (p === "|" && i) { ctx.beginPath(); ctx.moveTo(x(i), 6); ctx.lineTo(x(i), bottom); ctx.stroke(); }
  });
  ctx.strokeStyle = COLORS.line;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let pen = false;
  pts.forEach((p, i) => {
    if (typeof p !== "number") { pen = false; return; }
    const y = bottom - Math.min(1, p / top) * (bottom - 6);
    if (pen) ctx.lineTo(x(i), y); else ctx.moveTo(x(i), y);
    pen = true;
  });
  ctx.stroke();
  const mean = values.slice(-64).reduce((a, b) => a + b, 0) / Math.min(64, values.length);
  ctx.fillStyle = COLORS.text;
  ctx.fillText(`ms/token, last ${Math.min(64, values.length)}: ${mean.toFixed(1)}`, left + 4, h - 2);
  $("plot").setAttribute("aria-label", `milliseconds per token: mean of the last tokens ${mean.toFixed(1)}`);
}

// --- wiring ---------------------------------------------------------------------------------------
function wire() {
  $("new-session").addEventListener("submit", (e) => {
    e.preventDefault();
    const system = $("system").value.trim();
    $("create").disabled = true;
    createSession(system || null).then(() => { $("system").value = ""; }).catch(fail)
      .finally(() => { $("create").disabled = false; });
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.live) return;
    $("prompt").value = "";
    send(text).catch(fail);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    } else if (e.key === "Escape" && state.live) {
      state.live.abort.abort();
    }
  });
  $("stop").addEventListener("click", () => state.live && state.live.abort.abort());
  $("key-button").addEventListener("click", () => askKey(false).then(() => start()).catch(fail));
  window.addEventListener("resize", () => scheduleRender());
  $("key-button").hidden = !state.key;
}

async function start() {
  try {
    const health = await (await fetch("/health", { cache: "no-store" })).json();
    $("model").textContent = health.model ? `model: ${health.model}` : `model ${health.status}`;
    if (health.status !== "ok") {
      status("the model is loading…");
      setTimeout(start, 1000);
      return;
    }
  } catch (e) {
    status("the server does not answer", "error");
    return;
  }
  try {
    const sessions = await loadSessions();
    const saved = sessionStorage.getItem(CURRENT_ITEM);
    if (saved && sessions.some((s) => s.id === saved)) await select(saved);
    else showSession(null);
    status(sessions.length ? "" : "create a session to start");
  } catch (e) {
    fail(e);
  }
}

wire();
start();
