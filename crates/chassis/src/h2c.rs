//! HTTP/2 over cleartext by HTTP/1.1 upgrade (RFC 7540 section 3.2):
//! a bodiless request with `Upgrade: h2c` and `HTTP2-Settings` is
//! answered `101 Switching Protocols`, and the connection goes on as
//! HTTP/2 with that request as stream 1.
//!
//! The h2 crate has no way to start a server connection with stream 1
//! already open (hyperium/h2#220), so the request is handed to it as the
//! client would have sent it over HTTP/2: a HEADERS frame for stream 1,
//! put into the incoming bytes right after the client's first SETTINGS
//! frame. RFC 9113 has since deprecated the mechanism; gRPC clients use
//! prior knowledge, which [`crate::http::serve_fast`] serves directly.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderName, Request, Version, header};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEAD: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's initial value: a larger header block is
/// not upgraded (the request is served over HTTP/1.1).
const MAX_FRAME: usize = 16_384;
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Whether `req` asks to upgrade to h2c and can be: HTTP/1.1, `Upgrade:
/// h2c`, `HTTP2-Settings`, `Connection` naming both, and no body.
pub fn wanted<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    let token_in = |name: &HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let no_body = || {
        !h.contains_key(header::TRANSFER_ENCODING)
            && h.get(header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0")
    };
    // The first test is the one nearly every request fails, cheaply.
    h.contains_key(header::UPGRADE)
        && req.version() == Version::HTTP_11
        && token_in(&header::UPGRADE, "h2c")
        && h.contains_key(HTTP2_SETTINGS)
        && token_in(&header::CONNECTION, "upgrade")
        && token_in(&header::CONNECTION, "http2-settings")
        && no_body()
}

/// HPACK's integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A field as "literal without indexing, new name", no Huffman coding.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    integer(out, 0, 7, name.len());
    out.extend_from_slice(name);
    integer(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// Fields that belong to one HTTP/1.1 connection, never to HTTP/2.
fn connection_specific(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "upgrade"
            | "http2-settings"
            | "host"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
    )
}

/// The HEADERS frame (END_STREAM, END_HEADERS) of stream 1 that carries
/// the upgraded request; `None` when it would not fit one frame.
pub fn stream_one<B>(req: &Request<B>) -> Option<Vec<u8>> {
    let mut block = Vec::new();
    field(&mut block, b":method", req.method().as_str().as_bytes());
    field(&mut block, b":scheme", b"http");
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    field(&mut block, b":path", path.as_bytes());
    if let Some(host) = req.headers().get(header::HOST) {
        field(&mut block, b":authority", host.as_bytes());
    }
    let headers: &HeaderMap = req.headers();
    for (name, value) in headers {
        if !connection_specific(name) {
            field(&mut block, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if block.len() > MAX_FRAME {
        return None;
    }
    let len = u32::try_from(block.len()).ok()?.to_be_bytes();
    let mut frame = Vec::with_capacity(FRAME_HEAD + block.len());
    // Length (24 bits), type HEADERS (1), flags END_STREAM | END_HEADERS, stream 1.
    frame.extend_from_slice(&len[1..]);
    frame.extend_from_slice(&[0x1, 0x5, 0, 0, 0, 1]);
    frame.extend_from_slice(&block);
    Some(frame)
}

/// The upgraded connection's bytes, with the stream-1 HEADERS frame put
/// in after the client's preface and first SETTINGS frame.
pub struct Injected<T> {
    io: T,
    /// Bytes read while looking for the end of the first frame.
    head: BytesMut,
    /// The frame to put in, until it is.
    frame: Option<Vec<u8>>,
    /// What is ready to be read out.
    out: BytesMut,
}

impl<T> Injected<T> {
    pub fn new(io: T, frame: Vec<u8>) -> Self {
        Self {
            io,
            head: BytesMut::new(),
            frame: Some(frame),
            out: BytesMut::new(),
        }
    }

    /// Once the preface and the first frame are in `head`, queues them,
    /// the injected frame, and whatever followed.
    fn try_inject(&mut self) {
        let Some(frame) = &self.frame else { return };
        let h = &self.head;
        if h.len() < PREFACE_LEN + FRAME_HEAD {
            return;
        }
        let f = &h[PREFACE_LEN..];
        let len = (usize::from(f[0]) << 16) | (usize::from(f[1]) << 8) | usize::from(f[2]);
        let end = PREFACE_LEN + FRAME_HEAD + len;
        if h.len() < end {
            return;
        }
        let first_is_settings = f[3] == 0x4;
        let mut rest = self.head.split_off(end);
        self.out.extend_from_slice(&self.head);
        // Anything but SETTINGS first is the client's error: h2 will say so.
        if first_is_settings {
            self.out.extend_from_slice(frame);
        }
        self.out.extend_from_slice(&rest.split());
        self.head.clear();
        self.frame = None;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Injected<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        loop {
            if !me.out.is_empty() {
                let n = me.out.len().min(buf.remaining());
                buf.put_slice(&me.out[..n]);
                me.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if me.frame.is_none() {
                return Pin::new(&mut me.io).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut me.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // Closed before a whole first frame: hand over what came.
                    me.out.extend_from_slice(&me.head.split());
                    me.frame = None;
                    if me.out.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    me.head.extend_from_slice(read.filled());
                    me.try_inject();
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Injected<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn upgrade_request(extra: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .uri("/api/v1/products?limit=1")
            .header("host", "gw:8080")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap_or_default()
    }

    #[test]
    fn only_bodiless_upgrades_to_h2c_are_taken() {
        assert!(wanted(&upgrade_request(&[])));
        assert!(!wanted(&upgrade_request(&[("content-length", "3")])));
        assert!(!wanted(&upgrade_request(&[(
            "transfer-encoding",
            "chunked"
        )])));
        let mut ws = upgrade_request(&[]);
        ws.headers_mut()
            .insert("upgrade", axum::http::HeaderValue::from_static("websocket"));
        assert!(!wanted(&ws));
    }

    #[test]
    fn hpack_integers_use_continuation_bytes() {
        let mut out = Vec::new();
        integer(&mut out, 0, 7, 10);
        integer(&mut out, 0, 7, 127);
        integer(&mut out, 0, 5, 1337);
        assert_eq!(out, [10, 127, 0, 31, 154, 10]);
    }

    #[tokio::test]
    async fn the_request_goes_in_after_the_first_settings_frame() {
        let req = upgrade_request(&[("authorization", "Bearer t")]);
        let frame = stream_one(&req).unwrap_or_default();
        assert_eq!(&frame[3..9], &[1, 5, 0, 0, 0, 1]);
        let block = &frame[9..];
        let text = String::from_utf8_lossy(block);
        assert!(text.contains(":path") && text.contains("/api/v1/products?limit=1"));
        assert!(text.contains("authorization") && !text.contains("http2-settings"));

        let mut client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        client.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        client.extend_from_slice(b"NEXT");
        // Delivered a few bytes at a time.
        let io = tokio_test_io(client.clone());
        let mut seen = Vec::new();
        Injected::new(io, frame.clone())
            .read_to_end(&mut seen)
            .await
            .unwrap_or_default();
        let mut expected = client[..PREFACE_LEN + 15].to_vec();
        expected.extend_from_slice(&frame);
        expected.extend_from_slice(b"NEXT");
        assert_eq!(seen, expected);
    }

    /// A reader that hands out 5 bytes per read.
    fn tokio_test_io(bytes: Vec<u8>) -> impl AsyncRead + Unpin {
        struct Trickle(Vec<u8>, usize);
        impl AsyncRead for Trickle {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                let start = self.1;
                let end = (start + 5).min(self.0.len());
                buf.put_slice(&self.0[start..end]);
                self.1 = end;
                Poll::Ready(Ok(()))
            }
        }
        Trickle(bytes, 0)
    }
}
