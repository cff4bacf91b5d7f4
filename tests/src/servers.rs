//! Servers for the end-to-end tests, running inside a namespace (usually
//! the world's).
//!
//! # Theory of operation
//!
//! * [`HttpServer`] is busybox `httpd -f` serving files from a private
//!   [`ScratchDir`], run as a [`Child`] (stopped on drop).
//! * [`TcpEchoServer`] is a tokio server on a thread inside the namespace
//!   ([`crate::nsthread`]): every connection gets back what it sent, and is
//!   closed after the client's end of stream — so a client that shuts down
//!   its side first (half-close) still receives the whole echo. Its listen
//!   backlog is 4096, enough for bursts of thousands of connections. It
//!   records how many connections it accepted and from where (the NAT
//!   addresses tapgate chose).
//! * [`UdpEchoServer`] answers each datagram with the same bytes (empty
//!   ones included). A datagram `push N` is echoed and then followed by `N`
//!   datagrams `push-1` ... `push-N` sent on the server's own initiative,
//!   which checks the world→guest direction of a UDP flow.
//! * [`DnsServer`] answers every `A` query with one fixed address (and
//!   counts the queries), standing in for an upstream resolver.
//!
//! * [`serve_once`] accepts a single connection and hands it to the
//!   test's own blocking code, for exchanges with a precise order of
//!   reads, writes and shutdowns (half-close).
//!
//! Every server is ready (bound and listening) when its constructor
//! returns, and stops when dropped: the Rust servers poll a stop flag or a
//! shutdown channel at least every 100 ms, and their threads are joined
//! with a bound.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;

use crate::child::Child;
use crate::netns::Netns;
use crate::nsthread::{self, NsThread};
use crate::scratch::ScratchDir;

/// How long a server's constructor waits for it to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long dropping a server waits for its thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll period of the UDP servers' stop flag.
const UDP_POLL: Duration = Duration::from_millis(100);
/// Bound on one echo connection.
const ECHO_CONN_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits (at most `timeout`) until something listens on TCP `port` in `ns`
/// (checked with `ss`).
pub fn wait_tcp_listening(ns: &Netns, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let filter = format!("sport = :{port}");
    loop {
        let out = ns.output_timeout(&["ss", "-Hltn", &filter], Duration::from_secs(5))?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "nothing listens on TCP port {port} in {} after {timeout:?}",
                ns.name()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Listens on `addr` in `ns`, accepts one connection (waiting at most
/// `accept_timeout`) and runs `handle` on it, on a thread inside `ns`.
/// Returns once the socket listens; collect `handle`'s result with
/// [`NsThread::join`]. `handle` must bound its own blocking (socket
/// timeouts).
pub fn serve_once<T, F>(
    ns: &Netns,
    addr: SocketAddr,
    accept_timeout: Duration,
    handle: F,
) -> Result<NsThread<T>>
where
    T: Send + 'static,
    F: FnOnce(TcpStream, SocketAddr) -> Result<T> + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let thread = nsthread::spawn_in(ns, "serve-once", move || {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("cannot bind {addr}: {e}");
                let _ = ready_tx.send(Err(anyhow::anyhow!("{msg}")));
                bail!("{msg}");
            }
        };
        let _ = ready_tx.send(Ok(()));
        listener.set_nonblocking(true).context("O_NONBLOCK")?;
        let deadline = Instant::now() + accept_timeout;
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false).context("O_NONBLOCK")?;
                    return handle(stream, peer);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        bail!("no connection to {addr} within {accept_timeout:?}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accept"),
            }
        }
    })?;
    ready_rx
        .recv_timeout(READY_TIMEOUT)
        .context("one-shot server did not start")??;
    Ok(thread)
}

/// busybox `httpd` serving files from a private directory.
#[derive(Debug)]
pub struct HttpServer {
    child: Child,
    addr: SocketAddr,
    // Outlives the child (fields drop in order).
    _dir: ScratchDir,
}

impl HttpServer {
    /// Serves `files` (name, content) at `http://addr/name` from `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, files: &[(&str, &[u8])]) -> Result<HttpServer> {
        let dir = ScratchDir::new("www")?;
        for (name, content) in files {
            if name.contains('/') || name.starts_with('.') {
                bail!("file name {name:?} must be a plain name");
            }
            std::fs::write(dir.join(name), content)
                .with_context(|| format!("cannot write {name}"))?;
        }
        let root = dir.path().to_str().context("scratch path is not UTF-8")?;
        let mut cmd = ns.cmd("busybox");
        cmd.args(["httpd", "-f", "-p", &addr.to_string(), "-h", root]);
        let mut child = Child::spawn(cmd, "busybox httpd")?;
        if let Err(e) = wait_tcp_listening(ns, addr.port(), READY_TIMEOUT) {
            let _ = child.stop();
            return Err(e.context(format!("httpd stderr: {}", child.stderr())));
        }
        Ok(HttpServer {
            child,
            addr,
            _dir: dir,
        })
    }

    /// The URL of `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// The server process (for its stderr).
    pub fn child(&self) -> &Child {
        &self.child
    }
}

/// What a TCP echo server has seen.
#[derive(Debug, Default)]
struct EchoState {
    accepted: AtomicUsize,
    peers: Mutex<BTreeSet<SocketAddr>>,
}

/// A tokio TCP echo server on a thread inside a namespace.
#[derive(Debug)]
pub struct TcpEchoServer {
    addr: SocketAddr,
    state: Arc<EchoState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<NsThread<()>>,
}

impl TcpEchoServer {
    /// Listens on `addr` in `ns` (port 0: any free port, see
    /// [`TcpEchoServer::addr`]).
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<TcpEchoServer> {
        let state = Arc::new(EchoState::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<SocketAddr>>();
        let thread_state = Arc::clone(&state);
        let thread = nsthread::spawn_in(ns, "tcp-echo", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build a tokio runtime")?;
            rt.block_on(echo_main(addr, thread_state, stop_rx, ready_tx))
        })?;
        let bound = ready_rx
            .recv_timeout(READY_TIMEOUT)
            .context("TCP echo server did not start")??;
        Ok(TcpEchoServer {
            addr: bound,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Remote addresses of the connections accepted so far.
    pub fn peers(&self) -> BTreeSet<SocketAddr> {
        self.state
            .peers
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(Err(e)) = self.thread.take().map(|t| t.join(STOP_TIMEOUT)) {
            log::warn!("TCP echo server on {}: {e:#}", self.addr);
        }
    }
}

async fn echo_main(
    addr: SocketAddr,
    state: Arc<EchoState>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    ready: mpsc::Sender<Result<SocketAddr>>,
) -> Result<()> {
    let listen = || -> Result<tokio::net::TcpListener> {
        let socket = if addr.is_ipv6() {
            tokio::net::TcpSocket::new_v6()
        } else {
            tokio::net::TcpSocket::new_v4()
        }
        .context("socket")?;
        socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
        socket
            .bind(addr)
            .with_context(|| format!("cannot bind {addr}"))?;
        socket.listen(4096).context("listen")
    };
    let listener = match listen() {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = ready.send(Err(e));
            bail!("{msg}");
        }
    };
    let bound = listener.local_addr().context("local_addr")?;
    let _ = ready.send(Ok(bound));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                state.accepted.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut peers) = state.peers.lock() {
                    peers.insert(peer);
                }
                conns.spawn(async move {
                    let _ = tokio::time::timeout(ECHO_CONN_TIMEOUT, echo(stream)).await;
                });
            }
        }
    }
    Ok(())
}

async fn echo(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    tokio::io::copy(&mut rd, &mut wr).await?;
    wr.shutdown().await
}

/// A UDP server on a thread inside a namespace, stopped on drop.
#[derive(Debug)]
struct UdpThread {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl UdpThread {
    /// Binds `addr` in `ns` and runs `handle(socket, datagram, peer)` for
    /// every datagram until stopped.
    fn start<H>(ns: &Netns, addr: SocketAddr, what: &str, mut handle: H) -> Result<UdpThread>
    where
        H: FnMut(&UdpSocket, &[u8], SocketAddr) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<SocketAddr>>();
        let thread = nsthread::spawn_in(ns, what, move || {
            let bind = || -> Result<UdpSocket> {
                let socket =
                    UdpSocket::bind(addr).with_context(|| format!("cannot bind {addr}"))?;
                socket
                    .set_read_timeout(Some(UDP_POLL))
                    .context("SO_RCVTIMEO")?;
                Ok(socket)
            };
            let socket = match bind() {
                Ok(s) => s,
                Err(e) => {
                    let msg = format!("{e:#}");
                    let _ = ready_tx.send(Err(e));
                    bail!("{msg}");
                }
            };
            let _ = ready_tx.send(socket.local_addr().context("local_addr"));
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                match socket.recv_from(&mut buf) {
                    Ok((n, peer)) => handle(&socket, &buf[..n], peer),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => log::warn!("UDP server on {addr}: {e}"),
                }
            }
            Ok(())
        })?;
        let bound = ready_rx
            .recv_timeout(READY_TIMEOUT)
            .with_context(|| format!("{what} did not start"))??;
        Ok(UdpThread {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(Err(e)) = self.thread.take().map(|t| t.join(STOP_TIMEOUT)) {
            log::warn!("UDP server on {}: {e:#}", self.addr);
        }
    }
}

/// What a UDP server has seen.
#[derive(Debug, Default)]
struct UdpState {
    datagrams: AtomicUsize,
    peers: Mutex<BTreeSet<SocketAddr>>,
}

impl UdpState {
    fn record(&self, peer: SocketAddr) {
        self.datagrams.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut peers) = self.peers.lock() {
            peers.insert(peer);
        }
    }
}

/// A UDP echo server (see the module documentation for `push N`).
#[derive(Debug)]
pub struct UdpEchoServer {
    state: Arc<UdpState>,
    inner: UdpThread,
}

impl UdpEchoServer {
    /// Listens on `addr` in `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<UdpEchoServer> {
        let state = Arc::new(UdpState::default());
        let st = Arc::clone(&state);
        let inner = UdpThread::start(ns, addr, "udp-echo", move |socket, data, peer| {
            st.record(peer);
            let _ = socket.send_to(data, peer);
            if let Some(n) = std::str::from_utf8(data)
                .ok()
                .and_then(|s| s.strip_prefix("push "))
                .and_then(|n| n.trim().parse::<usize>().ok())
            {
                for i in 1..=n.min(1000) {
                    let _ = socket.send_to(format!("push-{i}").as_bytes(), peer);
                }
            }
        })?;
        Ok(UdpEchoServer { state, inner })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Datagrams received so far.
    pub fn datagrams(&self) -> usize {
        self.state.datagrams.load(Ordering::Relaxed)
    }

    /// Senders seen so far.
    pub fn peers(&self) -> BTreeSet<SocketAddr> {
        self.state
            .peers
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }
}

/// A DNS server answering every `A` query with one address.
#[derive(Debug)]
pub struct DnsServer {
    state: Arc<UdpState>,
    inner: UdpThread,
}

impl DnsServer {
    /// Listens on `addr` in `ns` and answers `A` queries with `answer`
    /// (other query types get an empty answer, malformed ones nothing).
    pub fn start(ns: &Netns, addr: SocketAddr, answer: Ipv4Addr) -> Result<DnsServer> {
        let state = Arc::new(UdpState::default());
        let st = Arc::clone(&state);
        let inner = UdpThread::start(ns, addr, "dns", move |socket, data, peer| {
            st.record(peer);
            if let Some(reply) = dns_reply(data, answer) {
                let _ = socket.send_to(&reply, peer);
            }
        })?;
        Ok(DnsServer { state, inner })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.state.datagrams.load(Ordering::Relaxed)
    }

    /// Where the queries came from.
    pub fn peers(&self) -> BTreeSet<SocketAddr> {
        self.state
            .peers
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }
}

/// Builds the reply to a DNS query: the question copied, and for `A`/`IN`
/// one answer with `answer` (TTL 60). `None` if `query` is not a query
/// with exactly one well-formed question.
pub fn dns_reply(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    const HEADER: usize = 12;
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    if qdcount != 1 {
        return None;
    }
    // The question name: labels up to the root label.
    let mut pos = HEADER;
    loop {
        let len = usize::from(*query.get(pos)?);
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let qclass = u16::from_be_bytes([*query.get(pos + 2)?, *query.get(pos + 3)?]);
    let question_end = pos + 4;
    let is_a = qtype == 1 && qclass == 1;
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[0..2]); // id
    // QR, opcode 0, AA, RD copied; RA; rcode 0.
    reply.push(0x84 | (query[2] & 0x01));
    reply.push(0x80);
    reply.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    reply.extend_from_slice(&query[HEADER..question_end]);
    if is_a {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&answer.octets());
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_reply_answers_a_queries() {
        // id 0x1234, RD, one question example.test A IN
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
        let r = dns_reply(&q, Ipv4Addr::new(192, 0, 2, 77)).expect("reply");
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "QR set");
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        assert_eq!(&r[r.len() - 4..], &[192, 0, 2, 77]);
        // A reply is not answered.
        let mut not_query = q.clone();
        not_query[2] |= 0x80;
        assert!(dns_reply(&not_query, Ipv4Addr::LOCALHOST).is_none());
        assert!(dns_reply(&q[..14], Ipv4Addr::LOCALHOST).is_none());
    }
}
