//! The dashboard: a page at `/_dashboard` (its assets in the binary)
//! drawn from a JSON API for loopback callers and admins, which scripts
//! can use too, gathered from this process and every registered instance:
//! - `GET /_dashboard/api/snapshot` (and `…/stream`, the same every 2 s
//!   as server-sent events): instances with health and breaker states,
//!   the service map from the traces, request rates and latency per route,
//!   queues;
//! - `GET /_dashboard/api/traces?q=` recent traces, by trace, request or
//!   order id, and `GET /_dashboard/api/traces/{trace_id}` a trace's spans;
//! - `GET /_dashboard/api/orders/{order_id}/timeline`, an order's saga
//!   steps and its messages' events on one time axis;
//! - dead letters, their replay (redrive) and the replays made.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bazaar_chassis::traces::{self, Edge, SpanRecord, TraceSummary};
use bazaar_chassis::{Json, Problem};
use serde::{Deserialize, Serialize};

use crate::proxy::Shared;

/// What the dashboard keeps: the bus (queues, dead letters), the replays
/// made, and the last sample of every instance's counters (rates are the
/// difference between two samples).
pub struct Board {
    pub bus: bazaar_bus::Bus,
    pub replays: Arc<crate::admin::Replays>,
    last: tokio::sync::Mutex<Option<Sample>>,
}

impl Board {
    pub fn new(bus: bazaar_bus::Bus, replays: Arc<crate::admin::Replays>) -> Self {
        Self {
            bus,
            replays,
            last: tokio::sync::Mutex::new(None),
        }
    }
}

struct Sample {
    at: Instant,
    counters: Counters,
    snapshot: Arc<Snapshot>,
}

/// The page and its assets, inside the binary. The page shows nothing by
/// itself: its data comes from the API, for loopback callers and admins
/// (it asks for an admin's sign-in otherwise).
pub async fn page(uri: axum::http::Uri) -> Response {
    let (body, kind): (&'static str, &'static str) = match uri.path() {
        "/_dashboard" | "/_dashboard/" => (
            include_str!("dashboard/index.html"),
            "text/html; charset=utf-8",
        ),
        "/_dashboard/app.js" => (
            include_str!("dashboard/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "/_dashboard/app.css" => (include_str!("dashboard/app.css"), "text/css; charset=utf-8"),
        _ => return Problem::not_found("no such page").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
                ),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// Everything the dashboard shows at one moment.
#[derive(Serialize, Clone, utoipa::ToSchema)]
pub struct Snapshot {
    /// Unix milliseconds.
    at_ms: u64,
    /// The seconds the rates are measured over (0 in the first snapshot).
    window_s: f64,
    instances: Vec<InstanceRow>,
    /// Who called whom in the last minute's traces.
    edges: Vec<EdgeRow>,
    routes: Vec<RouteRow>,
    queues: Vec<QueueRow>,
}

#[derive(Serialize, Clone, utoipa::ToSchema)]
struct InstanceRow {
    service: String,
    id: String,
    address: String,
    /// Whether the gateway's health checks pass (`None`: it does not
    /// route to this service).
    healthy: Option<bool>,
    /// The gateway's breaker for it: `closed`, `open` or `half_open`.
    breaker: Option<String>,
    /// Whether it answered the dashboard now.
    answering: bool,
    requests_per_s: f64,
    rss_bytes: Option<f64>,
    /// CPU used, in cores (1.0 = one core busy).
    cpu: Option<f64>,
}

#[derive(Serialize, Clone, utoipa::ToSchema)]
struct EdgeRow {
    from: String,
    to: String,
    /// `http`, `grpc` or `message`.
    kind: String,
    calls: u64,
    errors: u64,
    per_s: f64,
    avg_ms: f64,
}

#[derive(Serialize, Clone, utoipa::ToSchema)]
struct RouteRow {
    service: String,
    method: String,
    route: String,
    per_s: f64,
    /// 5xx answers per second.
    errors_per_s: f64,
    /// Upper bounds from the latency histogram's buckets.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    total: f64,
}

#[derive(Serialize, Clone, utoipa::ToSchema)]
struct QueueRow {
    queue: String,
    /// Waiting, and consumers (none when the broker did not answer).
    messages: Option<u64>,
    consumers: Option<u64>,
    dead_letters: Option<u64>,
    consumed_per_s: f64,
    retried_per_s: f64,
    dead_lettered_total: f64,
}

/// Counters read from every instance's `/metrics`.
#[derive(Default)]
struct Counters {
    /// (service, method, route) → (requests, 5xx).
    requests: BTreeMap<(String, String, String), (f64, f64)>,
    /// (service, method, route) → le → cumulative count.
    latency: HashMap<(String, String, String), BTreeMap<Le, f64>>,
    /// instance id → (requests, cpu seconds, rss).
    instances: HashMap<String, (f64, Option<f64>, Option<f64>)>,
    /// queue → (consumed, retried, dead-lettered).
    queues: HashMap<String, (f64, f64, f64)>,
}

/// A bucket's upper bound, ordered (`+Inf` last).
#[derive(Clone, Copy)]
struct Le(f64);
impl PartialEq for Le {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Le {}
impl PartialOrd for Le {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Le {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A sample: its metric's name, its labels, its value.
type Line<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// One sample line of the Prometheus text format: name, labels, value.
fn sample_line(line: &str) -> Option<Line<'_>> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches(',');
            if let Some(after) = body.strip_prefix('}') {
                break after;
            }
            let eq = body.find('=')?;
            let key = &body[..eq];
            let mut value = String::new();
            let mut chars = body[eq + 1..].strip_prefix('"')?.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.push((key, value));
            body = &body[eq + 1..][end + 2..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

fn label<'a>(labels: &'a [(&str, String)], key: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("", |(_, v)| v.as_str())
}

impl Counters {
    /// Adds one instance's `/metrics` text.
    fn add(&mut self, service: &str, instance: &str, text: &str) {
        let mut requests = 0.0;
        let (mut cpu, mut rss) = (None, None);
        for line in text.lines() {
            let Some((name, labels, value)) = sample_line(line) else {
                continue;
            };
            let route = || {
                (
                    service.to_owned(),
                    label(&labels, "method").to_owned(),
                    label(&labels, "route").to_owned(),
                )
            };
            match name {
                "http_requests_total" => {
                    let e = self.requests.entry(route()).or_default();
                    e.0 += value;
                    if label(&labels, "status_code").starts_with('5') {
                        e.1 += value;
                    }
                    requests += value;
                }
                "http_request_duration_seconds_bucket" => {
                    let le = match label(&labels, "le") {
                        "+Inf" => f64::INFINITY,
                        le => match le.parse() {
                            Ok(v) => v,
                            Err(_) => continue,
                        },
                    };
                    *self
                        .latency
                        .entry(route())
                        .or_default()
                        .entry(Le(le))
                        .or_default() += value;
                }
                "bus_consumed_total" => {
                    self.queues
                        .entry(label(&labels, "queue").to_owned())
                        .or_default()
                        .0 += value;
                }
                "bus_retried_total" => {
                    self.queues
                        .entry(label(&labels, "queue").to_owned())
                        .or_default()
                        .1 += value;
                }
                "bus_dead_lettered_total" => {
                    self.queues
                        .entry(label(&labels, "queue").to_owned())
                        .or_default()
                        .2 += value;
                }
                "process_cpu_seconds_total" => cpu = Some(value),
                "process_resident_memory_bytes" => rss = Some(value),
                _ => {}
            }
        }
        self.instances
            .insert(instance.to_owned(), (requests, cpu, rss));
    }
}

/// The `q` quantile's bucket bound, in ms, of the observations between
/// two cumulative bucket sets.
fn quantile(now: &BTreeMap<Le, f64>, before: Option<&BTreeMap<Le, f64>>, q: f64) -> Option<f64> {
    let delta = |le: &Le, v: f64| v - before.and_then(|b| b.get(le)).copied().unwrap_or(0.0);
    let total = now.iter().last().map(|(le, v)| delta(le, *v))?;
    if total <= 0.0 {
        return None;
    }
    now.iter()
        .find(|(le, v)| delta(le, **v) >= q * total)
        .map(|(le, _)| le.0 * 1000.0)
        .filter(|v| v.is_finite())
}

/// A snapshot of now, its rates over the time since the last one (which
/// is reused while younger than a second, so many viewers cost one).
async fn snapshot(g: &Shared) -> Result<Arc<Snapshot>, Problem> {
    let board = &g.board;
    let mut last = board.last.lock().await;
    if let Some(l) = last.as_ref()
        && l.at.elapsed() < Duration::from_secs(1)
    {
        return Ok(l.snapshot.clone());
    }
    let registry = g.upstreams.discovery().registry();
    let all = registry.all().await.map_err(|e| {
        tracing::warn!(error = %e, "cannot list instances");
        Problem::unavailable("service discovery is unavailable")
    })?;
    let views = g.upstreams.view().await.unwrap_or_default();
    let asked = all.iter().map(|i| async move {
        let wait = Duration::from_secs(1);
        let metrics = tokio::time::timeout(wait, crate::admin::fetch(i, "/metrics"));
        let edges = tokio::time::timeout(
            wait,
            crate::admin::ask::<Found<Edge>>(i, "/_traces/edges?seconds=60"),
        );
        let (metrics, edges) = tokio::join!(metrics, edges);
        (metrics.ok().flatten(), edges.ok().flatten())
    });
    let answers = futures::future::join_all(asked).await;
    let now = Instant::now();
    let mut counters = Counters::default();
    // This process's own spans first (it may not be able to ask itself).
    let mut processes = HashSet::from([traces::process_id().to_owned()]);
    let mut edges: BTreeMap<(String, String, String), Edge> = BTreeMap::new();
    let since = bazaar_bus::timeline::now_us().saturating_sub(60_000_000);
    add_edges(
        &mut edges,
        traces::recent().map_or_else(Vec::new, |r| r.edges(since)),
    );
    let mut answering = HashSet::new();
    for (instance, (metrics, found)) in all.iter().zip(answers) {
        if let Some(text) = metrics {
            answering.insert(instance.id.clone());
            counters.add(
                &instance.name,
                &instance.id,
                &String::from_utf8_lossy(&text),
            );
        }
        // Instances of one process share its spans: counted once.
        if let Some(found) = found
            && processes.insert(found.process)
        {
            add_edges(&mut edges, found.edges);
        }
    }
    let before = last.as_ref().map(|l| (&l.counters, l.at));
    let window = before.map_or(0.0, |(_, at)| now.duration_since(at).as_secs_f64());
    let rate = |now: f64, then: Option<f64>| match then {
        Some(then) if window > 0.0 => ((now - then) / window).max(0.0),
        _ => 0.0,
    };
    let mut instances: Vec<InstanceRow> = all
        .iter()
        .map(|i| {
            let view = views.iter().find(|v| v.id == i.id);
            let mine = counters.instances.get(&i.id);
            let prev = before.and_then(|(c, _)| c.instances.get(&i.id));
            InstanceRow {
                service: i.name.clone(),
                id: i.id.clone(),
                address: i.address.clone(),
                healthy: view.map(|v| v.healthy),
                breaker: view.and_then(|v| {
                    serde_json::to_value(v.breaker)
                        .ok()
                        .and_then(|b| b.as_str().map(str::to_owned))
                }),
                answering: answering.contains(&i.id),
                requests_per_s: mine.map_or(0.0, |m| rate(m.0, prev.map(|p| p.0))),
                rss_bytes: mine.and_then(|m| m.2),
                cpu: mine
                    .and_then(|m| m.1)
                    .map(|c| rate(c, prev.and_then(|p| p.1))),
            }
        })
        .collect();
    instances.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
    let routes = counters
        .requests
        .iter()
        .map(|(key, (n, errors))| {
            let prev = before.and_then(|(c, _)| c.requests.get(key));
            let hist = counters.latency.get(key);
            let prev_hist = before.and_then(|(c, _)| c.latency.get(key));
            // Over the window when there was traffic in it, else since start.
            let in_window = hist.and_then(|h| quantile(h, prev_hist, 0.5));
            let (p50, p99) = match (in_window, hist) {
                (Some(p50), Some(h)) => (Some(p50), quantile(h, prev_hist, 0.99)),
                (None, Some(h)) => (quantile(h, None, 0.5), quantile(h, None, 0.99)),
                _ => (None, None),
            };
            RouteRow {
                service: key.0.clone(),
                method: key.1.clone(),
                route: key.2.clone(),
                per_s: rate(*n, prev.map(|p| p.0)),
                errors_per_s: rate(*errors, prev.map(|p| p.1)),
                p50_ms: p50,
                p99_ms: p99,
                total: *n,
            }
        })
        .collect();
    let mut queues = Vec::new();
    for q in bazaar_contracts::topics::QUEUES {
        let stats = board.bus.queue_stats(q).await.ok();
        let dead = board
            .bus
            .queue_stats(&bazaar_bus::dead_letter_queue(q))
            .await
            .ok();
        let c = counters.queues.get(q).copied().unwrap_or_default();
        let p = before.and_then(|(b, _)| b.queues.get(q).copied());
        queues.push(QueueRow {
            queue: q.to_owned(),
            messages: stats.map(|s| s.messages),
            consumers: stats.map(|s| s.consumers),
            dead_letters: dead.map(|s| s.messages),
            consumed_per_s: rate(c.0, p.map(|p| p.0)),
            retried_per_s: rate(c.1, p.map(|p| p.1)),
            dead_lettered_total: c.2,
        });
    }
    let edges = edges
        .into_values()
        .map(|e| EdgeRow {
            per_s: e.calls as f64 / 60.0,
            avg_ms: if e.calls == 0 {
                0.0
            } else {
                e.total_us as f64 / e.calls as f64 / 1000.0
            },
            from: e.from,
            to: e.to,
            kind: e.kind,
            calls: e.calls,
            errors: e.errors,
        })
        .collect();
    let snapshot = Arc::new(Snapshot {
        at_ms: bazaar_bus::timeline::now_us() / 1000,
        window_s: window,
        instances,
        edges,
        routes,
        queues,
    });
    *last = Some(Sample {
        at: now,
        counters,
        snapshot: snapshot.clone(),
    });
    Ok(snapshot)
}

/// Adds one process's edges to those summed so far.
fn add_edges(edges: &mut BTreeMap<(String, String, String), Edge>, more: Vec<Edge>) {
    for e in more {
        let key = (e.from.clone(), e.to.clone(), e.kind.clone());
        match edges.get_mut(&key) {
            Some(have) => {
                have.calls += e.calls;
                have.errors += e.errors;
                have.total_us += e.total_us;
            }
            None => {
                edges.insert(key, e);
            }
        }
    }
}

/// An instance's answer to `/_traces/edges` or `/_traces/search`.
#[derive(Deserialize)]
#[serde(bound = "T: Deserialize<'de>")]
struct Found<T> {
    process: String,
    #[serde(default)]
    edges: Vec<T>,
    #[serde(default)]
    traces: Vec<T>,
}

/// Everything the dashboard shows: instances with their health, breaker,
/// rate, memory and CPU; the service map (who called whom in the last
/// minute's traces, with rates, errors and mean time); request rate,
/// errors and latency per route; queues with depth, consumers, rates and
/// dead letters. Rates are over the time since the previous snapshot.
#[utoipa::path(get, path = "/_dashboard/api/snapshot", tag = "operations",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The system now", body = Snapshot),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Service discovery is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn snapshot_now(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    crate::admin::operator_view(&g, peer, req, || async {
        snapshot(&g).await.map(|s| Json(s.as_ref().clone()))
    })
    .await
}

/// The snapshot every 2 seconds as server-sent events (`event: snapshot`),
/// until the client goes.
#[utoipa::path(get, path = "/_dashboard/api/stream", tag = "operations",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A `snapshot` event every 2 s", content_type = "text/event-stream", body = String),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn snapshot_stream(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let shared = g.clone();
    crate::admin::operator_view(&g, peer, req, || async move {
        use axum::response::sse::{Event, KeepAlive, Sse};
        let ticks = futures::stream::unfold(true, move |first| {
            let g = shared.clone();
            async move {
                if !first {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                let event = match snapshot(&g).await {
                    Ok(s) => Event::default().event("snapshot").json_data(s.as_ref()),
                    Err(p) => Event::default().event("problem").json_data(&p),
                };
                Some((event.map_err(axum::BoxError::from), false))
            }
        });
        Ok::<_, Problem>(Sse::new(ticks).keep_alive(KeepAlive::default()))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Search {
    /// A trace id, request id, order id or message id; empty for the
    /// latest traces.
    #[serde(default)]
    q: String,
}

/// Recent traces, newest first (50 at most): the latest, or those with
/// that trace id or with a span naming that request, order or message.
#[utoipa::path(get, path = "/_dashboard/api/traces", tag = "operations",
    security((), ("bearer" = [])),
    params(Search),
    responses(
        (status = 200, description = "The traces, summed up", body = Vec<TraceSummary>),
        (status = 400, description = "A malformed query string", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The search is longer than 100 characters", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn search_traces(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(search): Query<Search>,
    req: Request,
) -> Response {
    crate::admin::operator_view(&g, peer, req, || async {
        let q = search.q.trim();
        if q.len() > 100 {
            return Err(Problem::invalid("q", "100 characters at most"));
        }
        // Which traces match (a process may hold the matching span and
        // not the rest), then every process's part of them.
        let target = format!("/_traces/search?limit=50&q={}", encode(q));
        let mut matching = summed(with_own(
            ask_all::<Found<TraceSummary>>(&g, &target).await,
            |r| r.search(q, 50),
        ));
        matching.sort_by_key(|t| std::cmp::Reverse(t.start_us));
        matching.truncate(50);
        if matching.is_empty() {
            return Ok(Json(matching));
        }
        let ids: Vec<&str> = matching.iter().map(|t| t.trace_id.as_str()).collect();
        let target = format!("/_traces/search?ids={}", ids.join(","));
        let mut whole = summed(with_own(
            ask_all::<Found<TraceSummary>>(&g, &target).await,
            |r| r.summaries(&ids),
        ));
        whole.sort_by_key(|t| std::cmp::Reverse(t.start_us));
        Ok(Json(whole))
    })
    .await
}

/// This process's own answer first (an instance may not be able to ask
/// itself at its advertised address), then the instances'.
fn with_own<T>(asked: Vec<Found<T>>, own: impl FnOnce(&traces::Recent) -> Vec<T>) -> Vec<Found<T>> {
    let mine = Found {
        process: traces::process_id().to_owned(),
        edges: Vec::new(),
        traces: traces::recent().map_or_else(Vec::new, |r| own(r)),
    };
    std::iter::once(mine).chain(asked).collect()
}

/// The processes' summaries merged, each process counted once.
fn summed(found: Vec<Found<TraceSummary>>) -> Vec<TraceSummary> {
    let mut merged: Vec<TraceSummary> = Vec::new();
    let mut processes = HashSet::new();
    for found in found {
        if !processes.insert(found.process) {
            continue;
        }
        for t in found.traces {
            match merged.iter_mut().find(|m| m.trace_id == t.trace_id) {
                Some(m) => m.merge(t),
                None => merged.push(t),
            }
        }
    }
    merged
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// The dead letters of one queue or of every Bazaar queue, filtered.
#[utoipa::path(get, path = "/_dashboard/api/dead-letters", tag = "operations",
    security((), ("bearer" = [])),
    params(crate::admin::Which),
    responses(
        (status = 200, description = "The dead letters", body = Vec<bazaar_bus::DeadLetter>),
        (status = 400, description = "A malformed query string", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown queue, or a bad reason or time", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The message bus is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn dashboard_dead_letters(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(which): Query<crate::admin::Which>,
    req: Request,
) -> Response {
    crate::admin::operator_view(&g, peer, req, || async {
        crate::admin::letters(&g.board.bus, &which).await.map(Json)
    })
    .await
}

/// Replays dead letters, as `POST /api/v1/admin/dead-letters/replay`
/// does; recorded with who asked (the admin, or `loopback`).
#[utoipa::path(post, path = "/_dashboard/api/dead-letters/replay", tag = "operations",
    security((), ("bearer" = [])),
    request_body = crate::admin::ReplayBody,
    responses(
        (status = 200, description = "How many were replayed", body = crate::admin::Replayed),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No dead letter with that id", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown queue, neither or both of id and all, or a bad reason, time or rate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The message bus is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn replay_dead_letters(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let board = &g.board;
    crate::admin::operator_acts(&g, peer, req, |who, req| async move {
        use axum::extract::FromRequest as _;
        let Json(body) = Json::<crate::admin::ReplayBody>::from_request(req, &()).await?;
        crate::admin::redrive(&board.bus, &board.replays, &body, &who)
            .await
            .map(Json)
    })
    .await
}

/// The dead-letter replays this gateway made, newest first: who, when,
/// which letters, how many.
#[utoipa::path(get, path = "/_dashboard/api/replays", tag = "operations",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The replays", body = Vec<crate::admin::Replay>),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn dashboard_replays(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    crate::admin::operator_view(&g, peer, req, || async {
        Ok::<_, Problem>(Json(g.board.replays.list()))
    })
    .await
}

/// A trace as the dashboard draws it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Trace {
    trace_id: String,
    /// In start order.
    spans: Vec<SpanRecord>,
}

/// One trace's spans: its id, each span's id, parent, service, name,
/// start, duration and attributes.
#[utoipa::path(get, path = "/_dashboard/api/traces/{trace_id}", tag = "operations",
    security((), ("bearer" = [])),
    params(("trace_id" = String, Path, description = "32 lowercase hex digits")),
    responses(
        (status = 200, description = "The trace", body = Trace),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No span of that trace is kept", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a trace id", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn trace(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(trace_id): Path<String>,
    req: Request,
) -> Response {
    crate::admin::operator_view(&g, peer, req, || async {
        gather(&g, &trace_id).await.map(Json)
    })
    .await
}

async fn gather(g: &Shared, trace_id: &str) -> Result<Trace, Problem> {
    if !traces::valid_trace_id(trace_id) {
        return Err(Problem::invalid(
            "trace_id",
            "expected 32 lowercase hex digits",
        ));
    }
    let mut spans = traces::recent().map_or_else(Vec::new, |r| r.trace(trace_id));
    let target = format!("/_traces/{trace_id}");
    for found in ask_all::<Vec<SpanRecord>>(g, &target).await {
        spans.extend(found);
    }
    // Instances of one process share its store: each span once.
    let mut seen = HashSet::new();
    spans.retain(|s| seen.insert(s.span_id.clone()));
    if spans.is_empty() {
        return Err(Problem::not_found("no span of that trace is kept"));
    }
    spans.sort_by_key(|s| s.start_us);
    Ok(Trace {
        trace_id: trace_id.to_owned(),
        spans,
    })
}

/// An order's timeline: its saga's steps and what happened to each of
/// its messages, in time order, with the traces they belong to.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Timeline {
    order_id: String,
    /// The traces the events belong to (the checkout's, usually one).
    trace_ids: Vec<String>,
    events: Vec<bazaar_bus::timeline::Event>,
}

/// An order's timeline: every saga step with the messages underneath
/// (written to an outbox, published and confirmed, delivered, handled,
/// dropped as a duplicate, retried, dead-lettered), in time order.
#[utoipa::path(get, path = "/_dashboard/api/orders/{order_id}/timeline", tag = "operations",
    security((), ("bearer" = [])),
    params(("order_id" = String, Path, format = Uuid, description = "The order's id")),
    responses(
        (status = 200, description = "The timeline", body = Timeline),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Nothing of that order is kept", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a UUID", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn timeline(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(order_id): Path<String>,
    req: Request,
) -> Response {
    crate::admin::operator_view(&g, peer, req, || async {
        let g = &g;
        let order_id = bazaar_chassis::id::parse("order_id", &order_id)?;
        let mut events = bazaar_bus::timeline::events(&order_id);
        let target = format!("/_timeline/{order_id}");
        for found in ask_all::<Vec<bazaar_bus::timeline::Event>>(g, &target).await {
            events.extend(found);
        }
        // Instances of one process share its store: each event once.
        let mut seen = HashSet::new();
        events.retain(|e| {
            seen.insert((
                e.at_us,
                e.service.clone(),
                e.what.clone(),
                e.kind.clone(),
                e.message_id.clone(),
            ))
        });
        if events.is_empty() {
            return Err(Problem::not_found("nothing of that order is kept"));
        }
        events.sort_by_key(|e| e.at_us);
        let mut trace_ids: Vec<String> = Vec::new();
        for t in events.iter().filter_map(|e| e.trace_id.as_ref()) {
            if !trace_ids.contains(t) {
                trace_ids.push(t.clone());
            }
        }
        Ok(Json(Timeline {
            order_id,
            trace_ids,
            events,
        }))
    })
    .await
}

/// Every registered instance's JSON answer to `GET target` (1 s each at
/// most; one that does not answer is left out).
async fn ask_all<T: serde::de::DeserializeOwned>(g: &Shared, target: &str) -> Vec<T> {
    let instances = g
        .upstreams
        .discovery()
        .registry()
        .all()
        .await
        .unwrap_or_default();
    let asked = instances.iter().map(|i| {
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            crate::admin::ask::<T>(i, target),
        )
    });
    futures::future::join_all(asked)
        .await
        .into_iter()
        .filter_map(|r| r.ok().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sample_lines_with_escaped_labels() {
        let (name, labels, value) = sample_line(
            r#"http_requests_total{method="GET",route="/a \"b\"\\c",status_code="200",service="orders"} 42"#,
        )
        .unwrap();
        assert_eq!(name, "http_requests_total");
        assert_eq!(value, 42.0);
        assert_eq!(label(&labels, "route"), r#"/a "b"\c"#);
        assert_eq!(label(&labels, "service"), "orders");
        assert_eq!(sample_line("process_open_fds 17").unwrap().2, 17.0);
        for bad in [
            "# HELP x y",
            "",
            "x{a=\"unterminated} 1",
            "x{a} 1",
            "x{a=\"1\"}",
            "x notanumber",
            "x{é=\"ü\"",
        ] {
            assert!(sample_line(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn quantiles_come_from_the_buckets_between_two_samples() {
        let buckets = |v: [f64; 4]| -> BTreeMap<Le, f64> {
            [0.001, 0.01, 0.1, f64::INFINITY]
                .into_iter()
                .map(Le)
                .zip(v)
                .collect()
        };
        let before = buckets([10.0, 10.0, 10.0, 10.0]);
        let now = buckets([10.0, 60.0, 109.0, 110.0]);
        // 100 new observations: 50 under 10 ms, 49 more under 100 ms, 1 above.
        assert_eq!(quantile(&now, Some(&before), 0.5), Some(10.0));
        assert_eq!(quantile(&now, Some(&before), 0.99), Some(100.0));
        // Above the last finite bound: no figure rather than infinity.
        assert_eq!(quantile(&now, Some(&before), 1.0), None);
        assert_eq!(quantile(&before, Some(&before), 0.5), None, "no traffic");
    }

    #[test]
    fn counters_sum_instances_and_split_server_errors() {
        let mut c = Counters::default();
        let text = "http_requests_total{method=\"POST\",route=\"/orders\",status_code=\"201\"} 7\n\
                    http_requests_total{method=\"POST\",route=\"/orders\",status_code=\"503\"} 2\n\
                    bus_consumed_total{queue=\"orders.saga\"} 5\n\
                    process_resident_memory_bytes 1000\n";
        c.add("orders", "a", text);
        c.add("orders", "b", text);
        let key = ("orders".to_owned(), "POST".to_owned(), "/orders".to_owned());
        assert_eq!(c.requests[&key], (18.0, 4.0));
        assert_eq!(c.queues["orders.saga"].0, 10.0);
        assert_eq!(c.instances["a"], (9.0, None, Some(1000.0)));
    }
}
