//! The RabbitMQ backend, through lapin: durable topic exchanges and queues,
//! persistent messages, publisher confirms, manual acks with a prefetch limit.
//!
//! The connection is supervised: when it drops, a background task
//! reconnects with exponential backoff, declares every exchange, queue and
//! binding declared so far again, and publishes the new link. Consumers
//! resubscribe on each new link; a publish waits for the link (up to the
//! publish wait) instead of failing while the broker restarts. Deliveries
//! in hand when the link dropped cannot be acked any more: the broker
//! redelivers them and the consumers' inboxes drop the duplicates.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event, ExchangeKind,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::{
    Acker, BusError, Deliveries, Delivery, Headers, Outgoing, QueueSpec, QueueStats, Transport,
    lock,
};

impl From<lapin::Error> for BusError {
    fn from(e: lapin::Error) -> Self {
        BusError::Unavailable(e.to_string())
    }
}

/// One live connection with its confirming publish channel.
#[derive(Clone)]
struct Link {
    conn: Arc<Connection>,
    publisher: Channel,
    generation: u64,
}

struct Inner {
    url: String,
    publish_wait: Duration,
    link: watch::Sender<Option<Link>>,
    /// Everything declared so far, declared again on each new link.
    exchanges: Mutex<HashSet<String>>,
    queues: Mutex<Vec<QueueSpec>>,
    /// Delay queue name → what it was declared with.
    delays: Mutex<HashMap<String, DelayQueue>>,
    /// Poked when an operation failed in a way that may mean a dead link.
    suspect: Notify,
}

/// Largest AMQP frame this client asks for, unless the URL sets
/// `frame_max`. lapin keeps a send and a receive buffer of 32 frames
/// each, zeroed when the connection opens: at RabbitMQ's default 128 KiB
/// frames that is 8 MiB a connection, most of an idle service's own
/// memory. Our messages are a few KiB; a larger one goes out in several
/// frames.
const FRAME_MAX: u32 = 16 * 1024;

/// How long one connection attempt (handshake and re-declarations) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one publish waits for the broker's confirm before it is sent
/// again (on a new connection, if this one is failing). A confirm lost
/// with its connection must not leave the publisher waiting forever.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an ack or nack may take to go out; past it the delivery is
/// left unsettled, and the broker delivers it again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A queue where retried messages wait before going back to `target`.
#[derive(Clone)]
struct DelayQueue {
    target: String,
    ttl_ms: i64,
    expires: Option<Duration>,
}

/// A supervised connection to RabbitMQ.
pub struct AmqpTransport {
    inner: Arc<Inner>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Drop for AmqpTransport {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

impl AmqpTransport {
    /// Connects (the first connection must succeed, so a wrong URL fails
    /// at start) and starts the supervisor that keeps it connected.
    pub async fn connect(url: &str, publish_wait: Duration) -> Result<Self, BusError> {
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            publish_wait,
            link: watch::Sender::new(None),
            exchanges: Mutex::default(),
            queues: Mutex::default(),
            delays: Mutex::default(),
            suspect: Notify::new(),
        });
        let link = open_link(&inner, 1).await?;
        inner.link.send_replace(Some(link.clone()));
        let supervisor = tokio::spawn(supervise(Arc::clone(&inner), link));
        Ok(Self { inner, supervisor })
    }

    /// The current link, waiting up to the publish wait for one.
    async fn link(&self) -> Result<Link, BusError> {
        let mut rx = self.inner.link.subscribe();
        match tokio::time::timeout(self.inner.publish_wait, next_link(&mut rx)).await {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(BusError::Unavailable("the transport is closed".into())),
            Err(_) => Err(BusError::Unavailable(format!(
                "no connection to RabbitMQ within {:?}",
                self.inner.publish_wait
            ))),
        }
    }

    async fn spawn_consumer(
        &self,
        queue: String,
        prefetch: u16,
        reply: bool,
    ) -> Result<Deliveries, BusError> {
        let (tx, rx) = mpsc::channel(usize::from(prefetch.clamp(1, 1024)));
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(consume_loop(
            Arc::clone(&self.inner),
            queue,
            prefetch,
            reply,
            tx,
            ready_tx,
        ));
        ready_rx
            .await
            .map_err(|_| BusError::Unavailable("consumer task ended".into()))??;
        Ok(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) })
                .boxed(),
        )
    }
}

async fn next_link(rx: &mut watch::Receiver<Option<Link>>) -> Option<Link> {
    let link = rx.wait_for(Option::is_some).await.ok()?;
    link.clone()
}

/// Opens a connection and publish channel and declares everything known.
async fn open_link(inner: &Inner, generation: u64) -> Result<Link, BusError> {
    let props = ConnectionProperties::default().with_connection_name("bazaar".into());
    let mut uri: lapin::uri::AMQPUri = inner
        .url
        .parse()
        .map_err(|e| BusError::Unavailable(format!("the AMQP URL does not parse: {e}")))?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let conn = Connection::connect_uri(uri, props).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let exchanges: Vec<String> = lock(&inner.exchanges).iter().cloned().collect();
    for ex in exchanges {
        declare_exchange(&publisher, &ex).await?;
    }
    let queues: Vec<QueueSpec> = lock(&inner.queues).clone();
    for spec in &queues {
        declare_on(&publisher, spec).await?;
    }
    let delays: Vec<(String, DelayQueue)> = lock(&inner.delays)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (name, d) in &delays {
        declare_delay(&publisher, name, &d.target, d.ttl_ms, d.expires).await?;
    }
    Ok(Link {
        conn: Arc::new(conn),
        publisher,
        generation,
    })
}

/// Keeps the transport connected for as long as it lives.
async fn supervise(inner: Arc<Inner>, mut link: Link) {
    loop {
        wait_until_broken(&inner, &link).await;
        inner.link.send_replace(None);
        tracing::warn!("lost the RabbitMQ connection; reconnecting");
        let close = link.conn.close(200, "reconnecting".into());
        let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        let generation = link.generation + 1;
        let mut backoff = Duration::from_millis(100);
        link = loop {
            // A broker that is still booting can accept the socket and then
            // stall the handshake; give up on such an attempt and retry.
            let attempt =
                tokio::time::timeout(CONNECT_TIMEOUT, open_link(&inner, generation)).await;
            match attempt.unwrap_or_else(|_| Err(BusError::Unavailable("connect timed out".into())))
            {
                Ok(link) => break link,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "RabbitMQ reconnect failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        tracing::info!(generation, "reconnected to RabbitMQ");
        inner.link.send_replace(Some(link.clone()));
    }
}

async fn wait_until_broken(inner: &Inner, link: &Link) {
    let broken = || !link.conn.status().connected() || !link.publisher.status().connected();
    let mut events = link.conn.events_listener().boxed();
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Event::Error(e)) => {
                    tracing::warn!(error = %e, "RabbitMQ connection error");
                    return;
                }
                None => return,
                Some(_) => {}
            },
            () = inner.suspect.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if broken() {
            return;
        }
    }
}

/// Consumes `queue` across reconnects, forwarding deliveries to `tx`
/// until the receiving stream is dropped. The first subscription's outcome
/// is reported on `ready`.
async fn consume_loop(
    inner: Arc<Inner>,
    queue: String,
    prefetch: u16,
    reply: bool,
    tx: mpsc::Sender<Delivery>,
    ready: oneshot::Sender<Result<(), BusError>>,
) {
    let mut links = inner.link.subscribe();
    let mut ready = Some(ready);
    loop {
        let link = tokio::select! {
            link = next_link(&mut links) => match link {
                Some(link) => link,
                None => return,
            },
            () = tx.closed() => return,
        };
        match subscribe(&link, &queue, prefetch, reply).await {
            Ok((channel, consumer)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
                forward(channel, consumer, &tx, reply).await;
                if tx.is_closed() {
                    return;
                }
            }
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                    return;
                }
                tracing::warn!(queue = %queue, error = %e, "resubscribing failed");
                inner.suspect.notify_one();
            }
        }
        // Wait for a new link, or retry on this one after a pause.
        let generation = link.generation;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            links.wait_for(|l| l.as_ref().is_some_and(|l| l.generation != generation)),
        )
        .await;
    }
}

async fn subscribe(
    link: &Link,
    queue: &str,
    prefetch: u16,
    reply: bool,
) -> Result<(Channel, lapin::Consumer), BusError> {
    let channel = link.conn.create_channel().await?;
    let mut opts = BasicConsumeOptions::default();
    if reply {
        // The reply queue lives and dies with the connection; it keeps its
        // name across reconnects so requesters need not know.
        let declare = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.into(), declare, FieldTable::default())
            .await?;
        opts.no_ack = true;
    } else {
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
    }
    let consumer = channel
        .basic_consume(queue.into(), "".into(), opts, FieldTable::default())
        .await?;
    Ok((channel, consumer))
}

async fn forward(
    channel: Channel,
    mut consumer: lapin::Consumer,
    tx: &mpsc::Sender<Delivery>,
    auto_ack: bool,
) {
    loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(d)) => {
                    let delivery = to_delivery(d, &channel, auto_ack);
                    if tx.send(delivery).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "amqp consumer error");
                    return;
                }
                None => return,
            },
            () = tx.closed() => return,
        }
    }
}

fn to_delivery(d: lapin::message::Delivery, channel: &Channel, auto_ack: bool) -> Delivery {
    let acker: Box<dyn Acker> = if auto_ack {
        Box::new(Settled)
    } else {
        Box::new(AmqpAcker {
            acker: Some(d.acker.clone()),
            _channel: channel.clone(),
        })
    };
    let mut headers = Headers::new();
    if let Some(table) = d.properties.headers() {
        for (k, v) in table.inner() {
            let value = match v {
                AMQPValue::LongString(s) => s.to_string(),
                AMQPValue::ShortString(s) => s.to_string(),
                _ => continue,
            };
            headers.insert(k.to_string(), value);
        }
    }
    Delivery {
        routing_key: d.routing_key.to_string(),
        message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
        correlation_id: d
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string()),
        reply_to: d.properties.reply_to().as_ref().map(|s| s.to_string()),
        headers,
        redelivered: d.redelivered,
        body: d.data,
        acker,
    }
}

async fn declare_exchange(channel: &Channel, name: &str) -> Result<(), BusError> {
    let opts = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            opts,
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

async fn declare_on(channel: &Channel, spec: &QueueSpec) -> Result<(), BusError> {
    let mut args = FieldTable::default();
    if let Some(after) = spec.expires_after {
        let ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX).max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    channel
        .queue_declare(spec.name.as_str().into(), durable(), args)
        .await?;
    for (exchange, pattern) in &spec.bindings {
        declare_exchange(channel, exchange).await?;
        channel
            .queue_bind(
                spec.name.as_str().into(),
                exchange.as_str().into(),
                pattern.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// A durable queue where messages wait `ms` and then dead-letter into `target`.
async fn declare_delay(
    channel: &Channel,
    name: &str,
    target: &str,
    ms: i64,
    expires: Option<Duration>,
) -> Result<(), BusError> {
    let mut args = FieldTable::default();
    if let Some(after) = expires {
        let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(after.max(ms * 10)),
        );
    }
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(target.into()),
    );
    channel.queue_declare(name.into(), durable(), args).await?;
    Ok(())
}

impl AmqpTransport {
    async fn publish_once(
        &self,
        link: &Link,
        exchange: &str,
        routing_key: &str,
        msg: &Outgoing,
    ) -> Result<(), BusError> {
        if !exchange.is_empty() && !lock(&self.inner.exchanges).contains(exchange) {
            declare_exchange(&link.publisher, exchange).await?;
            lock(&self.inner.exchanges).insert(exchange.to_owned());
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = &msg.message_id {
            props = props.with_message_id(id.as_str().into());
        }
        if let Some(id) = &msg.correlation_id {
            props = props.with_correlation_id(id.as_str().into());
        }
        if let Some(to) = &msg.reply_to {
            props = props.with_reply_to(to.as_str().into());
        }
        if !msg.headers.is_empty() {
            let mut table = FieldTable::default();
            for (k, v) in &msg.headers {
                table.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
            }
            props = props.with_headers(table);
        }
        let sent = async {
            let confirm = link
                .publisher
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: crate::must_route(exchange, msg),
                        ..BasicPublishOptions::default()
                    },
                    &msg.body,
                    props,
                )
                .await?
                .await?;
            Ok::<_, BusError>(confirm)
        };
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, sent)
            .await
            .map_err(|_| BusError::Unavailable("no publisher confirm in time".into()))??;
        match confirm {
            Confirmation::Nack(_) => Err(BusError::NotConfirmed),
            // Acked with the message handed back: no queue took it.
            Confirmation::Ack(Some(_)) => Err(BusError::unroutable(exchange, routing_key)),
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        }
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), BusError> {
        let link = self.link().await?;
        declare_on(&link.publisher, spec).await?;
        for (exchange, _) in &spec.bindings {
            lock(&self.inner.exchanges).insert(exchange.clone());
        }
        let mut queues = lock(&self.inner.queues);
        if !queues.contains(spec) {
            queues.push(spec.clone());
        }
        Ok(())
    }

    /// Publishes and waits for the broker's confirm. While the connection
    /// is down the publish waits for the next one (up to the publish wait)
    /// and is sent again; a message may so arrive twice, never not at all.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        msg: Outgoing,
    ) -> Result<(), BusError> {
        let deadline = Instant::now() + self.inner.publish_wait;
        loop {
            let link = tokio::time::timeout_at(deadline, self.link())
                .await
                .map_err(|_| BusError::Unavailable("no connection to RabbitMQ".into()))??;
            let error = match self.publish_once(&link, exchange, routing_key, &msg).await {
                Ok(()) => return Ok(()),
                Err(e @ (BusError::NotConfirmed | BusError::Unroutable { .. })) => return Err(e),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(error);
            }
            tracing::debug!(error = %error, "publish failed; waiting for the connection");
            self.inner.suspect.notify_one();
            let mut rx = self.inner.link.subscribe();
            let generation = link.generation;
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                rx.wait_for(|l| l.as_ref().is_some_and(|l| l.generation != generation)),
            )
            .await;
        }
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Deliveries, BusError> {
        self.spawn_consumer(queue.to_owned(), prefetch, false).await
    }

    async fn reply_queue(&self) -> Result<(String, Deliveries), BusError> {
        let name = format!("reply.{}", uuid::Uuid::now_v7());
        let deliveries = self.spawn_consumer(name.clone(), 0, true).await?;
        Ok((name, deliveries))
    }

    async fn browse(&self, queue: &str, max: usize) -> Result<Vec<Delivery>, BusError> {
        let link = self.link().await?;
        let channel = link.conn.create_channel().await?;
        let mut out = Vec::new();
        while out.len() < max {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await?;
            let Some(got) = got else { break };
            out.push(to_delivery(got.delivery, &channel, false));
        }
        Ok(out)
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError> {
        let link = self.link().await?;
        // Its own channel: a passive declare of a missing queue closes it.
        let channel = link.conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await;
        match declared {
            Ok(q) => {
                let _ = channel.close(200, "".into()).await;
                Ok(QueueStats {
                    messages: u64::from(q.message_count()),
                    consumers: u64::from(q.consumer_count()),
                })
            }
            Err(e) if e.to_string().contains("NOT_FOUND") => {
                Err(BusError::NoQueue(queue.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        msg: Outgoing,
        delay: Duration,
    ) -> Result<(), BusError> {
        let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX).max(1);
        let name = format!("{queue}.delay.{ms}");
        if !lock(&self.inner.delays).contains_key(&name) {
            // A test queue that expires takes its delay queue with it.
            let expires = lock(&self.inner.queues)
                .iter()
                .find(|q| q.name == queue)
                .and_then(|q| q.expires_after);
            let link = self.link().await?;
            declare_delay(&link.publisher, &name, queue, ms, expires).await?;
            let declared = DelayQueue {
                target: queue.to_owned(),
                ttl_ms: ms,
                expires,
            };
            lock(&self.inner.delays).insert(name.clone(), declared);
        }
        self.publish("", &name, msg).await
    }

    fn is_connected(&self) -> bool {
        self.inner
            .link
            .borrow()
            .as_ref()
            .is_some_and(|l| l.conn.status().connected())
    }
}

/// Acks or nacks on the delivery's channel (kept open until then); one
/// dropped unsettled is nacked back to its queue.
struct AmqpAcker {
    acker: Option<lapin::Acker>,
    _channel: Channel,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&mut self) -> Result<(), BusError> {
        if let Some(a) = self.acker.take() {
            settle(a.ack(BasicAckOptions::default())).await?;
        }
        Ok(())
    }

    async fn nack(&mut self, requeue: bool) -> Result<(), BusError> {
        if let Some(a) = self.acker.take() {
            settle(a.nack(BasicNackOptions {
                requeue,
                ..BasicNackOptions::default()
            }))
            .await?;
        }
        Ok(())
    }
}

/// An ack or nack, bounded by [`SETTLE_TIMEOUT`].
async fn settle<T>(sent: impl Future<Output = Result<T, lapin::Error>>) -> Result<(), BusError> {
    match tokio::time::timeout(SETTLE_TIMEOUT, sent).await {
        Ok(done) => done.map(drop).map_err(BusError::from),
        Err(_) => Err(BusError::Unavailable(
            "the broker did not take the ack in time; the delivery will come again".into(),
        )),
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if let (Some(a), Ok(rt)) = (self.acker.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = a
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            });
        }
    }
}

/// Deliveries that need no settling (auto-ack consumers).
struct Settled;

#[async_trait]
impl Acker for Settled {
    async fn ack(&mut self) -> Result<(), BusError> {
        Ok(())
    }

    async fn nack(&mut self, _requeue: bool) -> Result<(), BusError> {
        Ok(())
    }
}
