//! The inject paths against a real kernel, in a private network namespace.
//!
//! Each test runs on a thread of its own that `unshare`s a new network
//! namespace (child processes it starts inherit it), so nothing touches the
//! machine's interfaces; the namespace disappears with the thread. Needs
//! root, like every test that touches the network (`cargo xtask test`).
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, UdpSocket},
    process::Command,
    time::Duration,
};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};
use tapgate::kernel::inject::WorldWriter;

/// Runs `f` on a new thread inside a fresh, private network namespace with
/// `lo` up.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: run `cargo xtask test` as root"
    );
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let st = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(st.success());
        f()
    })
    .join()
    .unwrap()
}

fn udp_packet(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let src = Ipv4Addr::new(127, 0, 0, 1);
    let udp = UdpRepr {
        src_port: 40000,
        dst_port,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: src,
        next_header: IpProtocol::Udp,
        payload_len: 8 + payload.len(),
        hop_limit: 64,
    };
    let caps = ChecksumCapabilities::default();
    let mut buf = vec![0u8; ip.buffer_len() + 8 + payload.len()];
    let mut pkt = Ipv4Packet::new_unchecked(&mut buf);
    ip.emit(&mut pkt, &caps);
    let mut u = UdpPacket::new_unchecked(pkt.payload_mut());
    udp.emit(
        &mut u,
        &src.into(),
        &src.into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

#[test]
fn world_writer_sends_through_host_routing() {
    let got = in_private_netns(|| {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let port = sock.local_addr().unwrap().port();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let w = WorldWriter::open().unwrap();
            w.send(&udp_packet(port, b"hello world")).await.unwrap();
            // An empty datagram (a 28-byte packet) goes out as well.
            w.send(&udp_packet(port, b"")).await.unwrap();
        });
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        let first = (buf[..n].to_vec(), from.port());
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        (first, n)
    });
    assert_eq!(got.0, (b"hello world".to_vec(), 40000));
    assert_eq!(got.1, 0);
}

#[test]
fn world_writer_rejects_non_ipv4() {
    in_private_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let w = WorldWriter::open().unwrap();
            assert!(w.send(&[0x60; 40]).await.is_err());
            assert!(w.send(&[]).await.is_err());
        });
    });
}
