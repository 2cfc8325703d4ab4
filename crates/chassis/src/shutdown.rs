//! A cloneable shutdown signal: triggered once, awaited anywhere.

use tokio::sync::watch;

/// Fires once; every clone sees it.
#[derive(Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }
}

impl Shutdown {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once triggered.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Runs `work` every `period` until triggered, logging (as `what`)
    /// each run that fails: the background sweeps services keep.
    pub fn every<F, Fut>(&self, period: std::time::Duration, what: &'static str, mut work: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send,
    {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    () = this.wait() => return,
                }
                if let Err(e) = work().await {
                    tracing::warn!(error = %e, "{what} failed");
                }
            }
        });
    }

    /// Triggers on SIGINT (Ctrl-C), SIGTERM or SIGHUP (its terminal closed).
    pub fn on_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            let unix = |kind| async move {
                match tokio::signal::unix::signal(kind) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            #[cfg(unix)]
            let (term, hangup) = (
                unix(tokio::signal::unix::SignalKind::terminate()),
                unix(tokio::signal::unix::SignalKind::hangup()),
            );
            #[cfg(not(unix))]
            let (term, hangup) = (std::future::pending::<()>(), std::future::pending::<()>());
            tokio::select! {
                _ = ctrl_c => {},
                _ = term => {},
                _ = hangup => {},
            }
            tracing::info!("shutdown signal received");
            this.trigger();
        });
    }
}
