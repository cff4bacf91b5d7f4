//! Parser and lookup tests for every form of the `-t`/`-u` syntax.
#![allow(clippy::unwrap_used)]

use super::*;

const EPH: PortRange = PortRange::LINUX_EPHEMERAL;
const ANY: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

fn table(specs: &[(Proto, &str)]) -> Result<FwdTable, SpecError> {
    let mut t = FwdTable::new();
    for (proto, spec) in specs {
        t.add_spec(*proto, spec, EPH)?;
    }
    Ok(t)
}

fn tcp(spec: &str) -> FwdTable {
    match table(&[(Proto::Tcp, spec)]) {
        Ok(t) => t,
        Err(e) => panic!("{spec:?} should parse: {e}"),
    }
}

fn err(spec: &str) -> SpecError {
    match table(&[(Proto::Tcp, spec)]) {
        Ok(t) => panic!("{spec:?} should fail, got {:?}", t.rules()),
        Err(e) => e,
    }
}

fn blocks(t: &FwdTable) -> Vec<(u16, u16, u16)> {
    t.rules()
        .iter()
        .map(|r| (r.host.first, r.host.last, r.to_first))
        .collect()
}

fn range(first: u16, last: u16) -> PortRange {
    PortRange { first, last }
}

#[test]
fn single_port() {
    let t = tcp("8080");
    assert_eq!(blocks(&t), vec![(8080, 8080, 8080)]);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8080), Some(8080));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8081), None);
    assert_eq!(t.lookup(Proto::Udp, ANY, 8080), None);
}

#[test]
fn port_mapped_to_another() {
    let t = tcp("8080:80");
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8080), Some(80));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 80), None);
    assert_eq!(t.rules()[0].token, "8080:80");
}

#[test]
fn range_to_itself() {
    let t = tcp("10000-10100");
    assert_eq!(t.lookup(Proto::Tcp, ANY, 9999), None);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10000), Some(10000));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10050), Some(10050));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10100), Some(10100));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10101), None);
}

#[test]
fn range_mapped_to_range() {
    let t = tcp("10000-10100:20000-20100");
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10000), Some(20000));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10042), Some(20042));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10100), Some(20100));
    assert_eq!(t.rules()[0].guest(), range(20000, 20100));
}

#[test]
fn range_mapped_by_first_target_port() {
    let t = tcp("8080-8089:80");
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8080), Some(80));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8089), Some(89));
}

#[test]
fn single_port_range_forms() {
    assert_eq!(blocks(&tcp("22-22")), vec![(22, 22, 22)]);
    assert_eq!(blocks(&tcp("22:2222-2222")), vec![(22, 22, 2222)]);
    assert_eq!(blocks(&tcp("1")), vec![(1, 1, 1)]);
    assert_eq!(blocks(&tcp("65535")), vec![(65535, 65535, 65535)]);
    assert_eq!(blocks(&tcp("00080")), vec![(80, 80, 80)]);
}

#[test]
fn list_of_items() {
    let t = tcp("22,80:8080,443");
    assert_eq!(
        blocks(&t),
        vec![(22, 22, 22), (80, 80, 8080), (443, 443, 443)]
    );
}

#[test]
fn exclusion_splits_a_range() {
    let t = tcp("1-1024,~22");
    assert_eq!(blocks(&t), vec![(1, 21, 1), (23, 1024, 23)]);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 21), Some(21));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 22), None);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 23), Some(23));
}

#[test]
fn exclusion_keeps_the_mapping_offset() {
    let t = tcp("10000-10100:20000-20100,~10010-10019");
    assert_eq!(
        blocks(&t),
        vec![(10000, 10009, 20000), (10020, 10100, 20020)]
    );
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10015), None);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 10020), Some(20020));
}

#[test]
fn exclusion_order_and_edges() {
    // Exclusions may come first, overlap each other and touch the edges.
    let t = tcp("~1,~5-6,~4-5,1-10,~10");
    assert_eq!(blocks(&t), vec![(2, 3, 2), (7, 9, 7)]);
    // An exclusion outside every range is harmless.
    assert_eq!(blocks(&tcp("80,~9000")), vec![(80, 80, 80)]);
}

#[test]
fn exclusion_only_means_all_but() {
    let t = tcp("~22");
    assert_eq!(
        blocks(&t),
        vec![(1, 21, 1), (23, 32767, 23), (61000, 65535, 61000)]
    );
    assert_eq!(t.lookup(Proto::Tcp, ANY, 22), None);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8080), Some(8080));
    // The ephemeral range is the host's own.
    assert_eq!(t.lookup(Proto::Tcp, ANY, 40000), None);
    let t = tcp("~22,~80-90");
    assert_eq!(t.lookup(Proto::Tcp, ANY, 85), None);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 91), Some(91));
}

#[test]
fn all_and_all_but() {
    assert_eq!(
        blocks(&tcp("all")),
        vec![(1, 32767, 1), (61000, 65535, 61000)]
    );
    assert_eq!(blocks(&tcp("all,~22")), blocks(&tcp("~22")));
    let mut t = FwdTable::new();
    assert_eq!(t.add_spec(Proto::Udp, "all", range(1000, 65535)), Ok(()));
    assert_eq!(blocks(&t), vec![(1, 999, 1)]);
}

#[test]
fn none_is_nothing() {
    let t = tcp("none");
    assert!(t.is_empty());
    assert_eq!(
        err("none,80"),
        SpecError::NoneNotAlone {
            token: "none".into()
        }
    );
    assert_eq!(
        err("80,none"),
        SpecError::NoneNotAlone {
            token: "none".into()
        }
    );
}

#[test]
fn addresses_and_interfaces() {
    let t = tcp("198.51.100.1/8080:80");
    let rule = &t.rules()[0];
    assert_eq!(rule.addr, Some(ANY));
    assert_eq!(rule.iface, None);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8080), Some(80));
    let other: IpAddr = "198.51.100.2".parse().unwrap_or(ANY);
    assert_eq!(t.lookup(Proto::Tcp, other, 8080), None);

    let t = tcp("198.51.100.1%eth0/22");
    assert_eq!(t.rules()[0].iface.as_deref(), Some("eth0"));
    assert_eq!(t.rules()[0].addr, Some(ANY));

    let t = tcp("2001:db8::1/443");
    assert_eq!(t.rules()[0].addr, "2001:db8::1".parse().ok());
    let t = tcp("[2001:db8::1]%veth0/443-444:8443");
    assert_eq!(blocks(&t), vec![(443, 444, 8443)]);
    assert_eq!(t.rules()[0].iface.as_deref(), Some("veth0"));
    assert_eq!(
        t.rules()[0].to_string(),
        "tcp 2001:db8::1%veth0/443-444 -> 8443-8444"
    );
}

#[test]
fn addresses_on_different_hosts_do_not_overlap() {
    let t = table(&[
        (Proto::Tcp, "198.51.100.1/80:8080"),
        (Proto::Tcp, "198.51.100.2/80:9090"),
    ]);
    let t = match t {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(t.lookup(Proto::Tcp, ANY, 80), Some(8080));
    let two: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2));
    assert_eq!(t.lookup(Proto::Tcp, two, 80), Some(9090));
}

#[test]
fn one_table_for_both_protocols() {
    let t = match table(&[
        (Proto::Tcp, "53"),
        (Proto::Udp, "53:5353"),
        (Proto::Udp, "5353"),
    ]) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(t.rules().len(), 3);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 53), Some(53));
    assert_eq!(t.lookup(Proto::Udp, ANY, 53), Some(5353));
    assert_eq!(t.lookup(Proto::Udp, ANY, 5353), Some(5353));
    assert_eq!(t.lookup(Proto::Tcp, ANY, 5353), None);
    assert!(t.forwards(Proto::Udp, 5353));
    assert!(!t.forwards(Proto::Tcp, 5353));
    assert_eq!(t.rules()[1].proto, Proto::Udp);
    assert_eq!(
        Proto::from_ip_proto(Proto::Udp.ip_proto()),
        Some(Proto::Udp)
    );
    assert_eq!(Proto::from_ip_proto(1), None);
}

#[test]
fn bad_numbers() {
    for (spec, text) in [
        ("http", None),
        ("8o", Some("8o")),
        ("+80", Some("+80")),
        ("-80", Some("")),
        ("80-", Some("")),
        ("80:", Some("")),
        (":80", Some("")),
        ("80-90-100", Some("90-100")),
        ("80:90:100", Some("90:100")),
        (" 80", Some(" 80")),
        ("~x", Some("x")),
        ("~", Some("")),
        ("1.5", Some("1.5")),
    ] {
        match (err(spec), text) {
            (SpecError::BadNumber { token, text: got }, Some(text)) => {
                assert_eq!(token, spec);
                assert_eq!(got, text, "{spec:?}");
            }
            (SpecError::UnknownWord { token }, None) => assert_eq!(token, spec),
            (e, _) => panic!("{spec:?}: unexpected {e:?}"),
        }
    }
}

#[test]
fn port_zero() {
    for spec in ["0", "0-10", "80:0", "~0", "0000"] {
        assert_eq!(
            err(spec),
            SpecError::PortZero { token: spec.into() },
            "{spec:?}"
        );
    }
}

#[test]
fn too_large() {
    for (spec, text) in [
        ("65536", "65536"),
        ("1-70000", "70000"),
        ("80:99999", "99999"),
        ("123456789012", "123456789012"),
        ("~65536", "65536"),
    ] {
        assert_eq!(
            err(spec),
            SpecError::TooLarge {
                token: spec.into(),
                text: text.into()
            },
            "{spec:?}"
        );
    }
}

#[test]
fn reversed_ranges() {
    assert_eq!(
        err("100-90"),
        SpecError::Reversed {
            token: "100-90".into(),
            first: 100,
            last: 90
        }
    );
    assert_eq!(
        err("90-100:200-190"),
        SpecError::Reversed {
            token: "90-100:200-190".into(),
            first: 200,
            last: 190
        }
    );
    assert!(matches!(err("~30-20"), SpecError::Reversed { .. }));
}

#[test]
fn mismatched_range_lengths() {
    assert_eq!(
        err("10000-10100:20000-20050"),
        SpecError::LengthMismatch {
            token: "10000-10100:20000-20050".into(),
            from: 101,
            to: 51
        }
    );
    assert_eq!(
        err("80:8080-8081"),
        SpecError::LengthMismatch {
            token: "80:8080-8081".into(),
            from: 1,
            to: 2
        }
    );
}

#[test]
fn target_overflow() {
    assert_eq!(
        err("100-200:65500"),
        SpecError::TargetOverflow {
            token: "100-200:65500".into()
        }
    );
    // Exactly reaching 65535 is fine.
    assert_eq!(blocks(&tcp("1-36:65500")), vec![(1, 36, 65500)]);
}

#[test]
fn empty_items() {
    assert_eq!(err(""), SpecError::Empty);
    for spec in [",", "80,", ",80", "80,,81"] {
        assert_eq!(
            err(spec),
            SpecError::EmptyItem { spec: spec.into() },
            "{spec:?}"
        );
    }
}

#[test]
fn unknown_words() {
    for spec in ["ALL", "any", "http", "80,ssh", "1.2.3.4/all"] {
        let e = err(spec);
        assert!(
            matches!(e, SpecError::UnknownWord { .. }),
            "{spec:?}: {e:?}"
        );
    }
    assert_eq!(
        err("80,ssh"),
        SpecError::UnknownWord {
            token: "ssh".into()
        }
    );
}

#[test]
fn bad_addresses_and_interfaces() {
    assert_eq!(
        err("1.2.3/80"),
        SpecError::BadAddress {
            token: "1.2.3/80".into(),
            text: "1.2.3".into()
        }
    );
    assert_eq!(
        err("/80"),
        SpecError::BadAddress {
            token: "/80".into(),
            text: "".into()
        }
    );
    assert_eq!(
        err("1.2.3.4%/80"),
        SpecError::BadIface {
            token: "1.2.3.4%/80".into(),
            text: "".into()
        }
    );
    assert!(matches!(
        err("1.2.3.4%averyveryverylongname/80"),
        SpecError::BadIface { .. }
    ));
    assert!(matches!(err("1.2.3.4/"), SpecError::BadNumber { .. }));
}

#[test]
fn bad_exclusions() {
    for spec in ["80,~22:23", "80,~1.2.3.4/22", "~eth0%22"] {
        assert!(
            matches!(err(spec), SpecError::BadExclusion { .. }),
            "{spec:?}"
        );
    }
}

#[test]
fn all_with_ranges() {
    assert_eq!(
        err("all,80"),
        SpecError::AllWithRanges { token: "80".into() }
    );
    assert_eq!(
        err("80,all"),
        SpecError::AllWithRanges { token: "80".into() }
    );
}

#[test]
fn nothing_left() {
    assert_eq!(
        err("22,~22"),
        SpecError::NothingLeft {
            spec: "22,~22".into()
        }
    );
    assert_eq!(
        err("~1-65535"),
        SpecError::NothingLeft {
            spec: "~1-65535".into()
        }
    );
}

#[test]
fn overlaps_are_errors_and_leave_the_table_alone() {
    assert_eq!(
        err("80,70-90"),
        SpecError::Overlap {
            token: "70-90".into(),
            other: "80".into(),
            proto: Proto::Tcp,
            port: 80
        }
    );
    let mut t = tcp("8000-8100");
    let before = t.clone();
    assert_eq!(
        t.add_spec(Proto::Tcp, "9000,8050:80", EPH),
        Err(SpecError::Overlap {
            token: "8050:80".into(),
            other: "8000-8100".into(),
            proto: Proto::Tcp,
            port: 8050
        })
    );
    assert_eq!(t, before);
    // Same port, other protocol: no overlap.
    assert_eq!(t.add_spec(Proto::Udp, "8050", EPH), Ok(()));
    // An address-bound rule overlaps an unbound one.
    assert!(matches!(
        t.add_spec(Proto::Udp, "198.51.100.1/8050", EPH),
        Err(SpecError::Overlap { .. })
    ));
}

#[test]
fn errors_name_the_token() {
    let e = err("80,100-90,443");
    assert_eq!(e.to_string(), "\"100-90\": range 100-90 is reversed");
    assert_eq!(
        err("8080:0").to_string(),
        "\"8080:0\": port 0 cannot be forwarded"
    );
    assert_eq!(
        err("99999").to_string(),
        "\"99999\": port 99999 is out of range (1-65535)"
    );
}

#[test]
fn port_range_helpers() {
    let r = range(10, 19);
    assert_eq!(r.len(), 10);
    assert!(!r.is_empty());
    assert!(r.contains(10) && r.contains(19) && !r.contains(20));
    assert_eq!(r.to_string(), "10-19");
    assert_eq!(range(7, 7).to_string(), "7");
    assert_eq!(subtract(range(1, 10), &[range(1, 10)]), vec![]);
    assert_eq!(complement(&[]), vec![range(1, 65535)]);
    assert_eq!(
        complement(&[range(1, 1), range(65535, 65535)]),
        vec![range(2, 65534)]
    );
}

#[test]
fn runtime_add_and_remove() {
    let mut t = tcp("8080:80");
    // prepare_add checks without changing anything.
    let new = t.prepare_add(Proto::Tcp, "1-1024,~22", EPH).unwrap();
    assert_eq!(new.len(), 2);
    assert_eq!(t.rules().len(), 1);
    assert!(matches!(
        t.prepare_add(Proto::Tcp, "8000-8100", EPH),
        Err(SpecError::Overlap { .. })
    ));
    t.insert(new);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 443), Some(443));

    // Removal takes the SPEC the rules were added with.
    let gone = t.prepare_remove(Proto::Tcp, "1-1024,~22", EPH).unwrap();
    assert_eq!(gone.len(), 2);
    t.remove(&gone);
    assert_eq!(blocks(&t), vec![(8080, 8080, 80)]);
    // Anything else is not there to remove, and names the item.
    for (proto, spec, token) in [
        (Proto::Tcp, "8080", "8080"),
        (Proto::Tcp, "8080:81", "8080:81"),
        (Proto::Udp, "8080:80", "8080:80"),
        (Proto::Tcp, "8080-8081:80", "8080-8081:80"),
    ] {
        match t.prepare_remove(proto, spec, EPH) {
            Err(SpecError::NotForwarded { token: got, .. }) => assert_eq!(got, token),
            other => panic!("{spec:?}: {other:?}"),
        }
    }
    assert_eq!(
        t.prepare_remove(Proto::Tcp, "8080:81", EPH)
            .unwrap_err()
            .to_string(),
        "\"8080:81\": there is no rule tcp 8080 -> 81 to remove"
    );
    assert!(matches!(
        t.prepare_remove(Proto::Tcp, "0", EPH),
        Err(SpecError::PortZero { .. })
    ));
    t.remove(&t.prepare_remove(Proto::Tcp, "8080:80", EPH).unwrap());
    assert!(t.is_empty());
}

#[test]
fn hits_are_counted_per_rule() {
    let mut t = match table(&[(Proto::Tcp, "8080:80,9000-9001"), (Proto::Udp, "53")]) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(t.hit(Proto::Tcp, ANY, 8080), Some(80));
    assert_eq!(t.hit(Proto::Tcp, ANY, 9001), Some(9001));
    assert_eq!(t.hit(Proto::Tcp, ANY, 9000), Some(9000));
    assert_eq!(t.hit(Proto::Tcp, ANY, 53), None);
    assert_eq!(t.hit(Proto::Udp, ANY, 53), Some(53));
    let hits: Vec<(String, u64)> = t
        .rules_with_hits()
        .map(|(r, h)| (r.token.clone(), h))
        .collect();
    assert_eq!(
        hits,
        vec![
            ("8080:80".to_owned(), 1),
            ("9000-9001".to_owned(), 2),
            ("53".to_owned(), 1)
        ]
    );
    // Removing a rule drops its counter with it.
    let gone = t.prepare_remove(Proto::Tcp, "8080:80", EPH).unwrap();
    t.remove(&gone);
    assert_eq!(
        t.rules_with_hits().map(|(_, h)| h).collect::<Vec<_>>(),
        vec![2, 1]
    );
}

#[test]
fn kernel_keys_cover_every_port() {
    let t = tcp("198.51.100.1/80-81,443");
    let keys: Vec<_> = t.kernel_keys().collect();
    let v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    assert_eq!(
        keys,
        vec![
            (Proto::Tcp, v4, 80),
            (Proto::Tcp, v4, 81),
            // No address: both families.
            (Proto::Tcp, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 443),
            (Proto::Tcp, IpAddr::V6(Ipv6Addr::UNSPECIFIED), 443),
        ]
    );
    assert_eq!(t.port_count(), 4);
    // An IPv6 rule address is its own key.
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    let t = tcp("[2001:db8::1]/80-81");
    assert_eq!(
        t.kernel_keys().collect::<Vec<_>>(),
        vec![(Proto::Tcp, v6, 80), (Proto::Tcp, v6, 81)]
    );
    assert_eq!(t.port_count(), 2);
}

#[test]
fn lookups_by_family() {
    let t = match table(&[
        (Proto::Tcp, "8080:80"),
        (Proto::Tcp, "2001:db8::1/8443:443"),
        (Proto::Tcp, "198.51.100.1/8081:81"),
    ]) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let host6: IpAddr = "2001:db8::1".parse().unwrap();
    let other6: IpAddr = "2001:db8::2".parse().unwrap();
    // A rule without an address matches either family.
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8080), Some(80));
    assert_eq!(t.lookup(Proto::Tcp, host6, 8080), Some(80));
    assert_eq!(t.lookup(Proto::Tcp, other6, 8080), Some(80));
    // An IPv6 rule address only that address, never an IPv4 one.
    assert_eq!(t.lookup(Proto::Tcp, host6, 8443), Some(443));
    assert_eq!(t.lookup(Proto::Tcp, other6, 8443), None);
    assert_eq!(t.lookup(Proto::Tcp, ANY, 8443), None);
    // An IPv4 rule address never an IPv6 one.
    assert_eq!(t.lookup(Proto::Tcp, host6, 8081), None);
    assert_eq!(
        t.rule_for(Proto::Tcp, host6, 8443)
            .map(|r| r.token.as_str()),
        Some("2001:db8::1/8443:443")
    );
    // The same port on an IPv4 and an IPv6 address does not overlap.
    let mut t = tcp("198.51.100.1/9000");
    t.add_spec(Proto::Tcp, "2001:db8::1/9000", EPH).unwrap();
    assert_eq!(t.lookup(Proto::Tcp, host6, 9000), Some(9000));
    // A rule without an address does overlap an IPv6-addressed one.
    assert!(matches!(
        t.add_spec(Proto::Tcp, "9000", EPH),
        Err(SpecError::Overlap { .. })
    ));
}

#[test]
fn held_ports_cannot_be_taken_by_the_host() {
    // A free port to forward: ask the kernel for one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let held = PortReservations::reserve(&tcp(&format!("127.0.0.1/{port}"))).unwrap();
    assert_eq!(held.len(), 1);
    // Neither a listener nor a plain bind can take it while it is held.
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let listen = std::net::TcpListener::bind(addr);
    assert!(listen.is_err(), "port {port} taken by a listener");
    let sock = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&sock, sockopt::ReuseAddr, &true).unwrap();
    assert_eq!(
        bind(sock.as_raw_fd(), &SockaddrIn::from(addr)),
        Err(Errno::EADDRINUSE)
    );
    // Released, the host may use it again.
    drop(held);
    std::net::TcpListener::bind(addr).unwrap();
}

/// A port free on the loopback addresses of both families (asked of the
/// kernel, then let go).
fn free_port_both() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if std::net::TcpListener::bind(("::1", port)).is_ok()
            && std::net::UdpSocket::bind(("::1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

/// An `AF_INET6` socket with `IPV6_V6ONLY` bound to `addr` (the kind of
/// socket that shares a port with an IPv4 one).
fn bind6_only(ty: SockType, addr: std::net::SocketAddrV6) -> Result<OwnedFd, Errno> {
    let sock = socket(AddressFamily::Inet6, ty, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&sock, sockopt::Ipv6V6Only, &true)?;
    bind(sock.as_raw_fd(), &SockaddrIn6::from(addr))?;
    Ok(sock)
}

#[test]
fn ipv6_rule_addresses_are_held_on_ipv6_only() {
    let port = free_port_both();
    let held = PortReservations::reserve(&tcp(&format!("[::1]/{port}"))).unwrap();
    assert_eq!(held.len(), 1);
    let lo6 = std::net::SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0);
    assert_eq!(
        bind6_only(SockType::Stream, lo6).err(),
        Some(Errno::EADDRINUSE)
    );
    // IPV6_V6ONLY: the IPv4 side of the port is the host's.
    drop(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    drop(held);
    drop(bind6_only(SockType::Stream, lo6).unwrap());
}

#[test]
fn rules_without_an_address_hold_both_families() {
    let port = free_port_both();
    for (proto, ty) in [
        (Proto::Tcp, SockType::Stream),
        (Proto::Udp, SockType::Datagram),
    ] {
        let t = match table(&[(proto, &port.to_string())]) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let held = PortReservations::reserve(&t).unwrap();
        assert_eq!(held.len(), 2, "{proto}");
        assert_eq!(held.len(), t.port_count());
        let v4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let v6 = std::net::SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0);
        let sock4 = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None).unwrap();
        assert_eq!(
            bind(sock4.as_raw_fd(), &SockaddrIn::from(v4)),
            Err(Errno::EADDRINUSE),
            "{proto} IPv4"
        );
        assert_eq!(
            bind6_only(ty, v6).err(),
            Some(Errno::EADDRINUSE),
            "{proto} IPv6"
        );
        // Released: both families are free again.
        let mut held = held;
        held.release(t.rules());
        assert!(held.is_empty());
        drop(bind6_only(ty, v6).unwrap());
        let sock4 = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(sock4.as_raw_fd(), &SockaddrIn::from(v4)).unwrap();
    }
}

#[test]
fn a_port_the_host_uses_on_ipv6_only_is_in_use() {
    let port = free_port_both();
    let any6 = std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
    let host_user = bind6_only(SockType::Stream, any6).unwrap();
    let t = tcp(&format!("{port}:80"));
    match PortReservations::reserve(&t) {
        Err(e @ ReserveError::InUse { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("tcp port {port} is already in use on the host")),
                "{msg}"
            );
            assert!(msg.contains(&format!("\"{port}:80\"")), "{msg}");
        }
        other => panic!("reserved a port the host holds on IPv6: {other:?}"),
    }
    // Nothing of the refused rule is kept: its IPv4 side is free.
    drop(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    drop(host_user);
}

#[test]
fn an_ipv6_address_of_another_host_is_refused() {
    let port = free_port_both();
    match PortReservations::reserve(&tcp(&format!("2001:db8:ffff::99/{port}"))) {
        Err(ReserveError::NotLocal { addr, .. }) => {
            assert_eq!(addr, "2001:db8:ffff::99".parse::<IpAddr>().unwrap());
        }
        other => panic!("{other:?}"),
    }
}
