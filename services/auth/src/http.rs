//! The auth HTTP API: register, login, refresh, me, JWKS, and the signing
//! keys' rotation (admin).

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use bazaar_chassis::auth::Claims;
use bazaar_chassis::db::Db;
use bazaar_chassis::{AuthUser, Config, Json, Problem, Verifier};
use bazaar_contracts::{TokenPair, User};
use serde::Deserialize;

use crate::domain::{NewUser, RegisterBody};
use crate::keys::SigningKeys;
use crate::secrets::{Hasher, random_token, sha256};
use crate::{AuthError, store};

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub keys: Arc<SigningKeys>,
    pub verifier: Arc<Verifier>,
    pub config: Arc<Config>,
    /// A hash of a random password, checked for unknown emails so that
    /// timing does not reveal which emails are registered.
    pub dummy_hash: Arc<str>,
    pub hasher: Arc<Hasher>,
    pub outbox: bazaar_chassis::messaging::Outbox,
}

impl FromRef<AppState> for Arc<Verifier> {
    fn from_ref(s: &AppState) -> Self {
        s.verifier.clone()
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/auth/register", post(register))
        .route("/auth/login", post(login))
        .route("/auth/refresh", post(refresh))
        .route("/auth/me", get(me))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/auth/.well-known/jwks.json", get(jwks))
        .route("/auth/keys", get(keys))
        .route("/auth/keys/rotate", post(rotate))
        .route("/auth/keys/retire", post(retire))
        .with_state(state)
}

async fn register(
    State(s): State<AppState>,
    Json(body): Json<RegisterBody>,
) -> Result<(StatusCode, Json<User>), Problem> {
    let new = NewUser::try_from(body)?;
    let hash = s.hasher.hash(new.password).await?;
    let user = User {
        id: uuid::Uuid::now_v7().to_string(),
        email: new.email.as_str().to_owned(),
        name: new.name,
        role: "customer".into(),
        created_at: bazaar_chassis::now(),
    };
    store::insert_user(&s.db.write, &user, &hash).await?;
    s.outbox.poke();
    Ok((StatusCode::CREATED, Json(user)))
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

async fn login(
    State(s): State<AppState>,
    Json(body): Json<LoginBody>,
) -> Result<Json<TokenPair>, Problem> {
    let creds = store::by_email(&s.db.read, body.email.trim().to_lowercase().as_str()).await?;
    let (hash, user) = match creds {
        Some(c) => (c.password_hash, Some(c.user)),
        None => (s.dummy_hash.to_string(), None),
    };
    let ok = s.hasher.verify(body.password, hash).await?;
    match user {
        // A login starts a new family of refresh tokens.
        Some(user) if ok => Ok(Json(
            issue(&s, &user, &uuid::Uuid::now_v7().to_string()).await?,
        )),
        _ => Err(AuthError::InvalidCredentials.into()),
    }
}

#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

async fn refresh(
    State(s): State<AppState>,
    Json(body): Json<RefreshBody>,
) -> Result<Json<TokenPair>, Problem> {
    let hash = sha256(&body.refresh_token);
    let store::Refresh::Spent { user_id, family } =
        store::consume_refresh(&s.db.write, &hash, unix_now()).await?
    else {
        return Err(AuthError::InvalidRefreshToken.into());
    };
    let user = store::by_id(&s.db.read, &user_id)
        .await?
        .ok_or(AuthError::InvalidRefreshToken)?;
    Ok(Json(issue(&s, &user, &family).await?))
}

async fn me(State(s): State<AppState>, caller: AuthUser) -> Result<Json<User>, Problem> {
    let user = store::by_id(&s.db.read, &caller.id)
        .await?
        .ok_or(AuthError::UserNotFound)?;
    Ok(Json(user))
}

async fn jwks(State(s): State<AppState>) -> Result<Json<jsonwebtoken::jwk::JwkSet>, Problem> {
    crate::keys::jwks(&s.db.read)
        .await
        .map(Json)
        .map_err(|e| AuthError::Internal(format!("{e:#}")).into())
}

/// `GET /auth/keys` (admin): the stored signing keys, oldest first.
async fn keys(
    State(s): State<AppState>,
    caller: AuthUser,
) -> Result<Json<Vec<crate::keys::KeyInfo>>, Problem> {
    caller.require_admin()?;
    crate::keys::list(&s.db.read)
        .await
        .map(Json)
        .map_err(|e| AuthError::Internal(format!("{e:#}")).into())
}

/// `POST /auth/keys/rotate` (admin): a new key signs from now on (every
/// auth instance within seconds); the old ones still verify until retired.
async fn rotate(
    State(s): State<AppState>,
    caller: AuthUser,
) -> Result<(StatusCode, Json<serde_json::Value>), Problem> {
    caller.require_admin()?;
    let kid = crate::keys::rotate(&s.db.write)
        .await
        .map_err(|e| AuthError::Internal(format!("{e:#}")))?;
    s.keys
        .reload(&s.db.write)
        .await
        .map_err(|e| AuthError::Internal(format!("{e:#}")))?;
    tracing::info!(%kid, by = %caller.id, "signing keys rotated");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "kid": kid }))))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetireBody {
    #[serde(default)]
    force: bool,
}

/// `POST /auth/keys/retire` (admin): deletes the keys whose tokens have
/// all expired (409 when none has yet, saying until when); `{"force":
/// true}` deletes every key but the newest at once.
async fn retire(
    State(s): State<AppState>,
    caller: AuthUser,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Problem> {
    caller.require_admin()?;
    // No body is `{}`.
    let force = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        serde_json::from_slice::<RetireBody>(&body)
            .map_err(|e| {
                if e.is_syntax() || e.is_eof() {
                    Problem::bad_request("the body is not valid JSON")
                } else {
                    Problem::invalid("force", "expected {\"force\": true|false}")
                }
            })?
            .force
    };
    let ttl =
        std::time::Duration::from_secs(u64::try_from(s.config.access_token_ttl_secs).unwrap_or(0));
    match crate::keys::retire(&s.db.write, ttl, force).await {
        Ok(retired) => {
            tracing::info!(?retired, force, by = %caller.id, "signing keys retired");
            Ok(Json(serde_json::json!({ "retired": retired })))
        }
        Err(crate::keys::RetireError::TooSoon(kid, until)) => Err(Problem::conflict(format!(
            "key {kid} may still have tokens in use until {until}; retire later, or force"
        ))),
        Err(crate::keys::RetireError::Db(e)) => Err(AuthError::Internal(format!("{e:#}")).into()),
    }
}

/// An access token, and a refresh token in `family`.
async fn issue(s: &AppState, user: &User, family: &str) -> Result<TokenPair, AuthError> {
    let now = unix_now();
    let claims = Claims {
        sub: user.id.clone(),
        email: user.email.clone(),
        role: user.role.clone(),
        iat: now,
        exp: now + s.config.access_token_ttl_secs,
        iss: s.config.token_issuer.clone(),
        aud: s.config.token_audience.clone(),
    };
    let access_token = s
        .keys
        .sign(&claims)
        .map_err(|e| AuthError::Internal(e.to_string()))?;
    let refresh_token = random_token(32);
    store::insert_refresh(
        &s.db.write,
        &sha256(&refresh_token),
        &user.id,
        family,
        now + s.config.refresh_token_ttl_secs,
    )
    .await?;
    Ok(TokenPair {
        access_token,
        refresh_token,
        token_type: "Bearer".into(),
        expires_in: s.config.access_token_ttl_secs,
    })
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
