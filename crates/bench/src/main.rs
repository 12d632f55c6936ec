#![forbid(unsafe_code)]
//! `seqnum-bench`: a reproducible benchmark of takeoverd + seqnum-worker.
//! See `seqnum-bench --help` and docs/BENCHMARKS.md (which it writes).

mod churn;
mod client;
mod diagnosis;
mod floor;
mod handoff;
mod kinds;
mod machine;
mod markdown;
mod measure;
mod phases;
mod procs;
mod profile;
mod profile_runs;
mod report;
mod report_floor;
mod report_workers;
mod scenarios;
mod server;
mod stats;
mod svg;
mod systemd;
mod target;
mod upgrade;
mod workers;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::procs::{Bins, Clock};
use crate::report::Results;
use crate::scenarios::Ctx;

/// The documented way to run the full benchmark.
const COMMAND: &str = "cargo build --release --workspace && cargo run --release -p seqnum-bench";

#[derive(Debug, Parser)]
#[command(
    name = "seqnum-bench",
    version,
    about = "Benchmark takeoverd + seqnum-worker: reload handoff, restarts through the systemd fd store, echo cost, \
memory, scale, upgrades and several workers",
    long_about = "Benchmark takeoverd + seqnum-worker on 127.0.0.1 and write docs/benchmarks.json, docs/BENCHMARKS.md \
and docs/latency.svg.\n\n\
seqnum-bench builds nothing itself: it runs the takeoverd, seqnum-worker and seqnum-client binaries that sit beside \
its own executable (target/release/ for `cargo run --release`), or those in --bin-dir, and fails if one is missing. \
Build them first:\n\n    cargo build --release --workspace && cargo run --release -p seqnum-bench\n\n\
It measures (1) reload handoff at 100, 1 000, 10 000 and 19 900 live connections, against the same windows \
without a reload, (2) `systemctl --user restart` and kill -9 + automatic restart through the fd store under a \
private systemd --user manager (root, systemd 252+), with reloads and `takeoverd ctl upgrade`s beside them, (3) echo throughput and server CPU per echo, against \
floor-echo (a minimal epoll echo server, the floor), (4) RSS per idle connection, (5) the largest number of \
connections that survives a reload, (6) connection churn (connects/s) against floor-echo and through reloads and \
kill -9s of the worker, (7) `takeoverd ctl upgrade` at 1 000 and 10 000 connections against the same windows \
without one, and 100 upgrades in a row, (8) `--workers 2` beside `--workers 1`: rolling reloads at 10 000 \
connections, CPU per echo at 1 000, the shares of 10 000 connects. A full run takes about 12 minutes and uses both cores; run it on an otherwise idle machine. \
Every process it starts is killed when it ends, fails or is interrupted.",
    after_help = "Examples:\n  cargo build --release --workspace && cargo run --release -p seqnum-bench\n  \
seqnum-bench --quick                          a seconds-long smoke run into a temp dir\n  \
seqnum-bench --quick --bin-dir target/debug --out-dir /tmp/b\n\n\
Exit status: 0 when every run completed with zero client errors, 1 when a client saw errors or a measurement \
failed (the reports are still written), 2 on bad arguments."
)]
struct Cli {
    /// A seconds-long smoke run: 100 connections, 2 reloads (200 connections for the workers part), no systemd,
    /// nothing at 10 000; writes into a temp dir unless --out-dir is given.
    #[arg(long)]
    quick: bool,

    /// Where to write benchmarks.json, BENCHMARKS.md and latency.svg [default: the workspace's docs/, or a temp
    /// dir with --quick].
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,

    /// The directory holding takeoverd, seqnum-worker and seqnum-client [default: this executable's directory].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    /// Skip the systemd part.
    #[arg(long)]
    no_systemd: bool,

    /// Skip the perf profiles.
    #[arg(long)]
    no_profile: bool,

    /// Keep the scratch directory (logs, timelines) instead of removing it.
    #[arg(long)]
    keep_scratch: bool,

    /// Run only these parts (the reports then hold only them).
    #[arg(long, value_delimiter = ',', value_name = "PART,...")]
    only: Vec<Part>,
}

/// A part of the benchmark, for --only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// 1. Reload handoff.
    Handoff,
    /// 2. Restarts under systemd.
    Systemd,
    /// 3. Echo cost.
    Echo,
    /// 4. Memory.
    Memory,
    /// 5. Scale.
    Scale,
    /// 6. Connection churn.
    Churn,
    /// 7. In-place upgrade of takeoverd.
    Upgrade,
    /// 8. Several workers (`--workers N`): one against two.
    Workers,
    /// perf profiles.
    Profile,
}

impl Cli {
    fn wants(&self, p: Part) -> bool {
        self.only.is_empty() || self.only.contains(&p)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = procs::handle_signals() {
        eprintln!("seqnum-bench: cannot handle signals: {e}");
    }
    let guard = procs::KillAllOnDrop;
    let code = match run(&cli) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("seqnum-bench: {e:#}");
            1
        }
    };
    drop(guard);
    ExitCode::from(code)
}

/// Runs everything; `Ok(true)` when there was no client error and no
/// failed measurement.
fn run(cli: &Cli) -> anyhow::Result<bool> {
    let clock = Clock::new();
    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("executable has no directory")?.to_path_buf(),
    };
    let bins = Bins::in_dir(&bin_dir)?;
    let scratch = std::env::temp_dir().join(format!("seqnum-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let out_dir = match &cli.out_dir {
        Some(d) => d.clone(),
        None if cli.quick => scratch.join("out"),
        None => default_docs(),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let build = machine::fingerprint(&bins);
    // Run copies: others may rebuild target/release while this runs.
    let bins = {
        let dir = scratch.join("bin");
        std::fs::create_dir_all(&dir)?;
        for b in bins.all() {
            let to = dir.join(b.file_name().context("binary name")?);
            std::fs::copy(b, &to).with_context(|| format!("copying {} to {}", b.display(), to.display()))?;
        }
        Bins::in_dir(&dir)?
    };
    let fd_limit = machine::fd_limit();
    let machine = machine::machine(&fd_limit);
    let pin = procs::cpus() >= 2 && procs::have_taskset();
    let (server_cpu, client_cpu) = if pin { (Some(1), Some(0)) } else { (None, None) };
    let placement = if pin {
        "takeoverd and its workers are pinned to CPU 1 and the clients to CPU 0 (`taskset -c`, and `CPUAffinity=1` \
         in the systemd unit) for the handoff, echo and systemd runs (*pinned*); the handoff runs at 1 000 and \
         10 000 connections and the echo runs are repeated without pinning (*shared*); memory and scale runs are \
         not pinned. Pinned, takeoverd, the old and the new worker share one core during a reload. The benchmark itself mostly sleeps, but `ctl` \
         and `systemctl` calls and `perf` run unpinned."
            .to_owned()
    } else {
        "no pinning (fewer than 2 CPUs, or no `taskset`): clients and servers share the CPUs.".to_owned()
    };
    let mut ctx = Ctx {
        bins: bins.clone(),
        clock,
        dir: scratch.clone(),
        quick: cli.quick,
        server_cpu,
        client_cpu,
        notes: Vec::new(),
    };
    ctx.say(&format!(
        "{} run; binaries from {}; reports to {}; scratch {}",
        if cli.quick { "quick" } else { "full" },
        bin_dir.display(),
        out_dir.display(),
        scratch.display()
    ));
    let load = machine.loadavg_at_start.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()).unwrap_or(0.0);
    if load > 0.5 {
        ctx.note(format!(
            "the load average was {} when the benchmark started: something else was running (other people's builds \
             and tests share this machine), figures may be noisy",
            machine.loadavg_at_start
        ));
    }
    let m = measure::all(cli, &mut ctx, &scratch, &fd_limit);
    let failures = m.failures;
    let measure::Measured {
        handoff,
        echo,
        floor_echo,
        upgrade,
        churn,
        workers,
        memory,
        scale,
        systemd,
        profiles,
        profiling,
        ..
    } = m;

    let (plot, svg) = svg::choose(&systemd, &handoff);

    let total_errors = handoff.iter().map(|h| h.errors).sum::<u64>()
        + echo.iter().chain(&floor_echo).map(|e| e.errors).sum::<u64>()
        + memory.as_ref().map_or(0, |m| m.errors)
        + churn.as_ref().map_or(0, |c| c.runs.iter().map(|r| r.errors).sum::<u64>())
        + systemd.runs.iter().map(|s| s.errors).sum::<u64>()
        + upgrade.iter().map(|u| u.errors).sum::<u64>()
        + workers.as_ref().map_or(0, |w| {
            w.reloads.iter().map(|r| r.errors).sum::<u64>()
                + w.echo.iter().map(|e| e.errors).sum::<u64>()
                + w.balance.as_ref().map_or(0, |b| b.errors)
        })
        + scale.as_ref().map_or(0, |s| s.steps.iter().filter(|st| st.ok).map(|st| st.errors).sum::<u64>());
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let command = if cli.quick {
        format!("cargo build --release --workspace && cargo run --release -p seqnum-bench -- {}", argv.join(" "))
    } else if argv.is_empty() {
        COMMAND.to_owned()
    } else {
        format!("{COMMAND} -- {}", argv.join(" "))
    };
    let build_end = machine::fingerprint(&Bins::in_dir(&bin_dir)?);
    if build_end.binaries != build.binaries {
        ctx.note(format!(
            "the binaries in {} were rebuilt while this ran; the run used copies taken at its start (listed under \
             Machine)",
            bin_dir.display()
        ));
    }
    let mut machine = machine;
    machine.loadavg_at_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned();
    let mut results = Results {
        mode: if cli.quick { "quick".into() } else { "full".into() },
        command,
        argv,
        date_utc: machine::format_time(std::time::SystemTime::now()),
        machine,
        bin_dir: bin_dir.display().to_string(),
        build,
        placement,
        handoff,
        systemd,
        echo,
        floor_echo,
        memory,
        scale,
        churn,
        upgrade,
        workers,
        profiles,
        profiling,
        targets: Vec::new(),
        total_errors,
        notes: ctx.notes.clone(),
        plot,
        duration_s: ctx.clock.now_ms() / 1e3,
    };
    results.targets = report::targets(&results);
    results.targets.extend(report_floor::targets(&results));
    results.targets.extend(report_workers::targets(&results));
    let diagnosis = diagnosis::text(&results);

    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(out_dir.join("benchmarks.json"), json + "\n")?;
    std::fs::write(out_dir.join("BENCHMARKS.md"), markdown::markdown(&results, &diagnosis))?;
    std::fs::write(out_dir.join("latency.svg"), svg)?;
    print!("{}", report::console(&results));
    println!("\nwrote {}/{{benchmarks.json,BENCHMARKS.md,latency.svg}}", out_dir.display());
    if !(cli.keep_scratch || cli.quick && cli.out_dir.is_none()) {
        let _ = std::fs::remove_dir_all(&scratch);
    } else {
        println!("scratch (logs, timelines) kept in {}", scratch.display());
    }
    Ok(total_errors == 0 && failures == 0)
}

/// The workspace's docs/ directory (this crate is crates/bench).
fn default_docs() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    p.canonicalize().unwrap_or(p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
