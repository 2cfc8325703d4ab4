//! `bazaar dlq`: dead letters, straight from RabbitMQ or through a running
//! system's gateway (the only way into an embedded system's in-memory bus).

use anyhow::Context as _;
use bazaar_bus::Bus;
use bazaar_contracts::topics;
use serde_json::{Value, json};

/// Where the dead letters are.
pub enum Target {
    Bus(Bus),
    Gateway {
        url: String,
        token: Option<String>,
        /// Admin email and password, to log in when no token is given.
        admin: (Option<String>, Option<String>),
    },
}

fn known(queue: Option<&str>) -> anyhow::Result<Vec<&'static str>> {
    topics::queues(queue).map_err(anyhow::Error::msg)
}

/// Declares `queue`'s dead-letter queue as its service would. On RabbitMQ
/// reading a queue nobody declared yet (its service never ran) is an error
/// that closes the channel; declared, it is simply empty.
async fn ensure_dlq(bus: &Bus, queue: &str) -> anyhow::Result<()> {
    let dlq = bazaar_bus::QueueSpec::new(bazaar_bus::dead_letter_queue(queue));
    bus.transport().declare_queue(&dlq).await?;
    Ok(())
}

impl Target {
    async fn token(&self, http: &reqwest::Client) -> anyhow::Result<(String, String)> {
        let Target::Gateway { url, token, admin } = self else {
            anyhow::bail!("not a gateway target");
        };
        let api = format!("{}/api/v1", url.trim_end_matches('/'));
        if let Some(t) = token {
            return Ok((api, t.clone()));
        }
        let (Some(email), Some(password)) = admin else {
            anyhow::bail!("give --token, or set BAZAAR_ADMIN_EMAIL and BAZAAR_ADMIN_PASSWORD");
        };
        let res = http
            .post(format!("{api}/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {url}"))?;
        anyhow::ensure!(
            res.status().is_success(),
            "admin login failed: {}",
            res.status()
        );
        let body: Value = res.json().await?;
        let token = body["access_token"].as_str().context("no access_token")?;
        Ok((api, token.to_owned()))
    }

    /// Dead letters of `queue`, or of every queue.
    pub async fn list(&self, queue: Option<&str>) -> anyhow::Result<Value> {
        match self {
            Target::Bus(bus) => {
                let mut out = Vec::new();
                for q in known(queue)? {
                    ensure_dlq(bus, q).await?;
                    out.extend(bus.dead_letters(q).await?);
                }
                Ok(serde_json::to_value(out)?)
            }
            Target::Gateway { .. } => {
                let http = reqwest::Client::new();
                let (api, token) = self.token(&http).await?;
                // Queue names are known words (checked here), so no escaping is needed.
                let query = match queue {
                    Some(q) => format!("?queue={}", known(Some(q))?.join("")),
                    None => String::new(),
                };
                let res = http
                    .get(format!("{api}/admin/dead-letters{query}"))
                    .bearer_auth(token)
                    .send()
                    .await?;
                let status = res.status();
                let body: Value = res.json().await.unwrap_or(Value::Null);
                anyhow::ensure!(status.is_success(), "the gateway answered {status}: {body}");
                Ok(body)
            }
        }
    }

    /// Replays one dead letter (`id`) or all; returns how many went back.
    pub async fn replay(
        &self,
        queue: Option<&str>,
        id: Option<&str>,
        all: bool,
    ) -> anyhow::Result<usize> {
        anyhow::ensure!(id.is_some() != all, "give either --id or --all");
        match self {
            Target::Bus(bus) => {
                let mut n = 0;
                for q in known(queue)? {
                    ensure_dlq(bus, q).await?;
                    n += bus.replay(q, id).await?;
                }
                anyhow::ensure!(id.is_none() || n > 0, "no dead letter with id {id:?}");
                Ok(n)
            }
            Target::Gateway { .. } => {
                let http = reqwest::Client::new();
                let (api, token) = self.token(&http).await?;
                let res = http
                    .post(format!("{api}/admin/dead-letters/replay"))
                    .bearer_auth(token)
                    .json(&json!({"queue": queue, "id": id, "all": all}))
                    .send()
                    .await?;
                let status = res.status();
                let body: Value = res.json().await.unwrap_or(Value::Null);
                anyhow::ensure!(status.is_success(), "the gateway answered {status}: {body}");
                body["replayed"]
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .context("unexpected answer from the gateway")
            }
        }
    }
}
