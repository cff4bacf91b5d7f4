//! The `tapgate` command.
//!
//! # Theory of operation
//!
//! The binary edge: parse the command line, set up logging, run the daemon
//! and turn any error into one line on stderr (`tapgate: error: ...`) and
//! exit status 1. A verifier rejection also prints the verifier's log.
//! `stats`, `flows` and `rules` are clients of a running daemon's control socket
//! (see `tapgate::control`); they print its JSON document as is (`--json`)
//! or as text, and fail the same way.

use std::{io::Write, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use tapgate::{
    cli::{Cli, Command, QueryArgs, RunArgs},
    control::{self, ControlCommand},
    daemon::{self, Hooks},
    kernel::loader::LoaderError,
    privileges,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            init_logging(args.log_level.filter());
            run(&args)
        }
        Command::Agent(args) => {
            init_logging_threads(args.log_level.filter());
            tapgate::agent::run(&args)
        }
        Command::Stats(args) => query(ControlCommand::Stats, &args),
        Command::Flows(args) => query(ControlCommand::Flows, &args),
        Command::Rules(action) => query(action.command(), action.query()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tapgate: error: {e:#}");
            if let Some(log) = e
                .downcast_ref::<LoaderError>()
                .and_then(LoaderError::verifier_log)
            {
                eprintln!("verifier log:\n{}", log.trim_end());
            }
            ExitCode::FAILURE
        }
    }
}

/// `tapgate run`: the daemon on this thread, stopped by SIGINT/SIGTERM.
fn run(args: &RunArgs) -> anyhow::Result<()> {
    if !privileges::has_needed_caps() {
        anyhow::bail!("tapgate must run as root (it needs CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW)");
    }
    let mut hooks = Hooks {
        keep_on_signal: args.keep_datapath,
        ..Hooks::default()
    };
    let pin_dir = args
        .pin_dir
        .clone()
        .unwrap_or_else(|| tapgate::agent::run_pin_dir(&args.tap));
    // A datapath an earlier `--keep-datapath` run left is always adopted.
    if args.keep_datapath || pin_dir.exists() {
        hooks.state_file = Some(tapgate::agent::run_state_file(&args.tap));
        hooks.pin_dir = Some(pin_dir);
    }
    let _metrics = match args.metrics {
        Some(addr) => {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            hooks.queries = Some(rx);
            Some(tapgate::agent::server::serve_run_metrics(
                addr,
                args.tap.clone(),
                tx,
            )?)
        }
        None => None,
    };
    match daemon::run(args, hooks)? {
        daemon::Ended::Stopped(_) => Ok(()),
        daemon::Ended::TapGone => anyhow::bail!("tap {} disappeared (the guest is gone)", args.tap),
        daemon::Ended::NetnsGone => anyhow::bail!("the network namespace disappeared"),
    }
}

/// `tapgate stats` / `flows` / `rules ...`: asks the daemon and prints the
/// answer.
fn query(command: ControlCommand, args: &QueryArgs) -> anyhow::Result<()> {
    let path = args.target.socket_path();
    let doc = control::query(&path, &command, control::CLIENT_TIMEOUT)?;
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&doc).context("encoding the reply")?;
        text.push('\n');
        text
    } else {
        match command {
            ControlCommand::Stats => control::render_stats(&doc),
            ControlCommand::Flows => control::render_flows(&doc),
            ControlCommand::Rules(_) => control::render_rules(&doc),
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

/// [`init_logging`] for the agent: each line names its thread, which is
/// the attachment (`<container id prefix>/<tap>`) for datapath lines.
fn init_logging_threads(level: log::LevelFilter) {
    logger(level)
        .format(|buf, record| {
            let ts = buf.timestamp_millis();
            let thread = std::thread::current();
            writeln!(
                buf,
                "[{ts} {:<5} {} {}] {}",
                record.level(),
                thread.name().unwrap_or("-"),
                record.target(),
                record.args()
            )
        })
        .init();
}

fn init_logging(level: log::LevelFilter) {
    logger(level).init();
}

fn logger(level: log::LevelFilter) -> env_logger::Builder {
    // aya's own loader chatter is only useful when tracing.
    let aya_level = if level == log::LevelFilter::Trace {
        level
    } else {
        level.min(log::LevelFilter::Info)
    };
    let mut b = env_logger::Builder::new();
    b.filter_level(level)
        .filter_module("aya", aya_level)
        .filter_module("aya_obj", aya_level)
        .format_timestamp_millis()
        .parse_env("TAPGATE_LOG");
    b
}
