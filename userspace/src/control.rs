//! The control socket: `tapgate stats`, `tapgate flows` and `tapgate rules`.
//!
//! # Theory of operation
//!
//! A running daemon listens on a UNIX stream socket (`--control-socket`,
//! default `/run/tapgate/<tap>.sock`, mode 0600 in a 0755 directory). The
//! protocol is one request per connection: the client writes one line
//! (`stats\n`, `flows\n`, `rules list\n`, `rules add tcp|udp SPEC\n` or
//! `rules del tcp|udp SPEC [reset-flows]\n`), the daemon writes one JSON
//! document followed by a newline and closes. An unknown command, or a
//! rules change the daemon refuses, gets `{"error": "..."}`.
//!
//! The daemon side is [`serve`], a future that never completes and that the
//! daemon polls next to its other work (in its `select!`). What it reports
//! comes from a [`ControlSource`] the daemon implements; the source is
//! borrowed, never sent across threads, so it can hold its state in a
//! `RefCell` on the daemon's current-thread runtime. Inside, `serve` is split
//! in two:
//!
//! * the *accept loop* (the future itself) accepts connections, answers
//!   parsed requests by calling the source, and reaps finished clients;
//! * one small *client task* per connection (spawned onto the same runtime
//!   and owned by a `JoinSet`, so they are aborted when `serve` is dropped)
//!   does the socket I/O: it reads the request line, sends the command to
//!   the accept loop over a channel, gets the encoded reply back and writes
//!   it.
//!
//! Every step is bounded ([`Limits`]): a client must deliver its request
//! line within [`REQUEST_TIMEOUT`] and in at most [`MAX_REQUEST`] bytes or it
//! is dropped without an answer, a reply must be taken within
//! [`REPLY_TIMEOUT`], and at most [`MAX_CLIENTS`] connections are open at
//! once (further ones wait in the listen backlog). A slow or silent client
//! therefore only ever costs its own task; the daemon never waits for it.
//!
//! [`ControlSocket::bind`] (also [`bind_control_socket`]) owns the socket
//! file: an existing socket that a live daemon answers on is refused
//! ("control socket PATH is in use"), a stale one (connection refused) is
//! replaced, anything that is not a socket is left alone and refused. The
//! file is removed when the guard drops, unless another process has
//! replaced it meanwhile.
//!
//! The client side is [`query`] (blocking, bounded by a deadline), and
//! [`render_stats`] / [`render_flows`] turn the documents into text for
//! people. The renderers know the documented keys (see [`ControlSource`])
//! and print any other key as `key: value`, so new counters show up without
//! touching the client.

use std::{
    fmt::Write as _,
    fs,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{
            fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
            net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
        },
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{debug, warn};
use nix::{
    errno::Errno,
    sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket},
};
use serde_json::{Value, json};

use crate::fwd::Proto;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::JoinSet,
    time::timeout,
};

/// Directory of the default control sockets.
pub const CONTROL_DIR: &str = "/run/tapgate";
/// Longest accepted request line, in bytes (without the newline).
pub const MAX_REQUEST: usize = 1024;
/// How long a client has to deliver its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the daemon's reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at the same time; more wait in the listen backlog.
pub const MAX_CLIENTS: usize = 64;
/// Default bound on a whole [`query`] (connect, request, reply).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply [`query`] accepts.
pub const MAX_REPLY: usize = 64 << 20;
/// Longest socket path the kernel accepts (`sun_path` minus the NUL).
const MAX_PATH: usize = 107;

/// What the daemon reports on its control socket.
///
/// All methods are called on the daemon's own thread, one request at a
/// time, so an implementation may keep its state in a `RefCell`. They should
/// be quick: they run on the daemon's event loop.
///
/// Documented keys (the client's text output knows them; more are welcome):
///
/// * [`stats`](Self::stats): an object with `fastpath_packets`,
///   `fastpath_bytes`, `slowpath_packets` (numbers), `punts` (an object
///   mapping a punt reason's name to its count) and `flows_active`.
/// * [`flows`](Self::flows): an array of objects with `proto` (`"tcp"`,
///   `"udp"`, ...), `guest`, `remote` and `nat` (each `"ip:port"`), `state`
///   and `fastpath_packets`.
/// * [`rules`](Self::rules): for `List`, `{"rules": [...]}`, each rule an
///   object with `proto`, `spec` (the SPEC item it came from), `addr`
///   (or null), `host` and `guest` (port ranges) and `hits` (flows opened
///   through it); for `Add`, `{"added": [...]}`; for `Del`,
///   `{"removed": [...], "flows_reset": N}`; or `{"error": "..."}`.
pub trait ControlSource {
    /// The daemon's counters.
    fn stats(&self) -> Value;
    /// The daemon's flows.
    fn flows(&self) -> Value;
    /// Lists or changes the forwarding rules.
    fn rules(&self, request: &RulesRequest) -> Value;
}

/// A `rules` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RulesRequest {
    /// `rules list`.
    List,
    /// `rules add PROTO SPEC`: forward more ports (next connection on).
    Add {
        /// The protocol.
        proto: Proto,
        /// A `-t`/`-u` SPEC.
        spec: String,
    },
    /// `rules del PROTO SPEC [reset-flows]`: remove the rules SPEC stands
    /// for; their flows stay unless `reset_flows`.
    Del {
        /// The protocol.
        proto: Proto,
        /// The SPEC the rules were added with.
        spec: String,
        /// Reset the flows opened through the removed rules.
        reset_flows: bool,
    },
}

/// A request of the control protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlCommand {
    /// `stats`: the counters.
    Stats,
    /// `flows`: the flow list.
    Flows,
    /// `rules ...`: the forwarding rules.
    Rules(RulesRequest),
}

impl ControlCommand {
    /// The request line on the wire (without the newline).
    pub fn to_line(&self) -> String {
        match self {
            Self::Stats => "stats".to_owned(),
            Self::Flows => "flows".to_owned(),
            Self::Rules(RulesRequest::List) => "rules list".to_owned(),
            Self::Rules(RulesRequest::Add { proto, spec }) => format!("rules add {proto} {spec}"),
            Self::Rules(RulesRequest::Del {
                proto,
                spec,
                reset_flows,
            }) => {
                let reset = if *reset_flows { " reset-flows" } else { "" };
                format!("rules del {proto} {spec}{reset}")
            }
        }
    }

    /// Parses a request line (surrounding whitespace ignored).
    pub fn parse(line: &str) -> Option<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let proto = |w: &str| match w {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        };
        match words.as_slice() {
            ["stats"] => Some(Self::Stats),
            ["flows"] => Some(Self::Flows),
            ["rules", "list"] => Some(Self::Rules(RulesRequest::List)),
            ["rules", "add", p, spec] => Some(Self::Rules(RulesRequest::Add {
                proto: proto(p)?,
                spec: (*spec).to_owned(),
            })),
            ["rules", "del", p, spec, rest @ ..] => {
                let reset_flows = match rest {
                    [] => false,
                    ["reset-flows"] => true,
                    _ => return None,
                };
                Some(Self::Rules(RulesRequest::Del {
                    proto: proto(p)?,
                    spec: (*spec).to_owned(),
                    reset_flows,
                }))
            }
            _ => None,
        }
    }
}

/// Errors of the control socket, on both sides.
#[derive(Debug, Error)]
pub enum ControlError {
    /// A live daemon answers on the socket.
    #[error("control socket {} is in use (another tapgate answers on it)", .0.display())]
    InUse(PathBuf),
    /// The path exists and is something other than a socket.
    #[error("control socket {} exists and is not a socket", .0.display())]
    NotSocket(PathBuf),
    /// The path does not fit in a socket address.
    #[error("control socket path {} is too long (at most {MAX_PATH} bytes)", .0.display())]
    PathTooLong(PathBuf),
    /// A system call failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Nobody listens on the socket.
    #[error("no tapgate daemon answers on {}", path.display())]
    NoDaemon {
        /// The socket path.
        path: PathBuf,
        /// Why connecting failed.
        source: io::Error,
    },
    /// The daemon did not answer in time.
    #[error("no answer from the daemon on {} within {timeout:?}", path.display())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The bound that expired.
        timeout: Duration,
    },
    /// The reply is not a JSON document.
    #[error("bad reply from the daemon on {}: {reason}", path.display())]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The daemon answered with `{"error": ...}`.
    #[error("the daemon on {} answered: {message}", path.display())]
    Daemon {
        /// The socket path.
        path: PathBuf,
        /// The daemon's message.
        message: String,
    },
}

/// The default control socket of the daemon serving `tap`:
/// `/run/tapgate/<tap>.sock` in the host's initial network namespace, and
/// `/run/tapgate/netns-<inode>/<tap>.sock` in any other one (or where the
/// initial one cannot be identified). Tap names are
/// per namespace, so the same name can serve two guests in two namespaces;
/// `/run` is usually shared between them, so the namespace goes into the
/// path. A client run in the same namespace (`ip netns exec NS tapgate
/// stats --tap TAP`) computes the same path.
pub fn default_socket_path(tap: &str) -> PathBuf {
    default_socket_path_in(
        tap,
        netns_id(crate::netns::THREAD_NETNS),
        netns_id("/proc/1/ns/net"),
    )
}

/// The inode of a network namespace file, `None` if it cannot be read.
fn netns_id(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// [`default_socket_path`] given this process's and init's namespace ids.
/// Only a namespace known to be init's gets the short path: where init's
/// cannot be read (a sandbox may hide it even from root), the namespaced
/// path is used, which never collides.
fn default_socket_path_in(tap: &str, own: Option<u64>, init: Option<u64>) -> PathBuf {
    let dir = Path::new(CONTROL_DIR);
    match own {
        Some(own) if init != Some(own) => {
            dir.join(format!("netns-{own}")).join(format!("{tap}.sock"))
        }
        _ => dir.join(format!("{tap}.sock")),
    }
}

fn check_path_len(path: &Path) -> Result<(), ControlError> {
    if path.as_os_str().len() > MAX_PATH {
        return Err(ControlError::PathTooLong(path.to_path_buf()));
    }
    Ok(())
}

/// Whether something listens on the socket at `path`: `Ok(true)` if a
/// connection is accepted (or the backlog is full, which also means a live
/// listener), `Ok(false)` if the connection is refused (a stale socket).
/// Never blocks: the connect is non-blocking.
fn probe_live(path: &Path) -> io::Result<bool> {
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN) => Ok(true),
        Err(Errno::ECONNREFUSED) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The bound control socket; removes the socket file when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: StdUnixListener,
    path: PathBuf,
    /// Device and inode of the file we created, so that `Drop` never
    /// removes a socket another process has put there since.
    ident: (u64, u64),
}

/// Binds the control socket at `path`; see [`ControlSocket::bind`].
pub fn bind_control_socket(path: &Path) -> Result<ControlSocket, ControlError> {
    ControlSocket::bind(path)
}

impl ControlSocket {
    /// Binds a listening socket at `path` (mode 0600), creating a missing
    /// parent directory with mode 0755. A socket file already there is
    /// replaced if stale and refused with [`ControlError::InUse`] if a
    /// daemon answers on it; any other kind of file is refused. Needs no
    /// tokio runtime (call it early, before attaching anything).
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        check_path_len(path)?;
        let io_err = |what: &'static str, source: io::Error| ControlError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| io_err("creating the directory of", e))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .map_err(|e| io_err("setting the mode of the directory of", e))?;
        }
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ControlError::NotSocket(path.to_path_buf()));
            }
            Ok(_) => match probe_live(path) {
                Ok(true) => return Err(ControlError::InUse(path.to_path_buf())),
                Ok(false) => {
                    debug!("removing stale control socket {}", path.display());
                    match fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("removing the stale control socket", e)),
                    }
                }
                Err(e) => return Err(io_err("probing the control socket", e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspecting the control socket", e)),
        }
        let listener = StdUnixListener::bind(path).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                ControlError::InUse(path.to_path_buf())
            } else {
                io_err("binding the control socket", e)
            }
        })?;
        // From here on `socket` owns the file and removes it on error.
        let mut socket = Self {
            listener,
            path: path.to_path_buf(),
            ident: (0, 0),
        };
        let meta = fs::symlink_metadata(path).map_err(|e| io_err("inspecting", e))?;
        socket.ident = (meta.dev(), meta.ino());
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("setting the mode of", e))?;
        socket
            .listener
            .set_nonblocking(true)
            .map_err(|e| io_err("configuring", e))?;
        Ok(socket)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A tokio listener on the socket, for [`serve`] (a second descriptor
    /// of the same socket; the guard keeps owning the file). Must be called
    /// inside a tokio runtime.
    pub fn tokio_listener(&self) -> io::Result<UnixListener> {
        UnixListener::from_std(self.listener.try_clone()?)
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.ident && m.file_type().is_socket());
        if ours {
            match fs::remove_file(&self.path) {
                Ok(()) => debug!("removed control socket {}", self.path.display()),
                Err(e) => warn!("removing control socket {}: {e}", self.path.display()),
            }
            // A per-namespace default directory goes when its last socket
            // does (remove_dir refuses a directory that is not empty).
            if let Some(dir) = self.path.parent().filter(|d| {
                d.parent() == Some(Path::new(CONTROL_DIR))
                    && d.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("netns-"))
            }) {
                let _ = fs::remove_dir(dir);
            }
        }
    }
}

/// Bounds of [`serve_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has to deliver its request line.
    pub request_timeout: Duration,
    /// Time a client has to take the reply.
    pub reply_timeout: Duration,
    /// Longest request line, in bytes.
    pub max_request: usize,
    /// Connections served at the same time.
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: REQUEST_TIMEOUT,
            reply_timeout: REPLY_TIMEOUT,
            max_request: MAX_REQUEST,
            max_clients: MAX_CLIENTS,
        }
    }
}

/// The answer to one request line, as a JSON document.
pub fn respond<S: ControlSource + ?Sized>(source: &S, line: &str) -> Value {
    match ControlCommand::parse(line) {
        Some(ControlCommand::Stats) => source.stats(),
        Some(ControlCommand::Flows) => source.flows(),
        Some(ControlCommand::Rules(r)) => source.rules(&r),
        None => {
            let shown: String = line.trim().chars().take(64).collect();
            json!({ "error": format!("unknown command {shown:?} (expected \"stats\", \"flows\" or \"rules list|add|del ...\")") })
        }
    }
}

/// A parsed request travelling from a client task to the accept loop.
struct Request {
    line: String,
    reply: oneshot::Sender<Vec<u8>>,
}

/// Serves the control protocol on `listener` with the default [`Limits`],
/// answering from `source`. Never completes; drop it to stop serving (the
/// client tasks are aborted with it). Must run inside a tokio runtime.
pub async fn serve<S: ControlSource + ?Sized>(listener: UnixListener, source: &S) {
    serve_with(listener, source, Limits::default()).await;
}

/// [`serve`] with explicit bounds.
pub async fn serve_with<S: ControlSource + ?Sized>(
    listener: UnixListener,
    source: &S,
    limits: Limits,
) {
    let max_clients = limits.max_clients.max(1);
    let (tx, mut rx) = mpsc::channel::<Request>(max_clients);
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(req) = rx.recv() => {
                let doc = respond(source, &req.line);
                // The client may be gone already; nothing to do then.
                let _ = req.reply.send(encode(&doc));
            }
            Some(done) = clients.join_next(), if !clients.is_empty() => {
                if let Err(e) = done {
                    warn!("control client task failed: {e}");
                }
            }
            accepted = listener.accept(), if clients.len() < max_clients => match accepted {
                Ok((stream, _)) => {
                    clients.spawn(client(stream, tx.clone(), limits));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Encodes a reply: compact JSON and a newline.
fn encode(doc: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(doc)
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode the reply: {e}\"}}").into_bytes());
    bytes.push(b'\n');
    bytes
}

/// One connection: read the request line, hand it to the accept loop, write
/// the reply. Every step is bounded; on any failure the connection is
/// simply closed.
async fn client(mut stream: UnixStream, tx: mpsc::Sender<Request>, limits: Limits) {
    let line = match timeout(
        limits.request_timeout,
        read_request(&mut stream, limits.max_request),
    )
    .await
    {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => {
            debug!("control client dropped: {e}");
            return;
        }
        Err(_) => {
            debug!(
                "control client dropped: no request within {:?}",
                limits.request_timeout
            );
            return;
        }
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let request = Request {
        line,
        reply: reply_tx,
    };
    if tx.send(request).await.is_err() {
        return;
    }
    let Ok(reply) = reply_rx.await else {
        return;
    };
    let write = async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    };
    match timeout(limits.reply_timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("control client: writing the reply: {e}"),
        Err(_) => debug!(
            "control client dropped: reply not taken within {:?}",
            limits.reply_timeout
        ),
    }
}

/// Reads one request line of at most `max` bytes. End of stream also ends
/// the line (a client may send `stats` and shut down its side).
async fn read_request(stream: &mut UnixStream, max: usize) -> io::Result<String> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed without a request",
                ));
            }
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > max {
            break;
        }
    }
    if buf.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request longer than {max} bytes"),
        ));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Connects to `path` without ever blocking past `deadline` (a full listen
/// backlog is retried until then).
fn connect_bounded(
    path: &Path,
    deadline: Instant,
    limit: Duration,
) -> Result<StdUnixStream, ControlError> {
    let io_err = |what: &'static str, source: io::Error| ControlError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let addr = UnixAddr::new(path).map_err(|e| io_err("addressing", e.into()))?;
    loop {
        let fd: OwnedFd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io_err("creating a socket for", e.into()))?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = StdUnixStream::from(fd);
                stream
                    .set_nonblocking(false)
                    .map_err(|e| io_err("configuring", e))?;
                return Ok(stream);
            }
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Errno::EAGAIN) => {
                return Err(ControlError::Timeout {
                    path: path.to_path_buf(),
                    timeout: limit,
                });
            }
            Err(e @ (Errno::ENOENT | Errno::ECONNREFUSED | Errno::ENOTSOCK)) => {
                return Err(ControlError::NoDaemon {
                    path: path.to_path_buf(),
                    source: e.into(),
                });
            }
            Err(e) => return Err(io_err("connecting to", e.into())),
        }
    }
}

/// Sends `command` to the daemon listening on `path` and returns its JSON
/// document; the whole exchange is bounded by `limit`. A reply of the form
/// `{"error": "..."}` becomes [`ControlError::Daemon`].
pub fn query(
    path: &Path,
    command: &ControlCommand,
    limit: Duration,
) -> Result<Value, ControlError> {
    check_path_len(path)?;
    let started = Instant::now();
    let deadline = started + limit;
    let timed_out = || ControlError::Timeout {
        path: path.to_path_buf(),
        timeout: limit,
    };
    let io_err = |what: &'static str, source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            timed_out()
        } else {
            ControlError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut stream = connect_bounded(path, deadline, limit)?;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    stream
        .set_write_timeout(Some(remaining().ok_or_else(timed_out)?))
        .map_err(|e| io_err("configuring", e))?;
    stream
        .write_all(format!("{}\n", command.to_line()).as_bytes())
        .map_err(|e| io_err("sending the request to", e))?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(remaining().ok_or_else(timed_out)?))
            .map_err(|e| io_err("configuring", e))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading the reply from", e)),
        };
        if n == 0 {
            break;
        }
        if reply.len() + n > MAX_REPLY {
            return Err(ControlError::BadReply {
                path: path.to_path_buf(),
                reason: format!("longer than {MAX_REPLY} bytes"),
            });
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    if reply.iter().all(u8::is_ascii_whitespace) {
        return Err(ControlError::BadReply {
            path: path.to_path_buf(),
            reason: "the connection closed without a reply".to_owned(),
        });
    }
    let doc: Value = serde_json::from_slice(&reply).map_err(|e| ControlError::BadReply {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if let Some(message) = error_message(&doc) {
        return Err(ControlError::Daemon {
            path: path.to_path_buf(),
            message: message.to_owned(),
        });
    }
    Ok(doc)
}

/// The message of an `{"error": "..."}` document (an object whose only key
/// is `error`).
fn error_message(doc: &Value) -> Option<&str> {
    let obj = doc.as_object()?;
    if obj.len() == 1 {
        obj.get("error")?.as_str()
    } else {
        None
    }
}

/// Formats a byte count with a binary unit (`512 B`, `1.5 KiB`, ...).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A JSON scalar as text (strings without quotes).
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Appends `key: value` lines for `v`, flattening objects as `a.b`.
fn push_flat(out: &mut String, key: &str, v: &Value) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                push_flat(out, &format!("{key}.{k}"), v);
            }
        }
        other => {
            let _ = writeln!(out, "{key}: {}", scalar(other));
        }
    }
}

/// Renders a `rules` document for people: one line per rule (`rules`,
/// `added`, `removed`), then `flows_reset` if present.
pub fn render_rules(doc: &Value) -> String {
    let mut out = String::new();
    for key in ["rules", "added", "removed"] {
        let Some(rules) = doc.get(key).and_then(Value::as_array) else {
            continue;
        };
        if key != "rules" {
            let _ = writeln!(out, "{key}:");
        } else if rules.is_empty() {
            out.push_str("no forwarding rules\n");
        }
        for r in rules {
            let field = |k: &str| r.get(k).map(scalar).unwrap_or_default();
            let addr = r
                .get("addr")
                .and_then(Value::as_str)
                .map(|a| format!("{a}/"))
                .unwrap_or_default();
            let _ = write!(
                out,
                "{:<4} {addr}{} -> {}  ({})",
                field("proto"),
                field("host"),
                field("guest"),
                field("spec"),
            );
            if let Some(h) = r.get("hits") {
                let _ = write!(out, "  hits {}", scalar(h));
            }
            out.push('\n');
        }
    }
    if let Some(n) = doc.get("flows_reset") {
        let _ = writeln!(out, "flows reset: {}", scalar(n));
    }
    out
}

/// Renders a `stats` document for people.
pub fn render_stats(doc: &Value) -> String {
    let Some(obj) = doc.as_object() else {
        return format!("{doc:#}\n");
    };
    let mut out = String::new();
    let num = |k: &str| obj.get(k).and_then(Value::as_u64);
    let fast = num("fastpath_packets");
    let slow = num("slowpath_packets");
    if let Some(p) = fast {
        let bytes = num("fastpath_bytes")
            .map(|b| format!(", {b} bytes ({})", human_bytes(b)))
            .unwrap_or_default();
        let _ = writeln!(out, "fast path:       {p} packets{bytes}");
    }
    if let Some(p) = slow {
        let bytes = num("slowpath_bytes")
            .map(|b| format!(", {b} bytes ({})", human_bytes(b)))
            .unwrap_or_default();
        let _ = writeln!(out, "slow path:       {p} packets{bytes}");
    }
    if let (Some(f), Some(s)) = (fast, slow) {
        let total = f.saturating_add(s);
        if total > 0 {
            let _ = writeln!(
                out,
                "fast-path share: {:.2}% of {total} packets",
                f as f64 * 100.0 / total as f64
            );
        }
    }
    if let Some(n) = obj.get("flows_active") {
        let _ = writeln!(out, "active flows:    {}", scalar(n));
    }
    if let Some(punts) = obj.get("punts") {
        match punts.as_object() {
            Some(map) if !map.is_empty() => {
                let _ = writeln!(out, "punts:");
                let width = map.keys().map(String::len).max().unwrap_or(0);
                for (reason, count) in map {
                    let _ = writeln!(out, "  {reason:<width$}  {}", scalar(count));
                }
            }
            Some(_) => {
                let _ = writeln!(out, "punts:           none");
            }
            None => push_flat(&mut out, "punts", punts),
        }
    }
    const KNOWN: [&str; 6] = [
        "fastpath_packets",
        "fastpath_bytes",
        "slowpath_packets",
        "slowpath_bytes",
        "flows_active",
        "punts",
    ];
    for (k, v) in obj.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())) {
        push_flat(&mut out, k, v);
    }
    out
}

/// Renders a `flows` document for people: one line per flow.
pub fn render_flows(doc: &Value) -> String {
    let Some(flows) = doc.as_array() else {
        return format!("{doc:#}\n");
    };
    if flows.is_empty() {
        return "no flows\n".to_owned();
    }
    const COLUMNS: [(&str, &str); 6] = [
        ("PROTO", "proto"),
        ("GUEST", "guest"),
        ("REMOTE", "remote"),
        ("NAT", "nat"),
        ("STATE", "state"),
        ("FASTPATH PKTS", "fastpath_packets"),
    ];
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            COLUMNS
                .iter()
                .map(|(_, key)| f.get(*key).map_or_else(|| "-".to_owned(), scalar))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (title, _))| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([title.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == COLUMNS.len() {
                let _ = write!(text, "{cell:>width$}", width = widths[i]);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut COLUMNS.iter().map(|(title, _)| *title));
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    let _ = writeln!(out, "{} flows", flows.len());
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{
        cell::Cell,
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::*;

    /// A private temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "tapgate-control-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir(&path).unwrap();
            Self(path)
        }

        fn sock(&self) -> PathBuf {
            self.0.join("ctl.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A source with interior mutability, as the daemon's will be.
    #[derive(Default)]
    struct Fake {
        calls: Cell<u64>,
    }

    impl ControlSource for Fake {
        fn stats(&self) -> Value {
            self.calls.set(self.calls.get() + 1);
            json!({
                "fastpath_packets": 990,
                "fastpath_bytes": 1_500_000,
                "slowpath_packets": 10,
                "punts": { "new_flow": 4, "arp": 6 },
                "flows_active": 2,
                "calls": self.calls.get(),
            })
        }

        fn rules(&self, request: &RulesRequest) -> Value {
            match request {
                RulesRequest::List => json!({ "rules": [{
                    "proto": "tcp", "spec": "8080:80", "addr": null,
                    "host": "8080", "guest": "80", "hits": 3,
                }] }),
                RulesRequest::Add { spec, .. } => json!({ "error": format!("{spec:?}: no") }),
                RulesRequest::Del { .. } => json!({ "removed": [], "flows_reset": 0 }),
            }
        }

        fn flows(&self) -> Value {
            json!([{
                "proto": "tcp",
                "guest": "10.0.2.15:40000",
                "remote": "198.51.100.2:80",
                "nat": "198.51.100.1:61000",
                "state": "Established",
                "fastpath_packets": 12,
            }])
        }
    }

    /// Runs the blocking client `f` on a blocking thread while `serve`
    /// runs on the test's runtime.
    async fn with_server<T: Send + 'static>(
        socket: &ControlSocket,
        limits: Limits,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let source = Fake::default();
        let server = serve_with(socket.tokio_listener().unwrap(), &source, limits);
        tokio::select! {
            r = tokio::task::spawn_blocking(f) => r.unwrap(),
            () = server => unreachable!("serve returned"),
        }
    }

    fn quick() -> Limits {
        Limits {
            request_timeout: Duration::from_millis(300),
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn stats_and_flows_round_trip() {
        let dir = TempDir::new();
        let socket = bind_control_socket(&dir.sock()).unwrap();
        let mode = fs::metadata(socket.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let path = dir.sock();
        let (stats, stats2, flows) = with_server(&socket, Limits::default(), move || {
            (
                query(&path, &ControlCommand::Stats, CLIENT_TIMEOUT).unwrap(),
                query(&path, &ControlCommand::Stats, CLIENT_TIMEOUT).unwrap(),
                query(&path, &ControlCommand::Flows, CLIENT_TIMEOUT).unwrap(),
            )
        })
        .await;
        assert_eq!(stats["fastpath_packets"], 990);
        assert_eq!(stats["punts"]["new_flow"], 4);
        // The same (RefCell-style) source answered both requests.
        assert_eq!(stats["calls"], 1);
        assert_eq!(stats2["calls"], 2);
        assert_eq!(flows[0]["nat"], "198.51.100.1:61000");
    }

    #[tokio::test]
    async fn unknown_command_gets_an_error_document() {
        let dir = TempDir::new();
        let socket = bind_control_socket(&dir.sock()).unwrap();
        let path = dir.sock();
        let reply = with_server(&socket, Limits::default(), move || {
            let mut s = StdUnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"reboot\n").unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        })
        .await;
        let doc: Value = serde_json::from_str(&reply).unwrap();
        let msg = error_message(&doc).unwrap();
        assert!(msg.contains("unknown command \"reboot\""), "{msg}");
    }

    #[tokio::test]
    async fn request_without_newline_before_eof_is_served() {
        let dir = TempDir::new();
        let socket = bind_control_socket(&dir.sock()).unwrap();
        let path = dir.sock();
        let reply = with_server(&socket, Limits::default(), move || {
            let mut s = StdUnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"flows").unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        })
        .await;
        let doc: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(doc[0]["proto"], "tcp");
    }

    #[tokio::test]
    async fn many_clients_concurrently() {
        let dir = TempDir::new();
        let socket = bind_control_socket(&dir.sock()).unwrap();
        let path = dir.sock();
        let ok = with_server(&socket, Limits::default(), move || {
            let handles: Vec<_> = (0..100)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || query(&path, &ControlCommand::Stats, CLIENT_TIMEOUT))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(Result::is_ok)
                .count()
        })
        .await;
        assert_eq!(ok, 100);
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = TempDir::new();
        // A socket file nobody listens on any more.
        drop(StdUnixListener::bind(dir.sock()).unwrap());
        assert!(dir.sock().exists());
        let socket = bind_control_socket(&dir.sock()).unwrap();
        let path = dir.sock();
        let stats = with_server(&socket, Limits::default(), move || {
            query(&path, &ControlCommand::Stats, CLIENT_TIMEOUT)
        })
        .await
        .unwrap();
        assert_eq!(stats["flows_active"], 2);
    }

    #[test]
    fn live_socket_is_refused_and_file_removed_on_drop() {
        let dir = TempDir::new();
        let first = bind_control_socket(&dir.sock()).unwrap();
        let err = bind_control_socket(&dir.sock()).unwrap_err();
        assert!(matches!(err, ControlError::InUse(_)), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "control socket {} is in use (another tapgate answers on it)",
                dir.sock().display()
            )
        );
        // The refused attempt did not remove the live daemon's socket.
        assert!(dir.sock().exists());
        drop(first);
        assert!(!dir.sock().exists(), "socket file left behind");
        // And it can be bound again.
        drop(bind_control_socket(&dir.sock()).unwrap());
    }

    #[test]
    fn other_files_are_left_alone() {
        let dir = TempDir::new();
        fs::write(dir.sock(), b"precious").unwrap();
        let err = bind_control_socket(&dir.sock()).unwrap_err();
        assert!(matches!(err, ControlError::NotSocket(_)), "{err}");
        assert_eq!(fs::read(dir.sock()).unwrap(), b"precious");
    }

    #[test]
    fn drop_spares_a_replaced_socket() {
        let dir = TempDir::new();
        let ours = bind_control_socket(&dir.sock()).unwrap();
        fs::remove_file(dir.sock()).unwrap();
        let _theirs = StdUnixListener::bind(dir.sock()).unwrap();
        drop(ours);
        assert!(dir.sock().exists(), "removed another process's socket");
    }

    #[test]
    fn missing_directory_is_created() {
        let dir = TempDir::new();
        let path = dir.0.join("run/tapgate/tap0.sock");
        let socket = bind_control_socket(&path).unwrap();
        let mode = fs::metadata(dir.0.join("run/tapgate"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        drop(socket);
        assert!(!path.exists());
    }

    #[test]
    fn client_errors() {
        let dir = TempDir::new();
        let err = query(&dir.sock(), &ControlCommand::Stats, CLIENT_TIMEOUT).unwrap_err();
        assert!(matches!(err, ControlError::NoDaemon { .. }), "{err}");
        assert!(err.to_string().starts_with("no tapgate daemon answers on"));
        drop(StdUnixListener::bind(dir.sock()).unwrap());
        let err = query(&dir.sock(), &ControlCommand::Stats, CLIENT_TIMEOUT).unwrap_err();
        assert!(matches!(err, ControlError::NoDaemon { .. }), "{err}");
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let err = query(&long, &ControlCommand::Stats, CLIENT_TIMEOUT).unwrap_err();
        assert!(matches!(err, ControlError::PathTooLong(_)), "{err}");
    }

    #[test]
    fn client_times_out_on_a_silent_daemon() {
        let dir = TempDir::new();
        // Accepts (via the backlog) but never answers.
        let _listener = StdUnixListener::bind(dir.sock()).unwrap();
        let started = Instant::now();
        let err = query(
            &dir.sock(),
            &ControlCommand::Stats,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, ControlError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    /// Reads until the server closes; true if it closed without a byte.
    async fn closed_silently(stream: &mut UnixStream) -> bool {
        let mut buf = Vec::new();
        match timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await {
            Ok(Ok(_)) => buf.is_empty(),
            // A reset (unread data at close) is a drop too.
            Ok(Err(e)) => e.kind() == io::ErrorKind::ConnectionReset,
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn idle_client_is_dropped_without_blocking_others() {
        let dir = TempDir::new();
        let socket = bind_control_socket(&dir.sock()).unwrap();
        let source = Fake::default();
        let server = serve_with(socket.tokio_listener().unwrap(), &source, quick());
        let path = dir.sock();
        let test = async {
            let mut idle = UnixStream::connect(&path).await.unwrap();
            // Another client is served while the idle one is connected.
            let p = path.clone();
            let stats = tokio::task::spawn_blocking(move || {
                query(&p, &ControlCommand::Stats, CLIENT_TIMEOUT)
            })
            .await
            .unwrap()
            .unwrap();
            assert_eq!(stats["slowpath_packets"], 10);
            let started = Instant::now();
            assert!(closed_silently(&mut idle).await, "idle client not dropped");
            assert!(started.elapsed() < Duration::from_secs(2));
        };
        tokio::select! {
            () = test => {}
            () = server => unreachable!(),
        }
    }

    #[tokio::test]
    async fn oversize_request_is_dropped() {
        let dir = TempDir::new();
        let socket = bind_control_socket(&dir.sock()).unwrap();
        let source = Fake::default();
        let server = serve_with(socket.tokio_listener().unwrap(), &source, quick());
        let path = dir.sock();
        let test = async {
            // More than 1 KiB without a newline.
            let mut big = UnixStream::connect(&path).await.unwrap();
            big.write_all(&[b'x'; MAX_REQUEST + 100]).await.unwrap();
            assert!(closed_silently(&mut big).await, "oversize client served");
            // A long line with a newline past the limit is refused as well.
            let mut long = UnixStream::connect(&path).await.unwrap();
            let mut line = vec![b' '; MAX_REQUEST + 1];
            line.extend_from_slice(b"stats\n");
            long.write_all(&line).await.unwrap();
            assert!(closed_silently(&mut long).await, "long line served");
        };
        tokio::select! {
            () = test => {}
            () = server => unreachable!(),
        }
    }

    #[test]
    fn commands_parse() {
        assert_eq!(ControlCommand::parse("stats"), Some(ControlCommand::Stats));
        assert_eq!(
            ControlCommand::parse(" flows\r"),
            Some(ControlCommand::Flows)
        );
        assert_eq!(ControlCommand::parse("STATS"), None);
        for cmd in [
            ControlCommand::Rules(RulesRequest::List),
            ControlCommand::Rules(RulesRequest::Add {
                proto: Proto::Tcp,
                spec: "1-1024,~22".into(),
            }),
            ControlCommand::Rules(RulesRequest::Del {
                proto: Proto::Udp,
                spec: "5353".into(),
                reset_flows: false,
            }),
            ControlCommand::Rules(RulesRequest::Del {
                proto: Proto::Tcp,
                spec: "8080:80".into(),
                reset_flows: true,
            }),
        ] {
            assert_eq!(ControlCommand::parse(&cmd.to_line()), Some(cmd.clone()));
        }
        assert_eq!(
            cmd_line("rules del tcp 8080:80 reset-flows"),
            "rules del tcp 8080:80 reset-flows"
        );
        for bad in [
            "rules",
            "rules add",
            "rules add tcp",
            "rules add sctp 80",
            "rules add tcp 80 81",
            "rules del tcp 80 now",
            "rules list all",
        ] {
            assert_eq!(ControlCommand::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            default_socket_path_in("tap0", Some(7), Some(7)),
            Path::new("/run/tapgate/tap0.sock")
        );
        assert_eq!(
            default_socket_path_in("tap0", Some(9), Some(7)),
            Path::new("/run/tapgate/netns-9/tap0.sock")
        );
        assert_eq!(
            default_socket_path_in("tap0", Some(9), None),
            Path::new("/run/tapgate/netns-9/tap0.sock")
        );
        assert_eq!(
            default_socket_path_in("tap0", None, None),
            Path::new("/run/tapgate/tap0.sock")
        );
    }

    fn cmd_line(line: &str) -> String {
        ControlCommand::parse(line).unwrap().to_line()
    }

    #[tokio::test]
    async fn rules_round_trip() {
        let dir = TempDir::new();
        let socket = bind_control_socket(&dir.sock()).unwrap();
        let path = dir.sock();
        let (list, add) = with_server(&socket, Limits::default(), move || {
            (
                query(
                    &path,
                    &ControlCommand::Rules(RulesRequest::List),
                    CLIENT_TIMEOUT,
                )
                .unwrap(),
                query(
                    &path,
                    &ControlCommand::Rules(RulesRequest::Add {
                        proto: Proto::Tcp,
                        spec: "0".into(),
                    }),
                    CLIENT_TIMEOUT,
                ),
            )
        })
        .await;
        assert_eq!(list["rules"][0]["hits"], 3);
        assert!(
            matches!(add, Err(ControlError::Daemon { message, .. }) if message.contains("\"0\""))
        );
        let text = render_rules(&list);
        assert!(text.contains("tcp"), "{text}");
        assert!(text.contains("8080 -> 80"), "{text}");
    }

    #[test]
    fn renders_stats_for_people() {
        let text = render_stats(&Fake::default().stats());
        assert!(
            text.contains("fast path:       990 packets, 1500000 bytes (1.4 MiB)"),
            "{text}"
        );
        assert!(text.contains("slow path:       10 packets"), "{text}");
        assert!(
            text.contains("fast-path share: 99.00% of 1000 packets"),
            "{text}"
        );
        assert!(text.contains("active flows:    2"), "{text}");
        assert!(text.contains("  new_flow  4"), "{text}");
        assert!(text.contains("calls: 1"), "{text}");
    }

    #[test]
    fn renders_flows_for_people() {
        let text = render_flows(&Fake::default().flows());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("PROTO  GUEST"), "{text}");
        assert!(lines[0].ends_with("FASTPATH PKTS"), "{text}");
        for needle in [
            "tcp",
            "10.0.2.15:40000",
            "198.51.100.2:80",
            "198.51.100.1:61000",
            "Established",
            "12",
        ] {
            assert!(lines[1].contains(needle), "{needle} missing: {text}");
        }
        assert_eq!(render_flows(&json!([])), "no flows\n");
    }

    #[test]
    fn human_byte_counts() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
