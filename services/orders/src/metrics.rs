//! The saga, for `/metrics`: orders started, confirmed and cancelled (by
//! reason), the time from checkout to the outcome, and the orders in
//! flight at each step. Outcomes are counted once their transaction
//! commits ([`messaging::after_commit`]).

use std::time::Duration;

use bazaar_chassis::Shutdown;
use bazaar_chassis::db::Db;
use bazaar_chassis::messaging;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use sqlx::Row;

use crate::saga::{CHARGING, RESERVING};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Step {
    step: &'static str,
}

/// How often the orders in flight are counted.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct SagaMetrics {
    started: Counter,
    confirmed: Counter,
    cancelled: Family<Reason, Counter>,
    to_outcome: Histogram,
    in_flight: Family<Step, Gauge>,
}

impl SagaMetrics {
    pub fn new(metrics: &bazaar_chassis::Metrics) -> Self {
        let m = Self {
            started: Counter::default(),
            confirmed: Counter::default(),
            cancelled: Family::default(),
            // 1 ms … ~65 s
            to_outcome: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            in_flight: Family::default(),
        };
        metrics.with_registry(|r| {
            r.register("saga_started", "Order sagas started", m.started.clone());
            r.register("saga_confirmed", "Orders confirmed", m.confirmed.clone());
            r.register(
                "saga_cancelled",
                "Orders cancelled, by reason (out_of_stock, payment_declined, timeout, product_unavailable)",
                m.cancelled.clone(),
            );
            r.register(
                "saga_duration_seconds",
                "Time from checkout to the order's outcome",
                m.to_outcome.clone(),
            );
            r.register(
                "saga_in_flight",
                "Orders waiting at each step (sampled every 5 s)",
                m.in_flight.clone(),
            );
        });
        m
    }

    /// `n` new sagas, committed.
    pub fn started(&self, n: u64) {
        self.started.inc_by(n);
    }

    /// An order reached `status` (`CONFIRMED` or `CANCELLED` for `reason`)
    /// `created_at` after it was placed; counted once the transaction
    /// that moved it commits.
    pub fn outcome(&self, status: &str, reason: Option<&str>, created_at: &str) {
        let took =
            time::OffsetDateTime::parse(created_at, &time::format_description::well_known::Rfc3339)
                .map(|t| {
                    (time::OffsetDateTime::now_utc() - t)
                        .as_seconds_f64()
                        .max(0.0)
                })
                .ok();
        let (m, confirmed, reason) = (
            self.clone(),
            status == "CONFIRMED",
            reason.unwrap_or("unknown").to_owned(),
        );
        messaging::after_commit(move || {
            if confirmed {
                m.confirmed.inc();
            } else {
                m.cancelled.get_or_create(&Reason { reason }).inc();
            }
            if let Some(took) = took {
                m.to_outcome.observe(took);
            }
        });
    }

    /// Counts the orders in flight per step every few seconds.
    pub fn sample(&self, db: Db, shutdown: &Shutdown) {
        let m = self.clone();
        shutdown.every(SAMPLE_EVERY, "saga in-flight sample", move || {
            let (m, db) = (m.clone(), db.clone());
            async move {
                let rows = sqlx::query(
                    "SELECT saga_step, COUNT(*) AS n FROM orders WHERE status = 'PENDING' GROUP BY saga_step",
                )
                .fetch_all(&db.read)
                .await?;
                for step in [RESERVING, CHARGING] {
                    let n = rows
                        .iter()
                        .find(|r| r.try_get::<String, _>("saga_step").is_ok_and(|s| s == step))
                        .and_then(|r| r.try_get::<i64, _>("n").ok())
                        .unwrap_or(0);
                    m.in_flight.get_or_create(&Step { step }).set(n);
                }
                anyhow::Ok(())
            }
        });
    }
}
