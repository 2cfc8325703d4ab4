//! Orders and their lines in the orders database.

use std::collections::{HashMap, HashSet};

use bazaar_contracts::{CreateOrder, Order, OrderItem};
use sqlx::{AnyPool, AssertSqlSafe, Row};

const COLUMNS: &str =
    "id, user_id, user_email, total, currency, status, cancel_reason, created_at, updated_at";

fn order_from(row: &sqlx::any::AnyRow) -> Result<Order, sqlx::Error> {
    Ok(Order {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        user_email: row.try_get("user_email")?,
        items: Vec::new(),
        total: row.try_get("total")?,
        currency: row.try_get("currency")?,
        status: row.try_get("status")?,
        cancel_reason: row.try_get("cancel_reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// An order to store: the request that asked for it and its checked total.
pub struct NewOrder {
    pub request_id: String,
    pub cmd: CreateOrder,
    pub total: i64,
}

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
/// commit: a busy consumer pays a few round trips per batch, not per order).
/// A request id seen before — in the database or earlier in the batch —
/// returns the order it created then. The result lines up with `batch`.
pub async fn create_batch(db: &AnyPool, batch: &[NewOrder]) -> Result<Vec<Order>, sqlx::Error> {
    let now = bazaar_chassis::now();
    let orders: Vec<Order> = batch
        .iter()
        .map(|n| Order {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: n.cmd.user_id.clone(),
            user_email: n.cmd.user_email.clone(),
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
        return Ok(orders);
    }

    let mut tx = db.begin().await?;
    let sql = format!(
        "INSERT INTO orders (id, request_id, user_id, user_email, total, currency, status, created_at, updated_at)
         VALUES {} ON CONFLICT (request_id) DO NOTHING RETURNING id",
        placeholders(orders.len(), 9)
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
            .bind(&order.updated_at);
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
    tx.commit().await?;

    let mut out = Vec::with_capacity(orders.len());
    for (order, new) in orders.into_iter().zip(batch) {
        if inserted.contains(&order.id) {
            out.push(order);
        } else {
            out.push(
                by_request(db, &new.request_id)
                    .await?
                    .ok_or(sqlx::Error::RowNotFound)?,
            );
        }
    }
    Ok(out)
}

async fn by_request(db: &AnyPool, request_id: &str) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE request_id = $1"
    )))
    .bind(request_id)
    .fetch_optional(db)
    .await?;
    with_items(db, row.iter().map(order_from).collect::<Result<_, _>>()?)
        .await
        .map(|mut v| v.pop())
}

pub async fn get(db: &AnyPool, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await?;
    with_items(db, row.iter().map(order_from).collect::<Result<_, _>>()?)
        .await
        .map(|mut v| v.pop())
}

/// A user's orders, newest first, and how many they have.
pub async fn list_for_user(
    db: &AnyPool,
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
    .fetch_all(db)
    .await?;
    let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(db)
        .await?
        .try_get("n")?;
    let orders = rows.iter().map(order_from).collect::<Result<_, _>>()?;
    Ok((with_items(db, orders).await?, total))
}

/// Fills in the lines of each order with one query.
async fn with_items(db: &AnyPool, mut orders: Vec<Order>) -> Result<Vec<Order>, sqlx::Error> {
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
    for row in query.fetch_all(db).await? {
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
        }
    }

    #[tokio::test]
    async fn a_batch_stores_each_request_once() {
        let (db, dir) = db().await;
        let batch = [new("a", "u1", 2), new("b", "u2", 1), new("a", "u1", 2)];
        let stored = create_batch(&db.write, &batch).await.unwrap();
        assert_eq!(stored.len(), 3);
        assert_eq!(
            stored[0].id, stored[2].id,
            "a repeated request id gets the first order"
        );
        assert_ne!(stored[0].id, stored[1].id);
        assert_eq!(stored[1].user_id, "u2");

        // Redelivered later: the same order again, nothing new stored.
        let again = create_batch(&db.write, &[new("a", "u1", 2)]).await.unwrap();
        assert_eq!(again[0].id, stored[0].id);
        assert_eq!(again[0].items.len(), 2);
        let (u1, n1) = list_for_user(&db.read, "u1", 50, 0).await.unwrap();
        assert_eq!((n1, u1[0].items.len()), (1, 2));
        assert_eq!(u1[0].items[1].product_id, "p1");

        // More lines than one statement carries.
        let big = create_batch(&db.write, &[new("c", "u3", LINES_PER_STATEMENT + 7)])
            .await
            .unwrap();
        let read = get(&db.read, &big[0].id).await.unwrap().unwrap();
        assert_eq!(read.items.len(), LINES_PER_STATEMENT + 7);
        let _ = std::fs::remove_dir_all(dir);
    }
}
