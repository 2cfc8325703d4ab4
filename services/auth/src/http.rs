//! The auth HTTP API: register, login, refresh, me, JWKS, and the signing
//! keys' rotation (admin).

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::StatusCode;
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

/// The routes and their contract, from the same annotated handlers.
fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(me))
        .routes(routes!(jwks))
        .routes(routes!(keys))
        .routes(routes!(rotate))
        .routes(routes!(retire))
}

pub fn router(state: AppState) -> Router {
    api()
        .with_state(state.clone())
        .split_for_parts()
        .0
        // The JWKS at the conventional root too, for verifiers that ask
        // auth directly (not published: the gateway routes only /auth).
        .merge(
            Router::new()
                .route("/.well-known/jwks.json", axum::routing::get(jwks))
                .with_state(state),
        )
}

/// Auth's HTTP contract (OpenAPI 3.1), as the service serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// Registers a customer account.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterBody,
    responses(
        (status = 201, description = "The account made", body = User),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The email is registered already", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid email, password or name", body = Problem, content_type = "application/problem+json"),
    ))]
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
    s.outbox
        .committing(store::insert_user(&s.db.write, &user, &hash))
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(examples(json!({"email": "ada@example.com", "password": "correct horse"})))]
struct LoginBody {
    email: String,
    password: String,
}

/// Exchanges an email and password for an access and a refresh token.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginBody,
    responses(
        (status = 200, description = "The tokens", body = TokenPair),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Wrong email or password", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing", body = Problem, content_type = "application/problem+json"),
    ))]
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

#[derive(Deserialize, utoipa::ToSchema)]
struct RefreshBody {
    refresh_token: String,
}

/// Exchanges a refresh token (once) for a new pair; a token used twice
/// revokes its whole family.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshBody,
    responses(
        (status = 200, description = "The new tokens", body = TokenPair),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unknown, spent or expired refresh token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing", body = Problem, content_type = "application/problem+json"),
    ))]
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

/// The caller's account.
#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "The account", body = User),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The account is gone", body = Problem, content_type = "application/problem+json"),
    ))]
async fn me(State(s): State<AppState>, caller: AuthUser) -> Result<Json<User>, Problem> {
    let user = store::by_id(&s.db.read, &caller.id)
        .await?
        .ok_or(AuthError::UserNotFound)?;
    Ok(Json(user))
}

/// The public keys that verify access tokens (RFC 7517).
#[utoipa::path(get, path = "/auth/.well-known/jwks.json", tag = "auth",
    responses(
        (status = 200, description = "The key set", body = Jwks),
    ))]
async fn jwks(State(s): State<AppState>) -> Result<Json<jsonwebtoken::jwk::JwkSet>, Problem> {
    crate::keys::jwks(&s.db.read)
        .await
        .map(Json)
        .map_err(|e| AuthError::Internal(format!("{e:#}")).into())
}

/// The stored signing keys, oldest first (admin).
#[utoipa::path(get, path = "/auth/keys", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "The keys (no secrets)", body = Vec<crate::keys::KeyInfo>),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
    ))]
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

/// A new signing key (admin): it signs from now on (every auth instance
/// within seconds); the old ones still verify until retired.
#[utoipa::path(post, path = "/auth/keys/rotate", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 201, description = "The new key's id", body = Rotated),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
    ))]
async fn rotate(
    State(s): State<AppState>,
    caller: AuthUser,
) -> Result<(StatusCode, Json<Rotated>), Problem> {
    caller.require_admin()?;
    let kid = crate::keys::rotate(&s.db.write)
        .await
        .map_err(|e| AuthError::Internal(format!("{e:#}")))?;
    s.keys
        .reload(&s.db.write)
        .await
        .map_err(|e| AuthError::Internal(format!("{e:#}")))?;
    tracing::info!(%kid, by = %caller.id, "signing keys rotated");
    Ok((StatusCode::CREATED, Json(Rotated { kid })))
}

/// The key made by a rotation.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Rotated {
    kid: String,
}

/// The keys a retirement deleted.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Retired {
    retired: Vec<String>,
}

/// A JSON Web Key Set: `keys`, each an Ed25519 public key (`kty` OKP,
/// `crv` Ed25519, `kid`, `x`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // the schema of jsonwebtoken's JwkSet, for the contract
struct Jwks {
    keys: Vec<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RetireBody {
    #[serde(default)]
    force: bool,
}

/// Deletes the signing keys whose tokens have all expired (admin); 409
/// when none has yet, saying until when. `{"force": true}` deletes every
/// key but the newest at once. No body is `{}`.
#[utoipa::path(post, path = "/auth/keys/retire", tag = "auth", security(("bearer" = [])),
    request_body(content = Option<RetireBody>),
    responses(
        (status = 200, description = "The keys deleted", body = Retired),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Tokens signed by the old keys may still be in use", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "force is not a boolean", body = Problem, content_type = "application/problem+json"),
    ))]
async fn retire(
    State(s): State<AppState>,
    caller: AuthUser,
    body: axum::body::Bytes,
) -> Result<Json<Retired>, Problem> {
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
            Ok(Json(Retired { retired }))
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
