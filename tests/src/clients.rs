//! Many TCP connections at once from inside a namespace.
//!
//! # Theory of operation
//!
//! Spawning a `curl` per connection would measure process start-up, not
//! tapgate. [`connect_many`] instead runs a current-thread tokio runtime on
//! a thread inside the namespace ([`crate::nsthread::block_on_in`]) and
//! drives every connection as a task. Each connection talks to a
//! [`crate::servers::TcpEchoServer`]: it sends a line naming itself, shuts
//! down its sending side and reads until the end of stream, expecting its
//! own line back.
//!
//! Two shapes ([`Shape`]): [`Shape::HoldAll`] first opens every connection
//! and keeps them all open, then runs the exchanges (N connections
//! established at the same time); [`Shape::Burst`] starts all N
//! connect-exchange-close sequences at the same instant (N SYNs in a
//! burst). Each connection is bounded ([`CONN_TIMEOUT`]), the whole run by
//! the caller's timeout, and the result is a [`ManyReport`] counting
//! successes and failures by kind rather than the first error.
//!
//! Each connection is a file descriptor on both ends (client and echo
//! server live in this process): [`raise_fd_limit`] lifts the soft
//! `RLIMIT_NOFILE` to the hard limit first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::netns::Netns;
use crate::nsthread;

/// Bound on one connection (connect + exchange).
pub const CONN_TIMEOUT: Duration = Duration::from_secs(30);

/// How [`connect_many`] opens its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Open all, keep all open, then exchange on each.
    HoldAll,
    /// Start every connect-exchange-close at once.
    Burst,
}

/// The outcome of [`connect_many`].
#[derive(Debug, Clone, Default)]
pub struct ManyReport {
    /// Connections attempted.
    pub attempted: usize,
    /// Connections that were established.
    pub connected: usize,
    /// Connections whose echo came back complete.
    pub completed: usize,
    /// Failures by kind (e.g. `connect: Connection refused`), with counts.
    pub errors: BTreeMap<String, usize>,
    /// Wall-clock time of the whole run.
    pub elapsed: Duration,
}

impl ManyReport {
    /// Whether every connection completed.
    pub fn all_completed(&self) -> bool {
        self.completed == self.attempted
    }

    /// A one-line description.
    pub fn summary(&self) -> String {
        let errors = self
            .errors
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join("; ");
        format!(
            "{} attempted, {} connected, {} completed in {:?}{}",
            self.attempted,
            self.connected,
            self.completed,
            self.elapsed,
            if errors.is_empty() {
                String::new()
            } else {
                format!("; errors: {errors}")
            }
        )
    }

    fn fail(&mut self, e: impl std::fmt::Display) {
        *self.errors.entry(e.to_string()).or_default() += 1;
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft
/// limit.
pub fn raise_fd_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, exclusively borrowed struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the valid struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    Ok(lim.rlim_cur)
}

/// The line connection `i` sends (and expects back).
fn payload(i: usize) -> Vec<u8> {
    format!("connection {i:06}\n").into_bytes()
}

async fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    match tokio::time::timeout(CONN_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err(format!("connect: no answer within {CONN_TIMEOUT:?}")),
    }
}

async fn exchange(mut stream: TcpStream, i: usize) -> Result<(), String> {
    let want = payload(i);
    let io = async {
        stream.write_all(&want).await?;
        stream.shutdown().await?;
        let mut got = Vec::with_capacity(want.len());
        stream.read_to_end(&mut got).await?;
        Ok::<_, std::io::Error>(got)
    };
    match tokio::time::timeout(CONN_TIMEOUT, io).await {
        Ok(Ok(got)) if got == want => Ok(()),
        Ok(Ok(got)) => Err(format!(
            "exchange: wrong echo ({} bytes instead of {})",
            got.len(),
            want.len()
        )),
        Ok(Err(e)) => Err(format!("exchange: {e}")),
        Err(_) => Err(format!("exchange: no echo within {CONN_TIMEOUT:?}")),
    }
}

async fn run_many(target: SocketAddr, n: usize, shape: Shape) -> Result<ManyReport> {
    let started = Instant::now();
    let mut report = ManyReport {
        attempted: n,
        ..ManyReport::default()
    };
    match shape {
        Shape::HoldAll => {
            let mut connects = JoinSet::new();
            for i in 0..n {
                connects.spawn(async move { (i, connect(target).await) });
            }
            let mut open = Vec::with_capacity(n);
            while let Some(joined) = connects.join_next().await {
                match joined {
                    Ok((i, Ok(stream))) => open.push((i, stream)),
                    Ok((_, Err(e))) => report.fail(e),
                    Err(e) => report.fail(format!("task: {e}")),
                }
            }
            report.connected = open.len();
            let mut exchanges = JoinSet::new();
            for (i, stream) in open {
                exchanges.spawn(exchange(stream, i));
            }
            while let Some(joined) = exchanges.join_next().await {
                match joined {
                    Ok(Ok(())) => report.completed += 1,
                    Ok(Err(e)) => report.fail(e),
                    Err(e) => report.fail(format!("task: {e}")),
                }
            }
        }
        Shape::Burst => {
            let mut tasks = JoinSet::new();
            for i in 0..n {
                tasks.spawn(async move {
                    let stream = connect(target).await.map_err(|e| (false, e))?;
                    exchange(stream, i).await.map_err(|e| (true, e))
                });
            }
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(Ok(())) => {
                        report.connected += 1;
                        report.completed += 1;
                    }
                    Ok(Err((connected, e))) => {
                        report.connected += usize::from(connected);
                        report.fail(e);
                    }
                    Err(e) => report.fail(format!("task: {e}")),
                }
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Opens `n` TCP connections from `ns` to the echo server at `target`,
/// shaped as `shape`, within `timeout`; see the module documentation.
pub fn connect_many(
    ns: &Netns,
    target: SocketAddr,
    n: usize,
    shape: Shape,
    timeout: Duration,
) -> Result<ManyReport> {
    if n == 0 {
        bail!("no connections to open");
    }
    raise_fd_limit()?;
    nsthread::block_on_in(ns, "connect-many", timeout, move || {
        run_many(target, n, shape)
    })
}
