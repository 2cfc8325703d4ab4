//! The reliable consumer: takes deliveries in batches, hands them to a
//! handler, and settles each by its outcome. A failed message is retried
//! with exponential backoff (a delayed re-publish to the same queue); after
//! the last attempt, or at once when it cannot be parsed or the handler
//! rejects it, it goes to the queue's dead-letter queue. Nothing is acked
//! before it is handled, retried or dead-lettered, so nothing is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use crate::{Bus, BusError, Delivery, Envelope, Headers, QueueSpec, dead_letter_queue, header};

/// How often and how patiently a failed message is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; then the dead-letter queue.
    pub max_attempts: u32,
    /// The wait before the second attempt; it doubles for each further one.
    pub first_delay: Duration,
    /// The longest wait between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Why a handler did not take a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Something transient (a database error, a provider timeout): try again later.
    Retry(String),
    /// The message can never succeed: straight to the dead-letter queue.
    Reject(String),
}

/// A parsed delivery, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub envelope: Envelope,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub headers: Headers,
    /// 1 for the first delivery attempt.
    pub attempt: u32,
}

impl Received {
    /// `envelope` at its first delivery, with no properties or headers
    /// (as a test hands it to a handler).
    pub fn first(envelope: Envelope) -> Self {
        Self {
            envelope,
            correlation_id: None,
            reply_to: None,
            headers: Headers::default(),
            attempt: 1,
        }
    }
}

/// Handles messages a batch at a time, typically in one database
/// transaction. Returns one outcome per message, in order.
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    async fn handle(&self, batch: &[Received]) -> Vec<Result<(), Failure>>;
}

/// A consumer of one queue: batch size, concurrency and retry policy.
#[derive(Clone)]
pub struct Consumer {
    bus: Bus,
    spec: QueueSpec,
    pub prefetch: u16,
    pub batch: usize,
    pub concurrency: usize,
    pub policy: RetryPolicy,
    /// How long a batch waits, once its first message is in, for more.
    pub linger: Duration,
}

impl Consumer {
    pub fn new(bus: Bus, spec: QueueSpec) -> Self {
        Self {
            bus,
            spec,
            prefetch: 256,
            batch: 64,
            concurrency: 4,
            policy: RetryPolicy::default(),
            linger: Duration::ZERO,
        }
    }

    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Batches of at most `batch` messages, `concurrency` batches at once,
    /// `prefetch` unsettled deliveries in all.
    pub fn with_limits(mut self, prefetch: u16, batch: usize, concurrency: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self.batch = batch.max(1);
        self.concurrency = concurrency.max(1);
        self
    }

    /// Once a batch has its first message, waits up to `linger` for more
    /// (until the batch is full), so that they are handled together:
    /// fewer, larger transactions for that much latency. Zero (the
    /// default): a batch is whatever has arrived.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Declares the queue (and its dead-letter queue) and starts consuming;
    /// returns a future that handles messages until `stop` resolves and the
    /// batches in hand are settled.
    pub async fn start<H, S>(
        self,
        handler: Arc<H>,
        stop: S,
    ) -> Result<impl Future<Output = ()> + Send + 'static, BusError>
    where
        H: BatchHandler + ?Sized,
        S: Future<Output = ()> + Send + 'static,
    {
        let deliveries = self.bus.subscribe(&self.spec, self.prefetch).await?;
        Ok(async move {
            let this = &self;
            let deliveries = deliveries.take_until(stop);
            let chunks = if this.linger.is_zero() {
                deliveries.ready_chunks(this.batch).boxed()
            } else {
                lingering_chunks(deliveries.boxed(), this.batch, this.linger)
            };
            chunks
                .for_each_concurrent(self.concurrency, |chunk| {
                    let handler = Arc::clone(&handler);
                    async move { this.process(&*handler, chunk).await }
                })
                .await;
            tracing::debug!(queue = %self.spec.name, "consumer stopped");
        })
    }

    async fn process<H: BatchHandler + ?Sized>(&self, handler: &H, chunk: Vec<Delivery>) {
        let mut parsed = Vec::with_capacity(chunk.len());
        let mut received = Vec::with_capacity(chunk.len());
        for delivery in chunk {
            match delivery.envelope() {
                Ok(envelope) => {
                    received.push(Received {
                        envelope,
                        correlation_id: delivery.correlation_id.clone(),
                        reply_to: delivery.reply_to.clone(),
                        headers: delivery.headers.clone(),
                        attempt: delivery.attempt(),
                    });
                    parsed.push(delivery);
                }
                Err(e) => {
                    let reason = format!("unparseable message: {e}");
                    tracing::warn!(queue = %self.spec.name, %reason, "dead-lettering");
                    self.dead_letter(delivery, &reason).await;
                }
            }
        }
        if received.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let metrics = self.bus.metrics();
        let service = self.bus.service();
        let queue = Some(self.spec.name.as_str());
        for r in &received {
            crate::timeline::message(
                service,
                "delivered",
                &r.envelope,
                queue,
                Some(r.attempt),
                None,
            );
        }
        let outcomes = handler.handle(&received).await;
        let mut outcomes = outcomes.into_iter();
        // The batch's acks go out together: each waits on the connection's
        // writer, and one after another they would take a round of hand-offs each.
        let mut acks = Vec::with_capacity(received.len());
        for (delivery, r) in parsed.into_iter().zip(&received) {
            let outcome = outcomes
                .next()
                .unwrap_or_else(|| Err(Failure::Retry("the handler gave no outcome".into())));
            let (what, detail) = match &outcome {
                Ok(()) => ("handled", None),
                Err(Failure::Retry(why)) if r.attempt < self.policy.max_attempts => {
                    ("retried", Some(why.as_str()))
                }
                Err(Failure::Retry(why) | Failure::Reject(why)) => {
                    ("dead_lettered", Some(why.as_str()))
                }
            };
            crate::timeline::message(service, what, &r.envelope, queue, Some(r.attempt), detail);
            match outcome {
                Ok(()) => {
                    metrics.queue(&metrics.consumed, &self.spec.name);
                    acks.push(delivery.ack());
                }
                Err(Failure::Retry(reason)) => self.retry(delivery, &reason).await,
                Err(Failure::Reject(reason)) => {
                    tracing::warn!(queue = %self.spec.name, %reason, "message rejected; dead-lettering");
                    self.dead_letter(delivery, &reason).await;
                }
            }
        }
        for acked in futures::future::join_all(acks).await {
            if let Err(e) = acked {
                // The effects are committed; the redelivery is dropped by the inbox.
                tracing::warn!(error = %e, "ack failed");
            }
        }
        metrics
            .batch_seconds
            .get_or_create(&crate::metrics::QueueLabel {
                queue: self.spec.name.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Schedules another attempt, or dead-letters after the last one.
    async fn retry(&self, delivery: Delivery, reason: &str) {
        let attempt = delivery.attempt();
        if attempt >= self.policy.max_attempts {
            let reason = format!("failed {attempt} times; last error: {reason}");
            tracing::warn!(queue = %self.spec.name, %reason, "dead-lettering");
            self.dead_letter(delivery, &reason).await;
            return;
        }
        let delay = self.policy.delay(attempt);
        tracing::info!(queue = %self.spec.name, attempt, ?delay, %reason, "retrying later");
        let mut msg = delivery.to_outgoing();
        msg.headers
            .insert(header::ATTEMPT.into(), (attempt + 1).to_string());
        msg.headers.insert(header::LAST_ERROR.into(), reason.into());
        msg.headers
            .entry(header::ORIGINAL_KEY.into())
            .or_insert_with(|| delivery.routing_key.clone());
        let sent = self
            .bus
            .transport()
            .publish_delayed(&self.spec.name, msg, delay)
            .await;
        if sent.is_ok() {
            let metrics = self.bus.metrics();
            metrics.queue(&metrics.retried, &self.spec.name);
        }
        settle_after(delivery, sent).await;
    }

    async fn dead_letter(&self, delivery: Delivery, reason: &str) {
        let mut msg = delivery.to_outgoing();
        msg.headers
            .insert(header::DEAD_REASON.into(), reason.into());
        msg.headers
            .insert(header::ORIGINAL_QUEUE.into(), self.spec.name.clone());
        msg.headers
            .entry(header::ORIGINAL_KEY.into())
            .or_insert_with(|| delivery.routing_key.clone());
        msg.headers
            .insert(header::DEAD_AT.into(), crate::envelope::now_rfc3339());
        let sent = self
            .bus
            .transport()
            .publish("", &dead_letter_queue(&self.spec.name), msg)
            .await;
        if sent.is_ok() {
            let metrics = self.bus.metrics();
            metrics.queue(&metrics.dead_lettered, &self.spec.name);
        }
        settle_after(delivery, sent).await;
    }
}

/// Batches of up to `max` items: each waits, from its first item, up to
/// `linger` for the rest, and takes what is ready then.
fn lingering_chunks<T: Send + 'static>(
    items: futures::stream::BoxStream<'static, T>,
    max: usize,
    linger: Duration,
) -> futures::stream::BoxStream<'static, Vec<T>> {
    // (Fused: a batch cut short by the end of the stream is handed out
    // first, and the stream is asked again after it ended.)
    futures::stream::unfold(items.fuse(), move |mut items| async move {
        let first = items.next().await?;
        let mut chunk = vec![first];
        let until = tokio::time::Instant::now() + linger;
        while chunk.len() < max {
            // (Past `until`, what is ready is still taken.)
            match tokio::time::timeout_at(until, items.next()).await {
                Ok(Some(item)) => chunk.push(item),
                Ok(None) | Err(_) => break,
            }
        }
        Some((chunk, items))
    })
    .boxed()
}

/// Acks a delivery once its copy is safely elsewhere; else puts it back.
async fn settle_after(delivery: Delivery, sent: Result<(), BusError>) {
    let settled = match sent {
        Ok(()) => delivery.ack().await,
        Err(e) => {
            tracing::warn!(error = %e, "could not move the message on; requeueing");
            delivery.nack(true).await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "settling a delivery failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lingering_batch_waits_for_more_but_not_past_its_linger_or_size() {
        use futures::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let items =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
                .boxed();
        let mut chunks = super::lingering_chunks(items, 3, Duration::from_millis(150));
        let sender = tokio::spawn(async move {
            tx.send(1).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(2).unwrap();
            // Past the first batch's linger: a batch of its own.
            tokio::time::sleep(Duration::from_millis(400)).await;
            tx.send(3).unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
            // More than a batch at once: full batches go without waiting.
            for i in 4..=8 {
                tx.send(i).unwrap();
            }
        });
        let started = tokio::time::Instant::now();
        assert_eq!(chunks.next().await, Some(vec![1, 2]));
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "it lingered"
        );
        assert_eq!(chunks.next().await, Some(vec![3]));
        // (By now 4 to 8 are in.)
        tokio::time::sleep(Duration::from_millis(400)).await;
        let full = tokio::time::Instant::now();
        assert_eq!(chunks.next().await, Some(vec![4, 5, 6]));
        assert!(
            full.elapsed() < Duration::from_millis(140),
            "a full batch does not wait"
        );
        assert_eq!(chunks.next().await, Some(vec![7, 8]));
        sender.await.unwrap();
        assert_eq!(chunks.next().await, None, "ends with its stream");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(4), Duration::from_millis(800));
        assert_eq!(p.delay(5), Duration::from_secs(1));
        assert_eq!(p.delay(60), Duration::from_secs(1));
    }
}
