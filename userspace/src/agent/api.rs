//! The node agent's HTTP+JSON API: request and response bodies.
//!
//! # Theory of operation
//!
//! `tapgate agent` listens on a UNIX socket (default
//! [`DEFAULT_AGENT_SOCKET`]); the CNI plugin, the tests and operators talk
//! HTTP/1.1 + JSON to it. These types are the whole contract, shared by the
//! server (`agent::server`) and the client (`agent::client`), so the two
//! cannot drift apart. Field names are camelCase, as in CNI configuration.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `POST /v1/attachments` | [`AttachRequest`] | 201 [`Attachment`] (200 if the same attachment already exists; 409 if it exists with other settings) |
//! | `GET /v1/attachments` | | 200 [`AttachmentList`] |
//! | `GET /v1/attachments/{containerId}/{ifname}` | | 200 [`Attachment`] with `stats`, 404 |
//! | `DELETE /v1/attachments/{containerId}/{ifname}` | | 200 [`Deleted`], 404 when there is none |
//! | `POST /v1/gc` | [`GcRequest`] | 200 [`GcResponse`] |
//! | `GET /healthz` | | 200 `ok` |
//! | `GET /metrics` | | Prometheus text exposition |
//!
//! Every error is a status code with an [`ApiError`] body.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the agent listens by default.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/tapgate/agent.sock";

/// An attachment's identity: the CNI container id and interface name (the
/// tap), as in the CNI spec's `(CNI_CONTAINERID, CNI_IFNAME)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentId {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`: the tap the plugin created in the pod.
    pub ifname: String,
}

impl AttachmentId {
    /// Checks both parts: a container id is 1–128 characters of
    /// `[A-Za-z0-9_.-]` (it becomes part of bpffs and file paths and
    /// URLs), an interface name what the kernel accepts.
    pub fn validate(&self) -> Result<(), String> {
        let cid_ok = (1..=128).contains(&self.container_id.len())
            && self
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            && !self.container_id.starts_with('.');
        if !cid_ok {
            return Err(format!(
                "container id {:?}: 1-128 characters of A-Z a-z 0-9 _ . - (not starting with a dot)",
                self.container_id
            ));
        }
        crate::cli::parse_ifname(&self.ifname).map(|_| ())
    }

    /// `containerId/ifname`, the attachment's path below
    /// `/v1/attachments/` and its directory name in state and pin
    /// directories.
    pub fn path(&self) -> String {
        format!("{}/{}", self.container_id, self.ifname)
    }
}

impl std::fmt::Display for AttachmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// `POST /v1/attachments`: serve the tap `ifname` in the network namespace
/// `netns`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachRequest {
    /// Which attachment.
    #[serde(flatten)]
    pub id: AttachmentId,
    /// The pod's network namespace (`CNI_NETNS`), a path the agent can
    /// open (`/run/netns/...`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// `K8S_POD_NAMESPACE`, for metrics labels and listings.
    #[serde(default)]
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    #[serde(default)]
    pub pod_name: Option<String>,
    /// The network's name (the CNI config's `name`, or Multus's
    /// `args.cni.logicNetworkName`).
    #[serde(default)]
    pub network: Option<String>,
    /// How to serve the guest.
    #[serde(default)]
    pub settings: AttachSettings,
}

/// tapgate's settings for one attachment: the flags of `tapgate run`,
/// carried in the CNI network configuration. Absent fields take
/// `tapgate run`'s defaults, except the forwards: by default every TCP
/// and UDP port of the pod's address (outside its ephemeral range) goes
/// to the guest, as KubeVirt's masquerade binding does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachSettings {
    /// The pod's interface towards the world; absent = the netns's IPv4
    /// default route interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// Guest address and prefix (`10.0.2.15/24`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Gateway address (`10.0.2.2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// DNS address handed to the guest (`10.0.2.3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// The gateway's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `--address6`: the guest's IPv6 address and prefix (`fd00::15/64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<String>,
    /// `--gateway6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<String>,
    /// `--dns6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns6: Option<String>,
    /// `--dns-search`, one per domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_search: Option<Vec<String>>,
    /// `false` = `--no-ipv6`: serve the guest no IPv6 at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// DHCP lease time in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_lease: Option<u32>,
    /// Resolver behind the DNS address (absent: the agent's own
    /// `/etc/resolv.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_upstream: Option<String>,
    /// TCP forwarding SPECs (`-t` syntax); absent = `["all"]`, `["none"]`
    /// for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_ports: Option<Vec<String>>,
    /// UDP forwarding SPECs (`-u` syntax); absent = `["all"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_ports: Option<Vec<String>>,
    /// `--keepalive-interval` in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_interval: Option<u64>,
    /// `--inactivity-interval` in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity_interval: Option<u64>,
    /// `--keepalive-probes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_probes: Option<u32>,
    /// `--last-ack-timeout` in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack_timeout: Option<u64>,
    /// `--udp-timeout` in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_timeout: Option<u64>,
    /// Per-attachment flow limit (`--max-flows`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<u32>,
    /// `--allow-host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_host: Option<bool>,
    /// Hold the forwarded ports with sockets in the pod (default false:
    /// the pod's network namespace is the VM's; see `--no-reserve-ports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_ports: Option<bool>,
}

/// What the agent reports about one attachment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// Which attachment.
    #[serde(flatten)]
    pub id: AttachmentId,
    /// The pod's network namespace.
    pub netns: PathBuf,
    /// Pod namespace, if known.
    pub pod_namespace: Option<String>,
    /// Pod name, if known.
    pub pod_name: Option<String>,
    /// Network name, if known.
    pub network: Option<String>,
    /// The settings it was created with.
    pub settings: AttachSettings,
    /// `starting`, `running`, `failed` or `stopped`.
    pub phase: Phase,
    /// The uplink in use, once running.
    pub uplink: Option<String>,
    /// Whether this process adopted a datapath a previous agent left
    /// pinned (restart without loss) rather than creating it.
    pub adopted: bool,
    /// Why it failed or stopped, if it did.
    pub error: Option<String>,
    /// The datapath's counters (`tapgate stats --json`), on `GET` of one
    /// attachment only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
}

/// An attachment's life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Its datapath is being set up (or adopted).
    Starting,
    /// Serving the guest.
    Running,
    /// Set-up failed or the datapath stopped on an error.
    Failed,
    /// Its tap or netns went away; resources released.
    Stopped,
}

/// `GET /v1/attachments`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttachmentList {
    /// Every attachment the agent holds.
    pub attachments: Vec<Attachment>,
}

/// `DELETE /v1/attachments/...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The attachment that was removed.
    pub deleted: AttachmentId,
}

/// `POST /v1/gc`: remove every attachment not in `valid` (CNI GC's
/// `cni.dev/valid-attachments`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcRequest {
    /// The attachments to keep.
    pub valid: Vec<AttachmentId>,
    /// Only consider attachments of this network (`None`: all).
    #[serde(default)]
    pub network: Option<String>,
}

/// The answer to `POST /v1/gc`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResponse {
    /// The attachments that were removed.
    pub removed: Vec<AttachmentId>,
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// One line saying what went wrong.
    pub error: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        let id = |c: &str, i: &str| AttachmentId {
            container_id: c.into(),
            ifname: i.into(),
        };
        assert!(id("0123abcdef", "tap0").validate().is_ok());
        assert!(id("k8s_pod-1.x", "tap0").validate().is_ok());
        assert!(id("", "tap0").validate().is_err());
        assert!(id("../etc", "tap0").validate().is_err());
        assert!(id(".hidden", "tap0").validate().is_err());
        assert!(id("a/b", "tap0").validate().is_err());
        assert!(id("abc", "tap0/x").validate().is_err());
        assert!(id("abc", "").validate().is_err());
        assert!(id(&"a".repeat(129), "tap0").validate().is_err());
    }

    #[test]
    fn request_round_trips_in_camel_case() {
        let text = r#"{"containerId":"c1","ifname":"tap0","netns":"/run/netns/x",
            "podNamespace":"ns","podName":"vm","settings":{"tcpPorts":["8080:80"],
            "keepaliveInterval":30}}"#;
        let r: AttachRequest = serde_json::from_str(text).unwrap();
        assert_eq!(r.id.container_id, "c1");
        assert_eq!(r.settings.tcp_ports, Some(vec!["8080:80".to_owned()]));
        assert_eq!(r.settings.keepalive_interval, Some(30));
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["podName"], "vm");
        assert!(back["settings"].get("udpPorts").is_none());
    }

    #[test]
    fn unknown_settings_are_refused() {
        let text =
            r#"{"containerId":"c1","ifname":"tap0","netns":"/x","settings":{"tcpPortz":[]}}"#;
        assert!(serde_json::from_str::<AttachRequest>(text).is_err());
    }
}
