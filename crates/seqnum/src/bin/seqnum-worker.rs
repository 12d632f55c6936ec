#![forbid(unsafe_code)]
//! `seqnum-worker`: see `seqnum-worker --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = seqnum::worker::Args::parse();
    takeover::log::init("seqnum-worker");
    if let Err(e) = takeover::raise_fd_limit() {
        tracing::warn!("could not raise the fd limit: {e}");
    }
    match seqnum::worker::run(args) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            tracing::error!("{}", takeover::log::report(&e));
            ExitCode::from(1)
        }
    }
}
