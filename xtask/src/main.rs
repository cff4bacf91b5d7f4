//! Developer tasks for tapgate: `cargo xtask <command>`.
//!
//! # Theory of operation
//!
//! Each command is a thin, explicit sequence of cargo and system commands.
//! All of them first run [`setup::ensure`], which installs what a fresh
//! machine lacks (Debian packages, bpf-linker) and costs nothing otherwise.
//! The eBPF object is built by `userspace/build.rs`, so building `tapgate`
//! builds and embeds the programs.

mod bench;
mod bench_agent;
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
    /// Install missing Debian packages, bpf-linker and kubernetes-validate
    /// (idempotent).
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
    /// Single-stream TCP throughput (iperf3) on the veth topology, tapgate
    /// (release build) against kernel routing + nft masquerade, both
    /// directions, and fragmented UDP (8 KiB datagrams); writes
    /// target/bench/latest.json (needs root). Then the reassembly and
    /// clock benchmarks, then the node agent's scale benchmark
    /// (`--attachments` pods in one agent; key `agent` of the JSON).
    Bench {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Measure only one side.
        #[arg(long, value_enum)]
        only: Option<bench::Peer>,
        /// Same as `--only tapgate`.
        #[arg(long, conflicts_with = "only")]
        skip_kernel: bool,
        /// Run only the clock benchmark (scan cost for 10k/100k/1M flows).
        #[arg(long, conflicts_with_all = ["only", "skip_kernel", "no_clock", "agent"])]
        clock: bool,
        /// Skip the clock benchmark.
        #[arg(long)]
        no_clock: bool,
        /// Run only the node agent's scale benchmark: set-up time, memory
        /// and interference of `--attachments` attachments in one agent.
        #[arg(long, conflicts_with_all = ["only", "skip_kernel", "no_agent"])]
        agent: bool,
        /// Skip the node agent's scale benchmark.
        #[arg(long)]
        no_agent: bool,
        /// Attachments in the agent benchmark.
        #[arg(long, default_value_t = 100)]
        attachments: usize,
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
        Cmd::Bench {
            seconds,
            only,
            skip_kernel,
            clock,
            no_clock,
            agent,
            no_agent,
            attachments,
        } => {
            setup::ensure()?;
            let agent_opts = bench_agent::Options {
                attachments,
                seconds,
            };
            let report = bench::report_path(&target_dir());
            if agent {
                return bench_agent::run(&build(true)?, &agent_opts, &report);
            }
            if !clock {
                let bin = build(true)?;
                let only = if skip_kernel {
                    Some(bench::Peer::Tapgate)
                } else {
                    only
                };
                bench::run(&bin, &bench::Options { seconds, only }, &report)?;
                // The reassembly cost per datagram (userspace/benches/frag.rs),
                // next to the end-to-end fragmented UDP numbers.
                run(cargo().args(["bench", "-p", "tapgate", "--bench", "frag"]))?;
            }
            if !no_clock {
                // The clock benchmark: the daemon's scan on real kernel maps
                // (userspace/benches/clock.rs); writes target/bench/clock.json.
                run(cargo().args(["bench", "-p", "tapgate", "--bench", "clock"]))?;
            }
            if clock || no_agent {
                return Ok(());
            }
            // After bench::run, which rewrites latest.json: the agent's
            // results are merged into it under `agent`.
            bench_agent::run(&build(true)?, &agent_opts, &report)
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

/// Runs `cmd`, echoing it first; fails unless it exits successfully.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
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
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("tapgate"))
}

/// Cargo's target directory (`$CARGO_TARGET_DIR` or `<workspace>/target`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
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
        .args([
            "test",
            "--workspace",
            "--exclude",
            "datapath-ebpf",
            "--no-fail-fast",
            "--",
        ])
        .args(test_args)
        .env("TAPGATE_BIN", &bin))
}
