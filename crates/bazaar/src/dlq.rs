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

/// The dead letters a command names, checked: an id, a reason, a time
/// (RFC 3339), and a replay rate.
#[derive(Debug, Clone, Default)]
pub struct Chosen {
    pub filter: bazaar_bus::Redrive,
    /// `since` as given, for the gateway.
    since: Option<String>,
}

impl Chosen {
    pub fn new(
        id: Option<String>,
        reason: Option<String>,
        since: Option<String>,
        rate: Option<f64>,
    ) -> anyhow::Result<Self> {
        let filter = bazaar_bus::Redrive::checked(id, reason, since.as_deref(), rate)
            .map_err(|(field, why)| anyhow::anyhow!("--{field}: {why}"))?;
        Ok(Self { filter, since })
    }
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

    /// Dead letters of `queue`, or of every queue, that `chosen` names.
    pub async fn list(&self, queue: Option<&str>, chosen: &Chosen) -> anyhow::Result<Value> {
        match self {
            Target::Bus(bus) => {
                let mut out = Vec::new();
                for q in known(queue)? {
                    ensure_dlq(bus, q).await?;
                    out.extend(bus.dead_letters_matching(q, &chosen.filter).await?);
                }
                Ok(serde_json::to_value(out)?)
            }
            Target::Gateway { .. } => {
                let http = reqwest::Client::new();
                let (api, token) = self.token(&http).await?;
                let mut query: Vec<(&str, &str)> = Vec::new();
                let queue = queue.map(|q| known(Some(q))).transpose()?;
                if let Some(q) = queue.as_ref().and_then(|q| q.first()) {
                    query.push(("queue", q));
                }
                if let Some(r) = &chosen.filter.reason {
                    query.push(("reason", r));
                }
                if let Some(t) = &chosen.since {
                    query.push(("since", t));
                }
                let url =
                    reqwest::Url::parse_with_params(&format!("{api}/admin/dead-letters"), &query)?;
                let res = http.get(url).bearer_auth(token).send().await?;
                let status = res.status();
                let body: Value = res.json().await.unwrap_or(Value::Null);
                anyhow::ensure!(status.is_success(), "the gateway answered {status}: {body}");
                Ok(body)
            }
        }
    }

    /// Replays one dead letter (`chosen.id`) or all those `chosen` names;
    /// returns how many went back.
    pub async fn replay(
        &self,
        queue: Option<&str>,
        chosen: &Chosen,
        all: bool,
    ) -> anyhow::Result<usize> {
        let id = chosen.filter.id.as_deref();
        anyhow::ensure!(id.is_some() != all, "give either --id or --all");
        match self {
            Target::Bus(bus) => {
                let mut n = 0;
                for q in known(queue)? {
                    ensure_dlq(bus, q).await?;
                    n += bus.redrive(q, &chosen.filter).await?;
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
                    .json(&json!({
                        "queue": queue,
                        "id": id,
                        "all": all,
                        "reason": chosen.filter.reason,
                        "since": chosen.since,
                        "rate": chosen.filter.rate,
                    }))
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
