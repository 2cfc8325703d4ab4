//! Profiles in the users database. Every change commits together with its
//! `user.profile.*` event in the outbox.

use bazaar_bus::Envelope;
use bazaar_chassis::messaging;
use bazaar_contracts::Profile;
use bazaar_contracts::topics::{USER, USER_PROFILE_DELETED, USER_PROFILE_UPDATED};
use sqlx::{AnyConnection, AnyPool, Row};

use crate::domain::Change;

const COLUMNS: &str = "id, email, name, phone, address, created_at, updated_at";

fn profile_from(row: &sqlx::any::AnyRow) -> Result<Profile, sqlx::Error> {
    Ok(Profile {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        phone: row.try_get("phone")?,
        address: row.try_get("address")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

async fn publish(tx: &mut AnyConnection, kind: &str, p: &Profile) -> Result<(), sqlx::Error> {
    let event = Envelope::new(kind, p).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    messaging::enqueue(tx, &[(USER, kind, &event)]).await
}

/// The profile `id`, read from a pool or inside a transaction.
pub async fn get<'e, E>(db: E, id: &str) -> Result<Option<Profile>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let sql = format!("SELECT {COLUMNS} FROM profiles WHERE id = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?
        .as_ref()
        .map(profile_from)
        .transpose()
}

/// A new account's profile (from `user.registered`, or made by
/// `CreateUser`), published as `user.profile.updated`. One that exists
/// already takes the phone and address given, if any.
pub async fn create(tx: &mut AnyConnection, p: &Profile) -> Result<Profile, sqlx::Error> {
    if let Some(old) = get(&mut *tx, &p.id).await? {
        if p.phone.is_none() && p.address.is_none() {
            return Ok(old);
        }
        let change = Change {
            name: None,
            phone: p.phone.clone().map(Some),
            address: p.address.clone().map(Some),
        };
        return update_in(tx, old, &change).await;
    }
    sqlx::query(
        "INSERT INTO profiles (id, email, name, phone, address, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&p.id)
    .bind(&p.email)
    .bind(&p.name)
    .bind(&p.phone)
    .bind(&p.address)
    .bind(&p.created_at)
    .bind(&p.updated_at)
    .execute(&mut *tx)
    .await?;
    publish(tx, USER_PROFILE_UPDATED, p).await?;
    Ok(p.clone())
}

async fn update_in(
    tx: &mut AnyConnection,
    mut p: Profile,
    change: &Change,
) -> Result<Profile, sqlx::Error> {
    if let Some(name) = &change.name {
        p.name.clone_from(name);
    }
    if let Some(phone) = &change.phone {
        p.phone.clone_from(phone);
    }
    if let Some(address) = &change.address {
        p.address.clone_from(address);
    }
    // Strictly later than the version it replaces: replicas keep the newest.
    p.updated_at = bazaar_chassis::now().max(p.updated_at);
    sqlx::query(
        "UPDATE profiles SET name = $1, phone = $2, address = $3, updated_at = $4 WHERE id = $5",
    )
    .bind(&p.name)
    .bind(&p.phone)
    .bind(&p.address)
    .bind(&p.updated_at)
    .bind(&p.id)
    .execute(&mut *tx)
    .await?;
    publish(tx, USER_PROFILE_UPDATED, &p).await?;
    Ok(p)
}

/// Applies `change` to the profile `id`; `None` if there is none.
pub async fn update(
    db: &AnyPool,
    id: &str,
    change: &Change,
) -> Result<Option<Profile>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let Some(old) = get(&mut *tx, id).await? else {
        return Ok(None);
    };
    let p = update_in(&mut tx, old, change).await?;
    tx.commit().await?;
    Ok(Some(p))
}

/// Deletes the profile `id` and announces it (auth then deletes the
/// account); `None` if there is none.
pub async fn delete(db: &AnyPool, id: &str) -> Result<Option<Profile>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let Some(p) = get(&mut *tx, id).await? else {
        return Ok(None);
    };
    sqlx::query("DELETE FROM profiles WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    publish(&mut tx, USER_PROFILE_DELETED, &p).await?;
    tx.commit().await?;
    Ok(Some(p))
}
