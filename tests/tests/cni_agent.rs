//! End-to-end tests of `tapgate-cni` with a real `tapgate agent`.
//!
//! ADD creates the tap (owner and group 107, `vnet_hdr`, persistent, the
//! pod uplink's MTU) and answers `prevResult` plus the tap; CHECK succeeds
//! while the agent serves the attachment and fails once the agent lost it;
//! DEL removes the tap; the Multus-style `args.cni.logicNetworkName`
//! reaches the agent as the attachment's `network`, and `CNI_ARGS` as its
//! pod namespace and name.
//!
//! The agent is started as `tapgate agent --socket PATH --state-dir DIR
//! --bpffs-dir DIR` (foreground; ready when `GET /healthz` answers). They
//! need root; run them with `cargo xtask test`.
#![allow(clippy::unwrap_used)]

use anyhow::Result;
use serde_json::{Value, json};
use tapgate_tests::cni::{Agent, CniCall, POD_MTU, PodNet, http, tapgate_cni_bin};
use tapgate_tests::require_root;

const PREV: &str = r#"{"cniVersion":"1.1.0",
    "interfaces":[{"name":"eth0","mac":"0a:58:c0:00:02:0a","sandbox":"SANDBOX"}],
    "ips":[{"address":"192.0.2.10/24","gateway":"192.0.2.1","interface":0}]}"#;

fn conf(socket: &str, sandbox: &str, extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.1.0","name":"tapgate","type":"tapgate-cni",
            "agentSocket":"{socket}","tap":{{"owner":107,"group":107}},
            "prevResult":{}{extra}}}"#,
        PREV.replace("SANDBOX", sandbox)
    )
}

/// The uid or gid as `ip -j` shows it: a number, or the name if it has one.
fn is_id(v: &Value, id: u32, name: Option<String>) -> bool {
    v.as_u64() == Some(u64::from(id)) || (v.is_string() && v.as_str().map(String::from) == name)
}

#[test]
fn add_check_del() -> Result<()> {
    require_root()?;
    let agent = Agent::start()?;
    let sock = agent.socket().to_string_lossy().into_owned();
    let pod = PodNet::new()?;
    let ns = pod.netns_path();
    let bin = tapgate_cni_bin()?;
    let call = |cmd: &str, extra: &str| {
        let mut c = CniCall::new(cmd, &conf(&sock, &ns, extra)).container("cid1", &ns, "tap0");
        c.args = Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=vms;K8S_POD_NAME=vm-a".into());
        c
    };

    let out = call("ADD", "").run(&bin)?;
    assert_eq!(out.code, Some(0), "{out}\nagent:\n{}", agent.stderr());
    let r = out.json()?;
    assert_eq!(r["cniVersion"], "1.1.0");
    let ifs = r["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 2, "{r}");
    assert_eq!(ifs[0]["name"], "eth0");
    assert_eq!(ifs[1]["name"], "tap0");
    assert_eq!(ifs[1]["sandbox"], ns.as_str());
    assert_eq!(ifs[1]["mtu"], POD_MTU);
    assert_eq!(r["ips"], serde_json::from_str::<Value>(PREV)?["ips"]);

    let link = pod.link("tap0")?.expect("tap0 exists after ADD");
    assert_eq!(link["address"], ifs[1]["mac"]);
    assert_eq!(link["mtu"], POD_MTU);
    assert!(
        link["flags"].as_array().unwrap().contains(&json!("UP")),
        "{link}"
    );
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(info["type"], "tap", "{link}");
    assert_eq!(info["pi"], false);
    assert_eq!(info["vnet_hdr"], true);
    assert_eq!(info["persist"], true);
    let user = nix::unistd::User::from_uid(107.into())?.map(|u| u.name);
    let group = nix::unistd::Group::from_gid(107.into())?.map(|g| g.name);
    assert!(is_id(&info["user"], 107, user), "{link}");
    assert!(is_id(&info["group"], 107, group), "{link}");

    let (status, body) = http(agent.socket(), "GET", "/v1/attachments/cid1/tap0", None)?;
    assert_eq!(status, 200, "{body}");
    let a: Value = serde_json::from_str(&body)?;
    assert_eq!(a["netns"], ns.as_str());
    assert_eq!(a["network"], "tapgate");
    assert_eq!(a["podNamespace"], "vms");
    assert_eq!(a["podName"], "vm-a");

    // A repeated ADD is idempotent.
    let again = call("ADD", "").run(&bin)?;
    assert_eq!(again.code, Some(0), "{again}");
    assert_eq!(again.json()?["interfaces"], r["interfaces"]);

    // CHECK: fine while attached (the agent may still be starting it).
    let mut ok = false;
    for _ in 0..100 {
        if call("CHECK", "").run(&bin)?.code == Some(0) {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        ok,
        "CHECK never succeeded: {}\nagent:\n{}",
        call("CHECK", "").run(&bin)?,
        agent.stderr()
    );

    // The agent loses it: CHECK fails.
    let (status, body) = http(agent.socket(), "DELETE", "/v1/attachments/cid1/tap0", None)?;
    assert_eq!(status, 200, "{body}");
    call("CHECK", "").run(&bin)?.expect_error(102)?;

    // DEL (the agent already forgot it: 404 is fine) removes the tap;
    // a second DEL is a no-op.
    call("DEL", "").run(&bin)?.expect_silent_success()?;
    assert!(pod.link("tap0")?.is_none());
    call("DEL", "").run(&bin)?.expect_silent_success()?;
    Ok(())
}

#[test]
fn logic_network_name_reaches_the_agent() -> Result<()> {
    require_root()?;
    let agent = Agent::start()?;
    let sock = agent.socket().to_string_lossy().into_owned();
    let pod = PodNet::new()?;
    let ns = pod.netns_path();
    let bin = tapgate_cni_bin()?;
    let extra = r#","args":{"cni":{"logicNetworkName":"vmnet"}}"#;
    let out = CniCall::new("ADD", &conf(&sock, &ns, extra))
        .container("cid2", &ns, "tap0")
        .run(&bin)?;
    assert_eq!(out.code, Some(0), "{out}\nagent:\n{}", agent.stderr());
    let (status, body) = http(agent.socket(), "GET", "/v1/attachments/cid2/tap0", None)?;
    assert_eq!(status, 200, "{body}");
    let a: Value = serde_json::from_str(&body)?;
    assert_eq!(a["network"], "vmnet");

    // GC of this network with an empty valid list collects it.
    let gc = format!(
        r#"{{"cniVersion":"1.1.0","name":"tapgate","type":"tapgate-cni","agentSocket":"{sock}",
            "args":{{"cni":{{"logicNetworkName":"vmnet"}}}},"cni.dev/valid-attachments":[]}}"#
    );
    CniCall::new("GC", &gc).run(&bin)?.expect_silent_success()?;
    let (status, _) = http(agent.socket(), "GET", "/v1/attachments/cid2/tap0", None)?;
    assert_eq!(status, 404);

    CniCall::new("DEL", &conf(&sock, &ns, extra))
        .container("cid2", &ns, "tap0")
        .run(&bin)?
        .expect_silent_success()?;
    assert!(pod.link("tap0")?.is_none());
    Ok(())
}

#[test]
fn status_with_the_agent_up() -> Result<()> {
    require_root()?;
    let agent = Agent::start()?;
    let sock = agent.socket().to_string_lossy().into_owned();
    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"tapgate","type":"tapgate-cni","agentSocket":"{sock}"}}"#
    );
    CniCall::new("STATUS", &conf)
        .run(&tapgate_cni_bin()?)?
        .expect_silent_success()
}
