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
use sqlx::{AnyConnection, AssertSqlSafe, Row};
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

/// The notification an event deserves; `order`, its order if it is an
/// order event and its payload parsed.
fn compose(
    msg: &Received,
    order: Option<Order>,
    recipient: Recipient,
) -> Result<Outgoing, Failure> {
    let env = &msg.envelope;
    let bad = |e: serde_json::Error| Failure::Reject(format!("bad {} payload: {e}", env.kind));
    Ok(match env.kind.as_str() {
        ORDER_CONFIRMED | ORDER_CANCELLED => {
            // (Parsed again only to say why it did not parse.)
            let order: Order = match order {
                Some(order) => order,
                None => env.payload().map_err(bad)?,
            };
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

/// The order an order event is about.
fn order_of(msg: &Received) -> Option<Order> {
    let env = &msg.envelope;
    if env.kind != ORDER_CONFIRMED && env.kind != ORDER_CANCELLED {
        return None;
    }
    env.payload::<Order>().ok()
}

/// The replica's `(name, email)` of each of `users`, by user id.
async fn recipients(
    tx: &mut AnyConnection,
    users: &[&str],
) -> Result<std::collections::HashMap<String, (String, String)>, Failure> {
    let mut users = users.to_vec();
    users.sort_unstable();
    users.dedup();
    let mut found = std::collections::HashMap::with_capacity(users.len());
    for chunk in users.chunks(500) {
        let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT user_id, name, email FROM recipients WHERE deleted = 0 AND user_id IN ({})",
            marks.join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for user in chunk {
            query = query.bind(*user);
        }
        for r in query.fetch_all(&mut *tx).await.map_err(retry)? {
            let user: String = r.try_get("user_id").map_err(retry)?;
            let to = (
                r.try_get("name").map_err(retry)?,
                r.try_get("email").map_err(retry)?,
            );
            found.insert(user, to);
        }
    }
    Ok(found)
}

#[async_trait]
impl Effects for Notify {
    const BACKGROUND: bool = true;

    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        if is_profile(msg) {
            return replicate(tx, msg).await;
        }
        self.apply_all(tx, &[msg]).await
    }

    /// One lookup of recipients and one insert for the batch. A batch
    /// with a profile event in it goes one by one, so that a notification
    /// after it greets by the new name.
    async fn apply_many(
        &self,
        tx: &mut AnyConnection,
        msgs: &[&Received],
    ) -> Option<Result<(), Failure>> {
        if msgs.iter().any(|m| is_profile(m)) {
            return None;
        }
        Some(self.apply_all(tx, msgs).await)
    }
}

fn is_profile(msg: &Received) -> bool {
    let kind = msg.envelope.kind.as_str();
    kind == USER_PROFILE_UPDATED || kind == USER_PROFILE_DELETED
}

impl Notify {
    async fn apply_all(&self, tx: &mut AnyConnection, msgs: &[&Received]) -> Result<(), Failure> {
        // The order of each order event, parsed once.
        let orders: Vec<Option<Order>> = msgs.iter().map(|m| order_of(m)).collect();
        let users: Vec<&str> = orders
            .iter()
            .flatten()
            .map(|o| o.user_id.as_str())
            .collect();
        let recipients = recipients(tx, &users).await?;
        let mut outgoing = Vec::with_capacity(msgs.len());
        for (msg, order) in msgs.iter().zip(orders) {
            let to = order
                .as_ref()
                .and_then(|o| recipients.get(&o.user_id).cloned());
            outgoing.push(compose(msg, order, to)?);
        }
        self.write(tx, outgoing).await
    }

    /// Records notifications not recorded before, and sends those.
    async fn write(&self, tx: &mut AnyConnection, outgoing: Vec<Outgoing>) -> Result<(), Failure> {
        let now = bazaar_chassis::now();
        let mut inserted = std::collections::HashSet::new();
        // 7 parameters a row: well under either database's limit.
        for chunk in outgoing.chunks(500) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p: Vec<String> = (1..=7).map(|k| format!("${}", 7 * i + k)).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO notifications (id, user_id, email, kind, subject, body, created_at)
                 VALUES {} ON CONFLICT (id) DO NOTHING RETURNING id",
                rows.join(", ")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for n in chunk {
                query = query
                    .bind(&n.id)
                    .bind(&n.user_id)
                    .bind(&n.email)
                    .bind(&n.kind)
                    .bind(&n.subject)
                    .bind(&n.body)
                    .bind(&now);
            }
            for row in query.fetch_all(&mut *tx).await.map_err(retry)? {
                inserted.insert(row.try_get::<String, _>("id").map_err(retry)?);
            }
        }
        for n in &outgoing {
            // `remove`: the same notification twice in a batch is sent once.
            if !inserted.remove(&n.id) {
                tracing::debug!(id = %n.id, "already notified");
                continue;
            }
            // Sent before the commit: if sending fails the rows are rolled
            // back and the notifications retried.
            self.channels.send(n).await.map_err(Failure::Retry)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bazaar_bus::{Envelope, Failure, Received};
    use bazaar_chassis::messaging::Effects;
    use bazaar_contracts::topics::{ORDER_CANCELLED, ORDER_CONFIRMED, USER_PROFILE_UPDATED};
    use bazaar_contracts::{Order, OrderItem};
    use sqlx::Row;

    fn received(kind: &str, payload: &impl serde::Serialize) -> Received {
        Received::first(Envelope::new(kind, payload).unwrap())
    }

    fn order(id: &str, user: &str) -> Order {
        Order {
            id: id.into(),
            user_id: user.into(),
            user_email: format!("{user}@order.example"),
            user_name: None,
            items: vec![OrderItem {
                product_id: "p".into(),
                name: "Lamp".into(),
                unit_price: 250,
                quantity: 2,
            }],
            total: 500,
            currency: "USD".into(),
            status: "CONFIRMED".into(),
            cancel_reason: None,
            created_at: "2026-12-05T00:00:00Z".into(),
            updated_at: "2026-12-05T00:00:00Z".into(),
        }
    }

    #[tokio::test]
    async fn a_batch_looks_its_recipients_up_once_and_writes_each_notification_once() {
        let dir = std::env::temp_dir().join(format!("bazaar-notify-{}", uuid::Uuid::now_v7()));
        let config = bazaar_chassis::Config {
            data_dir: dir,
            ..Default::default()
        };
        let db = bazaar_chassis::db::connect(&config, "notifications", &crate::MIGRATOR)
            .await
            .unwrap();
        let notify = super::Notify {
            channels: super::Channels::from_config(&config).unwrap(),
        };
        let mut tx = db.write.begin().await.unwrap();
        sqlx::query("INSERT INTO recipients (user_id, email, name, updated_at) VALUES ('u1', 'ann@now.example', 'Ann', 'x')")
            .execute(&mut *tx)
            .await
            .unwrap();
        let confirmed = received(ORDER_CONFIRMED, &order("o1", "u1"));
        // The same event again, under another message id.
        let again = received(ORDER_CONFIRMED, &order("o1", "u1"));
        let cancelled = received(ORDER_CANCELLED, &order("o2", "u2"));
        let batch = [&confirmed, &again, &cancelled];
        assert_eq!(notify.apply_many(&mut tx, &batch).await, Some(Ok(())));
        let rows = sqlx::query("SELECT id, email, body FROM notifications ORDER BY id")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let rows: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| (r.get("id"), r.get("email"), r.get("body")))
            .collect();
        assert_eq!(rows.len(), 2, "{rows:?}");
        // The replica's address and name where it has the user, else the order's.
        assert_eq!(rows[0].0, "order.cancelled:o2");
        assert_eq!(rows[0].1, "u2@order.example");
        assert_eq!(rows[1].0, "order.confirmed:o1");
        assert_eq!(rows[1].1, "ann@now.example");
        assert!(
            rows[1].2.starts_with("Hello Ann, your order"),
            "{}",
            rows[1].2
        );
        // One by one, an event already notified writes nothing.
        notify.apply(&mut tx, &confirmed).await.unwrap();
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM notifications")
            .fetch_one(&mut *tx)
            .await
            .unwrap()
            .get("n");
        assert_eq!(n, 2);
        // A profile event in the batch: one by one, in order.
        let profile = received(USER_PROFILE_UPDATED, &serde_json::json!({"id": "u1"}));
        assert_eq!(
            notify.apply_many(&mut tx, &[&profile, &confirmed]).await,
            None
        );
        // A bad payload fails the batch, which the inbox then takes apart.
        let bad = received(ORDER_CONFIRMED, &serde_json::json!({"id": 7}));
        assert!(matches!(
            notify.apply_many(&mut tx, &[&confirmed, &bad]).await,
            Some(Err(Failure::Reject(_)))
        ));
    }
}
