//! The `orders.create` consumer (request/reply from catalog's buy): each
//! request becomes an order — once, even when redelivered — whose saga
//! starts in the same transaction, and gets a reply. Deliveries are
//! settled by the reliable consumer: acked after the commit and the reply,
//! retried on a database error, dead-lettered when unparseable.

use async_trait::async_trait;
use bazaar_bus::{BatchHandler, Bus, Envelope, Failure, Received};
use bazaar_contracts::{CreateOrder, Order, Reply};
use tracing::Instrument as _;

use crate::domain;
use crate::store::NewOrder;
use crate::writer::{OrderWriter, WriteError};

pub struct CreateRequests {
    pub bus: Bus,
    pub writer: OrderWriter,
}

#[async_trait]
impl BatchHandler for CreateRequests {
    async fn handle(&self, batch: &[Received]) -> Vec<Result<(), Failure>> {
        futures::future::join_all(batch.iter().map(|r| {
            self.one(r)
                .instrument(bazaar_chassis::messaging::message_span(
                    self.bus.service(),
                    r,
                ))
        }))
        .await
    }
}

impl CreateRequests {
    async fn one(&self, msg: &Received) -> Result<(), Failure> {
        let reply = decide(&self.writer, &msg.envelope)
            .await
            .map_err(|e| Failure::Retry(e.to_string()))?;
        let Some(reply_to) = &msg.reply_to else {
            return Ok(());
        };
        let out = msg
            .envelope
            .caused("orders.create.reply", &reply)
            .map_err(|e| Failure::Reject(e.to_string()))?;
        // On failure the order is stored; the retry finds it by request id and replies again.
        self.bus
            .reply_to(reply_to, msg.correlation_id.clone(), &out)
            .await
            .map_err(|e| Failure::Retry(format!("reply: {e}")))
    }
}

/// The reply a request deserves; `Err` only when the database failed and
/// the request should be retried.
async fn decide(writer: &OrderWriter, env: &Envelope) -> Result<Reply<Order>, WriteError> {
    let invalid = |detail: String| {
        Ok(Reply::Err {
            status: 422,
            detail,
        })
    };
    let cmd = match env.payload::<CreateOrder>() {
        Ok(cmd) => cmd,
        Err(e) => return invalid(format!("malformed order request: {e}")),
    };
    let total = match domain::total(&cmd) {
        Ok(total) => total,
        Err(e) => return invalid(e.to_string()),
    };
    let (order, _) = writer
        .create(NewOrder {
            request_id: env.id.clone(),
            cmd,
            total,
            // The saga continues this consumer's span, when recorded.
            traceparent: bazaar_mesh::trace::traceparent_of(&tracing::Span::current())
                .or_else(|| env.traceparent.clone()),
            http_request_id: env.request_id.clone(),
        })
        .await?;
    Ok(Reply::Ok { value: order })
}

/// Drops the cached price of a product catalog changed or deleted, in
/// this instance: each instance has a queue of its own (gone a minute
/// after the instance), since every instance keeps its own cache.
pub async fn forget_prices(
    ctx: &bazaar_chassis::ServiceContext,
    prices: std::sync::Arc<crate::http::PriceCache>,
    shutdown: bazaar_chassis::Shutdown,
) -> anyhow::Result<()> {
    use bazaar_contracts::topics::{PRODUCT, PRODUCT_DELETED, PRODUCT_UPDATED};
    use futures::StreamExt as _;
    let spec = bazaar_bus::QueueSpec::new(format!("orders.prices.{}", ctx.instance_id))
        .bind(PRODUCT, PRODUCT_UPDATED)
        .bind(PRODUCT, PRODUCT_DELETED)
        .expires_after(std::time::Duration::from_secs(60));
    let bus = ctx.bus.clone();
    let mut deliveries = bus.subscribe(&spec, 64).await?;
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                d = deliveries.next() => d,
                () = shutdown.wait() => return,
            };
            let Some(d) = next else {
                // The subscription ended (a lost connection): take it again.
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                match bus.subscribe(&spec, 64).await {
                    Ok(again) => deliveries = again,
                    Err(e) => tracing::warn!(error = %e, "cannot watch product changes"),
                }
                continue;
            };
            if let Ok(env) = d.envelope() {
                let id = match env.kind.as_str() {
                    PRODUCT_DELETED => env
                        .payload::<bazaar_contracts::ProductRef>()
                        .ok()
                        .map(|r| r.product_id),
                    _ => env
                        .payload::<bazaar_contracts::Product>()
                        .ok()
                        .map(|p| p.id),
                };
                if let Some(id) = id {
                    prices.forget(&id);
                }
            }
            if let Err(e) = d.ack().await {
                tracing::debug!(error = %e, "cannot ack a product change");
            }
        }
    });
    Ok(())
}

/// Orders' replica of buyers' profiles (`user.profile.*`): the name an
/// order shows is the buyer's name now, with no call to users.
pub struct Buyers;

#[async_trait]
impl bazaar_chassis::messaging::Effects for Buyers {
    async fn apply(&self, tx: &mut sqlx::AnyConnection, msg: &Received) -> Result<(), Failure> {
        use bazaar_chassis::messaging::retry;
        use bazaar_contracts::topics::{USER_PROFILE_DELETED, USER_PROFILE_UPDATED};
        let env = &msg.envelope;
        let profile: bazaar_contracts::Profile = env
            .payload()
            .map_err(|e| Failure::Reject(format!("bad {} payload: {e}", env.kind)))?;
        let version = bazaar_chassis::replica::Version {
            id: &profile.id,
            email: &profile.email,
            name: &profile.name,
            updated_at: &profile.updated_at,
        };
        match env.kind.as_str() {
            USER_PROFILE_UPDATED => bazaar_chassis::replica::keep(tx, "buyers", &version)
                .await
                .map_err(retry)?,
            USER_PROFILE_DELETED => bazaar_chassis::replica::forget(tx, "buyers", &version)
                .await
                .map_err(retry)?,
            other => return Err(Failure::Reject(format!("orders does not handle {other}"))),
        };
        Ok(())
    }
}
