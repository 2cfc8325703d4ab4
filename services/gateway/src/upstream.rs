//! The upstreams: per service, the instances discovery reports, each with
//! its health (active checks of `/health`) and circuit breaker (passive
//! ejection), a balancer over the ones fit to serve, and a retry budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use bazaar_chassis::Shutdown;
use bazaar_mesh::balance::{Balancer, Lease, Strategy};
use bazaar_mesh::breaker::{Breaker, BreakerSettings, BreakerState};
use bazaar_mesh::{Discovery, Instance};
use bytes::Bytes;
use serde::Serialize;

use crate::conn;

/// Failed health checks in a row that mark an instance unhealthy.
const UNHEALTHY_AFTER: u32 = 2;
/// How stale the instance list may get before it is read again.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// One instance and what the gateway knows of it.
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

impl Member {
    fn new(instance: &Instance, breaker: BreakerSettings) -> Self {
        let address = &instance.address;
        let authority = address
            .parse::<Uri>()
            .ok()
            .and_then(|u| Some(u.authority()?.as_str().to_owned()))
            .unwrap_or_else(|| address.clone());
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

    fn fit(&self) -> bool {
        self.healthy() && self.breaker.available()
    }
}

#[derive(Default)]
struct Snapshot {
    members: Vec<Arc<Member>>,
    instances: Vec<Instance>,
}

/// Retries allowed: a share of the requests (`percent`), plus a floor of
/// 10 per second, saved up to 100.
struct RetryBudget {
    percent: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    fn new(percent: u32) -> Self {
        Self {
            percent: f64::from(percent) / 100.0,
            state: Mutex::new((10.0, Instant::now())),
        }
    }

    fn deposit(&self) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.0 = (s.0 + self.percent).min(100.0);
    }

    fn withdraw(&self) -> bool {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let floor = now.duration_since(s.1).as_secs_f64() * 10.0;
        s.1 = now;
        s.0 = (s.0 + floor).min(100.0);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The instances of one service.
pub struct Pool {
    service: String,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Milliseconds since `epoch` at the last refresh.
    refreshed: AtomicU64,
    refreshing: AtomicBool,
    balancer: Balancer,
    budget: RetryBudget,
}

/// A chosen instance, in flight until dropped.
pub struct Pick {
    pub member: Arc<Member>,
    lease: Lease,
    /// Other instances that were fit to choose (0: a retry has nowhere to go).
    pub alternatives: usize,
}

impl Pick {
    /// Reports the outcome to the breaker and the balancer.
    pub fn finish(self, ok: bool, latency: Duration) {
        self.member.breaker.record(ok);
        self.lease.finish(latency);
    }
}

/// Why no instance could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum NoPick {
    #[error("no instance of {0} is registered")]
    None(String),
    #[error("every instance of {0} is unhealthy or ejected")]
    AllDown(String),
    #[error("cannot reach the registry: {0}")]
    Registry(String),
}

/// What `/_admin/services` shows of an instance.
#[derive(Serialize)]
pub struct InstanceView {
    pub name: String,
    pub id: String,
    pub address: String,
    pub healthy: bool,
    pub breaker: BreakerState,
}

/// Every service's pool.
pub struct Pools {
    discovery: Discovery,
    breaker: BreakerSettings,
    health_interval: Duration,
    budget_percent: u32,
    shutdown: Shutdown,
    epoch: Instant,
    pools: RwLock<HashMap<String, Arc<Pool>>>,
}

impl Pools {
    pub fn new(
        discovery: Discovery,
        breaker: BreakerSettings,
        health_interval: Duration,
        budget_percent: u32,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        Arc::new(Self {
            discovery,
            breaker,
            health_interval,
            budget_percent,
            shutdown,
            epoch: Instant::now(),
            pools: RwLock::default(),
        })
    }

    /// The pool of `service`, created (with its health checker) on first use.
    pub fn pool(self: &Arc<Self>, service: &str) -> Arc<Pool> {
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
        let pool = Arc::new(Pool {
            service: service.to_owned(),
            snapshot: RwLock::default(),
            refreshed: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
            balancer: Balancer::default(),
            budget: RetryBudget::new(self.budget_percent),
        });
        pools.insert(service.to_owned(), Arc::clone(&pool));
        let (me, p) = (Arc::clone(self), Arc::clone(&pool));
        tokio::spawn(async move { me.check_health(p).await });
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

    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reads the instance list from discovery, keeping what is known of
    /// instances still listed.
    async fn refresh(&self, pool: &Pool) -> Result<(), NoPick> {
        let listed = self
            .discovery
            .registry()
            .list(&pool.service)
            .await
            .map_err(|e| NoPick::Registry(e.to_string()))?;
        let old = Self::snapshot(pool);
        let members: Vec<Arc<Member>> = listed
            .iter()
            .map(|i| {
                old.members
                    .iter()
                    .find(|m| m.instance.id == i.id && m.instance.address == i.address)
                    .map_or_else(|| Arc::new(Member::new(i, self.breaker)), Arc::clone)
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
            .store(self.millis().max(1), Ordering::Relaxed);
        Ok(())
    }

    /// The current instances: read again inline when none are known yet,
    /// in the background when the list is stale.
    async fn members(self: &Arc<Self>, pool: &Arc<Pool>) -> Result<Arc<Snapshot>, NoPick> {
        let at = pool.refreshed.load(Ordering::Relaxed);
        let stale = self.millis().saturating_sub(at) > REFRESH_EVERY.as_millis() as u64;
        let snap = Self::snapshot(pool);
        if at == 0 || (stale && snap.members.is_empty()) {
            Box::pin(self.refresh(pool)).await?;
            return Ok(Self::snapshot(pool));
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
        Ok(snap)
    }

    /// Chooses an instance of `service` by `strategy`, skipping unhealthy
    /// and ejected ones and those in `tried`. A first try (nothing tried
    /// yet) counts toward the service's retry budget.
    pub async fn pick(
        self: &Arc<Self>,
        service: &str,
        strategy: Strategy,
        client: IpAddr,
        tried: &[String],
    ) -> Result<Pick, NoPick> {
        let pool = self.pool(service);
        if tried.is_empty() {
            pool.budget.deposit();
        }
        let snap = self.members(&pool).await?;
        if snap.members.is_empty() {
            return Err(NoPick::None(service.to_owned()));
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
        // A half-open breaker admits one probe: if another request took
        // it in the meantime, choose again without that instance.
        let mut rest: Option<Vec<Instance>> = None;
        loop {
            let list = rest.as_deref().unwrap_or(candidates);
            let Some(lease) = pool.balancer.pick(strategy, list, Some(client)) else {
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
        Err(NoPick::AllDown(service.to_owned()))
    }

    /// Spends one retry of `service`'s budget, if there is one left.
    pub fn withdraw(self: &Arc<Self>, service: &str) -> bool {
        self.pool(service).budget.withdraw()
    }

    /// Every instance of every service discovery knows, with its state.
    pub async fn view(self: &Arc<Self>) -> Result<Vec<InstanceView>, NoPick> {
        let all = self
            .discovery
            .registry()
            .all()
            .await
            .map_err(|e| NoPick::Registry(e.to_string()))?;
        let mut names: Vec<String> = all.iter().map(|i| i.name.clone()).collect();
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for name in names {
            let pool = self.pool(&name);
            let snap = self.members(&pool).await?;
            out.extend(snap.members.iter().map(|m| InstanceView {
                name: name.clone(),
                id: m.instance.id.clone(),
                address: m.instance.address.clone(),
                healthy: m.healthy(),
                breaker: m.breaker.state(),
            }));
        }
        Ok(out)
    }

    /// Polls every instance's `/health` until shutdown: two failures in a
    /// row mark it unhealthy; a pass marks it healthy and lets an ejected
    /// instance's probe through.
    async fn check_health(self: Arc<Self>, pool: Arc<Pool>) {
        loop {
            tokio::select! {
                () = self.shutdown.wait() => return,
                () = tokio::time::sleep(self.health_interval) => {}
            }
            if let Err(e) = self.refresh(&pool).await {
                tracing::warn!(service = %pool.service, error = %e, "cannot refresh instances");
            }
            let snap = Self::snapshot(&pool);
            let checks = snap.members.iter().map(|m| async move {
                let ok = Self::probe(m).await;
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
            });
            futures::future::join_all(checks).await;
        }
    }

    async fn probe(member: &Member) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, member.host.clone());
        let req = conn::Outgoing {
            method: &Method::GET,
            target: "/health",
            headers: &headers,
            body: &Bytes::new(),
        };
        let call = async {
            let res = conn::send(&member.authority, &req, Instant::now())
                .await
                .ok()?;
            let ok = res.status() == StatusCode::OK;
            // Read the body, so the connection can be used again.
            http_body_util::BodyExt::collect(res.into_body())
                .await
                .ok()?;
            Some(ok)
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), call).await,
            Ok(Some(true))
        )
    }
}
