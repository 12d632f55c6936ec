//! The typed results of a run (benchmarks.json), the targets they are
//! judged against, and the console table. BENCHMARKS.md is rendered from
//! them by `markdown/`, latency.svg by `svg.rs`.

use std::fmt::Write as _;

use serde::Serialize;

use crate::handoff::HandoffResult;
use crate::kinds::Placement;
use crate::profile::Profile;
use crate::scenarios::{EchoResult, MemoryResult, ScaleResult, WindowSpread};
use crate::stats::{show, Spread};
use crate::systemd::SystemdResult;

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Whether /proc/cpuinfo shows the `hypervisor` flag.
    pub virtualised: bool,
    /// MemTotal.
    pub memory: String,
    /// Kernel release.
    pub kernel: String,
    /// /proc/loadavg when the run started.
    pub loadavg_at_start: String,
    /// /proc/loadavg when it ended.
    pub loadavg_at_end: String,
    /// `systemd --version`, first line.
    pub systemd: String,
    /// net.ipv4.tcp_congestion_control.
    pub tcp_congestion_control: String,
    /// The hard RLIMIT_NOFILE, and whether it could be raised.
    pub fd_limit: String,
}

/// What was measured: the workspace's commit and the binaries.
#[derive(Debug, Clone, Serialize)]
pub struct Build {
    /// `git rev-parse --short HEAD`.
    pub commit: String,
    /// Tracked files were modified.
    pub dirty: bool,
    /// Each binary: name, size, modification time.
    pub binaries: Vec<String>,
}

/// A target and whether it was met.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What.
    pub name: String,
    /// The bound, as text.
    pub target: String,
    /// The figure compared with it.
    pub measured: Option<f64>,
    /// Its unit.
    pub unit: String,
    /// `None` when not measured.
    pub met: Option<bool>,
    /// Which figure was used.
    pub basis: String,
}

/// The systemd part.
#[derive(Debug, Clone, Serialize)]
pub struct SystemdSection {
    /// "ok", or why not.
    pub status: String,
    /// The fd-store settings copied from the shipped unit.
    pub unit: Option<crate::systemd::ShippedUnit>,
    /// The runs.
    pub runs: Vec<SystemdResult>,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// "full" or "quick".
    pub mode: String,
    /// The command that reproduces this run.
    pub command: String,
    /// The benchmark's own arguments.
    pub argv: Vec<String>,
    /// When (UTC).
    pub date_utc: String,
    /// Where.
    pub machine: Machine,
    /// Which binaries.
    pub bin_dir: String,
    /// The commit and binaries measured.
    pub build: Build,
    /// How processes were placed on the CPUs.
    pub placement: String,
    /// 1. Reload handoff.
    pub handoff: Vec<HandoffResult>,
    /// 2. systemd.
    pub systemd: SystemdSection,
    /// 3. Echo cost.
    pub echo: Vec<EchoResult>,
    /// The same echo loads against floor-echo.
    pub floor_echo: Vec<EchoResult>,
    /// 4. Memory.
    pub memory: Option<MemoryResult>,
    /// 5. Scale.
    pub scale: Option<ScaleResult>,
    /// 6. Connection churn.
    pub churn: Option<crate::churn::ChurnSection>,
    /// 7. In-place upgrades of takeoverd.
    pub upgrade: Vec<crate::upgrade::UpgradeResult>,
    /// 8. Several workers (`--workers N`), when run.
    pub workers: Option<crate::workers::WorkersSection>,
    /// Profiles.
    pub profiles: Vec<Profile>,
    /// Profiling status.
    pub profiling: String,
    /// Targets.
    pub targets: Vec<Target>,
    /// Client errors over every run (must be 0).
    pub total_errors: u64,
    /// Odd things seen.
    pub notes: Vec<String>,
    /// What the plot shows.
    pub plot: String,
    /// How long the benchmark ran, s.
    pub duration_s: f64,
}

pub fn tick(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "✔",
        Some(false) => "✘",
        None => "–",
    }
}

/// Evaluates the targets of the issue.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let h = |n: u64| r.handoff.iter().find(|h| h.connections == n && h.placement == Placement::Pinned);
    let mut push = |name: &str, bound: f64, unit: &str, measured: Option<f64>, basis: &str| {
        t.push(Target {
            name: name.to_owned(),
            target: format!("≤ {bound} {unit}"),
            measured,
            unit: unit.to_owned(),
            met: measured.map(|m| m <= bound),
            basis: basis.to_owned(),
        });
    };
    let worst = |w: &WindowSpread| w.max_ms.map(|s| s.max);
    for (n, label) in [(1_000, "1 000"), (10_000, "10 000"), (19_900, "19 900")] {
        push(
            &format!("{label} conns: reload pause (pause_ms)"),
            1.0,
            "ms",
            h(n).and_then(|h| h.phases.pause_ms.map(|s| s.max)),
            "longest of the reloads: takeoverd's pause_ms, old worker told to stop → new worker serving, pinned",
        );
    }
    push(
        "10 000 conns: worst echo latency during a reload",
        50.0,
        "ms",
        h(10_000).and_then(|h| worst(&h.during_reload)),
        "highest client latency in any reload window, pinned placement",
    );
    let sd10k = r.systemd.runs.iter().find(|s| s.connections == 10_000);
    push(
        "10 000 conns: `systemctl restart` pause",
        300.0,
        "ms",
        sd10k.and_then(|s| s.restart_pause_ms.map(|p| p.max)),
        "highest client latency in any restart window (fd-store settings of units/seqnum.service)",
    );
    push(
        "1 000 conns: worst echo latency during a reload",
        10.0,
        "ms",
        h(1_000).and_then(|h| worst(&h.during_reload)),
        "highest client latency in any reload window, pinned placement",
    );
    let echo1k = r
        .echo
        .iter()
        .find(|e| e.connections == 1_000 && e.placement == Placement::Pinned)
        .or_else(|| r.echo.iter().find(|e| e.connections == 1_000));
    push(
        "1 000 conns: server CPU per echo",
        3.0,
        "µs",
        echo1k.map(|e| e.server_cpu_us_per_echo),
        "takeoverd + worker utime+stime / echoes (pinned run)",
    );
    for (n, label) in [(1_000, "1 000"), (10_000, "10 000")] {
        let u = r.upgrade.iter().find(|u| u.connections == n);
        push(
            &format!("{label} conns: worst echo latency in an upgrade window, above the same window without"),
            2.0,
            "ms",
            u.and_then(|u| Some(u.during_upgrade.max_ms?.max - u.without_upgrade.max_ms?.max)),
            "`ctl upgrade`: highest client latency in any upgrade window minus the highest in the same windows of a \
             run without upgrades, pinned",
        );
        let h = u.and_then(|u| u.hundred.as_ref());
        push(
            &format!("{label} conns: takeoverd's fds grown over 100 upgrades"),
            0.0,
            "fds",
            h.filter(|h| h.connections.0 == h.connections.1).map(|h| h.fds.1 as f64 - h.fds.0 as f64),
            "open fds of takeoverd after 100 upgrades in a row minus before, the same connections held (else not \
             measured)",
        );
        push(
            &format!("{label} conns: takeoverd's RSS grown over 100 upgrades"),
            1024.0,
            "KiB",
            h.map(|h| h.rss_kib.1 as f64 - h.rss_kib.0 as f64),
            "VmRSS of takeoverd after 100 upgrades minus before (each upgrade starts a fresh image)",
        );
    }
    let mem = r.memory.as_ref().filter(|m| m.connections >= 10_000);
    push(
        "worker RSS per idle connection",
        1024.0,
        "B",
        mem.map(|m| m.worker_bytes_per_conn.max(m.worker_after_reload_bytes_per_conn)),
        "(RSS at 10 000 − RSS at 0) / 10 000, the larger of the first worker and a worker after a reload",
    );
    push(
        "takeoverd RSS per idle connection",
        512.0,
        "B",
        mem.map(|m| m.takeoverd_bytes_per_conn),
        "(RSS at 10 000 − RSS at 0) / 10 000",
    );
    t
}

/// The console summary.
pub fn console(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n== seqnum-bench ({}) — {} ==", r.mode, r.date_utc);
    let _ = writeln!(s, "\nReload handoff (median (min–max) over the reloads; latencies in ms)");
    let _ = writeln!(
        s,
        "{:>7} {:>8} {:>9} {:>26} {:>26} {:>26} {:>26} {:>7}",
        "conns",
        "place",
        "interval",
        "handoff_ms",
        "old_exit_ms",
        "max lat. during reload",
        "same windows, no reload",
        "errors"
    );
    for h in &r.handoff {
        let _ = writeln!(
            s,
            "{:>7} {:>8} {:>7}ms {:>26} {:>26} {:>26} {:>26} {:>7}",
            h.connections,
            h.placement,
            h.interval_ms,
            show(&h.handoff_ms, 2),
            show(&h.old_exit_ms, 2),
            show(&h.during_reload.max_ms, 2),
            show(&h.without_reload.max_ms, 2),
            h.errors
        );
    }
    let _ = writeln!(s, "\nsystemd: {}", r.systemd.status);
    for sd in &r.systemd.runs {
        let _ = writeln!(
            s,
            "{:>7} conns: restart pause {} ms, kill pause {} ms, reload pause {} ms, upgrade pause {} ms, errors {}",
            sd.connections,
            show(&sd.restart_pause_ms, 1),
            show(&sd.kill_pause_ms, 1),
            show(&sd.reload_pause_ms, 1),
            show(&sd.upgrade_pause_ms, 1),
            sd.errors
        );
    }
    let _ = writeln!(s, "\nEcho cost (--interval-ms 0)");
    let _ = writeln!(
        s,
        "{:>7} {:>8} {:>11} {:>14} {:>14} {:>10} {:>7}",
        "conns", "placement", "echoes/s", "server µs/echo", "client µs/echo", "p99 µs", "errors"
    );
    for e in &r.echo {
        let _ = writeln!(
            s,
            "{:>7} {:>8} {:>11.0} {:>14.2} {:>14.2} {:>10} {:>7}",
            e.connections,
            e.placement,
            e.echoes_per_sec,
            e.server_cpu_us_per_echo,
            e.client_cpu_us_per_echo,
            e.p99_us,
            e.errors
        );
    }
    if let Some(m) = &r.memory {
        let _ = writeln!(
            s,
            "\nMemory at {} idle conns: worker {:.0} B/conn ({:.0} after a reload), takeoverd {:.0} B/conn",
            m.connections, m.worker_bytes_per_conn, m.worker_after_reload_bytes_per_conn, m.takeoverd_bytes_per_conn
        );
    }
    if let Some(sc) = &r.scale {
        let _ = writeln!(
            s,
            "\nScale: reached {} connections; stopped by: {}",
            sc.reached.map_or("none".into(), |n| n.to_string()),
            sc.stopped_by
        );
    }
    s.push_str(&crate::report_workers::console(r));
    let _ = writeln!(s);
    s.push_str(&crate::report_floor::console(r));
    let _ = writeln!(s, "\nTargets");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "  {} {:<48} {:>10} measured {}",
            tick(t.met),
            t.name,
            t.target,
            t.measured.map_or("–".into(), |m| format!("{m:.2} {}", t.unit))
        );
    }
    if r.total_errors > 0 {
        let _ = writeln!(s, "\n!!! {} CLIENT ERRORS IN ALL — see the notes !!!", r.total_errors);
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

pub fn ms(s: &Option<Spread>) -> String {
    show(s, 2)
}
