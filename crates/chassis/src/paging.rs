//! `?limit=&offset=` query parameters, validated: limit 1–200 (default 50),
//! offset ≥ 0 (default 0). Bad values are 422, never a silent clamp.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use serde::Deserialize;

use crate::Problem;
use crate::problem::FieldError;

/// Largest page a client may ask for.
pub const MAX_LIMIT: i64 = 200;

#[derive(Debug, Deserialize)]
struct Raw {
    limit: Option<String>,
    offset: Option<String>,
    q: Option<String>,
}

/// Validated paging parameters plus the optional search text `q`.
#[derive(Debug, Clone, PartialEq, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Paging {
    /// Items per page, 1–200. Default 50.
    #[param(required = false, minimum = 1, maximum = 200, default = 50)]
    pub limit: i64,
    /// Items to skip. Default 0.
    #[param(required = false, minimum = 0, default = 0)]
    pub offset: i64,
    /// Search text.
    pub q: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Paging {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(raw) = Query::<Raw>::from_request_parts(parts, state)
            .await
            .map_err(|e| Problem::bad_request(e.body_text()))?;
        let mut errors = Vec::new();
        let mut num = |field: &str, v: Option<String>, default: i64, min: i64, max: i64| match v {
            None => default,
            Some(s) => match s.trim().parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => n,
                _ => {
                    errors.push(FieldError {
                        field: field.into(),
                        message: format!("must be an integer from {min} to {max}"),
                    });
                    default
                }
            },
        };
        let limit = num("limit", raw.limit, 50, 1, MAX_LIMIT);
        let offset = num("offset", raw.offset, 0, 0, i64::from(i32::MAX));
        if !errors.is_empty() {
            return Err(Problem::validation(errors));
        }
        let q = raw.q.map(|q| q.trim().to_owned()).filter(|q| !q.is_empty());
        Ok(Self { limit, offset, q })
    }
}
