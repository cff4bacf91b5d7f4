//! Asking a running tapgate through its control socket, as a user would.
//!
//! # Theory of operation
//!
//! The tests read tapgate's counters and flows the way an operator does:
//! by running `tapgate stats --json` / `tapgate flows --json` (the binary
//! under test) against the topology's control socket
//! ([`Topology::control_socket`]), bounded by [`QUERY_TIMEOUT`]. The JSON
//! keys are the documented ones (`tapgate::control::ControlSource`):
//! `fastpath_packets`, `slowpath_packets`, `punts`, `flows_active` for
//! stats; `proto`, `guest`, `remote`, `nat`, `state`, `fastpath_packets`
//! for each flow.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::child::{check_output, run_with_timeout};
use crate::topology::Topology;

/// Bound on one `tapgate stats`/`flows` run.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `tapgate <args> --control-socket <topology's socket>` and returns
/// its stdout; fails with its stderr unless it succeeds.
pub fn query(topo: &Topology, args: &[&str]) -> Result<String> {
    let socket = topo.control_socket();
    let socket = socket
        .to_str()
        .context("control socket path is not UTF-8")?;
    let mut argv = args.to_vec();
    argv.extend_from_slice(&["--control-socket", socket]);
    let mut cmd = topo.tapgate_command(&argv)?;
    let out = run_with_timeout(&mut cmd, QUERY_TIMEOUT)?;
    let out = check_output(&format!("tapgate {}", argv.join(" ")), out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `tapgate stats --json`.
pub fn stats(topo: &Topology) -> Result<Value> {
    let text = query(topo, &["stats", "--json"])?;
    serde_json::from_str(&text).with_context(|| format!("`tapgate stats --json` printed {text}"))
}

/// `tapgate flows --json`, as a list of flow objects.
pub fn flows(topo: &Topology) -> Result<Vec<Value>> {
    let text = query(topo, &["flows", "--json"])?;
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("`tapgate flows --json` printed {text}"))?;
    match doc {
        Value::Array(flows) => Ok(flows),
        other => bail!("`tapgate flows --json` is not an array: {other}"),
    }
}

/// `(fastpath_packets, slowpath_packets)` of a stats document.
pub fn fast_slow(stats: &Value) -> Result<(u64, u64)> {
    let field = |k: &str| {
        stats
            .get(k)
            .and_then(Value::as_u64)
            .with_context(|| format!("stats have no number {k:?}: {stats}"))
    };
    Ok((field("fastpath_packets")?, field("slowpath_packets")?))
}

/// A string field of a flow object ("" if absent).
pub fn field<'a>(flow: &'a Value, key: &str) -> &'a str {
    flow.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Whether `flow` is a `proto` flow from `guest` (`ip:port`, or any port
/// of `ip` if it has no port) to `remote` (`ip:port`).
pub fn flow_matches(flow: &Value, proto: &str, guest: &str, remote: &str) -> bool {
    let guest_ok = if guest.contains(':') {
        field(flow, "guest") == guest
    } else {
        field(flow, "guest").split(':').next() == Some(guest)
    };
    field(flow, "proto").eq_ignore_ascii_case(proto) && guest_ok && field(flow, "remote") == remote
}

/// Polls `tapgate flows --json` (every 100 ms, at most `timeout`) until a
/// flow satisfies `pred`; returns it. The error shows the last list.
pub fn wait_flow(
    topo: &Topology,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = flows(topo)?;
        if let Some(flow) = list.iter().find(|f| pred(f)) {
            return Ok(flow.clone());
        }
        if Instant::now() >= deadline {
            bail!(
                "no matching flow within {timeout:?}; flows: {}",
                Value::Array(list)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `tapgate flows --json` until no flow satisfies `pred` (at most
/// `timeout`); returns how long that took.
pub fn wait_flow_gone(
    topo: &Topology,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let list = flows(topo)?;
        if !list.iter().any(&pred) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            bail!(
                "flow still listed after {timeout:?}: {}",
                Value::Array(list)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
