use std::collections::VecDeque;
use std::sync::Mutex;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// An upstream that answers each request it reads with the next of its
/// answers, written in the given pieces with a pause between each; an
/// empty piece closes the connection. It records each request with the
/// number of the connection (from 1) it came on.
struct Script {
    authority: String,
    seen: Arc<Mutex<Vec<(usize, String)>>>,
}

impl Script {
    async fn start(answers: Vec<Vec<&'static [u8]>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            for number in 1.. {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let (seen, answers) = (Arc::clone(&record), Arc::clone(&answers));
                tokio::spawn(async move {
                    while let Some(request) = read_request(&mut tcp).await {
                        seen.lock().unwrap().push((number, request));
                        let Some(answer) = answers.lock().unwrap().pop_front() else {
                            return;
                        };
                        for piece in answer {
                            if piece.is_empty() {
                                return;
                            }
                            tcp.write_all(piece).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                });
            }
        });
        Self { authority, seen }
    }

    fn connections(&self) -> Vec<usize> {
        self.seen.lock().unwrap().iter().map(|(n, _)| *n).collect()
    }

    fn request(&self, i: usize) -> String {
        self.seen.lock().unwrap()[i].1.clone()
    }
}

/// One request: its head and as many body bytes as it declares.
async fn read_request(tcp: &mut tokio::net::TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.parse().unwrap());
            if data.len() >= end + 4 + length {
                return Some(String::from_utf8_lossy(&data).into_owned());
            }
        }
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..n]);
    }
}

async fn call_with(
    authority: &str,
    method: Method,
    target: &str,
    body: &[u8],
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("up"));
    let body = Bytes::copy_from_slice(body);
    let req = Outgoing {
        method: &method,
        target,
        host: &HeaderValue::from_static("up"),
        headers: &headers,
        body: &body,
    };
    let res = send(authority, &req, Instant::now())
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = res.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

async fn get(authority: &str) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    call_with(authority, Method::GET, "/", b"").await
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test]
async fn a_length_framed_answer_in_pieces_is_read_whole_and_its_connection_reused() {
    let up = Script::start(vec![
        vec![
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"ngth: 11\r\nX-Instance-Id: a\r\n\r\nhello",
            b" world",
        ],
        vec![OK],
    ])
    .await;
    let (status, headers, body) = get(&up.authority).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-instance-id"], "a");
    assert_eq!(body, "hello world");
    assert_eq!(get(&up.authority).await.unwrap().2, "ok");
    assert_eq!(up.connections(), [1, 1], "the connection was not reused");
}

#[tokio::test]
async fn a_chunked_answer_is_decoded_across_reads_and_its_trailers_dropped() {
    let up = Script::start(vec![
        vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
            b"lo\r\n6\r\n world\r",
            b"\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n",
        ],
        vec![OK],
    ])
    .await;
    let (status, _, body) = get(&up.authority).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello world0123456789");
    assert_eq!(get(&up.authority).await.unwrap().2, "ok");
    assert_eq!(up.connections(), [1, 1], "the connection was not reused");
}

#[tokio::test]
async fn answers_without_a_body_leave_the_connection_in_step() {
    let up = Script::start(vec![
        vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"],
        vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
        vec![b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\netag: \"x\"\r\n\r\n"],
        vec![OK],
    ])
    .await;
    let (status, headers, body) = call_with(&up.authority, Method::HEAD, "/", b"")
        .await
        .unwrap();
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
    assert_eq!(
        headers[header::CONTENT_LENGTH],
        "5",
        "HEAD keeps the length"
    );
    let (status, _, body) = get(&up.authority).await.unwrap();
    assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
    let (status, _, body) = get(&up.authority).await.unwrap();
    assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
    assert_eq!(get(&up.authority).await.unwrap().2, "ok");
    assert_eq!(up.connections(), [1, 1, 1, 1]);
}

#[tokio::test]
async fn an_answer_without_a_length_is_read_until_close_and_not_reused() {
    let up = Script::start(vec![
        vec![b"HTTP/1.1 200 OK\r\n\r\npart one, ", b"part two", b""],
        vec![OK],
    ])
    .await;
    assert_eq!(get(&up.authority).await.unwrap().2, "part one, part two");
    assert_eq!(get(&up.authority).await.unwrap().2, "ok");
    assert_eq!(up.connections(), [1, 2]);
}

#[tokio::test]
async fn connections_the_upstream_closes_are_not_reused() {
    let up = Script::start(vec![
        vec![b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"],
        vec![b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"],
        vec![b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"],
        vec![OK],
        // Closed after a complete answer, with no word that it would be.
        vec![OK, b""],
        vec![OK],
    ])
    .await;
    for _ in 0..5 {
        get(&up.authority).await.unwrap();
    }
    // The close reaches the gateway while the connection is idle.
    // A POST is not sent again if its connection fails, so this passes
    // only if the closed connection was not used at all.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, _, body) = call_with(&up.authority, Method::POST, "/", b"x")
        .await
        .unwrap();
    assert_eq!(body, "ok");
    assert_eq!(up.connections(), [1, 2, 3, 3, 3, 4]);
}

#[tokio::test]
async fn interim_answers_are_skipped() {
    let up = Script::start(vec![vec![b"HTTP/1.1 100 Continue\r\n\r\n", OK]]).await;
    let (status, _, body) = get(&up.authority).await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
}

#[tokio::test]
async fn bad_answers_are_errors() {
    let cases: [(&[&'static [u8]], &str); 8] = [
        (
            &[b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n"],
            "invalid content-length",
        ),
        (
            &[b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok"],
            "invalid content-length",
        ),
        (
            &[b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok"],
            "conflicting",
        ),
        (&[b"HTTP/1.1 abc OK\r\n\r\n"], "malformed"),
        (
            &[b"HTTP/1.1 101 Switching Protocols\r\n\r\n"],
            "switched protocols",
        ),
        (&[b"HTTP/1.1 200 OK\r\ncontent-le", b""], "cut off"),
        (&[b""], "no answer"),
        (
            &[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf", b""],
            "mid-answer",
        ),
    ];
    for (answer, expected) in cases {
        let up = Script::start(vec![answer.to_vec()]).await;
        let err = get(&up.authority).await.unwrap_err();
        assert!(err.contains(expected), "{answer:?}: {err}");
    }
    let up = Script::start(vec![vec![
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]])
    .await;
    assert!(get(&up.authority).await.unwrap_err().contains("chunk size"));
    let up = Script::start(vec![vec![
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    ]])
    .await;
    assert!(
        get(&up.authority)
            .await
            .unwrap_err()
            .contains("longer than")
    );

    let huge: &'static [u8] = Box::leak(
        [&b"HTTP/1.1 200 OK\r\nx-big: "[..], &[b'a'; 70_000]]
            .concat()
            .into_boxed_slice(),
    );
    let up = Script::start(vec![vec![huge]]).await;
    assert!(
        get(&up.authority)
            .await
            .unwrap_err()
            .contains("larger than")
    );

    let err = get("127.0.0.1:1").await.unwrap_err();
    assert!(err.starts_with("cannot connect"), "{err}");
}

#[tokio::test]
async fn requests_go_out_as_given_with_the_bodys_own_length() {
    let big = vec![b'b'; INLINE_BODY + 1000];
    let up = Script::start(vec![vec![OK], vec![OK], vec![OK], vec![OK]]).await;
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("up"));
    headers.insert("x-a", HeaderValue::from_static("1"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
    let body = Bytes::from_static(b"abc");
    let req = Outgoing {
        method: &Method::POST,
        target: "/p?q=1",
        host: &HeaderValue::from_static("up"),
        headers: &headers,
        body: &body,
    };
    send(&up.authority, &req, Instant::now())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        up.request(0),
        "POST /p?q=1 HTTP/1.1\r\nhost: up\r\nx-a: 1\r\ncontent-length: 3\r\n\r\nabc"
    );
    call_with(&up.authority, Method::POST, "/e", b"")
        .await
        .unwrap();
    assert_eq!(
        up.request(1),
        "POST /e HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n"
    );
    get(&up.authority).await.unwrap();
    assert_eq!(up.request(2), "GET / HTTP/1.1\r\nhost: up\r\n\r\n");
    call_with(&up.authority, Method::PUT, "/big", &big)
        .await
        .unwrap();
    assert!(up.request(3).ends_with(std::str::from_utf8(&big).unwrap()));
    assert_eq!(up.connections(), [1, 1, 1, 1]);
}

#[test]
fn only_origin_form_targets_are_valid() {
    assert!(valid_target("/products/1?x=a%20b"));
    assert!(!valid_target("products"));
    assert!(!valid_target("/a b"));
    assert!(!valid_target("/a\r\nx: y"));
}

#[tokio::test]
async fn an_idle_connection_is_reused_within_the_limit_and_closed_after_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string();
    let up = connect(&authority).await.unwrap();
    let (mut upstream_side, _) = listener.accept().await.unwrap();

    let t0 = Instant::now();
    put_idle(&authority, up, t0);
    let up = take_idle(&authority, t0 + IDLE_TIMEOUT).expect("reused at the limit");
    put_idle(&authority, up, t0 + IDLE_TIMEOUT);
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

#[tokio::test]
async fn idle_connections_the_upstream_closed_are_swept_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = listener.local_addr().unwrap().to_string();
    let up = connect(&gone).await.unwrap();
    let (upstream_side, _) = listener.accept().await.unwrap();
    let other = Script::start(vec![vec![OK]]).await;
    let kept = connect(&other.authority).await.unwrap();

    let t0 = Instant::now();
    SWEPT.set(Some(t0));
    put_idle(&gone, up, t0);
    // The instance goes away; no request goes to it again.
    drop(upstream_side);
    drop(listener);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let count = |authority: &str| IDLE.with_borrow(|idle| idle.get(authority).map_or(0, Vec::len));
    put_idle(&other.authority, kept, t0 + Duration::from_secs(1));
    assert_eq!(count(&gone), 1, "swept before its time");
    let up = take_idle(&other.authority, t0).unwrap();
    put_idle(
        &other.authority,
        up,
        t0 + SWEEP_EVERY + Duration::from_secs(1),
    );
    assert_eq!(count(&gone), 0, "a closed idle connection was kept");
    assert_eq!(count(&other.authority), 1, "a usable connection was swept");
}

#[tokio::test]
async fn a_request_a_reused_connection_drops_goes_once_more_if_idempotent() {
    // The upstream reads the second request and closes without a word.
    let up = Script::start(vec![vec![OK], vec![b""], vec![OK]]).await;
    get(&up.authority).await.unwrap();
    assert_eq!(get(&up.authority).await.unwrap().2, "ok");
    assert_eq!(up.connections(), [1, 1, 2]);

    let up = Script::start(vec![vec![OK], vec![b""], vec![OK]]).await;
    get(&up.authority).await.unwrap();
    let err = call_with(&up.authority, Method::POST, "/", b"x")
        .await
        .unwrap_err();
    assert!(err.contains("no answer"), "{err}");
    assert_eq!(up.connections(), [1, 1], "a POST was sent twice");

    // Once, on a new connection, however many are idle; if that fails
    // too, the call fails.
    let up = Script::start(vec![vec![OK], vec![OK], vec![b""], vec![b""], vec![OK]]).await;
    let (a, b) = tokio::join!(get(&up.authority), get(&up.authority));
    a.unwrap();
    b.unwrap();
    assert!(get(&up.authority).await.is_err());
    let seen = up.connections();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(
        seen[3], 3,
        "the retry did not take a new connection: {seen:?}"
    );
}
