//! Products in the catalog database.

use bazaar_contracts::topics::{PRODUCT, PRODUCT_CREATED, PRODUCT_DELETED, PRODUCT_UPDATED};
use bazaar_contracts::{Product, ProductRef};
use sqlx::{AnyPool, AssertSqlSafe, Row};

use crate::domain::ProductInput;

const COLUMNS: &str = "id, name, description, price, currency, image_url, creator, created_at";

fn product_from(row: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        price: row.try_get("price")?,
        currency: row.try_get("currency")?,
        image_url: row.try_get("image_url")?,
        creator: row.try_get("creator")?,
        created_at: row.try_get("created_at")?,
    })
}

/// `%` and `_` in user text match themselves in `LIKE … ESCAPE '\'`.
fn like_pattern(q: &str) -> String {
    let escaped = q
        .to_lowercase()
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// A page ordered by `created_at`, then `id`, and the total matching.
pub async fn list(
    db: &AnyPool,
    q: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Product>, i64), sqlx::Error> {
    let pattern = q.map(like_pattern).unwrap_or_default();
    let filter = "($1 = '' OR lower(name) LIKE $1 ESCAPE '\\')";
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM products WHERE {filter} ORDER BY created_at, id LIMIT $2 OFFSET $3"
    )))
    .bind(&pattern)
    .bind(limit)
    .bind(offset)
    .fetch_all(db)
    .await?;
    let total: i64 = sqlx::query(AssertSqlSafe(format!(
        "SELECT COUNT(*) AS n FROM products WHERE {filter}"
    )))
    .bind(&pattern)
    .fetch_one(db)
    .await?
    .try_get("n")?;
    let items = rows.iter().map(product_from).collect::<Result<_, _>>()?;
    Ok((items, total))
}

pub async fn get(db: &AnyPool, id: &str) -> Result<Option<Product>, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM products WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(product_from).transpose()
}

/// The products with these ids (each once), in no particular order.
pub async fn get_many(db: &AnyPool, ids: &[&str]) -> Result<Vec<Product>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT {COLUMNS} FROM products WHERE id IN ({})",
        marks.join(", ")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for id in ids {
        query = query.bind(*id);
    }
    query
        .fetch_all(db)
        .await?
        .iter()
        .map(product_from)
        .collect()
}

/// The catalog version: it changes with every product change.
pub async fn version(db: &AnyPool) -> Result<i64, sqlx::Error> {
    sqlx::query("SELECT v FROM catalog_version WHERE id = 1")
        .fetch_one(db)
        .await?
        .try_get("v")
}

async fn bump_version(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE catalog_version SET v = v + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn insert(db: &AnyPool, p: &Product) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    insert_row(&mut tx, p).await?;
    bump_version(&mut tx).await?;
    tx.commit().await
}

async fn insert_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    p: &Product,
) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO products ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    )))
    .bind(&p.id)
    .bind(&p.name)
    .bind(&p.description)
    .bind(p.price)
    .bind(&p.currency)
    .bind(p.image_url.clone())
    .bind(&p.creator)
    .bind(&p.created_at)
    .execute(&mut **tx)
    .await?;
    // Inventory learns of the product (and stocks it) from this event.
    publish(tx, PRODUCT_CREATED, p).await
}

/// Puts a product event in the outbox, in the caller's transaction.
async fn publish(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    kind: &str,
    payload: &impl serde::Serialize,
) -> Result<(), sqlx::Error> {
    let event =
        bazaar_bus::Envelope::new(kind, payload).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    bazaar_chassis::messaging::enqueue(tx, &[(PRODUCT, kind, &event)]).await
}

/// Replaces a product's fields; `None` if there is no such product.
pub async fn update(
    db: &AnyPool,
    id: &str,
    input: &ProductInput,
) -> Result<Option<Product>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let row = sqlx::query(AssertSqlSafe(format!(
        "UPDATE products SET name = $2, description = $3, price = $4, currency = $5, image_url = $6 WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(&input.name)
    .bind(&input.description)
    .bind(input.price)
    .bind(&input.currency)
    .bind(input.image_url.clone())
    .fetch_optional(&mut *tx)
    .await?;
    let product = row.as_ref().map(product_from).transpose()?;
    if let Some(p) = &product {
        bump_version(&mut tx).await?;
        // Orders drops the price it cached.
        publish(&mut tx, PRODUCT_UPDATED, p).await?;
    }
    tx.commit().await?;
    Ok(product)
}

pub async fn delete(db: &AnyPool, id: &str) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin().await?;
    let r = sqlx::query("DELETE FROM products WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let deleted = r.rows_affected() == 1;
    if deleted {
        bump_version(&mut tx).await?;
        // Inventory retires the stock; orders forgets the price and
        // cancels the orders for it still in their saga.
        let gone = ProductRef {
            product_id: id.to_owned(),
        };
        publish(&mut tx, PRODUCT_DELETED, &gone).await?;
    }
    tx.commit().await?;
    Ok(deleted)
}

/// Seeds the demo catalog once per database: a marker row makes it
/// first-start-only, and replicas racing here seed it once.
pub async fn seed_demo(db: &AnyPool) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    let marked =
        sqlx::query("INSERT INTO meta (key) VALUES ('demo_seeded') ON CONFLICT (key) DO NOTHING")
            .execute(&mut *tx)
            .await?;
    if marked.rows_affected() == 0 {
        return tx.rollback().await;
    }
    for (i, (name, description, price)) in DEMO.iter().enumerate() {
        let p = Product {
            id: uuid::Uuid::now_v7().to_string(),
            name: (*name).to_owned(),
            description: (*description).to_owned(),
            price: *price,
            currency: "USD".into(),
            image_url: Some(format!("https://picsum.photos/seed/bazaar{i}/400/300")),
            creator: "seed".into(),
            created_at: bazaar_chassis::now(),
        };
        insert_row(&mut tx, &p).await?;
    }
    bump_version(&mut tx).await?;
    tx.commit().await?;
    tracing::info!(products = DEMO.len(), "demo catalog seeded");
    Ok(())
}

/// `(name, description, price in cents)`.
const DEMO: [(&str, &str, i64); 24] = [
    (
        "Ceramic Mug",
        "A 350 ml stoneware mug, dishwasher safe.",
        1299,
    ),
    (
        "Espresso Cups (set of 4)",
        "Porcelain cups with saucers.",
        2499,
    ),
    (
        "Pour-Over Kettle",
        "Gooseneck kettle, 1 litre, stainless steel.",
        4599,
    ),
    (
        "Burr Coffee Grinder",
        "Conical burrs, 40 grind settings.",
        8999,
    ),
    ("French Press", "Borosilicate glass, 1 litre.", 2999),
    ("Linen Tea Towel", "Stonewashed linen, 50 × 70 cm.", 1199),
    ("Cast Iron Skillet", "Pre-seasoned, 26 cm.", 3999),
    ("Chef's Knife", "20 cm, German steel.", 7999),
    (
        "Bamboo Cutting Board",
        "45 × 30 cm, with juice groove.",
        2299,
    ),
    ("Wool Throw", "Merino wool, 130 × 170 cm.", 8499),
    ("Scented Candle", "Cedar and amber, 45 h burn time.", 1899),
    ("Desk Lamp", "LED, dimmable, warm white.", 4999),
    ("Notebook A5", "Dotted, 192 pages, lay-flat binding.", 1499),
    ("Fountain Pen", "Fine nib, converter included.", 3499),
    ("Canvas Tote", "Heavy cotton canvas, inner pocket.", 1999),
    ("Water Bottle", "Insulated, 750 ml, keeps cold 24 h.", 2799),
    ("Wireless Earbuds", "Bluetooth 5.3, 24 h with case.", 6999),
    ("Phone Stand", "Aluminium, adjustable angle.", 1699),
    (
        "Mechanical Keyboard",
        "Tenkeyless, hot-swappable switches.",
        10999,
    ),
    (
        "Wool Socks (3 pairs)",
        "Merino blend, cushioned sole.",
        2599,
    ),
    ("Rain Jacket", "Waterproof, packable, with hood.", 11999),
    ("Yoga Mat", "6 mm, non-slip natural rubber.", 4499),
    ("Plant Pot", "Terracotta, 18 cm, with saucer.", 1599),
    ("Board Game", "Strategy game for 2–5 players.", 3999),
];
