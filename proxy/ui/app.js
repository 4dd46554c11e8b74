// The proxy's dashboard: one snapshot, then live events from /proxy/events (Server-Sent
// Events). No framework, no build: plain DOM and SVG. In front of a fleet (`upstreams:`) the
// memory panel has one bar per host and the models table says on which host each model lives.
"use strict";

const GB = 1e9;
const TOKEN_KEY = "proxy-admin-token";
const RESIDENT = new Set(["loaded", "loading", "unloading"]);
// No orange or red: those mean waits, evictions and 503s on the timeline.
const PALETTE = ["#4e79a7", "#59a14f", "#b07aa1", "#76b7b2", "#9c755f", "#edc948", "#ff9da7",
                 "#86bcb6", "#bab0ac"];

const state = {
  models: new Map(),        // key → row (the snapshot's shape, kept up to date by events)
  memory: null,
  hosts: null,              // a fleet's hosts: name → memory and state (null: one server)
  upstream: null,
  health: null,
  errors: [],
  timeline: null,           // {since, now, models: {key: {resident, evictions, ...}}}
  windowH: 1,
  lastEventAt: 0,
  timelineEvents: 0,        // bumps on each event that changes the timeline
};

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, text) => {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
};
const SVG = "http://www.w3.org/2000/svg";
const svg = (tag, attrs = {}) => {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  return n;
};
const colour = (key) => {
  const keys = [...state.models.keys()];
  const i = keys.indexOf(key);
  return PALETTE[(i < 0 ? keys.length : i) % PALETTE.length];
};
const fmtMs = (v) => (v === null || v === undefined ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${Math.round(v)} ms`);
const fmtGb = (b) => `${(b / GB).toFixed(1)} GB`;
const fmtAgo = (s) => {
  if (s === null || s === undefined) return "never";
  if (s < 60) return `${Math.max(0, Math.round(s))}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  return `${(s / 3600).toFixed(1)}h ago`;
};
const nowS = () => Date.now() / 1000;

// -- the event stream ------------------------------------------------------------------------
// Read with fetch() rather than EventSource so that the stream can carry the admin token when
// the proxy requires one; reconnecting and Last-Event-ID are done here as a browser would.
let retryMs = 2000;
let lastEventId = null;
// The proxy sends a comment at least every heartbeat_s (the snapshot says how often): a
// stream silent for longer is from a proxy (or a network path) that froze, and what the page
// shows is no longer live. It then says so, and drops the stream to reconnect.
let staleMs = 31000;
let lastByteAt = 0;          // when the stream last sent anything, comments included
let heardAt = 0;             // when the proxy was last heard from (shown once stale)
let streamAbort = null;      // aborts the stream's fetch (null: none open)

function authHeaders(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function connect() {
  for (;;) {
    setConn("connecting", "connecting…");
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      streamAbort = new AbortController();
      lastByteAt = Date.now();   // a proxy that accepts and never answers is stale too
      const resp = await fetch("/proxy/events", { headers, cache: "no-store", signal: streamAbort.signal });
      if (resp.status === 401 || resp.status === 403) {
        sessionStorage.removeItem(TOKEN_KEY);
        if (await askToken() !== null) continue;
        setConn("down", "admin token needed");
        await tokenGiven();
        continue;
      } else if (!resp.ok || !resp.body) {
        setConn("down", `HTTP ${resp.status} — retrying`);
      } else {
        setConn("live", "live");
        await readEvents(resp.body.pipeThrough(new TextDecoderStream()).getReader());
        setConn("down", "reconnecting…");
      }
    } catch (e) {
      setConn("down", "reconnecting…");   // the proxy is down or restarting (or stale)
    }
    streamAbort = null;
    await new Promise((resolve) => setTimeout(resolve, retryMs));
  }
}

async function readEvents(reader) {
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    lastByteAt = heardAt = Date.now();
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      dispatch(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
}

function dispatch(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id") lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) retryMs = Number(value);
  }
  const handler = HANDLERS[type];
  if (!data.length || !handler) return;
  const payload = JSON.parse(data.join("\n"));
  if (type === "snapshot") lastEventId = payload.id;   // resume from the snapshot itself
  state.lastEventAt = Date.now();
  handler(payload);
  scheduleRender();
}

function setConn(s, text) {
  const c = $("#conn");
  // Once nothing came for too long, every state short of live again says since when.
  const stale = s !== "live" && heardAt && Date.now() - heardAt > staleMs;
  c.dataset.state = stale ? "stale" : s;
  c.textContent = stale ? `stale: nothing from the proxy since ${new Date(heardAt).toLocaleTimeString()} — ${text}` : text;
  c.title = stale ? "the figures below are as they were then" : "";
  document.body.toggleAttribute("data-stale", s !== "live");
}

function watchdog() {
  if (!streamAbort || Date.now() - lastByteAt <= staleMs) return;
  setConn("down", "reconnecting…");
  streamAbort.abort();   // connect() then tries again
}

function tl(key) {
  state.timelineEvents += 1;
  if (!state.timeline) state.timeline = { since: nowS() - state.windowH * 3600, now: nowS(), models: {} };
  let m = state.timeline.models[key];
  if (!m) m = state.timeline.models[key] = { resident: [], evictions: [], preloads: [], waits: [], rejects: [], density: [], loading_since: null };
  return m;
}

function row(key) {
  let r = state.models.get(key);
  if (!r) {
    r = { model: key, state: "unloaded", owner: null, priority: 5, pinned: false, in_flight: 0, waiting: 0 };
    state.models.set(key, r);
  }
  return r;
}

const HANDLERS = {
  snapshot(d) {
    if (d.heartbeat_s) staleMs = (2 * d.heartbeat_s + 1) * 1000;
    state.models = new Map(d.models.map((m) => [m.model, { ...m, last_used_at: m.last_used_s_ago === null ? null : d.t - m.last_used_s_ago }]));
    state.memory = d.memory;
    state.hosts = d.hosts || null;
    state.upstream = d.upstream;
    state.health = d.health;
    state.errors = d.errors || [];
    fetchTimeline();
  },
  state(d) {
    const r = row(d.model);
    if (d.host) {
      r.hosts = { ...(r.hosts || {}), [d.host]: d.new };
      r.state = fleetState(r.hosts);   // the model's best state over the hosts
    } else r.state = d.new;
    if (d.new === "loaded" && d.old === "loading") r.owner = "proxy";
    if (d.new === "loaded" && (d.old === "unloaded" || d.old === "error")) r.owner = "external";  // found by reconcile
    if (d.new === "unloaded") r.owner = null;
    const t = tl(d.model);
    if (d.new === "loading") t.loading_since = d.t;
    else if (d.new === "loaded" && d.old !== "unloading") {
      t.resident.push([d.t, null, t.loading_since === null ? null : d.t - t.loading_since, null]);
      t.loading_since = null;
    } else if (d.new === "unloaded" || d.new === "error") {
      t.loading_since = null;
      const last = t.resident[t.resident.length - 1];
      if (last && last[1] === null) { last[1] = d.t; last[3] = t.evicting || "external"; }
      t.evicting = null;
    }
  },
  load(d) {
    const r = row(d.model);
    if (d.footprint_bytes !== undefined) {
      r.footprint_mb = Math.round(d.footprint_bytes / 1e6);
      r.footprint_source = d.footprint_source;
    }
    if (d.ok) r.loads = (r.loads || 0) + 1;
    else state.errors.push({ t: d.t, model: d.model, kind: "load_failed", message: d.error });
  },
  evict(d) {
    const t = tl(d.model);
    t.evicting = d.reason;
    t.evictions.push([d.t, d.reason, d.for_model]);
  },
  unload() {},
  preload(d) {
    const t = tl(d.model);
    (t.preloads = t.preloads || []).push([d.t, d.reason]);
  },
  queue(d) {
    row(d.model).waiting = d.waiting;
    const w = tl(d.model).waits;
    const open = w.length && w[w.length - 1][1] === null;
    if (d.waiting && !open) w.push([d.t, null]);
    else if (!d.waiting && open) w[w.length - 1][1] = d.t;
  },
  requests(d) {
    const minute = Math.floor(d.t / 60) * 60;
    for (const [key, s] of Object.entries(d.models)) {
      if (key === "__other__") continue;
      const r = row(key);
      if (s.stats) Object.assign(r, s.stats);
      r.last_used_at = d.t;
      const t = tl(key);
      const last = t.density[t.density.length - 1];
      if (last && last[0] === minute) { last[1] += s.requests; last[2] += s.errors; }
      else t.density.push([minute, s.requests, s.errors]);
      if (s.rejected) t.rejects.push([d.t, s.rejected]);
      if (s.errors) {
        const by = Object.entries(s.error_statuses || {}).map(([code, n]) => `${n} × ${code}`).join(", ");
        state.errors.push({ t: d.t, model: key, kind: "request", message: by || `${s.errors} failed` });
      }
    }
  },
  in_flight(d) {
    for (const [key, n] of Object.entries(d.models)) row(key).in_flight = n;
  },
  memory(d) {
    state.memory = d;
    if (d.hosts) state.hosts = d.hosts;
  },
  alert(d) {
    if (!state.health) state.health = { status: "ok", alerts: [], system_health: {} };
    const alerts = state.health.alerts.filter((a) => a.id !== d.alert.id);
    if (d.status === "firing") alerts.push(d.alert);
    state.health.alerts = alerts;
    state.health.status = alerts.some((a) => a.severity === "critical") ? "critical" : alerts.length ? "degraded" : "ok";
  },
  pin(d) { row(d.model).pinned = d.pinned; },
};

// A model on several hosts: loaded anywhere is loaded; else the busiest state it has.
const STATE_RANK = ["loaded", "loading", "unloading", "error", "unknown", "unloaded"];
function fleetState(hosts) {
  const states = Object.values(hosts);
  return STATE_RANK.find((s) => states.includes(s)) || states[0] || "unloaded";
}

// A model's state on one host as the proxy counts it: nothing is loaded on a host that is
// down (its models are served elsewhere; its return reconciles what it still has).
function hostState(r, h) {
  const s = r.hosts[h];
  const host = state.hosts && state.hosts[h];
  return s === "loaded" && host && host.up === false ? "unloaded" : s;
}

// Its state over the fleet (on one server: its own).
function shownState(r) {
  if (!r.hosts) return r.state;
  return fleetState(Object.fromEntries(Object.keys(r.hosts).map((h) => [h, hostState(r, h)])));
}

// The hosts where a model is resident (loaded, loading or unloading).
function residentHosts(r) {
  if (r.hosts) return Object.keys(r.hosts).filter((h) => RESIDENT.has(hostState(r, h)));
  return r.host && RESIDENT.has(r.state) ? [r.host] : [];
}

async function fetchTimeline() {
  // Events that arrive while the request is out would be lost under the older answer: ask
  // again until an answer was not overtaken by them.
  for (let attempt = 0; attempt < 5; attempt++) {
    const seen = state.timelineEvents;
    try {
      const resp = await fetch(`/proxy/timeline?hours=${state.windowH}`, { headers: authHeaders() });
      if (!resp.ok) return;
      const data = await resp.json();
      if (state.timelineEvents !== seen) continue;
      state.timeline = data;
      scheduleRender();
      return;
    } catch (e) {
      return;   // the proxy is restarting; the next snapshot fetches it again
    }
  }
}

// -- actions ---------------------------------------------------------------------------------
async function adminPost(path, body) {
  const send = () => fetch(path, {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
  let resp = await send();
  if (resp.status === 401 || resp.status === 403) {
    if (await askToken() === null) return resp;
    resp = await send();
    if (resp.status === 401 || resp.status === 403) sessionStorage.removeItem(TOKEN_KEY);
  }
  return resp;
}

// One prompt at a time, shared by the stream and the actions; resolves to the token or null.
let tokenPrompt = null;
let tokenWaiters = [];

function askToken() {
  if (tokenPrompt) return tokenPrompt;
  const dialog = $("#token-dialog");
  const input = $("#token-input");
  input.value = "";
  tokenPrompt = new Promise((resolve) => {
    const done = (value) => {
      if (dialog.open) dialog.close();
      tokenPrompt = null;
      if (value !== null) {
        sessionStorage.setItem(TOKEN_KEY, value);
        for (const wake of tokenWaiters.splice(0)) wake();
      }
      resolve(value);
    };
    $("#token-cancel").onclick = () => done(null);
    dialog.onsubmit = (ev) => { ev.preventDefault(); done(input.value); };
    dialog.oncancel = () => done(null);
    dialog.showModal();
    input.focus();
  });
  return tokenPrompt;
}

// After a cancelled prompt the stream waits until an action gets a token, instead of asking
// again every few seconds.
const tokenGiven = () => new Promise((resolve) => tokenWaiters.push(resolve));

async function act(kind, key) {
  const r = row(key);
  const [path, body, what] = {
    load: ["/proxy/models/load", { model: key }, "loading"],
    unload: ["/proxy/models/unload", { model: key }, "unloading"],
    pin: ["/proxy/models/pin", { model: key, pinned: !r.pinned }, r.pinned ? "unpinning" : "pinning"],
  }[kind];
  status(`${what} ${key}…`);
  try {
    const resp = await adminPost(path, body);
    const data = await resp.json().catch(() => ({}));
    const failed = Object.entries(data.failed || {});   // a fleet's hosts that could not act
    if (resp.ok && failed.length) {
      const done = data.unloaded_on && data.unloaded_on.length ? `unloaded on ${data.unloaded_on.join(", ")}; ` : "";
      status(`${key}: ${done}failed on ${failed.map(([h, e]) => `${h} (${e.message})`).join(", ")}`, true);
    } else if (resp.ok) status(`${key}: ${kind === "pin" ? (data.pinned ? "pinned" : "unpinned") : data.state || "done"}`);
    else status(`${key}: ${(data.error && data.error.message) || `HTTP ${resp.status}`}`, true);
  } catch (e) {
    status(`${key}: the proxy did not answer`, true);
  }
}

function status(text, error = false) {
  const s = $("#action-status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

// -- rendering -------------------------------------------------------------------------------
let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; render(); });
}

function render() {
  renderHeader();
  renderMemory();
  renderModels();
  renderTimeline();
  renderHealth();
}

function renderHeader() {
  const p = $("#pressure");
  const level = state.memory ? state.memory.level : "";
  p.dataset.level = level;
  p.textContent = `pressure ${level || "–"}`;
  const u = state.upstream;
  const up = $("#upstream");
  up.dataset.ok = u ? String(u.ok) : "";
  up.textContent = u ? `upstream ${u.ok ? "up" : "down"}${u.api_level ? ` (${u.api_level})` : ""}` : "upstream –";
  const waiting = [...state.models.values()].reduce((n, r) => n + (r.waiting || 0), 0);
  $("#queue-summary").textContent = waiting ? `${waiting} request(s) waiting for memory` : "";
}

function renderMemory() {
  const fleet = !!(state.hosts && Object.keys(state.hosts).length);
  document.body.toggleAttribute("data-fleet", fleet);
  $("#memory-bar").hidden = fleet;
  $("#memory-legend").hidden = fleet;
  renderHosts(fleet);
  const m = state.memory;
  if (fleet) {
    $("#memory-bar").replaceChildren();
    $("#memory-legend").replaceChildren();
    const up = Object.values(state.hosts).filter((h) => h.up).length;
    $("#memory-summary").textContent = m && m.total_bytes
      ? `${fmtGb(m.total_bytes - m.available_bytes)} of ${fmtGb(m.total_bytes)} used on the ${up} of ${Object.keys(state.hosts).length} hosts up`
      : "";
    return;
  }
  const drawn = drawBar($("#memory-bar"), $("#memory-legend"), m,
                        [...state.models.values()].filter((r) => RESIDENT.has(shownState(r))));
  if (m && m.managed === false) {
    $("#memory-summary").textContent = "not managed: the server loads its models itself";
  } else if (drawn) {
    $("#memory-summary").textContent =
      `${fmtGb(Math.max(drawn.used, drawn.models))} of ${fmtGb(drawn.total)} used (${m.sampler === "budget" ? "budget" : "system"})`;
  }
}

// One block per host: its name and state, its memory bar with the models resident there.
function renderHosts(fleet) {
  const root = $("#host-bars");
  if (!fleet) { root.replaceChildren(); return; }
  const names = Object.keys(state.hosts);
  for (const block of [...root.children]) if (!names.includes(block.dataset.host)) block.remove();
  for (const name of names) {
    const h = state.hosts[name];
    let block = root.querySelector(`.host-block[data-host="${CSS.escape(name)}"]`);
    if (!block) {
      block = el("div", { class: "host-block", "data-host": name });
      const head = el("h3");
      head.append(el("span", { class: "host-name" }, name), " ",
                  el("span", { class: "host-state badge" }), " ",
                  el("span", { class: "host-summary muted" }));
      block.append(head, el("div", { class: "membar", role: "img", "aria-label": `memory use on ${name}` }),
                   el("ul", { class: "legend" }));
      root.append(block);
    }
    block.dataset.up = String(!!h.up);
    const badge = block.querySelector(".host-state");
    badge.textContent = h.up ? "up" : "down";
    badge.dataset.ok = String(!!h.up);
    const resident = [...state.models.values()].filter((r) => residentHosts(r).includes(name))
      .map((r) => ({ ...r, state: r.hosts ? hostState(r, name) : r.state }));
    // A host that does not answer: its last figures are not its memory now.
    const drawn = drawBar(block.querySelector(".membar"), block.querySelector(".legend"),
                          h.up ? h : null, resident);
    block.querySelector(".host-summary").textContent = drawn
      ? `${fmtGb(Math.max(drawn.used, drawn.models))} of ${fmtGb(drawn.total)} used`
      : h.up ? "memory not known yet" : "not answering: its memory is not known";
  }
}

// One memory bar: the resident models' footprints, other use, free, the reserve and the
// ceiling. Returns the figures drawn, or null when the memory is not known.
function drawBar(bar, legend, m, resident) {
  bar.replaceChildren();
  legend.replaceChildren();
  if (!m || !m.total_bytes) return null;
  bar.dataset.level = m.level;
  const total = m.total_bytes;
  const pct = (b) => `${Math.max(0, (100 * b) / total)}%`;
  let models = 0;
  for (const r of resident) {
    const bytes = (r.footprint_mb || 0) * 1e6;
    models += bytes;
    const seg = el("div", { class: `seg model${r.footprint_source !== "estimated" ? "" : " estimated"}`, "data-model": r.model,
                           title: `${r.model}: ${fmtGb(bytes)} (${r.footprint_source !== "estimated" ? "learned" : "estimated"}, ${r.state})` });
    seg.style.width = pct(bytes);
    seg.style.background = colour(r.model);
    seg.textContent = r.model.split("/").pop();
    bar.append(seg);
    const li = el("li");
    li.append(el("span", { class: "swatch", style: `background:${colour(r.model)}` }),
              `${r.model} ${fmtGb(bytes)}${r.footprint_source !== "estimated" ? "" : " (estimated)"}`);
    legend.append(li);
  }
  const used = total - m.available_bytes;
  const other = Math.max(0, used - models);
  if (other > total * 0.005) {
    const seg = el("div", { class: "seg other", title: `other use: ${fmtGb(other)}` });
    seg.style.width = pct(other);
    bar.append(seg);
    const li = el("li");
    li.append(el("span", { class: "swatch other" }), `other ${fmtGb(other)}`);
    legend.append(li);
  }
  // The sample may be up to a tick older than the model states: never draw more than the total.
  const available = Math.min(m.available_bytes, Math.max(0, total - models - other));
  const reserve = Math.min(m.reserve_bytes || 0, available);
  const free = Math.max(0, available - reserve);
  const freeSeg = el("div", { class: "seg free", title: `free: ${fmtGb(free)}` });
  freeSeg.style.width = pct(free);
  bar.append(freeSeg);
  if (reserve > 0) {
    const seg = el("div", { class: "seg reserve", title: `min_free_memory_gb reserve: ${fmtGb(reserve)}` });
    seg.style.width = pct(reserve);
    bar.append(seg);
  }
  if (m.ceiling_percent < 100) {
    const mark = el("div", { class: "ceiling", title: `ceiling ${m.ceiling_percent}%` });
    mark.style.left = `${m.ceiling_percent}%`;
    bar.append(mark);
  }
  const li = el("li");
  li.append(el("span", { class: "swatch free" }), `free ${fmtGb(free)}`);
  legend.append(li);
  if (reserve > 0) {
    const r = el("li");
    r.append(el("span", { class: "swatch reserve" }), `reserve ${fmtGb(reserve)}`);
    legend.append(r);
  }
  return { used, models, total };
}

const COLUMNS = ["model", "state", "host", "owner", "priority", "pinned", "in_flight", "waiting", "p50", "p95",
                 "ttft", "tps", "rate", "last", "memory", "actions"];

function renderModels() {
  const body = $("#models tbody");
  const seen = new Set();
  for (const r of state.models.values()) {
    seen.add(r.model);
    let tr = body.querySelector(`tr[data-model="${CSS.escape(r.model)}"]`);
    if (!tr) {
      tr = el("tr", { "data-model": r.model });
      for (const c of COLUMNS) tr.append(el(c === "model" ? "th" : "td", { class: c, ...(c === "model" ? { scope: "row" } : {}) }));
      const actions = tr.querySelector(".actions");
      for (const kind of ["load", "unload", "pin"]) {
        const b = el("button", { type: "button", class: kind }, kind);
        b.addEventListener("click", () => act(kind, r.model));
        actions.append(b);
      }
      body.append(tr);
    }
    const set = (c, text) => { const n = tr.querySelector(`.${c}`); if (n.textContent !== String(text)) n.textContent = text; };
    const shown = shownState(r);
    const resident = RESIDENT.has(shown);
    renderModelCell(tr.querySelector(".model"), r);
    set("state", shown);
    tr.querySelector(".state").dataset.state = shown;
    set("host", residentHosts(r).join(", ") || "–");
    set("owner", r.owner || "–");
    set("priority", r.priority ?? "–");
    set("pinned", r.pinned ? "pinned" : "");
    set("in_flight", r.in_flight || 0);
    set("waiting", r.waiting || 0);
    set("p50", fmtMs(r.p50_latency_ms));
    set("p95", fmtMs(r.p95_latency_ms));
    set("ttft", fmtMs(r.avg_ttft_ms));
    set("tps", r.tokens_per_s ?? "–");
    set("rate", r.usage_frequency_per_h ?? 0);
    set("last", fmtAgo(r.last_used_at ? nowS() - r.last_used_at : null));
    set("memory", r.footprint_mb == null ? "–" : `${(r.footprint_mb / 1000).toFixed(1)} GB${r.footprint_source !== "estimated" ? "" : " est."}`);
    // Not on a server the proxy cannot load or unload on (upstream.kind: openai, LM Studio
    // before 0.4), once it has said so (capabilities are null until it first answers).
    const u = state.upstream;
    const manual = !(u && u.capabilities && u.manages_loading === false);
    tr.querySelector("button.load").disabled = resident || !manual;
    tr.querySelector("button.unload").disabled = shown !== "loaded" || !manual;
    const pin = tr.querySelector("button.pin");
    const pinText = r.pinned ? "unpin" : "pin";
    if (pin.textContent !== pinText) pin.textContent = pinText;
    pin.setAttribute("aria-pressed", String(!!r.pinned));
  }
  for (const tr of [...body.querySelectorAll("tr")]) if (!seen.has(tr.dataset.model)) tr.remove();
}

function renderModelCell(cell, r) {
  // The model's key, then a small label for each group it is in (config `groups:`).
  const groups = r.groups || [];
  const sig = `${r.model}|${groups.map((g) => `${g.name}:${g.policy}`).join(",")}`;
  if (cell.dataset.sig === sig) return;
  cell.dataset.sig = sig;
  cell.replaceChildren(r.model);
  for (const g of groups) {
    cell.append(" ", el("span", { class: "group", "data-policy": g.policy,
                                  title: `${g.policy} group '${g.name}': ${g.members.join(", ")}` },
                        `${g.name} · ${g.policy}`));
  }
}

function renderTimeline() {
  const root = $("#timeline");
  const keys = [...state.models.keys()];
  const width = Math.max(480, root.parentElement.clientWidth - 2);
  const lane = 30;
  const top = 22;
  const height = top + lane * Math.max(1, keys.length) + 4;
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("width", width);
  root.setAttribute("height", height);
  root.replaceChildren();
  // The name column is as wide as the longest name, within a third of the width; longer
  // names are shortened in the middle.
  const probe = svg("text", { class: "lane-label" });
  root.append(probe);
  let longest = 0;
  for (const key of keys) {
    probe.textContent = key;
    longest = Math.max(longest, textWidth(probe));
  }
  probe.remove();
  const label = Math.max(120, Math.min(longest + 16, width / 3));
  const now = nowS();
  // Nothing is known from before the proxy started (unless the history store had it): the
  // axis starts there rather than showing an empty stretch.
  const tlData = state.timeline || {};
  let earliest = tlData.started || now;
  for (const m of Object.values(tlData.models || {})) if (m.density && m.density.length) earliest = Math.min(earliest, m.density[0][0]);
  const since = Math.max(now - state.windowH * 3600, Math.min(earliest, now - 60));
  const x = (t) => label + ((Math.max(since, Math.min(now, t)) - since) / (now - since)) * (width - label - 8);
  // time axis
  const step = [10, 30, 60, 300, 600, 1800, 3600, 7200, 14400].find((s) => (now - since) / s <= 8) || 14400;
  for (let t = Math.ceil(since / step) * step; t <= now; t += step) {
    const d = new Date(t * 1000);
    root.append(svg("line", { x1: x(t), x2: x(t), y1: top - 4, y2: height, class: "grid" }));
    const txt = svg("text", { x: x(t), y: 12, class: "axis", "text-anchor": "middle" });
    const two = (v) => String(v).padStart(2, "0");
    txt.textContent = `${two(d.getHours())}:${two(d.getMinutes())}${step < 60 ? `:${two(d.getSeconds())}` : ""}`;
    root.append(txt);
  }
  const models = (state.timeline && state.timeline.models) || {};
  keys.forEach((key, i) => {
    const y = top + i * lane;
    const g = svg("g", { class: "lane", "data-model": key });
    root.append(g);   // in the document first: its texts are measured as they are placed
    const name = svg("text", { x: 4, y: y + lane / 2 + 4, class: "lane-label", "data-full": key });
    const shown = svg("tspan");
    name.append(shown, title(key));   // the whole name on hover, however it was shortened
    g.append(name);
    fitText(shown, key, label - 12);
    g.append(svg("line", { x1: label, x2: width - 8, y1: y + lane, y2: y + lane, class: "lane-sep" }));
    const m = models[key] || {};
    const c = colour(key);
    const dens = (m.density || []).filter((d) => d[0] + 60 >= since);
    const peak = Math.max(1, ...dens.map((d) => d[1]));
    for (const [minute, n, failures] of dens) {
      const h = Math.max(1, (7 * n) / peak);   // a thin strip under the residency bar
      const r = svg("rect", { x: x(minute), y: y + lane - 2 - h, width: Math.max(1, x(minute + 60) - x(minute) - 0.5), height: h, class: failures ? "density failed" : "density" });
      r.append(title(`${n} request(s)${failures ? `, ${failures} failed` : ""} in the minute from ${new Date(minute * 1000).toLocaleTimeString()}`));
      g.append(r);
    }
    for (const [start, end, loadS, reason] of m.resident || []) {
      const stop = end === null ? now : end;
      if (stop < since) continue;
      const r = svg("rect", { x: x(start), y: y + 3, width: Math.max(1, x(stop) - x(start)), height: lane - 14, class: "resident", fill: c });
      r.append(title(`${key} resident ${new Date(start * 1000).toLocaleTimeString()}–${end === null ? "now" : new Date(end * 1000).toLocaleTimeString()}${reason ? ` (ended: ${reason})` : ""}`));
      g.append(r);
      if (loadS) {
        const lb = svg("rect", { x: x(start - loadS), y: y + 3, width: Math.max(2, x(start) - x(start - loadS)), height: lane - 14, class: "load-bar" });
        lb.append(title(`load took ${loadS.toFixed(2)} s`));
        g.append(lb);
      }
    }
    if (m.loading_since) {
      const lb = svg("rect", { x: x(m.loading_since), y: y + 3, width: Math.max(2, x(now) - x(m.loading_since)), height: lane - 14, class: "load-bar" });
      lb.append(title("loading"));
      g.append(lb);
    }
    for (const [start, end] of m.waits || []) {
      const stop = end === null ? now : end;
      if (stop < since) continue;
      const w = svg("rect", { x: x(start), y: y + lane - 8, width: Math.max(2, x(stop) - x(start)), height: 5, class: "wait" });
      w.append(title(`requests waited ${(stop - start).toFixed(1)} s for memory`));
      g.append(w);
    }
    for (const [t, n] of m.rejects || []) {
      if (t < since) continue;
      const r = svg("rect", { x: x(t) - 1.5, y: y + 1, width: 3, height: lane - 10, class: "reject" });
      r.append(title(`${n} × 503 at ${new Date(t * 1000).toLocaleTimeString()}`));
      g.append(r);
    }
    for (const [t, reason] of m.preloads || []) {
      if (t < since) continue;
      const mark = svg("path", { d: `M${x(t) - 4},${y + lane - 4} L${x(t) + 4},${y + lane - 4} L${x(t)},${y + lane - 10} Z`, class: "preload-mark", "data-model": key, "data-reason": reason });
      mark.append(title(`preloaded: ${reason} at ${new Date(t * 1000).toLocaleTimeString()}`));
      g.append(mark);
    }
    // Eviction labels never overlap: each goes right of its mark, else left, else in a
    // shorter form, else not at all (the mark's tooltip still says everything).
    const taken = [];
    const free = (a, b) => a >= label && b <= width - 8 && taken.every(([l, r]) => b + 4 <= l || a >= r + 4);
    for (const [t, reason, forModel] of m.evictions || []) {
      if (t < since) continue;
      const text = `evicted: ${reason}${forModel ? ` for ${forModel}` : ""}`;
      const mark = svg("g", { class: "evict-mark", "data-model": key, "data-reason": reason, "data-for": forModel || "" });
      mark.append(svg("line", { x1: x(t), x2: x(t), y1: y + 2, y2: y + lane - 2 }),
                  svg("path", { d: `M${x(t) - 4},${y + 2} L${x(t) + 4},${y + 2} L${x(t)},${y + 8} Z` }),
                  title(`${text} at ${new Date(t * 1000).toLocaleTimeString()}`));
      g.append(mark);
      const lbl = svg("text", { y: y + lane / 2 + 4, class: "evict-label" });
      mark.append(lbl);
      const forName = forModel ? forModel.split("/").pop() : "";
      const short = forName.length > 24 ? `${forName.slice(0, 11)}…${forName.slice(-12)}` : forName;
      const forms = forModel ? [`${reason} → ${short}`, reason] : [reason];
      let placed = false;
      for (const form of forms) {
        lbl.textContent = form;
        const w = textWidth(lbl);
        for (const [a, b, anchor] of [[x(t) + 5, x(t) + 5 + w, "start"], [x(t) - 5 - w, x(t) - 5, "end"]]) {
          if (free(a, b)) {
            lbl.setAttribute("x", anchor === "start" ? a : b);
            lbl.setAttribute("text-anchor", anchor);
            taken.push([a, b]);
            placed = true;
            break;
          }
        }
        if (placed) break;
      }
      if (!placed) lbl.remove();
      taken.push([x(t) - 4, x(t) + 4]);   // the mark itself: later labels keep off it
    }
  });
}

// Text widths in px as drawn; an estimate while the SVG is not rendered (hidden panel).
function textWidth(node) {
  const w = node.getComputedTextLength ? node.getComputedTextLength() : 0;
  return w > 0 ? w : node.textContent.length * 6.5;
}

// Shorten text in its middle until it fits maxPx (a model key's publisher and its tail both
// tell models apart); the full text stays in data-full and in a <title>.
function fitText(node, text, maxPx) {
  node.textContent = text;
  if (textWidth(node) <= maxPx) return;
  let keep = text.length - 1;
  while (keep > 4) {
    const head = Math.ceil(keep / 2);
    node.textContent = `${text.slice(0, head)}…${text.slice(text.length - (keep - head))}`;
    if (textWidth(node) <= maxPx) return;
    keep -= 1;
  }
}

function title(text) {
  const t = svg("title");
  t.textContent = text;
  return t;
}

function renderHealth() {
  const h = state.health;
  const badge = $("#health-status");
  badge.textContent = h ? h.status : "–";
  badge.dataset.status = h ? h.status : "";
  const hb = $("#health-badge");
  hb.textContent = `health ${h ? h.status : "–"}`;
  hb.dataset.status = h ? h.status : "";
  const u = state.upstream;
  $("#health-upstream").textContent = u
    ? `Upstream ${u.ok ? "reachable" : "unreachable"}, API level ${u.api_level || "unknown"}${u.error ? ` — ${u.error}` : ""}`
    : "";
  const alerts = $("#alerts");
  alerts.replaceChildren(...((h && h.alerts) || []).map((a) => {
    const li = el("li", { "data-severity": a.severity });
    li.append(el("strong", {}, a.severity), ` ${a.message}`);
    return li;
  }));
  if (!alerts.children.length) alerts.append(el("li", { class: "muted" }, "none"));
  const errors = $("#errors");
  state.errors = state.errors.slice(-20);
  errors.replaceChildren(...state.errors.slice().reverse().map((e) => el("li", {},
    `${new Date(e.t * 1000).toLocaleTimeString()} ${e.model || ""} ${e.message || e.kind}`)));
  if (!errors.children.length) errors.append(el("li", { class: "muted" }, "none"));
}

// -- start -----------------------------------------------------------------------------------
for (const b of document.querySelectorAll(".zoom button")) {
  b.addEventListener("click", () => {
    state.windowH = Number(b.dataset.hours);
    for (const o of document.querySelectorAll(".zoom button")) o.setAttribute("aria-pressed", String(o === b));
    fetchTimeline();
    scheduleRender();
  });
}
window.addEventListener("resize", scheduleRender);
setInterval(scheduleRender, 2000);   // ages and the moving time axis
setInterval(watchdog, 500);
connect();
