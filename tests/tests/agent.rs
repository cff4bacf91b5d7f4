//! The node agent's API and life cycle: errors and their status codes, GC,
//! attachments torn down when their tap or pod namespace goes, a pinned
//! datapath of another layout refused, and `/metrics` scraped by a real
//! Prometheus server.
#![allow(clippy::unwrap_used)]

use std::{
    net::TcpListener,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tapgate_tests::{
    Netns,
    child::{Child, run_with_timeout},
    cni::{Agent, CniCall, PodNet, http, tapgate_cni_bin},
    dhcp::DhcpClient,
    relay::TapRelay,
    require_root,
    scratch::ScratchDir,
    topology::{DEFAULT_GUEST_ADDR, GUEST_IFACE},
};

fn conf(agent: &Agent) -> String {
    json!({
        "cniVersion": "1.1.0",
        "name": "tapgate",
        "type": "tapgate-cni",
        "agentSocket": agent.socket(),
        "tcpPorts": ["8080:80"],
        "udpPorts": ["none"],
    })
    .to_string()
}

/// CNI ADD of `cid` in `net` (creates tap0 and the attachment).
fn add(agent: &Agent, net: &PodNet, cid: &str) {
    CniCall::new("ADD", &conf(agent))
        .container(cid, &net.netns_path(), "eth0")
        .run(&tapgate_cni_bin().unwrap())
        .unwrap()
        .json()
        .unwrap_or_else(|e| panic!("ADD {cid}: {e:#}\n{}", agent.stderr()));
}

fn list(agent: &Agent) -> Vec<Value> {
    let (status, body) = http(agent.socket(), "GET", "/v1/attachments", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["attachments"].as_array().cloned().unwrap_or_default()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {limit:?}");
}

#[test]
fn api_errors_have_their_status_codes() {
    require_root().unwrap();
    let agent = Agent::start().unwrap();
    let net = PodNet::new().unwrap();
    let s = agent.socket();
    let post = |body: &str| http(s, "POST", "/v1/attachments", Some(body)).unwrap();
    let netns = net.netns_path();

    let (code, body) = post("{not json");
    assert_eq!(code, 400, "{body}");
    let (code, body) = post(r#"{"containerId":"c1","ifname":"tap0","netns":"/nonexistent/ns"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("does not exist"), "{body}");
    let (code, body) = post(&format!(
        r#"{{"containerId":"c1","ifname":"tap0","netns":"{netns}","settings":{{"gateway":"192.168.1.1"}}}}"#
    ));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("--gateway"), "{body}");
    let (code, body) = post(&format!(
        r#"{{"containerId":"../x","ifname":"tap0","netns":"{netns}"}}"#
    ));
    assert_eq!(code, 400, "{body}");
    let (code, body) = post(&format!(
        r#"{{"containerId":"c1","ifname":"tap0","netns":"{netns}","settings":{{"tcpPortz":[]}}}}"#
    ));
    assert_eq!(code, 400, "{body}");
    // No tap yet: the datapath cannot start, and nothing stays behind.
    let (code, body) = post(&format!(
        r#"{{"containerId":"c1","ifname":"tap0","netns":"{netns}"}}"#
    ));
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("tap"), "{body}");
    assert!(list(&agent).is_empty());
    assert!(
        agent.bpffs().pins().is_empty(),
        "{:?}",
        agent.bpffs().pins()
    );

    let (code, _) = http(s, "GET", "/v1/attachments/nope/tap0", None).unwrap();
    assert_eq!(code, 404);
    let (code, _) = http(s, "DELETE", "/v1/attachments/nope/tap0", None).unwrap();
    assert_eq!(code, 404);

    // The same request again is 200; other settings for it are 409.
    add(&agent, &net, "c2");
    let a = list(&agent);
    assert_eq!(a.len(), 1);
    let same = serde_json::to_string(&json!({
        "containerId": "c2", "ifname": "tap0", "netns": netns,
        "podNamespace": a[0]["podNamespace"], "podName": a[0]["podName"],
        "network": a[0]["network"], "settings": a[0]["settings"],
    }))
    .unwrap();
    let (code, body) = post(&same);
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&format!(
        r#"{{"containerId":"c2","ifname":"tap0","netns":"{netns}","settings":{{"keepaliveInterval":5}}}}"#
    ));
    assert_eq!(code, 409, "{body}");

    // GC of another network keeps it; GC of its network removes it.
    let (code, body) = http(
        s,
        "POST",
        "/v1/gc",
        Some(r#"{"valid":[],"network":"other"}"#),
    )
    .unwrap();
    assert_eq!((code, body.as_str()), (200, r#"{"removed":[]}"#));
    let (code, body) = http(
        s,
        "POST",
        "/v1/gc",
        Some(r#"{"valid":[],"network":"tapgate"}"#),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("c2"), "{body}");
    assert!(list(&agent).is_empty());
    assert!(
        agent.bpffs().pins().is_empty(),
        "{:?}",
        agent.bpffs().pins()
    );
}

#[test]
fn attachments_go_with_their_tap_or_their_pod() {
    require_root().unwrap();
    let agent = Agent::start().unwrap();
    let by_tap = PodNet::new().unwrap();
    let by_netns = PodNet::new().unwrap();
    add(&agent, &by_tap, "gone-tap");
    add(&agent, &by_netns, "gone-pod");
    assert_eq!(list(&agent).len(), 2);

    // The VM's tap is deleted.
    by_tap.pod.ip(&["link", "del", "tap0"]).unwrap();
    wait_for(
        "the tap's attachment is removed",
        Duration::from_secs(10),
        || list(&agent).iter().all(|a| a["containerId"] != "gone-tap"),
    );
    // The pod's namespace is deleted (its bind mount goes first).
    let out = run_with_timeout(
        Command::new("ip").args(["netns", "del", by_netns.pod.name()]),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(out.status.success());
    wait_for(
        "the pod's attachment is removed",
        Duration::from_secs(10),
        || list(&agent).is_empty(),
    );
    wait_for("nothing is pinned", Duration::from_secs(5), || {
        agent.bpffs().pins().is_empty()
    });
    let log = agent.stderr();
    assert!(log.contains("TapGone"), "{log}");
    assert!(log.contains("NetnsGone"), "{log}");
}

#[test]
fn a_datapath_of_another_layout_is_refused() {
    require_root().unwrap();
    let agent = Agent::start().unwrap();
    let net = PodNet::new().unwrap();
    // What another tapgate version left pinned for this attachment.
    std::fs::create_dir_all(agent.bpffs().path().join("old-layout/tap0/v999")).unwrap();
    let out = CniCall::new("ADD", &conf(&agent))
        .container("old-layout", &net.netns_path(), "eth0")
        .run(&tapgate_cni_bin().unwrap())
        .unwrap();
    let err = out.expect_error(101).unwrap();
    let msg = err.to_string();
    assert!(msg.contains("layout 999") || msg.contains("v999"), "{msg}");
    assert!(msg.contains("this tapgate uses layout"), "{msg}");
    // The other version's pins are left alone.
    assert!(agent.bpffs().path().join("old-layout/tap0/v999").exists());
    assert!(list(&agent).is_empty());
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus server scraping `target` every second, with its data in a
/// scratch directory.
fn prometheus(target: &str) -> Result<(Child, u16, ScratchDir)> {
    let dir = ScratchDir::new("prometheus")?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tapgate\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )?;
    let port = free_port();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let child = Child::spawn(cmd, "prometheus")?;
    Ok((child, port, dir))
}

/// `query` evaluated by the Prometheus at `port`: the first sample's value.
fn prom_query(port: u16, query: &str) -> Result<Option<f64>> {
    let out = run_with_timeout(
        Command::new("curl").args([
            "-sS",
            "--max-time",
            "5",
            "-G",
            &format!("http://127.0.0.1:{port}/api/v1/query"),
            "--data-urlencode",
            &format!("query={query}"),
        ]),
        Duration::from_secs(10),
    )?;
    if !out.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["data"]["result"]
        .get(0)
        .and_then(|r| r["value"].get(1))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok()))
}

#[test]
fn prometheus_scrapes_the_agent() {
    require_root().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start_with(&["--listen", &listen]).unwrap();
    let net = PodNet::new().unwrap();
    let guest = Netns::new("guest").unwrap();
    add(&agent, &net, "scraped");
    let relay = TapRelay::attach(&net.netns_path(), "tap0", &guest, GUEST_IFACE).unwrap();
    guest.ip(&["link", "set", GUEST_IFACE, "up"]).unwrap();
    let lease = DhcpClient::new(&guest, GUEST_IFACE)
        .unwrap()
        .run_once()
        .unwrap_or_else(|e| {
            panic!(
                "DHCP: {e:#}\n{}\n{}",
                relay.stats().summary(),
                agent.stderr()
            )
        });
    assert_eq!(lease.ip, DEFAULT_GUEST_ADDR);

    // Only health and metrics on TCP; the API stays on the UNIX socket.
    let out = run_with_timeout(
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{listen}/v1/attachments")),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    let (mut prom, prom_port, _dir) = prometheus(&listen).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let queries = [
        r#"up{job="tapgate"}"#,
        r#"tapgate_dhcp_replies_total{namespace="",pod="",interface="tap0"}"#,
        r#"tapgate_agent_api_requests_total{verb="create",result="ok"}"#,
        r#"tapgate_agent_attachments{phase="running"}"#,
        "tapgate_agent_attachment_setup_seconds_count",
    ];
    let last = loop {
        let last: Vec<Option<f64>> = queries
            .iter()
            .map(|q| prom_query(prom_port, q).ok().flatten())
            .collect();
        if last.iter().all(|v| v.is_some_and(|v| v >= 1.0)) {
            break last;
        }
        if let Some(status) = prom.try_wait().unwrap() {
            panic!("prometheus exited ({status}): {}", prom.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not record the agent's metrics: {queries:?} = {last:?}\n{}",
            prom.stderr()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // Two DHCP replies (OFFER, ACK) reached Prometheus as recorded.
    assert!(last[1].unwrap() >= 2.0, "{last:?}");
}
