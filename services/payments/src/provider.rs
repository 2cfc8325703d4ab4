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

/// The simulated provider: the `payments_*` settings, read live at each
/// call (its failure rate can be raised in etcd to rehearse an outage).
#[derive(Clone)]
pub struct Simulated {
    pub config: bazaar_chassis::live::LiveConfig,
}

impl Simulated {
    /// Waits the simulated latency, fails the simulated share, and gives
    /// the decline limit in force.
    async fn call(&self) -> Result<Option<i64>, Transient> {
        let config = self.config.current();
        let latency = Duration::from_millis(config.payments_latency_ms);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let failure_rate = config.payments_failure_rate.clamp(0.0, 1.0);
        if failure_rate > 0.0 && rand::random::<f64>() < failure_rate {
            return Err(Transient("simulated outage".into()));
        }
        Ok(config.payments_decline_above)
    }
}

#[async_trait]
impl Provider for Simulated {
    async fn charge(&self, req: &ChargePayment) -> Result<Charge, Transient> {
        let decline_above = self.call().await?;
        match decline_above {
            Some(limit) if req.amount > limit => Ok(Charge::Declined(format!(
                "amount {} exceeds the limit of {limit}",
                req.amount
            ))),
            _ => Ok(Charge::Approved),
        }
    }

    async fn refund(&self, _req: &ChargePayment) -> Result<(), Transient> {
        self.call().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bazaar_chassis::Config;
    use bazaar_chassis::live::LiveConfig;

    use super::*;

    fn charge(amount: i64) -> ChargePayment {
        ChargePayment {
            order_id: "o".into(),
            user_id: "u".into(),
            amount,
            currency: "EUR".into(),
        }
    }

    /// The provider reads its settings at each call (they are live).
    #[tokio::test]
    async fn the_provider_follows_its_settings() {
        let with = |rate: f64, decline: Option<i64>| Simulated {
            config: LiveConfig::fixed(Arc::new(Config {
                payments_failure_rate: rate,
                payments_decline_above: decline,
                ..Config::default()
            })),
        };
        assert!(matches!(
            with(0.0, None).charge(&charge(10)).await,
            Ok(Charge::Approved)
        ));
        assert!(with(1.0, None).charge(&charge(10)).await.is_err());
        assert!(with(1.0, None).refund(&charge(10)).await.is_err());
        assert!(matches!(
            with(0.0, Some(5)).charge(&charge(10)).await,
            Ok(Charge::Declined(_))
        ));
    }
}
