//! `seqnum-client`: load generator and judge for the seqnum echo protocol.
//! See `seqnum-client --help` and [`seqnum::client`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use seqnum::client::{self, Args};

fn main() -> ExitCode {
    // Usage errors exit with status 2 (clap's default), --help with 0.
    let args = Args::parse();
    client::init_logging();
    match client::run(&args) {
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
            ExitCode::from(1)
        }
    }
}
