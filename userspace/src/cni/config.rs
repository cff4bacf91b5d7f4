//! The plugin's input: the network configuration on stdin and `CNI_ARGS`.
//!
//! # Theory of operation
//!
//! The runtime hands the plugin one JSON object on stdin: the CNI keys
//! (`cniVersion`, `name`, `type`, `prevResult`, `args`, GC's
//! `cni.dev/valid-attachments`), whatever else it injects (`runtimeConfig`,
//! `capabilities`, `ipam`, ...: tolerated and ignored) and tapgate's own
//! flat, camelCase keys, each optional and mapping 1:1 onto
//! [`AttachSettings`] (plus `agentSocket` and the `tap` object).
//!
//! Decoding happens in three steps so that every failure names its key:
//!
//! 1. stdin must be a JSON object (otherwise code 6);
//! 2. `cniVersion` must be one of [`SUPPORTED_VERSIONS`] (code 1);
//! 3. each known key is decoded on its own (a wrong JSON type is code 7
//!    naming the key) and then checked with the same parsers `tapgate run`
//!    uses: the values are handed to the `tapgate run` command line
//!    ([`crate::cli::Cli`]) one flag at a time, so ranges and formats are
//!    exactly those of the daemon, then all together for the cross-field
//!    checks ([`crate::cli::RunArgs::guest_config`]); forwarding SPECs go
//!    through [`FwdTable::add_spec`].
//!
//! One key is shared with the spec: `dns`. A string is tapgate's guest DNS
//! address; an object is the spec's DNS dictionary, which a tap has no use
//! for, and is ignored.
//!
//! DEL, GC and STATUS decode leniently ([`Validation::Lenient`]): only what
//! they use (version, name, socket, network name, valid attachments), so a
//! configuration that went bad after ADD can still be cleaned up.

use std::path::PathBuf;

use clap::Parser;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::{CniError, Code};
use crate::{
    agent::api::{AttachSettings, AttachmentId, DEFAULT_AGENT_SOCKET},
    cli::{Cli, Command, ConfigError},
    fwd::{FwdTable, PortRange, Proto},
};

/// The CNI spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// A CNI spec version this plugin speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    /// 0.4.0 (results carry `ips[].version`; CHECK exists).
    V0_4_0,
    /// 1.0.0 (no `ips[].version`).
    V1_0_0,
    /// 1.1.0 (STATUS, GC, interface `mtu`).
    V1_1_0,
}

impl CniVersion {
    /// The newest version, reported by VERSION and used for errors when
    /// the configuration's own version is unknown.
    pub const LATEST: Self = Self::V1_1_0;

    /// Parses a configuration's `cniVersion`; code 1 if unsupported.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        match s {
            "0.4.0" => Ok(Self::V0_4_0),
            "1.0.0" => Ok(Self::V1_0_0),
            "1.1.0" => Ok(Self::V1_1_0),
            _ => Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {s:?} is not supported (supported: {})",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            )),
        }
    }

    /// The version as written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }
}

impl std::fmt::Display for CniVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much of the configuration to decode and check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validation {
    /// Everything (ADD, CHECK).
    Full,
    /// Only what DEL, GC and STATUS use; tapgate's settings, `tap` and
    /// `prevResult` are not looked at.
    Lenient,
}

/// The `tap` object: how the plugin creates the tap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapConfig {
    /// `tap.name`: the tap's name; absent = KubeVirt's naming (see
    /// [`tap_name`]).
    pub name: Option<String>,
    /// `tap.owner`: the uid allowed to open the tap (QEMU's, 107 in
    /// KubeVirt); absent = not restricted.
    pub owner: Option<u32>,
    /// `tap.group`: the gid allowed to open the tap.
    pub group: Option<u32>,
    /// `tap.mtu`; absent = the MTU of the pod's uplink at ADD time.
    pub mtu: Option<u32>,
    /// `tap.multiQueue`: create the tap with `IFF_MULTI_QUEUE`.
    pub multi_queue: bool,
}

/// The decoded network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: CniVersion,
    /// `name`: the network's name.
    pub name: String,
    /// `agentSocket`: where the agent listens.
    pub agent_socket: PathBuf,
    /// `tap`.
    pub tap: TapConfig,
    /// tapgate's per-attachment settings (the flat keys).
    pub settings: AttachSettings,
    /// `prevResult`, kept as JSON so that whatever the previous plugins
    /// reported passes through untouched.
    pub prev_result: Option<Map<String, Value>>,
    /// `args.cni.logicNetworkName` (Multus, KubeVirt binding plugins).
    pub logic_network_name: Option<String>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<AttachmentId>>,
}

impl NetConf {
    /// The network's name for the agent: `args.cni.logicNetworkName` when
    /// present, else `name`.
    pub fn network_name(&self) -> &str {
        self.logic_network_name.as_deref().unwrap_or(&self.name)
    }

    /// Decodes stdin. Code 6 if it is not a JSON object, 1 for an
    /// unsupported `cniVersion`, 7 naming the key for anything else.
    pub fn parse(stdin: &[u8], validation: Validation) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                format!("network configuration is not JSON: {e}"),
            )
        })?;
        let Value::Object(obj) = value else {
            return Err(CniError::new(
                Code::Decode,
                "network configuration is not a JSON object",
            ));
        };
        let cni_version = CniVersion::parse(
            &take::<String>(&obj, "cniVersion")?
                .ok_or_else(|| CniError::config("cniVersion", "missing"))?,
        )?;
        let name =
            take::<String>(&obj, "name")?.ok_or_else(|| CniError::config("name", "missing"))?;
        if !valid_network_name(&name) {
            return Err(CniError::config(
                "name",
                format!(
                    "{name:?} is not a network name (alphanumeric first, then alphanumerics, _ . -)"
                ),
            ));
        }
        let agent_socket = match take::<String>(&obj, "agentSocket")? {
            None => PathBuf::from(DEFAULT_AGENT_SOCKET),
            Some(s) if s.starts_with('/') => PathBuf::from(s),
            Some(s) => {
                return Err(CniError::config(
                    "agentSocket",
                    format!("{s:?} is not an absolute path"),
                ));
            }
        };
        let logic_network_name = logic_network_name(&obj)?;
        let valid_attachments = valid_attachments(&obj)?;
        let mut conf = NetConf {
            cni_version,
            name,
            agent_socket,
            tap: TapConfig::default(),
            settings: AttachSettings::default(),
            prev_result: None,
            logic_network_name,
            valid_attachments,
        };
        if validation == Validation::Lenient {
            // Only the tap's name, to find what ADD made.
            conf.tap.name = obj
                .get("tap")
                .and_then(|t| t.get("name"))
                .and_then(Value::as_str)
                .filter(|n| crate::cli::parse_ifname(n).is_ok())
                .map(str::to_owned);
        }
        if validation == Validation::Full {
            conf.tap = tap_config(&obj)?;
            conf.settings = settings(&obj)?;
            check_settings(&conf.settings)?;
            conf.prev_result = match obj.get("prevResult") {
                None | Some(Value::Null) => None,
                Some(Value::Object(m)) => Some(m.clone()),
                Some(_) => return Err(CniError::config("prevResult", "not a JSON object")),
            };
        }
        Ok(conf)
    }
}

/// Reads just the `cniVersion` of stdin, if it is a supported one (for
/// reporting errors under the caller's version).
pub fn sniff_version(stdin: &[u8]) -> Option<CniVersion> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    CniVersion::parse(v.get("cniVersion")?.as_str()?).ok()
}

/// Decodes `obj[key]` as a `T`; `None` when absent or `null`.
fn take<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str) -> Result<Option<T>, CniError> {
    take_named(obj, key, key)
}

/// Like [`take`], naming the key `shown` in errors (for nested keys).
fn take_named<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    key: &str,
    shown: &str,
) -> Result<Option<T>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v)
            .map(Some)
            .map_err(|e| CniError::config(shown, e)),
    }
}

/// The spec's rule for network names.
fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `args.cni.logicNetworkName`.
fn logic_network_name(obj: &Map<String, Value>) -> Result<Option<String>, CniError> {
    const KEY: &str = "args.cni.logicNetworkName";
    let Some(name) = obj
        .get("args")
        .and_then(|a| a.get("cni"))
        .and_then(|c| c.get("logicNetworkName"))
    else {
        return Ok(None);
    };
    match name {
        Value::Null => Ok(None),
        Value::String(s) if valid_network_name(s) => Ok(Some(s.clone())),
        Value::String(s) => Err(CniError::config(
            KEY,
            format!("{s:?} is not a network name"),
        )),
        _ => Err(CniError::config(KEY, "not a string")),
    }
}

/// `cni.dev/valid-attachments`: `[{"containerID":..,"ifname":..}]`.
fn valid_attachments(obj: &Map<String, Value>) -> Result<Option<Vec<AttachmentId>>, CniError> {
    #[derive(serde::Deserialize)]
    struct Wire {
        #[serde(rename = "containerID")]
        container_id: String,
        ifname: String,
    }
    let list: Option<Vec<Wire>> = take(obj, "cni.dev/valid-attachments")?;
    Ok(list.map(|l| {
        l.into_iter()
            .map(|w| AttachmentId {
                container_id: w.container_id,
                ifname: w.ifname,
            })
            .collect()
    }))
}

/// The `tap` object; unknown keys inside it are refused (they can only
/// be typos: nobody else writes there).
fn tap_config(obj: &Map<String, Value>) -> Result<TapConfig, CniError> {
    let tap = match obj.get("tap") {
        None | Some(Value::Null) => return Ok(TapConfig::default()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(CniError::config("tap", "not a JSON object")),
    };
    if let Some(k) = tap.keys().find(|k| {
        !matches!(
            k.as_str(),
            "name" | "owner" | "group" | "mtu" | "multiQueue"
        )
    }) {
        return Err(CniError::config(
            &format!("tap.{k}"),
            "unknown key (known: name, owner, group, mtu, multiQueue)",
        ));
    }
    let name: Option<String> = take_named(tap, "name", "tap.name")?;
    if let Some(n) = &name {
        crate::cli::parse_ifname(n).map_err(|e| CniError::config("tap.name", e))?;
    }
    let id = |key: &str| -> Result<Option<u32>, CniError> {
        let shown = format!("tap.{key}");
        let v: Option<u32> = take_named(tap, key, &shown)?;
        match v {
            // (uid_t)-1 means "no owner" to the kernel.
            Some(u32::MAX) => Err(CniError::config(&shown, "4294967295 is not an id")),
            v => Ok(v),
        }
    };
    let mtu: Option<u32> = take_named(tap, "mtu", "tap.mtu")?;
    if let Some(m) = mtu.filter(|m| !(68..=65535).contains(m)) {
        return Err(CniError::config(
            "tap.mtu",
            format!("{m} is not an MTU (68-65535)"),
        ));
    }
    Ok(TapConfig {
        name,
        owner: id("owner")?,
        group: id("group")?,
        mtu,
        multi_queue: take_named(tap, "multiQueue", "tap.multiQueue")?.unwrap_or(false),
    })
}

/// tapgate's flat keys, decoded (types only).
fn settings(obj: &Map<String, Value>) -> Result<AttachSettings, CniError> {
    let dns = match obj.get("dns") {
        // The spec's DNS dictionary: not ours.
        Some(Value::Object(_)) => None,
        _ => take(obj, "dns")?,
    };
    Ok(AttachSettings {
        uplink: take(obj, "uplink")?,
        address: take(obj, "address")?,
        gateway: take(obj, "gateway")?,
        dns,
        mac: take(obj, "mac")?,
        address6: take(obj, "address6")?,
        gateway6: take(obj, "gateway6")?,
        dns6: take(obj, "dns6")?,
        dns_search: take(obj, "dnsSearch")?,
        ipv6: take(obj, "ipv6")?,
        dhcp_lease: take(obj, "dhcpLease")?,
        dns_upstream: take(obj, "dnsUpstream")?,
        tcp_ports: take(obj, "tcpPorts")?,
        udp_ports: take(obj, "udpPorts")?,
        keepalive_interval: take(obj, "keepaliveInterval")?,
        inactivity_interval: take(obj, "inactivityInterval")?,
        keepalive_probes: take(obj, "keepaliveProbes")?,
        last_ack_timeout: take(obj, "lastAckTimeout")?,
        udp_timeout: take(obj, "udpTimeout")?,
        max_flows: take(obj, "maxFlows")?,
        allow_host: take(obj, "allowHost")?,
        reserve_ports: take(obj, "reservePorts")?,
    })
}

/// The tap's name for the interface `ifname` (`CNI_IFNAME`): `tap.name`
/// if configured, else KubeVirt's names for a tap binding — `tap0` for the
/// pod's primary interface (`eth0`), `tap` + the name's tail for a
/// secondary one (`net1` → `tap1`, `pod16367aacb67` → `tap16367aacb67`).
/// The runtime passes the chain's interface name (`eth0`) to every plugin
/// of a conflist, so the tap can never simply take it.
pub fn tap_name(configured: Option<&str>, ifname: &str) -> String {
    if let Some(n) = configured {
        return n.to_owned();
    }
    if ifname == "eth0" {
        return "tap0".to_owned();
    }
    let tail = ifname.get(3..).filter(|t| !t.is_empty()).unwrap_or(ifname);
    let mut name = format!("tap{tail}");
    name.truncate(15);
    name
}

/// Parses `tapgate run --tap tap0 <flags>` with the daemon's own command
/// line; returns clap's first error line.
fn parse_run<'a>(
    flags: impl IntoIterator<Item = &'a (&'static str, &'static str, Option<String>)>,
) -> Result<Cli, String> {
    let mut argv: Vec<String> = ["tapgate", "run", "--tap", "tap0"]
        .map(String::from)
        .to_vec();
    for (_, flag, value) in flags {
        match value {
            // `--flag=value`: a value starting with `-` stays a value.
            Some(v) => argv.push(format!("{flag}={v}")),
            None => argv.push((*flag).to_owned()),
        }
    }
    Cli::try_parse_from(argv).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("invalid value").trim();
        first.strip_prefix("error: ").unwrap_or(first).to_owned()
    })
}

/// Checks the settings with `tapgate run`'s parsers; code 7 naming the key.
pub fn check_settings(s: &AttachSettings) -> Result<(), CniError> {
    if let Some(u) = &s.uplink {
        crate::cli::parse_ifname(u).map_err(|e| CniError::config("uplink", e))?;
    }
    let flags = crate::agent::settings::run_flags(s);
    for f in &flags {
        parse_run(std::iter::once(f)).map_err(|e| CniError::config(f.0, e))?;
    }
    let cli = parse_run(&flags).map_err(|e| CniError::config("settings", e))?;
    let Command::Run(args) = cli.command else {
        return Err(CniError::config("settings", "not a run command line"));
    };
    args.guest_config().map_err(|e| {
        let key = match &e {
            ConfigError::GuestAddress(..) | ConfigError::Prefix(_) => "address",
            ConfigError::OutsideSubnet { flag, .. } => flag,
        };
        CniError::config(key, e)
    })?;
    args.guest_config6().map_err(|e| {
        let key = match &e {
            crate::cli::Config6Error::Prefix(_) | crate::cli::Config6Error::GuestAddress(_) => {
                "address6"
            }
            crate::cli::Config6Error::OutsidePrefix { flag, .. } => flag,
        };
        CniError::config(key, e)
    })?;
    // Forwards: one table for both protocols, as the daemon builds it.
    // The pod's ephemeral range is not known here; Linux's default is
    // what it almost always is.
    let mut table = FwdTable::new();
    for (key, proto, specs) in [
        ("tcpPorts", Proto::Tcp, &s.tcp_ports),
        ("udpPorts", Proto::Udp, &s.udp_ports),
    ] {
        for spec in specs.iter().flatten() {
            table
                .add_spec(proto, spec, PortRange::LINUX_EPHEMERAL)
                .map_err(|e| CniError::config(key, e))?;
        }
    }
    Ok(())
}

/// The parts of `CNI_ARGS` the plugin uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `IgnoreUnknown` was set.
    pub ignore_unknown: bool,
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID`.
    pub infra_container_id: Option<String>,
    /// `K8S_POD_UID`.
    pub pod_uid: Option<String>,
}

impl CniArgs {
    /// Parses `K=V;K=V`. A pair without `=` is code 4; unknown keys are
    /// ignored (logged) whether or not `IgnoreUnknown` is set, since a
    /// tap plugin has no use for them and refusing would only break pods.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut args = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| CniError::env("CNI_ARGS", format!("{pair:?} is not KEY=VALUE")))?;
            let v = (!v.is_empty()).then(|| v.to_owned());
            match k {
                "IgnoreUnknown" => {
                    args.ignore_unknown =
                        matches!(v.as_deref(), Some("1" | "true" | "True" | "TRUE"));
                }
                "K8S_POD_NAMESPACE" => args.pod_namespace = v,
                "K8S_POD_NAME" => args.pod_name = v,
                "K8S_POD_INFRA_CONTAINER_ID" => args.infra_container_id = v,
                "K8S_POD_UID" => args.pod_uid = v,
                other => log::debug!("CNI_ARGS: ignoring {other}"),
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The block scalar under `config: |` of a NetworkAttachmentDefinition.
    fn nad_config(yaml: &str) -> String {
        let mut lines = yaml.lines().skip_while(|l| l.trim() != "config: |");
        let head = lines.next().unwrap_or_default();
        let indent = head.find("config").unwrap_or(0) + 2;
        lines
            .take_while(|l| {
                l.trim().is_empty() || l.len() > indent && l[..indent].trim().is_empty()
            })
            .map(|l| l.get(indent..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_shipped_network_attachment_definition_loads() {
        let yaml = include_str!("../../../deploy/network-attachment-definition.yaml");
        let text = nad_config(yaml);
        let c = NetConf::parse(text.as_bytes(), Validation::Full)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.name, "tapgate");
        assert_eq!((c.tap.owner, c.tap.group), (Some(107), Some(107)));
        assert_eq!(c.tap.mtu, None, "the pod's MTU by default");
        assert_eq!(c.settings.tcp_ports, Some(vec!["all".to_owned()]));
        assert_eq!(c.settings.reserve_ports, Some(false));
        // And the agent accepts exactly these settings.
        crate::agent::settings::run_args("tap0", &c.settings, crate::cli::LogLevel::Info)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn taps_are_named_as_kubevirt_expects() {
        assert_eq!(tap_name(None, "eth0"), "tap0");
        assert_eq!(tap_name(None, "net1"), "tap1");
        assert_eq!(tap_name(None, "pod16367aacb67"), "tap16367aacb67");
        assert_eq!(tap_name(None, "e0"), "tape0");
        assert_eq!(tap_name(Some("vmtap"), "eth0"), "vmtap");
    }

    const FULL: &str = r#"{"cniVersion":"1.0.0","name":"tapgate","type":"tapgate-cni",
      "agentSocket":"/run/tapgate/agent.sock",
      "tap":{"owner":107,"group":107,"mtu":1500,"multiQueue":false},
      "address":"10.0.2.15/24","gateway":"10.0.2.2","dns":"10.0.2.3","mac":"52:55:0a:00:02:02",
      "dhcpLease":86400,"dnsUpstream":"10.96.0.10","uplink":"eth0",
      "tcpPorts":["all"],"udpPorts":["all"],
      "keepaliveInterval":300,"inactivityInterval":7200,"keepaliveProbes":0,
      "lastAckTimeout":60,"udpTimeout":180,"maxFlows":65536,"allowHost":false,
      "runtimeConfig":{"portMappings":[]},"capabilities":{"portMappings":true},
      "ipam":{},"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}]},
      "args":{"cni":{"logicNetworkName":"default"}}}"#;

    fn with(key: &str, value: &str) -> Vec<u8> {
        let mut v: Value = serde_json::from_str(FULL).unwrap();
        let parsed: Value = serde_json::from_str(value).unwrap();
        match key.split_once('.') {
            Some((outer, inner)) => {
                v[outer][inner] = parsed;
            }
            None => {
                v[key] = parsed;
            }
        }
        serde_json::to_vec(&v).unwrap()
    }

    fn err(stdin: &[u8]) -> CniError {
        NetConf::parse(stdin, Validation::Full).unwrap_err()
    }

    #[test]
    fn full_config_parses() {
        let c = NetConf::parse(FULL.as_bytes(), Validation::Full).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.name, "tapgate");
        assert_eq!(c.network_name(), "default");
        assert_eq!(c.agent_socket, PathBuf::from("/run/tapgate/agent.sock"));
        assert_eq!(
            c.tap,
            TapConfig {
                name: None,
                owner: Some(107),
                group: Some(107),
                mtu: Some(1500),
                multi_queue: false
            }
        );
        assert_eq!(c.settings.dns.as_deref(), Some("10.0.2.3"));
        assert_eq!(c.settings.dhcp_lease, Some(86400));
        assert_eq!(c.settings.tcp_ports, Some(vec!["all".to_owned()]));
        assert_eq!(c.settings.max_flows, Some(65536));
        assert_eq!(c.settings.allow_host, Some(false));
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"net1","type":"tapgate-cni","dns":{"nameservers":["1.1.1.1"]}}"#,
            Validation::Full,
        )
        .unwrap();
        assert_eq!(c.network_name(), "net1");
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.settings, AttachSettings::default());
        assert_eq!(c.tap, TapConfig::default());
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn each_bad_key_is_code_7_naming_it() {
        let cases = [
            ("address", r#""10.0.2.15""#),
            ("address", r#""10.0.2.0/24""#),
            ("gateway", r#""10.0.3.2""#),
            ("gateway", r#""nope""#),
            ("dns", r#""10.0.2.15""#),
            ("dns", "3"),
            ("mac", r#""01:00:5e:00:00:01""#),
            ("mac", r#""52:55""#),
            ("dhcpLease", "1"),
            ("dhcpLease", "-5"),
            ("dhcpLease", r#""86400""#),
            ("dnsUpstream", r#""resolver""#),
            ("uplink", r#""eth 0""#),
            ("tcpPorts", r#"["80:"]"#),
            ("tcpPorts", r#""all""#),
            ("udpPorts", r#"["0"]"#),
            ("keepaliveInterval", "1.5"),
            ("inactivityInterval", "-1"),
            ("keepaliveProbes", "true"),
            ("lastAckTimeout", "0"),
            ("udpTimeout", "0"),
            ("maxFlows", "8"),
            ("maxFlows", "99999999"),
            ("allowHost", r#""yes""#),
            ("address6", r#""fd00::15""#),
            ("address6", r#""fe80::15/64""#),
            ("gateway6", r#""fd01::2""#),
            ("dns6", r#""nope""#),
            ("dnsSearch", r#""example.com""#),
            ("dnsSearch", r#"["bad domain"]"#),
            ("ipv6", r#""no""#),
            ("agentSocket", r#""run/agent.sock""#),
            ("agentSocket", "1"),
            ("name", r#""-bad""#),
            ("name", "null"),
            ("tap", "[]"),
            ("tap.owner", "-1"),
            ("tap.group", r#""kvm""#),
            ("tap.mtu", "70000"),
            ("tap.mtu", "20"),
            ("tap.multiQueue", "1"),
            ("tap.ownr", "107"),
            ("prevResult", "[]"),
            ("cniVersion", "null"),
            ("args.cni", r#"{"logicNetworkName":5}"#),
        ];
        for (key, value) in cases {
            let e = err(&with(key, value));
            assert_eq!(e.code, Code::InvalidConfig, "{key}={value}: {e}");
            let shown = match key {
                "args.cni" => "args.cni.logicNetworkName",
                k => k,
            };
            assert!(
                e.details.starts_with(&format!("{shown}:")),
                "{key}={value}: {}",
                e.details
            );
        }
    }

    #[test]
    fn forwards_conflicting_across_specs_are_refused() {
        let e = err(&with("tcpPorts", r#"["8080:80","8080:81"]"#));
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.details.starts_with("tcpPorts:"), "{}", e.details);
        assert!(NetConf::parse(&with("tcpPorts", r#"["none"]"#), Validation::Full).is_ok());
        assert!(
            NetConf::parse(
                &with("tcpPorts", r#"["8080:80","1-1024,~22"]"#),
                Validation::Full
            )
            .is_ok()
        );
    }

    #[test]
    fn unknown_version_is_code_1() {
        for v in [r#""0.3.1""#, r#""2.0.0""#, r#""1.1""#] {
            let e = err(&with("cniVersion", v));
            assert_eq!(e.code, Code::IncompatibleVersion, "{v}");
            // Also under lenient decoding.
            let e = NetConf::parse(&with("cniVersion", v), Validation::Lenient).unwrap_err();
            assert_eq!(e.code, Code::IncompatibleVersion);
        }
    }

    #[test]
    fn garbage_is_code_6() {
        for stdin in [
            &b"not json"[..],
            b"",
            b"[1,2]",
            b"\"x\"",
            b"{\"cniVersion\":",
        ] {
            assert_eq!(err(stdin).code, Code::Decode);
        }
    }

    #[test]
    fn lenient_ignores_settings() {
        let c = NetConf::parse(&with("tap.mtu", "1"), Validation::Lenient).unwrap();
        assert_eq!(c.network_name(), "default");
        assert_eq!(c.settings, AttachSettings::default());
    }

    #[test]
    fn valid_attachments_are_read() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":
                [{"containerID":"c1","ifname":"tap0"},{"containerID":"c2","ifname":"tap1"}]}"#,
            Validation::Lenient,
        )
        .unwrap();
        let v = c.valid_attachments.unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].container_id, "c2");
        let e = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"ifname":"tap0"}]}"#,
            Validation::Lenient,
        )
        .unwrap_err();
        assert!(e.details.starts_with("cni.dev/valid-attachments:"));
    }

    #[test]
    fn run_flags_cover_every_setting() {
        let c = NetConf::parse(&with("allowHost", "true"), Validation::Full).unwrap();
        let keys: Vec<_> = crate::agent::settings::run_flags(&c.settings)
            .iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(keys.len(), 14, "{keys:?}");
        assert!(keys.contains(&"allowHost"));
    }

    #[test]
    fn cni_args() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=vm-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;OTHER=x",
        )
        .unwrap();
        assert!(a.ignore_unknown);
        assert_eq!(a.pod_namespace.as_deref(), Some("ns"));
        assert_eq!(a.pod_name.as_deref(), Some("vm-1"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc"));
        assert_eq!(a.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        assert_eq!(CniArgs::parse("K8S_POD_NAME=;").unwrap().pod_name, None);
        let e = CniArgs::parse("IgnoreUnknown=1;garbage").unwrap_err();
        assert_eq!(e.code, Code::InvalidEnv);
        assert!(e.details.starts_with("CNI_ARGS:"));
    }

    #[test]
    fn sniffs_version() {
        assert_eq!(sniff_version(FULL.as_bytes()), Some(CniVersion::V1_0_0));
        assert_eq!(sniff_version(b"{\"cniVersion\":\"9\"}"), None);
        assert_eq!(sniff_version(b"junk"), None);
    }
}
