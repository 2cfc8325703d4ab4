//! Dead letters: listing them and sending them back to their queue.

use serde::Serialize;

use crate::{Bus, BusError, Delivery, header};

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The most dead letters one call looks at.
const MAX_BROWSE: usize = 10_000;

/// A message parked in a dead-letter queue.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The message id (the envelope id for Bazaar messages).
    pub id: Option<String>,
    /// The queue it failed in.
    pub queue: String,
    pub routing_key: Option<String>,
    pub reason: Option<String>,
    pub attempts: u32,
    pub dead_at: Option<String>,
    /// The body, as text (lossy if it is not UTF-8).
    pub body: String,
}

impl DeadLetter {
    fn from_delivery(queue: &str, d: &Delivery) -> Self {
        Self {
            id: d.message_id.clone(),
            queue: d
                .headers
                .get(header::ORIGINAL_QUEUE)
                .cloned()
                .unwrap_or_else(|| queue.to_owned()),
            routing_key: d.headers.get(header::ORIGINAL_KEY).cloned(),
            reason: d.headers.get(header::DEAD_REASON).cloned(),
            attempts: d.attempt(),
            dead_at: d.headers.get(header::DEAD_AT).cloned(),
            body: String::from_utf8_lossy(&d.body).into_owned(),
        }
    }
}

/// Which dead letters to act on, and how fast to replay them. The
/// default is every one, at once.
#[derive(Debug, Clone, Default)]
pub struct Redrive {
    /// Only the one with this message id.
    pub id: Option<String>,
    /// Only those whose reason contains this (case-insensitive).
    pub reason: Option<String>,
    /// Only those dead-lettered at or after this time.
    pub since: Option<time::OffsetDateTime>,
    /// Replays per second at most (none: as fast as the broker takes them).
    pub rate: Option<f64>,
}

impl Redrive {
    /// A choice as a request states it, checked: a reason of 1 to 200
    /// characters, `since` in RFC 3339, `rate` 1 to 1000 a second. A bad
    /// value is named with why.
    pub fn checked(
        id: Option<String>,
        reason: Option<String>,
        since: Option<&str>,
        rate: Option<f64>,
    ) -> Result<Self, (&'static str, &'static str)> {
        if reason
            .as_deref()
            .is_some_and(|r| r.is_empty() || r.chars().count() > 200)
        {
            return Err(("reason", "must be 1 to 200 characters"));
        }
        let since = since
            .map(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| {
                        (
                            "since",
                            "expected an RFC 3339 time, e.g. 2026-12-01T12:00:00Z",
                        )
                    })
            })
            .transpose()?;
        if rate.is_some_and(|r| !(1.0..=1000.0).contains(&r)) {
            return Err(("rate", "must be 1 to 1000 replays per second"));
        }
        Ok(Self {
            id,
            reason,
            since,
            rate,
        })
    }

    /// Whether `letter` is one of those chosen.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.id
            .as_deref()
            .is_none_or(|id| letter.id.as_deref() == Some(id))
            && self.reason.as_deref().is_none_or(|r| {
                letter
                    .reason
                    .as_deref()
                    .is_some_and(|have| have.to_lowercase().contains(&r.to_lowercase()))
            })
            && self.since.is_none_or(|since| {
                letter
                    .dead_at
                    .as_deref()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .is_some_and(|at| at >= since)
            })
    }
}

impl Bus {
    /// The dead letters of `queue` that `filter` chooses, oldest first.
    /// They stay in place.
    pub async fn dead_letters_matching(
        &self,
        queue: &str,
        filter: &Redrive,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let mut letters = self.dead_letters(queue).await?;
        letters.retain(|l| filter.matches(l));
        Ok(letters)
    }

    /// The dead letters of `queue`, oldest first. They stay in place.
    pub async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, BusError> {
        let dlq = dead_letter_queue(queue);
        let held = self.transport().browse(&dlq, MAX_BROWSE).await?;
        let letters = held
            .iter()
            .map(|d| DeadLetter::from_delivery(queue, d))
            .collect();
        requeue_all(held).await;
        Ok(letters)
    }

    /// Sends dead letters of `queue` back to it for another full set of
    /// attempts: the one with message id `id`, or all of them. Returns how
    /// many went back.
    pub async fn replay(&self, queue: &str, id: Option<&str>) -> Result<usize, BusError> {
        let filter = Redrive {
            id: id.map(str::to_owned),
            ..Redrive::default()
        };
        self.redrive(queue, &filter).await
    }

    /// Sends the dead letters of `queue` that `filter` chooses back to it,
    /// for another full set of attempts, at `filter.rate` per second at
    /// most. Returns how many went back.
    pub async fn redrive(&self, queue: &str, filter: &Redrive) -> Result<usize, BusError> {
        let dlq = dead_letter_queue(queue);
        let held = self.transport().browse(&dlq, MAX_BROWSE).await?;
        let mut keep = Vec::new();
        let mut replayed = 0;
        let pause = filter
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| std::time::Duration::from_secs_f64(1.0 / r));
        for d in held {
            if !filter.matches(&DeadLetter::from_delivery(queue, &d)) {
                keep.push(d);
                continue;
            }
            if let Some(pause) = pause.filter(|_| replayed > 0) {
                tokio::time::sleep(pause).await;
            }
            let mut msg = d.to_outgoing();
            for h in [
                header::ATTEMPT,
                header::LAST_ERROR,
                header::DEAD_REASON,
                header::DEAD_AT,
                header::ORIGINAL_QUEUE,
            ] {
                msg.headers.remove(h);
            }
            match self.transport().publish("", queue, msg).await {
                Ok(()) => {
                    d.ack().await?;
                    replayed += 1;
                }
                Err(e) => {
                    keep.push(d);
                    requeue_all(keep).await;
                    return Err(e);
                }
            }
        }
        requeue_all(keep).await;
        Ok(replayed)
    }
}

async fn requeue_all(held: Vec<Delivery>) {
    for d in held {
        if let Err(e) = d.nack(true).await {
            tracing::warn!(error = %e, "returning a dead letter failed");
        }
    }
}
