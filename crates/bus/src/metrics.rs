//! What a service's messaging does, for its `/metrics`: messages
//! published (by the outbox relay), consumed, retried and dead-lettered
//! per queue, how long batches take, the outbox's backlog and the
//! duplicates the inbox dropped. Each service holds its own set (see
//! [`crate::Bus::instrumented`]), registered in its own registry.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    pub routing_key: String,
}

type Histograms = Family<QueueLabel, Histogram, fn() -> Histogram>;

fn batch_histogram() -> Histogram {
    // 0.25 ms … ~8 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

/// One service's messaging instruments.
#[derive(Clone, Debug)]
pub struct BusMetrics {
    pub published: Family<KeyLabel, Counter>,
    pub consumed: Family<QueueLabel, Counter>,
    pub retried: Family<QueueLabel, Counter>,
    pub dead_lettered: Family<QueueLabel, Counter>,
    pub batch_seconds: Histograms,
    pub outbox_waiting: Gauge,
    pub outbox_oldest_seconds: Gauge<f64, AtomicU64>,
    pub inbox_duplicates: Counter,
}

impl Default for BusMetrics {
    fn default() -> Self {
        Self {
            published: Family::default(),
            consumed: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            batch_seconds: Family::new_with_constructor(batch_histogram),
            outbox_waiting: Gauge::default(),
            outbox_oldest_seconds: Gauge::default(),
            inbox_duplicates: Counter::default(),
        }
    }
}

impl BusMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "bus_published",
            "Messages the outbox relay published, confirmed by the broker",
            self.published.clone(),
        );
        r.register(
            "bus_consumed",
            "Messages handled and acknowledged",
            self.consumed.clone(),
        );
        r.register(
            "bus_retried",
            "Messages that failed and were scheduled for another attempt",
            self.retried.clone(),
        );
        r.register(
            "bus_dead_lettered",
            "Messages moved to their queue's dead-letter queue",
            self.dead_lettered.clone(),
        );
        r.register(
            "bus_batch_duration_seconds",
            "Time to handle and settle one batch of deliveries",
            self.batch_seconds.clone(),
        );
        r.register(
            "outbox_waiting",
            "Outbox rows not yet published (sampled every 5 s)",
            self.outbox_waiting.clone(),
        );
        r.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest outbox row not yet published (sampled every 5 s)",
            self.outbox_oldest_seconds.clone(),
        );
        r.register(
            "inbox_duplicates_dropped",
            "Redelivered messages the inbox recognised and dropped",
            self.inbox_duplicates.clone(),
        );
    }

    pub(crate) fn queue(&self, family: &Family<QueueLabel, Counter>, queue: &str) {
        family
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .inc();
    }
}
