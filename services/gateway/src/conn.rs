//! Upstream HTTP/1 connections, kept idle per thread and per instance.
//!
//! The gateway serves each client connection on one thread (see
//! `bazaar_chassis::http::serve_fast`); a request's upstream connection is
//! taken from that thread's idle list, so the client side, the proxy and
//! the upstream side of a call all run on one thread with no hand-over
//! between threads. A connection goes back to the list when its answer's
//! body has been read to the end; one dropped half-read is closed, and
//! one left idle longer than [`IDLE_TIMEOUT`] is closed instead of reused.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Most idle connections kept per thread and instance.
const MAX_IDLE: usize = 256;
/// Instances a thread keeps idle connections to before it forgets those
/// whose connections have all closed.
const MAX_INSTANCES: usize = 64;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest an upstream connection is kept idle. Middleboxes (NAT, cloud
/// load balancers: 60 s is common) drop idle connections without a word;
/// a request written into one would wait out its whole timeout.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

type Sender = SendRequest<Body>;
/// Idle connections, oldest first, each with when it went idle.
type IdleList = Vec<(Sender, Instant)>;

thread_local! {
    static IDLE: RefCell<HashMap<Arc<str>, IdleList>> = RefCell::default();
}

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: nothing was sent.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// The connection failed or closed before a whole answer head came.
    #[error("{0}")]
    Failed(hyper::Error),
}

/// Whether a connection idle since `since` may still be used at `now`.
fn not_stale(since: Instant, now: Instant) -> bool {
    now.saturating_duration_since(since) <= IDLE_TIMEOUT
}

fn take_idle(authority: &str, now: Instant) -> Option<Sender> {
    IDLE.with_borrow_mut(|idle| {
        let list = idle.get_mut(authority)?;
        while let Some((s, since)) = list.pop() {
            if !not_stale(since, now) {
                // The newest is too old: so are the rest. Dropping a
                // sender closes its connection.
                list.clear();
                return None;
            }
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    })
}

fn put_idle(authority: &str, sender: Sender, now: Instant) {
    if sender.is_closed() {
        return;
    }
    let usable = |(s, since): &(Sender, Instant)| !s.is_closed() && not_stale(*since, now);
    IDLE.with_borrow_mut(|idle| {
        if let Some(list) = idle.get_mut(authority) {
            if list.len() >= MAX_IDLE {
                list.retain(usable);
            }
            if list.len() < MAX_IDLE {
                list.push((sender, now));
            }
        } else {
            if idle.len() >= MAX_INSTANCES {
                // Instances come and go (restarts, new ports): forget the
                // ones with no usable connection left.
                idle.retain(|_, list| {
                    list.retain(usable);
                    !list.is_empty()
                });
            }
            idle.insert(Arc::from(authority), vec![(sender, now)]);
        }
    });
}

async fn connect(authority: &str) -> Result<Sender, SendError> {
    let refused = |e: String| SendError::Connect(authority.to_owned(), e);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| refused("timed out".into()))?
        .map_err(|e| refused(e.to_string()))?;
    bazaar_chassis::http::no_delay(&tcp);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| refused(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection closed");
        }
    });
    Ok(sender)
}

/// Sends `req` to `authority` (`host:port`) on an idle connection, or a
/// new one; `now` is the caller's clock reading (one fewer per request).
/// A request an idle connection could not take (it had just closed) goes
/// once more on a fresh connection: nothing was sent yet.
pub async fn send(
    authority: &str,
    req: hyper::Request<Body>,
    now: Instant,
) -> Result<hyper::Response<Pooled>, SendError> {
    let mut req = req;
    loop {
        let (mut s, fresh) = match take_idle(authority, now) {
            Some(s) => (s, false),
            // Boxed: connecting is rare, and its future is large.
            None => (Box::pin(connect(authority)).await?, true),
        };
        // An idle connection may still be settling its last answer, or
        // have been closed by the upstream meanwhile.
        if !fresh && s.ready().await.is_err() {
            continue;
        }
        match s.try_send_request(req).await {
            Ok(res) => {
                let mut body = Pooled {
                    inner: None,
                    back: Some((s, Arc::<str>::from(authority))),
                };
                let (parts, inner) = res.into_parts();
                if inner.is_end_stream() {
                    body.release();
                }
                body.inner = Some(inner);
                return Ok(hyper::Response::from_parts(parts, body));
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if !fresh => req = unsent,
                _ => return Err(SendError::Failed(e.into_error())),
            },
        }
    }
}

/// An upstream answer's body; its connection goes back to the idle list
/// of the thread that reads the body to its end.
pub struct Pooled {
    inner: Option<Incoming>,
    back: Option<(Sender, Arc<str>)>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some((sender, authority)) = self.back.take() {
            put_idle(&authority, sender, Instant::now());
        }
    }
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let ended = inner.is_end_stream();
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if ended => self.release(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn an_idle_connection_is_reused_within_the_limit_and_closed_after_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let sender = connect(&authority).await.unwrap();
        let (mut upstream_side, _) = listener.accept().await.unwrap();

        let t0 = Instant::now();
        put_idle(&authority, sender, t0);
        let sender = take_idle(&authority, t0 + IDLE_TIMEOUT).expect("reused at the limit");
        put_idle(&authority, sender, t0 + IDLE_TIMEOUT);
        let later = t0 + 2 * IDLE_TIMEOUT + Duration::from_secs(1);
        assert!(
            take_idle(&authority, later).is_none(),
            "a connection idle past the limit was handed out"
        );
        assert!(
            take_idle(&authority, t0).is_none(),
            "the stale connection stayed in the idle list"
        );
        // Dropped, so closed: the upstream reads the end of the stream.
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), upstream_side.read(&mut buf))
            .await
            .expect("the stale connection was not closed")
            .unwrap();
        assert_eq!(read, 0, "the upstream got bytes instead of a close");
    }
}
