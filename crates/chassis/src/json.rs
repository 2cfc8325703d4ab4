//! A JSON extractor whose rejections are problem+json: malformed → 400,
//! wrong shape → 422, too large → 413, wrong content type → 415.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Problem;

/// Like `axum::Json`, with rejections as [`Problem`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(rejection_problem(&rejection)),
        }
    }
}

fn rejection_problem(rejection: &JsonRejection) -> Problem {
    let status = rejection.status();
    let slug = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::UNPROCESSABLE_ENTITY => "validation",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        _ => "bad-request",
    };
    Problem::new(status, slug, rejection.body_text())
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
