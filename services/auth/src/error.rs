//! The auth service's errors and their HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bazaar_chassis::Problem;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this email is already registered")]
    EmailTaken,
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("invalid or expired refresh token")]
    InvalidRefreshToken,
    #[error("user not found")]
    UserNotFound,
    #[error("too many passwords are being checked; try again in a moment")]
    Busy,
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AuthError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            AuthError::EmailTaken => StatusCode::CONFLICT,
            AuthError::InvalidCredentials | AuthError::InvalidRefreshToken => {
                StatusCode::UNAUTHORIZED
            }
            AuthError::UserNotFound => StatusCode::NOT_FOUND,
            AuthError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Db(_) | AuthError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<AuthError> for Problem {
    fn from(e: AuthError) -> Self {
        match &e {
            AuthError::EmailTaken => Problem::new(e.status_code(), "email-taken", e.to_string()),
            AuthError::InvalidCredentials => {
                Problem::new(e.status_code(), "invalid-credentials", e.to_string())
            }
            AuthError::InvalidRefreshToken => {
                Problem::new(e.status_code(), "invalid-token", e.to_string())
            }
            AuthError::UserNotFound => Problem::not_found(e.to_string()),
            AuthError::Busy => Problem::unavailable(e.to_string()).retry_after(1),
            AuthError::Db(_) | AuthError::Internal(_) => Problem::internal(&e),
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}
