//! Orders and their lines in the orders database.

use std::collections::HashMap;

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

/// Stores a new PENDING order and its lines in one transaction. A request
/// id seen before returns the order it created then.
pub async fn create(
    db: &AnyPool,
    request_id: &str,
    cmd: &CreateOrder,
    total: i64,
) -> Result<Order, sqlx::Error> {
    let now = bazaar_chassis::now();
    let order = Order {
        id: uuid::Uuid::now_v7().to_string(),
        user_id: cmd.user_id.clone(),
        user_email: cmd.user_email.clone(),
        items: cmd.items.clone(),
        total,
        currency: cmd.currency.clone(),
        status: "PENDING".into(),
        cancel_reason: None,
        created_at: now.clone(),
        updated_at: now,
    };
    let mut tx = db.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO orders (id, request_id, user_id, user_email, total, currency, status, cancel_reason, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, $9)",
    )
    .bind(&order.id)
    .bind(request_id)
    .bind(&order.user_id)
    .bind(&order.user_email)
    .bind(order.total)
    .bind(&order.currency)
    .bind(&order.status)
    .bind(&order.created_at)
    .bind(&order.updated_at)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            tx.rollback().await?;
            return by_request(db, request_id)
                .await?
                .ok_or(sqlx::Error::RowNotFound);
        }
        Err(e) => return Err(e),
    }
    // All lines in one statement: fewer round trips per order.
    let marks: Vec<String> = (0..order.items.len())
        .map(|i| {
            let b = i * 6;
            format!(
                "(${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6
            )
        })
        .collect();
    let sql = format!(
        "INSERT INTO order_items (order_id, position, product_id, name, unit_price, quantity) VALUES {}",
        marks.join(", ")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (pos, item) in order.items.iter().enumerate() {
        query = query
            .bind(&order.id)
            .bind(i64::try_from(pos).unwrap_or(i64::MAX))
            .bind(&item.product_id)
            .bind(&item.name)
            .bind(item.unit_price)
            .bind(item.quantity);
    }
    query.execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(order)
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
