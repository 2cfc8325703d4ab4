//! The RabbitMQ backend, through lapin: durable topic exchanges and queues,
//! persistent messages, publisher confirms, manual acks with a prefetch limit.

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::{Acker, BusError, Deliveries, Delivery, Outgoing, QueueSpec, Transport, lock};

impl From<lapin::Error> for BusError {
    fn from(e: lapin::Error) -> Self {
        BusError::Unavailable(e.to_string())
    }
}

/// A connection to RabbitMQ with one confirming channel for publishing.
pub struct AmqpTransport {
    conn: Connection,
    publisher: Channel,
    exchanges: Mutex<HashSet<String>>,
}

impl AmqpTransport {
    /// Connects and opens the publishing channel in confirm mode.
    pub async fn connect(url: &str) -> Result<Self, BusError> {
        let props = ConnectionProperties::default().with_connection_name("bazaar".into());
        let conn = Connection::connect(url, props).await?;
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            conn,
            publisher,
            exchanges: Mutex::default(),
        })
    }

    /// Declares a durable topic exchange once per process; publishing to an
    /// undeclared exchange would close the channel.
    async fn ensure_exchange(&self, name: &str) -> Result<(), BusError> {
        if name.is_empty() || lock(&self.exchanges).contains(name) {
            return Ok(());
        }
        let opts = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        self.publisher
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                opts,
                FieldTable::default(),
            )
            .await?;
        lock(&self.exchanges).insert(name.to_owned());
        Ok(())
    }

    fn stream(consumer: lapin::Consumer, channel: Channel, auto_ack: bool) -> Deliveries {
        futures::stream::unfold(
            (consumer, channel),
            move |(mut consumer, channel)| async move {
                loop {
                    match consumer.next().await? {
                        Ok(d) => {
                            let acker: Box<dyn Acker> = if auto_ack {
                                Box::new(Settled)
                            } else {
                                Box::new(AmqpAcker {
                                    acker: Some(d.acker.clone()),
                                })
                            };
                            let delivery = Delivery {
                                routing_key: d.routing_key.to_string(),
                                message_id: d
                                    .properties
                                    .message_id()
                                    .as_ref()
                                    .map(|s| s.to_string()),
                                correlation_id: d
                                    .properties
                                    .correlation_id()
                                    .as_ref()
                                    .map(|s| s.to_string()),
                                reply_to: d.properties.reply_to().as_ref().map(|s| s.to_string()),
                                redelivered: d.redelivered,
                                body: d.data,
                                acker,
                            };
                            return Some((delivery, (consumer, channel)));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "amqp consumer error");
                        }
                    }
                }
            },
        )
        .boxed()
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), BusError> {
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut args = FieldTable::default();
        if let Some(after) = spec.expires_after {
            let ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX).max(1);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        self.publisher
            .queue_declare(spec.name.as_str().into(), opts, args)
            .await?;
        for (exchange, pattern) in &spec.bindings {
            self.ensure_exchange(exchange).await?;
            self.publisher
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

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        msg: Outgoing,
    ) -> Result<(), BusError> {
        self.ensure_exchange(exchange).await?;
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = msg.message_id {
            props = props.with_message_id(id.into());
        }
        if let Some(id) = msg.correlation_id {
            props = props.with_correlation_id(id.into());
        }
        if let Some(to) = msg.reply_to {
            props = props.with_reply_to(to.into());
        }
        let confirm = self
            .publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &msg.body,
                props,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(BusError::NotConfirmed);
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Deliveries, BusError> {
        let channel = self.conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self::stream(consumer, channel, false))
    }

    async fn reply_queue(&self) -> Result<(String, Deliveries), BusError> {
        let channel = self.conn.create_channel().await?;
        let opts = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare("".into(), opts, FieldTable::default())
            .await?;
        let name = queue.name().to_string();
        let opts = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let consumer = channel
            .basic_consume(name.as_str().into(), "".into(), opts, FieldTable::default())
            .await?;
        Ok((name, Self::stream(consumer, channel, true)))
    }

    fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }
}

/// Acks or nacks on the delivery's channel; one dropped unsettled is nacked
/// back to its queue.
struct AmqpAcker {
    acker: Option<lapin::Acker>,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&mut self) -> Result<(), BusError> {
        if let Some(a) = self.acker.take() {
            a.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    async fn nack(&mut self, requeue: bool) -> Result<(), BusError> {
        if let Some(a) = self.acker.take() {
            a.nack(BasicNackOptions {
                requeue,
                ..BasicNackOptions::default()
            })
            .await?;
        }
        Ok(())
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
