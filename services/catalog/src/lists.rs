//! Product pages already serialized, each tagged with the catalog version
//! it was read at. A request reads the current version (one small query)
//! and serves the stored page when the version matches; any product change,
//! in any replica, bumps the version, so a page is never served stale.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

/// `(q, limit, offset)`.
pub type Key = (Option<String>, i64, i64);

/// Most pages kept; the whole cache is dropped when full.
const CAPACITY: usize = 1024;

#[derive(Default)]
pub struct Lists {
    pages: Mutex<HashMap<Key, (i64, Bytes)>>,
}

impl Lists {
    /// The page for `key` if it was read at `version`.
    pub fn get(&self, key: &Key, version: i64) -> Option<Bytes> {
        let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        pages
            .get(key)
            .filter(|(v, _)| *v == version)
            .map(|(_, body)| body.clone())
    }

    /// Keeps a page read at `version`; the data was read after the version,
    /// so it is at least that new.
    pub fn put(&self, key: Key, version: i64, body: Bytes) {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        if pages.len() >= CAPACITY {
            pages.clear();
        }
        pages.insert(key, (version, body));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_a_page_only_at_its_version() {
        let lists = Lists::default();
        let key: Key = (None, 50, 0);
        assert!(lists.get(&key, 1).is_none());
        lists.put(key.clone(), 1, Bytes::from_static(b"page"));
        assert_eq!(lists.get(&key, 1).as_deref(), Some(&b"page"[..]));
        assert!(lists.get(&key, 2).is_none(), "a newer version misses");
        assert!(lists.get(&(Some("mug".into()), 50, 0), 1).is_none());
    }
}
