//! An attachment's settings as `tapgate run` arguments.
//!
//! # Theory of operation
//!
//! An attachment is exactly a `tapgate run` on the pod's tap, so its
//! settings ([`AttachSettings`], from the CNI network configuration) are
//! turned into the command line `tapgate run` would get and parsed by the
//! same clap definitions: every value is checked by the same parsers, and
//! an error names the flag the setting maps to. The node agent's defaults
//! differ from `tapgate run`'s in two places: every TCP and UDP port of
//! the pod's address is forwarded to the VM unless the settings say
//! otherwise (KubeVirt's masquerade binding does the same), and the flow
//! limit is per attachment ([`DEFAULT_AGENT_MAX_FLOWS`]), since one node
//! serves many guests.

use clap::Parser;

use super::api::AttachSettings;
use crate::cli::{Cli, Command, LogLevel, RunArgs};

/// Default flow limit of one attachment.
pub const DEFAULT_AGENT_MAX_FLOWS: u32 = 16_384;

/// The `tapgate run` arguments for serving `ifname` with `settings`.
pub fn run_args(ifname: &str, s: &AttachSettings, log: LogLevel) -> Result<RunArgs, String> {
    let mut argv: Vec<String> = vec![
        "tapgate".into(),
        "run".into(),
        "--tap".into(),
        ifname.into(),
    ];
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            argv.push(format!("--{name}"));
            argv.push(v);
        }
    };
    flag("uplink", s.uplink.clone());
    flag("address", s.address.clone());
    flag("gateway", s.gateway.clone());
    flag("dns", s.dns.clone());
    flag("mac", s.mac.clone());
    flag("dhcp-lease", s.dhcp_lease.map(|v| v.to_string()));
    flag("dns-upstream", s.dns_upstream.clone());
    flag(
        "keepalive-interval",
        s.keepalive_interval.map(|v| v.to_string()),
    );
    flag(
        "inactivity-interval",
        s.inactivity_interval.map(|v| v.to_string()),
    );
    flag(
        "keepalive-probes",
        s.keepalive_probes.map(|v| v.to_string()),
    );
    flag(
        "last-ack-timeout",
        s.last_ack_timeout.map(|v| v.to_string()),
    );
    flag("udp-timeout", s.udp_timeout.map(|v| v.to_string()));
    flag(
        "max-flows",
        Some(s.max_flows.unwrap_or(DEFAULT_AGENT_MAX_FLOWS).to_string()),
    );
    let level = match log {
        LogLevel::Off => "off",
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    flag("log-level", Some(level.into()));
    let all = vec!["all".to_owned()];
    for (short, specs) in [("-t", &s.tcp_ports), ("-u", &s.udp_ports)] {
        for spec in specs.as_ref().unwrap_or(&all) {
            if spec != "none" {
                argv.push(short.into());
                argv.push(spec.clone());
            }
        }
    }
    if s.allow_host == Some(true) {
        argv.push("--allow-host".into());
    }
    if s.reserve_ports != Some(true) {
        argv.push("--no-reserve-ports".into());
    }
    let cli = Cli::try_parse_from(&argv).map_err(|e| {
        // clap's first line names the flag and the value.
        let text = e.to_string();
        text.lines()
            .next()
            .unwrap_or("invalid settings")
            .trim_start_matches("error: ")
            .to_owned()
    })?;
    let Command::Run(args) = cli.command else {
        return Err("internal error: not a run command".into());
    };
    args.guest_config().map_err(|e| e.to_string())?;
    args.forwards(crate::fwd::host_ephemeral_range())
        .map_err(|e| format!("port forwarding rules: {e}"))?;
    Ok(args)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_forward_everything_with_a_per_attachment_limit() {
        let a = run_args("tap0", &AttachSettings::default(), LogLevel::Info).unwrap();
        assert_eq!(a.tap, "tap0");
        assert_eq!(a.tcp_ports, vec!["all"]);
        assert_eq!(a.udp_ports, vec!["all"]);
        assert_eq!(a.max_flows, DEFAULT_AGENT_MAX_FLOWS);
        assert_eq!(a.keepalive_interval, 300);
        assert!(a.no_reserve_ports);
    }

    #[test]
    fn settings_map_onto_flags() {
        let s = AttachSettings {
            address: Some("192.168.100.10/24".into()),
            gateway: Some("192.168.100.1".into()),
            dns: Some("192.168.100.3".into()),
            tcp_ports: Some(vec!["8080:80".into(), "22".into()]),
            udp_ports: Some(vec!["none".into()]),
            keepalive_interval: Some(30),
            inactivity_interval: Some(600),
            allow_host: Some(true),
            ..AttachSettings::default()
        };
        let a = run_args("tap1", &s, LogLevel::Debug).unwrap();
        assert_eq!(a.tcp_ports, vec!["8080:80", "22"]);
        assert!(a.udp_ports.is_empty());
        assert_eq!((a.keepalive_interval, a.inactivity_interval), (30, 600));
        assert!(a.allow_host);
        assert_eq!(a.log_level, LogLevel::Debug);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let bad = |s: AttachSettings| run_args("tap0", &s, LogLevel::Info).unwrap_err();
        let e = bad(AttachSettings {
            address: Some("10.0.2.300/24".into()),
            ..AttachSettings::default()
        });
        assert!(e.contains("--address"), "{e}");
        let e = bad(AttachSettings {
            gateway: Some("192.168.1.1".into()),
            ..AttachSettings::default()
        });
        assert!(e.contains("--gateway"), "{e}");
        let e = bad(AttachSettings {
            tcp_ports: Some(vec!["100-90".into()]),
            ..AttachSettings::default()
        });
        assert!(e.contains("reversed"), "{e}");
        let e = bad(AttachSettings {
            max_flows: Some(1),
            ..AttachSettings::default()
        });
        assert!(e.contains("--max-flows"), "{e}");
    }
}
