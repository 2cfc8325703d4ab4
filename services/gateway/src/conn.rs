//! The gateway's HTTP/1.1 client: upstream connections, kept idle per
//! thread and per instance.
//!
//! hyper's client runs each connection as a task of its own and hands it
//! every request through a channel, and the answer back through another:
//! two task switches per proxied request, about a quarter of the gateway's
//! user time under load. Here the task serving the request writes it
//! (head and the whole, already read body in one write) and reads the
//! answer head itself; the answer's body is read from the connection by
//! whoever polls it (hyper's server connection, as it sends the answer on).
//!
//! The gateway serves each client connection on one thread (see
//! `bazaar_chassis::http::serve_fast`); a request's upstream connection is
//! taken from that thread's idle list, so the client side, the proxy and
//! the upstream side of a call all run on one thread with no hand-over
//! between threads. A connection goes back to the list when its answer's
//! body has been read to the end and the upstream did not ask to close
//! it; one dropped half-read is closed, and one left idle longer than
//! [`IDLE_TIMEOUT`] is closed instead of reused.
//!
//! Answers are framed as RFC 9112 section 6 says: no body for HEAD, 1xx,
//! 204 and 304; chunked when the last transfer coding is chunked; else
//! `Content-Length`; else until the upstream closes. Interim (1xx)
//! answers are skipped; a switch of protocols is refused (the gateway
//! strips `Upgrade`, so an upstream has no cause to switch).

use std::cell::{Cell, RefCell};
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
/// Largest answer head (status line and headers) taken.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in an answer head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line taken in a chunked body.
const MAX_LINE: usize = 4096;
/// Room made in a connection's buffer before each read.
const READ_SIZE: usize = 16 * 1024;
/// Request bodies up to this size go out in the same write as the head.
const INLINE_BODY: usize = 64 * 1024;

/// One upstream connection, with what was read from it and not yet used.
pub struct Upstream {
    io: TcpStream,
    buf: BytesMut,
}

impl Upstream {
    /// Whether an idle connection can take a request: the upstream has
    /// not closed it, nor sent anything unasked.
    fn usable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: closed, sent something, or readiness left over
            // from the last answer; a read tells which.
            Poll::Ready(Ok(())) => matches!(
                self.io.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        self.make_room();
        self.io.read_buf(&mut self.buf).await
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.make_room();
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// Idle connections, oldest first, each with when it went idle.
type IdleList = Vec<(Upstream, Instant)>;

thread_local! {
    static IDLE: RefCell<bazaar_mesh::FastMap<Arc<str>, IdleList>> = RefCell::default();
    /// When this thread's idle lists were last swept.
    static SWEPT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// How often a thread's idle lists are swept of connections the upstream
/// has closed or that have been idle too long. Idle connections are not
/// watched (that would take a task each), so without a sweep those of an
/// instance that went away would stay open.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: nothing was sent.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// The connection failed, or closed, or carried no valid answer head.
    #[error("{0}")]
    Failed(String),
}

fn failed(what: &str, e: impl std::fmt::Display) -> SendError {
    SendError::Failed(format!("{what}: {e}"))
}

/// Whether a connection idle since `since` may still be used at `now`.
fn not_stale(since: Instant, now: Instant) -> bool {
    now.saturating_duration_since(since) <= IDLE_TIMEOUT
}

fn take_idle(authority: &str, now: Instant) -> Option<Upstream> {
    IDLE.with_borrow_mut(|idle| {
        let list = idle.get_mut(authority)?;
        while let Some((up, since)) = list.pop() {
            if !not_stale(since, now) {
                // The newest is too old: so are the rest. Dropping a
                // connection closes it.
                list.clear();
                return None;
            }
            if up.usable() {
                return Some(up);
            }
        }
        None
    })
}

fn put_idle(authority: &str, up: Upstream, now: Instant) {
    let usable = |(up, since): &(Upstream, Instant)| up.usable() && not_stale(*since, now);
    IDLE.with_borrow_mut(|idle| {
        let swept = SWEPT.get();
        if swept.is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY) {
            SWEPT.set(Some(now));
            if swept.is_some() {
                idle.retain(|_, list| {
                    list.retain(usable);
                    !list.is_empty()
                });
            }
        }
        if let Some(list) = idle.get_mut(authority) {
            if list.len() >= MAX_IDLE {
                list.retain(usable);
            }
            if list.len() < MAX_IDLE {
                list.push((up, now));
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
            idle.insert(Arc::from(authority), vec![(up, now)]);
        }
    });
}

async fn connect(authority: &str) -> Result<Upstream, SendError> {
    let refused = |e: String| SendError::Connect(authority.to_owned(), e);
    let io = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| refused("timed out".into()))?
        .map_err(|e| refused(e.to_string()))?;
    bazaar_chassis::http::no_delay(&io);
    Ok(Upstream {
        io,
        buf: BytesMut::new(),
    })
}

/// A request to send upstream. The body is whole: the gateway reads a
/// request's body (within its limit) before it forwards the request.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// Path and query, checked with [`valid_target`].
    pub target: &'a str,
    /// The `Host` field: the instance's authority.
    pub host: &'a HeaderValue,
    /// Without `Host` and hop-by-hop fields; `Content-Length` is
    /// replaced by the body's.
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
}

/// Whether a method may be sent again: repeating it changes nothing
/// more than sending it once (RFC 9110 section 9.2.2; POST and PATCH
/// are not).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// Whether `target` can go on a request line: an origin-form path (and
/// query) of visible characters.
pub fn valid_target(target: &str) -> bool {
    target.starts_with('/') && target.bytes().all(|b| b > b' ' && b != 0x7f)
}

/// Whether the body goes out in the same write as the head.
fn inline_body(req: &Outgoing<'_>) -> bool {
    req.body.len() <= INLINE_BODY
}

/// The request as it goes on the wire; a small body rides along.
fn encode(req: &Outgoing<'_>) -> Vec<u8> {
    let inline = if inline_body(req) { req.body.len() } else { 0 };
    let fields: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + req.host.len()
        + 8;
    // Request line, fields, a content-length field, the blank line: one
    // allocation, never grown.
    let mut out = Vec::with_capacity(req.target.len() + fields + 64 + inline);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(req.host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in req.headers {
        if name == header::CONTENT_LENGTH || name == header::HOST {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let has_body =
        !req.body.is_empty() || matches!(*req.method, Method::POST | Method::PUT | Method::PATCH);
    if has_body {
        // Writing to a Vec cannot fail.
        let _ = write!(out, "content-length: {}\r\n", req.body.len());
    }
    out.extend_from_slice(b"\r\n");
    if inline > 0 {
        out.extend_from_slice(req.body);
    }
    out
}

/// Whether the instance at `authority` answers `GET /health` with 200
/// (the active health check), reading the body so the connection stays
/// usable.
pub async fn healthy(authority: &str, host: &HeaderValue) -> bool {
    let req = Outgoing {
        method: &Method::GET,
        target: "/health",
        host,
        headers: &HeaderMap::new(),
        body: &Bytes::new(),
    };
    let Ok(res) = send(authority, &req, Instant::now()).await else {
        return false;
    };
    let ok = res.status() == StatusCode::OK;
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .is_ok()
        && ok
}

/// Sends `req` to `authority` (`host:port`) on an idle connection, or a
/// new one, and reads the answer head; `now` is the caller's clock
/// reading (one fewer per request).
///
/// A request that fails on a reused connection before any byte of an
/// answer came goes once more, on a new connection, when that is safe:
/// the write itself failed, or the method is idempotent (the upstream
/// may have closed the idle connection just as the request went out).
pub async fn send(
    authority: &str,
    req: &Outgoing<'_>,
    now: Instant,
) -> Result<hyper::Response<Pooled>, SendError> {
    let wire = encode(req);
    let idempotent = idempotent(req.method);
    let mut retried = false;
    loop {
        let idle = if retried {
            None
        } else {
            take_idle(authority, now)
        };
        let (mut up, reused) = match idle {
            Some(up) => (up, true),
            // Boxed: connecting is rare, and its future is large.
            None => (Box::pin(connect(authority)).await?, false),
        };
        if let Err(e) = write(&mut up, &wire, req).await {
            if reused {
                retried = true;
                continue;
            }
            return Err(failed("cannot send the request", e));
        }
        match read_head(&mut up, req.method).await {
            Ok(head) => return Ok(head.into_response(up, authority, now)),
            Err(HeadError::Nothing(_)) if reused && idempotent => {
                retried = true;
                continue;
            }
            Err(HeadError::Nothing(e)) => return Err(failed("no answer", e)),
            Err(HeadError::Bad(e)) => return Err(SendError::Failed(e)),
        }
    }
}

async fn write(up: &mut Upstream, wire: &[u8], req: &Outgoing<'_>) -> io::Result<()> {
    up.io.write_all(wire).await?;
    if !inline_body(req) {
        up.io.write_all(req.body).await?;
    }
    Ok(())
}

/// Why no answer head was read.
enum HeadError {
    /// The connection failed or closed before any byte of an answer.
    Nothing(io::Error),
    /// An answer began, but its head was cut off or invalid.
    Bad(String),
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    Close,
}

/// An answer head, read and checked.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    /// Whether the connection may carry another request afterwards.
    keep_alive: bool,
}

impl Head {
    fn into_response(
        self,
        mut up: Upstream,
        authority: &str,
        now: Instant,
    ) -> hyper::Response<Pooled> {
        let body = match self.framing {
            Framing::Length(n) if up.buf.len() as u64 >= n => {
                // The whole body came with the head (most answers do): the
                // connection is free at once.
                let body = up.buf.split_to(n as usize).freeze();
                if self.keep_alive && up.buf.is_empty() {
                    put_idle(authority, up, now);
                }
                Pooled::Whole((!body.is_empty()).then_some(body))
            }
            framing => Pooled::Reading(Box::new(Reading {
                up,
                framing,
                back: self.keep_alive.then(|| Arc::from(authority)),
            })),
        };
        let mut res = hyper::Response::new(body);
        *res.status_mut() = self.status;
        *res.headers_mut() = self.headers;
        res
    }
}

async fn read_head(up: &mut Upstream, method: &Method) -> Result<Head, HeadError> {
    let mut got_any = false;
    loop {
        if !up.buf.is_empty() {
            got_any = true;
            match parse_head(&mut up.buf, method).map_err(HeadError::Bad)? {
                Parsed::Final(head) => return Ok(head),
                Parsed::Interim => continue,
                Parsed::Partial if up.buf.len() > MAX_HEAD => {
                    return Err(HeadError::Bad(format!(
                        "the answer head is larger than {MAX_HEAD} bytes"
                    )));
                }
                Parsed::Partial => {}
            }
        }
        match up.fill().await {
            Ok(0) if got_any => return Err(HeadError::Bad("the answer head was cut off".into())),
            Ok(0) => {
                return Err(HeadError::Nothing(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed",
                )));
            }
            Ok(_) => {}
            Err(e) if got_any => return Err(HeadError::Bad(format!("reading the answer: {e}"))),
            Err(e) => return Err(HeadError::Nothing(e)),
        }
    }
}

enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A 1xx answer, taken off the buffer; the real one follows.
    Interim,
    Final(Head),
}

/// Parses the answer head at the start of `buf`; a complete one is taken
/// off it (the body, or the start of it, stays).
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Parsed, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut slots);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(format!("malformed answer head: {e}")),
    };
    let code = res.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| format!("invalid status {code}"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("the upstream switched protocols".into());
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let http11 = res.version == Some(1);
    // Values are sliced out of the head after it leaves the buffer (no
    // copies): note where each one lies.
    let start = buf.as_ptr() as usize;
    let count = res.headers.len();
    let mut fields = [const { None }; MAX_HEADERS];
    for (field, h) in fields.iter_mut().zip(res.headers.iter()) {
        let at = h.value.as_ptr() as usize - start;
        *field = Some((header_name(h.name)?, at, at + h.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for (name, from, to) in fields.into_iter().take(count).flatten() {
        let value = HeaderValue::from_maybe_shared(head.slice(from..to))
            .map_err(|_| format!("invalid value of header {name}"))?;
        headers.append(name, value);
    }

    let mut keep_alive = http11;
    for token in crate::tokens(&headers, header::CONNECTION) {
        if token.eq_ignore_ascii_case("close") {
            keep_alive = false;
        } else if token.eq_ignore_ascii_case("keep-alive") && !http11 {
            keep_alive = true;
        }
    }
    let framing = if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        // With both a transfer coding and a length, the coding wins and
        // the connection is not trusted with another request.
        if headers.contains_key(header::CONTENT_LENGTH) {
            keep_alive = false;
        }
        match crate::tokens(&headers, header::TRANSFER_ENCODING).last() {
            Some(last) if last.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunk::Size),
            _ => Framing::Close,
        }
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        let mut length = None;
        for token in crate::tokens(&headers, header::CONTENT_LENGTH) {
            let n = (!token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()))
                .then(|| token.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| format!("invalid content-length {token:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values".into());
            }
            length = Some(n);
        }
        Framing::Length(length.unwrap_or_default())
    } else {
        Framing::Close
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    Ok(Parsed::Final(Head {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// Names Bazaar's services send on every answer; made once, as a name
/// not in the standard list is otherwise copied each time it is read.
const OWN_NAMES: [HeaderName; 2] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-instance-id"),
];

fn header_name(name: &str) -> Result<HeaderName, String> {
    if let Some(own) = OWN_NAMES
        .iter()
        .find(|own| own.as_str().eq_ignore_ascii_case(name))
    {
        return Ok(own.clone());
    }
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes of it left.
    Data(u64),
    /// At the line end after a chunk's data.
    DataEnd,
    /// Among the trailer fields after the last chunk (dropped).
    Trailers,
    Done,
}

/// What a body's reader made of the bytes buffered so far.
#[derive(Debug, PartialEq)]
enum Step {
    Data(Bytes),
    /// More bytes are needed.
    More,
    Done,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The next line in `buf`, without its line end, taken off the buffer.
fn take_line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(invalid("a chunked-body line is too long")),
        None => Ok(None),
    }
}

fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(invalid("invalid chunk size"));
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let d = (b as char)
            .to_digit(16)
            .ok_or_else(|| invalid("invalid chunk size"))?;
        Ok((n << 4) | u64::from(d))
    })
}

/// Reads a chunked body's next piece from `buf`.
fn chunked_step(state: &mut Chunk, buf: &mut BytesMut) -> io::Result<Step> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Step::More);
                };
                *state = match chunk_size(&line)? {
                    0 => Chunk::Trailers,
                    n => Chunk::Data(n),
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = left.min(buf.len() as u64);
                *state = match left - take {
                    0 => Chunk::DataEnd,
                    rest => Chunk::Data(rest),
                };
                return Ok(Step::Data(buf.split_to(take as usize).freeze()));
            }
            Chunk::DataEnd => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Step::More);
                };
                if !line.is_empty() {
                    return Err(invalid("a chunk is longer than its size"));
                }
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Step::More);
                };
                if line.is_empty() {
                    *state = Chunk::Done;
                }
            }
            Chunk::Done => return Ok(Step::Done),
        }
    }
}

/// Reads the next piece of a body framed by `framing` from `buf`.
fn step(framing: &mut Framing, buf: &mut BytesMut) -> io::Result<Step> {
    match framing {
        Framing::Length(0) => Ok(Step::Done),
        Framing::Length(left) => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            let take = (*left).min(buf.len() as u64);
            *left -= take;
            Ok(Step::Data(buf.split_to(take as usize).freeze()))
        }
        Framing::Chunked(state) => chunked_step(state, buf),
        Framing::Close if buf.is_empty() => Ok(Step::More),
        Framing::Close => Ok(Step::Data(buf.split().freeze())),
    }
}

/// An upstream answer's body; its connection goes back to the idle list
/// of the thread that reads the body to its end.
pub enum Pooled {
    /// Came whole with the head (or there is none).
    Whole(Option<Bytes>),
    /// Being read from the connection.
    Reading(Box<Reading>),
}

pub struct Reading {
    up: Upstream,
    framing: Framing,
    /// Where the connection goes back to, if it may be reused.
    back: Option<Arc<str>>,
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let r = match &mut *self {
            Pooled::Whole(body) => return Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            Pooled::Reading(r) => r,
        };
        loop {
            match step(&mut r.framing, &mut r.up.buf) {
                Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Step::Done) => break,
                Ok(Step::More) => {}
                Err(e) => {
                    // The connection is dropped, so closed.
                    *self = Pooled::Whole(None);
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(r.up.poll_fill(cx)) {
                Ok(0) if r.framing == Framing::Close => break,
                Ok(0) => {
                    *self = Pooled::Whole(None);
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection mid-answer",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    *self = Pooled::Whole(None);
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
        if let Pooled::Reading(r) = std::mem::replace(&mut *self, Pooled::Whole(None))
            && let Some(authority) = &r.back
            && r.up.buf.is_empty()
        {
            put_idle(authority, r.up, Instant::now());
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Pooled::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Pooled::Whole(None) => SizeHint::with_exact(0),
            Pooled::Whole(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Pooled::Reading(r) => match r.framing {
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests;
