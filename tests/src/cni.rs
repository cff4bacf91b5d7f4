//! Driving `tapgate-cni` as a container runtime does, and the pieces its
//! end-to-end tests need (a pod namespace with an uplink, a running agent).
//!
//! # Theory of operation
//!
//! [`CniCall`] runs the plugin binary with a cleared environment holding
//! only `PATH` and the `CNI_*` variables, writes the configuration to its
//! stdin and collects stdout, stderr and the exit status within a bound;
//! [`CniOutput`] parses stdout as the single JSON document the spec
//! allows (or checks that it is empty).
//!
//! [`PodNet`] is a "node" and a "pod" namespace joined by a veth pair: the
//! pod's end is `eth0` with an address and an IPv4 default route, as a
//! primary CNI would leave it, so the plugin has an uplink to size the
//! tap after and the agent one to serve through.
//!
//! [`Agent`] runs `tapgate agent --socket --state-dir --bpffs-dir` in the
//! foreground, in a scratch directory with a private bpffs
//! ([`crate::bpffs::Bpffs`]), and waits until `GET /healthz` answers 200. [`http`] is a minimal HTTP/1.1 exchange over
//! the agent's socket for what the tests ask the agent directly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::child::Child;
use crate::netns::Netns;
use crate::scratch::ScratchDir;

/// Bound on one plugin run.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(90);

/// `PATH` given to the plugin (a runtime's is not much richer).
const PLUGIN_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// One invocation of the plugin.
#[derive(Clone, Debug, Default)]
pub struct CniCall {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`.
    pub args: Option<String>,
    /// The configuration on stdin.
    pub stdin: String,
}

/// What the plugin did.
#[derive(Clone, Debug)]
pub struct CniOutput {
    /// The exit status (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl CniOutput {
    /// stdout as the one JSON document it must be.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not one JSON document: {self}"))
    }

    /// Fails unless the plugin exited 0 with nothing on stdout.
    pub fn expect_silent_success(&self) -> Result<()> {
        if self.code != Some(0) || !self.stdout.trim().is_empty() {
            bail!("expected a silent success: {self}");
        }
        Ok(())
    }

    /// Fails unless the plugin exited non-zero with an error JSON of
    /// `code`; returns the error document.
    pub fn expect_error(&self, code: u64) -> Result<Value> {
        if self.code == Some(0) {
            bail!("expected error {code}, got success: {self}");
        }
        let v = self.json()?;
        if v["code"].as_u64() != Some(code) {
            bail!("expected error {code}: {self}");
        }
        for key in ["cniVersion", "msg", "details"] {
            if !v[key].is_string() {
                bail!("error JSON lacks {key}: {self}");
            }
        }
        Ok(v)
    }
}

impl std::fmt::Display for CniOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

impl CniCall {
    /// A call of `command` with `stdin` and nothing else set.
    pub fn new(command: &str, stdin: &str) -> Self {
        Self {
            command: command.into(),
            stdin: stdin.into(),
            ..Self::default()
        }
    }

    /// Sets `CNI_CONTAINERID`, `CNI_NETNS` and `CNI_IFNAME`.
    pub fn container(mut self, id: &str, netns: &str, ifname: &str) -> Self {
        self.container_id = Some(id.into());
        self.netns = Some(netns.into());
        self.ifname = Some(ifname.into());
        self
    }

    /// Runs the plugin binary `bin`.
    pub fn run(&self, bin: &Path) -> Result<CniOutput> {
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("PATH", PLUGIN_PATH)
            .env("CNI_COMMAND", &self.command)
            .env("CNI_PATH", "/opt/cni/bin")
            .env("TAPGATE_CNI_LOG", "debug");
        for (k, v) in [
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_ARGS", &self.args),
        ] {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = cmd
            .spawn()
            .with_context(|| format!("cannot spawn {}", bin.display()))?;
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = drain(
            proc.stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = drain(
            proc.stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        if let Some(mut stdin) = proc.stdin.take() {
            // The plugin may exit without reading (VERSION); ignore EPIPE.
            let _ = stdin.write_all(self.stdin.as_bytes());
        }
        let deadline = Instant::now() + PLUGIN_TIMEOUT;
        let status = loop {
            if let Some(s) = proc.try_wait().context("waiting for the plugin")? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = proc.kill();
                let _ = proc.wait();
                bail!(
                    "{} {} did not finish within {PLUGIN_TIMEOUT:?}",
                    bin.display(),
                    self.command
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(CniOutput {
            code: status.code(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }
}

/// Address of the pod's `eth0`.
pub const POD_ADDR: &str = "192.0.2.10";
/// Address of the node's end of the pod's veth (the pod's gateway).
pub const NODE_ADDR: &str = "192.0.2.1";
/// MTU of the pod's `eth0` (not 1500, so a tap sized after it shows).
pub const POD_MTU: u32 = 1450;

/// A pod namespace with an uplink `eth0` into a node namespace.
#[derive(Debug)]
pub struct PodNet {
    /// The pod's network namespace (its `eth0`, later its tap).
    pub pod: Netns,
    /// The node side of the veth.
    pub node: Netns,
}

impl PodNet {
    /// Builds the two namespaces, the veth pair, addresses and the pod's
    /// IPv4 default route.
    pub fn new() -> Result<PodNet> {
        let node = Netns::new("node")?;
        let pod = Netns::new("pod")?;
        node.ip(&[
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ])?;
        node.ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", "veth0"])?;
        node.ip(&["link", "set", "veth0", "mtu", &POD_MTU.to_string(), "up"])?;
        pod.ip(&["addr", "add", &format!("{POD_ADDR}/24"), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "mtu", &POD_MTU.to_string(), "up"])?;
        pod.ip(&["route", "add", "default", "via", NODE_ADDR])?;
        Ok(PodNet { pod, node })
    }

    /// `CNI_NETNS` of the pod.
    pub fn netns_path(&self) -> String {
        self.pod.path()
    }

    /// `ip -j link show NAME` in the pod, parsed; `None` if absent.
    pub fn link(&self, name: &str) -> Result<Option<Value>> {
        let out = self.pod.output_timeout(
            &["ip", "-j", "-d", "link", "show", name],
            crate::netns::DEFAULT_RUN_TIMEOUT,
        )?;
        if !out.status.success() {
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("ip -j output")?;
        Ok(v.get(0).cloned())
    }
}

pub use crate::tapgate_cni_bin;

/// One HTTP/1.1 exchange over a UNIX socket; returns the status and body.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).context("reading the answer")?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header in {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

/// Decodes a chunked body (enough for the agent's answers).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A running `tapgate agent`, stopped on drop.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    socket: PathBuf,
    state: PathBuf,
    bpffs: crate::bpffs::Bpffs,
    /// Earlier agents' stderr (after restarts).
    earlier: String,
    /// Extra arguments of every start.
    extra: Vec<String>,
    /// The `tapgate` binary it runs.
    bin: PathBuf,
    _dir: ScratchDir,
}

impl Agent {
    /// Starts the agent and waits (bounded) until `/healthz` answers.
    pub fn start() -> Result<Agent> {
        Self::start_with(&[])
    }

    /// [`Agent::start`] with more arguments (e.g. `--listen ADDR`).
    pub fn start_with(extra: &[&str]) -> Result<Agent> {
        Self::start_bin(&crate::tapgate_bin()?, extra)
    }

    /// [`Agent::start_with`] running the `tapgate` binary `bin` (e.g. a
    /// release build for a benchmark).
    pub fn start_bin(bin: &Path, extra: &[&str]) -> Result<Agent> {
        crate::require_root()?;
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let dir = ScratchDir::new("agent")?;
        let socket = dir.join("agent.sock");
        let state = dir.join("state");
        std::fs::create_dir(&state)?;
        let bpffs = crate::bpffs::Bpffs::new()?;
        let bin = bin.to_path_buf();
        let child = spawn_agent(&bin, &socket, &state, bpffs.path(), &extra)?;
        Ok(Agent {
            child,
            socket,
            state,
            bpffs,
            earlier: String::new(),
            extra,
            bin,
            _dir: dir,
        })
    }

    /// Ends the agent with `signal` (bounded wait), then starts a new one
    /// on the same socket, state and bpffs, as a DaemonSet's rolling
    /// update does. Returns when the old one had exited and when the new
    /// one answered `/healthz` (which it does only after re-adopting every
    /// attachment).
    pub fn restart(&mut self, signal: nix::sys::signal::Signal) -> Result<(Instant, Instant)> {
        self.child.signal(signal)?;
        let status = self.child.wait_exit(Duration::from_secs(30))?;
        let exited = Instant::now();
        self.earlier.push_str(&self.child.stderr());
        self.earlier
            .push_str(&format!("--- agent exited ({status}) after {signal} ---\n"));
        self.child = spawn_agent(
            &self.bin,
            &self.socket,
            &self.state,
            self.bpffs.path(),
            &self.extra,
        )?;
        Ok((exited, Instant::now()))
    }

    /// The agent's process id (it runs directly, not under `ip netns
    /// exec`: this is the agent itself).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's stderr so far (every agent's, across restarts).
    pub fn stderr(&self) -> String {
        format!("{}{}", self.earlier, self.child.stderr())
    }

    /// The bpffs it pins into.
    pub fn bpffs(&self) -> &crate::bpffs::Bpffs {
        &self.bpffs
    }
}

/// Starts `tapgate agent` and waits (bounded) until `/healthz` answers.
fn spawn_agent(
    bin: &Path,
    socket: &Path,
    state: &Path,
    bpffs: &Path,
    extra: &[String],
) -> Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.arg("agent")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state)
        .arg("--bpffs-dir")
        .arg(bpffs)
        .args(extra);
    let mut child = Child::spawn(cmd, "tapgate agent")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = http(socket, "GET", "/healthz", None) {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!("tapgate agent exited ({status}):\n{}", child.stderr());
        }
        if Instant::now() >= deadline {
            bail!("tapgate agent not ready after 30 s:\n{}", child.stderr());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
