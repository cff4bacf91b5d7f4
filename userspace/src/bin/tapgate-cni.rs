//! `tapgate-cni`: the CNI plugin binary (see `tapgate::cni`).
//!
//! Reads the CNI environment and the configuration on stdin, runs the
//! plugin and prints its one JSON document on stdout. Logs go to stderr,
//! at the level of `TAPGATE_CNI_LOG` (default `warn`).

use std::io::{Read, Write};

use tapgate::cni::{self, CniError, CniVersion, Code, Outcome};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("TAPGATE_CNI_LOG", "warn"))
        .target(env_logger::Target::Stderr)
        .init();
    let env = cni::CniEnv::from_process();
    let mut stdin = Vec::new();
    // VERSION needs no stdin; for the rest an unreadable stdin shows up as
    // a decode error of the (empty) configuration.
    let read = std::io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Err(e) => failure(CniError::new(Code::Io, format!("reading stdin: {e}"))),
        Ok(_) => std::panic::catch_unwind(|| cni::run(&env, &stdin)).unwrap_or_else(|_| {
            failure(CniError::new(
                Code::Io,
                "internal error (panic); see stderr",
            ))
        }),
    };
    let mut out = std::io::stdout().lock();
    if out
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        eprintln!("tapgate-cni: cannot write the result to stdout");
        std::process::exit(1);
    }
    std::process::exit(outcome.exit_code);
}

fn failure(e: CniError) -> Outcome {
    Outcome {
        stdout: format!("{}\n", e.to_json(CniVersion::LATEST.as_str())),
        exit_code: 1,
    }
}
