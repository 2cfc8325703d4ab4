//! Pattern actions (Seneca's mesh): a service registers JSON patterns,
//! each with the route that answers it; a caller sends a message such as
//! `{"role":"catalog","cmd":"get","id":"…"}` and the pattern that matches
//! it most specifically, across every registered service, decides where
//! it goes. No port or service name is in the message.
//!
//! A pattern is a JSON object of keys the message must have: a string,
//! number or boolean value must be equal; `"*"` takes any value. The
//! match with the most keys wins; a tie between two services' patterns
//! is an error, never a coin toss. At registration a pattern another
//! service already holds, or one that could tie with another service's,
//! is refused ([`admit`]) — and the refusal is kept with the instance.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Instance;

/// Any value (the key must be present).
pub const ANY: &str = "*";

/// One registered pattern and how it is answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// Keys the message must have, with the value each must equal (or `"*"`).
    pub pattern: BTreeMap<String, Value>,
    /// `GET` or `POST`.
    pub method: String,
    /// The service's route, with `{key}` for message values, e.g.
    /// `/products/{id}`. Message keys neither in the pattern's fixed
    /// values nor in the path go along as query parameters.
    pub path: String,
    /// Whether a valid access token is needed.
    #[serde(default)]
    pub auth: bool,
    /// Roles allowed (empty: any authenticated caller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// A pattern refused at registration, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    pub pattern: BTreeMap<String, Value>,
    pub reason: String,
}

impl Action {
    /// An action from a pattern literal such as
    /// `{"role":"catalog","cmd":"get","id":"*"}`.
    pub fn new(pattern: Value, method: &str, path: &str) -> Self {
        let pattern = match pattern {
            Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        Self {
            pattern,
            method: method.to_owned(),
            path: path.to_owned(),
            auth: false,
            roles: Vec::new(),
        }
    }

    /// Needs a valid token (with one of `roles`, if any).
    pub fn authenticated(mut self, roles: &[&str]) -> Self {
        self.auth = true;
        self.roles = roles.iter().map(|r| (*r).to_owned()).collect();
        self
    }

    /// Whether `message` has every key of the pattern with a fitting value.
    pub fn matches(&self, message: &serde_json::Map<String, Value>) -> bool {
        self.pattern
            .iter()
            .all(|(k, want)| message.get(k).is_some_and(|got| fits(want, got)))
    }

    /// The number of keys: more is more specific.
    pub fn specificity(&self) -> usize {
        self.pattern.len()
    }

    /// The escaped path and query that answers `message`: its values in
    /// the path's `{key}` places, and the keys the pattern does not fix
    /// as query parameters. A value must be text, a number or a boolean,
    /// and a path value must not be empty, `.` or `..`.
    pub fn target(&self, message: &serde_json::Map<String, Value>) -> Result<String, BadMessage> {
        let text = |key: &str, v: &Value| match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(BadMessage::NotScalar(key.to_owned())),
        };
        let mut out = String::new();
        let mut used = Vec::new();
        for segment in self.path.split('/').filter(|s| !s.is_empty()) {
            out.push('/');
            match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(key) => {
                    let v = message
                        .get(key)
                        .ok_or_else(|| BadMessage::Missing(key.to_owned()))?;
                    let v = text(key, v)?;
                    if v.is_empty() || v == "." || v == ".." {
                        return Err(BadMessage::BadSegment(key.to_owned()));
                    }
                    crate::client::escape_into(&mut out, &v);
                    used.push(key);
                }
                None => out.push_str(segment),
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        let mut first = true;
        for (k, v) in message {
            let fixed = self.pattern.get(k).is_some_and(|p| p.as_str() != Some(ANY));
            if fixed || used.contains(&k.as_str()) {
                continue;
            }
            out.push(if first { '?' } else { '&' });
            first = false;
            crate::client::escape_into(&mut out, k);
            out.push('=');
            crate::client::escape_into(&mut out, &text(k, v)?);
        }
        Ok(out)
    }
}

fn fits(want: &Value, got: &Value) -> bool {
    match want {
        Value::String(s) if s == ANY => !got.is_null(),
        _ => want == got,
    }
}

/// Whether some message could match both patterns with the same
/// specificity: neither would be chosen over the other.
pub fn ambiguous(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>) -> bool {
    a.len() == b.len()
        && a.iter().all(|(k, va)| match b.get(k) {
            Some(vb) => compatible(va, vb),
            None => true,
        })
}

fn compatible(a: &Value, b: &Value) -> bool {
    let any = |v: &Value| v.as_str() == Some(ANY);
    any(a) || any(b) || a == b
}

/// A pattern as text, for logs: `role:catalog,cmd:get,id:*`.
pub fn describe(pattern: &BTreeMap<String, Value>) -> String {
    pattern
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}:{s}"),
            other => format!("{k}:{other}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks `new`'s patterns against the other services' in `registered`:
/// one equal to or ambiguous with another service's is moved to
/// `new.refused`, with a log line. Replicas of one service share their
/// patterns freely.
pub fn admit(registered: &[Instance], new: &mut Instance) {
    let mut kept = Vec::new();
    for action in std::mem::take(&mut new.patterns) {
        let clash = registered
            .iter()
            .filter(|i| i.name != new.name)
            .flat_map(|i| i.patterns.iter().map(move |a| (i, a)))
            .find(|(_, a)| ambiguous(&a.pattern, &action.pattern));
        match clash {
            Some((owner, theirs)) => {
                let reason = if theirs.pattern == action.pattern {
                    format!("already registered by {}", owner.name)
                } else {
                    format!(
                        "ambiguous with {}'s pattern {}",
                        owner.name,
                        describe(&theirs.pattern)
                    )
                };
                tracing::error!(
                    service = %new.name,
                    pattern = %describe(&action.pattern),
                    %reason,
                    "action pattern refused"
                );
                new.refused.push(Refused {
                    pattern: action.pattern,
                    reason,
                });
            }
            None => kept.push(action),
        }
    }
    new.patterns = kept;
}

/// Why a message cannot be sent to the route that matched it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadMessage {
    #[error("{0} is missing")]
    Missing(String),
    #[error("{0} must be text, a number or a boolean")]
    NotScalar(String),
    #[error("{0} must not be empty, '.' or '..'")]
    BadSegment(String),
}

/// Where a message goes: the service and its action.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub service: String,
    pub action: Action,
}

/// Why no single action answers a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NoRoute {
    #[error("no registered pattern matches the message")]
    Unmatched,
    #[error("the message matches {0} equally")]
    Ambiguous(String),
}

/// The registered action that matches `message` most specifically.
pub fn resolve(
    instances: &[Instance],
    message: &serde_json::Map<String, Value>,
) -> Result<Route, NoRoute> {
    let mut best: Vec<Route> = Vec::new();
    for i in instances {
        for a in i.patterns.iter().filter(|a| a.matches(message)) {
            let n = a.specificity();
            match best.first().map(|r| r.action.specificity()) {
                Some(m) if m > n => continue,
                Some(m) if m < n => best.clear(),
                _ => {}
            }
            let dup = best
                .iter()
                .any(|r| r.service == i.name && r.action.pattern == a.pattern);
            if !dup {
                best.push(Route {
                    service: i.name.clone(),
                    action: a.clone(),
                });
            }
        }
    }
    match best.len() {
        0 => Err(NoRoute::Unmatched),
        1 => Ok(best.remove(0)),
        _ => Err(NoRoute::Ambiguous(
            best.iter()
                .map(|r| format!("{} ({})", describe(&r.action.pattern), r.service))
                .collect::<Vec<_>>()
                .join(" and "),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn instance(name: &str, actions: Vec<Action>) -> Instance {
        Instance {
            name: name.into(),
            id: format!("{name}-1"),
            patterns: actions,
            ..Instance::default()
        }
    }

    fn msg(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn the_most_specific_pattern_wins() {
        let all = [
            instance(
                "catalog",
                vec![
                    Action::new(json!({"role":"catalog","cmd":"list"}), "GET", "/products"),
                    Action::new(
                        json!({"role":"catalog","cmd":"get","id":"*"}),
                        "GET",
                        "/products/{id}",
                    ),
                ],
            ),
            instance(
                "orders",
                vec![Action::new(json!({"role":"orders"}), "GET", "/orders")],
            ),
        ];
        let r = resolve(&all, &msg(json!({"role":"catalog","cmd":"get","id":"p1"}))).unwrap();
        assert_eq!(
            (r.service.as_str(), r.action.path.as_str()),
            ("catalog", "/products/{id}")
        );
        let r = resolve(&all, &msg(json!({"role":"orders","cmd":"list","x":1}))).unwrap();
        assert_eq!(r.service, "orders");
        assert_eq!(
            resolve(&all, &msg(json!({"role":"catalog","cmd":"get"}))),
            Err(NoRoute::Unmatched),
            "id is required"
        );
        assert_eq!(
            resolve(&all, &msg(json!({"role":"catalog","cmd":"get","id":null}))),
            Err(NoRoute::Unmatched)
        );
    }

    #[test]
    fn targets_escape_values_and_carry_the_rest_as_query() {
        let get = Action::new(
            json!({"role":"catalog","cmd":"get","id":"*"}),
            "GET",
            "/products/{id}",
        );
        let t = get.target(&msg(json!({"role":"catalog","cmd":"get","id":"a/../b c"})));
        assert_eq!(t.unwrap(), "/products/a%2F..%2Fb%20c");
        for bad in [
            json!(".."),
            json!(""),
            json!({"x":1}),
            json!([1]),
            json!(null),
        ] {
            let m = msg(json!({"role":"catalog","cmd":"get","id": bad}));
            assert!(get.target(&m).is_err(), "{bad}");
        }
        let list = Action::new(json!({"role":"catalog","cmd":"list"}), "GET", "/products");
        let t = list.target(&msg(
            json!({"role":"catalog","cmd":"list","q":"a&b=c","limit":5}),
        ));
        assert_eq!(t.unwrap(), "/products?limit=5&q=a%26b%3Dc");
    }

    #[test]
    fn a_tie_is_an_error_and_replicas_are_not_a_tie() {
        let a = Action::new(json!({"role":"x","cmd":"*"}), "GET", "/a");
        let b = Action::new(json!({"role":"x","id":"*"}), "GET", "/b");
        let one = instance("one", vec![a]);
        let mut replica = one.clone();
        replica.id = "one-2".into();
        let two = instance("two", vec![b]);
        let m = msg(json!({"role":"x","cmd":"c","id":"i"}));
        assert!(matches!(
            resolve(&[one.clone(), two], &m),
            Err(NoRoute::Ambiguous(_))
        ));
        assert_eq!(resolve(&[one, replica], &m).unwrap().service, "one");
    }

    #[test]
    fn admission_refuses_taken_and_ambiguous_patterns() {
        let existing = [instance(
            "catalog",
            vec![Action::new(
                json!({"role":"catalog","cmd":"get","id":"*"}),
                "GET",
                "/p",
            )],
        )];
        let mut new = instance(
            "rogue",
            vec![
                Action::new(json!({"role":"catalog","cmd":"get","id":"*"}), "GET", "/x"),
                Action::new(json!({"role":"catalog","cmd":"*","id":"7"}), "GET", "/y"),
                Action::new(json!({"role":"catalog","cmd":"put","id":"*"}), "GET", "/z"),
                Action::new(json!({"role":"rogue"}), "GET", "/w"),
            ],
        );
        admit(&existing, &mut new);
        let kept: Vec<_> = new.patterns.iter().map(|a| a.path.as_str()).collect();
        assert_eq!(kept, ["/z", "/w"]);
        assert_eq!(new.refused.len(), 2);
        assert_eq!(new.refused[0].reason, "already registered by catalog");
        assert!(new.refused[1].reason.starts_with("ambiguous with catalog"));
        // Another replica of catalog may register the same pattern.
        let mut replica = existing[0].clone();
        replica.id = "catalog-2".into();
        admit(&existing, &mut replica);
        assert!(replica.refused.is_empty());
    }
}
