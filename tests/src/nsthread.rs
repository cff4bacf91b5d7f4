//! Running Rust code inside a network namespace, on a thread of its own.
//!
//! # Theory of operation
//!
//! `setns(2)` with `CLONE_NEWNET` changes the network namespace of the
//! calling *thread* only, and every socket remembers the namespace it was
//! created in. So socket work for the guest or the world is done on a fresh
//! thread that first enters the namespace ([`spawn_in`]); test threads never
//! change namespace. [`block_on_in`] does the same with a current-thread
//! tokio runtime built on that thread, for code that needs thousands of
//! sockets at once.
//!
//! A thread cannot be killed, so waiting is bounded from both ends: the
//! caller waits at most a given time for the result ([`NsThread::join`]),
//! and the code on the thread must bound its own blocking (socket timeouts,
//! `tokio::time::timeout` — [`block_on_in`] wraps the whole future in one).
//! A thread that overruns is reported as an error and left to finish on its
//! own; it holds no namespace open beyond its sockets.

use std::future::Future;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

use crate::netns::Netns;

/// A thread running inside a network namespace; its result is collected
/// with [`NsThread::join`].
#[derive(Debug)]
pub struct NsThread<T> {
    what: String,
    rx: mpsc::Receiver<Result<T>>,
    handle: Option<JoinHandle<()>>,
}

/// Enters the network namespace at `ns_path` (on the calling thread).
fn enter(ns_path: &str) -> Result<()> {
    let file = std::fs::File::open(ns_path).with_context(|| format!("cannot open {ns_path}"))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns({ns_path}) failed"))
}

/// Starts `f` on a new thread (named `what`) inside `ns`.
pub fn spawn_in<T, F>(ns: &Netns, what: &str, f: F) -> Result<NsThread<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns_path = ns.path();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(what.chars().take(15).collect())
        .spawn(move || {
            let result = enter(&ns_path).and_then(|()| f());
            // The receiver may be gone (the caller gave up): nothing to do.
            let _ = tx.send(result);
        })
        .with_context(|| format!("cannot spawn the {what} thread"))?;
    Ok(NsThread {
        what: what.to_owned(),
        rx,
        handle: Some(handle),
    })
}

impl<T> NsThread<T> {
    /// Waits at most `timeout` for the thread's result.
    pub fn join(mut self, timeout: Duration) -> Result<T> {
        match self.rx.recv_timeout(timeout) {
            Ok(result) => {
                if let Some(handle) = self.handle.take() {
                    let _ = handle.join();
                }
                result.with_context(|| format!("in thread {}", self.what))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("thread {} still running after {timeout:?}", self.what)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(anyhow!("thread {} panicked", self.what))
            }
        }
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// Runs `f` on a thread inside `ns` and waits at most `timeout` for it.
pub fn run_in<T, F>(ns: &Netns, what: &str, timeout: Duration, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    spawn_in(ns, what, f)?.join(timeout)
}

/// Builds a current-thread tokio runtime (on the calling thread).
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build a tokio runtime")
}

/// Starts a thread inside `ns` that runs the future made by `make` on a
/// current-thread tokio runtime, bounded by `timeout`.
pub fn spawn_block_on_in<T, Fut, M>(
    ns: &Netns,
    what: &str,
    timeout: Duration,
    make: M,
) -> Result<NsThread<T>>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T>>,
    M: FnOnce() -> Fut + Send + 'static,
{
    let label = what.to_owned();
    spawn_in(ns, what, move || {
        runtime()?.block_on(async move {
            tokio::time::timeout(timeout, make())
                .await
                .map_err(|_| anyhow!("{label} did not finish within {timeout:?}"))?
        })
    })
}

/// Runs the future made by `make` on a tokio runtime on a thread inside
/// `ns`, bounded by `timeout`, and returns its result.
pub fn block_on_in<T, Fut, M>(ns: &Netns, what: &str, timeout: Duration, make: M) -> Result<T>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T>>,
    M: FnOnce() -> Fut + Send + 'static,
{
    // The future bounds itself; the extra second covers runtime start-up.
    spawn_block_on_in(ns, what, timeout, make)?.join(timeout + Duration::from_secs(5))
}
