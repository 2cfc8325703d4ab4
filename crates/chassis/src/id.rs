//! Ids as they enter a service: every id is a UUID, checked at the edge
//! (path, body) before it reaches a query, a cache key or another
//! service's URL. Anything else is 422 naming the field.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;

use crate::Problem;

/// `raw` as a canonical (lower-case, hyphenated) UUID string, or 422 for
/// `field`.
pub fn parse(field: &str, raw: &str) -> Result<String, Problem> {
    // Only the hyphenated form: `{…}`, `urn:uuid:…` and bare hex would
    // name the same id under several strings.
    if raw.len() != uuid::fmt::Hyphenated::LENGTH {
        return Err(not_an_id(field, raw));
    }
    uuid::Uuid::try_parse(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| not_an_id(field, raw))
}

/// 422 naming the field and (the start of) the value, escaped.
fn not_an_id(field: &str, raw: &str) -> Problem {
    let shown: String = raw.chars().take(64).collect();
    Problem::invalid(field, format!("{shown:?} is not an id (a UUID)"))
}

/// The one path parameter of a route, checked by [`parse`] under its
/// own name (`/inventory/{product_id}` → `product_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| Problem::bad_request("the path could not be read"))?;
        let (name, value) = params
            .iter()
            .next()
            .ok_or_else(|| Problem::bad_request("the path names no id"))?;
        parse(name, value).map(PathId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_uuids_are_ids() {
        let id = "0193a5b2-7c3e-7000-8000-00000000abcd";
        assert_eq!(parse("id", id).ok().as_deref(), Some(id));
        assert_eq!(
            parse("id", &id.to_uppercase()).ok().as_deref(),
            Some(id),
            "upper case is the same id"
        );
        for bad in [
            "",
            "7",
            "../health",
            "%2e%2e/health",
            "./0193a5b2-7c3e-7000-8000-00000000abcd",
            "0193a5b2-7c3e-7000-8000-00000000abcd?x=1",
            "0193a5b2-7c3e-7000-8000-00000000abcd#f",
            "0193a5b27c3e70008000000000000abcd",
            "{0193a5b2-7c3e-7000-8000-00000000abcd}",
            "0193a5b2-7c3e-7000-8000-00000000abc/",
        ] {
            let p = parse("items[0].product_id", bad).expect_err(bad);
            assert_eq!(p.status, 422, "{bad}");
            assert_eq!(p.errors[0].field, "items[0].product_id");
        }
    }
}
