//! RabbitMQ topic matching: words separated by `.`, `*` matches exactly one
//! word, `#` matches zero or more.

/// Whether `key` matches the binding `pattern`.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    matches(&p, &k)
}

fn matches(p: &[&str], k: &[&str]) -> bool {
    match p.split_first() {
        None => k.is_empty(),
        Some((&"#", rest)) => (0..=k.len()).any(|skip| matches(rest, &k[skip..])),
        Some((&word, rest)) => match k.split_first() {
            Some((&kw, krest)) => (word == "*" || word == kw) && matches(rest, krest),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn exact_star_and_hash() {
        assert!(topic_matches("orders.create", "orders.create"));
        assert!(!topic_matches("orders.create", "orders.created"));
        assert!(topic_matches("user.*", "user.registered"));
        assert!(!topic_matches("user.*", "user.profile.updated"));
        assert!(topic_matches("user.#", "user.profile.updated"));
        assert!(topic_matches("user.#", "user"));
        assert!(topic_matches("#", "anything.at.all"));
        assert!(topic_matches("*.profile.*", "user.profile.deleted"));
        assert!(!topic_matches("*.profile.*", "profile.deleted"));
        assert!(topic_matches("#.deleted", "user.profile.deleted"));
        assert!(!topic_matches("*", "a.b"));
    }
}
