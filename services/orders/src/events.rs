//! The `orders.create` consumer: each request becomes an order (once, even
//! when redelivered) and gets a reply. A delivery is acknowledged only after
//! its order is committed and its reply sent.

use bazaar_bus::{Bus, Deliveries, Delivery, Envelope};
use bazaar_chassis::Shutdown;
use bazaar_contracts::{CreateOrder, Order, Reply};
use futures::StreamExt;

use crate::domain;
use crate::store::NewOrder;
use crate::writer::{OrderWriter, WriteError};

/// Works on up to `concurrency` deliveries at once until `shutdown`.
pub async fn consume(
    bus: Bus,
    writer: OrderWriter,
    deliveries: Deliveries,
    concurrency: usize,
    shutdown: Shutdown,
) {
    let stop = shutdown.clone();
    deliveries
        .take_until(async move { stop.wait().await })
        .for_each_concurrent(concurrency, |d| handle(&bus, &writer, d))
        .await;
    tracing::info!("order consumer stopped");
}

async fn handle(bus: &Bus, writer: &OrderWriter, delivery: Delivery) {
    let env = match delivery.envelope() {
        Ok(env) => env,
        Err(e) => {
            // Unparseable: never retried (the dead-letter queue arrives with the messaging issue).
            tracing::warn!(error = %e, "unparseable order request rejected");
            let _ = delivery.nack(false).await;
            return;
        }
    };
    let reply = match decide(writer, &env).await {
        Ok(reply) => reply,
        Err(e) => {
            // The database failed: put the request back for another try.
            tracing::error!(error = %e, "storing an order failed; requeueing");
            let _ = delivery.nack(true).await;
            return;
        }
    };
    let answered = match env.caused("orders.create.reply", &reply) {
        Ok(out) if delivery.reply_to.is_some() => {
            bus.reply(&delivery, &out).await.map_err(|e| e.to_string())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    match answered {
        Ok(()) => {
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "ack failed");
            }
        }
        Err(e) => {
            // The order is stored; a redelivery finds it by request id and replies again.
            tracing::warn!(error = %e, "reply failed; requeueing");
            let _ = delivery.nack(true).await;
        }
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
    let order = writer
        .create(NewOrder {
            request_id: env.id.clone(),
            cmd,
            total,
        })
        .await?;
    Ok(Reply::Ok { value: order })
}
