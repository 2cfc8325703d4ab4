//! The order saga, orchestrated here with its state in the orders table:
//!
//! ```text
//! PENDING/reserving --payment.charged--> CONFIRMED (order.confirmed: inventory
//!        |                                          commits the units)
//!        +--inventory.rejected--> CANCELLED (out_of_stock)
//!        +--payment.declined----> CANCELLED (payment_declined; inventory.release)
//! any step past its deadline --> CANCELLED (timeout; inventory.release and
//!                                payments.refund, which voids a charge not made yet)
//! a product of it deleted -----> CANCELLED (product_unavailable; the same
//!                                compensations)
//! ```
//!
//! The steps travel as a routing slip: `order.created` (or, when a saga is
//! resumed, `inventory.reserve`) makes inventory hold the units and then
//! send the order's charge to payments itself, so a checkout takes three
//! messages to its outcome, not five. Orders keeps the state, the
//! deadlines and the compensations. (Orders whose saga began under an
//! earlier version may still wait at `charging`, after an
//! `inventory.reserved`; those steps are still followed.)
//!
//! Every transition is one conditional UPDATE (`WHERE status = 'PENDING'
//! AND saga_step = <expected>`) plus its outgoing messages in the outbox,
//! in one transaction: a duplicate or late event matches no row and does
//! nothing, and two racing transitions cannot both win.

use std::time::Duration;

use async_trait::async_trait;
use bazaar_bus::{Envelope, Failure, Received};
use bazaar_chassis::Shutdown;
use bazaar_chassis::db::Db;
use bazaar_chassis::messaging::{self, Effects, Outbox, retry};
use bazaar_contracts::topics::{
    COMMAND_EXCHANGE, INVENTORY_REJECTED, INVENTORY_RELEASE, INVENTORY_RESERVE, INVENTORY_RESERVED,
    ORDER, ORDER_CANCELLED, ORDER_CONFIRMED, PAYMENT_CHARGED, PAYMENT_DECLINED, PAYMENTS_CHARGE,
    PAYMENTS_REFUND, PRODUCT_DELETED,
};
use bazaar_contracts::{Order, OrderRef, ProductRef};
use serde::Serialize;
use sqlx::{AnyConnection, AssertSqlSafe, Row};
use tracing::Instrument as _;

use crate::metrics::SagaMetrics;
use crate::store;

pub const RESERVING: &str = "reserving";
pub const CHARGING: &str = "charging";
pub const DONE: &str = "done";
/// The steps a payment's answer may find its order at: `reserving` (the
/// charge rode along with the reservation) or `charging` (a saga begun
/// step by step, by an earlier version).
const PAYING: [&str; 2] = [RESERVING, CHARGING];

/// The deadline of a step that starts now.
pub fn deadline(step_timeout: Duration) -> String {
    bazaar_chassis::from_now(step_timeout)
}

/// A saga message about `order_id`: correlated by the order id and
/// carrying the trace context of the request that placed the order.
pub fn message(
    order_id: &str,
    (traceparent, request_id): (Option<&str>, Option<&str>),
    kind: &str,
    payload: &impl Serialize,
) -> Result<Envelope, sqlx::Error> {
    let mut env = Envelope::new(kind, payload).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    env.correlation_id = Some(order_id.to_owned());
    env.traceparent = traceparent.map(str::to_owned);
    env.request_id = request_id.map(str::to_owned);
    Ok(env)
}

/// Moves a PENDING order from step `from` to (`status`, `step`), if it is
/// still there; returns the order as it is now, with its lines, or `None`
/// if it was not.
/// An outcome (`CONFIRMED`, `CANCELLED`) is counted in `metrics`.
async fn transition(
    tx: &mut AnyConnection,
    metrics: &SagaMetrics,
    order_id: &str,
    from: &str,
    (status, step, reason): (&str, &str, Option<&str>),
    step_deadline: &str,
) -> Result<Option<Order>, sqlx::Error> {
    let span = if bazaar_mesh::trace::in_recorded_span() {
        tracing::info_span!(
            "saga",
            service = "orders",
            otel.name = %format_args!("saga {from} → {}", if status == "PENDING" { step } else { status }),
            order.id = %order_id,
            saga.from = from,
            saga.status = status,
            saga.step = step,
            saga.reason = reason.unwrap_or(""),
            saga.moved = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    let row = sqlx::query(AssertSqlSafe(format!(
        "UPDATE orders SET status = $1, saga_step = $2, cancel_reason = $3, step_deadline = $4, updated_at = $5
         WHERE id = $6 AND status = 'PENDING' AND saga_step = $7
         RETURNING {}",
        store::COLUMNS
    )))
    .bind(status)
    .bind(step)
    .bind(reason)
    .bind(step_deadline)
    .bind(bazaar_chassis::now())
    .bind(order_id)
    .bind(from)
    .fetch_optional(&mut *tx)
    .instrument(span.clone())
    .await?;
    // A late or duplicate event finds the order moved on already.
    span.record("saga.moved", row.is_some());
    if row.is_some() {
        let step = if status == "PENDING" {
            format!("{from} → {step}")
        } else {
            format!("{from} → {status}")
        };
        let event = bazaar_bus::timeline::Event {
            at_us: bazaar_bus::timeline::now_us(),
            service: "orders".into(),
            what: "saga".into(),
            kind: step,
            message_id: None,
            queue: None,
            attempt: None,
            detail: reason.map(str::to_owned),
            trace_id: bazaar_bus::timeline::trace_id_of(
                bazaar_mesh::trace::traceparent_of(&span).as_deref(),
            ),
            correlation_id: order_id.to_owned(),
        };
        messaging::after_commit(move || bazaar_bus::timeline::record(event));
    }
    let Some(row) = row else {
        return Ok(None);
    };
    let order = store::order_from(&row)?;
    if status != "PENDING" {
        metrics.outcome(status, reason, &order.created_at);
    }
    Ok(store::with_items(tx, vec![order]).await?.pop())
}

/// Cancels an order waiting on `from`, with its compensations.
async fn cancel(
    tx: &mut AnyConnection,
    metrics: &SagaMetrics,
    cause: &Envelope,
    order_id: &str,
    from: &str,
    reason: &str,
) -> Result<bool, Failure> {
    let Some(order) = transition(
        tx,
        metrics,
        order_id,
        from,
        ("CANCELLED", DONE, Some(reason)),
        "",
    )
    .await
    .map_err(retry)?
    else {
        return Ok(false);
    };
    let by_ref = OrderRef {
        order_id: order.id.clone(),
    };
    let mut out = vec![(
        ORDER,
        ORDER_CANCELLED,
        caused(cause, ORDER_CANCELLED, &order)?,
    )];
    // Stock is held from the reserve step on (or may yet be, if the reserve
    // is still in flight: the release then makes inventory refuse it).
    if reason != "out_of_stock" {
        out.push((
            COMMAND_EXCHANGE,
            INVENTORY_RELEASE,
            caused(cause, INVENTORY_RELEASE, &by_ref)?,
        ));
    }
    // A charge was asked for (or rides along with the reservation) and its
    // answer never came: refund it, or void it so that a late charge
    // command charges nothing.
    if reason != "payment_declined" && reason != "out_of_stock" {
        out.push((
            COMMAND_EXCHANGE,
            PAYMENTS_REFUND,
            caused(cause, PAYMENTS_REFUND, &order.charge())?,
        ));
    }
    enqueue(tx, &out).await?;
    Ok(true)
}

fn caused(cause: &Envelope, kind: &str, payload: &impl Serialize) -> Result<Envelope, Failure> {
    let mut env = cause
        .caused(kind, payload)
        .map_err(|e| Failure::Reject(e.to_string()))?;
    // Saga messages correlate by order, whatever started them.
    env.correlation_id.clone_from(&cause.correlation_id);
    Ok(env)
}

async fn enqueue(tx: &mut AnyConnection, out: &[(&str, &str, Envelope)]) -> Result<(), Failure> {
    let refs: Vec<(&str, &str, &Envelope)> = out.iter().map(|(e, k, m)| (*e, *k, m)).collect();
    messaging::enqueue(tx, &refs).await.map_err(retry)
}

/// The saga's reactions to inventory and payment events.
pub struct Saga {
    pub step_timeout: Duration,
    pub metrics: SagaMetrics,
}

#[async_trait]
impl Effects for Saga {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let env = &msg.envelope;
        let order_id = match env.kind.as_str() {
            INVENTORY_RESERVED | INVENTORY_REJECTED => {
                env.payload::<OrderRef>().map(|r| r.order_id)
            }
            PAYMENT_CHARGED | PAYMENT_DECLINED => env
                .payload::<bazaar_contracts::Payment>()
                .map(|p| p.order_id),
            other => {
                return Err(Failure::Reject(format!(
                    "the order saga does not handle {other}"
                )));
            }
        }
        .map_err(|e| Failure::Reject(format!("bad {} payload: {e}", env.kind)))?;
        match env.kind.as_str() {
            INVENTORY_RESERVED => {
                let next = transition(
                    tx,
                    &self.metrics,
                    &order_id,
                    RESERVING,
                    ("PENDING", CHARGING, None),
                    &deadline(self.step_timeout),
                )
                .await
                .map_err(retry)?;
                if let Some(order) = next {
                    let charge = caused(env, PAYMENTS_CHARGE, &order.charge())?;
                    enqueue(tx, &[(COMMAND_EXCHANGE, PAYMENTS_CHARGE, charge)]).await?;
                }
            }
            INVENTORY_REJECTED => {
                cancel(tx, &self.metrics, env, &order_id, RESERVING, "out_of_stock").await?;
            }
            PAYMENT_CHARGED => {
                for from in PAYING {
                    let confirmed = transition(
                        tx,
                        &self.metrics,
                        &order_id,
                        from,
                        ("CONFIRMED", DONE, None),
                        "",
                    )
                    .await
                    .map_err(retry)?;
                    if let Some(order) = confirmed {
                        // Inventory commits the held units on it too.
                        let confirmed = caused(env, ORDER_CONFIRMED, &order)?;
                        enqueue(tx, &[(ORDER, ORDER_CONFIRMED, confirmed)]).await?;
                        break;
                    }
                }
            }
            _ => {
                for from in PAYING {
                    if cancel(tx, &self.metrics, env, &order_id, from, "payment_declined").await? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reacts to catalog's product events: a deleted product's orders still
/// in their saga (reserving or charging) are cancelled
/// (`product_unavailable`) and compensated, never charged.
pub struct Products {
    pub metrics: SagaMetrics,
}

#[async_trait]
impl Effects for Products {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let env = &msg.envelope;
        if env.kind != PRODUCT_DELETED {
            // `product.updated`: prices are looked up again (the cache is
            // dropped per instance, see `events::forget_prices`).
            return Ok(());
        }
        let gone: ProductRef = env
            .payload()
            .map_err(|e| Failure::Reject(format!("bad {} payload: {e}", env.kind)))?;
        let rows = sqlx::query(
            "SELECT o.id, o.saga_step FROM orders o JOIN order_items i ON i.order_id = o.id
             WHERE o.status = 'PENDING' AND i.product_id = $1",
        )
        .bind(&gone.product_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(retry)?;
        for row in rows {
            let id: String = row.try_get("id").map_err(retry)?;
            let step: String = row.try_get("saga_step").map_err(retry)?;
            let mut cause = caused(
                env,
                "order.product_deleted",
                &OrderRef {
                    order_id: id.clone(),
                },
            )?;
            cause.correlation_id = Some(id.clone());
            if cancel(tx, &self.metrics, &cause, &id, &step, "product_unavailable").await? {
                tracing::info!(order_id = %id, product_id = %gone.product_id, "order cancelled: a product in it was deleted");
            }
        }
        Ok(())
    }
}

/// PENDING orders whose step deadline passed: `(id, step, traceparent)`.
async fn overdue(
    db: &Db,
    limit: i64,
) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, saga_step, traceparent FROM orders WHERE status = 'PENDING' AND step_deadline < $1
         ORDER BY step_deadline LIMIT $2",
    )
    .bind(bazaar_chassis::now())
    .bind(limit)
    .fetch_all(&db.read)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                r.try_get("saga_step")?,
                r.try_get("traceparent")?,
            ))
        })
        .collect()
}

/// Cancels overdue orders (`timeout`) and compensates, until `shutdown`.
pub fn spawn_sweeper(
    db: Db,
    outbox: Outbox,
    step_timeout: Duration,
    metrics: SagaMetrics,
    shutdown: Shutdown,
) {
    let every = (step_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    shutdown.every(every, "saga timeout sweep", move || {
        let (db, outbox, metrics) = (db.clone(), outbox.clone(), metrics.clone());
        async move { sweep(&db, &outbox, &metrics).await }
    });
}

async fn sweep(db: &Db, outbox: &Outbox, metrics: &SagaMetrics) -> anyhow::Result<()> {
    loop {
        let due = overdue(db, 200).await?;
        if due.is_empty() {
            return Ok(());
        }
        let cancelled = outbox.committing(cancel_overdue(db, metrics, &due)).await?;
        tracing::info!(cancelled, "orders timed out and were compensated");
        if due.len() < 200 {
            return Ok(());
        }
    }
}

/// Cancels `due` (`timeout`) in one transaction; returns how many were
/// still waiting.
async fn cancel_overdue(
    db: &Db,
    metrics: &SagaMetrics,
    due: &[(String, String, Option<String>)],
) -> anyhow::Result<usize> {
    let mut tx = db.write.begin().await?;
    let mut cancelled = 0;
    for (id, step, traceparent) in due {
        let cause = message(
            id,
            (traceparent.as_deref(), None),
            "order.timeout",
            &OrderRef {
                order_id: id.clone(),
            },
        )?;
        if cancel(&mut tx, metrics, &cause, id, step, "timeout")
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
        {
            cancelled += 1;
        }
    }
    tx.commit().await?;
    Ok(cancelled)
}

/// Sends the current step's command again for every PENDING order, with a
/// fresh deadline. Run at start: steps are idempotent by order id, so a
/// command that was never lost is merely answered twice, and one that was
/// (an in-memory bus does not survive a restart) is not waited on forever.
pub async fn resume(db: &Db, outbox: &Outbox, step_timeout: Duration) -> anyhow::Result<usize> {
    let rows = sqlx::query(
        "SELECT id, saga_step, traceparent FROM orders WHERE status = 'PENDING' AND step_deadline >= $1",
    )
    .bind(bazaar_chassis::now())
    .fetch_all(&db.read)
    .await?;
    let mut resumed = 0;
    for chunk in rows.chunks(200) {
        let mut tx = db.write.begin().await?;
        let deadline = deadline(step_timeout);
        for row in chunk {
            let id: String = row.try_get("id")?;
            let step: String = row.try_get("saga_step")?;
            let traceparent: Option<String> = row.try_get("traceparent")?;
            let Some(order) = store::get(&mut tx, &id).await? else {
                continue;
            };
            let trace = (traceparent.as_deref(), None);
            let (key, env) = match step.as_str() {
                RESERVING => (
                    INVENTORY_RESERVE,
                    message(&id, trace, INVENTORY_RESERVE, &order.reservation())?,
                ),
                CHARGING => (
                    PAYMENTS_CHARGE,
                    message(&id, trace, PAYMENTS_CHARGE, &order.charge())?,
                ),
                _ => continue,
            };
            sqlx::query(
                "UPDATE orders SET step_deadline = $1 WHERE id = $2 AND status = 'PENDING'",
            )
            .bind(&deadline)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            messaging::enqueue(&mut tx, &[(COMMAND_EXCHANGE, key, &env)]).await?;
            resumed += 1;
        }
        tx.commit().await?;
    }
    outbox.poke();
    Ok(resumed)
}
