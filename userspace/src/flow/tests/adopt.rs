//! Adopting a datapath: the flow table rebuilt from the kernel maps an
//! earlier daemon left.

use super::*;

/// A second manager over a copy of `old`'s maps, as a restarted daemon
/// gets them; `old`'s leases are gone (its process died).
fn restarted(old: T) -> (T, crate::flow::adopt::AdoptReport) {
    let maps = FakeMaps {
        entries: old.m.maps().entries.clone(),
        activity: old.m.maps().activity.clone(),
        capacity: None,
    };
    drop(old);
    let mut new = T::new();
    new.m = FlowManager::new(
        config(),
        maps,
        FakePorts {
            next: FIRST_PORT,
            live: new.live.clone(),
            exhausted: false,
            no_route: None,
        },
    );
    let report = new.m.adopt(new.now);
    (new, report)
}

#[test]
fn established_flows_come_back_with_their_ports_held() {
    let mut t = T::new();
    let a = t.establish(40000, 1000, 5000);
    let b = t.establish(40001, 2000, 6000);
    t.guest(
        &udp_frame(guest(40002), udp_remote(), b"x"),
        PuntReason::Ipv4NoFlow,
    );
    let before = t.m.flows();
    let (mut t, report) = restarted(t);
    assert_eq!((report.flows, report.ports_lost, report.orphans), (3, 0, 0));
    let after = t.m.flows();
    let strip = |v: &[FlowInfo]| {
        let mut v: Vec<_> = v
            .iter()
            .map(|f| (f.proto, f.guest, f.remote, f.nat, f.state))
            .collect();
        v.sort_by_key(|x| x.1);
        v
    };
    assert_eq!(strip(&before), strip(&after));
    // The NAT ports are held again, and a new flow gets another one.
    assert_eq!(t.live_ports(), 3);
    let c = t.establish(40003, 3000, 7000);
    assert!(![a, b].contains(&c));
    // The slots in use are not handed out twice.
    let slots: HashSet<u32> = t.m.maps().entries.values().map(|e| e.slot).collect();
    assert_eq!(slots.len(), 4);
    assert_eq!(t.m.stats().flows_adopted, 3);
}

#[test]
fn adopted_flows_close_and_expire_as_before() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let (mut t, _) = restarted(t);
    // An RST event from the kernel removes the adopted flow.
    let rst = Seg::new(remote(), nat(natp))
        .ctl(TcpControl::Rst)
        .world_frame();
    t.event(PuntReason::EventRst, Origin::Uplink, &rst);
    assert!(t.m.flows().is_empty());
    assert_eq!(t.live_ports(), 0, "its port is released");
}

#[test]
fn half_closed_flows_are_reaped_by_their_timeout() {
    let mut cfg = config();
    cfg.last_ack_timeout = Duration::from_secs(60);
    let mut t = T::with(cfg);
    let natp = t.establish(40000, 1000, 5000);
    let tk = tap_k(40000);
    let uk = uplink_k(natp);
    for k in [tk, uk] {
        t.maps().entries.get_mut(&k).unwrap().state = FlowState::LastAck as u8;
    }
    let (mut t, _) = restarted(t);
    assert_eq!(t.m.flows()[0].state, "last_ack");
    t.advance(Duration::from_secs(59));
    t.tick();
    assert_eq!(t.m.flows().len(), 1, "never earlier than the timeout");
    t.advance(Duration::from_secs(2));
    t.tick();
    assert!(t.m.flows().is_empty());
}

#[test]
fn orphans_and_inconsistent_pairs_are_removed() {
    let mut t = T::new();
    t.establish(40000, 1000, 5000);
    let natp = t.establish(40001, 2000, 6000);
    // One flow loses its world-side entry; a stray entry claims a slot
    // nothing else has.
    t.maps().entries.remove(&uplink_k(natp));
    let mut stray = t.maps().entry(&tap_k(40000));
    stray.slot = 9;
    t.maps().entries.insert(tap_k(40999), stray);
    let (t, report) = restarted(t);
    assert_eq!((report.flows, report.orphans), (1, 2));
    assert_eq!(
        t.m.maps().entries.len(),
        2,
        "only the whole flow's entries stay"
    );
}

#[test]
fn a_port_taken_meanwhile_is_counted_and_the_flow_stays() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let maps = FakeMaps {
        entries: t.m.maps().entries.clone(),
        activity: Vec::new(),
        capacity: None,
    };
    drop(t);
    let live = Live::default();
    // The host took the port while no daemon ran.
    live.lock().unwrap().insert((PROTO_TCP, natp));
    let mut m = FlowManager::new(
        config(),
        maps,
        FakePorts {
            next: FIRST_PORT,
            live,
            exhausted: false,
            no_route: None,
        },
    );
    let report = m.adopt(Instant::now());
    assert_eq!((report.flows, report.ports_lost), (1, 1));
    assert_eq!(m.flows().len(), 1);
    assert_eq!(m.stats().adopt_ports_lost, 1);
}
