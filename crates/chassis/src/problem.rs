//! RFC 9457 problem details: every error a client sees.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// `application/problem+json`: `{type, title, status, detail, errors?}`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    #[serde(skip)]
    retry_after: Option<u64>,
    /// A 401 for a token that was sent: its `WWW-Authenticate` says
    /// `error="invalid_token"` (every 401 carries one, RFC 9110 §11.6.1).
    #[serde(skip)]
    invalid_token: bool,
}

impl Problem {
    /// A problem with a stable slug (`type` = `https://bazaar.dev/problems/<slug>`).
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://bazaar.dev/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
            invalid_token: false,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// 422 with the fields that failed.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        let mut p = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", detail);
        p.errors = errors;
        p
    }

    /// 422 for one field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError {
            field: field.to_owned(),
            message: message.into(),
        }])
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    /// 401 for a bearer token that was sent and is not valid (RFC 6750
    /// `error="invalid_token"`).
    pub fn invalid_token(detail: impl Into<String>) -> Self {
        let mut p = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        p.invalid_token = true;
        p
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// 500: the cause is logged with its chain here and never sent to the client.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = cause.to_string();
        let mut source = cause.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error = %chain, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred",
        )
    }

    /// 503: a dependency is down; the client may retry.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// 504: a dependency did not answer in time.
    pub fn timeout(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", detail)
    }

    /// What a caller answers when a call to another service failed: the
    /// mesh's one mapping (503 unavailable or circuit open, 504 timeout,
    /// 502 bad answer), with a stable detail. The cause is logged here,
    /// never sent.
    pub fn from_call(e: &bazaar_mesh::CallError) -> Self {
        tracing::warn!(error = %e, "call failed");
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
        let slug = match e.kind {
            bazaar_mesh::ErrorKind::Timeout => "timeout",
            bazaar_mesh::ErrorKind::BadAnswer => "bad-gateway",
            bazaar_mesh::ErrorKind::InvalidRequest => "bad-request",
            _ => "unavailable",
        };
        let p = Self::new(status, slug, e.detail());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            p.retry_after(1)
        } else {
            p
        }
    }

    /// Adds `Retry-After` (seconds).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.title, self.detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (self.status_code(), body).into_response();
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == 401 {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(if self.invalid_token {
                    r#"Bearer error="invalid_token""#
                } else {
                    "Bearer"
                }),
            );
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<bazaar_mesh::CallError> for Problem {
    fn from(e: bazaar_mesh::CallError) -> Self {
        Self::from_call(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_401_carries_a_bearer_challenge() {
        let res = Problem::unauthorized("missing bearer token").into_response();
        assert_eq!(res.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let res = Problem::invalid_token("token expired").into_response();
        assert_eq!(
            res.headers()[header::WWW_AUTHENTICATE],
            r#"Bearer error="invalid_token""#
        );
        let res = Problem::new(StatusCode::UNAUTHORIZED, "x", "y").into_response();
        assert_eq!(res.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let res = Problem::forbidden("no").into_response();
        assert!(res.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
