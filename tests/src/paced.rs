//! A paced, self-checking TCP stream: long enough to span a daemon restart,
//! verifiable byte by byte.
//!
//! # Theory of operation
//!
//! [`PacedSender`] listens in one namespace and, to its first client,
//! writes `total` bytes of a position-dependent pattern ([`pattern`]) in
//! chunks with a pause between them, so the transfer takes a known time.
//! [`receive`] connects from another namespace, reads to the end and checks
//! every byte against the pattern at its offset — a lost, duplicated,
//! reordered or corrupted byte shows as the first mismatch's offset — and
//! timestamps its progress, so a test can tell how many bytes arrived in
//! any window (e.g. while no daemon was running). Both ends are plain
//! blocking sockets on threads inside the namespaces, bounded by socket
//! timeouts.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    netns::Netns,
    nsthread::{NsThread, spawn_in},
};

/// The byte at offset `i` of every paced stream.
pub fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i >> 12) as u8
}

/// How long a socket may stall before the stream counts as broken.
const STALL: Duration = Duration::from_secs(30);

/// The sending side, running on a thread in its namespace.
pub struct PacedSender {
    thread: NsThread<u64>,
}

impl PacedSender {
    /// Listens on `addr` in `ns`; the first client gets `total` bytes,
    /// `chunk` at a time with `pause` after each chunk.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        total: u64,
        chunk: usize,
        pause: Duration,
    ) -> Result<PacedSender> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = spawn_in(ns, "paced-sender", move || {
            let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            let _ = ready_tx.send(());
            let (mut s, _) = listener.accept().context("accept")?;
            s.set_write_timeout(Some(STALL))?;
            let mut buf = vec![0u8; chunk];
            let mut off = 0u64;
            while off < total {
                let n = chunk.min((total - off) as usize);
                for (k, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(off + k as u64);
                }
                s.write_all(&buf[..n])
                    .with_context(|| format!("writing at offset {off}"))?;
                off += n as u64;
                std::thread::sleep(pause);
            }
            s.shutdown(Shutdown::Write)?;
            // Wait for the receiver to close, so nothing is cut short.
            let mut sink = [0u8; 64];
            let _ = s.read(&mut sink);
            Ok(off)
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the paced sender did not start listening")?;
        Ok(PacedSender { thread })
    }

    /// Waits for the sender to finish; returns the bytes it sent.
    pub fn join(self, timeout: Duration) -> Result<u64> {
        self.thread.join(timeout)
    }
}

/// What the receiving side saw.
#[derive(Debug)]
pub struct Received {
    /// Bytes received.
    pub bytes: u64,
    /// Offset of the first byte that did not match the pattern.
    pub first_bad: Option<u64>,
    /// (time, bytes received so far) after each read.
    pub progress: Vec<(Instant, u64)>,
}

impl Received {
    /// Bytes that arrived strictly between `from` and `to`.
    pub fn bytes_between(&self, from: Instant, to: Instant) -> u64 {
        let at = |t: Instant| {
            self.progress
                .iter()
                .take_while(|(when, _)| *when <= t)
                .last()
                .map_or(0, |(_, b)| *b)
        };
        at(to).saturating_sub(at(from))
    }
}

/// Connects from `ns` to `addr` and reads the stream to its end (on a
/// thread; join the result).
pub fn receive(ns: &Netns, addr: SocketAddr) -> Result<NsThread<Received>> {
    spawn_in(ns, "paced-receiver", move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(STALL))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut r = Received {
            bytes: 0,
            first_bad: None,
            progress: Vec::new(),
        };
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => bail!("reading after {} bytes: {e}", r.bytes),
            };
            if r.first_bad.is_none()
                && let Some(k) = (0..n).find(|k| buf[*k] != pattern(r.bytes + *k as u64))
            {
                r.first_bad = Some(r.bytes + k as u64);
            }
            r.bytes += n as u64;
            r.progress.push((Instant::now(), r.bytes));
        }
        Ok(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_not_periodic_in_small_steps() {
        let a: Vec<u8> = (0..4096).map(pattern).collect();
        let b: Vec<u8> = (4096..8192).map(pattern).collect();
        assert_ne!(a, b);
        assert!(a.iter().any(|x| *x != a[0]));
    }
}
