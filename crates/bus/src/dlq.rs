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

impl Bus {
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
        let dlq = dead_letter_queue(queue);
        let held = self.transport().browse(&dlq, MAX_BROWSE).await?;
        let mut keep = Vec::new();
        let mut replayed = 0;
        for d in held {
            if id.is_some_and(|id| d.message_id.as_deref() != Some(id)) {
                keep.push(d);
                continue;
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
