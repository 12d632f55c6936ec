//! `seqnum-client`: load generator and judge for the seqnum echo protocol.
//!
//! Each connection sends a 4-byte big-endian seqnum from 0 upward,
//! lock-step (one message in flight), and checks that every echo equals
//! the seqnum sent. One mio event loop on one thread drives any number of
//! connections with O(1) work per event; see [`Args`] for the options and
//! [`Summary`] for what a run reports.
//!
//! ```no_run
//! use clap::Parser;
//! let args = seqnum::client::Args::parse_from(["seqnum-client", "--count", "10"]);
//! seqnum::client::init_logging();
//! let summary = seqnum::client::run(&args).expect("run");
//! println!("{}", summary.to_json());
//! assert!(summary.is_success());
//! ```

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::{fmt, io};

use mio::Poll;
use tracing::{debug, warn};

mod args;
mod conn;
mod driver;
pub mod histogram;
mod monitor;
mod report;

pub use args::Args;
pub use histogram::Histogram;
pub use report::{Counters, ErrorKind, LatencySummary, Summary};

/// Sets up logging to stderr: `RUST_LOG` filter (default `info`), colours
/// only when stderr is a terminal. Does nothing if a global subscriber is
/// already set.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Runs the client as `args` say and returns what it measured.
///
/// Returns when every connection is done: after `--count` messages each,
/// after `--duration` (plus the echoes then in flight), or, with neither,
/// only if every connection failed (with `--churn-messages`, each connection
/// is replaced after K echoes, so give `--duration`). Protocol and connection errors are
/// counted in the summary; `Err` means the run could not be carried out
/// (the poller or the `--timeline` file could not be set up).
pub fn run(args: &Args) -> Result<Summary, Error> {
    let target = args.target();
    check_source_addresses(args);
    check_fd_limit(args.connections);

    let mut poll = Poll::new().map_err(Error::Poller)?;
    let registry = poll.registry().try_clone().map_err(Error::Registry)?;
    let timeline = match &args.timeline {
        Some(path) => {
            Some(monitor::Timeline::create(path).map_err(|source| Error::Timeline { path: path.clone(), source })?)
        }
        None => None,
    };
    let cfg = driver::Config {
        target,
        connections: args.connections as usize,
        interval: args.interval(),
        timeout: args.timeout(),
        ramp: args.ramp(),
        count: args.count,
        churn: args.churn_messages,
        duration: args.duration,
        source_addresses: args.source_addresses.min(254),
    };
    debug!(?cfg, "starting");
    if args.count.is_none() && args.duration.is_none() {
        tracing::info!("no --count or --duration: running until killed, without a final summary");
    }
    let show_progress = std::io::stderr().is_terminal();
    let outcome = driver::Driver::new(cfg, registry, timeline, show_progress).run(&mut poll).map_err(Error::Polling)?;
    let mut summary = Summary::new(u64::from(args.connections), &outcome.counters, &outcome.latency, outcome.elapsed);
    summary.churn_messages = args.churn_messages;
    Ok(summary)
}

/// Why a run could not be carried out. The text names what failed; the
/// OS error is the [`source`](std::error::Error::source).
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Creating the mio poller failed.
    Poller(io::Error),
    /// Cloning the poller's registry failed.
    Registry(io::Error),
    /// The `--timeline` file could not be created.
    Timeline {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Waiting for events failed.
    Polling(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Poller(_) => f.write_str("creating the mio poller"),
            Error::Registry(_) => f.write_str("cloning the mio registry"),
            Error::Timeline { path, .. } => write!(f, "creating the timeline {}", path.display()),
            Error::Polling(_) => f.write_str("polling"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Poller(e) | Error::Registry(e) | Error::Polling(e) | Error::Timeline { source: e, .. } => Some(e),
        }
    }
}

/// `--source-addresses` applies to an IPv4 loopback target only.
fn check_source_addresses(args: &Args) {
    if args.source_addresses > 1 && !matches!(args.connect_address, IpAddr::V4(a) if a.is_loopback()) {
        warn!("--source-addresses only applies to an IPv4 loopback target; ignored");
    }
}

/// Raises the open-file soft limit to the hard one, and warns when even
/// that is too low for `connections`.
fn check_fd_limit(connections: u32) {
    if let Err(e) = takeover::raise_fd_limit() {
        warn!("could not raise the open-file limit: {e}");
    }
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|s| s.parse::<u64>().ok());
    let needed = u64::from(connections) + 16;
    if let Some(soft) = soft {
        if soft < needed {
            warn!(
                "the open-file limit is {soft}, {connections} connections need about {needed}: \
                 connects past it will fail (raise it first, e.g. ulimit -n {})",
                needed.next_power_of_two()
            );
        }
    }
}
