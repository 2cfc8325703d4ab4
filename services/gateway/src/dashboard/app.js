// The Bazaar dashboard: draws the gateway's /_dashboard/api. Everything a
// span, a message or a letter carries is shown as text, never as markup.
"use strict";

const API = "/_dashboard/api";
const TOKEN_KEY = "bazaar.dashboard.token";
const COLORS = ["#2563eb", "#16a34a", "#ea580c", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#ca8a04", "#475569"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    // Through the CSSOM: the page's policy refuses style attributes.
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

const num = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const ms = (v) => (v === null || v === undefined ? "–" : v < 1 ? v.toFixed(2) + " ms" : v < 100 ? v.toFixed(1) + " ms" : Math.round(v) + " ms");
const us = (v) => ms(v / 1000);
const bytes = (v) => (v === null || v === undefined ? "–" : (v / 1048576).toFixed(0) + " MiB");
const when = (usec) => new Date(usec / 1000).toLocaleTimeString();
const serviceColors = new Map();
function colorOf(service) {
  if (!serviceColors.has(service)) serviceColors.set(service, COLORS[serviceColors.size % COLORS.length]);
  return serviceColors.get(service);
}

// ---- the API, with an admin token when there is one ----

function headers(extra) {
  const h = Object.assign({ accept: "application/json" }, extra || {});
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) h.authorization = "Bearer " + token;
  return h;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options) {
  const res = await fetch(API + path, Object.assign({}, options, { headers: headers(options && options.headers) }));
  if (res.status === 401 || res.status === 403) {
    needSignIn(res.status === 403 ? "An admin's account is needed." : "");
  }
  if (!res.ok) {
    let detail = res.statusText;
    try {
      const p = await res.json();
      detail = p.detail || p.title || detail;
    } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, detail);
  }
  return res.json();
}

// ---- sign-in (only off the gateway's machine) ----

function needSignIn(message) {
  $("signin").hidden = false;
  $("board").hidden = true;
  $("signin-error").textContent = message || "";
  setLive(false, "signed out");
}

$("signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("signin-error").textContent = "";
  const res = await fetch("/api/v1/auth/login", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ email: $("signin-email").value, password: $("signin-password").value }),
  });
  if (!res.ok) {
    $("signin-error").textContent = "Sign-in failed.";
    return;
  }
  const tokens = await res.json();
  localStorage.setItem(TOKEN_KEY, tokens.access_token);
  start();
});

$("sign-out").addEventListener("click", () => {
  localStorage.removeItem(TOKEN_KEY);
  location.reload();
});

// ---- live snapshots (server-sent events, read through fetch so the
// token goes in a header) ----

let streaming = null;

function setLive(on, text) {
  const live = $("live");
  live.className = "live " + (on ? "on" : "off");
  live.textContent = text;
}

async function stream() {
  if (streaming) streaming.abort();
  const ctrl = new AbortController();
  streaming = ctrl;
  while (!ctrl.signal.aborted) {
    try {
      const res = await fetch(API + "/stream", { headers: headers({ accept: "text/event-stream" }), signal: ctrl.signal });
      if (res.status === 401 || res.status === 403) {
        needSignIn(res.status === 403 ? "An admin's account is needed." : "");
        return;
      }
      if (!res.ok || !res.body) throw new Error("stream answered " + res.status);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let event = "message";
          let data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (event === "snapshot" && data) {
            draw(JSON.parse(data));
            setLive(true, "live · " + new Date().toLocaleTimeString());
          }
        }
      }
    } catch (err) {
      if (ctrl.signal.aborted) return;
    }
    setLive(false, "reconnecting…");
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// ---- drawing a snapshot ----

function draw(s) {
  drawServices(s.instances);
  drawMap(s.instances, s.edges);
  drawRoutes(s.routes);
  drawQueues(s.queues);
}

function drawServices(instances) {
  fill($("services-table").tBodies[0], instances.map((i) => {
    const health = i.healthy === null ? (i.answering ? "answering" : "not answering") : i.healthy ? "healthy" : "unhealthy";
    const good = i.healthy === null ? i.answering : i.healthy;
    return el("tr", { "data-service": i.service },
      el("td", {}, el("strong", {}, i.service)),
      el("td", { class: "mono" }, i.id),
      el("td", { class: "mono" }, i.address),
      el("td", { class: good ? "ok" : "bad" }, health),
      el("td", { class: i.breaker === "open" ? "bad" : i.breaker === "half_open" ? "warn" : "" }, i.breaker || "–"),
      el("td", { class: "num" }, num(i.requests_per_s)),
      el("td", { class: "num" }, i.cpu === null ? "–" : Math.round(i.cpu * 100) + "%"),
      el("td", { class: "num" }, bytes(i.rss_bytes)));
  }));
}

function drawMap(instances, edges) {
  const map = $("map-svg");
  const names = [...new Set(instances.map((i) => i.service).concat(edges.flatMap((e) => [e.from, e.to])))].sort();
  // The gateway first, on the left; the rest around a circle.
  const order = names.filter((n) => n === "gateway").concat(names.filter((n) => n !== "gateway"));
  const at = new Map();
  const cx = 450, cy = 210, rx = 360, ry = 165;
  order.forEach((n, k) => {
    const a = Math.PI + (2 * Math.PI * k) / Math.max(order.length, 1);
    at.set(n, [cx + rx * Math.cos(a), cy + ry * Math.sin(a)]);
  });
  const count = new Map(instances.map((i) => [i.service, 0]));
  instances.forEach((i) => count.set(i.service, count.get(i.service) + 1));
  const defs = svg("defs", {}, ["http", "grpc", "message"].map((k) =>
    svg("marker", { id: "arrow-" + k, viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" },
      svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: getComputedStyle(document.documentElement).getPropertyValue("--" + k).trim() || "#333" }))));
  const lines = edges.map((e, k) => {
    const [x1, y1] = at.get(e.from), [x2, y2] = at.get(e.to);
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy) || 1;
    const r = 34;
    const sx = x1 + (dx / len) * r, sy = y1 + (dy / len) * r, ex = x2 - (dx / len) * r, ey = y2 - (dy / len) * r;
    // Curved, so that a call and its answer's message do not overlap.
    const bend = 24 + (k % 3) * 8;
    const mx = (sx + ex) / 2 - (dy / len) * bend, my = (sy + ey) / 2 + (dx / len) * bend;
    const label = num(e.per_s, 1) + "/s" + (e.errors ? " · " + e.errors + " err" : "");
    return svg("g", {},
      svg("path", { class: "edge " + e.kind, d: `M ${sx} ${sy} Q ${mx} ${my} ${ex} ${ey}`, "marker-end": `url(#arrow-${e.kind})` },
        svg("title", {}, `${e.from} → ${e.to} (${e.kind}): ${e.calls} in the last minute, ${e.errors} errors, ${ms(e.avg_ms)} mean`)),
      svg("text", { class: "elabel" + (e.errors ? " bad" : ""), x: mx, y: my }, label));
  });
  const nodes = order.map((n) => {
    const [x, y] = at.get(n);
    const instancesOf = count.get(n) || 0;
    return svg("g", { class: "node", "data-service": n },
      svg("circle", { cx: x, cy: y, r: 32, style: `stroke:${colorOf(n)}` }),
      svg("text", { x, y: y - 5 }, n),
      svg("text", { class: "sub", x, y: y + 11 }, instancesOf === 1 ? "1 instance" : instancesOf + " instances"));
  });
  map.replaceChildren(defs, ...lines, ...nodes);
}

// Probes, scrapes and operator views: counted, but not the system's work.
const platformRoute = (r) => ["/health", "/ready", "/metrics"].includes(r.route) || r.route.startsWith("/_");

function drawRoutes(all) {
  const routes = all.filter((r) => !platformRoute(r));
  const sorted = routes.slice().sort((a, b) => a.service.localeCompare(b.service) || b.total - a.total);
  fill($("routes-table").tBodies[0], sorted.filter((r) => r.total > 0).map((r) =>
    el("tr", {},
      el("td", {}, r.service),
      el("td", { class: "mono" }, r.method + " " + r.route),
      el("td", { class: "num" }, num(r.per_s)),
      el("td", { class: "num " + (r.errors_per_s > 0 ? "bad" : "") }, num(r.errors_per_s)),
      el("td", { class: "num" }, ms(r.p50_ms)),
      el("td", { class: "num" }, ms(r.p99_ms)),
      el("td", { class: "num" }, Math.round(r.total)))));
  const per = new Map();
  for (const r of routes) {
    const p = per.get(r.service) || { rate: 0, errors: 0, p99: null, total: 0 };
    p.rate += r.per_s;
    p.errors += r.errors_per_s;
    p.total += r.total;
    if (r.p99_ms !== null && (p.p99 === null || r.p99_ms > p.p99)) p.p99 = r.p99_ms;
    per.set(r.service, p);
  }
  fill($("per-service-table").tBodies[0], [...per.entries()].sort().map(([service, p]) =>
    el("tr", {},
      el("td", {}, service),
      el("td", { class: "num" }, num(p.rate)),
      el("td", { class: "num " + (p.errors > 0 ? "bad" : "") }, num(p.errors)),
      el("td", { class: "num" }, ms(p.p99)),
      el("td", { class: "num" }, Math.round(p.total)))));
}

let queuesKnown = false;
function drawQueues(queues) {
  fill($("queues-table").tBodies[0], queues.map((q) =>
    el("tr", {},
      el("td", { class: "mono" }, q.queue),
      el("td", { class: "num" }, q.messages === null ? "–" : q.messages),
      el("td", { class: "num " + (q.consumers === 0 ? "bad" : "") }, q.consumers === null ? "–" : q.consumers),
      el("td", { class: "num" }, num(q.consumed_per_s)),
      el("td", { class: "num" }, num(q.retried_per_s)),
      el("td", { class: "num " + (q.dead_letters ? "bad" : "") },
        q.dead_letters ? el("a", { class: "trace-link", onclick: () => { $("dlq-queue").value = q.queue; listLetters(); location.hash = "#dead-letters"; } }, q.dead_letters) : q.dead_letters === null ? "–" : "0"))));
  if (!queuesKnown) {
    queuesKnown = true;
    $("dlq-queue").append(...queues.map((q) => el("option", { value: q.queue }, q.queue)));
  }
}

// ---- traces ----

async function searchTraces(q) {
  const found = await api("/traces?q=" + encodeURIComponent(q || ""));
  fill($("traces-table").tBodies[0], found.map((t) =>
    el("tr", { class: "clickable", "data-trace": t.trace_id, onclick: () => showTrace(t.trace_id) },
      el("td", {}, when(t.start_us)),
      el("td", {}, t.root || el("span", { class: "mono" }, t.trace_id)),
      el("td", {}, t.services.join(", ")),
      el("td", { class: "num" }, t.spans),
      el("td", { class: "num" }, us(t.duration_us)),
      el("td", { class: "num " + (t.errors ? "bad" : "") }, t.errors))));
  if (found.length === 0) {
    fill($("traces-table").tBodies[0], [el("tr", {}, el("td", { colspan: 6 }, "No trace kept matches."))]);
  }
  return found;
}

async function showTrace(traceId) {
  const trace = await api("/traces/" + encodeURIComponent(traceId));
  const spans = trace.spans;
  const byId = new Map(spans.map((s) => [s.span_id, s]));
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    if (s.parent_span_id && byId.has(s.parent_span_id)) {
      if (!children.has(s.parent_span_id)) children.set(s.parent_span_id, []);
      children.get(s.parent_span_id).push(s);
    } else {
      roots.push(s);
    }
  }
  const ordered = [];
  const walk = (s, depth) => {
    ordered.push([s, depth]);
    for (const c of (children.get(s.span_id) || []).sort((a, b) => a.start_us - b.start_us)) walk(c, depth + 1);
  };
  roots.sort((a, b) => a.start_us - b.start_us).forEach((r) => walk(r, 0));
  const t0 = Math.min(...spans.map((s) => s.start_us));
  const t1 = Math.max(...spans.map((s) => s.start_us + s.duration_us));
  const total = Math.max(t1 - t0, 1);
  $("waterfall-title").textContent = `Trace ${traceId} · ${spans.length} spans · ${new Set(spans.map((s) => s.service)).size} services · ${us(total)}`;
  $("waterfall-rows").replaceChildren(...ordered.map(([s, depth]) =>
    el("div", { class: "wf-row", "data-span": s.span_id, onclick: () => { $("span-detail").textContent = JSON.stringify(s, null, 2); } },
      el("div", { class: "wf-name", style: `padding-left:${depth * 12}px`, title: `${s.service}: ${s.name}` },
        el("strong", { style: `color:${colorOf(s.service)}` }, s.service), " ", s.name),
      el("div", { class: "wf-track" },
        el("div", { class: "wf-bar" + (s.error ? " error" : ""), style: `left:${((s.start_us - t0) / total) * 100}%;width:${Math.max((s.duration_us / total) * 100, 0.2)}%;background:${colorOf(s.service)}` })),
      el("div", { class: "wf-dur" }, us(s.duration_us)))));
  $("span-detail").textContent = "";
  $("waterfall").hidden = false;
}

$("search-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const q = $("search").value.trim();
  try {
    const found = await searchTraces(q);
    if (found.length > 0 && q) await showTrace(found[0].trace_id);
    // An order id: its timeline too.
    if (/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(q)) {
      $("order-id").value = q;
      await showTimeline(q, false).catch(() => {});
    }
  } catch (err) {
    showProblem($("traces-table").tBodies[0], 6, err);
  }
});

function showProblem(tbody, cols, err) {
  fill(tbody, [el("tr", {}, el("td", { colspan: cols, class: "error" }, err.message))]);
}

// ---- an order's timeline ----

async function showTimeline(orderId, openTrace) {
  const view = $("timeline-view");
  let timeline;
  try {
    timeline = await api("/orders/" + encodeURIComponent(orderId) + "/timeline");
  } catch (err) {
    view.hidden = false;
    $("timeline-title").textContent = err.status === 404 ? "Nothing of that order is kept." : err.message;
    $("timeline-traces").replaceChildren();
    $("timeline-rows").replaceChildren();
    throw err;
  }
  const events = timeline.events;
  const t0 = events[0].at_us;
  const span = Math.max(events[events.length - 1].at_us - t0, 1);
  $("timeline-title").textContent = `Order ${timeline.order_id} · ${events.length} events · ${us(span)}`;
  $("timeline-traces").replaceChildren("Traces: ", ...timeline.trace_ids.map((id) =>
    el("a", { class: "trace-link mono", "data-trace": id, onclick: () => { showTrace(id); location.hash = "#traces"; } }, id)));
  $("timeline-rows").replaceChildren(...events.map((e) => {
    const x = ((e.at_us - t0) / span) * 100;
    const what = e.what === "saga" ? "saga " + e.kind : `${e.what} ${e.kind}`;
    const extra = [e.queue && "from " + e.queue, e.attempt && e.attempt > 1 && "attempt " + e.attempt, e.detail].filter(Boolean).join(" · ");
    return el("div", { class: "tl-row" + (e.what === "saga" ? " saga" : ""), "data-what": e.what, title: e.message_id ? "message " + e.message_id : "" },
      el("div", { class: "tl-offset" }, "+" + ms((e.at_us - t0) / 1000)),
      el("div", {}, el("strong", { style: `color:${colorOf(e.service)}` }, e.service)),
      el("div", { class: "tl-track" },
        el("span", { class: "tl-dot", style: `left:${x}%;background:${colorOf(e.service)}` }),
        // Late events are labelled to the left of their dot.
        el("span", { class: "tl-label" + (x > 50 ? " left" : ""), style: x > 50 ? `right:${100 - x}%` : `left:${x}%` }, what + (extra ? " (" + extra + ")" : ""))));
  }));
  view.hidden = false;
  if (openTrace && timeline.trace_ids.length > 0) await showTrace(timeline.trace_ids[0]);
  return timeline;
}

$("timeline-form").addEventListener("submit", (e) => {
  e.preventDefault();
  showTimeline($("order-id").value.trim(), true).catch(() => {});
});

// ---- dead letters and their replay ----

let letters = [];

function letterFilter() {
  const p = new URLSearchParams();
  if ($("dlq-queue").value) p.set("queue", $("dlq-queue").value);
  if ($("dlq-reason").value.trim()) p.set("reason", $("dlq-reason").value.trim());
  if ($("dlq-since").value.trim()) p.set("since", $("dlq-since").value.trim());
  return p;
}

async function listLetters() {
  const tbody = $("dlq-table").tBodies[0];
  try {
    letters = await api("/dead-letters?" + letterFilter());
  } catch (err) {
    showProblem(tbody, 8, err);
    return;
  }
  fill(tbody, letters.length === 0 ? [el("tr", {}, el("td", { colspan: 8 }, "No dead letter matches."))] : letters.map((l, k) =>
    el("tr", {},
      el("td", {}, el("input", { type: "checkbox", class: "pick", "data-k": k })),
      el("td", { class: "mono" }, l.id || "–"),
      el("td", { class: "mono" }, l.queue),
      el("td", { class: "mono" }, l.routing_key || "–"),
      el("td", {}, l.reason || "–"),
      el("td", { class: "num" }, l.attempts),
      el("td", {}, l.dead_at || "–"),
      el("td", {}, el("button", { type: "button", onclick: () => { const d = $("dlq-detail"); d.hidden = false; d.textContent = pretty(l); } }, "Inspect")))));
}

function pretty(letter) {
  let body = letter.body;
  try { body = JSON.parse(letter.body); } catch (_) { /* shown as text */ }
  return JSON.stringify(Object.assign({}, letter, { body }), null, 2);
}

async function replay(body) {
  const rate = $("replay-rate").value.trim();
  if (rate) body.rate = Number(rate);
  return api("/dead-letters/replay", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}

$("dlq-form").addEventListener("submit", (e) => { e.preventDefault(); listLetters(); });
$("dlq-all").addEventListener("change", (e) => { document.querySelectorAll("#dlq-table .pick").forEach((c) => { c.checked = e.target.checked; }); });

$("replay-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const picked = [...document.querySelectorAll("#dlq-table .pick:checked")].map((c) => letters[Number(c.dataset.k)]).filter((l) => l && l.id);
  let replayed = 0;
  try {
    for (const l of picked) replayed += (await replay({ queue: l.queue, id: l.id })).replayed;
    $("replay-result").textContent = `${replayed} replayed`;
  } catch (err) {
    $("replay-result").textContent = `${replayed} replayed, then: ${err.message}`;
  }
  await Promise.all([listLetters(), listReplays()]);
});

$("replay-matching").addEventListener("click", async () => {
  const f = letterFilter();
  const body = { all: true };
  for (const k of ["queue", "reason", "since"]) if (f.get(k)) body[k] = f.get(k);
  try {
    $("replay-result").textContent = `${(await replay(body)).replayed} replayed`;
  } catch (err) {
    $("replay-result").textContent = err.message;
  }
  await Promise.all([listLetters(), listReplays()]);
});

async function listReplays() {
  const tbody = $("replays-table").tBodies[0];
  try {
    const replays = await api("/replays");
    fill(tbody, replays.length === 0 ? [el("tr", {}, el("td", { colspan: 6 }, "None yet."))] : replays.map((r) =>
      el("tr", {},
        el("td", {}, r.at),
        el("td", {}, r.by),
        el("td", { class: "mono" }, r.queue),
        el("td", {}, r.id ? "id " + r.id : ["all", r.reason && `reason ~ "${r.reason}"`, r.since && "since " + r.since].filter(Boolean).join(", ")),
        el("td", { class: "num" }, r.rate ? r.rate + "/s" : "–"),
        el("td", { class: "num" }, r.replayed))));
  } catch (err) {
    showProblem(tbody, 6, err);
  }
}

// ---- start ----

async function start() {
  try {
    draw(await api("/snapshot"));
  } catch (err) {
    if (err.status === 401 || err.status === 403) return;
    setLive(false, err.message);
  }
  $("signin").hidden = true;
  $("board").hidden = false;
  $("sign-out").hidden = !localStorage.getItem(TOKEN_KEY);
  stream();
  searchTraces("").catch(() => {});
  listLetters();
  listReplays();
  // A link to an order or a trace: #order=<id>, #trace=<id>.
  const m = location.hash.match(/^#(order|trace)=([0-9a-f-]+)$/i);
  if (m && m[1] === "order") showTimeline(m[2], true).catch(() => {});
  if (m && m[1] === "trace") showTrace(m[2]).catch(() => {});
}

start();
