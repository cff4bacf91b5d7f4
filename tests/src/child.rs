//! Background processes owned by a guard, and bounded foreground commands.
//!
//! # Theory of operation
//!
//! [`Child::spawn`] starts a command with stdin closed and stdout/stderr
//! redirected to files in a private [`ScratchDir`], so output never fills a
//! pipe and can be read at any time (while the process runs, after it exits,
//! and in panic messages). Waiting is done by polling `try_wait` against a
//! deadline; nothing ever blocks without a bound.
//!
//! Stopping is SIGTERM, a bounded wait ([`STOP_TIMEOUT`]), then SIGKILL and
//! a reap. `Drop` does the same for a child that is still running, so a
//! panicking test leaves no process behind.
//!
//! [`run_with_timeout`] is the foreground counterpart: it collects stdout and
//! stderr through pipes (drained by helper threads) and kills the command if
//! it overruns its time bound.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::scratch::ScratchDir;

/// How long [`Child::stop`] waits after SIGTERM before sending SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A background process that is terminated when dropped.
#[derive(Debug)]
pub struct Child {
    label: String,
    proc: std::process::Child,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    _dir: ScratchDir,
}

impl Child {
    /// Spawns `cmd` with stdin from `/dev/null` and stdout/stderr captured to
    /// log files; `label` names the process in messages.
    pub fn spawn(mut cmd: Command, label: &str) -> Result<Child> {
        let dir = ScratchDir::new("child")?;
        let stdout_path = dir.join("stdout.log");
        let stderr_path = dir.join("stderr.log");
        let stdout = File::create(&stdout_path)
            .with_context(|| format!("cannot create {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("cannot create {}", stderr_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let proc = cmd
            .spawn()
            .with_context(|| format!("cannot spawn {label}: {cmd:?}"))?;
        log::debug!("spawned {label} (pid {}): {cmd:?}", proc.id());
        Ok(Child {
            label: label.to_owned(),
            proc,
            status: None,
            stdout_path,
            stderr_path,
            _dir: dir,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// The label given to [`Child::spawn`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Path of the file capturing stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything written to stderr so far (lossily decoded).
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Everything written to stdout so far (lossily decoded).
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .proc
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.label))?;
        }
        Ok(self.status)
    }

    /// Waits at most `timeout` for the process to exit; `None` if it is
    /// still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits at most `timeout` for the process to exit and fails (with its
    /// stderr) if it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "{} still running after {timeout:?}; stderr so far:\n{}",
                self.label,
                self.stderr()
            ),
        }
    }

    /// Waits at most `timeout` until the captured stderr contains `needle`.
    ///
    /// Fails early if the process exits without having written it, and on
    /// timeout; both errors carry the stderr captured so far.
    pub fn wait_stderr_contains(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Check the status before reading, so output written right before
            // exiting is not missed.
            let status = self.try_wait()?;
            let stderr = self.stderr();
            if stderr.contains(needle) {
                return Ok(());
            }
            if let Some(status) = status {
                bail!(
                    "{} exited ({status}) before writing {needle:?} to stderr; stderr:\n{stderr}",
                    self.label
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not write {needle:?} to stderr within {timeout:?}; stderr:\n{stderr}",
                    self.label
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `signal` to the process (no-op once it has been reaped).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("cannot send {signal} to {}", self.label))
    }

    /// Stops the process: SIGTERM, then SIGKILL if it has not exited after
    /// [`STOP_TIMEOUT`]. Returns the exit status (idempotent; the captured
    /// output stays readable afterwards).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM)?;
        if let Some(status) = self.wait_timeout(STOP_TIMEOUT)? {
            return Ok(status);
        }
        log::warn!(
            "{} ignored SIGTERM for {STOP_TIMEOUT:?}; sending SIGKILL",
            self.label
        );
        self.signal(Signal::SIGKILL)?;
        match self.wait_timeout(STOP_TIMEOUT)? {
            Some(status) => Ok(status),
            None => bail!("{} survived SIGKILL for {STOP_TIMEOUT:?}", self.label),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("cannot stop {}: {e:#}", self.label);
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr collected),
/// killing it if it runs longer than `timeout`. The exit status is not
/// checked; see [`check_output`].
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut proc = cmd
        .spawn()
        .with_context(|| format!("cannot spawn {cmd:?}"))?;
    let stdout = proc.stdout.take().map(drain);
    let stderr = proc.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = proc
            .try_wait()
            .with_context(|| format!("cannot wait for {cmd:?}"))?
        {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = proc.kill();
            let _ = proc.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = stdout.map(join_drain).unwrap_or_default();
    let stderr = stderr.map(join_drain).unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{cmd:?} did not finish within {timeout:?} (killed)\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

fn drain<R: Read + Send + 'static>(mut reader: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        buf
    })
}

fn join_drain(handle: std::thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().unwrap_or_default()
}

/// Returns `out` if its status is success, else an error naming `what` and
/// showing the exit status, stdout and stderr.
pub fn check_output(what: &str, out: Output) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        bail!(
            "`{what}` failed ({})\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        )
    }
}
