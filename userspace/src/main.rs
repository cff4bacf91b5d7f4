//! The `tapgate` command.
//!
//! # Theory of operation
//!
//! The binary edge: parse the command line, set up logging, run the daemon
//! and turn any error into one line on stderr (`tapgate: error: ...`) and
//! exit status 1. A verifier rejection also prints the verifier's log.

mod daemon;

use std::process::ExitCode;

use clap::Parser;
use tapgate::{
    cli::{Cli, Command},
    loader::LoaderError,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            init_logging(args.log_level.filter());
            daemon::run(args)
        }
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
