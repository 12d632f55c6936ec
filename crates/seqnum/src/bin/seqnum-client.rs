//! `seqnum-client`: load generator and judge for the seqnum echo protocol.
//! See `seqnum-client --help` and [`seqnum::client`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use seqnum::client::{self, Args, Limits, Plan};

fn main() -> ExitCode {
    // Usage errors exit with status 2 (clap's default), --help with 0.
    let args = Args::parse();
    client::init_logging();
    // A client process of a coordinator (--processes) runs what it was
    // given; the coordinator has said what it decided.
    let coordinated = client::watch_coordinator();
    let plan = match Plan::new(&args, &Limits::of_this_machine()) {
        Ok(plan) => plan,
        Err(e) => Args::command().error(clap::error::ErrorKind::ArgumentConflict, e).exit(),
    };
    if !coordinated {
        plan.log();
    }
    let result = if plan.processes() > 1 { client::run_processes(&plan) } else { client::run(&plan.args) };
    match result {
        Ok(summary) => {
            if args.json {
                println!("{}", summary.to_json());
            } else {
                println!("{summary}");
            }
            if summary.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            tracing::error!("{}", takeover::log::report(&e));
            match e {
                // The signal was raised again but did not end the process.
                client::Error::Interrupted(sig) => ExitCode::from(128 + sig as u8),
                _ => ExitCode::from(1),
            }
        }
    }
}
