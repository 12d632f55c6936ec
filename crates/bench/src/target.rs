//! The server a measurement drives: takeoverd + seqnum-worker, or
//! floor-echo, the floor it is compared with. The same client load runs
//! against either; only starting, counting connections and the pids whose
//! CPU counts differ.

use std::path::Path;
use std::time::Duration;

use crate::floor::FloorServer;
use crate::procs::Bins;
use crate::server::Server;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// takeoverd and its seqnum-worker.
    Takeoverd,
    /// floor-echo.
    Floor,
}

impl Kind {
    /// Its name in the report and in benchmarks.json.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Takeoverd => "takeoverd",
            Kind::Floor => "floor-echo",
        }
    }
}

/// A running server of either kind.
#[derive(Debug)]
pub enum Running {
    /// takeoverd (with its worker).
    Takeoverd(Server),
    /// floor-echo.
    Floor(FloorServer),
}

impl Running {
    /// Starts a server of `kind` on a free port, pinned to `cpu` if given;
    /// takeoverd with `workers` workers (floor-echo has one thread whatever
    /// `workers` says).
    pub fn start(
        bins: &Bins,
        dir: &Path,
        kind: Kind,
        tag: &str,
        cpu: Option<usize>,
        workers: usize,
    ) -> anyhow::Result<Running> {
        Ok(match kind {
            Kind::Takeoverd => {
                Running::Takeoverd(Server::start_with(bins, dir, tag, cpu, &crate::server::workers_args(workers))?)
            }
            Kind::Floor => Running::Floor(FloorServer::start(bins, dir, tag, cpu)?),
        })
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        match self {
            Running::Takeoverd(s) => s.port,
            Running::Floor(f) => f.port,
        }
    }

    /// Waits until the server holds `n` connections.
    pub fn wait_connections(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        match self {
            Running::Takeoverd(s) => s.wait_connections(n, timeout).map(drop),
            Running::Floor(f) => f.wait_connections(n, timeout),
        }
    }

    /// The processes that echo: the serving workers, or floor-echo.
    pub fn echo_pids(&self) -> anyhow::Result<Vec<u32>> {
        match self {
            Running::Takeoverd(s) => s.worker_pids(),
            Running::Floor(f) => Ok(vec![f.pid]),
        }
    }

    /// The other processes whose CPU counts as the server's: takeoverd.
    pub fn other_pids(&self) -> Vec<u32> {
        match self {
            Running::Takeoverd(s) => vec![s.pid],
            Running::Floor(_) => Vec::new(),
        }
    }

    /// Stops it.
    pub fn stop(self) {
        match self {
            Running::Takeoverd(s) => s.stop(),
            Running::Floor(f) => f.stop(),
        }
    }
}
