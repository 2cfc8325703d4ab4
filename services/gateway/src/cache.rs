//! The response cache of public GETs: one entry per version, path and
//! query, kept for the route's TTL, with a strong ETag over the body. A
//! successful write through the gateway drops the cached reads of the
//! resource it wrote, of the collections above it and of anything below it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;

use crate::table::under;

/// Most entries kept; beyond it expired ones are dropped, then new
/// answers are simply not stored until room frees.
const MAX_ENTRIES: usize = 10_000;
/// Largest body stored.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Entry {
    /// The path below the version, without the query (for invalidation).
    path: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub etag: HeaderValue,
    stored: Instant,
    ttl: Duration,
}

impl Entry {
    pub fn age(&self) -> Duration {
        self.stored.elapsed()
    }
}

#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<String, Entry>>,
}

/// A strong ETag: a 64-bit FNV-1a of the body.
pub fn etag(body: &[u8]) -> HeaderValue {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    HeaderValue::from_str(&format!("\"{h:016x}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Whether `If-None-Match` names `etag` (or is `*`).
pub fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let tag = etag.to_str().unwrap_or("");
    crate::tokens(headers, axum::http::header::IF_NONE_MATCH)
        .map(|t| t.trim_start_matches("W/"))
        .any(|t| t == "*" || t == tag)
}

/// Whether the client asked to skip caches.
pub fn bypass(headers: &HeaderMap) -> bool {
    let says_no_cache = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("no-cache"))
    };
    says_no_cache(axum::http::header::CACHE_CONTROL) || says_no_cache(axum::http::header::PRAGMA)
}

impl Cache {
    pub fn key(version: &str, path: &str, query: Option<&str>) -> String {
        match query {
            Some(q) => format!("{version} {path}?{q}"),
            None => format!("{version} {path}"),
        }
    }

    pub fn get(&self, key: &str) -> Option<Entry> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.get(key).filter(|e| e.age() < e.ttl).cloned()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn put(
        &self,
        key: String,
        path: &str,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        etag: HeaderValue,
        ttl: Duration,
    ) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.age() < e.ttl);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            key,
            Entry {
                path: path.to_owned(),
                status,
                headers,
                body,
                etag,
                stored: Instant::now(),
                ttl,
            },
        );
    }

    /// Drops the cached reads a write to `path` may have changed.
    pub fn invalidate(&self, path: &str) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.retain(|_, e| !(under(path, &e.path) || under(&e.path, path)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &Cache, version: &str, path: &str, query: Option<&str>) {
        c.put(
            Cache::key(version, path, query),
            path,
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(b"{}"),
            etag(b"{}"),
            Duration::from_secs(60),
        );
    }

    #[test]
    fn writes_invalidate_the_resource_its_collections_and_below() {
        let c = Cache::default();
        put(&c, "v1", "/products", Some("limit=5"));
        put(&c, "v1", "/products/1", None);
        put(&c, "v2", "/products/1", None);
        put(&c, "v1", "/products/2", None);
        put(&c, "v1", "/inventory/1", None);
        c.invalidate("/products/1");
        assert!(
            c.get(&Cache::key("v1", "/products", Some("limit=5")))
                .is_none()
        );
        assert!(c.get(&Cache::key("v1", "/products/1", None)).is_none());
        assert!(c.get(&Cache::key("v2", "/products/1", None)).is_none());
        assert!(c.get(&Cache::key("v1", "/products/2", None)).is_some());
        assert!(c.get(&Cache::key("v1", "/inventory/1", None)).is_some());
    }

    #[test]
    fn etags_and_conditions() {
        let tag = etag(b"hello");
        assert_ne!(tag, etag(b"hellp"));
        let mut h = HeaderMap::new();
        assert!(!not_modified(&h, &tag));
        h.insert(
            axum::http::header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"x\", {}", tag.to_str().unwrap())).unwrap(),
        );
        assert!(not_modified(&h, &tag));
        h.insert(
            axum::http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        assert!(bypass(&h));
    }

    #[test]
    fn entries_expire() {
        let c = Cache::default();
        c.put(
            "k".into(),
            "/p",
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::new(),
            etag(b""),
            Duration::from_millis(10),
        );
        assert!(c.get("k").is_some());
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.get("k").is_none());
    }
}
