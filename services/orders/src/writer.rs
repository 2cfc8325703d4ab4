//! The order writer: one task that stores orders in batches. Requests that
//! arrive while a batch is being written wait and go together in the next
//! one, so the batch grows with the load and costs nothing when idle.

use std::sync::Arc;

use std::time::Duration;

use bazaar_chassis::messaging::Outbox;
use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::store::{self, NewOrder, Stored};

type Done = oneshot::Sender<Result<Stored, Arc<sqlx::Error>>>;

/// Most orders in one transaction.
const MAX_BATCH: usize = 128;

/// A handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct OrderWriter {
    jobs: mpsc::Sender<(NewOrder, Done)>,
}

/// Why an order was not stored.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("database: {0}")]
    Db(Arc<sqlx::Error>),
    #[error("the order writer has stopped")]
    Stopped,
}

impl OrderWriter {
    /// Starts the writer task on `db`; each committed batch's outbox
    /// sends the new sagas' first messages.
    pub fn spawn(
        db: AnyPool,
        outbox: Outbox,
        step_timeout: Duration,
        metrics: crate::metrics::SagaMetrics,
    ) -> Self {
        let (jobs, mut rx) = mpsc::channel::<(NewOrder, Done)>(MAX_BATCH * 4);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (orders, done): (Vec<NewOrder>, Vec<Done>) = batch.drain(..).unzip();
                match outbox
                    .committing(store::create_batch(&db, &orders, step_timeout))
                    .await
                {
                    Ok(stored) => {
                        let now = bazaar_bus::timeline::now_us();
                        for ((order, created), new) in stored.iter().zip(&orders) {
                            if *created {
                                bazaar_bus::timeline::record(bazaar_bus::timeline::Event {
                                    at_us: now,
                                    service: "orders".into(),
                                    what: "saga".into(),
                                    kind: "placed → reserving".into(),
                                    message_id: None,
                                    queue: None,
                                    attempt: None,
                                    detail: None,
                                    trace_id: bazaar_bus::timeline::trace_id_of(
                                        new.traceparent.as_deref(),
                                    ),
                                    correlation_id: order.id.clone(),
                                });
                            }
                        }
                        metrics
                            .started(stored.iter().filter(|(_, created)| *created).count() as u64);
                        for (order, tx) in stored.into_iter().zip(done) {
                            let _ = tx.send(Ok(order));
                        }
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        for tx in done {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { jobs }
    }

    /// Stores one order (in whichever batch it joins).
    pub async fn create(&self, order: NewOrder) -> Result<Stored, WriteError> {
        let span = if bazaar_mesh::trace::in_recorded_span() {
            tracing::info_span!(
                "store",
                service = "orders",
                otel.name = "INSERT orders",
                db.operation = "INSERT",
                db.collection = "orders",
                order.id = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let (tx, rx) = oneshot::channel();
        async {
            self.jobs
                .send((order, tx))
                .await
                .map_err(|_| WriteError::Stopped)?;
            let stored = rx
                .await
                .map_err(|_| WriteError::Stopped)?
                .map_err(WriteError::Db)?;
            tracing::Span::current().record("order.id", stored.0.id.as_str());
            Ok(stored)
        }
        .instrument(span)
        .await
    }
}
