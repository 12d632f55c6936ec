//! `seqnum-client`: load generator and judge for the seqnum echo protocol.
//!
//! Each connection sends a 4-byte big-endian seqnum from 0 upward,
//! lock-step (one message in flight), and checks that every echo equals
//! the seqnum sent. One mio event loop on one thread drives any number of
//! connections with O(1) work per event; see [`Args`] for the options and
//! [`Summary`] for what a run reports. A [`Plan`] says how many processes
//! a run needs (one holds one file descriptor per connection), and
//! [`run_processes`] runs it in that many and merges their summaries.
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
use std::path::PathBuf;
use std::{fmt, io};

use mio::Poll;
use tracing::{debug, warn};

mod args;
mod conn;
mod driver;
pub mod histogram;
mod monitor;
pub mod plan;
mod processes;
mod report;

pub use args::Args;
pub use histogram::Histogram;
pub use plan::{Limits, Plan, PlanError};
pub use processes::{run_processes, watch_coordinator};
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

/// Runs the client as `args` say, in this process, and returns what it
/// measured. (`--processes` is not looked at: see [`Plan`] and
/// [`run_processes`].)
///
/// Returns when every connection is done: after `--count` messages each,
/// after `--duration` (plus the echoes then in flight), or, with neither,
/// only if every connection failed (with `--churn-messages`, each connection
/// is replaced after K echoes, so give `--duration`). Protocol and connection errors are
/// counted in the summary; `Err` means the run could not be carried out
/// (the poller or the `--timeline` file could not be set up).
pub fn run(args: &Args) -> Result<Summary, Error> {
    let target = args.target();
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
    /// Blocking the signals that end a run of several processes, or
    /// opening the signalfd for them, failed.
    Signals(io::Error),
    /// This executable could not be found, to run it as client processes.
    Executable(io::Error),
    /// A client process could not be started (the others were killed).
    Spawn {
        /// Which, from 1.
        process: u32,
        /// Of how many.
        of: u32,
        /// Why.
        source: io::Error,
    },
    /// Waiting for the client processes failed (they were killed).
    Waiting(io::Error),
    /// A signal ended a run of several processes: they were killed.
    Interrupted(nix::sys::signal::Signal),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Poller(_) => f.write_str("creating the mio poller"),
            Error::Registry(_) => f.write_str("cloning the mio registry"),
            Error::Timeline { path, .. } => write!(f, "creating the timeline {}", path.display()),
            Error::Polling(_) => f.write_str("polling"),
            Error::Signals(_) => f.write_str("blocking SIGINT, SIGTERM and SIGHUP to read them from a signalfd"),
            Error::Executable(_) => f.write_str("finding this executable, to run it as the client processes"),
            Error::Spawn { process, of, .. } => {
                write!(f, "starting client process {process} of {of} (the ones already started were killed)")
            }
            Error::Waiting(_) => f.write_str("waiting for the client processes (they were killed)"),
            Error::Interrupted(sig) => write!(f, "{sig}: the client processes were killed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Poller(e)
            | Error::Registry(e)
            | Error::Polling(e)
            | Error::Timeline { source: e, .. }
            | Error::Signals(e)
            | Error::Executable(e)
            | Error::Spawn { source: e, .. }
            | Error::Waiting(e) => Some(e),
            Error::Interrupted(_) => None,
        }
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
    let needed = u64::from(connections) + plan::FD_MARGIN;
    if let Some(soft) = soft {
        if soft < needed {
            warn!(
                "the open-file limit is {soft}, {connections} connections need about {needed}: \
                 connects past it will fail (raise it first, e.g. ulimit -n {}, or split them over \
                 several processes: --processes)",
                needed.next_power_of_two()
            );
        }
    }
}
