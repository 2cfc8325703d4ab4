//! A real etcd per test (Debian `etcd-server`), on free loopback ports
//! with its own data dir, which the test may stop and start again; and a
//! TCP relay in front of it that a test can cut, to take etcd away from
//! one client only. Without the `etcd` binary the tests skip, except with
//! `CI=true`, where they fail.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd server.
pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd, or `None` (the test skips) when it is not installed
    /// and `CI` is not `true`.
    pub async fn start() -> Option<Self> {
        let installed = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true requires etcd (Debian etcd-server) on PATH"
            );
            eprintln!("etcd is not installed: skipping");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("bazaar-etcd-{}", uuid()));
        let mut etcd = Self {
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            child: None,
        };
        etcd.resume().await;
        Some(etcd)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts it again on the same ports and data.
    pub async fn resume(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.url();
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("bazaar-etcd-{}.log", self.client_port)),
        )
        .unwrap();
        let child = Command::new("etcd")
            .args(["--data-dir", &self.dir.display().to_string()])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([client.as_str()], None).await
                && c.get("ping", None).await.is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills it (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], None)
            .await
            .unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uuid() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A TCP relay to `to` that can be cut (every connection dropped, new
/// ones closed at once) and restored.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<Mutex<bool>>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl Relay {
    pub async fn start(to: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(Mutex::new(true));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (o, c) = (open.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*o.lock().unwrap() {
                    continue;
                }
                c.lock().unwrap().spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, open, conns }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        *self.open.lock().unwrap() = false;
        self.conns.lock().unwrap().abort_all();
    }

    pub fn restore(&self) {
        *self.open.lock().unwrap() = true;
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes; the time
/// it took.
pub async fn within<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
