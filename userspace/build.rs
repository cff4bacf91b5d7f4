//! Builds the eBPF object (`datapath-ebpf`) and hands it to the `tapgate`
//! crate, which embeds it.
//!
//! # Theory of operation
//!
//! There is no `rust-src` for the nightly toolchain on these machines, so the
//! usual `-Z build-std` route is unavailable. Debian's rustc (installed by
//! `cargo xtask setup`) ships `core` for `bpfel-unknown-none` in its sysroot,
//! so the eBPF crate is built by a nested `cargo build` that uses that rustc
//! (`RUSTC=/usr/bin/rustc`), in a target directory of its own so it neither
//! waits for the outer build's lock nor invalidates its fingerprints, and
//! linked by `bpf-linker`. The object is copied to `OUT_DIR/tapgate.bpf.o`.
//!
//! Overrides: `TAPGATE_BPF_RUSTC` (the rustc with a BPF sysroot),
//! `TAPGATE_BPF_LINKER_DIR` (a directory holding `bpf-linker`).

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, exit},
};

fn fail(msg: &str) -> ! {
    eprintln!("error: building the eBPF object: {msg}");
    eprintln!("hint: `cargo xtask setup` installs the eBPF toolchain");
    exit(1)
}

fn path_of(var: &str) -> PathBuf {
    env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| fail(&format!("cargo did not set {var}")))
}

/// Finds `bpf-linker` on PATH, in `~/.cargo/bin` or the override directory
/// and returns a PATH value that contains it.
fn path_with_linker() -> OsString {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(d) = env::var_os("TAPGATE_BPF_LINKER_DIR") {
        dirs.insert(0, PathBuf::from(d));
    }
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    if !dirs.iter().any(|d| d.join("bpf-linker").is_file()) {
        fail("bpf-linker not found on PATH or in ~/.cargo/bin");
    }
    env::join_paths(dirs).unwrap_or_else(|e| fail(&format!("bad PATH: {e}")))
}

fn check_bpf_sysroot(rustc: &Path) {
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", rustc.display())));
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let lib = Path::new(&sysroot).join("lib/rustlib/bpfel-unknown-none/lib");
    if !lib.is_dir() {
        fail(&format!(
            "{} has no `core` for bpfel-unknown-none (missing {})",
            rustc.display(),
            lib.display()
        ));
    }
}

fn main() {
    let manifest_dir = path_of("CARGO_MANIFEST_DIR");
    let out_dir = path_of("OUT_DIR");
    let workspace = manifest_dir
        .parent()
        .unwrap_or_else(|| fail("userspace crate has no parent directory"))
        .to_path_buf();
    for dir in [
        "datapath-ebpf/src",
        "datapath-ebpf/Cargo.toml",
        "datapath-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=TAPGATE_BPF_RUSTC");
    println!("cargo:rerun-if-env-changed=TAPGATE_BPF_LINKER_DIR");

    let rustc = env::var_os("TAPGATE_BPF_RUSTC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/rustc"));
    if !rustc.is_file() {
        fail(&format!("{} not found", rustc.display()));
    }
    check_bpf_sysroot(&rustc);

    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: keep the eBPF
    // build beside the outer one, in <target>/ebpf.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|t| t.join("ebpf"))
        .unwrap_or_else(|| workspace.join("target/ebpf"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "-p",
            "datapath-ebpf",
            "--target",
            "bpfel-unknown-none",
            "--release",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", path_with_linker())
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Ctarget-cpu=v3", "-Clink-arg=--btf"].join("\x1f"),
        );
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    // Cargo sets these for build scripts; they must not leak into the nested build.
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_CFG_")
            || k == "TARGET"
            || k == "HOST"
            || k == "OUT_DIR"
            || k == "DEBUG"
            || k == "OPT_LEVEL"
            || k == "PROFILE"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run cargo: {e}")));
    if !status.success() {
        fail(&format!("nested cargo build failed ({status})"));
    }
    let obj = target_dir.join("bpfel-unknown-none/release/datapath-ebpf");
    let dest = out_dir.join("tapgate.bpf.o");
    std::fs::copy(&obj, &dest).unwrap_or_else(|e| {
        fail(&format!(
            "cannot copy {} to {}: {e}",
            obj.display(),
            dest.display()
        ))
    });
}
