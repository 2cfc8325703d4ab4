//! `bazaar load`: simulated shoppers against a running gateway. Each
//! shopper checks out in a loop with an `Idempotency-Key`, retrying the
//! same key through errors and outages (so a retry can never buy twice),
//! then waits for every accepted order to reach a final state and reports
//! throughput, latency from `POST /orders` to CONFIRMED (the orders' own
//! `created_at` → `updated_at`), and whether any order was lost. A
//! shopper whose access token expires logs in again, so a run may last
//! longer than a token.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::{Value, json};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Gateway base URL, e.g. `http://127.0.0.1:8080`.
    pub gateway: String,
    pub shoppers: usize,
    pub duration: Duration,
    /// Set every product's stock to this first (needs the admin account).
    pub stock: Option<i64>,
    /// How many products the shoppers buy from.
    pub products: usize,
    pub admin_email: Option<String>,
    pub admin_password: Option<String>,
    /// How long to wait for PENDING orders to finish after the load.
    pub settle: Duration,
    /// How long one checkout may keep retrying through an outage.
    pub retry_for: Duration,
    /// Orders per second in all (spread over the shoppers); `None`: as
    /// fast as the shoppers get answers.
    pub rate: Option<f64>,
    /// When, at a `rate`, the shoppers buy.
    pub arrivals: Arrivals,
}

/// When shoppers buy, at a given rate in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Arrivals {
    /// Each shopper at random moments, independently (exponential gaps,
    /// so the orders of all shoppers are a Poisson stream): as many
    /// independent buyers arrive.
    #[default]
    Poisson,
    /// The shoppers take turns, one order every 1/rate seconds: the
    /// steadiest load, and the least each order waits for another.
    Even,
    /// Every shopper at once, each 1/rate × shoppers seconds: bursts, the
    /// most orders meeting in one batch (how `bazaar load` ran until
    /// 2026-12-05).
    Bursts,
}

impl Arrivals {
    /// When shopper `i` of `n` first buys, after the start, given the
    /// mean time between its orders.
    fn first(self, every: Duration, i: usize, n: usize) -> Duration {
        match self {
            Self::Poisson => self.gap(every),
            Self::Even => every.mul_f64(i as f64 / n.max(1) as f64),
            Self::Bursts => Duration::ZERO,
        }
    }

    /// The time from one order of a shopper to its next.
    fn gap(self, every: Duration) -> Duration {
        match self {
            // -ln(U), U uniform in (0, 1]: exponential with mean 1.
            Self::Poisson => every.mul_f64(-(1.0 - rand::random::<f64>()).ln()),
            Self::Even | Self::Bursts => every,
        }
    }
}

#[derive(Debug, Deserialize)]
struct OrderView {
    id: String,
    status: String,
    cancel_reason: Option<String>,
    created_at: String,
    updated_at: String,
}

/// The outcome of a run.
#[derive(Debug, Default)]
pub struct Report {
    pub placed: usize,
    pub confirmed: usize,
    pub cancelled: HashMap<String, usize>,
    pub pending: usize,
    pub lost: usize,
    pub failed_checkouts: u64,
    pub retried_checkouts: u64,
    pub load_secs: f64,
    pub confirmed_per_sec: f64,
    pub checkout_p50_ms: f64,
    pub checkout_p99_ms: f64,
    pub confirm_p50_ms: f64,
    pub confirm_p99_ms: f64,
    pub order_ids: Vec<String>,
    /// Every accepted order, for the HTML report.
    pub samples: Vec<Sample>,
}

/// One accepted order as the report plots it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Seconds from the start of the load to the checkout's answer.
    pub at_s: f64,
    pub checkout_ms: f64,
    /// `CONFIRMED`, `CANCELLED: <reason>`, `PENDING` or `lost`.
    pub outcome: String,
    /// From `POST /orders` to the outcome, when it has one.
    pub outcome_ms: Option<f64>,
}

impl Report {
    /// One line a script can parse.
    pub fn summary(&self) -> String {
        let cancelled: usize = self.cancelled.values().sum();
        format!(
            "load: placed={} confirmed={} cancelled={} pending={} lost={} failed_checkouts={} retried_checkouts={} confirmed_per_s={:.0} checkout_p50_ms={:.1} checkout_p99_ms={:.1} confirm_p50_ms={:.1} confirm_p99_ms={:.1}",
            self.placed,
            self.confirmed,
            cancelled,
            self.pending,
            self.lost,
            self.failed_checkouts,
            self.retried_checkouts,
            self.confirmed_per_sec,
            self.checkout_p50_ms,
            self.checkout_p99_ms,
            self.confirm_p50_ms,
            self.confirm_p99_ms,
        )
    }
}

/// The password every shopper of a run registers with.
const SHOPPER_PASSWORD: &str = "load-password";

struct Shopper {
    email: String,
    /// Its access token. Tokens expire (15 minutes by default), and a run
    /// may last longer: [`Shopper::renew`] logs in again.
    token: std::sync::Mutex<String>,
}

impl Shopper {
    fn token(&self) -> String {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends the request `req` makes with this shopper's token. Refused
    /// (401: the token expired), the shopper logs in again and sends it
    /// once more; `Err` if logging in again failed.
    async fn send(
        &self,
        http: &reqwest::Client,
        api: &str,
        req: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Result<reqwest::Response>> {
        let res = req(&self.token()).send().await;
        if !matches!(&res, Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED) {
            return Ok(res);
        }
        let token = login(http, api, &self.email, SHOPPER_PASSWORD).await?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = token;
        Ok(req(&self.token()).send().await)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A live progress line on a terminal (indicatif); `None` elsewhere.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(250));
        bar
    })
}

/// Shows `line` on the progress bar, or (not on a terminal) as a line
/// of its own every 5 s.
fn show(bar: Option<&indicatif::ProgressBar>, started: Instant, line: &str) {
    match bar {
        Some(bar) => bar.set_message(line.to_owned()),
        None => {
            let secs = started.elapsed().as_secs();
            if secs.is_multiple_of(5) {
                eprintln!("  {secs:>5} s  {line}");
            }
        }
    }
}

/// An accepted order as the report plots it.
fn sample(at_s: f64, checkout_ms: f64, order: Option<&OrderView>) -> Sample {
    let Some(o) = order else {
        return Sample {
            at_s,
            checkout_ms,
            outcome: "lost".into(),
            outcome_ms: None,
        };
    };
    let outcome = match o.status.as_str() {
        "CANCELLED" => format!("CANCELLED: {}", o.cancel_reason.as_deref().unwrap_or("")),
        other => other.to_owned(),
    };
    let outcome_ms = (o.status != "PENDING")
        .then(|| {
            Some((parse_time(&o.updated_at)? - parse_time(&o.created_at)?).as_seconds_f64() * 1e3)
        })
        .flatten();
    Sample {
        at_s,
        checkout_ms,
        outcome,
        outcome_ms,
    }
}

fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

async fn json_call(req: reqwest::RequestBuilder) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let res = req.send().await?;
    let status = res.status();
    let text = res.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

async fn login(
    http: &reqwest::Client,
    api: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let (s, body) = json_call(
        http.post(format!("{api}/auth/login"))
            .json(&json!({"email": email, "password": password})),
    )
    .await?;
    anyhow::ensure!(s.is_success(), "login of {email} failed: {s} {body}");
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("login answer without access_token")
}

/// Runs the load and waits for every accepted order to finish.
pub async fn run(opts: LoadOptions) -> anyhow::Result<Report> {
    let api = format!("{}/api/v1", opts.gateway.trim_end_matches('/'));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.shoppers.max(1) * 2)
        .timeout(Duration::from_secs(30))
        .build()?;

    // Products, and their stock if asked.
    let (s, page) = json_call(http.get(format!(
        "{api}/products?limit={}",
        opts.products.clamp(1, 200)
    )))
    .await?;
    anyhow::ensure!(s.is_success(), "cannot list products: {s} {page}");
    let products: Vec<String> = page["items"]
        .as_array()
        .context("product page without items")?
        .iter()
        .filter_map(|p| p["id"].as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(!products.is_empty(), "the catalog is empty");
    if let Some(stock) = opts.stock {
        let (Some(email), Some(password)) = (&opts.admin_email, &opts.admin_password) else {
            anyhow::bail!(
                "--stock needs the admin account (BAZAAR_ADMIN_EMAIL, BAZAAR_ADMIN_PASSWORD)"
            );
        };
        let admin = login(&http, &api, email, password).await?;
        for id in &products {
            let (s, body) = json_call(
                http.put(format!("{api}/inventory/{id}"))
                    .bearer_auth(&admin)
                    .json(&json!({"available": stock})),
            )
            .await?;
            anyhow::ensure!(s.is_success(), "cannot set stock of {id}: {s} {body}");
        }
    }

    // Shoppers.
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let mut shoppers = Vec::with_capacity(opts.shoppers);
    for i in 0..opts.shoppers.max(1) {
        let email = format!("load-{run_id}-{i}@bazaar.load");
        let (s, body) = json_call(http.post(format!("{api}/auth/register")).json(
            &json!({"email": email, "password": SHOPPER_PASSWORD, "name": format!("Shopper {i}")}),
        ))
        .await?;
        anyhow::ensure!(s.is_success(), "cannot register a shopper: {s} {body}");
        let token = login(&http, &api, &email, SHOPPER_PASSWORD).await?;
        shoppers.push(Arc::new(Shopper {
            email,
            token: token.into(),
        }));
    }

    let placed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    // Checkout latencies since the progress line last looked.
    let recent: Arc<std::sync::Mutex<Vec<f64>>> = Arc::default();
    let started = Instant::now();
    let deadline = started + opts.duration;
    let bar = progress_bar();
    let progress = {
        let (placed, failed, retried, recent, bar) = (
            Arc::clone(&placed),
            Arc::clone(&failed),
            Arc::clone(&retried),
            Arc::clone(&recent),
            bar.clone(),
        );
        tokio::spawn(async move {
            let mut before = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = placed.load(Ordering::Relaxed);
                let mut last: Vec<f64> =
                    std::mem::take(&mut *recent.lock().unwrap_or_else(|e| e.into_inner()));
                last.sort_by(f64::total_cmp);
                let line = format!(
                    "{n:>8} placed  {:>5} errors  {:>5} retried  {:>6}/s  p99 {:>7.1} ms",
                    failed.load(Ordering::Relaxed),
                    retried.load(Ordering::Relaxed),
                    n - before,
                    percentile(&last, 0.99),
                );
                before = n;
                show(bar.as_ref(), started, &line);
            }
        })
    };
    let products = Arc::new(products);
    let shoppers_n = shoppers.len();
    let tasks: Vec<_> = shoppers
        .iter()
        .enumerate()
        .map(|(i, shopper)| {
            let (http, api, shopper, products) = (
                http.clone(),
                api.clone(),
                Arc::clone(shopper),
                Arc::clone(&products),
            );
            let (placed, failed, retried, recent) = (
                Arc::clone(&placed),
                Arc::clone(&failed),
                Arc::clone(&retried),
                Arc::clone(&recent),
            );
            let (retry_for, arrivals) = (opts.retry_for, opts.arrivals);
            // Each shopper's share of the rate, on a fixed schedule (late
            // orders are sent at once, not skipped: coordinated omission
            // would hide slowness).
            let every = opts
                .rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(shoppers_n as f64 / r));
            tokio::spawn(async move {
                let mut mine: Vec<(String, f64, f64)> = Vec::new();
                let mut n = i;
                let mut next = Instant::now()
                    + every.map_or(Duration::ZERO, |e| arrivals.first(e, i, shoppers_n));
                while Instant::now() < deadline {
                    if let Some(every) = every {
                        tokio::time::sleep_until(next.into()).await;
                        next += arrivals.gap(every);
                    }
                    n += 1;
                    let product = &products[n % products.len()];
                    let key = uuid::Uuid::now_v7().to_string();
                    let body = json!({"items": [{"product_id": product, "quantity": 1}]});
                    let began = Instant::now();
                    let give_up = began + retry_for;
                    loop {
                        // An expired token logs in again and sends the same
                        // order (the same key: it cannot buy twice); a login
                        // that fails is an outage (no status), retried below.
                        let res = shopper
                            .send(&http, &api, |token| {
                                http.post(format!("{api}/orders"))
                                    .bearer_auth(token)
                                    .header("Idempotency-Key", &key)
                                    .json(&body)
                            })
                            .await;
                        let status = match &res {
                            Ok(Ok(r)) => Some(r.status()),
                            _ => None,
                        };
                        match (res, status) {
                            (Ok(Ok(r)), Some(s)) if s.is_success() => {
                                let order: Value = r.json().await.unwrap_or(Value::Null);
                                if let Some(id) = order["id"].as_str() {
                                    let ms = began.elapsed().as_secs_f64() * 1e3;
                                    mine.push((id.to_owned(), ms, started.elapsed().as_secs_f64()));
                                    recent.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
                                    placed.fetch_add(1, Ordering::Relaxed);
                                }
                                break;
                            }
                            // A client error will not get better by retrying.
                            (_, Some(s))
                                if s.is_client_error()
                                    && s != reqwest::StatusCode::TOO_MANY_REQUESTS =>
                            {
                                failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            _ if Instant::now() > give_up => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            // An outage: the same key again, so at most one order.
                            _ => {
                                retried.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
                mine
            })
        })
        .collect();
    let mut accepted: Vec<(usize, String, f64)> = Vec::new();
    let mut placed_at: HashMap<String, f64> = HashMap::new();
    for (i, task) in tasks.into_iter().enumerate() {
        for (id, ms, at) in task.await? {
            placed_at.insert(id.clone(), at);
            accepted.push((i, id, ms));
        }
    }
    let load_secs = started.elapsed().as_secs_f64();
    progress.abort();

    // Wait for every accepted order to be final, reading each shopper's orders.
    let settle_deadline = Instant::now() + opts.settle;
    let mut finals: HashMap<String, OrderView> = HashMap::new();
    loop {
        finals.clear();
        for shopper in &shoppers {
            let mut offset = 0;
            loop {
                let url = format!("{api}/orders?limit=200&offset={offset}");
                let res = shopper
                    .send(&http, &api, |token| http.get(&url).bearer_auth(token))
                    .await
                    .with_context(|| {
                        format!(
                            "{}'s token expired, and logging in again failed",
                            shopper.email
                        )
                    })?;
                let page: Value = match res {
                    Ok(r) if r.status().is_success() => r.json().await?,
                    Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => {
                        anyhow::bail!("{} is refused even with a fresh token", shopper.email)
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let items: Vec<OrderView> = serde_json::from_value(page["items"].clone())?;
                let n = items.len();
                for o in items {
                    finals.insert(o.id.clone(), o);
                }
                if n < 200 {
                    break;
                }
                offset += 200;
            }
        }
        let pending = accepted
            .iter()
            .filter(|(_, id, _)| finals.get(id).is_none_or(|o| o.status == "PENDING"))
            .count();
        if pending == 0 || Instant::now() > settle_deadline {
            break;
        }
        let confirmed = finals.values().filter(|o| o.status == "CONFIRMED").count();
        show(
            bar.as_ref(),
            started,
            &format!("settling: {confirmed} confirmed, waiting for {pending} orders to finish"),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }

    let mut report = Report {
        placed: accepted.len(),
        failed_checkouts: failed.load(Ordering::Relaxed),
        retried_checkouts: retried.load(Ordering::Relaxed),
        load_secs,
        ..Report::default()
    };
    let mut checkout_ms: Vec<f64> = accepted.iter().map(|(_, _, ms)| *ms).collect();
    let mut confirm_ms = Vec::new();
    let (mut first, mut last) = (None, None);
    for (_, id, ms) in &accepted {
        report.order_ids.push(id.clone());
        report.samples.push(sample(
            placed_at.get(id).copied().unwrap_or(0.0),
            *ms,
            finals.get(id),
        ));
        let Some(o) = finals.get(id) else {
            report.lost += 1;
            continue;
        };
        match o.status.as_str() {
            "CONFIRMED" => {
                report.confirmed += 1;
                if let (Some(c), Some(u)) = (parse_time(&o.created_at), parse_time(&o.updated_at)) {
                    confirm_ms.push((u - c).as_seconds_f64() * 1e3);
                    first = Some(first.map_or(c, |f: time::OffsetDateTime| f.min(c)));
                    last = Some(last.map_or(u, |l: time::OffsetDateTime| l.max(u)));
                }
            }
            "CANCELLED" => {
                *report
                    .cancelled
                    .entry(o.cancel_reason.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            _ => report.pending += 1,
        }
    }
    if let (Some(f), Some(l)) = (first, last) {
        report.confirmed_per_sec = report.confirmed as f64 / (l - f).as_seconds_f64().max(0.001);
    }
    checkout_ms.sort_by(f64::total_cmp);
    confirm_ms.sort_by(f64::total_cmp);
    report.checkout_p50_ms = percentile(&checkout_ms, 0.50);
    report.checkout_p99_ms = percentile(&checkout_ms, 0.99);
    report.confirm_p50_ms = percentile(&confirm_ms, 0.50);
    report.confirm_p99_ms = percentile(&confirm_ms, 0.99);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::Arrivals;
    use std::time::Duration;

    /// A gateway whose tokens expire after three requests each: a run
    /// must log its shoppers in again and lose nothing, failing no
    /// checkout and leaving no order unlisted.
    #[tokio::test]
    async fn shoppers_log_in_again_when_their_tokens_expire() {
        use axum::extract::{Json, Query, State};
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, post};
        use serde_json::{Value, json};
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex};

        #[derive(Default)]
        struct Fake {
            logins: usize,
            /// Token → its shopper and the requests it has made.
            tokens: HashMap<String, (String, usize)>,
            /// Shopper → their orders' ids.
            orders: HashMap<String, Vec<String>>,
        }
        type Shared = State<Arc<Mutex<Fake>>>;
        /// The shopper of a token that has not expired, counting the request.
        fn shopper(fake: &mut Fake, headers: &HeaderMap) -> Option<String> {
            let token = headers
                .get("authorization")?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")?;
            let (email, used) = fake.tokens.get_mut(token)?;
            *used += 1;
            (*used <= 3).then(|| email.clone())
        }
        async fn login(State(fake): Shared, Json(body): Json<Value>) -> Json<Value> {
            let mut fake = fake.lock().unwrap();
            fake.logins += 1;
            let token = format!("token-{}", fake.logins);
            let email = body["email"].as_str().unwrap().to_owned();
            fake.tokens.insert(token.clone(), (email, 0));
            Json(json!({"access_token": token}))
        }
        async fn checkout(State(fake): Shared, headers: HeaderMap) -> (StatusCode, Json<Value>) {
            let mut fake = fake.lock().unwrap();
            let Some(email) = shopper(&mut fake, &headers) else {
                return (StatusCode::UNAUTHORIZED, Json(json!({})));
            };
            let id = uuid::Uuid::now_v7().to_string();
            fake.orders.entry(email).or_default().push(id.clone());
            (StatusCode::CREATED, Json(json!({"id": id})))
        }
        async fn list(
            State(fake): Shared,
            headers: HeaderMap,
            Query(page): Query<HashMap<String, usize>>,
        ) -> (StatusCode, Json<Value>) {
            let mut fake = fake.lock().unwrap();
            let Some(email) = shopper(&mut fake, &headers) else {
                return (StatusCode::UNAUTHORIZED, Json(json!({})));
            };
            let items: Vec<Value> = fake
                .orders
                .get(&email)
                .into_iter()
                .flatten()
                .skip(page["offset"])
                .take(page["limit"])
                .map(|id| {
                    json!({"id": id, "status": "CONFIRMED", "cancel_reason": null,
                    "created_at": "2026-12-06T00:00:00Z", "updated_at": "2026-12-06T00:00:00.02Z"})
                })
                .collect();
            (StatusCode::OK, Json(json!({"items": items})))
        }
        let fake = Arc::new(Mutex::new(Fake::default()));
        let api = axum::Router::new()
            .route(
                "/products",
                get(|| async { Json(json!({"items": [{"id": "p1"}]})) }),
            )
            .route("/auth/register", post(|| async { StatusCode::CREATED }))
            .route("/auth/login", post(login))
            .route("/orders", post(checkout).get(list))
            .with_state(Arc::clone(&fake));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().nest("/api/v1", api);
        tokio::spawn(async move { axum::serve(listener, app).await });

        let report = super::run(super::LoadOptions {
            gateway,
            shoppers: 2,
            duration: Duration::from_millis(1500),
            stock: None,
            products: 1,
            admin_email: None,
            admin_password: None,
            settle: Duration::from_secs(5),
            retry_for: Duration::from_secs(5),
            rate: Some(20.0),
            arrivals: Arrivals::Even,
        })
        .await
        .unwrap();
        let placed: usize = fake.lock().unwrap().orders.values().map(Vec::len).sum();
        assert!(placed >= 20, "{placed} orders placed");
        assert_eq!(report.placed, placed, "{}", report.summary());
        assert_eq!(report.confirmed, placed, "{}", report.summary());
        assert_eq!(
            (report.failed_checkouts, report.lost),
            (0, 0),
            "{}",
            report.summary()
        );
        // Each token made three requests at most: the shoppers logged in again.
        let logins = fake.lock().unwrap().logins;
        assert!(logins >= placed / 3, "{logins} logins for {placed} orders");
    }

    #[test]
    fn arrivals_keep_the_rate_and_spread_as_named() {
        let every = Duration::from_millis(160);
        // Poisson: exponential gaps, mean `every`, some far shorter than it.
        let gaps: Vec<f64> = (0..20_000)
            .map(|_| Arrivals::Poisson.gap(every).as_secs_f64())
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean / 0.160 - 1.0).abs() < 0.05, "mean gap {mean}");
        let short = gaps.iter().filter(|g| **g < 0.016).count() as f64 / gaps.len() as f64;
        // P(gap < every/10) = 1 - e^-0.1, about 9.5%.
        assert!(
            (0.08..0.11).contains(&short),
            "{short} of gaps under a tenth"
        );
        // Even: shoppers take turns across one interval.
        let firsts: Vec<Duration> = (0..4).map(|i| Arrivals::Even.first(every, i, 4)).collect();
        assert_eq!(
            firsts,
            [0, 40, 80, 120].map(Duration::from_millis),
            "even turns"
        );
        assert_eq!(Arrivals::Even.gap(every), every);
        // Bursts: all at once, every interval.
        assert_eq!(Arrivals::Bursts.first(every, 3, 4), Duration::ZERO);
        assert_eq!(Arrivals::Bursts.gap(every), every);
    }
}
