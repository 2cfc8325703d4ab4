//! The envelope every bus message travels in.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// `{id, type, occurred_at, correlation_id, causation_id, traceparent, payload}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    /// UUIDv7; consumers drop duplicates by it.
    pub id: String,
    /// What the payload is, e.g. `orders.create`.
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339 UTC.
    pub occurred_at: String,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub causation_id: Option<String>,
    #[serde(default)]
    pub traceparent: Option<String>,
    /// The HTTP request this message descends from, for log correlation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub payload: serde_json::Value,
}

impl Envelope {
    /// A new envelope with a fresh id, stamped now.
    pub fn new(kind: &str, payload: &impl Serialize) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: uuid::Uuid::now_v7().to_string(),
            kind: kind.to_owned(),
            occurred_at: now_rfc3339(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            request_id: None,
            payload: serde_json::to_value(payload)?,
        })
    }

    /// A message caused by this one: same correlation, causation = this id.
    pub fn caused(&self, kind: &str, payload: &impl Serialize) -> Result<Self, serde_json::Error> {
        let mut next = Self::new(kind, payload)?;
        next.correlation_id = Some(
            self.correlation_id
                .clone()
                .unwrap_or_else(|| self.id.clone()),
        );
        next.causation_id = Some(self.id.clone());
        next.traceparent = self.traceparent.clone();
        next.request_id = self.request_id.clone();
        Ok(next)
    }

    /// Decodes the payload.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.payload)
    }
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
