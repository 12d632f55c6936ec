//! How a run is laid out before it starts: how many client processes,
//! how many connections each, and how many loopback source addresses.
//!
//! The decisions are pure functions of the arguments and of the machine's
//! [`Limits`], so that they can be tested without a machine that has them.

use std::fmt;
use std::net::IpAddr;

use super::args::Args;

/// File descriptors a client process needs beside its connections (stdio,
/// the poller, the timeline, slack).
pub const FD_MARGIN: u64 = 32;

/// Size of the default ephemeral port range (32768..=60999), taken when
/// `net.ipv4.ip_local_port_range` cannot be read.
pub const DEFAULT_EPHEMERAL_PORTS: u64 = 28_232;

/// The most loopback source addresses (127.0.0.1..=127.0.0.254).
pub const MAX_SOURCE_ADDRESSES: u32 = 254;

/// What this machine allows a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open files one process may have: the hard `RLIMIT_NOFILE` (capped at
    /// `fs.nr_open`, which bounds what the soft limit can be raised to).
    pub files_per_process: u64,
    /// Size of the ephemeral port range (`net.ipv4.ip_local_port_range`):
    /// the connections one source address can hold to one server.
    pub ephemeral_ports: u64,
}

impl Limits {
    /// The limits of this process and machine; a figure that cannot be read
    /// is taken as unlimited (one process) or as the default port range.
    pub fn of_this_machine() -> Limits {
        use nix::sys::resource::{getrlimit, Resource};
        let hard = getrlimit(Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(_, hard)| hard);
        let nr_open = read_numbers("/proc/sys/fs/nr_open").and_then(|v| v.first().copied()).unwrap_or(u64::MAX);
        let ports = read_numbers("/proc/sys/net/ipv4/ip_local_port_range")
            .and_then(|v| Some(v.get(1)?.checked_sub(*v.first()?)? + 1))
            .unwrap_or(DEFAULT_EPHEMERAL_PORTS);
        Limits { files_per_process: hard.min(nr_open), ephemeral_ports: ports }
    }

    /// Connections a source address is given to one server at most: half
    /// the ephemeral ports. `connect()` looks for a port in one half of the
    /// range (one parity) first, and past it scans that whole half on every
    /// connect before it tries the other: 40 000 connections over 3 client
    /// processes on 2 addresses (20 000 each) spent 27 s in the kernel and
    /// timed out 937 echoes; on 8 addresses, 7.6 s and none.
    pub fn connections_per_source_address(&self) -> u64 {
        (self.ephemeral_ports / 2).max(1)
    }
}

fn read_numbers(path: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().map(|s| s.parse().ok()).collect()
}

/// Connections one process can hold with `files` open files at most.
pub fn connections_per_process(files: u64) -> u64 {
    files.saturating_sub(FD_MARGIN).max(1)
}

/// The fewest processes that hold `connections` when each may have
/// `files` open files.
pub fn processes_needed(connections: u32, files: u64) -> u32 {
    u64::from(connections).div_ceil(connections_per_process(files)).try_into().unwrap_or(u32::MAX)
}

/// `total` connections over `processes` processes, as evenly as can be:
/// the first `total % processes` get one more.
pub fn split(total: u32, processes: u32) -> Vec<u32> {
    assert!(processes >= 1 && processes <= total, "{processes} processes for {total} connections");
    let (each, extra) = (total / processes, total % processes);
    (0..processes).map(|i| each + u32::from(i < extra)).collect()
}

/// Connections on the busiest source address when each process spreads its
/// share over `addresses` addresses from the first (connection i of a
/// process on address i % addresses): the first address gets the most.
pub fn busiest_source_address(shares: &[u32], addresses: u32) -> u64 {
    shares.iter().map(|&s| u64::from(s.div_ceil(addresses))).sum()
}

/// The fewest source addresses, `at_least` or more, that keep every
/// address at or below `per_address` connections; `None` past 254.
pub fn source_addresses_needed(shares: &[u32], at_least: u32, per_address: u64) -> Option<u32> {
    (at_least.max(1)..=MAX_SOURCE_ADDRESSES).find(|&n| busiest_source_address(shares, n) <= per_address)
}

/// Why a run cannot be laid out; a usage error (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// More processes than connections.
    TooManyProcesses {
        /// `--processes`.
        processes: u32,
        /// `--connections`.
        connections: u32,
    },
    /// Even 254 loopback source addresses cannot hold the connections.
    TooManyConnections {
        /// `--connections`.
        connections: u32,
        /// Connections one source address is given at most.
        per_address: u64,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PlanError::TooManyProcesses { processes, connections } => write!(
                f,
                "--processes {processes} is more than --connections {connections}: every process needs a \
                 connection; give fewer processes, or leave --processes out to get as many as needed"
            ),
            PlanError::TooManyConnections { connections, per_address } => write!(
                f,
                "--connections {connections} to an IPv4 loopback server need more than {MAX_SOURCE_ADDRESSES} \
                 source addresses (--source-addresses) of {per_address} connections each (half the ephemeral \
                 port range); give at most about {} connections",
                u64::from(MAX_SOURCE_ADDRESSES) * per_address
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// How a run is laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The arguments as given, with `--source-addresses` raised if needed.
    pub args: Args,
    /// Connections of each process; a single share means this process runs
    /// them itself.
    pub shares: Vec<u32>,
    /// What was decided automatically, to say on stderr.
    pub notes: Vec<String>,
    /// What will probably go wrong, to say on stderr.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Lays out the run `args` ask for on a machine with `limits`.
    pub fn new(args: &Args, limits: &Limits) -> Result<Plan, PlanError> {
        let connections = args.connections;
        let per_process = connections_per_process(limits.files_per_process);
        let (mut notes, mut warnings) = (Vec::new(), Vec::new());
        let processes = match args.processes {
            Some(p) if p > connections => return Err(PlanError::TooManyProcesses { processes: p, connections }),
            Some(p) => p,
            None => {
                let p = processes_needed(connections, limits.files_per_process).min(connections);
                if p > 1 {
                    notes.push(format!(
                        "{connections} connections are more than one process can hold (open-file hard limit {}, \
                         less {FD_MARGIN} for other files): running them in {p} client processes (--processes)",
                        limits.files_per_process
                    ));
                }
                p
            }
        };
        let shares = split(connections, processes);
        if u64::from(shares[0]) > per_process {
            warnings.push(format!(
                "{} connections in one process are more than its open-file hard limit ({}, less {FD_MARGIN} for \
                 other files) allows: connects past it will fail; give --processes {} or more, or leave it out",
                shares[0],
                limits.files_per_process,
                processes_needed(connections, limits.files_per_process)
            ));
        }
        let mut args = args.clone();
        let per_address = limits.connections_per_source_address();
        if matches!(args.connect_address, IpAddr::V4(a) if a.is_loopback()) {
            let given = args.source_addresses;
            let needed = source_addresses_needed(&shares, given, per_address)
                .ok_or(PlanError::TooManyConnections { connections, per_address })?;
            if needed > given {
                notes.push(format!(
                    "--source-addresses {given} would put {} connections to one server on 127.0.0.1, more than \
                     {per_address} (half its {} ephemeral ports, past which connects slow down): using \
                     --source-addresses {needed} (127.0.0.1..=127.0.0.{needed})",
                    busiest_source_address(&shares, given),
                    limits.ephemeral_ports
                ));
                args.source_addresses = needed;
            }
        } else {
            if args.source_addresses > 1 {
                warnings.push("--source-addresses only applies to an IPv4 loopback server; ignored".to_string());
            }
            if u64::from(connections) > limits.ephemeral_ports {
                warnings.push(format!(
                    "{connections} connections to one server from one source address are more than its {} \
                     ephemeral ports: connects past them will fail (--source-addresses only helps with an IPv4 \
                     loopback server)",
                    limits.ephemeral_ports
                ));
            }
        }
        if args.count.is_none() && args.duration.is_none() {
            notes.push("no --count or --duration: running until killed, without a final summary".to_string());
        }
        Ok(Plan { args, shares, notes, warnings })
    }

    /// Number of client processes.
    pub fn processes(&self) -> u32 {
        self.shares.len() as u32
    }

    /// Logs the notes (info) and warnings (warn) on stderr.
    pub fn log(&self) {
        for n in &self.notes {
            tracing::info!("{n}");
        }
        for w in &self.warnings {
            tracing::warn!("{w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const MACHINE: Limits = Limits { files_per_process: 20_000, ephemeral_ports: 28_232 };

    fn plan(args: &[&str], limits: &Limits) -> Result<Plan, PlanError> {
        let args = Args::try_parse_from(std::iter::once("seqnum-client").chain(args.iter().copied())).unwrap();
        Plan::new(&args, limits)
    }

    #[test]
    fn processes_needed_for_a_limit() {
        assert_eq!(connections_per_process(20_000), 19_968);
        assert_eq!(processes_needed(1, 20_000), 1);
        assert_eq!(processes_needed(19_968, 20_000), 1);
        assert_eq!(processes_needed(19_969, 20_000), 2);
        assert_eq!(processes_needed(40_000, 20_000), 3);
        assert_eq!(processes_needed(100_000, 20_000), 6);
        assert_eq!(processes_needed(100_000, 1024), 101);
        assert_eq!(processes_needed(100, 100), 2);
        assert_eq!(processes_needed(100_000, u64::MAX), 1);
        // A limit below the margin still leaves one connection a process.
        assert_eq!(processes_needed(5, 10), 5);
    }

    #[test]
    fn split_is_even() {
        assert_eq!(split(30, 3), [10, 10, 10]);
        assert_eq!(split(100_000, 6), [16_667, 16_667, 16_667, 16_667, 16_666, 16_666]);
        assert_eq!(split(7, 7), [1; 7]);
        assert_eq!(split(5, 1), [5]);
        for (total, p) in [(100_000, 6), (31, 4), (1, 1), (1000, 999)] {
            let s = split(total, p);
            assert_eq!(s.iter().sum::<u32>(), total);
            assert!(s.iter().max().unwrap() - s.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn source_addresses_for_the_busiest() {
        assert_eq!(busiest_source_address(&[10, 10, 10], 1), 30);
        // Each process starts at 127.0.0.1: 4 + 4 + 4 on the first address.
        assert_eq!(busiest_source_address(&[10, 10, 10], 3), 12);
        assert_eq!(MACHINE.connections_per_source_address(), 14_116);
        assert_eq!(source_addresses_needed(&[14_116], 1, 14_116), Some(1));
        assert_eq!(source_addresses_needed(&[14_117], 1, 14_116), Some(2));
        assert_eq!(source_addresses_needed(&[13_334, 13_333, 13_333], 1, 14_116), Some(3));
        assert_eq!(source_addresses_needed(&[16_667; 6], 1, 14_116), Some(8));
        assert_eq!(source_addresses_needed(&[16_667; 6], 10, 14_116), Some(10), "never lowered");
        assert_eq!(source_addresses_needed(&[u32::MAX], 1, 14_116), None);
    }

    #[test]
    fn one_process_when_it_fits() {
        let p = plan(&["--connections", "14116", "--count", "1"], &MACHINE).unwrap();
        assert_eq!((p.shares.as_slice(), p.args.source_addresses), (&[14_116][..], 1));
        assert!(p.notes.is_empty() && p.warnings.is_empty(), "{p:?}");
        // One process still, on two source addresses.
        let p = plan(&["--connections", "19968", "--count", "1"], &MACHINE).unwrap();
        assert_eq!((p.shares.as_slice(), p.args.source_addresses), (&[19_968][..], 2));
        assert_eq!(p.notes.len(), 1, "{p:?}");
    }

    #[test]
    fn hundred_thousand_connections_split_and_spread() {
        let p = plan(&["--connections", "100000", "--duration", "10"], &MACHINE).unwrap();
        assert_eq!(p.processes(), 6);
        assert_eq!(p.shares.iter().sum::<u32>(), 100_000);
        assert_eq!(p.args.source_addresses, 8);
        assert_eq!(p.args.processes, None, "the plan keeps the arguments as given");
        assert_eq!(p.notes.len(), 2, "{p:?}");
        assert!(p.notes[0].contains("6 client processes"), "{}", p.notes[0]);
        assert!(p.notes[1].contains("--source-addresses 8"), "{}", p.notes[1]);
        assert!(p.warnings.is_empty(), "{p:?}");
        // More addresses than needed are kept.
        let p = plan(&["--connections", "100000", "--source-addresses", "10", "--count", "1"], &MACHINE).unwrap();
        assert_eq!((p.args.source_addresses, p.notes.len()), (10, 1));
    }

    #[test]
    fn given_processes() {
        let p = plan(&["--connections", "30", "--processes", "3", "--count", "1"], &MACHINE).unwrap();
        assert_eq!(p.shares, [10, 10, 10]);
        assert!(p.notes.is_empty() && p.warnings.is_empty(), "{p:?}");
        let e = plan(&["--connections", "3", "--processes", "4"], &MACHINE).unwrap_err();
        assert_eq!(e, PlanError::TooManyProcesses { processes: 4, connections: 3 });
        assert!(e.to_string().contains("--processes 4"), "{e}");
        // Too few processes for the limit: a warning that says how many.
        let p = plan(&["--connections", "50000", "--processes", "2"], &MACHINE).unwrap();
        assert_eq!(p.warnings.len(), 1, "{p:?}");
        assert!(p.warnings[0].contains("--processes 3"), "{}", p.warnings[0]);
    }

    #[test]
    fn small_limits() {
        let limits = Limits { files_per_process: 100, ephemeral_ports: 100 };
        let p = plan(&["--connections", "150"], &limits).unwrap();
        assert_eq!(p.shares, [50, 50, 50]);
        // Three addresses would put 17 + 17 + 17 on the first, of 50.
        assert_eq!(p.args.source_addresses, 4);
        let e = plan(&["--connections", "20000", "--processes", "1"], &limits).unwrap_err();
        assert!(matches!(e, PlanError::TooManyConnections { connections: 20_000, per_address: 50 }), "{e:?}");
        assert!(e.to_string().contains("--source-addresses"), "{e}");
    }

    #[test]
    fn endless_runs_are_noted() {
        let p = plan(&[], &MACHINE).unwrap();
        assert_eq!(p.notes.len(), 1, "{p:?}");
        assert!(p.notes[0].contains("until killed"), "{p:?}");
    }

    #[test]
    fn other_servers_get_no_source_addresses() {
        for addr in ["::1", "10.1.2.3"] {
            let p = plan(&["-a", addr, "--connections", "100000"], &MACHINE).unwrap();
            assert_eq!(p.args.source_addresses, 1);
            assert_eq!(p.processes(), 6);
            assert!(p.warnings.iter().any(|w| w.contains("ephemeral ports")), "{p:?}");
        }
        let p = plan(&["-a", "::1", "--source-addresses", "3"], &MACHINE).unwrap();
        assert!(p.warnings.iter().any(|w| w.contains("ignored")), "{p:?}");
    }
}
