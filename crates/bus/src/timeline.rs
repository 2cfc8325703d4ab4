//! What happened to the messages of one correlation (an order's saga),
//! for the dashboard's order timeline: each message written to an
//! outbox, published and confirmed, delivered, dropped as a duplicate,
//! retried, dead-lettered; and the saga's own steps, which the orders
//! service records here too. Only correlated messages are recorded, in a
//! bounded store per process; `events` reads one correlation's.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::bounded::Bounded;

/// Events kept per process, oldest dropped first…
const KEEP: usize = 20_000;
/// …and the memory they may take: an event's size is mostly its text,
/// which other services' messages choose (kinds, ids, reasons). Under
/// load the events fill it in seconds, and it stays the largest part of a
/// service's memory after the spans; 4 MiB is 10 000 or so.
const KEEP_BYTES: usize = 4 << 20;

/// One thing that happened, as the timeline shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Event {
    /// Unix microseconds.
    pub at_us: u64,
    /// The service it happened in.
    pub service: String,
    /// `written` (to the outbox), `published` (the broker confirmed),
    /// `delivered`, `handled`, `duplicate` (dropped by the inbox),
    /// `retried`, `dead_lettered`, or `saga` (a step of the saga).
    pub what: String,
    /// The message's kind (`order.created`), or the saga step
    /// (`reserving → CONFIRMED`).
    pub kind: String,
    /// The message's id, if a message.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The queue it was delivered from, if delivered.
    #[serde(default)]
    pub queue: Option<String>,
    /// 1 for a first delivery.
    #[serde(default)]
    pub attempt: Option<u32>,
    /// Why it was retried or dead-lettered, or the saga's reason.
    #[serde(default)]
    pub detail: Option<String>,
    /// The trace it belongs to, when known.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// The order (correlation) it belongs to.
    pub correlation_id: String,
}

static EVENTS: Mutex<Bounded<Event>> = Mutex::new(Bounded::new(KEEP, KEEP_BYTES));

impl Event {
    /// About how much memory the event takes, with its text.
    fn size(&self) -> usize {
        let text = [&self.service, &self.what, &self.kind, &self.correlation_id]
            .into_iter()
            .map(String::capacity)
            .sum::<usize>()
            + [&self.message_id, &self.queue, &self.detail, &self.trace_id]
                .into_iter()
                .flatten()
                .map(String::capacity)
                .sum::<usize>();
        std::mem::size_of::<Self>() + text
    }
}

/// Now, in Unix microseconds.
pub fn now_us() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros(),
    )
    .unwrap_or(0)
}

/// The trace id a `traceparent` names.
pub fn trace_id_of(traceparent: Option<&str>) -> Option<String> {
    let mut parts = traceparent?.split('-');
    let trace_id = parts.nth(1).filter(|t| t.len() == 32)?;
    // A trace not recorded has nothing to link to.
    (parts.nth(1) != Some("00")).then(|| trace_id.to_owned())
}

/// Records `event`.
pub fn record(event: Event) {
    let size = event.size();
    let gone = EVENTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(event, size);
    // Freed after the lock.
    drop(gone);
}

/// An outbox row published by `service` (the broker confirmed it at
/// `now`): `written` at the message's creation, then `published`, when
/// the message is correlated.
pub fn published(service: &str, head: crate::EnvelopeHead, now: u64) {
    let Some(correlation_id) = head.correlation_id else {
        return;
    };
    let written = time::OffsetDateTime::parse(
        &head.occurred_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map(|t| u64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(0))
    .unwrap_or(now);
    let trace_id = trace_id_of(head.traceparent.as_deref());
    for (what, at_us) in [("written", written), ("published", now)] {
        record(Event {
            at_us,
            service: service.to_owned(),
            what: what.to_owned(),
            kind: head.kind.clone(),
            message_id: Some(head.id.clone()),
            queue: None,
            attempt: None,
            detail: None,
            trace_id: trace_id.clone(),
            correlation_id: correlation_id.clone(),
        });
    }
}

/// A message event of `service`, when the message is correlated.
pub fn message(
    service: &str,
    what: &str,
    env: &crate::Envelope,
    queue: Option<&str>,
    attempt: Option<u32>,
    detail: Option<&str>,
) {
    let Some(correlation_id) = &env.correlation_id else {
        return;
    };
    record(Event {
        at_us: now_us(),
        service: service.to_owned(),
        what: what.to_owned(),
        kind: env.kind.clone(),
        message_id: Some(env.id.clone()),
        queue: queue.map(str::to_owned),
        attempt,
        detail: detail.map(str::to_owned),
        trace_id: trace_id_of(env.traceparent.as_deref()),
        correlation_id: correlation_id.clone(),
    });
}

/// The events of `correlation_id` this process keeps, in time order.
pub fn events(correlation_id: &str) -> Vec<Event> {
    let events = EVENTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<Event> = events
        .iter()
        .filter(|e| e.correlation_id == correlation_id)
        .cloned()
        .collect();
    out.sort_by_key(|e| e.at_us);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_trace_not_recorded_links_to_nothing() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-f0fee9aafe2fae6f";
        assert_eq!(
            super::trace_id_of(Some(&format!("{tp}-01"))).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(super::trace_id_of(Some(&format!("{tp}-00"))), None);
        assert_eq!(super::trace_id_of(Some("garbage")), None);
        assert_eq!(super::trace_id_of(None), None);
    }

    #[test]
    fn the_store_is_bounded_by_bytes() {
        // Events with big text (a foreign message's 64 KiB kind) are kept
        // to the byte budget, not the count.
        let correlation_id = uuid::Uuid::now_v7().to_string();
        for _ in 0..500 {
            super::record(super::Event {
                at_us: super::now_us(),
                service: "orders".into(),
                what: "delivered".into(),
                kind: "k".repeat(64 << 10),
                message_id: None,
                queue: None,
                attempt: None,
                detail: None,
                trace_id: None,
                correlation_id: correlation_id.clone(),
            });
        }
        // About KEEP_BYTES / 64 KiB of them.
        let kept = super::events(&correlation_id).len();
        let most = super::KEEP_BYTES / (64 << 10);
        assert!((most * 3 / 4..=most).contains(&kept), "{kept} kept");
        let events = super::EVENTS.lock().unwrap();
        let bytes = events.bytes();
        assert_eq!(events.iter().map(super::Event::size).sum::<usize>(), bytes);
        assert!(bytes <= super::KEEP_BYTES);
    }
}
