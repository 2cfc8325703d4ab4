//! The payments service: owns payments. Consumes `payments.charge` and
//! `payments.refund` from the order saga, calls the provider, and answers
//! with `payment.charged`, `payment.declined` or `payment.refunded`
//! through its outbox. Each order is charged at most once.

mod http;
pub mod provider;

use std::sync::Arc;

use async_trait::async_trait;
use bazaar_bus::{Failure, QueueSpec, Received};
use bazaar_chassis::messaging::{self, Effects, Outbox, retry};
use bazaar_chassis::{ServiceContext, Shutdown};
use bazaar_contracts::topics::{
    COMMAND_EXCHANGE, PAYMENT, PAYMENT_CHARGED, PAYMENT_DECLINED, PAYMENT_REFUNDED,
    PAYMENTS_CHARGE, PAYMENTS_QUEUE, PAYMENTS_REFUND,
};
use bazaar_contracts::{ChargePayment, Payment};
use sqlx::{AnyConnection, Row};
use tokio::net::TcpListener;

use provider::{Charge, Provider, Simulated};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Payments' HTTP contract (OpenAPI 3.1), paths as the service serves them.
pub fn openapi() -> utoipa::openapi::OpenApi {
    http::openapi()
}

/// A built payments service, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    state: http::AppState,
}

impl Application {
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let db = ctx.database(&MIGRATOR).await?;
        let state = http::AppState {
            db,
            verifier: ctx.verifier.clone(),
        };
        Ok(Self { ctx, state })
    }

    /// Consumes charge and refund commands and serves HTTP until `shutdown`.
    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let provider = Arc::new(Simulated {
            config: self.ctx.live.clone(),
        });
        let db = &self.state.db;
        let outbox = Outbox::spawn(db.clone(), self.ctx.bus.clone(), shutdown.clone());
        let spec = QueueSpec::new(PAYMENTS_QUEUE).bind(COMMAND_EXCHANGE, "payments.*");
        let consumer = messaging::spawn_consumer(
            &self.ctx,
            db,
            &outbox,
            spec,
            Commands { provider },
            &shutdown,
        )
        .await?;
        let router = http::router(self.state.clone());
        bazaar_chassis::http::serve_consuming(
            &self.ctx,
            db,
            router,
            listener,
            shutdown,
            vec![consumer],
        )
        .await
    }
}

struct Commands {
    provider: Arc<dyn Provider>,
}

pub(crate) async fn find(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<(String, Payment)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT order_id, user_id, amount, currency, status FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok((
            r.try_get("user_id")?,
            Payment {
                order_id: r.try_get("order_id")?,
                amount: r.try_get("amount")?,
                currency: r.try_get("currency")?,
                status: r.try_get("status")?,
            },
        ))
    })
    .transpose()
}

async fn record(
    conn: &mut AnyConnection,
    req: &ChargePayment,
    status: &str,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    let now = bazaar_chassis::now();
    sqlx::query(
        "INSERT INTO payments (order_id, user_id, amount, currency, status, reason, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
         ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, reason = excluded.reason, updated_at = excluded.updated_at",
    )
    .bind(&req.order_id)
    .bind(&req.user_id)
    .bind(req.amount)
    .bind(&req.currency)
    .bind(status)
    .bind(reason)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

#[async_trait]
impl Effects for Commands {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let env = &msg.envelope;
        let req: ChargePayment = env
            .payload()
            .map_err(|e| Failure::Reject(format!("bad {} payload: {e}", env.kind)))?;
        let existing = find(tx, &req.order_id).await.map_err(retry)?;
        let existing = existing.map(|(_, p)| p.status);
        let answer = match (env.kind.as_str(), existing.as_deref()) {
            // The first charge command for this order.
            (PAYMENTS_CHARGE, None) => {
                if req.amount <= 0 {
                    return Err(Failure::Reject("a charge needs a positive amount".into()));
                }
                match self.provider.charge(&req).await.map_err(retry)? {
                    Charge::Approved => {
                        record(tx, &req, "CHARGED", None).await.map_err(retry)?;
                        Some(PAYMENT_CHARGED)
                    }
                    Charge::Declined(why) => {
                        record(tx, &req, "DECLINED", Some(&why))
                            .await
                            .map_err(retry)?;
                        Some(PAYMENT_DECLINED)
                    }
                }
            }
            // A repeated command gets the first answer again, with no new charge.
            (PAYMENTS_CHARGE, Some("CHARGED")) => Some(PAYMENT_CHARGED),
            (PAYMENTS_CHARGE, Some("DECLINED")) => Some(PAYMENT_DECLINED),
            (PAYMENTS_CHARGE, Some(_)) => None,
            (PAYMENTS_REFUND, Some("CHARGED")) => {
                self.provider.refund(&req).await.map_err(retry)?;
                record(tx, &req, "REFUNDED", None).await.map_err(retry)?;
                Some(PAYMENT_REFUNDED)
            }
            // Cancelled before the charge arrived: nothing may be charged later.
            (PAYMENTS_REFUND, None) => {
                let void = ChargePayment {
                    amount: 0,
                    ..req.clone()
                };
                record(tx, &void, "VOIDED", Some("cancelled before any charge"))
                    .await
                    .map_err(retry)?;
                None
            }
            (PAYMENTS_REFUND, Some(_)) => None,
            (other, _) => return Err(Failure::Reject(format!("payments does not handle {other}"))),
        };
        if let Some(kind) = answer {
            let status = match kind {
                PAYMENT_CHARGED => "CHARGED",
                PAYMENT_DECLINED => "DECLINED",
                _ => "REFUNDED",
            };
            let payment = Payment {
                order_id: req.order_id.clone(),
                amount: req.amount,
                currency: req.currency.clone(),
                status: status.into(),
            };
            messaging::send_caused(tx, env, (PAYMENT, kind), &payment).await?;
        }
        Ok(())
    }
}
