//! Prometheus metrics: one exposition for `tapgate run --metrics` and for
//! the node agent's `/metrics`.
//!
//! # Theory of operation
//!
//! The counters live where they are counted — the kernel's per-CPU array,
//! the flow manager, the guest services — and a daemon already gathers
//! them into one document for `tapgate stats --json`. A scrape asks each
//! datapath for that document (on its own thread, see `daemon::Query`)
//! and turns it into metric families here, labelled per attachment
//! (`namespace`, `pod`, `interface`), with the `prometheus-client` crate
//! doing the exposition (OpenMetrics text, which Prometheus negotiates
//! and parses). Building the families afresh per scrape keeps one source
//! of truth: what `tapgate stats` prints is what Prometheus records.
//!
//! The agent's own metrics ([`AgentMetrics`]: API requests by verb and
//! result, attachment set-up latency) are long-lived families registered
//! into every scrape's registry.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde_json::Value;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels identifying one datapath.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Target {
    /// The pod's namespace (empty for `tapgate run`).
    pub namespace: String,
    /// The pod's name (empty for `tapgate run`).
    pub pod: String,
    /// The tap.
    pub interface: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WithKind {
    namespace: String,
    pod: String,
    interface: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IcmpLabels {
    namespace: String,
    pod: String,
    interface: String,
    direction: String,
    action: String,
    kind: String,
}

/// Labels of the API request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `create`, `get`, `list`, `delete`, `gc`.
    pub verb: String,
    /// `ok`, `not_found`, `conflict`, `bad_request`, `error`.
    pub result: String,
}

/// Labels of the attachments gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The attachment phase.
    pub phase: String,
}

/// The agent's own, long-lived metrics.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// API requests by verb and result.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from a create request to a serving datapath, seconds.
    pub setup_seconds: Histogram,
    /// Attachments by phase, set at each scrape.
    pub attachments: Family<PhaseLabels, Gauge>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            setup_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            attachments: Family::default(),
        }
    }
}

impl AgentMetrics {
    /// Counts one API request.
    pub fn request(&self, verb: &str, result: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                verb: verb.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }
}

/// Per-datapath families, filled from stats documents.
#[derive(Default)]
struct Datapaths {
    fast_packets: Family<Target, Counter<u64, AtomicU64>>,
    fast_bytes: Family<Target, Counter<u64, AtomicU64>>,
    slow_packets: Family<Target, Counter<u64, AtomicU64>>,
    slow_bytes: Family<Target, Counter<u64, AtomicU64>>,
    punts: Family<WithKind, Counter<u64, AtomicU64>>,
    kernel_drops: Family<WithKind, Counter<u64, AtomicU64>>,
    flows_active: Family<WithKind, Gauge>,
    flows_opened: Family<Target, Counter<u64, AtomicU64>>,
    flows_closed: Family<WithKind, Counter<u64, AtomicU64>>,
    keepalives: Family<Target, Counter<u64, AtomicU64>>,
    resets: Family<WithKind, Counter<u64, AtomicU64>>,
    icmp: Family<IcmpLabels, Counter<u64, AtomicU64>>,
    dhcp_replies: Family<Target, Counter<u64, AtomicU64>>,
    arp_replies: Family<Target, Counter<u64, AtomicU64>>,
    drops: Family<WithKind, Counter<u64, AtomicU64>>,
    adopted: Family<Target, Gauge>,
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Datapaths {
    fn add(&self, t: &Target, s: &Value) {
        let kind = |k: &str| WithKind {
            namespace: t.namespace.clone(),
            pod: t.pod.clone(),
            interface: t.interface.clone(),
            kind: k.to_owned(),
        };
        self.fast_packets
            .get_or_create(t)
            .inc_by(num(s, &["fastpath_packets"]));
        self.fast_bytes
            .get_or_create(t)
            .inc_by(num(s, &["fastpath_bytes"]));
        self.slow_packets
            .get_or_create(t)
            .inc_by(num(s, &["kernel", "punt_packets"]));
        self.slow_bytes
            .get_or_create(t)
            .inc_by(num(s, &["kernel", "punt_bytes"]));
        if let Some(punts) = s.get("punts").and_then(Value::as_object) {
            for (reason, n) in punts {
                self.punts
                    .get_or_create(&kind(reason))
                    .inc_by(n.as_u64().unwrap_or(0));
            }
        }
        for k in [
            "punt_ring_full",
            "punt_oversize",
            "redirect_error",
            "event_ring_full",
        ] {
            self.kernel_drops
                .get_or_create(&kind(k))
                .inc_by(num(s, &["kernel", k]));
        }
        let tcp = num(s, &["flows", "tcp_active"]);
        let icmp = num(s, &["flows", "icmp_active"]);
        let udp = num(s, &["flows", "udp_active"]).saturating_sub(icmp);
        for (p, n) in [("tcp", tcp), ("udp", udp), ("icmp", icmp)] {
            self.flows_active.get_or_create(&kind(p)).set(gauge(n));
        }
        self.flows_opened
            .get_or_create(t)
            .inc_by(num(s, &["flows", "created"]));
        for (k, path) in [
            ("clean", "tcp_closed_cleanly"),
            ("handshake_timeout", "handshake_timeouts"),
            ("last_ack_timeout", "last_ack_timeouts"),
            ("udp_expired", "udp_expired"),
        ] {
            self.flows_closed
                .get_or_create(&kind(k))
                .inc_by(num(s, &["flows", path]));
        }
        self.keepalives
            .get_or_create(t)
            .inc_by(num(s, &["keepalives_sent"]));
        for (k, path) in [
            ("inactivity", "inactivity_resets"),
            ("probes", "probe_resets"),
            ("rst_answer", "rst_answer_resets"),
        ] {
            self.resets.get_or_create(&kind(k)).inc_by(num(s, &[path]));
        }
        self.resets
            .get_or_create(&kind("rst_sent"))
            .inc_by(num(s, &["flows", "rsts_sent"]));
        if let Some(icmp) = s.get("icmp") {
            for (group, direction, action) in [
                ("sent_to_guest", "to_guest", "sent"),
                ("sent_to_world", "to_world", "sent"),
                ("translated_to_guest", "to_guest", "translated"),
                ("translated_to_world", "to_world", "translated"),
            ] {
                if let Some(kinds) = icmp.get(group).and_then(Value::as_object) {
                    // Only kinds that happened: most of the 52 never do.
                    for (k, n) in kinds.iter().filter(|(_, n)| n.as_u64() != Some(0)) {
                        self.icmp
                            .get_or_create(&IcmpLabels {
                                namespace: t.namespace.clone(),
                                pod: t.pod.clone(),
                                interface: t.interface.clone(),
                                direction: direction.to_owned(),
                                action: action.to_owned(),
                                kind: k.clone(),
                            })
                            .inc_by(n.as_u64().unwrap_or(0));
                    }
                }
            }
        }
        self.dhcp_replies
            .get_or_create(t)
            .inc_by(num(s, &["services", "dhcp_replies"]));
        self.arp_replies
            .get_or_create(t)
            .inc_by(num(s, &["services", "arp_replies"]));
        if let Some(drops) = s
            .get("flows")
            .and_then(|f| f.get("drops"))
            .and_then(Value::as_object)
        {
            for (reason, n) in drops {
                let n = n.as_u64().unwrap_or(0);
                if n > 0 {
                    self.drops.get_or_create(&kind(reason)).inc_by(n);
                }
            }
        }
        self.adopted
            .get_or_create(t)
            .set(gauge(num(s, &["flows", "adopted"])));
    }

    fn register(self, r: &mut Registry) {
        r.register(
            "tapgate_fastpath_packets",
            "Packets forwarded by the kernel fast path",
            self.fast_packets,
        );
        r.register(
            "tapgate_fastpath_bytes",
            "Bytes forwarded by the kernel fast path",
            self.fast_bytes,
        );
        r.register(
            "tapgate_slowpath_packets",
            "Packets handed to user space (punted)",
            self.slow_packets,
        );
        r.register(
            "tapgate_slowpath_bytes",
            "Bytes handed to user space (punted)",
            self.slow_bytes,
        );
        r.register(
            "tapgate_punts",
            "Punted packets and events by reason",
            self.punts,
        );
        r.register(
            "tapgate_kernel_drops",
            "Packets or events the kernel could not hand over",
            self.kernel_drops,
        );
        r.register(
            "tapgate_flows_active",
            "Flows in the table by protocol",
            self.flows_active,
        );
        r.register("tapgate_flows_opened", "Flows installed", self.flows_opened);
        r.register(
            "tapgate_flows_closed",
            "Flows removed, by how",
            self.flows_closed,
        );
        r.register(
            "tapgate_keepalives_sent",
            "Keepalives sent to idle guests",
            self.keepalives,
        );
        r.register(
            "tapgate_resets",
            "TCP resets by cause (inactivity, dead-guest probes, an RST answering a keepalive, RSTs sent)",
            self.resets,
        );
        r.register(
            "tapgate_icmp_messages",
            "ICMP errors the gateway sent or translated",
            self.icmp,
        );
        r.register(
            "tapgate_dhcp_replies",
            "DHCP replies sent to the guest",
            self.dhcp_replies,
        );
        r.register(
            "tapgate_arp_replies",
            "ARP replies sent to the guest",
            self.arp_replies,
        );
        r.register(
            "tapgate_slowpath_drops",
            "Packets the slow path dropped, by reason",
            self.drops,
        );
        r.register(
            "tapgate_flows_adopted",
            "Flows rebuilt from a datapath adopted at start-up",
            self.adopted,
        );
    }
}

/// The exposition of `datapaths` (each a target and its stats document)
/// and, for the agent, of its own metrics.
pub fn render(datapaths: &[(Target, Value)], agent: Option<&AgentMetrics>) -> String {
    let mut registry = Registry::default();
    let families = Datapaths::default();
    for (t, s) in datapaths {
        families.add(t, s);
    }
    families.register(&mut registry);
    if let Some(a) = agent {
        registry.register(
            "tapgate_agent_api_requests",
            "Agent API requests by verb and result",
            a.requests.clone(),
        );
        registry.register(
            "tapgate_agent_attachment_setup_seconds",
            "Time to set up (or adopt) an attachment",
            a.setup_seconds.clone(),
        );
        registry.register(
            "tapgate_agent_attachments",
            "Attachments held by the agent, by phase",
            a.attachments.clone(),
        );
    }
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry) {
        log::warn!("encoding metrics: {e}");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stats_become_labelled_families() {
        let t = Target {
            namespace: "vms".into(),
            pod: "virt-launcher-a".into(),
            interface: "tap0".into(),
        };
        let stats = json!({
            "fastpath_packets": 10, "fastpath_bytes": 1500,
            "punts": {"handshake": 3},
            "kernel": {"punt_packets": 4, "punt_bytes": 240, "punt_ring_full": 0},
            "keepalives_sent": 2, "inactivity_resets": 1,
            "flows": {"tcp_active": 2, "udp_active": 1, "icmp_active": 0, "created": 5},
            "services": {"dhcp_replies": 2},
            "icmp": {"sent_to_guest": {"port_unreachable": 1}},
        });
        let agent = AgentMetrics::default();
        agent.request("create", "ok");
        agent.setup_seconds.observe(0.02);
        let text = render(&[(t, stats)], Some(&agent));
        let has = |l: &str| assert!(text.lines().any(|x| x == l), "{l}\n{text}");
        has(
            r#"tapgate_fastpath_packets_total{namespace="vms",pod="virt-launcher-a",interface="tap0"} 10"#,
        );
        has(
            r#"tapgate_slowpath_bytes_total{namespace="vms",pod="virt-launcher-a",interface="tap0"} 240"#,
        );
        has(
            r#"tapgate_punts_total{namespace="vms",pod="virt-launcher-a",interface="tap0",kind="handshake"} 3"#,
        );
        has(
            r#"tapgate_flows_active{namespace="vms",pod="virt-launcher-a",interface="tap0",kind="tcp"} 2"#,
        );
        has(
            r#"tapgate_dhcp_replies_total{namespace="vms",pod="virt-launcher-a",interface="tap0"} 2"#,
        );
        has(r#"tapgate_agent_api_requests_total{verb="create",result="ok"} 1"#);
        assert!(text.contains("tapgate_agent_attachment_setup_seconds_bucket"));
        assert!(text.ends_with("# EOF\n"));
    }
}
