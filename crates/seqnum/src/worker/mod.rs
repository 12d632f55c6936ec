//! `seqnum-worker`: serves the seqnum echo protocol on listeners it binds,
//! inherits (`LISTEN_FDS`), takes over from another worker (`-T`), or
//! receives from its supervisor (`TAKEOVERD_FD`); hands everything to a
//! successor on request (`-t`).

mod event_loop;
mod giver;
mod startup;
mod supervised;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub use event_loop::Worker;

/// Command-line options of `seqnum-worker`.
#[derive(Debug, Parser)]
#[command(
    name = "seqnum-worker",
    version,
    about = "Serve the seqnum echo protocol, and hand every socket to a successor without dropping a connection",
    long_about = "Serve the seqnum echo protocol: each 4-byte big-endian counter a client sends is echoed back as-is.\n\n\
Sockets come from, in this order: a takeover from another worker (-T), the listeners systemd or systemfd pass \
in LISTEN_FDS, or a listener bound on -a/-p. With -t (or after -T) the worker offers a takeover channel: \
`seqnum-worker -T PATH` started later takes every listener and live connection, and this worker exits 0 once \
the successor has acked; if the successor fails, this worker carries on.\n\n\
Under takeoverd (TAKEOVERD_FD set) the worker serves what the supervisor hands it and reports every connection.",
    after_help = "Exit status: 0 after a clean stop or a completed handoff, 1 on a runtime error, 2 on bad arguments."
)]
pub struct Args {
    /// Address to bind the TCP listener on (IPv4 or IPv6 literal).
    #[arg(short = 'a', long = "listen-address", default_value = "127.0.0.1")]
    pub listen_address: IpAddr,
    /// Port to bind the TCP listener on.
    #[arg(short = 'p', long = "listen-port", default_value_t = 1234)]
    pub listen_port: u16,
    /// TCP listener backlog.
    #[arg(short = 'b', long = "listen-backlog", default_value_t = 1024, value_parser = clap::value_parser!(i32).range(1..=65535))]
    pub listen_backlog: i32,
    /// Offer a takeover channel on this Unix socket path (created mode 0600).
    #[arg(short = 't', long = "takeover-path", value_name = "PATH")]
    pub takeover_path: Option<PathBuf>,
    /// Take over every socket from the worker offering PATH, then offer PATH
    /// (or -t) so that takeovers chain.
    #[arg(short = 'T', long = "takeover", value_name = "PATH")]
    pub takeover: Option<PathBuf>,
    /// How long a giver waits for its successor's ack before resuming, and a
    /// taker for the giver's offer.
    #[arg(long = "ack-timeout-ms", default_value_t = 5000, value_name = "MS")]
    pub ack_timeout_ms: u64,
    /// Under takeoverd: the version of its channel to speak (3; 2 to behave
    /// as workers before `give`, 1 as workers before takeoverd's staged
    /// handoffs; for tests of compatibility).
    #[arg(long = "takeoverd-channel", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=3), hide = true)]
    pub takeoverd_channel: u32,
}

impl Args {
    /// The ack timeout as a `Duration`.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
}

/// Runs a worker until it stops; the exit status to use.
pub fn run(args: Args) -> Result<i32, StartError> {
    let mut worker = startup::start(&args)?;
    Ok(worker.run())
}

/// Why a worker could not start: what it was doing, and why that failed.
#[derive(Debug)]
pub struct StartError {
    doing: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StartError {
    fn new(doing: impl Into<String>) -> StartError {
        StartError { doing: doing.into(), source: None }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(e) => write!(f, "{}: {e}", self.doing),
            None => f.write_str(&self.doing),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> StartError {
        StartError { doing: "starting".into(), source: Some(e.into()) }
    }
}

/// Names what a step of starting was doing when it failed.
trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, StartError>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> Doing<T> for Result<T, E> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, StartError> {
        self.map_err(|e| StartError { doing: what(), source: Some(e.into()) })
    }
}
