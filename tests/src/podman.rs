//! A real container runtime as the CNI client: podman 4 (CNI backend, runc)
//! in a throwaway environment.
//!
//! # Theory of operation
//!
//! [`Podman::new`] builds a private podman installation in a
//! [`ScratchDir`] and drives the `podman` command line against it; nothing
//! of the machine's own podman, CNI or storage configuration is read or
//! written:
//!
//! ```text
//! <scratch>/containers.conf    CONTAINERS_CONF (read instead of /etc/containers/...)
//! <scratch>/storage.conf       CONTAINERS_STORAGE_CONF (driver vfs, graphroot/runroot below)
//! <scratch>/root, runroot, tmp --root, --runroot, --tmpdir (libpod's bolt DB, locks, exits)
//! <scratch>/net.d/NAME.conflist the test's network (--network-config-dir)
//! <scratch>/plugins/           plugins under test; searched before /usr/lib/cni
//! <scratch>/cni-ipam/          host-local's dataDir (leases), filled into the conflist
//! <scratch>/rootfs/            busybox tree for `podman run --rootfs`
//! <scratch>/events.log         events_logger = "file" (no journald needed)
//! ```
//!
//! `containers.conf` sets `network_backend = "cni"` (podman 4.3 then reads
//! `*.conflist` from the network config dir and runs plugin types it does
//! not know), `runtime = "runc"` (crun fails on this machine's hybrid
//! cgroups), `cgroup_manager = "cgroupfs"` (no systemd), `lock_type =
//! "file"` (the default SHM lock segment `/dev/shm/libpod_lock` is shared by
//! every podman on the machine, and a fresh runroot makes podman free all
//! of its locks) and the `k8s-file` log driver.
//!
//! **The node.** The bridge plugin creates its bridge, and every CNI plugin
//! runs, in the network namespace podman runs in. Every podman command
//! therefore runs as `nsenter --net=/run/netns/NODE podman ...`
//! ([`nsenter_net`]): only the network namespace changes. `ip netns exec`
//! would be wrong here: it puts podman in a private mount namespace with
//! its own `/sys`, so the bind mount podman makes for the container's
//! network namespace (`/run/netns/netns-UUID`, its `SandboxKey`) and the
//! `shm` tmpfs in the runroot would exist only in that short-lived mount
//! namespace, invisible to the test and to the next podman command (which
//! runs CNI DEL). conmon and the container's processes stay in the node
//! namespace, so [`Netns`]'s `Drop` kills any that survive.
//!
//! **Containers.** There is no image registry: [`Podman::run`] starts
//! `podman run -d --rootfs <scratch>/rootfs ARGV` on a tree holding the
//! machine's busybox (plus the shared libraries `ldd` names, so a dynamic
//! busybox works as well as busybox-static), a symlink for every applet of
//! `busybox --list-full`, and minimal `/etc/passwd` and `/etc/group`.
//! podman's default `nofile`/`nproc` limits (1048576, 32768) are above what
//! this machine lets even root set (no `CAP_SYS_RESOURCE`), so every
//! container gets `--ulimit nofile=4096:4096 --ulimit nproc=4096:4096`. All
//! options go before `--rootfs`: podman stops parsing its own options at
//! the first positional argument (the rootfs), so anything later would be
//! handed to the container's command. The container's pid and network
//! namespace path come from `podman inspect` (`.State.Pid`,
//! `.NetworkSettings.SandboxKey`).
//!
//! **Teardown.** [`Container::rm`] (and its `Drop`) runs `podman rm -f -t 0
//! --ignore`: `-t 0` kills at once (a `sleep` as PID 1 ignores SIGTERM,
//! which costs podman's 10 s stop timeout), and podman runs CNI DEL for
//! every plugin in reverse order, deletes the network namespace and
//! unmounts the container's `shm`. `Drop` of [`Podman`] then removes any
//! container left (`podman rm -a -f -t 0`), unmounts (lazily, deepest
//! first) whatever is still mounted below the scratch directory or at a
//! container's `SandboxKey`, and deletes the directory.
//!
//! What podman 4.3 still writes outside the scratch directory: the
//! container's netns bind mount `/run/netns/netns-UUID` and libcni's result
//! cache `/var/lib/cni/results/NETWORK-CONTAINERID-eth0`, both unique per
//! container and both removed by `podman rm`; cgroups under
//! `/sys/fs/cgroup/*/libpod_parent/`, removed likewise.
//!
//! What a plugin in the chain sees from podman 4.3 (observed with a
//! logging plugin): first `VERSION` (with `CNI_NETNS=dummy`,
//! `CNI_IFNAME=dummy`), then `ADD` with `CNI_NETNS=/run/netns/netns-UUID`,
//! `CNI_IFNAME=eth0` for *every* plugin of the list (a binding plugin names
//! its tap from its own configuration), `CNI_CONTAINERID` = the 64-hex
//! container id, `CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=<container name>`
//! (no `K8S_POD_NAMESPACE`), and the previous plugin's result as
//! `prevResult` on stdin; `DEL` gets the same, in reverse plugin order,
//! while the netns still exists.

use std::cell::RefCell;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::child::{check_output, run_with_timeout};
use crate::netns::Netns;
use crate::scratch::ScratchDir;

/// Bound on one podman command.
pub const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on a command run inside a container or its namespace.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The `--ulimit` options every container gets (see the module docs).
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
];

/// The reference CNI plugins Debian's `containernetworking-plugins` ships.
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";

/// A command that runs `program` with only its network namespace switched
/// to the one at `ns_path` (`nsenter --net=PATH -- program`); the mount
/// namespace, `/sys` included, stays the machine's.
pub fn nsenter_net(ns_path: &Path, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns_path.display()))
        .arg("--")
        .arg(program);
    cmd
}

/// A private podman installation whose CNI plugins run in `node`.
///
/// Borrowing the node namespace makes the compiler drop the environment
/// (removing its containers) before the namespace.
#[derive(Debug)]
pub struct Podman<'n> {
    node: &'n Netns,
    network: String,
    /// `SandboxKey`s of the containers started, for the unmount fallback.
    sandboxes: RefCell<Vec<PathBuf>>,
    // Declared last: everything above uses it.
    dir: ScratchDir,
}

impl<'n> Podman<'n> {
    /// Builds the environment for the network `conflist` (a CNI
    /// configuration list; its `name` is the network containers join).
    ///
    /// Every plugin whose `ipam.type` is `host-local` and that has no
    /// `ipam.dataDir` gets [`Podman::ipam_dir`], so leases never go to the
    /// machine's `/var/lib/cni/networks`.
    pub fn new(node: &'n Netns, conflist: &Value) -> Result<Podman<'n>> {
        let dir = ScratchDir::new("podman")?;
        let base = dir.path().to_str().context("scratch path is not UTF-8")?;
        if base.contains(['"', '\\', '\'']) {
            bail!("scratch path {base} contains a quote or backslash");
        }
        for sub in [
            "root", "runroot", "tmp", "net.d", "plugins", "cni-ipam", "rootfs",
        ] {
            std::fs::create_dir(dir.join(sub))
                .with_context(|| format!("cannot create {base}/{sub}"))?;
        }

        let mut conflist = conflist.clone();
        let network = conflist
            .get("name")
            .and_then(Value::as_str)
            .context("the conflist has no \"name\"")?
            .to_owned();
        if network.is_empty()
            || !network
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("network name {network:?} must be letters, digits and '-'");
        }
        let plugins = conflist
            .get_mut("plugins")
            .and_then(Value::as_array_mut)
            .context("the conflist has no \"plugins\" array")?;
        for plugin in plugins {
            if let Some(ipam) = plugin.get_mut("ipam").and_then(Value::as_object_mut)
                && ipam.get("type").and_then(Value::as_str) == Some("host-local")
                && !ipam.contains_key("dataDir")
            {
                ipam.insert("dataDir".into(), Value::from(format!("{base}/cni-ipam")));
            }
        }
        let conflist_path = dir.join("net.d").join(format!("{network}.conflist"));
        std::fs::write(&conflist_path, serde_json::to_vec_pretty(&conflist)?)
            .with_context(|| format!("cannot write {}", conflist_path.display()))?;

        let containers_conf = format!(
            r#"# written by tapgate-tests (tests/src/podman.rs)
[containers]
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{base}/plugins", "{SYSTEM_CNI_DIR}"]
network_config_dir = "{base}/net.d"
default_network = "{network}"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/events.log"
lock_type = "file"
tmp_dir = "{base}/tmp"
volume_path = "{base}/root/volumes"
"#
        );
        std::fs::write(dir.join("containers.conf"), containers_conf)
            .context("cannot write containers.conf")?;
        let storage_conf = format!(
            r#"# written by tapgate-tests (tests/src/podman.rs)
[storage]
driver = "vfs"
graphroot = "{base}/root"
runroot = "{base}/runroot"
"#
        );
        std::fs::write(dir.join("storage.conf"), storage_conf)
            .context("cannot write storage.conf")?;

        build_rootfs(&dir.join("rootfs"))?;

        Ok(Podman {
            node,
            network,
            sandboxes: RefCell::new(Vec::new()),
            dir,
        })
    }

    /// The network (conflist `name`) containers join.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The node namespace podman and the plugins run in.
    pub fn node(&self) -> &Netns {
        self.node
    }

    /// The scratch directory holding everything.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// host-local's data directory (leases are in `NETWORK/IP` below it).
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("cni-ipam")
    }

    /// Path of host-local's lease file for `ip` on this network.
    pub fn lease_file(&self, ip: &str) -> PathBuf {
        self.ipam_dir().join(&self.network).join(ip)
    }

    /// The container root filesystem (to add files before [`Podman::run`]).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Makes the plugin binary `src` available as plugin type `name`
    /// (copied into the private plugin directory, searched before
    /// [`SYSTEM_CNI_DIR`]).
    pub fn add_plugin(&self, name: &str, src: &Path) -> Result<()> {
        if name.is_empty() || name.contains('/') {
            bail!("plugin name {name:?} must be a plain file name");
        }
        let dst = self.dir.join("plugins").join(name);
        std::fs::copy(src, &dst)
            .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
        Ok(())
    }

    /// A `podman` command with this environment's global options and
    /// configuration, run in the node namespace; add arguments with
    /// `.arg()`.
    pub fn command(&self) -> Command {
        let mut cmd = nsenter_net(Path::new(&self.node.path()), "podman");
        cmd.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .arg("--network-config-dir")
            .arg(self.dir.join("net.d"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
        cmd
    }

    /// Runs `podman ARGS` (bounded by [`PODMAN_TIMEOUT`]) and returns its
    /// output whatever its status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command();
        cmd.args(args);
        run_with_timeout(&mut cmd, PODMAN_TIMEOUT).with_context(|| format!("podman {args:?}"))
    }

    /// Runs `podman ARGS`; fails (with its output) unless it succeeds.
    pub fn podman(&self, args: &[&str]) -> Result<Output> {
        let out = self.output(args)?;
        check_output(&format!("podman {}", args.join(" ")), out)
    }

    /// `podman inspect NAME` as JSON (the first and only element).
    pub fn inspect(&self, name: &str) -> Result<Value> {
        let out = self.podman(&["inspect", "--type", "container", name])?;
        let mut all: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("podman inspect {name}: output is not JSON"))?;
        all.get_mut(0)
            .map(Value::take)
            .with_context(|| format!("podman inspect {name}: empty answer"))
    }

    /// Starts container `name` (detached) on this environment's network,
    /// running `argv` on the busybox rootfs, and returns its guard.
    pub fn run(&self, name: &str, argv: &[&str]) -> Result<Container<'_, 'n>> {
        if argv.is_empty() {
            bail!("empty container command");
        }
        let rootfs = self.rootfs();
        let rootfs = rootfs.to_str().context("rootfs path is not UTF-8")?;
        let mut args = vec!["run", "-d", "--name", name, "--network", &self.network];
        args.extend_from_slice(&ULIMITS);
        args.extend_from_slice(&["--rootfs", rootfs]);
        args.extend_from_slice(argv);
        let mut container = Container {
            podman: self,
            name: name.to_owned(),
            id: String::new(),
            pid: 0,
            netns: PathBuf::new(),
            removed: false,
        };
        // From here on the guard removes whatever podman created, even if
        // `run` itself failed half-way (podman leaves a created container).
        let out = self.podman(&args)?;
        container.id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let info = self.inspect(name)?;
        container.pid = info
            .pointer("/State/Pid")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p != 0)
            .with_context(|| format!("container {name} has no pid: {}", info["State"]))?;
        let sandbox = info
            .pointer("/NetworkSettings/SandboxKey")
            .and_then(Value::as_str)
            .unwrap_or_default();
        container.netns = if sandbox.is_empty() {
            PathBuf::from(format!("/proc/{}/ns/net", container.pid))
        } else {
            PathBuf::from(sandbox)
        };
        self.sandboxes.borrow_mut().push(container.netns.clone());
        log::debug!(
            "container {name} ({}) pid {} netns {}",
            container.id,
            container.pid,
            container.netns.display()
        );
        Ok(container)
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        match self.output(&["rm", "-a", "-f", "-t", "0"]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => log::warn!(
                "podman rm -a failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => log::warn!("podman rm -a failed: {e:#}"),
        }
        // Fallback for a podman that could not clean up: its netns pins
        // and mounts must not outlive the test.
        for sandbox in self.sandboxes.borrow().iter() {
            if sandbox.starts_with("/run/netns") && sandbox.exists() {
                log::warn!("removing leftover netns pin {}", sandbox.display());
                unmount(sandbox);
                let _ = std::fs::remove_file(sandbox);
            }
        }
        for mount in mounts_below(self.dir.path()) {
            log::warn!("unmounting leftover {}", mount.display());
            unmount(&mount);
        }
        // `dir` is removed when the field drops.
    }
}

/// One container of a [`Podman`] environment; removed (CNI DEL) on drop.
#[derive(Debug)]
pub struct Container<'p, 'n> {
    podman: &'p Podman<'n>,
    name: String,
    id: String,
    pid: u32,
    netns: PathBuf,
    removed: bool,
}

impl Container<'_, '_> {
    /// The container's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container id (`CNI_CONTAINERID`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pid of the container's first process (in the machine's pid
    /// namespace).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The container's network namespace (`CNI_NETNS`), as podman reports
    /// it (`/run/netns/netns-UUID`).
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// A command running the machine's `program` in the container's
    /// network namespace (not in the container).
    pub fn netns_cmd(&self, program: &str) -> Command {
        nsenter_net(&self.netns, program)
    }

    /// Runs the machine's `argv` in the container's network namespace
    /// (bounded by [`EXEC_TIMEOUT`]); fails unless it succeeds.
    pub fn in_netns(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("empty command line")?;
        let mut cmd = self.netns_cmd(program);
        cmd.args(args);
        let what = format!("[netns of {}] {}", self.name, argv.join(" "));
        let out = run_with_timeout(&mut cmd, EXEC_TIMEOUT).with_context(|| what.clone())?;
        check_output(&what, out)
    }

    /// Runs `argv` inside the container (`podman exec`); fails unless it
    /// succeeds.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let mut args = vec!["exec", self.name.as_str()];
        args.extend_from_slice(argv);
        self.podman.podman(&args)
    }

    /// Removes the container (`podman rm -f -t 0`), which runs CNI DEL;
    /// idempotent.
    pub fn rm(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.podman
            .podman(&["rm", "-f", "-t", "0", "--ignore", &self.name])?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for Container<'_, '_> {
    fn drop(&mut self) {
        if let Err(e) = self.rm() {
            log::warn!("cannot remove container {}: {e:#}", self.name);
        }
    }
}

/// Fills `rootfs` with busybox, its applets and minimal `/etc` files.
fn build_rootfs(rootfs: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    for sub in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
        "var/www",
    ] {
        std::fs::create_dir_all(rootfs.join(sub))
            .with_context(|| format!("cannot create {}/{sub}", rootfs.display()))?;
    }
    copy_into(busybox, rootfs)?;
    // A dynamically linked busybox needs its libraries; busybox-static has
    // none (`ldd` then fails, which is fine).
    let ldd = run_with_timeout(Command::new("ldd").arg(busybox), EXEC_TIMEOUT)?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let lib = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
            copy_into(Path::new(lib), rootfs)?;
        }
    }
    let list = check_output(
        "busybox --list-full",
        run_with_timeout(Command::new(busybox).arg("--list-full"), EXEC_TIMEOUT)?,
    )?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet.contains("..") {
            continue;
        }
        let link = rootfs.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nqemu:x:107:107:qemu:/:/bin/false\n\
         nobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .context("cannot write etc/passwd")?;
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\nqemu:x:107:\nnogroup:x:65534:\n",
    )
    .context("cannot write etc/group")?;
    Ok(())
}

/// Copies the file `src` (an absolute path) to the same path below `root`.
fn copy_into(src: &Path, root: &Path) -> Result<()> {
    let rel = src.strip_prefix("/").unwrap_or(src);
    let dst = root.join(rel);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::copy(src, &dst)
        .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
    Ok(())
}

/// Mount points at or below `dir` in this process's mount namespace,
/// deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount| mount.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// Decodes the octal escapes (`\040` for a space, ...) of a mountinfo
/// field.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts `path` (errors are logged: this runs from `Drop`).
fn unmount(path: &Path) {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c_path` is a valid NUL-terminated string for the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        log::warn!(
            "umount {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mountinfo;

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape_mountinfo("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }
}
