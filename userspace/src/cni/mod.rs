//! `tapgate-cni`: the CNI plugin (spec 1.1) that gives a VM pod its tap.
//!
//! # Theory of operation
//!
//! The runtime (or Multus, after the pod's primary network) runs the
//! plugin with the command and the container in environment variables and
//! the network configuration on stdin, and reads one JSON document from
//! stdout. [`run`] is the whole plugin as a function of those inputs
//! ([`CniEnv`], stdin) returning the document and the exit status
//! ([`Outcome`]); the `tapgate-cni` binary only feeds it. Logs go to
//! stderr through `log`; stdout carries nothing but the JSON.
//!
//! The tap is created here, in the pod's namespace ([`tap`]); serving it
//! is the node agent's job, reached over its UNIX socket with
//! [`AgentClient`]. Per command:
//!
//! * ADD: decode and check the configuration ([`config`]), create (or
//!   reuse) the tap, ask the agent to attach, answer `prevResult` plus the
//!   tap ([`result`]). If the agent fails, a tap this call created is
//!   removed again.
//! * DEL: idempotent. The agent forgets the attachment (404: there was
//!   none; agent down: logged, the agent collects attachments whose tap or
//!   netns vanished when it comes back); then the tap is deleted if the
//!   namespace still exists. No `CNI_NETNS`, or a namespace that is gone,
//!   is success.
//! * CHECK: the agent must hold a `running` attachment for
//!   (`CNI_CONTAINERID`, `CNI_IFNAME`) in the same namespace, and the tap
//!   must exist.
//! * STATUS: the agent's `/healthz`; unreachable is code 50.
//! * GC: the valid attachments go to the agent's `/v1/gc`, limited to
//!   this network.
//! * VERSION: the supported versions.
//!
//! The protocol layer is written here with serde rather than taken from
//! the `rscni-plugin` crate: its typed configuration reads the spec's `dns`
//! key as a DNS dictionary (tapgate's `dns` is an address string), its
//! typed `prevResult` drops keys it does not know instead of passing them
//! on, and its dispatcher reads the process's environment and stdio
//! directly, which leaves nothing to unit-test without a process.
//!
//! Errors carry the configuration's `cniVersion` when it could be read,
//! else the newest supported one.

pub mod config;
pub mod error;
pub mod result;
pub mod tap;

use std::{path::PathBuf, time::Duration};

use serde_json::{Value, json};

use crate::agent::{
    api::{AttachRequest, AttachmentId, GcRequest, Phase},
    client::{AgentClient, ClientError},
};

pub use self::{
    config::{CniArgs, CniVersion, NetConf, SUPPORTED_VERSIONS, Validation},
    error::{CniError, Code},
};
use self::{
    result::TapInterface,
    tap::{Removed, TapError, TapSpec},
};

/// Bound on ADD's attach call (the agent loads and attaches eBPF
/// programs before answering).
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the other agent calls.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on STATUS's health check.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// A CNI command (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Add the container to the network.
    Add,
    /// Remove it.
    Del,
    /// Check that it is as ADD left it.
    Check,
    /// Is the plugin ready for ADD?
    Status,
    /// Report the supported versions.
    Version,
    /// Remove what is not in the valid-attachments list.
    Gc,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            _ => return None,
        })
    }
}

/// The plugin's environment variables (empty values count as unset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Option<String>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`.
    pub args: Option<String>,
    /// `CNI_PATH`.
    pub path: Option<String>,
}

impl CniEnv {
    /// Reads the variables through `get` (e.g. `|k| std::env::var(k).ok()`).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        }
    }

    /// Reads the process's environment.
    pub fn from_process() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }
}

/// What the plugin prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The whole of stdout (empty for a DEL, CHECK, STATUS or GC success).
    pub stdout: String,
    /// The exit status.
    pub exit_code: i32,
}

/// Runs one plugin invocation.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Outcome {
    match dispatch(env, stdin) {
        Ok(None) => Outcome {
            stdout: String::new(),
            exit_code: 0,
        },
        Ok(Some(v)) => Outcome {
            stdout: format!("{v}\n"),
            exit_code: 0,
        },
        Err(e) => {
            log::error!("{e}");
            let version = config::sniff_version(stdin).unwrap_or(CniVersion::LATEST);
            Outcome {
                stdout: format!("{}\n", e.to_json(version.as_str())),
                exit_code: 1,
            }
        }
    }
}

/// The VERSION answer.
pub fn version_json() -> Value {
    json!({
        "cniVersion": CniVersion::LATEST.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

fn dispatch(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let raw = env
        .command
        .as_deref()
        .ok_or_else(|| CniError::env("CNI_COMMAND", "missing"))?;
    let command = Command::parse(raw)
        .ok_or_else(|| CniError::env("CNI_COMMAND", format!("unknown command {raw:?}")))?;
    match command {
        Command::Version => Ok(Some(version_json())),
        Command::Add => add(env, stdin).map(Some),
        Command::Del => del(env, stdin).map(|()| None),
        Command::Check => check(env, stdin).map(|()| None),
        Command::Status => status(stdin).map(|()| None),
        Command::Gc => gc(stdin).map(|()| None),
    }
}

/// The attachment: `CNI_CONTAINERID` and the tap's name (from
/// `CNI_IFNAME`, see [`config::tap_name`]), checked.
fn attachment_id(env: &CniEnv, conf: &NetConf) -> Result<AttachmentId, CniError> {
    let container_id = env
        .container_id
        .clone()
        .ok_or_else(|| CniError::env("CNI_CONTAINERID", "missing"))?;
    let ifname = env
        .ifname
        .clone()
        .ok_or_else(|| CniError::env("CNI_IFNAME", "missing"))?;
    crate::cli::parse_ifname(&ifname).map_err(|e| CniError::env("CNI_IFNAME", e))?;
    let id = AttachmentId {
        container_id,
        ifname: config::tap_name(conf.tap.name.as_deref(), &ifname),
    };
    id.validate().map_err(|e| {
        let var = if crate::cli::parse_ifname(&id.ifname).is_err() {
            "CNI_IFNAME"
        } else {
            "CNI_CONTAINERID"
        };
        CniError::env(var, e)
    })?;
    Ok(id)
}

fn required_netns(env: &CniEnv) -> Result<PathBuf, CniError> {
    env.netns
        .as_deref()
        .map(PathBuf::from)
        .ok_or_else(|| CniError::env("CNI_NETNS", "missing"))
}

/// Refuses STATUS and GC for configurations older than 1.1.0, where they
/// do not exist.
fn require_1_1(conf: &NetConf, what: &str) -> Result<(), CniError> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "{what} needs cniVersion 1.1.0 or later, the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    Ok(())
}

/// Maps an agent error for ADD, CHECK and GC: down or slow is "try again
/// later", a 4xx is a refusal, anything else a failure.
fn agent_error(e: ClientError) -> CniError {
    let details = e.to_string();
    match e {
        ClientError::Unreachable { .. } | ClientError::Timeout(_) => {
            CniError::new(Code::TryAgainLater, details)
        }
        ClientError::Status { code, .. } if (400..500).contains(&code) => {
            CniError::new(Code::AgentRefused, details)
        }
        ClientError::Status { .. } | ClientError::Protocol(_) => {
            CniError::new(Code::AgentFailed, details)
        }
    }
}

fn tap_error(e: TapError) -> CniError {
    match e {
        TapError::NetnsGone(p) => {
            CniError::env("CNI_NETNS", format!("{} does not exist", p.display()))
        }
        e @ TapError::Netns { .. } => CniError::env("CNI_NETNS", e),
        e @ TapError::NotATap(_) => CniError::env("CNI_IFNAME", e),
        e @ TapError::NoUplink(_) => CniError::config("tap.mtu", e),
        e @ TapError::Sys { .. } => CniError::new(Code::Io, e.to_string()),
    }
}

fn add(env: &CniEnv, stdin: &[u8]) -> Result<Value, CniError> {
    let conf = NetConf::parse(stdin, Validation::Full)?;
    let id = attachment_id(env, &conf)?;
    let netns = required_netns(env)?;
    let args = CniArgs::parse(env.args.as_deref().unwrap_or(""))?;
    let spec = TapSpec {
        name: id.ifname.clone(),
        owner: conf.tap.owner,
        group: conf.tap.group,
        mtu: conf.tap.mtu,
        multi_queue: conf.tap.multi_queue,
        uplink: conf.settings.uplink.clone(),
    };
    let tap = tap::ensure(&netns, &spec).map_err(tap_error)?;
    let req = AttachRequest {
        id: id.clone(),
        netns: netns.clone(),
        pod_namespace: args.pod_namespace,
        pod_name: args.pod_name,
        network: Some(conf.network_name().to_owned()),
        settings: conf.settings.clone(),
    };
    let client = AgentClient::new(&conf.agent_socket, ATTACH_TIMEOUT);
    let attached = client.attach(&req).map_err(agent_error).and_then(|a| {
        if a.phase == Phase::Failed {
            let why = a.error.unwrap_or_else(|| "no reason given".into());
            // Do not leave the failed attachment behind.
            if let Err(e) = client.delete(&id) {
                log::warn!("removing the failed attachment {id}: {e}");
            }
            Err(CniError::new(
                Code::AgentFailed,
                format!("attachment {id} failed: {why}"),
            ))
        } else {
            Ok(a)
        }
    });
    if let Err(e) = attached {
        if tap.created {
            match tap::remove(&netns, &id.ifname) {
                Ok(_) => log::info!("removed tap {} after the failed ADD", id.ifname),
                Err(re) => log::warn!("removing tap {} after the failed ADD: {re}", id.ifname),
            }
        }
        return Err(e);
    }
    let iface = TapInterface {
        name: id.ifname.clone(),
        mac: tap.mac,
        sandbox: netns.to_string_lossy().into_owned(),
        mtu: Some(tap.mtu),
    };
    result::add_result(conf.cni_version, conf.prev_result.as_ref(), &iface)
}

fn del(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin, Validation::Lenient)?;
    let id = attachment_id(env, &conf)?;
    let client = AgentClient::new(&conf.agent_socket, CALL_TIMEOUT);
    match client.delete(&id) {
        Ok(true) => log::info!("agent released {id}"),
        Ok(false) => log::info!("agent held no attachment {id}"),
        Err(e @ ClientError::Unreachable { .. }) => {
            log::warn!("{e}; going on (the agent collects attachments whose tap or netns is gone)");
        }
        Err(e) => return Err(agent_error(e)),
    }
    let Some(netns) = env.netns.as_deref() else {
        return Ok(());
    };
    match tap::remove(&PathBuf::from(netns), &id.ifname) {
        Ok(Removed::Deleted) => log::info!("deleted tap {}", id.ifname),
        Ok(Removed::Absent | Removed::NetnsGone) => {}
        Ok(Removed::NotATap) => log::warn!("{} is not a tap; left alone", id.ifname),
        Err(TapError::Netns { path, source }) => {
            // A namespace file that is no namespace any more (being torn
            // down): nothing of ours can be left in it.
            log::warn!(
                "cannot enter {}: {source}; nothing to remove",
                path.display()
            );
        }
        Err(e) => return Err(tap_error(e)),
    }
    Ok(())
}

fn check(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin, Validation::Full)?;
    let id = attachment_id(env, &conf)?;
    let netns = required_netns(env)?;
    let client = AgentClient::new(&conf.agent_socket, CALL_TIMEOUT);
    let failed = |why: String| Err(CniError::new(Code::CheckFailed, why));
    let Some(a) = client.get(&id).map_err(agent_error)? else {
        return failed(format!("the agent holds no attachment {id}"));
    };
    if a.phase != Phase::Running {
        return failed(format!("attachment {id} is {:?}, not running", a.phase));
    }
    if a.netns != netns {
        return failed(format!(
            "attachment {id} serves {}, not {}",
            a.netns.display(),
            netns.display()
        ));
    }
    if !tap::exists(&netns, &id.ifname).map_err(tap_error)? {
        return failed(format!(
            "tap {} is missing from {}",
            id.ifname,
            netns.display()
        ));
    }
    Ok(())
}

fn status(stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin, Validation::Lenient)?;
    require_1_1(&conf, "STATUS")?;
    AgentClient::new(&conf.agent_socket, STATUS_TIMEOUT)
        .healthz()
        .map_err(|e| CniError::new(Code::NotAvailable, e.to_string()))
}

fn gc(stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin, Validation::Lenient)?;
    require_1_1(&conf, "GC")?;
    // The runtime names attachments by CNI_IFNAME; the agent by tap.
    let valid = conf
        .valid_attachments
        .clone()
        .ok_or_else(|| CniError::config("cni.dev/valid-attachments", "missing"))?
        .into_iter()
        .map(|a| AttachmentId {
            ifname: config::tap_name(conf.tap.name.as_deref(), &a.ifname),
            ..a
        })
        .collect();
    let req = GcRequest {
        valid,
        network: Some(conf.network_name().to_owned()),
    };
    let resp = AgentClient::new(&conf.agent_socket, CALL_TIMEOUT)
        .gc(&req)
        .map_err(agent_error)?;
    for id in &resp.removed {
        log::info!("agent collected {id}");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(command: &str) -> CniEnv {
        CniEnv {
            command: Some(command.into()),
            container_id: Some("c1".into()),
            netns: None,
            ifname: Some("tap0".into()),
            args: None,
            path: Some("/opt/cni/bin".into()),
        }
    }

    fn stdout_json(o: &Outcome) -> Value {
        serde_json::from_str(&o.stdout).unwrap()
    }

    fn conf(version: &str, socket: &str) -> Vec<u8> {
        format!(r#"{{"cniVersion":"{version}","name":"tapgate","type":"tapgate-cni","agentSocket":"{socket}"}}"#)
            .into_bytes()
    }

    #[test]
    fn version() {
        let o = run(&env("VERSION"), b"{\"cniVersion\":\"1.1.0\"}");
        assert_eq!(o.exit_code, 0);
        let v = stdout_json(&o);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    }

    #[test]
    fn missing_or_unknown_command_is_code_4() {
        for e in [CniEnv::default(), env("FROB")] {
            let o = run(&e, b"{}");
            assert_eq!(o.exit_code, 1);
            let v = stdout_json(&o);
            assert_eq!(v["code"], 4);
            assert!(v["details"].as_str().unwrap().starts_with("CNI_COMMAND"));
        }
    }

    #[test]
    fn errors_carry_the_config_version() {
        let o = run(
            &env("ADD"),
            br#"{"cniVersion":"0.4.0","name":"x","tap":{"mtu":1}}"#,
        );
        let v = stdout_json(&o);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 7);
        let o = run(&env("ADD"), b"garbage");
        let v = stdout_json(&o);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 6);
    }

    #[test]
    fn add_needs_its_environment() {
        let mut e = env("ADD");
        let stdin = conf("1.0.0", "/nonexistent/agent.sock");
        let o = run(&e, &stdin);
        assert_eq!(stdout_json(&o)["code"], 4);
        assert!(
            stdout_json(&o)["details"]
                .as_str()
                .unwrap()
                .starts_with("CNI_NETNS")
        );
        e.netns = Some("/run/netns/x".into());
        e.ifname = Some("bad/name".into());
        let o = run(&e, &stdin);
        assert!(
            stdout_json(&o)["details"]
                .as_str()
                .unwrap()
                .starts_with("CNI_IFNAME")
        );
        e.ifname = Some("tap0".into());
        e.container_id = Some("../etc".into());
        let o = run(&e, &stdin);
        assert!(
            stdout_json(&o)["details"]
                .as_str()
                .unwrap()
                .starts_with("CNI_CONTAINERID")
        );
    }

    #[test]
    fn status_without_agent_is_code_50() {
        let o = run(&env("STATUS"), &conf("1.1.0", "/nonexistent/agent.sock"));
        assert_eq!(o.exit_code, 1);
        let v = stdout_json(&o);
        assert_eq!(v["code"], 50);
        assert_eq!(v["msg"], "plugin not available");
    }

    #[test]
    fn status_and_gc_need_1_1() {
        for cmd in ["STATUS", "GC"] {
            let o = run(&env(cmd), &conf("1.0.0", "/nonexistent/agent.sock"));
            assert_eq!(stdout_json(&o)["code"], 1, "{cmd}");
        }
    }

    #[test]
    fn del_without_agent_or_netns_succeeds() {
        let o = run(&env("DEL"), &conf("1.0.0", "/nonexistent/agent.sock"));
        assert_eq!(
            o,
            Outcome {
                stdout: String::new(),
                exit_code: 0
            }
        );
        let mut e = env("DEL");
        e.netns = Some("/run/netns/tapgate-cni-unit-test-gone".into());
        let o = run(&e, &conf("0.4.0", "/nonexistent/agent.sock"));
        assert_eq!(o.exit_code, 0, "{}", o.stdout);
    }

    #[test]
    fn gc_needs_valid_attachments() {
        let o = run(&env("GC"), &conf("1.1.0", "/nonexistent/agent.sock"));
        let v = stdout_json(&o);
        assert_eq!(v["code"], 7);
        assert!(
            v["details"]
                .as_str()
                .unwrap()
                .starts_with("cni.dev/valid-attachments")
        );
    }
}
