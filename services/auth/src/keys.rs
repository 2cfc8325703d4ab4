//! Ed25519 signing keys, kept in the database so that restarts and
//! replicas keep accepting tokens already issued.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bazaar_chassis::auth::ED25519_PKCS8_PREFIX;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sqlx::{AnyPool, Row};

/// The key this instance signs with.
pub struct SigningKeys {
    pub kid: String,
    key: EncodingKey,
}

impl SigningKeys {
    /// The newest stored key, or a new one stored now.
    pub async fn load_or_create(db: &AnyPool) -> anyhow::Result<Self> {
        if let Some(k) = Self::newest(db).await? {
            return Ok(k);
        }
        let secret: [u8; 32] = rand::random();
        let mut der = ED25519_PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&secret);
        sqlx::query("INSERT INTO signing_keys (kid, private_der, created_at) VALUES ($1, $2, $3)")
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(STANDARD.encode(&der))
            .bind(bazaar_chassis::now())
            .execute(db)
            .await?;
        Self::newest(db)
            .await?
            .ok_or_else(|| anyhow::anyhow!("signing key vanished"))
    }

    async fn newest(db: &AnyPool) -> anyhow::Result<Option<Self>> {
        let row = sqlx::query(
            "SELECT kid, private_der FROM signing_keys ORDER BY created_at DESC, kid DESC LIMIT 1",
        )
        .fetch_optional(db)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let der = STANDARD.decode(row.try_get::<String, _>("private_der")?)?;
        Ok(Some(Self {
            kid: row.try_get("kid")?,
            key: EncodingKey::from_ed_der(&der),
        }))
    }

    /// Signs claims as an EdDSA JWT carrying this key's id.
    pub fn sign(
        &self,
        claims: &impl serde::Serialize,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
    }
}

/// The public halves of every stored key.
pub async fn jwks(db: &AnyPool) -> anyhow::Result<JwkSet> {
    let rows = sqlx::query("SELECT kid, private_der FROM signing_keys ORDER BY created_at")
        .fetch_all(db)
        .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        let der = STANDARD.decode(row.try_get::<String, _>("private_der")?)?;
        let mut jwk = Jwk::from_encoding_key(&EncodingKey::from_ed_der(&der), Algorithm::EdDSA)?;
        jwk.common.key_id = Some(row.try_get("kid")?);
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk.common.key_algorithm = Some(KeyAlgorithm::EdDSA);
        keys.push(jwk);
    }
    Ok(JwkSet { keys })
}
