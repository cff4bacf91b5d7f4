//! `cargo xtask setup`: install what building and testing tapgate needs.
//!
//! # Theory of operation
//!
//! A fresh machine has none of the eBPF toolchain. [`ensure`] checks, cheaply
//! and without network, for every Debian package in [`PACKAGES`] (one
//! `dpkg-query` call) and for `bpf-linker` 0.13.0; it installs only what is
//! missing (`apt-get update` once, then `apt-get install`, then `cargo
//! install bpf-linker` built against Debian's LLVM 22). The deploy/
//! manifests are checked offline with PyPI's `kubernetes-validate` (it
//! bundles the Kubernetes schemas), kept in a virtualenv of Debian's
//! python3 at [`venv_dir`]; it is (re)made only when its
//! `kubernetes-validate --version` is not [`KUBERNETES_VALIDATE_VERSION`].
//! Every other xtask command calls it first, so a second run costs a
//! fraction of a second.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run;

/// Debian packages: the eBPF toolchain (Debian's rustc carries `core` for
/// bpfel-unknown-none; LLVM 22 for bpf-linker) and the tools the tests and
/// the demo drive.
pub const PACKAGES: &[&str] = &[
    // eBPF toolchain
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // test and demo tools
    "iproute2",
    "nftables",
    "busybox",
    "udhcpc",
    "curl",
    "socat",
    "iperf3",
    "dnsutils",
    "traceroute",
    "tcpdump",
    "bpftool",
    "iputils-ping",
    "iputils-arping",
    "netcat-openbsd",
    "util-linux",
    "ethtool",
    // IPv6 guest tools: rdisc6/ndisc6, dhclient -6, dhcpcd
    "ndisc6",
    "isc-dhcp-client",
    "dhcpcd-base",
    // deploy/ checks: a virtualenv for kubernetes-validate, and
    // systemd-analyze for the unit file
    "python3-venv",
    "systemd",
    // a real CNI client for the node-agent tests (tests/src/podman.rs):
    // podman 4 with its CNI backend, runc (crun fails on hybrid cgroups),
    // the reference plugins in /usr/lib/cni. The container rootfs is built
    // from the `busybox` above (with its libraries): busybox-static would
    // replace that package (it Conflicts: busybox).
    "podman",
    "runc",
    "conmon",
    "containernetworking-plugins",
    // a real Prometheus server scrapes the agent's /metrics in a test
    "prometheus",
];

/// The kubernetes-validate release installed in [`venv_dir`]; 1.37.0
/// bundles strict schemas for Kubernetes 1.25 to 1.37.
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// The virtualenv holding kubernetes-validate and PyYAML:
/// `$TAPGATE_VENV`, else `$HOME/.local/share/tapgate/venv`. The deploy
/// test (`tests/tests/deploy.rs`) looks in the same place.
pub fn venv_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("TAPGATE_VENV") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::path::Path::new(&home).join(".local/share/tapgate/venv")
}

/// Whether [`venv_dir`] has kubernetes-validate of the pinned version.
pub fn kubernetes_validate_ok() -> bool {
    Command::new(venv_dir().join("bin/kubernetes-validate"))
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .any(|w| w == KUBERNETES_VALIDATE_VERSION)
        })
}

/// The bpf-linker release that builds against LLVM 22 here.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages from [`PACKAGES`] that are not installed.
pub fn missing_packages() -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\\n"])
        .args(PACKAGES)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !text.lines().any(|l| {
                let mut f = l.split_whitespace();
                f.next().and_then(|n| n.split(':').next()) == Some(*p) && f.next() == Some("ii")
            })
        })
        .collect())
}

/// Whether `bpf-linker` of the pinned version is on PATH or in ~/.cargo/bin.
pub fn bpf_linker_ok() -> bool {
    let candidates = [
        Some("bpf-linker".to_owned()),
        std::env::var("HOME")
            .ok()
            .map(|h| format!("{h}/.cargo/bin/bpf-linker")),
    ];
    candidates.into_iter().flatten().any(|bin| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs whatever is missing; does nothing (quickly) when all is there.
pub fn ensure() -> Result<()> {
    let missing = missing_packages()?;
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages: {}; run `cargo xtask setup` as root",
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !bpf_linker_ok() {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)"
        );
        run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    if !kubernetes_validate_ok() {
        let venv = venv_dir();
        eprintln!(
            "xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}",
            venv.display()
        );
        // Debian's python3 (python3-venv), whatever else is first on PATH.
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv))?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            ))
            .arg("PyYAML>=6"))?;
    }
    Ok(())
}
