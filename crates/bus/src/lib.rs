//! Bazaar's message bus: topic publish/subscribe with RabbitMQ-style `*`/`#`
//! bindings, durable queues, manual ack/nack and request/reply.
//!
//! [`Transport`] is the backend trait; [`memory::MemoryTransport`] serves the
//! embedded mode and tests, [`amqp::AmqpTransport`] talks to RabbitMQ through
//! lapin. [`Bus`] adds the envelope and request/reply (one reply consumer per
//! bus, requests matched to replies by correlation id) on top of either.

pub mod amqp;
pub mod bounded;
mod consumer;
mod dlq;
mod envelope;
pub mod memory;
pub mod metrics;
pub mod timeline;
mod topic;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{OnceCell, oneshot};

pub use consumer::{BatchHandler, Consumer, Failure, Received, RetryPolicy};
pub use dlq::{DeadLetter, Redrive, dead_letter_queue};
pub use envelope::Envelope;
pub use metrics::BusMetrics;
pub use topic::topic_matches;

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker could not be reached or refused an operation; a retry may succeed.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker did not confirm a publish.
    #[error("publish was not confirmed by the broker")]
    NotConfirmed,
    /// A command or request that no queue is bound for: its service has
    /// not declared its queue yet (not started, or not on this broker).
    #[error("no queue takes {key:?} on exchange {exchange:?}; is its service running?")]
    Unroutable { exchange: String, key: String },
    /// No reply arrived in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// A message body could not be encoded or decoded.
    #[error("bad message: {0}")]
    Codec(#[from] serde_json::Error),
    /// The delivery has no `reply_to`, so it cannot be answered.
    #[error("the delivery has no reply address")]
    NoReplyTo,
    /// The queue does not exist on the broker.
    #[error("no queue {0:?}")]
    NoQueue(String),
    /// A URL that names no known backend.
    #[error("unknown bus url {0:?}: expected `memory` or `amqp://…`")]
    UnknownUrl(String),
}

impl BusError {
    fn unroutable(exchange: &str, key: &str) -> Self {
        Self::Unroutable {
            exchange: exchange.to_owned(),
            key: key.to_owned(),
        }
    }
}

/// The exchange commands travel on. Unlike an event, a command or a
/// request must reach a queue: publishing one that no queue is bound for
/// fails with [`BusError::Unroutable`] (RabbitMQ's `mandatory` flag)
/// instead of vanishing, so the outbox keeps it and a requester can wait
/// for the service to come up.
pub const COMMAND_EXCHANGE: &str = "command";

/// How often a request that no queue takes is sent again while it waits.
const UNROUTABLE_RETRY: Duration = Duration::from_millis(100);

/// Whether a message must reach a queue: a command, or a request (it has
/// a reply address). Events may go unheard.
pub fn must_route(exchange: &str, msg: &Outgoing) -> bool {
    exchange == COMMAND_EXCHANGE || msg.reply_to.is_some()
}

/// A queue, with the bindings that feed it: `(exchange, pattern)` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub bindings: Vec<(String, String)>,
    /// Delete the queue after it has been unused this long (RabbitMQ's
    /// `x-expires`); `None` keeps it forever. The memory backend keeps
    /// queues for the life of the process either way.
    pub expires_after: Option<Duration>,
}

impl QueueSpec {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bindings: Vec::new(),
            expires_after: None,
        }
    }

    /// Lets the broker delete the queue once unused for `after`.
    pub fn expires_after(mut self, after: Duration) -> Self {
        self.expires_after = Some(after);
        self
    }

    /// Route messages published on `exchange` whose key matches `pattern` here.
    pub fn bind(mut self, exchange: impl Into<String>, pattern: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), pattern.into()));
        self
    }
}

/// Message headers (AMQP headers with string values).
pub type Headers = BTreeMap<String, String>;

/// Header names Bazaar sets on messages.
pub mod header {
    /// W3C trace context of the operation that caused the message.
    pub const TRACEPARENT: &str = "traceparent";
    /// The HTTP request id the message descends from.
    pub const REQUEST_ID: &str = "x-request-id";
    /// The service that published the message (for the service map).
    pub const SOURCE: &str = "x-source";
    /// Which delivery attempt this is (1 for the first).
    pub const ATTEMPT: &str = "x-attempt";
    /// Why the last attempt failed.
    pub const LAST_ERROR: &str = "x-last-error";
    /// Why a message was dead-lettered.
    pub const DEAD_REASON: &str = "x-dead-reason";
    /// The queue a dead letter came from.
    pub const ORIGINAL_QUEUE: &str = "x-original-queue";
    /// The routing key it was first published with.
    pub const ORIGINAL_KEY: &str = "x-original-routing-key";
    /// When it was dead-lettered (RFC 3339).
    pub const DEAD_AT: &str = "x-dead-at";
}

/// An envelope's fields but its payload (which is skipped, not kept).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct EnvelopeHead {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub occurred_at: String,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
}

/// A message as it leaves a publisher.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub headers: Headers,
}

impl Outgoing {
    /// An envelope as a persistent message: its id as the message id, its
    /// trace context and request id as headers.
    pub fn envelope(env: &Envelope) -> Result<Self, BusError> {
        Ok(Self::with_envelope_headers(
            serde_json::to_vec(env)?,
            &env.id,
            env.traceparent.as_deref(),
            env.request_id.as_deref(),
        ))
    }

    /// Like [`Outgoing::envelope`], for an envelope already serialised
    /// (an outbox row): the body is sent as it is, only the fields the
    /// properties need are read.
    pub fn envelope_json(body: Vec<u8>) -> Result<Self, BusError> {
        Self::envelope_json_head(body).map(|(msg, _)| msg)
    }

    /// [`Outgoing::envelope_json`], with the envelope's head (read in the
    /// same pass) for the order timeline.
    pub fn envelope_json_head(body: Vec<u8>) -> Result<(Self, EnvelopeHead), BusError> {
        let head: EnvelopeHead = serde_json::from_slice(&body)?;
        let msg = Self::with_envelope_headers(
            body,
            &head.id,
            head.traceparent.as_deref(),
            head.request_id.as_deref(),
        );
        Ok((msg, head))
    }

    fn with_envelope_headers(
        body: Vec<u8>,
        id: &str,
        traceparent: Option<&str>,
        request_id: Option<&str>,
    ) -> Self {
        let mut headers = Headers::new();
        if let Some(tp) = traceparent {
            headers.insert(header::TRACEPARENT.into(), tp.to_owned());
        }
        if let Some(rid) = request_id {
            headers.insert(header::REQUEST_ID.into(), rid.to_owned());
        }
        Self {
            body,
            message_id: Some(id.to_owned()),
            headers,
            ..Self::default()
        }
    }
}

/// Settles a delivery with the broker. Backends implement it.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&mut self) -> Result<(), BusError>;
    async fn nack(&mut self, requeue: bool) -> Result<(), BusError>;
}

/// A message as a consumer receives it. Settle it with [`Delivery::ack`] or
/// [`Delivery::nack`]; one dropped unsettled is redelivered.
pub struct Delivery {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub headers: Headers,
    pub redelivered: bool,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("routing_key", &self.routing_key)
            .field("message_id", &self.message_id)
            .field("correlation_id", &self.correlation_id)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Decodes the body as an [`Envelope`].
    pub fn envelope(&self) -> Result<Envelope, BusError> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The message as it would be published again (same body, ids, headers).
    pub fn to_outgoing(&self) -> Outgoing {
        Outgoing {
            body: self.body.clone(),
            message_id: self.message_id.clone(),
            correlation_id: self.correlation_id.clone(),
            reply_to: self.reply_to.clone(),
            headers: self.headers.clone(),
        }
    }

    /// The delivery attempt this is, from the `x-attempt` header (1 if absent).
    pub fn attempt(&self) -> u32 {
        self.headers
            .get(header::ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1)
    }

    /// Done with it: the broker forgets the message.
    pub async fn ack(mut self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    /// Failed: back to the queue (`requeue`) or dropped (dead-lettered where the queue has one).
    pub async fn nack(mut self, requeue: bool) -> Result<(), BusError> {
        self.acker.nack(requeue).await
    }
}

/// A stream of deliveries from one queue.
pub type Deliveries = BoxStream<'static, Delivery>;

/// The backend trait: what a broker must do for Bazaar.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Declares a durable queue, its topic exchanges and its bindings. Idempotent.
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), BusError>;
    /// Publishes a persistent message; returns once the broker holds it.
    /// Exchange `""` delivers straight to the queue named by `routing_key`.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        msg: Outgoing,
    ) -> Result<(), BusError>;
    /// Consumes a declared queue with manual acknowledgement, at most
    /// `prefetch` unacknowledged deliveries at a time.
    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Deliveries, BusError>;
    /// Declares this process's private reply queue and consumes it (auto-ack).
    async fn reply_queue(&self) -> Result<(String, Deliveries), BusError>;
    /// Takes up to `max` messages waiting in `queue` without a consumer.
    /// Each is held unsettled: ack what you took, drop or nack the rest
    /// and they go back to the queue.
    async fn browse(&self, queue: &str, max: usize) -> Result<Vec<Delivery>, BusError>;
    /// Delivers `msg` straight to `queue` once `delay` has passed. On
    /// RabbitMQ the waiting message is durable (a TTL queue that
    /// dead-letters into `queue`).
    async fn publish_delayed(
        &self,
        queue: &str,
        msg: Outgoing,
        delay: Duration,
    ) -> Result<(), BusError>;
    /// How many messages wait in `queue` and how many consumers it has.
    /// A queue that does not exist is [`BusError::NoQueue`].
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError>;
    /// Whether the broker is usable right now (for `/ready`).
    fn is_connected(&self) -> bool;
}

/// A queue as the broker sees it now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct QueueStats {
    /// Messages ready for delivery (not those delivered and unsettled).
    pub messages: u64,
    pub consumers: u64,
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>;

/// The bus a service holds: envelopes, publish, subscribe, request/reply.
#[derive(Clone)]
pub struct Bus {
    transport: Arc<dyn Transport>,
    pending: Pending,
    reply_to: Arc<OnceCell<String>>,
    metrics: Arc<BusMetrics>,
    /// The service this handle belongs to, for its spans.
    service: &'static str,
}

impl Bus {
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self {
            transport,
            pending: Arc::default(),
            reply_to: Arc::new(OnceCell::new()),
            metrics: Arc::default(),
            service: "",
        }
    }

    /// The same bus as `service`'s, counting into instruments of its
    /// own: services sharing a bus (the embedded mode) each report their
    /// own messaging, and name themselves in their messages' spans.
    #[must_use]
    pub fn instrumented(&self, service: &'static str) -> Self {
        Self {
            metrics: Arc::default(),
            service,
            ..self.clone()
        }
    }

    /// The service this handle belongs to (empty if none was named).
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// This handle's messaging instruments.
    pub fn metrics(&self) -> &BusMetrics {
        &self.metrics
    }

    /// An in-memory bus (embedded mode, tests).
    pub fn memory() -> Self {
        Self::new(Arc::new(memory::MemoryTransport::default()))
    }

    /// Connects to the backend a URL names: `memory` or `amqp://…`.
    /// While RabbitMQ is unreachable, publishing waits up to 30 s for the
    /// connection to come back; see [`Bus::connect_with`].
    pub async fn connect(url: &str) -> Result<Self, BusError> {
        Self::connect_with(url, Duration::from_secs(30)).await
    }

    /// Like [`Bus::connect`], with how long a publish may wait for a lost
    /// broker connection to be re-established before it fails.
    pub async fn connect_with(url: &str, publish_wait: Duration) -> Result<Self, BusError> {
        if url == "memory" {
            Ok(Self::memory())
        } else if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(Self::new(Arc::new(
                amqp::AmqpTransport::connect(url, publish_wait).await?,
            )))
        } else {
            Err(BusError::UnknownUrl(url.to_owned()))
        }
    }

    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    pub fn is_connected(&self) -> bool {
        self.transport.is_connected()
    }

    /// Publishes an envelope on a topic exchange.
    pub async fn publish(&self, exchange: &str, key: &str, env: &Envelope) -> Result<(), BusError> {
        self.transport
            .publish(exchange, key, Outgoing::envelope(env)?)
            .await
    }

    /// How many messages wait in `queue` and how many consumers take them.
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError> {
        self.transport.queue_stats(queue).await
    }

    /// Declares a queue with its bindings, and its dead-letter queue.
    pub async fn declare(&self, spec: &QueueSpec) -> Result<(), BusError> {
        self.transport.declare_queue(spec).await?;
        let dlq = QueueSpec {
            expires_after: spec.expires_after,
            ..QueueSpec::new(dead_letter_queue(&spec.name))
        };
        self.transport.declare_queue(&dlq).await
    }

    /// Declares a queue with its bindings and consumes it.
    pub async fn subscribe(&self, spec: &QueueSpec, prefetch: u16) -> Result<Deliveries, BusError> {
        self.declare(spec).await?;
        self.transport.consume(&spec.name, prefetch).await
    }

    /// Sends a request and waits for its reply. All requests of this bus
    /// share one reply queue; each waits on its own correlation id.
    pub async fn request(
        &self,
        exchange: &str,
        key: &str,
        env: &Envelope,
        timeout: Duration,
    ) -> Result<Envelope, BusError> {
        let reply_to = self
            .reply_to
            .get_or_try_init(|| self.start_reply_consumer())
            .await?;
        let correlation_id = uuid::Uuid::now_v7().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(correlation_id.clone(), tx);
        let msg = Outgoing {
            correlation_id: Some(correlation_id.clone()),
            reply_to: Some(reply_to.clone()),
            ..Outgoing::envelope(env)?
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let outcome = async {
            // A service that has not declared its queue yet may be starting:
            // ask again until the deadline rather than fail at once.
            loop {
                match self.transport.publish(exchange, key, msg.clone()).await {
                    Err(BusError::Unroutable { .. })
                        if tokio::time::Instant::now() + UNROUTABLE_RETRY < deadline =>
                    {
                        tokio::time::sleep(UNROUTABLE_RETRY).await;
                    }
                    sent => break sent,
                }
            }?;
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                // The sender went away: the reply consumer stopped.
                Ok(Err(_)) => Err(BusError::Unavailable("reply consumer stopped".into())),
                Err(_) => Err(BusError::Timeout(timeout)),
            }
        }
        .await;
        lock(&self.pending).remove(&correlation_id);
        outcome
    }

    /// Answers a request delivery on its `reply_to` queue.
    pub async fn reply(&self, to: &Delivery, env: &Envelope) -> Result<(), BusError> {
        let reply_to = to.reply_to.as_deref().ok_or(BusError::NoReplyTo)?;
        self.reply_to(reply_to, to.correlation_id.clone(), env)
            .await
    }

    /// Sends a reply to queue `reply_to`, matched by `correlation_id`.
    pub async fn reply_to(
        &self,
        reply_to: &str,
        correlation_id: Option<String>,
        env: &Envelope,
    ) -> Result<(), BusError> {
        let msg = Outgoing {
            correlation_id,
            ..Outgoing::envelope(env)?
        };
        self.transport.publish("", reply_to, msg).await
    }

    async fn start_reply_consumer(&self) -> Result<String, BusError> {
        let (name, mut replies) = self.transport.reply_queue().await?;
        let pending = Arc::clone(&self.pending);
        tokio::spawn(async move {
            while let Some(delivery) = replies.next().await {
                let Some(id) = delivery.correlation_id.as_deref() else {
                    tracing::warn!("reply without correlation id dropped");
                    continue;
                };
                let waiter = lock(&pending).remove(id);
                match (waiter, delivery.envelope()) {
                    (Some(tx), Ok(env)) => {
                        let _ = tx.send(env);
                    }
                    (None, _) => tracing::debug!(correlation_id = id, "late reply dropped"),
                    (Some(_), Err(e)) => tracing::warn!(error = %e, "unparseable reply dropped"),
                }
            }
            tracing::warn!("reply consumer ended");
        });
        Ok(name)
    }
}

/// Locks a std mutex, recovering from poisoning: the maps it guards stay
/// consistent because no code panics while holding them.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
