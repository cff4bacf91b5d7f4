//! A blocking client for the node agent's HTTP+JSON API.
//!
//! # Theory of operation
//!
//! The CNI plugin is a short-lived process that makes one or two calls, so
//! the client is synchronous: each call builds a current-thread tokio
//! runtime, connects to the agent's UNIX socket, does one HTTP/1.1
//! exchange with hyper (`Connection: close`, no pooling) and drops
//! everything. If the caller already runs inside a tokio runtime (a test,
//! the agent itself) the call runs on a scoped helper thread instead, so
//! `block_on` never nests and never panics.
//!
//! Every call is bounded by the client's timeout, which covers connecting,
//! sending and reading the whole (size-limited) answer. Errors keep the
//! distinction callers need: [`ClientError::Unreachable`] (no socket, or no
//! one listening: the agent is down), [`ClientError::Timeout`] (it is up
//! but did not answer in time), [`ClientError::Status`] (it answered with
//! an error, the message taken from its [`ApiError`] body) and
//! [`ClientError::Protocol`] (the exchange itself went wrong).
//!
//! The request and answer bodies are the types of [`super::api`], so the
//! client and the server cannot drift apart.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, StatusCode,
    body::Bytes,
    header::{CONNECTION, CONTENT_TYPE, HOST},
};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;

use super::api::{
    ApiError, AttachRequest, Attachment, AttachmentId, AttachmentList, Deleted, GcRequest,
    GcResponse,
};

/// Largest answer body the client reads (a listing of many attachments
/// with their settings stays far below it).
pub const MAX_BODY: usize = 16 << 20;

/// A default bound for calls that should be quick (`/healthz`, `GET`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to the agent failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The agent's socket is missing or nobody accepts on it: the agent
    /// is not running.
    #[error("agent unreachable at {}: {source}", socket.display())]
    Unreachable {
        /// The socket that was tried.
        socket: PathBuf,
        /// The error from `connect(2)`.
        source: io::Error,
    },
    /// The agent answered with an error status.
    #[error("agent answered {code}: {message}")]
    Status {
        /// The HTTP status code.
        code: u16,
        /// The `error` of its [`ApiError`] body (or the raw body).
        message: String,
    },
    /// The exchange failed after connecting (broken connection, bad
    /// HTTP, a body that is not the expected JSON).
    #[error("talking to the agent: {0}")]
    Protocol(String),
    /// No complete answer within the client's timeout.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// A client for one agent socket.
#[derive(Clone, Debug)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    /// A client for the agent listening on `socket_path`; every call
    /// gives up after `timeout`. Nothing is connected until a call.
    pub fn new(socket_path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket_path.into(),
            timeout,
        }
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `POST /v1/attachments`: asks the agent to serve a tap. Returns the
    /// attachment (new, or the identical existing one).
    pub fn attach(&self, req: &AttachRequest) -> Result<Attachment, ClientError> {
        let body = to_body(req)?;
        let (status, bytes) = self.call(Method::POST, "/v1/attachments".into(), Some(body))?;
        expect_json(status, &bytes)
    }

    /// `GET /v1/attachments/{id}`: one attachment with its counters, or
    /// `None` if the agent holds none of that id.
    pub fn get(&self, id: &AttachmentId) -> Result<Option<Attachment>, ClientError> {
        let (status, bytes) = self.call(Method::GET, attachment_path(id), None)?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        expect_json(status, &bytes).map(Some)
    }

    /// `DELETE /v1/attachments/{id}`: `true` if it was removed, `false`
    /// if the agent held none of that id.
    pub fn delete(&self, id: &AttachmentId) -> Result<bool, ClientError> {
        let (status, bytes) = self.call(Method::DELETE, attachment_path(id), None)?;
        if status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        let _: Deleted = expect_json(status, &bytes)?;
        Ok(true)
    }

    /// `GET /v1/attachments`: every attachment the agent holds.
    pub fn list(&self) -> Result<Vec<Attachment>, ClientError> {
        let (status, bytes) = self.call(Method::GET, "/v1/attachments".into(), None)?;
        let list: AttachmentList = expect_json(status, &bytes)?;
        Ok(list.attachments)
    }

    /// `POST /v1/gc`: removes the attachments not in `req.valid`.
    pub fn gc(&self, req: &GcRequest) -> Result<GcResponse, ClientError> {
        let body = to_body(req)?;
        let (status, bytes) = self.call(Method::POST, "/v1/gc".into(), Some(body))?;
        expect_json(status, &bytes)
    }

    /// `GET /healthz`: `Ok` when the agent answers 200.
    pub fn healthz(&self) -> Result<(), ClientError> {
        let (status, bytes) = self.call(Method::GET, "/healthz".into(), None)?;
        if status.is_success() {
            Ok(())
        } else {
            Err(status_error(status, &bytes))
        }
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let (status, bytes) = self.call(Method::GET, "/metrics".into(), None)?;
        if !status.is_success() {
            return Err(status_error(status, &bytes));
        }
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ClientError::Protocol("/metrics answer is not UTF-8".into()))
    }

    /// One exchange, bounded by the timeout; returns the status and the
    /// whole body.
    fn call(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        log::debug!("agent {}: {method} {path}", self.socket.display());
        let timeout = self.timeout;
        let fut = exchange(self.socket.clone(), method, path, body);
        block_on_bounded(timeout, fut)
    }
}

/// Runs `fut` to completion on a fresh current-thread runtime, at most
/// `timeout`; on a helper thread if this thread already runs a runtime.
fn block_on_bounded<T, F>(timeout: Duration, fut: F) -> Result<T, ClientError>
where
    F: Future<Output = Result<T, ClientError>> + Send,
    T: Send,
{
    let run = move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot start a tokio runtime: {e}")))?;
        rt.block_on(async move {
            tokio::time::timeout(timeout, fut)
                .await
                .unwrap_or(Err(ClientError::Timeout(timeout)))
        })
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| {
        s.spawn(run)
            .join()
            .unwrap_or_else(|_| Err(ClientError::Protocol("agent client thread panicked".into())))
    })
}

/// Connects, sends one request and reads the whole answer.
async fn exchange(
    socket: PathBuf,
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|source| ClientError::Unreachable {
            socket: socket.clone(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Protocol(format!("HTTP handshake: {e}")))?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("agent connection ended: {e}");
        }
    });
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "tapgate-agent")
        .header(CONNECTION, "close");
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let req = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Protocol(format!("building the request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Protocol(format!("sending the request: {e}")))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ClientError::Protocol(format!("reading the answer: {e}")))?
        .to_bytes();
    conn_task.abort();
    Ok((status, bytes))
}

fn to_body<T: Serialize>(value: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(value).map_err(|e| ClientError::Protocol(format!("encoding: {e}")))
}

/// Decodes a success answer, or turns an error answer into
/// [`ClientError::Status`].
fn expect_json<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, ClientError> {
    if !status.is_success() {
        return Err(status_error(status, bytes));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ClientError::Protocol(format!("unexpected answer ({status}): {e}")))
}

/// [`ClientError::Status`] with the [`ApiError`] message, or the body's
/// text when it is not one.
fn status_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    let message = match serde_json::from_slice::<ApiError>(bytes) {
        Ok(e) => e.error,
        Err(_) => {
            let text = String::from_utf8_lossy(bytes);
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                text.chars().take(512).collect()
            }
        }
    };
    ClientError::Status {
        code: status.as_u16(),
        message,
    }
}

/// `/v1/attachments/{containerId}/{ifname}`, each part percent-encoded.
fn attachment_path(id: &AttachmentId) -> String {
    format!(
        "/v1/attachments/{}/{}",
        percent_encode(&id.container_id),
        percent_encode(&id.ifname)
    )
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    fn id() -> AttachmentId {
        AttachmentId {
            container_id: "c1".into(),
            ifname: "tap0".into(),
        }
    }

    /// A one-shot server: answers the first request with `answer` and
    /// hands back what it received.
    fn serve_once(answer: &'static str) -> (tempdir::Dir, std::thread::JoinHandle<String>) {
        let dir = tempdir::Dir::new();
        let listener = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            loop {
                let n = conn.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if got.len() >= end + 4 + len || n == 0 {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            conn.write_all(answer.as_bytes()).unwrap();
            String::from_utf8(got).unwrap()
        });
        (dir, handle)
    }

    mod tempdir {
        use std::path::{Path, PathBuf};

        /// A private temporary directory removed on drop.
        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("tg-client-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn missing_socket_is_unreachable() {
        let dir = tempdir::Dir::new();
        let c = AgentClient::new(dir.path().join("none.sock"), Duration::from_secs(2));
        assert!(matches!(c.healthz(), Err(ClientError::Unreachable { .. })));
    }

    #[test]
    fn not_found_is_none_and_false() {
        let answer = "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"error\":\"none\"}\n";
        let (dir, h) = serve_once(answer);
        let c = AgentClient::new(dir.path().join("agent.sock"), Duration::from_secs(5));
        assert!(c.get(&id()).unwrap().is_none());
        let req = h.join().unwrap();
        assert!(
            req.starts_with("GET /v1/attachments/c1/tap0 HTTP/1.1\r\n"),
            "{req}"
        );

        let (dir, h) = serve_once(answer);
        let c = AgentClient::new(dir.path().join("agent.sock"), Duration::from_secs(5));
        assert!(!c.delete(&id()).unwrap());
        assert!(
            h.join()
                .unwrap()
                .starts_with("DELETE /v1/attachments/c1/tap0 ")
        );
    }

    #[test]
    fn error_body_becomes_status() {
        let answer =
            "HTTP/1.1 409 Conflict\r\ncontent-length: 26\r\n\r\n{\"error\":\"other settings\"}";
        let (dir, h) = serve_once(answer);
        let c = AgentClient::new(dir.path().join("agent.sock"), Duration::from_secs(5));
        match c.gc(&GcRequest::default()) {
            Err(ClientError::Status { code, message }) => {
                assert_eq!(code, 409);
                assert_eq!(message, "other settings");
            }
            other => panic!("{other:?}"),
        }
        let req = h.join().unwrap();
        assert!(req.starts_with("POST /v1/gc "), "{req}");
        assert!(req.ends_with("{\"valid\":[],\"network\":null}"), "{req}");
    }

    #[test]
    fn silent_agent_times_out() {
        let dir = tempdir::Dir::new();
        let _listener = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
        let c = AgentClient::new(dir.path().join("agent.sock"), Duration::from_millis(200));
        assert!(matches!(c.healthz(), Err(ClientError::Timeout(_))));
    }

    #[test]
    fn works_inside_a_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempdir::Dir::new();
        let c = AgentClient::new(dir.path().join("none.sock"), Duration::from_secs(1));
        let r = rt.block_on(async { c.healthz() });
        assert!(matches!(r, Err(ClientError::Unreachable { .. })));
    }

    #[test]
    fn paths_are_encoded() {
        let id = AttachmentId {
            container_id: "a.b_c-1".into(),
            ifname: "t%p#0".into(),
        };
        assert_eq!(attachment_path(&id), "/v1/attachments/a.b_c-1/t%25p%230");
    }
}
