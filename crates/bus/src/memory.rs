//! The in-memory backend: the same semantics as RabbitMQ within one process.
//! Queues outlive their consumers, a nacked or dropped delivery goes back to
//! its queue, and competing consumers share a queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::{
    Acker, BusError, Deliveries, Delivery, Outgoing, QueueSpec, QueueStats, Transport,
    topic_matches,
};

#[derive(Clone)]
struct Stored {
    routing_key: String,
    msg: Outgoing,
    redelivered: bool,
}

struct MemQueue {
    tx: mpsc::UnboundedSender<Stored>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Stored>>,
    /// Messages sent and not yet taken.
    waiting: AtomicU64,
    /// Consumer streams alive.
    consumers: AtomicU64,
}

impl MemQueue {
    fn new() -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            waiting: AtomicU64::new(0),
            consumers: AtomicU64::new(0),
        })
    }

    fn put(&self, stored: Stored) {
        // Counted before it can be taken.
        self.waiting.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(stored).is_err() {
            self.taken();
        }
    }

    fn taken(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a consumer stream of a queue while it lives.
struct Consuming(Arc<MemQueue>);

impl Consuming {
    fn new(q: Arc<MemQueue>) -> Self {
        q.consumers.fetch_add(1, Ordering::Relaxed);
        Self(q)
    }
}

impl Drop for Consuming {
    fn drop(&mut self) {
        self.0.consumers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The in-memory transport. Cheap to clone; clones share the broker.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    queues: Arc<RwLock<HashMap<String, Arc<MemQueue>>>>,
    /// `(exchange, pattern, queue)`.
    bindings: Arc<RwLock<Vec<(String, String, String)>>>,
}

impl MemoryTransport {
    fn queue(&self, name: &str) -> Arc<MemQueue> {
        if let Some(q) = read(&self.queues).get(name) {
            return Arc::clone(q);
        }
        let mut queues = write(&self.queues);
        Arc::clone(queues.entry(name.to_owned()).or_insert_with(MemQueue::new))
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), BusError> {
        self.queue(&spec.name);
        let mut bindings = write(&self.bindings);
        for (exchange, pattern) in &spec.bindings {
            let b = (exchange.clone(), pattern.clone(), spec.name.clone());
            if !bindings.contains(&b) {
                bindings.push(b);
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        msg: Outgoing,
    ) -> Result<(), BusError> {
        let targets: Vec<String> = if exchange.is_empty() {
            vec![routing_key.to_owned()]
        } else {
            let bindings = read(&self.bindings);
            let mut t: Vec<String> = bindings
                .iter()
                .filter(|(ex, pattern, _)| ex == exchange && topic_matches(pattern, routing_key))
                .map(|(_, _, q)| q.clone())
                .collect();
            t.dedup();
            t
        };
        let queues = read(&self.queues);
        // Like RabbitMQ: a message routed to no existing queue is dropped,
        // or refused when it must reach one.
        if crate::must_route(exchange, &msg) && !targets.iter().any(|n| queues.contains_key(n)) {
            return Err(BusError::unroutable(exchange, routing_key));
        }
        for name in targets {
            if let Some(q) = queues.get(&name) {
                let stored = Stored {
                    routing_key: routing_key.to_owned(),
                    msg: msg.clone(),
                    redelivered: false,
                };
                q.put(stored);
            }
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, _prefetch: u16) -> Result<Deliveries, BusError> {
        let q = Consuming::new(self.queue(queue));
        Ok(futures::stream::unfold(q, |c| async move {
            let next = c.0.rx.lock().await.recv().await;
            // The sender lives in the queue itself, so `recv` never ends.
            let stored = next?;
            c.0.taken();
            let acker = MemAcker {
                queue: Arc::clone(&c.0),
                stored: Some(stored.clone()),
            };
            Some((to_delivery(stored, Box::new(acker)), c))
        })
        .boxed())
    }

    async fn reply_queue(&self) -> Result<(String, Deliveries), BusError> {
        let name = format!("reply.{}", uuid::Uuid::now_v7());
        self.queue(&name);
        let deliveries = self.consume(&name, u16::MAX).await?;
        // Replies are auto-acknowledged, as on RabbitMQ's reply queues.
        let auto = deliveries.then(|mut d| async move {
            let _ = d.acker.ack().await;
            d
        });
        Ok((name, auto.boxed()))
    }

    async fn browse(&self, queue: &str, max: usize) -> Result<Vec<Delivery>, BusError> {
        let q = self.queue(queue);
        // A queue with a waiting consumer is not browsed: its messages go to the consumer.
        let Ok(mut rx) = q.rx.try_lock() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while out.len() < max {
            let Ok(stored) = rx.try_recv() else { break };
            q.taken();
            let acker = MemAcker {
                queue: Arc::clone(&q),
                stored: Some(stored.clone()),
            };
            out.push(to_delivery(stored, Box::new(acker)));
        }
        Ok(out)
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        msg: Outgoing,
        delay: Duration,
    ) -> Result<(), BusError> {
        let q = self.queue(queue);
        let routing_key = queue.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.put(Stored {
                routing_key,
                msg,
                redelivered: false,
            });
        });
        Ok(())
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError> {
        let q = read(&self.queues)
            .get(queue)
            .cloned()
            .ok_or_else(|| BusError::NoQueue(queue.to_owned()))?;
        Ok(QueueStats {
            messages: q.waiting.load(Ordering::Relaxed),
            consumers: q.consumers.load(Ordering::Relaxed),
        })
    }

    fn is_connected(&self) -> bool {
        true
    }
}

fn to_delivery(stored: Stored, acker: Box<dyn Acker>) -> Delivery {
    Delivery {
        body: stored.msg.body,
        routing_key: stored.routing_key,
        message_id: stored.msg.message_id,
        correlation_id: stored.msg.correlation_id,
        reply_to: stored.msg.reply_to,
        headers: stored.msg.headers,
        redelivered: stored.redelivered,
        acker,
    }
}

/// Settles a memory delivery; one dropped unsettled goes back to its queue.
struct MemAcker {
    queue: Arc<MemQueue>,
    stored: Option<Stored>,
}

impl MemAcker {
    fn requeue(&mut self) {
        if let Some(mut stored) = self.stored.take() {
            stored.redelivered = true;
            self.queue.put(stored);
        }
    }
}

#[async_trait]
impl Acker for MemAcker {
    async fn ack(&mut self) -> Result<(), BusError> {
        self.stored = None;
        Ok(())
    }

    async fn nack(&mut self, requeue: bool) -> Result<(), BusError> {
        if requeue {
            self.requeue();
        } else {
            self.stored = None;
        }
        Ok(())
    }
}

impl Drop for MemAcker {
    fn drop(&mut self) {
        self.requeue();
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}
