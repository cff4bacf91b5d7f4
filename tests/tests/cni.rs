//! End-to-end tests of `tapgate-cni` that need no agent: the binary is run
//! exactly as a runtime runs it (environment, stdin, stdout, exit status).
//!
//! VERSION; a bad configuration (code 7 naming the key); an unknown
//! `cniVersion` (code 1); STATUS with no agent listening (code 50); DEL
//! when the namespace is gone, twice in a row and with no agent (all
//! success, and the tap is removed); ADD with no agent (code 11, and the
//! tap it created is removed again); an interface of the tap's name that
//! is not a tap (refused by ADD, left alone by DEL).
//!
//! They need root (namespaces, taps); run them with `cargo xtask test`.
#![allow(clippy::unwrap_used)]

use anyhow::Result;
use tapgate_tests::cni::{CniCall, POD_MTU, PodNet, tapgate_cni_bin};
use tapgate_tests::scratch::ScratchDir;
use tapgate_tests::{Netns, require_root};

fn conf(version: &str, socket: &str, extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"{version}","name":"tapgate","type":"tapgate-cni",
            "agentSocket":"{socket}"{extra}}}"#
    )
}

/// A socket path in a fresh directory where nothing listens.
fn dead_socket() -> Result<(ScratchDir, String)> {
    let dir = ScratchDir::new("cni")?;
    let sock = dir.join("agent.sock").to_string_lossy().into_owned();
    Ok((dir, sock))
}

#[test]
fn version() -> Result<()> {
    let out = CniCall::new("VERSION", r#"{"cniVersion":"1.1.0"}"#).run(&tapgate_cni_bin()?)?;
    assert_eq!(out.code, Some(0), "{out}");
    let v = out.json()?;
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.4.0", "1.0.0", "1.1.0"])
    );
    Ok(())
}

#[test]
fn bad_config_is_code_7_naming_the_key() -> Result<()> {
    require_root()?;
    let (_dir, sock) = dead_socket()?;
    let pod = Netns::new("pod")?;
    for (extra, key) in [
        (r#","tap":{"owner":107,"mtu":"big"}"#, "tap.mtu"),
        (r#","address":"10.0.2.15""#, "address"),
        (r#","tcpPorts":["80:"]"#, "tcpPorts"),
        (r#","maxFlows":1"#, "maxFlows"),
    ] {
        let out = CniCall::new("ADD", &conf("1.0.0", &sock, extra))
            .container("c1", &pod.path(), "tap0")
            .run(&tapgate_cni_bin()?)?;
        let v = out.expect_error(7)?;
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(
            v["details"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{key}:")),
            "{out}"
        );
    }
    // Garbage is a decode failure.
    let out = CniCall::new("ADD", "{not json")
        .container("c1", &pod.path(), "tap0")
        .run(&tapgate_cni_bin()?)?;
    out.expect_error(6)?;
    Ok(())
}

#[test]
fn unknown_version_is_code_1() -> Result<()> {
    let (_dir, sock) = dead_socket()?;
    for cmd in ["ADD", "DEL", "CHECK"] {
        let out = CniCall::new(cmd, &conf("0.2.0", &sock, ""))
            .container("c1", "/run/netns/none", "tap0")
            .run(&tapgate_cni_bin()?)?;
        out.expect_error(1)?;
    }
    Ok(())
}

#[test]
fn status_with_the_agent_down_is_code_50() -> Result<()> {
    let (_dir, sock) = dead_socket()?;
    let out = CniCall::new("STATUS", &conf("1.1.0", &sock, "")).run(&tapgate_cni_bin()?)?;
    let v = out.expect_error(50)?;
    assert!(v["details"].as_str().unwrap().contains(&sock), "{out}");
    Ok(())
}

#[test]
fn del_with_the_netns_gone_succeeds() -> Result<()> {
    require_root()?;
    let (_dir, sock) = dead_socket()?;
    let path = {
        let ns = Netns::new("gone")?;
        ns.path()
    };
    let out = CniCall::new("DEL", &conf("1.0.0", &sock, ""))
        .container("c1", &path, "tap0")
        .run(&tapgate_cni_bin()?)?;
    out.expect_silent_success()?;
    // No CNI_NETNS at all is fine too.
    let mut call = CniCall::new("DEL", &conf("1.0.0", &sock, ""));
    call.container_id = Some("c1".into());
    call.ifname = Some("tap0".into());
    call.run(&tapgate_cni_bin()?)?.expect_silent_success()?;
    Ok(())
}

#[test]
fn del_twice_without_agent_removes_the_tap() -> Result<()> {
    require_root()?;
    let (_dir, sock) = dead_socket()?;
    let pod = PodNet::new()?;
    pod.pod
        .ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
    assert!(pod.link("tap0")?.is_some());
    for round in 0..2 {
        let out = CniCall::new("DEL", &conf("1.0.0", &sock, ""))
            .container("c1", &pod.netns_path(), "tap0")
            .run(&tapgate_cni_bin()?)?;
        out.expect_silent_success()?;
        if round == 0 {
            assert!(
                out.stderr.contains("unreachable"),
                "DEL should log that the agent is unreachable: {out}"
            );
        }
        assert!(pod.link("tap0")?.is_none(), "tap0 still there: {out}");
    }
    Ok(())
}

#[test]
fn add_without_agent_is_code_11_and_leaves_no_tap() -> Result<()> {
    require_root()?;
    let (_dir, sock) = dead_socket()?;
    let pod = PodNet::new()?;
    let out = CniCall::new(
        "ADD",
        &conf("1.1.0", &sock, r#","tap":{"owner":107,"group":107}"#),
    )
    .container("c1", &pod.netns_path(), "tap0")
    .run(&tapgate_cni_bin()?)?;
    out.expect_error(11)?;
    // The tap was created (sized after eth0) and removed again.
    assert!(out.stderr.contains(&format!("mtu {POD_MTU}")), "{out}");
    assert!(pod.link("tap0")?.is_none(), "tap0 left behind: {out}");
    Ok(())
}

#[test]
fn an_interface_that_is_not_a_tap_is_refused_and_left_alone() -> Result<()> {
    require_root()?;
    let (_dir, sock) = dead_socket()?;
    let pod = PodNet::new()?;
    // (A veth: this kernel may lack the dummy driver.)
    pod.pod.ip(&[
        "link", "add", "tap0", "type", "veth", "peer", "name", "tap0p",
    ])?;
    let out = CniCall::new("ADD", &conf("1.0.0", &sock, r#","tap":{"mtu":1500}"#))
        .container("c1", &pod.netns_path(), "tap0")
        .run(&tapgate_cni_bin()?)?;
    let v = out.expect_error(4)?;
    assert!(
        v["details"].as_str().unwrap().contains("not a tap"),
        "{out}"
    );
    let out = CniCall::new("DEL", &conf("1.0.0", &sock, ""))
        .container("c1", &pod.netns_path(), "tap0")
        .run(&tapgate_cni_bin()?)?;
    out.expect_silent_success()?;
    assert!(pod.link("tap0")?.is_some(), "the veth was removed: {out}");
    Ok(())
}
