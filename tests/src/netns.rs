//! Network namespaces owned by a guard.
//!
//! # Theory of operation
//!
//! [`Netns::new`] creates a named namespace with `ip netns add` (which
//! bind-mounts it at `/run/netns/NAME`) and brings its loopback up. Names are
//! `tg<pid>x<counter><role>`: the process id keeps parallel runs apart, the
//! per-process counter keeps parallel tests apart, and the role makes
//! `ip netns list` readable. If a name exists anyway (a crashed earlier run
//! whose pid was recycled) the next counter value is tried.
//!
//! Commands run inside with `ip netns exec NAME ...` (see [`Netns::cmd`]);
//! `ip netns exec` `exec`s the program, so a spawned child's pid is the
//! program's own pid.
//!
//! `Drop` SIGKILLs every process still in the namespace (as listed by
//! `ip netns pids`, never this process itself), waits a bounded time for
//! them to go, then runs `ip netns del`. The kernel destroys the namespace's
//! interfaces (veth peers included) once nothing refers to it any more.
//!
//! A run killed with SIGKILL cannot run its `Drop`s; the first
//! [`Netns::new`] of a process therefore removes namespaces that follow the
//! naming scheme but whose owning pid no longer exists.

use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::child::{check_output, run_with_timeout};

/// Default bound on how long [`Netns::run`] waits for a command.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Prefix of every namespace name this crate creates.
pub const NAME_PREFIX: &str = "tg";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static REAP_ONCE: Once = Once::new();

/// A network namespace that is deleted (with everything still running in
/// it) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a uniquely named namespace for `role` (a short lowercase word
    /// such as `guest`, at most 8 characters) and brings `lo` up in it.
    pub fn new(role: &str) -> Result<Netns> {
        if role.is_empty()
            || role.len() > 8
            || !role
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            bail!("namespace role {role:?} must be 1-8 lowercase letters or digits");
        }
        REAP_ONCE.call_once(reap_stale);
        let pid = std::process::id();
        for _ in 0..32 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{NAME_PREFIX}{pid}x{n}{role}");
            let out = run_with_timeout(
                Command::new("ip").args(["netns", "add", &name]),
                DEFAULT_RUN_TIMEOUT,
            )?;
            if out.status.success() {
                let ns = Netns { name };
                ns.ip(&["link", "set", "lo", "up"])?;
                log::debug!("created netns {}", ns.name);
                return Ok(ns);
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !stderr.contains("exists") {
                bail!(
                    "`ip netns add {name}` failed ({}): {}",
                    out.status,
                    stderr.trim()
                );
            }
        }
        bail!("could not find a free namespace name for role {role}")
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace's bind mount, usable with `setns(2)`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs `program` inside the namespace
    /// (`ip netns exec NAME program`); add arguments with `.arg()`.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `argv` inside the namespace, waiting at most
    /// [`DEFAULT_RUN_TIMEOUT`]; fails (with stdout and stderr in the message)
    /// unless it exits successfully.
    pub fn run(&self, argv: &[&str]) -> Result<Output> {
        self.run_timeout(argv, DEFAULT_RUN_TIMEOUT)
    }

    /// Like [`Netns::run`] with an explicit time bound.
    pub fn run_timeout(&self, argv: &[&str], timeout: Duration) -> Result<Output> {
        let out = self.output_timeout(argv, timeout)?;
        check_output(&self.describe(argv), out)
    }

    /// Runs `argv` inside the namespace and returns its output whatever its
    /// exit status (still bounded by `timeout`).
    pub fn output_timeout(&self, argv: &[&str], timeout: Duration) -> Result<Output> {
        let (program, args) = argv.split_first().context("empty command line")?;
        let mut cmd = self.cmd(program);
        cmd.args(args);
        run_with_timeout(&mut cmd, timeout).with_context(|| self.describe(argv))
    }

    /// Runs `argv` inside the namespace and returns its stdout as a string;
    /// fails like [`Netns::run`].
    pub fn stdout(&self, argv: &[&str]) -> Result<String> {
        let out = self.run(argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip -n NAME <args>` (configuration of the namespace without
    /// entering it); fails unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        let out = run_with_timeout(&mut cmd, DEFAULT_RUN_TIMEOUT)?;
        check_output(&format!("ip -n {} {}", self.name, args.join(" ")), out)
    }

    /// Pids of the processes whose network namespace this is (excluding this
    /// process).
    pub fn pids(&self) -> Result<Vec<i32>> {
        pids_of(&self.name)
    }

    fn describe(&self, argv: &[&str]) -> String {
        format!("[netns {}] {}", self.name, argv.join(" "))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_and_delete(&self.name);
    }
}

/// Lists the pids in namespace `name`, excluding this process.
fn pids_of(name: &str) -> Result<Vec<i32>> {
    let out = run_with_timeout(
        Command::new("ip").args(["netns", "pids", name]),
        DEFAULT_RUN_TIMEOUT,
    )?;
    let out = check_output(&format!("ip netns pids {name}"), out)?;
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|&p| p != me)
        .collect())
}

/// SIGKILLs everything in namespace `name`, waits (bounded) for it to exit,
/// then deletes the namespace. Errors are logged, never raised: this runs
/// from `Drop`.
fn kill_all_and_delete(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match pids_of(name) {
            Ok(pids) if pids.is_empty() => break,
            Ok(pids) => {
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            Err(e) => {
                log::warn!("cannot list processes in netns {name}: {e:#}");
                break;
            }
        }
        if Instant::now() >= deadline {
            log::warn!("processes still alive in netns {name} after SIGKILL");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match run_with_timeout(
        Command::new("ip").args(["netns", "del", name]),
        DEFAULT_RUN_TIMEOUT,
    ) {
        Ok(out) if out.status.success() => log::debug!("deleted netns {name}"),
        Ok(out) => log::warn!(
            "`ip netns del {name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => log::warn!("`ip netns del {name}` failed: {e:#}"),
    }
}

/// Parses a name of the form `tg<pid>x<counter><role>` and returns the pid.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let counter_len = rest.chars().take_while(char::is_ascii_digit).count();
    if pid.is_empty() || counter_len == 0 || !pid.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let role = &rest[counter_len..];
    if role.is_empty()
        || !role
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return None;
    }
    pid.parse().ok()
}

/// Deletes namespaces left by processes of this harness that no longer
/// exist (a run killed before its `Drop`s could run).
fn reap_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            log::info!("removing stale namespace {name} (pid {pid} is gone)");
            kill_all_and_delete(&name);
        }
    }
}

/// Names of the existing namespaces created by this process (for leak
/// checks).
pub fn own_namespaces() -> Result<Vec<String>> {
    let me = std::process::id();
    let entries = match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("cannot list /run/netns"),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry
            .context("cannot list /run/netns")?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if owner_pid(&name) == Some(me) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn parses_owner_pid() {
        assert_eq!(owner_pid("tg1234x0guest"), Some(1234));
        assert_eq!(owner_pid("tg1x17host"), Some(1));
        assert_eq!(owner_pid("tg1234x0"), None);
        assert_eq!(owner_pid("tgx0guest"), None);
        assert_eq!(owner_pid("tg12a4x0guest"), None);
        assert_eq!(owner_pid("other"), None);
        assert_eq!(owner_pid("tg12x0Guest"), None);
    }
}
