//! Stock and reservations. Every change runs inside the caller's
//! transaction; each is idempotent by order id.

use std::collections::BTreeMap;

use bazaar_contracts::{Stock, StockLine};
use sqlx::{AnyConnection, Row};

/// Most units a product can hold in stock, and most one order can
/// reserve of it. With every amount below this, no sum of `available`
/// and `reserved` can leave 64 bits (SQLite would store a float).
pub const MAX_STOCK: i64 = 1_000_000_000;

/// What became of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Reserved,
    Rejected,
    Released,
    Committed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "RESERVED",
            Self::Rejected => "REJECTED",
            Self::Released => "RELEASED",
            Self::Committed => "COMMITTED",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RESERVED" => Self::Reserved,
            "REJECTED" => Self::Rejected,
            "RELEASED" => Self::Released,
            "COMMITTED" => Self::Committed,
            _ => return None,
        })
    }
}

pub async fn status(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<Outcome>, sqlx::Error> {
    let row = sqlx::query("SELECT status FROM reservations WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let s: String = row.try_get("status")?;
            Outcome::parse(&s).map(Some).ok_or_else(|| {
                sqlx::Error::Decode(format!("unknown reservation status {s}").into())
            })
        }
    }
}

async fn set_status(
    conn: &mut AnyConnection,
    order_id: &str,
    outcome: Outcome,
) -> Result<(), sqlx::Error> {
    let now = bazaar_chassis::now();
    sqlx::query(
        "INSERT INTO reservations (order_id, status, created_at, updated_at) VALUES ($1, $2, $3, $3)
         ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
    )
    .bind(order_id)
    .bind(outcome.as_str())
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// The product was deleted: no more of it can be reserved. A product
/// inventory has not heard of yet gets a retired row, so that a late
/// `product.created` does not stock it.
pub async fn retire(conn: &mut AnyConnection, product_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stock (product_id, available, reserved, updated_at, retired) VALUES ($1, 0, 0, $2, 1)
         ON CONFLICT (product_id) DO UPDATE SET retired = 1, updated_at = excluded.updated_at",
    )
    .bind(product_id)
    .bind(bazaar_chassis::now())
    .execute(conn)
    .await?;
    Ok(())
}

/// Starts a reservation as RESERVED; `false` if the order has one already.
async fn open(conn: &mut AnyConnection, order_id: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO reservations (order_id, status, created_at, updated_at) VALUES ($1, 'RESERVED', $2, $2)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(bazaar_chassis::now())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Moves a RESERVED reservation to `to` and takes its held units out of
/// `reserved`: back to `available` if `restock`, out of stock for good if
/// not. `false` if it is no longer RESERVED (another transaction settled
/// it first). Two statements, however many lines the order has.
async fn settle(
    conn: &mut AnyConnection,
    order_id: &str,
    to: Outcome,
    restock: bool,
) -> Result<bool, sqlx::Error> {
    let now = bazaar_chassis::now();
    // Claimed first: of two transactions settling the same order at once
    // (a command and the expiry sweep, or two replicas), only the one
    // whose update finds it still RESERVED moves its units.
    let claimed = sqlx::query(
        "UPDATE reservations SET status = $2, updated_at = $3 WHERE order_id = $1 AND status = 'RESERVED'
         RETURNING (SELECT COUNT(*) FROM reservation_lines WHERE order_id = $1) AS lines",
    )
    .bind(order_id)
    .bind(to.as_str())
    .bind(&now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(claimed) = claimed else {
        return Ok(false);
    };
    let lines: i64 = claimed.try_get("lines")?;
    let moved = sqlx::query(
        "UPDATE stock SET available = available + $3 * l.quantity, reserved = reserved - l.quantity, updated_at = $2
         FROM reservation_lines l
         WHERE l.order_id = $1 AND stock.product_id = l.product_id AND stock.reserved >= l.quantity",
    )
    .bind(order_id)
    .bind(&now)
    .bind(i64::from(restock))
    .execute(&mut *conn)
    .await?;
    if i64::try_from(moved.rows_affected()) != Ok(lines) {
        return Err(sqlx::Error::Protocol(format!(
            "stock has fewer reserved units than order {order_id} holds"
        )));
    }
    Ok(true)
}

/// Creates a product's stock row if it has none.
pub async fn ensure(
    conn: &mut AnyConnection,
    product_id: &str,
    units: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stock (product_id, available, reserved, updated_at) VALUES ($1, $2, 0, $3)
         ON CONFLICT (product_id) DO NOTHING",
    )
    .bind(product_id)
    .bind(units)
    .bind(bazaar_chassis::now())
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds `delta_available` and `delta_reserved` to a product's stock, only if
/// neither goes negative and, when units are taken from `available`, the
/// product is not retired; `false` if it would have.
async fn shift(
    conn: &mut AnyConnection,
    product_id: &str,
    delta_available: i64,
    delta_reserved: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE stock SET available = available + $2, reserved = reserved + $3, updated_at = $4
         WHERE product_id = $1 AND available + $2 >= 0 AND reserved + $3 >= 0
           AND (retired = 0 OR $2 >= 0)",
    )
    .bind(product_id)
    .bind(delta_available)
    .bind(delta_reserved)
    .bind(bazaar_chassis::now())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Holds the units of an order, all or nothing. A second call for the same
/// order changes nothing and returns the first call's outcome.
pub async fn reserve(
    conn: &mut AnyConnection,
    order_id: &str,
    lines: &[StockLine],
    default_stock: i64,
) -> Result<Outcome, sqlx::Error> {
    // The row first, as RESERVED: a second call for the same order (or
    // one racing this, which waits on the row) finds it and gets its outcome.
    if !open(conn, order_id).await? {
        let done = status(conn, order_id)
            .await?
            .ok_or_else(|| sqlx::Error::Protocol(format!("reservation {order_id} vanished")))?;
        // A reservation released before it arrived (the order timed out) is refused.
        return Ok(match done {
            Outcome::Released => Outcome::Rejected,
            other => other,
        });
    }
    // Sorted by product, so concurrent transactions lock rows in one order.
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for line in lines {
        let units = wanted.entry(line.product_id.as_str()).or_default();
        match units.checked_add(line.quantity) {
            // More than any stock can hold: it cannot be in stock.
            Some(sum) if (1..=MAX_STOCK).contains(&sum) => *units = sum,
            _ => {
                set_status(conn, order_id, Outcome::Rejected).await?;
                return Ok(Outcome::Rejected);
            }
        }
    }
    let mut taken = Vec::new();
    let mut short = false;
    for (product, &quantity) in &wanted {
        let mut held = shift(conn, product, -quantity, quantity).await?;
        if !held && get(conn, product).await?.is_none() {
            // A product inventory has not heard of yet: it starts with the default stock.
            ensure(conn, product, default_stock).await?;
            held = shift(conn, product, -quantity, quantity).await?;
        }
        if held {
            taken.push((*product, quantity));
        } else {
            short = true;
            break;
        }
    }
    if short {
        for (product, quantity) in taken {
            shift(conn, product, quantity, -quantity).await?;
        }
        set_status(conn, order_id, Outcome::Rejected).await?;
        return Ok(Outcome::Rejected);
    }
    for (product, quantity) in wanted {
        sqlx::query(
            "INSERT INTO reservation_lines (order_id, product_id, quantity) VALUES ($1, $2, $3)",
        )
        .bind(order_id)
        .bind(product)
        .bind(quantity)
        .execute(&mut *conn)
        .await?;
    }
    Ok(Outcome::Reserved)
}

/// Returns an order's held units to `available`. `true` if this call
/// released something or recorded that nothing may be reserved any more.
pub async fn release(conn: &mut AnyConnection, order_id: &str) -> Result<bool, sqlx::Error> {
    match status(conn, order_id).await? {
        None => {
            set_status(conn, order_id, Outcome::Released).await?;
            Ok(true)
        }
        Some(Outcome::Reserved) => settle(conn, order_id, Outcome::Released, true).await,
        Some(_) => Ok(false),
    }
}

/// The order is confirmed: its held units leave `reserved` for good.
pub async fn commit(conn: &mut AnyConnection, order_id: &str) -> Result<bool, sqlx::Error> {
    if !settle(conn, order_id, Outcome::Committed, false).await? {
        if status(conn, order_id).await? == Some(Outcome::Released) {
            // Released before the commit came (expired): the order was
            // confirmed without its units held. Loud, not silent.
            tracing::error!(order_id, "commit of a reservation already released");
        }
        return Ok(false);
    }
    Ok(true)
}

/// Orders whose units have been held since before `before` (a
/// timestamp as [`bazaar_chassis::now`] writes them), oldest first.
pub async fn held_since(
    conn: &mut AnyConnection,
    before: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT order_id FROM reservations WHERE status = 'RESERVED' AND updated_at < $1
         ORDER BY updated_at LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| r.try_get("order_id")).collect()
}

pub async fn get(conn: &mut AnyConnection, product_id: &str) -> Result<Option<Stock>, sqlx::Error> {
    let row =
        sqlx::query("SELECT product_id, available, reserved FROM stock WHERE product_id = $1")
            .bind(product_id)
            .fetch_optional(conn)
            .await?;
    row.map(|r| {
        Ok(Stock {
            product_id: r.try_get("product_id")?,
            available: r.try_get("available")?,
            reserved: r.try_get("reserved")?,
        })
    })
    .transpose()
}

/// Sets the sellable units of a product (creating its row if needed);
/// `available` is at most [`MAX_STOCK`] (checked at the edge).
pub async fn set_available(
    conn: &mut AnyConnection,
    product_id: &str,
    available: i64,
) -> Result<Stock, sqlx::Error> {
    if !(0..=MAX_STOCK).contains(&available) {
        return Err(sqlx::Error::Protocol(format!(
            "stock {available} is outside 0..={MAX_STOCK}"
        )));
    }
    sqlx::query(
        "INSERT INTO stock (product_id, available, reserved, updated_at) VALUES ($1, $2, 0, $3)
         ON CONFLICT (product_id) DO UPDATE SET available = excluded.available, updated_at = excluded.updated_at",
    )
    .bind(product_id)
    .bind(available)
    .bind(bazaar_chassis::now())
    .execute(&mut *conn)
    .await?;
    get(conn, product_id).await?.ok_or(sqlx::Error::RowNotFound)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) async fn db() -> bazaar_chassis::db::Db {
        let dir = std::env::temp_dir().join(format!("bazaar-inventory-{}", uuid::Uuid::now_v7()));
        let config = bazaar_chassis::Config {
            data_dir: dir,
            ..Default::default()
        };
        bazaar_chassis::db::connect(&config, "inventory", &crate::MIGRATOR)
            .await
            .expect("db")
    }

    fn line(product: &str, quantity: i64) -> StockLine {
        StockLine {
            product_id: product.into(),
            quantity,
        }
    }

    #[tokio::test]
    async fn reservations_that_never_end_are_found_by_age_and_released_once() {
        let db = db().await;
        let mut conn = db.write.acquire().await.expect("conn");
        set_available(&mut conn, "p", 10).await.expect("stock");
        assert_eq!(
            reserve(&mut conn, "ghost", &[line("p", 5)], 100)
                .await
                .expect("r"),
            Outcome::Reserved
        );
        let later = bazaar_chassis::from_now(std::time::Duration::from_secs(1));
        let earlier = bazaar_chassis::ago(std::time::Duration::from_secs(1));
        assert!(
            held_since(&mut conn, &earlier, 10)
                .await
                .expect("q")
                .is_empty()
        );
        assert_eq!(
            held_since(&mut conn, &later, 10).await.expect("q"),
            ["ghost"]
        );
        assert!(release(&mut conn, "ghost").await.expect("release"));
        assert!(!release(&mut conn, "ghost").await.expect("again"));
        assert!(!commit(&mut conn, "ghost").await.expect("late commit"));
        assert!(
            held_since(&mut conn, &later, 10)
                .await
                .expect("q")
                .is_empty()
        );
        let s = get(&mut conn, "p").await.expect("get").expect("row");
        assert_eq!((s.available, s.reserved), (10, 0));
    }

    #[tokio::test]
    async fn settling_moves_every_line_once() {
        let db = db().await;
        let mut conn = db.write.acquire().await.expect("conn");
        for p in ["p", "q"] {
            set_available(&mut conn, p, 10).await.expect("stock");
        }
        let both = [line("q", 3), line("p", 2), line("q", 1)];
        for order in ["kept", "dropped"] {
            assert_eq!(
                reserve(&mut conn, order, &both, 100).await.expect("r"),
                Outcome::Reserved
            );
        }
        let units = |s: Option<Stock>| s.map(|s| (s.available, s.reserved));
        assert_eq!(units(get(&mut conn, "q").await.expect("q")), Some((2, 8)));
        assert!(commit(&mut conn, "kept").await.expect("commit"));
        assert!(!commit(&mut conn, "kept").await.expect("again"));
        assert!(release(&mut conn, "dropped").await.expect("release"));
        assert!(!release(&mut conn, "dropped").await.expect("again"));
        assert_eq!(units(get(&mut conn, "p").await.expect("p")), Some((8, 0)));
        assert_eq!(units(get(&mut conn, "q").await.expect("q")), Some((6, 0)));
        // Fewer units reserved than the order holds: an error, not a
        // stock quietly short of its count.
        assert_eq!(
            reserve(&mut conn, "short", &[line("p", 1)], 100)
                .await
                .expect("r"),
            Outcome::Reserved
        );
        sqlx::query("UPDATE stock SET reserved = 0 WHERE product_id = 'p'")
            .execute(&mut *conn)
            .await
            .expect("corrupt");
        assert!(commit(&mut conn, "short").await.is_err());
    }

    #[tokio::test]
    async fn a_deleted_products_stock_is_retired() {
        let db = db().await;
        let mut conn = db.write.acquire().await.expect("conn");
        set_available(&mut conn, "p", 10).await.expect("stock");
        retire(&mut conn, "p").await.expect("retire");
        assert_eq!(
            reserve(&mut conn, "o", &[line("p", 1)], 100)
                .await
                .expect("r"),
            Outcome::Rejected
        );
        retire(&mut conn, "unheard-of").await.expect("retire");
        ensure(&mut conn, "unheard-of", 100)
            .await
            .expect("late create");
        assert_eq!(
            reserve(&mut conn, "o2", &[line("unheard-of", 1)], 100)
                .await
                .expect("r"),
            Outcome::Rejected
        );
    }

    #[tokio::test]
    async fn stock_overflow_corrupts_a_row_no_more() {
        let db = db().await;
        let mut conn = db.write.acquire().await.expect("conn");
        assert!(set_available(&mut conn, "p", i64::MAX).await.is_err());
        set_available(&mut conn, "p", MAX_STOCK).await.expect("max");
        assert_eq!(
            reserve(&mut conn, "o1", &[line("p", 1)], 100)
                .await
                .expect("r"),
            Outcome::Reserved
        );
        // The admin sets the stock again while one unit is held, then
        // the hold is released: the row stays integer and readable.
        set_available(&mut conn, "p", MAX_STOCK).await.expect("max");
        assert!(release(&mut conn, "o1").await.expect("release"));
        let s = get(&mut conn, "p").await.expect("get").expect("row");
        assert_eq!((s.available, s.reserved), (MAX_STOCK + 1, 0));
        // Quantities past any stock, or summing past 64 bits, are refused
        // without touching the row.
        for (order, lines) in [
            ("o2", vec![line("p", i64::MAX)]),
            ("o3", vec![line("p", i64::MAX), line("p", 2)]),
            ("o4", vec![line("p", MAX_STOCK), line("p", 1)]),
        ] {
            assert_eq!(
                reserve(&mut conn, order, &lines, 100).await.expect("r"),
                Outcome::Rejected,
                "{order}"
            );
        }
        let s = get(&mut conn, "p").await.expect("get").expect("row");
        assert_eq!((s.available, s.reserved), (MAX_STOCK + 1, 0));
    }
}
