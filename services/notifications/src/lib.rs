//! The notifications service: records (and sends) a notification for every
//! order outcome (`order.confirmed`, `order.cancelled`) and every
//! registration (`user.registered`). Users read theirs at `GET /notifications`.
//! Keeps a replica of profiles (`user.profile.*`): a notification greets
//! the user by their current name and goes to their current address,
//! with no call to users.

mod channels;
mod http;

use async_trait::async_trait;
use bazaar_bus::{Failure, QueueSpec, Received};
use bazaar_chassis::messaging::{self, Effects, Outbox, retry};
use bazaar_chassis::{ServiceContext, Shutdown};
use bazaar_contracts::topics::{
    NOTIFICATIONS_QUEUE, ORDER, ORDER_CANCELLED, ORDER_CONFIRMED, USER, USER_PROFILE_ANY,
    USER_PROFILE_DELETED, USER_PROFILE_UPDATED, USER_REGISTERED,
};
use bazaar_contracts::{Order, Profile, User};
use sqlx::{AnyConnection, Row};
use tokio::net::TcpListener;

use channels::{Channels, Outgoing};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Notifications' HTTP contract (OpenAPI 3.1), paths as the service serves them.
pub fn openapi() -> utoipa::openapi::OpenApi {
    http::openapi()
}

/// A built notifications service, ready to serve.
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

    /// Consumes events and serves HTTP until `shutdown`.
    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let channels = Channels::from_config(&self.ctx.config)?;
        let db = &self.state.db;
        // Notifications publish nothing; the outbox is there for the inbox's sake.
        let outbox = Outbox::spawn(db.clone(), self.ctx.bus.clone(), shutdown.clone());
        let spec = QueueSpec::new(NOTIFICATIONS_QUEUE)
            .bind(ORDER, ORDER_CONFIRMED)
            .bind(ORDER, ORDER_CANCELLED)
            .bind(USER, USER_REGISTERED)
            .bind(USER, USER_PROFILE_ANY);
        let consumer =
            messaging::spawn_consumer(&self.ctx, db, &outbox, spec, Notify { channels }, &shutdown)
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

struct Notify {
    channels: Channels,
}

fn money(amount: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", amount / 100, amount % 100)
}

/// Who an order notification goes to, from the replica: `(name, email)`.
type Recipient = Option<(String, String)>;

/// The notification an event deserves.
fn compose(msg: &Received, recipient: Recipient) -> Result<Outgoing, Failure> {
    let env = &msg.envelope;
    let bad = |e: serde_json::Error| Failure::Reject(format!("bad {} payload: {e}", env.kind));
    Ok(match env.kind.as_str() {
        ORDER_CONFIRMED | ORDER_CANCELLED => {
            let order: Order = env.payload().map_err(bad)?;
            // One notification per order outcome, however often the event comes.
            let id = format!("{}:{}", env.kind, order.id);
            let (subject, body) = if env.kind == ORDER_CONFIRMED {
                (
                    format!("Order {} confirmed", order.id),
                    format!(
                        "Your order of {} item(s) is confirmed; {} was charged.",
                        order.items.iter().map(|i| i.quantity).sum::<i64>(),
                        money(order.total, &order.currency)
                    ),
                )
            } else {
                let reason = match order.cancel_reason.as_deref() {
                    Some("out_of_stock") => "an item is out of stock",
                    Some("payment_declined") => "the payment was declined",
                    Some("timeout") => "it could not be completed in time",
                    _ => "it could not be completed",
                };
                (
                    format!("Order {} cancelled", order.id),
                    format!("Your order was cancelled because {reason}. Nothing was charged."),
                )
            };
            let (body, email) = match recipient {
                Some((name, email)) => (format!("Hello {name}, {}", lower_first(&body)), email),
                None => (body, order.user_email),
            };
            Outgoing {
                id,
                user_id: order.user_id,
                email,
                kind: env.kind.clone(),
                subject,
                body,
            }
        }
        USER_REGISTERED => {
            let user: User = env.payload().map_err(bad)?;
            Outgoing {
                id: format!("{}:{}", env.kind, user.id),
                subject: "Welcome to Bazaar".into(),
                body: format!("Hello {}, your account {} is ready.", user.name, user.email),
                user_id: user.id,
                email: user.email,
                kind: env.kind.clone(),
            }
        }
        other => {
            return Err(Failure::Reject(format!(
                "notifications does not handle {other}"
            )));
        }
    })
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or_else(String::new, |c| {
        c.to_lowercase().chain(chars).collect::<String>()
    })
}

/// Keeps the replica (see `bazaar_chassis::replica`).
async fn replicate(tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
    let env = &msg.envelope;
    let p: Profile = env
        .payload()
        .map_err(|e| Failure::Reject(format!("bad {} payload: {e}", env.kind)))?;
    let version = bazaar_chassis::replica::Version {
        id: &p.id,
        email: &p.email,
        name: &p.name,
        updated_at: &p.updated_at,
    };
    if env.kind == USER_PROFILE_DELETED {
        bazaar_chassis::replica::forget(tx, "recipients", &version).await
    } else {
        bazaar_chassis::replica::keep(tx, "recipients", &version).await
    }
    .map_err(retry)
}

/// The replica's `(name, email)` of the user an order event is about.
async fn recipient(tx: &mut AnyConnection, msg: &Received) -> Result<Recipient, Failure> {
    let env = &msg.envelope;
    if env.kind != ORDER_CONFIRMED && env.kind != ORDER_CANCELLED {
        return Ok(None);
    }
    let Ok(order) = env.payload::<Order>() else {
        return Ok(None);
    };
    let row = sqlx::query("SELECT name, email FROM recipients WHERE user_id = $1 AND deleted = 0")
        .bind(&order.user_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(retry)?;
    row.map(|r| Ok::<_, sqlx::Error>((r.try_get("name")?, r.try_get("email")?)))
        .transpose()
        .map_err(retry)
}

#[async_trait]
impl Effects for Notify {
    const BACKGROUND: bool = true;

    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let kind = msg.envelope.kind.as_str();
        if kind == USER_PROFILE_UPDATED || kind == USER_PROFILE_DELETED {
            return replicate(tx, msg).await;
        }
        let to = recipient(tx, msg).await?;
        let n = compose(msg, to)?;
        let inserted = sqlx::query(
            "INSERT INTO notifications (id, user_id, email, kind, subject, body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&n.id)
        .bind(&n.user_id)
        .bind(&n.email)
        .bind(&n.kind)
        .bind(&n.subject)
        .bind(&n.body)
        .bind(bazaar_chassis::now())
        .execute(&mut *tx)
        .await
        .map_err(retry)?;
        if inserted.rows_affected() == 0 {
            tracing::debug!(id = %n.id, "already notified");
            return Ok(());
        }
        // Sent before the commit: if sending fails the row is rolled back and
        // the whole notification retried.
        self.channels.send(&n).await.map_err(Failure::Retry)
    }
}
