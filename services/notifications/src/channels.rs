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

#[cfg(test)]
mod channel_tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-connection SMTP server that accepts one mail and returns its data.
    async fn fake_smtp() -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (read, mut write) = sock.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"220 fake ESMTP\r\n").await.unwrap();
            let mut data = String::new();
            let mut in_data = false;
            while let Some(line) = lines.next_line().await.unwrap() {
                if in_data {
                    if line == "." {
                        in_data = false;
                        write.write_all(b"250 queued\r\n").await.unwrap();
                    } else {
                        data.push_str(&line);
                        data.push('\n');
                    }
                    continue;
                }
                let verb = line.split_whitespace().next().unwrap_or("").to_uppercase();
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" | "HELO" => b"250 fake\r\n",
                    "DATA" => {
                        in_data = true;
                        b"354 go on\r\n"
                    }
                    "QUIT" => {
                        write.write_all(b"221 bye\r\n").await.unwrap();
                        break;
                    }
                    _ => b"250 ok\r\n",
                };
                write.write_all(reply).await.unwrap();
            }
            data
        });
        (port, task)
    }

    #[tokio::test]
    async fn webhook_and_smtp_receive_the_notification() {
        let hooked = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
        let app = {
            let hooked = Arc::clone(&hooked);
            axum::Router::new().route(
                "/hook",
                axum::routing::post(move |axum::Json(v): axum::Json<serde_json::Value>| {
                    let hooked = Arc::clone(&hooked);
                    async move {
                        hooked.lock().unwrap().push(v);
                        "ok"
                    }
                }),
            )
        };
        let web = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let web_port = web.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(web, app).await.unwrap() });
        let (smtp_port, smtp) = fake_smtp().await;

        let config = Config {
            notify_webhook_url: Some(format!("http://127.0.0.1:{web_port}/hook")),
            smtp_url: Some(format!("smtp://127.0.0.1:{smtp_port}")),
            ..Config::default()
        };
        let channels = Channels::from_config(&config).unwrap();
        let n = Outgoing {
            id: "order.confirmed:o1".into(),
            user_id: "u1".into(),
            email: "ann@example.com".into(),
            kind: "order.confirmed".into(),
            subject: "Order o1 confirmed".into(),
            body: "Your order is confirmed.".into(),
        };
        channels.send(&n).await.unwrap();
        let hooked = hooked.lock().unwrap().clone();
        assert_eq!(hooked.len(), 1);
        assert_eq!(hooked[0]["email"], "ann@example.com");
        assert_eq!(hooked[0]["kind"], "order.confirmed");
        let mail = smtp.await.unwrap();
        assert!(mail.contains("Subject: Order o1 confirmed"), "{mail}");
        assert!(mail.contains("To: ann@example.com"), "{mail}");
        assert!(mail.contains("Your order is confirmed."), "{mail}");
    }

    #[tokio::test]
    async fn a_failing_webhook_fails_the_send() {
        let config = Config {
            // Nothing listens on port 9 (discard) here.
            notify_webhook_url: Some("http://127.0.0.1:9/hook".into()),
            ..Config::default()
        };
        let channels = Channels::from_config(&config).unwrap();
        let n = Outgoing {
            id: "x".into(),
            user_id: "u".into(),
            email: "a@b.io".into(),
            kind: "user.registered".into(),
            subject: "s".into(),
            body: "b".into(),
        };
        assert!(channels.send(&n).await.unwrap_err().contains("webhook"));
    }
}
