//! Payment providers. Bazaar talks to one through [`Provider`]; the
//! built-in [`Simulated`] one declines above a limit, fails transiently at
//! a rate and takes a configurable time, so every saga path can be driven.

use std::time::Duration;

use async_trait::async_trait;
use bazaar_contracts::ChargePayment;

/// A provider's answer to a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    Approved,
    Declined(String),
}

/// The provider could not answer; the same request may succeed later.
#[derive(Debug, thiserror::Error)]
#[error("payment provider unavailable: {0}")]
pub struct Transient(pub String);

/// A payment provider. Implementations must treat the order id as an
/// idempotency key, as real providers do, so a retried charge is one charge.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    async fn charge(&self, req: &ChargePayment) -> Result<Charge, Transient>;
    async fn refund(&self, req: &ChargePayment) -> Result<(), Transient>;
}

/// The simulated provider (`payments_*` settings).
#[derive(Debug, Clone)]
pub struct Simulated {
    pub decline_above: Option<i64>,
    pub failure_rate: f64,
    pub latency: Duration,
}

impl Simulated {
    async fn call(&self) -> Result<(), Transient> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            return Err(Transient("simulated outage".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for Simulated {
    async fn charge(&self, req: &ChargePayment) -> Result<Charge, Transient> {
        self.call().await?;
        match self.decline_above {
            Some(limit) if req.amount > limit => Ok(Charge::Declined(format!(
                "amount {} exceeds the limit of {limit}",
                req.amount
            ))),
            _ => Ok(Charge::Approved),
        }
    }

    async fn refund(&self, _req: &ChargePayment) -> Result<(), Transient> {
        self.call().await
    }
}
