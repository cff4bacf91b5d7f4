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

mod daemon;

use std::{io::Write, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use tapgate::{
    cli::{Cli, Command, QueryArgs},
    control::{self, ControlCommand},
    loader::LoaderError,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            init_logging(args.log_level.filter());
            daemon::run(args)
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

fn init_logging(level: log::LevelFilter) {
    // aya's own loader chatter is only useful when tracing.
    let aya_level = if level == log::LevelFilter::Trace {
        level
    } else {
        level.min(log::LevelFilter::Info)
    };
    env_logger::Builder::new()
        .filter_level(level)
        .filter_module("aya", aya_level)
        .filter_module("aya_obj", aya_level)
        .format_timestamp_millis()
        .parse_env("TAPGATE_LOG")
        .init();
}
