#![forbid(unsafe_code)]
//! `takeoverd`: see `takeoverd --help` and the README.

mod accept;
mod control_server;
mod ctl;
mod fault;
mod fdstore;
mod overflow;
mod park;
mod reload;
mod reload_v1;
mod resize;
mod restore;
mod runnable;
mod state;
mod supervisor;
mod upgrade;
mod upgraded;
mod worker;
mod worker_channel;
mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "takeoverd",
    version,
    about = "Hold every listening socket and live connection, and move them into fresh workers without dropping one",
    long_about = "takeoverd holds the listening sockets and every live client connection of a service, keeps them in \
the systemd fd store when run as a Type=notify service, and hands them to a freshly started worker over SCM_RIGHTS \
on each reload (SIGHUP or `takeoverd ctl reload`). A crashed worker is restarted with the same sockets; a \
restarted or crashed takeoverd gets them back from the fd store.\n\n\
Listeners come from systemd (a .socket unit, or the fd store of an earlier run), else from --listen.",
    after_help = "Examples:\n  takeoverd --listen 127.0.0.1:1234                 run with the default seqnum-worker\n  \
takeoverd --listen [::1]:8080 --worker ./my-worker -- --flag\n  takeoverd ctl reload                               replace the worker, report the outcome\n  \
takeoverd ctl status --json\n\n\
Exit status: 0 after a clean stop (or a successful ctl command), 1 on a runtime error or a failed reload, 2 on bad arguments.",
    // A unit's ExecStart= and a drop-in may both give an option: the last wins.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Bind a TCP listener on ADDR:PORT (repeatable) when systemd passes none.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,

    /// Backlog of listeners bound with --listen.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(i32).range(1..=65535))]
    backlog: i32,

    /// The worker binary, started afresh from disk at every reload; takeoverd
    /// exits 1 at start if it is missing or its user may not execute it
    /// [default: seqnum-worker beside takeoverd].
    #[arg(long, value_name = "PATH")]
    worker: Option<PathBuf>,

    /// How many workers share the connections: each connection belongs to
    /// one (the one with the fewest connections when it arrives), a reload
    /// replaces them one at a time, and a crash pauses only the crashed
    /// one's share. `auto` or 0: one per CPU. Version-1 workers need 1
    /// [default: $TAKEOVERD_WORKERS, else 1].
    #[arg(long, value_name = "N|auto", value_parser = parse_workers)]
    workers: Option<usize>,

    /// Without systemd's fd store: keep at most N connections' copies open
    /// in takeoverd. Past N, the copies of connections their worker already
    /// has wait in flight in per-worker socket queues (they are no open file
    /// of any process), so that takeoverd holds more connections than its
    /// own RLIMIT_NOFILE; a handoff or a crash restart takes them out a
    /// batch at a time. Not with --workers' version-1 workers; `ctl
    /// upgrade` and `ctl workers` are refused while connections are parked
    /// [default: RLIMIT_NOFILE less 1 024; 0: never park].
    #[arg(long, value_name = "N")]
    max_open_connections: Option<usize>,

    /// Deadline of each handoff step (new worker's hello, old worker's
    /// quiesce, new worker's ack).
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    ack_timeout_ms: u64,

    /// The control socket [default: $RUNTIME_DIRECTORY/control.sock, else
    /// $XDG_RUNTIME_DIR/takeoverd.sock, else /tmp/takeoverd-$UID.sock].
    #[arg(long, value_name = "PATH", global = true)]
    control_socket: Option<PathBuf>,

    /// How many fds to store in the systemd fd store by name (listeners,
    /// state, overflow pairs, and the first connections); further
    /// connections ride in the overflow queue, which costs systemd nothing
    /// per connection. At most the unit's FileDescriptorStoreMax=
    /// [default: 256, or $FDSTORE (systemd 254+) if lower].
    #[arg(long, value_name = "N")]
    fdstore_max: Option<usize>,

    /// Run workers as this user (and its primary group) instead of takeoverd's
    /// own: a compromised worker then cannot reach the control socket or the
    /// fd store. takeoverd must be root to use it.
    #[arg(long, value_name = "USER")]
    worker_user: Option<String>,

    /// Arguments for the worker.
    #[arg(last = true, value_name = "WORKER ARGS")]
    worker_args: Vec<String>,

    /// Print the upgrade-state version this binary reads and exit (what
    /// `ctl upgrade` asks a candidate binary before it executes it).
    #[arg(long, hide = true)]
    upgrade_check: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Talk to a running takeoverd (`--control-socket` may go anywhere on
    /// the line).
    Ctl {
        #[command(subcommand)]
        what: Ctl,
    },
}

#[derive(Debug, Subcommand)]
enum Ctl {
    /// Replace the worker; waits for the outcome and exits 1 if it failed.
    Reload {
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 90)]
        timeout_s: u64,
    },
    /// Re-execute the takeoverd binary on disk in place: same pid, every
    /// socket and the worker carried over, clients untouched. Refused (and
    /// nothing changed) if the binary is missing, not executable, or reads
    /// another upgrade-state version; if the new binary cannot take over, the
    /// previous one serves again. Exits 1 unless the new binary runs.
    Upgrade {
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
    /// Run N workers from now on (`auto`: one per CPU). New workers start
    /// and, once they serve, take their share of the connections from the
    /// others; removed workers hand theirs to the others. Every move stops
    /// the connection at a message boundary first: nothing is lost. Waits
    /// for the outcome; exits 1 if it failed. Not kept across a restart of
    /// takeoverd: set --workers (or $TAKEOVERD_WORKERS) for that.
    Workers {
        /// How many (1-1024, or auto).
        #[arg(value_parser = parse_workers)]
        count: usize,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 90)]
        timeout_s: u64,
    },
    /// Show generation, worker, connections, listeners and reload history.
    Status {
        /// One line of JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.upgrade_check {
        upgrade::print_check();
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Ctl { what }) = cli.command {
        let path = cli.control_socket.unwrap_or_else(ctl::default_path);
        let result = match what {
            Ctl::Reload { timeout_s } => ctl::reload(&path, Duration::from_secs(timeout_s)),
            Ctl::Upgrade { timeout_s } => ctl::upgrade(&path, Duration::from_secs(timeout_s)),
            Ctl::Status { json } => ctl::status(&path, json),
            Ctl::Workers { count, timeout_s } => ctl::workers(&path, count, Duration::from_secs(timeout_s)),
        };
        return match result {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => {
                eprintln!("takeoverd ctl: {}", takeover::log::report(&*e));
                ExitCode::from(1)
            }
        };
    }
    takeover::log::init("takeoverd");
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{}", takeover::log::report(&*e));
            1
        }
    };
    ExitCode::from(code as u8)
}

/// `--workers`: a count from 1 to 1024, or `auto`/0 for one per CPU.
fn parse_workers(s: &str) -> Result<usize, String> {
    let n = match s {
        "auto" | "0" => std::thread::available_parallelism().map_or(1, |n| n.get()),
        _ => s.parse::<usize>().map_err(|_| format!("{s:?} is not a number of workers (1-1024, or auto)"))?,
    };
    if n > 1024 {
        return Err(format!("{n} workers: at most 1024"));
    }
    Ok(n)
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    // Before anything is set up: a worker that cannot be started is a
    // mistake in the command line or the installation, not a crash to
    // retry with backoff.
    let default_worker = cli.worker.is_none();
    let worker = match cli.worker {
        Some(w) => w,
        None => std::env::current_exe()?.with_file_name("seqnum-worker"),
    };
    let worker_user = match &cli.worker_user {
        None => None,
        Some(name) => {
            let user = nix::unistd::User::from_name(name)?
                .ok_or_else(|| anyhow::anyhow!("--worker-user {name}: no such user"))?;
            if !nix::unistd::geteuid().is_root() {
                anyhow::bail!("--worker-user needs takeoverd to run as root");
            }
            Some(user)
        }
    };
    if let Err(why) = runnable::check_runnable(&worker, worker_user.as_ref()) {
        anyhow::bail!("worker {} cannot be run: {why} ({})", worker.display(), why.advice(default_worker));
    }
    if let Err(e) = takeover::raise_fd_limit() {
        tracing::warn!("could not raise the fd limit: {e}");
    }
    let unit_max: Option<usize> = std::env::var("FDSTORE").ok().and_then(|v| v.parse().ok());
    let fdstore_max = cli.fdstore_max.unwrap_or(256).min(unit_max.unwrap_or(usize::MAX));
    let worker_user = worker_user.map(|user| (user.uid.as_raw(), user.gid.as_raw()));
    let workers = match cli.workers {
        Some(n) => n,
        None => match std::env::var("TAKEOVERD_WORKERS") {
            Ok(v) => parse_workers(v.trim()).map_err(|e| anyhow::anyhow!("$TAKEOVERD_WORKERS: {e}"))?,
            Err(_) => 1,
        },
    };
    tracing::info!(workers, "workers share the connections");
    // Only after raise_fd_limit: the budget is what this process may open.
    let max_open = match cli.max_open_connections {
        Some(0) => None,
        Some(n) => Some(n),
        None => nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| (soft as usize).saturating_sub(1024).max(1024)),
    };
    let cfg = supervisor::Config {
        max_open,
        workers,
        worker_user,
        worker,
        worker_args: cli.worker_args,
        ack_timeout: Duration::from_millis(cli.ack_timeout_ms),
        control_socket: cli.control_socket.unwrap_or_else(ctl::default_path),
        fdstore_max,
        exe: std::env::current_exe()?,
        listen: cli.listen,
        backlog: cli.backlog,
    };
    // An in-place upgrade (`ctl upgrade`) hands this image everything the
    // previous one held; otherwise start from systemd's fds or --listen.
    let mut sup = match upgraded::resume(cfg.clone())? {
        Some(sup) => sup,
        None => supervisor::Supervisor::new(cfg)?,
    };
    Ok(sup.run())
}
