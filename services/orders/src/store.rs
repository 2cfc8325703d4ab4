//! Orders and their lines in the orders database.

use std::collections::{HashMap, HashSet};

use bazaar_bus::Envelope;
use bazaar_chassis::messaging;
use bazaar_contracts::topics::{ORDER, ORDER_CREATED};
use bazaar_contracts::{CreateOrder, Order, OrderItem};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Row};

use crate::saga;

/// An order's columns, with its buyer's name from the profile replica.
pub(crate) const COLUMNS: &str =
    "id, user_id, user_email, total, currency, status, cancel_reason, created_at, updated_at,
     (SELECT name FROM buyers WHERE buyers.user_id = orders.user_id AND deleted = 0) AS user_name";

pub(crate) fn order_from(row: &sqlx::any::AnyRow) -> Result<Order, sqlx::Error> {
    Ok(Order {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        user_email: row.try_get("user_email")?,
        user_name: row.try_get("user_name")?,
        items: Vec::new(),
        total: row.try_get("total")?,
        currency: row.try_get("currency")?,
        status: row.try_get("status")?,
        cancel_reason: row.try_get("cancel_reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// An order to store: the request that asked for it, its checked total,
/// and the trace context its saga's messages carry.
pub struct NewOrder {
    pub request_id: String,
    pub cmd: CreateOrder,
    pub total: i64,
    pub traceparent: Option<String>,
    pub http_request_id: Option<String>,
}

/// A stored order, and whether this call created it (`false`: the request
/// id had created it before).
pub type Stored = (Order, bool);

/// `($1, $2, …), ($n+1, …)`: placeholders for `rows` rows of `width` values.
fn placeholders(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let marks: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
            format!("({})", marks.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Lines per `INSERT`, well under SQLite's and PostgreSQL's parameter limits.
const LINES_PER_STATEMENT: usize = 500;

/// Stores new PENDING orders with their lines in one transaction (group
/// commit: a busy consumer pays a few round trips per batch, not per order),
/// and starts each one's saga: `inventory.reserve` and `order.created` go
/// into the outbox in the same transaction. A request id seen before — in
/// the database or earlier in the batch — returns the order it created
/// then. The result lines up with `batch`.
pub async fn create_batch(
    db: &AnyPool,
    batch: &[NewOrder],
    step_timeout: std::time::Duration,
) -> Result<Vec<Stored>, sqlx::Error> {
    let now = bazaar_chassis::now();
    let deadline = saga::deadline(step_timeout);
    let orders: Vec<Order> = batch
        .iter()
        .map(|n| Order {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: n.cmd.user_id.clone(),
            user_email: n.cmd.user_email.clone(),
            user_name: None,
            items: n.cmd.items.clone(),
            total: n.total,
            currency: n.cmd.currency.clone(),
            status: "PENDING".into(),
            cancel_reason: None,
            created_at: now.clone(),
            updated_at: now.clone(),
        })
        .collect();
    if orders.is_empty() {
        return Ok(Vec::new());
    }

    let mut tx = db.begin().await?;
    let sql = format!(
        "INSERT INTO orders (id, request_id, user_id, user_email, total, currency, status, created_at, updated_at, saga_step, step_deadline, traceparent)
         VALUES {} ON CONFLICT (request_id) DO NOTHING RETURNING id",
        placeholders(orders.len(), 12)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (order, new) in orders.iter().zip(batch) {
        query = query
            .bind(&order.id)
            .bind(&new.request_id)
            .bind(&order.user_id)
            .bind(&order.user_email)
            .bind(order.total)
            .bind(&order.currency)
            .bind(&order.status)
            .bind(&order.created_at)
            .bind(&order.updated_at)
            .bind(saga::RESERVING)
            .bind(&deadline)
            .bind(&new.traceparent);
    }
    let inserted: HashSet<String> = query
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;

    let lines: Vec<(&Order, usize, &OrderItem)> = orders
        .iter()
        .filter(|o| inserted.contains(&o.id))
        .flat_map(|o| {
            o.items
                .iter()
                .enumerate()
                .map(move |(pos, item)| (o, pos, item))
        })
        .collect();
    for chunk in lines.chunks(LINES_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO order_items (order_id, position, product_id, name, unit_price, quantity) VALUES {}",
            placeholders(chunk.len(), 6)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (order, pos, item) in chunk {
            query = query
                .bind(&order.id)
                .bind(i64::try_from(*pos).unwrap_or(i64::MAX))
                .bind(&item.product_id)
                .bind(&item.name)
                .bind(item.unit_price)
                .bind(item.quantity);
        }
        query.execute(&mut *tx).await?;
    }

    let mut messages: Vec<(&str, &str, Envelope)> = Vec::new();
    for (order, new) in orders.iter().zip(batch) {
        if !inserted.contains(&order.id) {
            continue;
        }
        let trace = (new.traceparent.as_deref(), new.http_request_id.as_deref());
        // Inventory holds the units on it: the saga's first step.
        messages.push((
            ORDER,
            ORDER_CREATED,
            saga::message(&order.id, trace, ORDER_CREATED, order)?,
        ));
    }
    let refs: Vec<(&str, &str, &Envelope)> = messages.iter().map(|(e, k, m)| (*e, *k, m)).collect();
    for chunk in refs.chunks(200) {
        messaging::enqueue(&mut tx, chunk).await?;
    }
    tx.commit().await?;

    let mut out = Vec::with_capacity(orders.len());
    // Only repeated request ids need a read, so most batches need no connection.
    let mut conn = None;
    for (order, new) in orders.into_iter().zip(batch) {
        if inserted.contains(&order.id) {
            out.push((order, true));
        } else {
            let conn = match &mut conn {
                Some(c) => c,
                None => conn.insert(db.acquire().await?),
            };
            let existing = by_request(conn, &new.request_id)
                .await?
                .ok_or(sqlx::Error::RowNotFound)?;
            out.push((existing, false));
        }
    }
    Ok(out)
}

pub async fn by_request(
    conn: &mut AnyConnection,
    request_id: &str,
) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE request_id = $1"
    )))
    .bind(request_id)
    .fetch_optional(&mut *conn)
    .await?;
    with_items(conn, row.iter().map(order_from).collect::<Result<_, _>>()?)
        .await
        .map(|mut v| v.pop())
}

pub async fn get(conn: &mut AnyConnection, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    with_items(conn, row.iter().map(order_from).collect::<Result<_, _>>()?)
        .await
        .map(|mut v| v.pop())
}

/// A user's orders, newest first, and how many they have.
pub async fn list_for_user(
    db: &mut AnyConnection,
    user_id: &str,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Order>, i64), sqlx::Error> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
    )))
    .bind(user_id)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *db)
    .await?;
    let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&mut *db)
        .await?
        .try_get("n")?;
    let orders = rows.iter().map(order_from).collect::<Result<_, _>>()?;
    Ok((with_items(db, orders).await?, total))
}

/// Fills in the lines of each order with one query.
pub(crate) async fn with_items(
    db: &mut AnyConnection,
    mut orders: Vec<Order>,
) -> Result<Vec<Order>, sqlx::Error> {
    if orders.is_empty() {
        return Ok(orders);
    }
    let marks: Vec<String> = (1..=orders.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT order_id, product_id, name, unit_price, quantity FROM order_items WHERE order_id IN ({}) ORDER BY order_id, position",
        marks.join(", ")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for o in &orders {
        query = query.bind(o.id.clone());
    }
    let mut lines: HashMap<String, Vec<OrderItem>> = HashMap::new();
    for row in query.fetch_all(&mut *db).await? {
        lines
            .entry(row.try_get("order_id")?)
            .or_default()
            .push(OrderItem {
                product_id: row.try_get("product_id")?,
                name: row.try_get("name")?,
                unit_price: row.try_get("unit_price")?,
                quantity: row.try_get("quantity")?,
            });
    }
    for o in &mut orders {
        o.items = lines.remove(&o.id).unwrap_or_default();
    }
    Ok(orders)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db() -> (bazaar_chassis::db::Db, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("bazaar-orders-{}", uuid::Uuid::now_v7()));
        let config = bazaar_chassis::Config {
            data_dir: dir.clone(),
            ..Default::default()
        };
        (
            bazaar_chassis::db::connect(&config, "orders", &crate::MIGRATOR)
                .await
                .unwrap(),
            dir,
        )
    }

    fn new(request_id: &str, user: &str, lines: usize) -> NewOrder {
        let items = (0..lines)
            .map(|i| OrderItem {
                product_id: format!("p{i}"),
                name: format!("n{i}"),
                unit_price: 100,
                quantity: 1,
            })
            .collect();
        NewOrder {
            request_id: request_id.into(),
            cmd: CreateOrder {
                user_id: user.into(),
                user_email: format!("{user}@x.io"),
                currency: "USD".into(),
                items,
            },
            total: 100 * i64::try_from(lines).unwrap(),
            traceparent: None,
            http_request_id: None,
        }
    }

    #[tokio::test]
    async fn a_batch_stores_each_request_once() {
        let (db, dir) = db().await;
        let batch = [new("a", "u1", 2), new("b", "u2", 1), new("a", "u1", 2)];
        let timeout = std::time::Duration::from_secs(30);
        let stored: Vec<Order> = create_batch(&db.write, &batch, timeout)
            .await
            .unwrap()
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        assert_eq!(stored.len(), 3);
        assert_eq!(
            stored[0].id, stored[2].id,
            "a repeated request id gets the first order"
        );
        assert_ne!(stored[0].id, stored[1].id);
        assert_eq!(stored[1].user_id, "u2");

        // Redelivered later: the same order again, nothing new stored.
        let again = create_batch(&db.write, &[new("a", "u1", 2)], timeout)
            .await
            .unwrap();
        assert!(!again[0].1, "not created again");
        assert_eq!(again[0].0.id, stored[0].id);
        assert_eq!(again[0].0.items.len(), 2);
        let mut conn = db.read.acquire().await.unwrap();
        let (u1, n1) = list_for_user(&mut conn, "u1", 50, 0).await.unwrap();
        assert_eq!((n1, u1[0].items.len()), (1, 2));
        assert_eq!(u1[0].items[1].product_id, "p1");

        // More lines than one statement carries.
        let big = create_batch(
            &db.write,
            &[new("c", "u3", LINES_PER_STATEMENT + 7)],
            timeout,
        )
        .await
        .unwrap();
        let read = get(&mut conn, &big[0].0.id).await.unwrap().unwrap();
        assert_eq!(read.items.len(), LINES_PER_STATEMENT + 7);
        // Each new order started its saga: an order.created event (on
        // which inventory holds its units), once per order.
        let outbox: i64 = sqlx::query("SELECT COUNT(*) AS n FROM outbox")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        assert_eq!(outbox, 3);
        let _ = std::fs::remove_dir_all(dir);
    }
}
