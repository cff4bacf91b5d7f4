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

/// A stand-in for the agent that keeps one attachment: enough to drive
/// ADD, CHECK and DEL to success before the real agent exists.
struct FakeAgent {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAgent {
    fn start(socket: &std::path::Path) -> Result<FakeAgent> {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::os::unix::net::UnixListener::bind(socket)?;
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held: Option<serde_json::Value> = None;
            while !flag.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let mut got = Vec::new();
                let mut buf = [0u8; 8192];
                let (head, body) = loop {
                    let Ok(n) = conn.read(&mut buf) else {
                        break (String::new(), String::new());
                    };
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).into_owned();
                    if let Some((h, b)) = text.split_once("\r\n\r\n") {
                        let len = h
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_owned)
                            })
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if b.len() >= len || n == 0 {
                            break (h.to_owned(), b.to_owned());
                        }
                    }
                    if n == 0 {
                        break (String::new(), String::new());
                    }
                };
                let line = head.lines().next().unwrap_or("").to_owned();
                let (status, answer) = if line.starts_with("POST /v1/attachments ") {
                    let mut a: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    a["phase"] = "running".into();
                    a["adopted"] = false.into();
                    a["uplink"] = "eth0".into();
                    a["error"] = serde_json::Value::Null;
                    held = Some(a.clone());
                    (201, a.to_string())
                } else if line.starts_with("GET /v1/attachments/") {
                    match &held {
                        Some(a) => (200, a.to_string()),
                        None => (404, r#"{"error":"none"}"#.to_owned()),
                    }
                } else if line.starts_with("DELETE /v1/attachments/") {
                    match held.take() {
                        Some(a) => (200, serde_json::json!({"deleted":{"containerId":a["containerId"],"ifname":a["ifname"]}}).to_string()),
                        None => (404, r#"{"error":"none"}"#.to_owned()),
                    }
                } else {
                    (200, "ok".to_owned())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        Ok(FakeAgent {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn add_check_del_against_a_fake_agent() -> Result<()> {
    require_root()?;
    let (dir, sock) = dead_socket()?;
    let _agent = FakeAgent::start(&dir.join("agent.sock"))?;
    let pod = PodNet::new()?;
    let ns = pod.netns_path();
    let extra = format!(
        r#","tap":{{"owner":107,"group":107}},"prevResult":{{"cniVersion":"1.1.0",
           "interfaces":[{{"name":"eth0","sandbox":"{ns}"}}],
           "ips":[{{"address":"192.0.2.10/24","interface":0}}]}}"#
    );
    let bin = tapgate_cni_bin()?;
    let call =
        |cmd: &str| CniCall::new(cmd, &conf("1.1.0", &sock, &extra)).container("c1", &ns, "tap0");
    let out = call("ADD").run(&bin)?;
    assert_eq!(out.code, Some(0), "{out}");
    let r = out.json()?;
    let tap = &r["interfaces"][1];
    assert_eq!(tap["name"], "tap0", "{r}");
    assert_eq!(tap["sandbox"], ns.as_str());
    assert_eq!(tap["mtu"], POD_MTU);
    assert_eq!(r["ips"][0]["interface"], 0);
    let link = pod.link("tap0")?.expect("tap0 after ADD");
    assert_eq!(link["address"], tap["mac"]);
    assert_eq!(link["mtu"], POD_MTU);
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(info["type"], "tap", "{link}");
    assert_eq!(info["vnet_hdr"], true);
    assert_eq!(info["persist"], true);
    assert_eq!(info["multi_queue"], false);
    assert!(info["user"] == 107 || info["user"].is_string(), "{link}");
    assert!(info["group"] == 107 || info["group"].is_string(), "{link}");

    call("CHECK").run(&bin)?.expect_silent_success()?;
    call("DEL").run(&bin)?.expect_silent_success()?;
    assert!(pod.link("tap0")?.is_none());
    // The fake agent forgot it: CHECK fails with tapgate's code.
    call("CHECK").run(&bin)?.expect_error(102)?;
    Ok(())
}
