//! The resilient core of every call between services: per target service,
//! the instances discovery reports, each with its health (active checks of
//! `/health`) and circuit breaker (passive ejection), a balancer over the
//! ones fit to serve, a retry budget and a bulkhead.
//!
//! [`Upstreams::call`] runs one call: bulkhead → discovery → balancing →
//! breaker → timeout → retry elsewhere (when safe, within the budget). The
//! transport is the caller's closure: the gateway sends on its own
//! HTTP/1 connections, services through [`crate::client::Client`], so the
//! logic exists once whatever carries the bytes.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::{HeaderValue, Uri};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;

use crate::balance::{Balancer, Lease, Strategy};
use crate::breaker::{Breaker, BreakerSettings, BreakerState};
use crate::error::{CallError, ErrorKind, Failure};
use crate::{Discovery, Instance};

/// Failed health checks in a row that mark an instance unhealthy.
const UNHEALTHY_AFTER: u32 = 2;
/// How stale the instance list may get before it is read again.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// One instance and what the caller knows of it.
pub struct Member {
    pub instance: Instance,
    /// `host:port` of the instance's address.
    pub authority: String,
    /// The `Host` header for calls to it.
    pub host: HeaderValue,
    pub breaker: Breaker,
    healthy: AtomicBool,
    failed_checks: AtomicU32,
}

/// `host:port` of a base URL such as `http://127.0.0.1:7001` (the
/// address itself when it has no authority to take).
pub fn authority(address: &str) -> String {
    address
        .parse::<Uri>()
        .ok()
        .and_then(|u| Some(u.authority()?.as_str().to_owned()))
        .unwrap_or_else(|| address.to_owned())
}

impl Member {
    fn new(instance: &Instance, breaker: BreakerSettings) -> Self {
        let authority = authority(&instance.address);
        Self {
            host: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            authority,
            instance: instance.clone(),
            breaker: Breaker::new(breaker),
            healthy: AtomicBool::new(true),
            failed_checks: AtomicU32::new(0),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// What `/_admin/services` shows of it.
    fn view(&self) -> InstanceView {
        InstanceView {
            name: self.instance.name.clone(),
            id: self.instance.id.clone(),
            address: self.instance.address.clone(),
            healthy: self.healthy(),
            breaker: self.breaker.state(),
            patterns: self.instance.patterns.clone(),
            refused: self.instance.refused.clone(),
        }
    }

    fn fit(&self) -> bool {
        self.healthy() && self.breaker.available()
    }
}

#[derive(Default)]
struct Snapshot {
    members: Vec<Arc<Member>>,
    instances: Vec<Instance>,
}

// === impl RetryBudget ===

/// Retries allowed: a share of the calls (`percent`), plus a floor of 10
/// per second, saved up to 100 (linkerd's and Finagle's retry budget).
pub struct RetryBudget {
    percent: f64,
    state: Mutex<(f64, Instant)>,
}

/// Retries that may be saved up.
pub const BUDGET_CAP: f64 = 100.0;
/// Retries a second allowed whatever the traffic.
pub const BUDGET_FLOOR_PER_SEC: f64 = 10.0;

impl RetryBudget {
    pub fn new(percent: u32, now: Instant) -> Self {
        Self {
            percent: f64::from(percent) / 100.0,
            state: Mutex::new((BUDGET_FLOOR_PER_SEC, now)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (f64, Instant)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A first try: earns `percent` of a retry.
    pub fn deposit(&self) {
        let mut s = self.lock();
        s.0 = (s.0 + self.percent).min(BUDGET_CAP);
    }

    /// Spends one retry, if one is left at `now`.
    pub fn withdraw(&self, now: Instant) -> bool {
        let mut s = self.lock();
        let floor = now.saturating_duration_since(s.1).as_secs_f64() * BUDGET_FLOOR_PER_SEC;
        s.1 = s.1.max(now);
        s.0 = (s.0 + floor).min(BUDGET_CAP);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

// === impl Pool ===

/// The instances of one target service, and its instruments.
pub struct Pool {
    service: String,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Milliseconds since `epoch` at the last refresh.
    refreshed: AtomicU64,
    refreshing: AtomicBool,
    balancer: Balancer,
    budget: RetryBudget,
    in_use: AtomicUsize,
    /// Calls by outcome: the error kinds in [`ErrorKind::ALL`]'s order,
    /// then `ok`.
    outcomes: Vec<Counter>,
    latency: Histogram,
}

/// A chosen instance, in flight until dropped.
struct Pick {
    member: Arc<Member>,
    lease: Lease,
    /// Other instances that were fit to choose (0: a retry has nowhere to go).
    alternatives: usize,
}

impl Pick {
    /// Reports the outcome to the breaker and the balancer.
    fn finish(self, ok: bool, latency: Duration) {
        self.member.breaker.record(ok);
        self.lease.finish(latency);
    }
}

/// A bulkhead slot, given back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What `/_admin/services` shows of an instance.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct InstanceView {
    pub name: String,
    pub id: String,
    pub address: String,
    pub healthy: bool,
    pub breaker: BreakerState,
    /// The action patterns it answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<crate::actions::Action>,
    /// Its patterns refused at registration, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<crate::actions::Refused>,
}

/// How the calls of one [`Upstreams`] behave.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub breaker: BreakerSettings,
    /// How often each instance's `/health` is polled.
    pub health_interval: Duration,
    /// Retries allowed as a percentage of first tries (plus 10/s).
    pub budget_percent: u32,
    /// Calls in flight to one target service at most; more get
    /// [`ErrorKind::BulkheadFull`] at once.
    pub bulkhead: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            breaker: BreakerSettings::default(),
            health_interval: Duration::from_secs(2),
            budget_percent: 20,
            bulkhead: 512,
        }
    }
}

/// How one call is made.
#[derive(Debug, Clone, Copy)]
pub struct CallOptions {
    pub strategy: Strategy,
    /// For each attempt, until the answer's head (the gateway) or whole
    /// answer (the client).
    pub timeout: Duration,
    /// Attempts after the first, on other instances.
    pub retries: u32,
    /// Whether the request may be sent twice (GET, HEAD, PUT, DELETE…).
    pub idempotent: bool,
    /// The client's address, for IP-hash balancing.
    pub client: Option<IpAddr>,
}

/// Answers whether an instance is healthy: the transport's `/health` call.
pub type Probe = Arc<dyn Fn(Arc<Member>) -> BoxFuture<'static, bool> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct CallLabels {
    target: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

/// The calls' metrics of one service, shared by all its [`Upstreams`]
/// (the gateway has its proxy's and its client's): calls by target and
/// outcome, their latency, and (read at each scrape) every target
/// instance's breaker state and each target's bulkhead slots in use.
#[derive(Clone)]
pub struct Instruments {
    calls: Family<CallLabels, Counter>,
    latency: Family<TargetLabels, Histogram>,
    upstreams: Arc<Mutex<Vec<Weak<Upstreams>>>>,
}

impl Default for Instruments {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            latency: Family::new_with_constructor(|| {
                // 0.1 ms … ~3.3 s
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
            upstreams: Arc::default(),
        }
    }
}

impl Instruments {
    /// Adds the metrics to `registry` (once per service).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mesh_calls",
            "Calls to other services by target service and outcome",
            self.calls.clone(),
        );
        registry.register(
            "mesh_call_duration_seconds",
            "Latency of calls to other services, in seconds",
            self.latency.clone(),
        );
        registry.register_collector(Box::new(Collector(Arc::clone(&self.upstreams))));
    }
}

/// Every target service's pool.
pub struct Upstreams {
    discovery: Discovery,
    settings: Settings,
    probe: Probe,
    epoch: Instant,
    pools: RwLock<crate::FastMap<String, Arc<Pool>>>,
    instruments: Instruments,
}

impl Upstreams {
    pub fn new(
        discovery: Discovery,
        settings: Settings,
        probe: Probe,
        instruments: &Instruments,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            discovery,
            settings,
            probe,
            epoch: Instant::now(),
            pools: RwLock::default(),
            instruments: instruments.clone(),
        });
        let mut all = instruments
            .upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|u| u.strong_count() > 0);
        all.push(Arc::downgrade(&me));
        drop(all);
        tokio::spawn(follow_changes(Arc::downgrade(&me)));
        me
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// The pool of `service`, created (with its health checker) on first use.
    fn pool(self: &Arc<Self>, service: &str) -> Arc<Pool> {
        if let Some(p) = self
            .pools
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
        {
            return Arc::clone(p);
        }
        let mut pools = self
            .pools
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = pools.get(service) {
            return Arc::clone(p);
        }
        let counter = |outcome| {
            self.instruments
                .calls
                .get_or_create(&CallLabels {
                    target: service.to_owned(),
                    outcome,
                })
                .clone()
        };
        let pool = Arc::new(Pool {
            service: service.to_owned(),
            snapshot: RwLock::default(),
            refreshed: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
            balancer: Balancer::default(),
            budget: RetryBudget::new(self.settings.budget_percent, Instant::now()),
            in_use: AtomicUsize::new(0),
            outcomes: ErrorKind::ALL
                .iter()
                .map(|k| k.label())
                .chain(["ok"])
                .map(counter)
                .collect(),
            latency: self
                .instruments
                .latency
                .get_or_create(&TargetLabels {
                    target: service.to_owned(),
                })
                .clone(),
        });
        pools.insert(service.to_owned(), Arc::clone(&pool));
        // The checker holds the pools weakly: it ends when they go.
        tokio::spawn(check_health(Arc::downgrade(self), Arc::clone(&pool)));
        pool
    }

    fn snapshot(pool: &Pool) -> Arc<Snapshot> {
        Arc::clone(
            &pool
                .snapshot
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Milliseconds from this pool's start to `at`.
    fn millis(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch).as_millis();
        u64::try_from(since).unwrap_or(u64::MAX)
    }

    /// Reads the instance list from discovery, keeping what is known of
    /// instances still listed.
    async fn refresh(&self, pool: &Pool) -> Result<(), CallError> {
        let listed = self
            .discovery
            .registry()
            .list(&pool.service)
            .await
            .map_err(|e| CallError::new(&pool.service, ErrorKind::NoInstance, true).because(e))?;
        let old = Self::snapshot(pool);
        let members: Vec<Arc<Member>> = listed
            .iter()
            .map(|i| {
                old.members
                    .iter()
                    .find(|m| m.instance.id == i.id && m.instance.address == i.address)
                    .map_or_else(
                        || Arc::new(Member::new(i, self.settings.breaker)),
                        Arc::clone,
                    )
            })
            .collect();
        *pool
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(Snapshot {
            members,
            instances: listed,
        });
        pool.refreshed
            .store(self.millis(Instant::now()).max(1), Ordering::Relaxed);
        Ok(())
    }

    /// The current instances: read again inline when none are known yet,
    /// in the background when the list is stale (at `now`).
    async fn members(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        now: Instant,
    ) -> Result<Arc<Snapshot>, CallError> {
        if let Some(snap) = self.known(pool, now) {
            return Ok(snap);
        }
        Box::pin(self.refresh(pool)).await?;
        Ok(Self::snapshot(pool))
    }

    /// [`Self::members`] without waiting: `None` when they must be read
    /// first. The clock reading is the caller's (one fewer per call).
    fn known(self: &Arc<Self>, pool: &Arc<Pool>, now: Instant) -> Option<Arc<Snapshot>> {
        let at = pool.refreshed.load(Ordering::Relaxed);
        let stale = self.millis(now).saturating_sub(at) > REFRESH_EVERY.as_millis() as u64;
        let snap = Self::snapshot(pool);
        if at == 0 || (stale && snap.members.is_empty()) {
            return None;
        }
        if stale && !pool.refreshing.swap(true, Ordering::AcqRel) {
            let (me, p) = (Arc::clone(self), Arc::clone(pool));
            tokio::spawn(async move {
                if let Err(e) = me.refresh(&p).await {
                    tracing::warn!(service = %p.service, error = %e, "cannot refresh instances");
                }
                p.refreshing.store(false, Ordering::Release);
            });
        }
        Some(snap)
    }

    /// Chooses an instance of `snap` by `strategy`, skipping unhealthy
    /// and ejected ones and those in `tried`.
    fn pick(
        pool: &Pool,
        snap: &Snapshot,
        strategy: Strategy,
        client: Option<IpAddr>,
        tried: &[String],
    ) -> Result<Pick, CallError> {
        let unavailable = |kind| CallError::new(&pool.service, kind, true);
        if snap.members.is_empty() {
            return Err(unavailable(ErrorKind::NoInstance));
        }
        let all_fit = tried.is_empty() && snap.members.iter().all(|m| m.fit());
        let filtered: Vec<Instance>;
        let candidates: &[Instance] = if all_fit {
            &snap.instances
        } else {
            filtered = snap
                .members
                .iter()
                .filter(|m| m.fit() && !tried.contains(&m.instance.id))
                .map(|m| m.instance.clone())
                .collect();
            &filtered
        };
        // A half-open breaker admits one probe: if another call took it
        // in the meantime, choose again without that instance.
        let mut rest: Option<Vec<Instance>> = None;
        loop {
            let list = rest.as_deref().unwrap_or(candidates);
            let Some(lease) = pool.balancer.pick(strategy, list, client) else {
                break;
            };
            let id = &list[lease.index].id;
            let Some(member) = snap.members.iter().find(|m| &m.instance.id == id) else {
                break;
            };
            if member.breaker.try_acquire() {
                return Ok(Pick {
                    member: Arc::clone(member),
                    lease,
                    alternatives: list.len() - 1,
                });
            }
            let fewer = list.iter().filter(|i| &i.id != id).cloned().collect();
            rest = Some(fewer);
        }
        // Nobody fit: say "circuit open" when a breaker is why.
        let shielded = snap
            .members
            .iter()
            .any(|m| m.healthy() && !m.breaker.available());
        Err(unavailable(if shielded {
            ErrorKind::BreakerOpen
        } else {
            ErrorKind::NoInstance
        }))
    }

    /// Makes one call to `service`: `attempt` sends the request to the
    /// instance it is given, with the attempt's start (a transport that
    /// keeps time needs no clock read of its own). A failed attempt counts
    /// against that instance's breaker and goes again to another instance when safe
    /// (a connection failure, or an idempotent request), as often as
    /// `options.retries` and the retry budget allow. A timeout is not
    /// retried: the next would wait as long. Answers of any status are
    /// the caller's to judge: a 503 from an instance usually means one of
    /// *its* dependencies is down, which another instance would not fix.
    pub async fn call<R, F, Fut>(
        self: &Arc<Self>,
        service: &str,
        options: &CallOptions,
        attempt: F,
    ) -> Result<(R, Arc<Member>), CallError>
    where
        F: FnMut(Arc<Member>, Instant) -> Fut,
        Fut: Future<Output = Result<R, Failure>>,
    {
        let pool = self.pool(service);
        let started = Instant::now();
        let mut took = None;
        let result = self
            .attempts(&pool, options, started, &mut took, attempt)
            .await;
        let outcome = match &result {
            Ok(_) => ErrorKind::ALL.len(),
            Err(e) => e.kind.index(),
        };
        pool.outcomes[outcome].inc();
        let took = took.unwrap_or_else(|| started.elapsed());
        pool.latency.observe(took.as_secs_f64());
        result
    }

    /// `took` is set to the call's time when its last attempt was its
    /// first (nearly always): one clock read fewer.
    async fn attempts<R, F, Fut>(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        options: &CallOptions,
        call_started: Instant,
        took: &mut Option<Duration>,
        mut attempt: F,
    ) -> Result<(R, Arc<Member>), CallError>
    where
        F: FnMut(Arc<Member>, Instant) -> Fut,
        Fut: Future<Output = Result<R, Failure>>,
    {
        let service = pool.service.as_str();
        if pool.in_use.fetch_add(1, Ordering::Relaxed) >= self.settings.bulkhead {
            pool.in_use.fetch_sub(1, Ordering::Relaxed);
            return Err(CallError::new(service, ErrorKind::BulkheadFull, true));
        }
        let _slot = Slot(&pool.in_use);
        pool.budget.deposit();
        let mut tried: Vec<String> = Vec::new();
        let mut failure: Option<CallError> = None;
        for n in 0..=options.retries {
            if n > 0 && !pool.budget.withdraw(Instant::now()) {
                tracing::debug!(service, "retry budget spent");
                break;
            }
            // One clock read fewer on the first (nearly every) attempt.
            let started = if n == 0 { call_started } else { Instant::now() };
            let snap = match self.known(pool, started) {
                Some(snap) => snap,
                None => match self.members(pool, started).await {
                    Ok(snap) => snap,
                    Err(e) => return Err(failure.unwrap_or(e)),
                },
            };
            let pick = match Self::pick(pool, &snap, options.strategy, options.client, &tried) {
                Ok(p) => p,
                Err(e) => return Err(failure.unwrap_or(e)),
            };
            let member = Arc::clone(&pick.member);
            let alternatives = pick.alternatives;
            let attempted = attempt(Arc::clone(&member), started);
            let answer = tokio::time::timeout(options.timeout, attempted).await;
            let elapsed = started.elapsed();
            *took = (n == 0).then_some(elapsed);
            match answer {
                Ok(Ok(answer)) => {
                    pick.finish(true, elapsed);
                    return Ok((answer, member));
                }
                Ok(Err(f)) => {
                    pick.finish(false, elapsed);
                    tracing::warn!(service, instance = %member.instance.id, error = %f.cause, "call failed");
                    let safe = options.idempotent || f.kind == ErrorKind::Connect;
                    failure = Some(CallError::new(service, f.kind, safe).because(f.cause));
                    if !safe || alternatives == 0 {
                        break;
                    }
                    tried.push(member.instance.id.clone());
                }
                Err(_) => {
                    pick.finish(false, elapsed);
                    return Err(
                        CallError::new(service, ErrorKind::Timeout, options.idempotent)
                            .because(format!("no answer within {:?}", options.timeout)),
                    );
                }
            }
        }
        Err(failure.unwrap_or_else(|| CallError::new(service, ErrorKind::NoInstance, true)))
    }

    /// Every instance of every service discovery knows, with its state.
    pub async fn view(self: &Arc<Self>) -> Result<Vec<InstanceView>, CallError> {
        let all = self
            .discovery
            .registry()
            .all()
            .await
            .map_err(|e| CallError::new("registry", ErrorKind::NoInstance, true).because(e))?;
        let mut names: Vec<String> = all.iter().map(|i| i.name.clone()).collect();
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for name in names {
            let pool = self.pool(&name);
            let snap = self.members(&pool, Instant::now()).await?;
            out.extend(snap.members.iter().map(|m| m.view()));
        }
        Ok(out)
    }

    /// Every instance of the targets called so far, with its state as
    /// this caller's health checks and breakers see it.
    pub fn seen(&self) -> Vec<InstanceView> {
        self.targets().into_iter().flat_map(|(_, _, v)| v).collect()
    }

    /// The targets called so far, with their instances' states (no
    /// registry read: what this caller's breakers know).
    pub fn targets(&self) -> Vec<(String, usize, Vec<InstanceView>)> {
        let pools = self
            .pools
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<_> = pools
            .values()
            .map(|p| {
                let snap = Self::snapshot(p);
                let views = snap.members.iter().map(|m| m.view()).collect();
                (p.service.clone(), p.in_use.load(Ordering::Relaxed), views)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Reads every target's instances again as soon as the registry reports
/// a change (between its changes, the lists are read once a second):
/// a new instance gets calls, and a departed one none, at once.
async fn follow_changes(upstreams: Weak<Upstreams>) {
    let Some(mut changes) = upstreams
        .upgrade()
        .map(|u| u.discovery.registry().changes())
    else {
        return;
    };
    while changes.changed().await.is_ok() {
        let Some(me) = upstreams.upgrade() else {
            return;
        };
        let pools: Vec<Arc<Pool>> = me
            .pools
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for pool in pools {
            if let Err(e) = me.refresh(&pool).await {
                tracing::warn!(service = %pool.service, error = %e, "cannot refresh instances");
            }
        }
    }
}

/// Polls every instance's `/health` until the pools are dropped: two
/// failures in a row mark it unhealthy; a pass marks it healthy and lets
/// an ejected instance's probe through.
async fn check_health(upstreams: Weak<Upstreams>, pool: Arc<Pool>) {
    loop {
        let Some(interval) = upstreams.upgrade().map(|u| u.settings.health_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(me) = upstreams.upgrade() else {
            return;
        };
        if let Err(e) = me.refresh(&pool).await {
            tracing::warn!(service = %pool.service, error = %e, "cannot refresh instances");
        }
        let snap = Upstreams::snapshot(&pool);
        let probes: Vec<_> = snap
            .members
            .iter()
            .map(|m| (me.probe)(Arc::clone(m)))
            .collect();
        drop(me);
        let checks = snap.members.iter().zip(probes).map(|(m, probe)| {
            async move {
                let ok = tokio::time::timeout(Duration::from_secs(1), probe)
                    .await
                    .unwrap_or(false);
                if ok {
                    m.failed_checks.store(0, Ordering::Relaxed);
                    if !m.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!(service = %m.instance.name, instance = %m.instance.id, "instance healthy again");
                    }
                    m.breaker.healthy_again();
                } else if m.failed_checks.fetch_add(1, Ordering::Relaxed) + 1 >= UNHEALTHY_AFTER
                    && m.healthy.swap(false, Ordering::Relaxed)
                {
                    tracing::warn!(service = %m.instance.name, instance = %m.instance.id, "instance failed its health checks");
                }
            }
        });
        futures::future::join_all(checks).await;
    }
}

// === impl Collector ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct InstanceLabels {
    target: String,
    instance: String,
}

/// The state read at scrape time: breakers and bulkheads.
struct Collector(Arc<Mutex<Vec<Weak<Upstreams>>>>);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mesh::Collector")
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::gauge::Gauge;
        let all: Vec<Arc<Upstreams>> = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let breakers = Family::<InstanceLabels, Gauge>::default();
        let bulkheads = Family::<TargetLabels, Gauge>::default();
        for (target, in_use, views) in all.iter().flat_map(|u| u.targets()) {
            bulkheads
                .get_or_create(&TargetLabels {
                    target: target.clone(),
                })
                .inc_by(i64::try_from(in_use).unwrap_or(i64::MAX));
            for v in views {
                let state = match v.breaker {
                    BreakerState::Closed => 0,
                    BreakerState::HalfOpen => 1,
                    BreakerState::Open => 2,
                };
                // Two callers' view of one instance: the worse shows.
                let gauge = breakers.get_or_create(&InstanceLabels {
                    target: target.clone(),
                    instance: v.id,
                });
                gauge.set(gauge.get().max(state));
            }
        }
        breakers.encode(encoder.encode_descriptor(
            "mesh_breaker_state",
            "Circuit breaker of each target instance: 0 closed, 1 half-open, 2 open",
            None,
            breakers.metric_type(),
        )?)?;
        bulkheads.encode(encoder.encode_descriptor(
            "mesh_bulkhead_in_use",
            "Calls in flight per target service (the bulkhead's slots taken)",
            None,
            bulkheads.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However deposits, withdrawals and time interleave, retries
        /// never exceed the floor's start, the share of first tries and
        /// 10 a second.
        #[test]
        fn the_retry_budget_bounds_retries(
            steps in proptest::collection::vec((any::<bool>(), 0u64..500), 1..400),
            percent in 0u32..100,
        ) {
            let t0 = Instant::now();
            let budget = RetryBudget::new(percent, t0);
            let (mut now, mut firsts, mut retries) = (t0, 0u32, 0u32);
            for (first, ms) in steps {
                now += Duration::from_millis(ms);
                if first {
                    budget.deposit();
                    firsts += 1;
                } else if budget.withdraw(now) {
                    retries += 1;
                }
                let allowed = BUDGET_FLOOR_PER_SEC
                    + f64::from(firsts) * f64::from(percent) / 100.0
                    + now.duration_since(t0).as_secs_f64() * BUDGET_FLOOR_PER_SEC;
                prop_assert!(f64::from(retries) <= allowed + 1e-9, "{retries} > {allowed}");
            }
        }

        /// A budget left alone for a second allows ten retries, and never
        /// more than the cap.
        #[test]
        fn the_retry_budget_refills_and_caps(idle_secs in 1u64..1000) {
            let t0 = Instant::now();
            let budget = RetryBudget::new(0, t0);
            let later = t0 + Duration::from_secs(idle_secs);
            let mut n = 0;
            while budget.withdraw(later) {
                n += 1;
            }
            let expected = (BUDGET_FLOOR_PER_SEC * (1 + idle_secs) as f64).min(BUDGET_CAP) as u32;
            prop_assert_eq!(n, expected);
        }
    }

    mod calls {
        use std::sync::atomic::AtomicUsize;

        use super::*;
        use crate::{MemoryRegistry, Registry};

        async fn two_instances(bulkhead: usize) -> Arc<Upstreams> {
            let registry = MemoryRegistry::default();
            for id in ["a", "b"] {
                registry
                    .register(Instance {
                        name: "orders".into(),
                        id: id.into(),
                        address: format!("http://{id}.invalid:1"),
                        version: String::new(),
                        ..Instance::default()
                    })
                    .await
                    .expect("register");
            }
            let probe: Probe = Arc::new(|_| Box::pin(async { true }));
            Upstreams::new(
                Discovery::new(Arc::new(registry)),
                Settings {
                    bulkhead,
                    ..Settings::default()
                },
                probe,
                &Instruments::default(),
            )
        }

        fn options(idempotent: bool) -> CallOptions {
            CallOptions {
                strategy: crate::balance::Strategy::RoundRobin,
                timeout: Duration::from_millis(50),
                retries: 1,
                idempotent,
                client: None,
            }
        }

        /// A failed connect is retried elsewhere whatever the method;
        /// a lost answer only for an idempotent request; a timeout never.
        #[tokio::test]
        async fn retries_go_elsewhere_only_when_safe() {
            let up = two_instances(8).await;
            let tries = AtomicUsize::new(0);
            let (answer, member) = up
                .call("orders", &options(false), |m, _| {
                    let n = tries.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n == 0 {
                            Err(Failure::connect("refused"))
                        } else {
                            Ok(m.instance.id.clone())
                        }
                    }
                })
                .await
                .expect("the second instance answers");
            assert_eq!(tries.load(Ordering::SeqCst), 2);
            assert_eq!(answer, member.instance.id);

            for idempotent in [false, true] {
                let tries = AtomicUsize::new(0);
                let e = up
                    .call("orders", &options(idempotent), |_, _| {
                        tries.fetch_add(1, Ordering::SeqCst);
                        async { Err::<(), _>(Failure::bad_answer("reset")) }
                    })
                    .await
                    .err()
                    .expect("both fail");
                assert_eq!(e.kind, ErrorKind::BadAnswer);
                assert_eq!(e.retry_safe, idempotent);
                assert_eq!(tries.load(Ordering::SeqCst), if idempotent { 2 } else { 1 });
            }

            let tries = AtomicUsize::new(0);
            let e = up
                .call("orders", &options(true), |_, _| {
                    tries.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Result<(), Failure>>()
                })
                .await
                .err()
                .expect("times out");
            assert_eq!(e.kind, ErrorKind::Timeout);
            assert_eq!(e.status(), 504);
            assert_eq!(tries.load(Ordering::SeqCst), 1, "a timeout is not retried");

            let e = up
                .call("payments", &options(true), |_, _| async { Ok(()) })
                .await
                .err()
                .expect("nothing registered");
            assert_eq!(e.kind, ErrorKind::NoInstance);
        }

        /// A full bulkhead refuses at once, without an attempt.
        #[tokio::test]
        async fn a_full_bulkhead_refuses_at_once() {
            let up = two_instances(1).await;
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            let held = {
                let up = up.clone();
                let mut released = Some(released);
                let long = CallOptions {
                    timeout: Duration::from_secs(30),
                    ..options(true)
                };
                tokio::spawn(async move {
                    up.call("orders", &long, move |_, _| {
                        let released = released.take();
                        async move {
                            if let Some(r) = released {
                                let _ = r.await;
                            }
                            Ok(())
                        }
                    })
                    .await
                })
            };
            while up.targets().first().is_none_or(|t| t.1 == 0) {
                tokio::task::yield_now().await;
            }
            let e = up
                .call("orders", &options(true), |_, _| async { Ok(()) })
                .await
                .err()
                .expect("full");
            assert_eq!(e.kind, ErrorKind::BulkheadFull);
            assert_eq!(e.status(), 503);
            let _ = release.send(());
            held.await.expect("task").expect("the first call ends well");
            assert!(
                up.call("orders", &options(true), |_, _| async { Ok(()) })
                    .await
                    .is_ok()
            );
        }
    }
}
