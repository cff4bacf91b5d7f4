//! Developer tasks for tapgate: `cargo xtask <command>`.
//!
//! # Theory of operation
//!
//! Each command is a thin, explicit sequence of cargo and system commands.
//! All of them first run [`setup::ensure`], which installs what a fresh
//! machine lacks (Debian packages, bpf-linker) and costs nothing otherwise.
//! The eBPF object is built by `userspace/build.rs`, so building `tapgate`
//! builds and embeds the programs.

mod demo;
mod setup;

use std::{os::unix::process::CommandExt, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// tapgate developer tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install missing Debian packages and bpf-linker (idempotent).
    Setup,
    /// Build the eBPF programs and the `tapgate` binary.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build everything, then run `tapgate run --tap TAP [ARGS...]` in the
    /// foreground.
    BuildAndLoad {
        /// The tap to attach to.
        #[arg(long)]
        tap: String,
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// More arguments for `tapgate run`, after `--`.
        #[arg(last = true)]
        run_args: Vec<String>,
    },
    /// Run the built-in demo topology: a guest behind a real tap gets its
    /// address by DHCP and pings the gateway.
    Demo,
    /// Run every test: formatting, lints, unit tests, eBPF loading and the
    /// end-to-end tests in network namespaces (needs root).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::ensure(),
        Cmd::Build { release } => {
            setup::ensure()?;
            build(release).map(drop)
        }
        Cmd::BuildAndLoad {
            tap,
            release,
            run_args,
        } => {
            setup::ensure()?;
            let bin = build(release)?;
            let err = Command::new(&bin)
                .args(["run", "--tap", &tap])
                .args(&run_args)
                .exec();
            Err(err).with_context(|| format!("running {}", bin.display()))
        }
        Cmd::Demo => {
            setup::ensure()?;
            build(false)?;
            demo::run()
        }
        Cmd::Test { no_lint, test_args } => {
            setup::ensure()?;
            test(no_lint, &test_args)
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: running {shown}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Builds `tapgate` (and with it the eBPF object); returns the binary's path.
fn build(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "tapgate"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("tapgate"))
}

fn test(no_lint: bool, test_args: &[String]) -> Result<()> {
    if !setup::is_root() {
        bail!("the end-to-end tests create network namespaces: run `cargo xtask test` as root");
    }
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    let bin = build(false)?;
    run(cargo()
        .args(["test", "--workspace", "--exclude", "datapath-ebpf", "--"])
        .args(test_args)
        .env("TAPGATE_BIN", &bin))
}
