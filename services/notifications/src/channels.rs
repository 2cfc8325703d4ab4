//! Where a notification goes besides the database: the log always, a
//! webhook and SMTP mail when configured. A channel that fails makes the
//! message fail, so it is retried (and dead-lettered after the last try):
//! a notification is sent at least once, not silently dropped.

use std::time::Duration;

use bazaar_chassis::Config;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Serialize;

/// A notification on its way out.
#[derive(Debug, Clone, Serialize)]
pub struct Outgoing {
    pub id: String,
    pub user_id: String,
    pub email: String,
    pub kind: String,
    pub subject: String,
    pub body: String,
}

pub struct Channels {
    webhook: Option<(reqwest::Client, String)>,
    smtp: Option<(AsyncSmtpTransport<Tokio1Executor>, String)>,
}

impl Channels {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let webhook = match &config.notify_webhook_url {
            Some(url) => Some((
                reqwest::Client::builder()
                    .timeout(Duration::from_millis(config.upstream_timeout_ms))
                    .build()?,
                url.clone(),
            )),
            None => None,
        };
        let smtp = match &config.smtp_url {
            Some(url) => {
                let (host, port) = parse_smtp_url(url)?;
                let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(port)
                    .timeout(Some(Duration::from_millis(config.upstream_timeout_ms)))
                    .build();
                Some((transport, config.smtp_from.clone()))
            }
            None => None,
        };
        Ok(Self { webhook, smtp })
    }

    /// Sends on every configured channel; the first failure is returned.
    pub async fn send(&self, n: &Outgoing) -> Result<(), String> {
        tracing::info!(kind = %n.kind, to = %n.email, subject = %n.subject, "notification");
        if let Some((client, url)) = &self.webhook {
            let response = client
                .post(url)
                .json(n)
                .send()
                .await
                .map_err(|e| format!("webhook: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("webhook answered {}", response.status()));
            }
        }
        if let Some((smtp, from)) = &self.smtp {
            let mail = Message::builder()
                .from(from.parse().map_err(|e| format!("smtp_from: {e}"))?)
                .to(n.email.parse().map_err(|e| format!("recipient: {e}"))?)
                .subject(n.subject.clone())
                .body(n.body.clone())
                .map_err(|e| format!("mail: {e}"))?;
            smtp.send(mail).await.map_err(|e| format!("smtp: {e}"))?;
        }
        Ok(())
    }
}

/// `smtp://host[:port]` (port 25 by default).
fn parse_smtp_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("smtp://")
        .ok_or_else(|| anyhow::anyhow!("smtp_url must look like smtp://host:port, got {url:?}"))?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_owned(), port.parse()?)),
        None => Ok((rest.to_owned(), 25)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls() {
        assert_eq!(
            parse_smtp_url("smtp://mail:2525").unwrap(),
            ("mail".into(), 2525)
        );
        assert_eq!(parse_smtp_url("smtp://mail").unwrap(), ("mail".into(), 25));
        assert!(parse_smtp_url("http://mail").is_err());
    }
}
