//! Command-line arguments of `seqnum-client`.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Exit statuses, shown at the end of `--help`.
const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  every connection connected, and every echo came back, in time and equal
     to the seqnum sent
  1  at least one error (discontinuity, reset, EOF, timeout, connect error,
     a client process that failed), or the run could not be set up (e.g.
     the --timeline file)
  2  bad command-line arguments (also: more --processes than --connections,
     or more connections than 254 source addresses hold)

Without --duration or --count the client runs until it is killed (SIGINT or
SIGTERM end it at once, without a summary); give one of them to get a
summary and a meaningful exit status. With several processes, SIGINT,
SIGTERM or SIGHUP to the command kill every client process, and the
command then dies of the same signal.

Logging goes to stderr, filtered by RUST_LOG (default: info).";

/// Load generator and judge for the seqnum echo protocol.
///
/// Opens one or more TCP connections to a seqnum server and, on each, sends
/// a 4-byte big-endian counter from 0 upward, lock-step: the next seqnum
/// only once the echo of the previous one came back. Every echo must equal
/// the seqnum sent; anything else (a wrong value, a reset, an early EOF, a
/// missing echo) is an error. All connections of a process are driven by
/// one thread; past what one process can hold, the connections are split
/// over several processes (see --processes) and their summaries merged.
#[derive(Debug, Clone, PartialEq, Parser)]
#[command(name = "seqnum-client", version, after_help = EXIT_STATUS_HELP)]
pub struct Args {
    /// Server address: an IPv4 or IPv6 literal (IPv6 may be bracketed, e.g.
    /// `[::1]`).
    #[arg(
        short = 'a',
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1",
        value_parser = parse_ip
    )]
    pub connect_address: IpAddr,

    /// Server TCP port.
    #[arg(
        short = 'p',
        long,
        value_name = "PORT",
        default_value_t = 1234,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub connect_port: u16,

    /// Number of concurrent connections, all driven by one event loop per
    /// process. A process holds one file descriptor per connection: the
    /// soft open-file limit is raised to the hard one, and past what that
    /// allows one process (the hard limit less 32 for its other files) the
    /// connections are split over several processes (see --processes).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub connections: u32,

    /// Spread connections over N source addresses: connection i binds
    /// 127.0.0.(1 + i % N) before connecting (the port is left to the
    /// connect), to get past the ephemeral ports of one source address
    /// (~28 000, and connects slow down past ~14 000 to one server). Only
    /// for an IPv4 loopback server. When the connections on one source
    /// address would pass half the ephemeral port range
    /// (net.ipv4.ip_local_port_range; 14 116 by default), counted over all
    /// the processes (each spreads its own connections from 127.0.0.1), N
    /// is raised to the smallest that fits and the change logged on stderr:
    /// past half the range, every connect scans the half that connect()
    /// tries first. A run that 254 addresses cannot hold is refused.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=254)
    )]
    pub source_addresses: u32,

    /// Milliseconds between receiving an echo and sending the next message
    /// on the same connection; 0 sends the next one as soon as the echo is
    /// in.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub interval_ms: u64,

    /// Run for this many seconds (fractions allowed), then stop sending,
    /// wait for the echoes in flight and close every connection cleanly.
    #[arg(long, value_name = "S", value_parser = parse_seconds, conflicts_with = "count")]
    pub duration: Option<Duration>,

    /// Send this many messages on each connection, then close it cleanly.
    #[arg(
        long,
        value_name = "K",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub count: Option<u64>,

    /// Connection churn: each connection sends K seqnums (lock-step, as
    /// always), closes cleanly, and a new connection takes its place at
    /// once, so --connections stays the number of concurrent connections.
    /// The summary adds the connects made and their rate. A connection that
    /// fails after connecting is counted and replaced too; a connect that
    /// fails is counted and not replaced. Give --duration to end the run.
    #[arg(
        long,
        value_name = "K",
        conflicts_with = "count",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub churn_messages: Option<u64>,

    /// Milliseconds to wait for an echo after sending (and for a connect to
    /// complete); past it the connection records a timeout (a connect error
    /// while connecting) and is closed.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 2000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout_ms: u64,

    /// Print the final summary as one line of JSON on stdout (keys:
    /// connections, sent, echoed, discontinuities, resets, eofs, timeouts,
    /// connect_errors, errors, latency_us{p50,p99,p999,max,mean},
    /// echoes_per_sec, duration_s, connects, connects_per_sec,
    /// latency_histogram (the sparse histogram the percentiles come from,
    /// which merges with other runs'), churn_messages with
    /// --churn-messages, and processes and failed_processes with several
    /// processes) instead of a human-readable one.
    #[arg(long)]
    pub json: bool,

    /// Spread the initial connects evenly over this many milliseconds
    /// (useful with thousands of connections); 0 connects all at once.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub ramp_ms: u64,

    /// Write a CSV timeline to FILE: header `t_ms,echoes,p50_us,p99_us,
    /// max_us,errors`, then one row per 100 ms of the run, with the echoes
    /// received in that slice, their latency percentiles (0 if none), and
    /// the errors that happened in it. Rows are flushed as they close.
    /// With several processes, process N of P (N = 1..=P) writes `FILE.N`,
    /// its rows on its own clock (the processes start within milliseconds
    /// of each other); no merged file is written, since the percentiles of
    /// a slice cannot be made from those of each process.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,

    /// Run the connections in P client processes: this command runs its
    /// own executable P times, each with `--processes 1 --json`, its share
    /// of --connections (as even as can be), FILE.N for --timeline, and
    /// every other option as given, and holds no connection itself. It
    /// prints one summary of them all, as one process would: counts and
    /// rates summed, latency percentiles and mean from the merged
    /// histograms, the longest duration. Their stderr is passed on, each
    /// line prefixed `[client N/P]`. A process that fails (it prints no
    /// summary, or exits with a status its summary does not explain) is
    /// counted in `errors` (and `failed_processes`), named on stderr with
    /// the last lines it printed there, and the exit status is 1. Without
    /// --count or --duration, the first process to end ends the run: the
    /// others are killed. Default: as many as the open-file hard limit
    /// needs (see --connections), the split logged on stderr.
    #[arg(
        long,
        value_name = "P",
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    pub processes: Option<u32>,
}

impl Args {
    /// The server's socket address.
    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.connect_address, self.connect_port)
    }

    /// Time between an echo and the next send on a connection.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// How long an echo (or a connect) may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Time over which the initial connects are spread.
    pub fn ramp(&self) -> Duration {
        Duration::from_millis(self.ramp_ms)
    }

    /// The command line (without the program name) that parses back to
    /// these arguments: what a client process of `--processes` is given.
    pub fn to_command_line(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        let mut opt = |name: &str, value: String| {
            v.push(name.into());
            v.push(value.into());
        };
        opt("--connect-address", self.connect_address.to_string());
        opt("--connect-port", self.connect_port.to_string());
        opt("--connections", self.connections.to_string());
        opt("--source-addresses", self.source_addresses.to_string());
        opt("--interval-ms", self.interval_ms.to_string());
        if let Some(d) = self.duration {
            opt("--duration", d.as_secs_f64().to_string());
        }
        if let Some(k) = self.count {
            opt("--count", k.to_string());
        }
        if let Some(k) = self.churn_messages {
            opt("--churn-messages", k.to_string());
        }
        opt("--timeout-ms", self.timeout_ms.to_string());
        opt("--ramp-ms", self.ramp_ms.to_string());
        if let Some(p) = self.processes {
            opt("--processes", p.to_string());
        }
        if self.json {
            v.push("--json".into());
        }
        if let Some(path) = &self.timeline {
            v.push("--timeline".into());
            v.push(path.into());
        }
        v
    }
}

/// An IP literal, IPv6 optionally in brackets.
fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let inner = s.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).unwrap_or(s);
    inner.parse::<IpAddr>().map_err(|_| format!("`{s}` is not an IPv4 or IPv6 address literal"))
}

/// A positive, finite number of seconds, fractions allowed.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("`{s}`: the duration must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("seqnum-client").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_seed() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.target(), "127.0.0.1:1234".parse().unwrap());
        assert_eq!(a.connections, 1);
        assert_eq!(a.source_addresses, 1);
        assert_eq!(a.interval(), Duration::from_millis(100));
        assert_eq!(a.timeout(), Duration::from_millis(2000));
        assert_eq!(a.ramp(), Duration::ZERO);
        assert_eq!(a.duration, None);
        assert_eq!(a.count, None);
        assert_eq!(a.churn_messages, None);
        assert!(!a.json);
        assert_eq!(a.timeline, None);
        assert_eq!(a.processes, None);
    }

    #[test]
    fn short_options_and_ipv6() {
        let a = parse(&["-a", "::1", "-p", "4321"]).unwrap();
        assert_eq!(a.target(), "[::1]:4321".parse().unwrap());
        let a = parse(&["--connect-address", "[fe80::1]"]).unwrap();
        assert_eq!(a.connect_address, "fe80::1".parse::<IpAddr>().unwrap());
        let a = parse(&["-a", "10.1.2.3"]).unwrap();
        assert_eq!(a.connect_address, "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn bad_address_and_port() {
        for bad in [&["-a", "localhost"][..], &["-a", "1.2.3.4.5"], &["-p", "0"], &["-p", "65536"], &["-p", "x"]] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad:?}");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn duration_and_count_conflict() {
        let e = parse(&["--duration", "1", "--count", "5"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn churn_needs_a_positive_k_and_excludes_count() {
        let a = parse(&["--churn-messages", "3", "--duration", "2", "--connections", "50"]).unwrap();
        assert_eq!(a.churn_messages, Some(3));
        assert_eq!(parse(&["--churn-messages", "0"]).unwrap_err().kind(), ErrorKind::ValueValidation);
        let e = parse(&["--churn-messages", "3", "--count", "5"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn duration_accepts_fractions_only_positive() {
        let a = parse(&["--duration", "0.25"]).unwrap();
        assert_eq!(a.duration, Some(Duration::from_millis(250)));
        let a = parse(&["--duration", "3"]).unwrap();
        assert_eq!(a.duration, Some(Duration::from_secs(3)));
        for bad in ["0", "-1", "nan", "inf", "abc", "1e300"] {
            assert!(parse(&["--duration", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_connections_count_timeout_are_errors() {
        for bad in [
            &["--connections", "0"][..],
            &["--count", "0"],
            &["--timeout-ms", "0"],
            &["--source-addresses", "0"],
            &["--source-addresses", "255"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad:?}");
        }
    }

    #[test]
    fn zero_interval_and_ramp_are_fine() {
        let a = parse(&[
            "--interval-ms",
            "0",
            "--ramp-ms",
            "0",
            "--connections",
            "10000",
            "--count",
            "3",
            "--json",
            "--timeline",
            "/tmp/t.csv",
        ])
        .unwrap();
        assert_eq!(a.interval(), Duration::ZERO);
        assert_eq!(a.connections, 10_000);
        assert_eq!(a.count, Some(3));
        assert!(a.json);
        assert_eq!(a.timeline, Some(PathBuf::from("/tmp/t.csv")));
    }

    #[test]
    fn unknown_option_is_an_error() {
        let e = parse(&["--bogus"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnknownArgument);
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn help_mentions_exit_status() {
        let e = parse(&["--help"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayHelp);
        assert_eq!(e.exit_code(), 0);
        let text = e.to_string();
        assert!(text.contains("Exit status"), "{text}");
        assert!(text.contains("--connect-address"), "{text}");
    }

    #[test]
    fn processes_range() {
        assert_eq!(parse(&[]).unwrap().processes, None);
        assert_eq!(parse(&["--processes", "3"]).unwrap().processes, Some(3));
        for bad in ["0", "1025", "x"] {
            assert_eq!(parse(&["--processes", bad]).unwrap_err().kind(), ErrorKind::ValueValidation, "{bad}");
        }
    }

    #[test]
    fn command_line_parses_back() {
        for args in [
            &[][..],
            &["-a", "::1", "-p", "4321", "--connections", "30", "--processes", "3", "--json"],
            &["--duration", "0.35", "--interval-ms", "0", "--timeline", "/tmp/x y.csv", "--ramp-ms", "250"],
            &["--duration", "12.5", "--churn-messages", "3", "--source-addresses", "4", "--timeout-ms", "7"],
            &["--count", "7", "-a", "10.1.2.3", "--connections", "100000"],
        ] {
            let a = parse(args).unwrap();
            let line = a.to_command_line();
            let back = Args::try_parse_from(std::iter::once(OsString::from("seqnum-client")).chain(line.clone()))
                .unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(back, a, "{args:?} -> {line:?}");
        }
    }

    /// A new option must be passed on to the client processes: add it to
    /// `to_command_line` (and to `command_line_parses_back`), then here.
    #[test]
    fn command_line_knows_every_option() {
        use clap::CommandFactory;
        let ids: Vec<String> = Args::command().get_arguments().map(|a| a.get_id().to_string()).collect();
        let known = [
            "connect_address",
            "connect_port",
            "connections",
            "source_addresses",
            "interval_ms",
            "duration",
            "count",
            "churn_messages",
            "timeout_ms",
            "json",
            "ramp_ms",
            "timeline",
            "processes",
        ];
        assert_eq!(ids, known);
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
