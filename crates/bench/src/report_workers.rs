//! The targets of `takeoverd --workers N` (section 8) and its lines of the
//! console summary: two workers against one, in the same run.

use std::fmt::Write as _;

use crate::report::{tick, Results, Target};
use crate::report_floor::group;
use crate::stats::show;
use crate::workers::{RollResult, Sizes, WorkersSection};

/// The most the largest worker's share may be, in % of the connections.
pub const SHARE_PCT: f64 = 55.0;
/// The most two workers' server CPU per echo may be, in one worker's.
pub const CPU_RATIO: f64 = 1.1;
/// The most two workers' worst reload-window latency may be, in one
/// worker's: no worse.
pub const LATENCY_RATIO: f64 = 1.0;

/// The reload run with `workers` workers.
pub fn roll(s: &WorkersSection, workers: usize) -> Option<&RollResult> {
    s.reloads.iter().find(|r| r.workers == workers)
}

/// A reload run's figure for the latency target: the median over its
/// reloads of each window's worst latency, ms.
pub fn typical_worst(r: &RollResult) -> Option<f64> {
    r.during_reload.max_ms.map(|s| s.median)
}

/// The figures the targets compare, two workers ÷ one, with the sizes
/// they were measured at.
#[derive(Debug, Clone, Copy)]
pub struct Ratios {
    /// Connections of the reload runs.
    pub reload_connections: u64,
    /// Worst reload-window latency, median over the reloads, 2 ÷ 1.
    pub latency: Option<f64>,
    /// Connections of the echo runs.
    pub echo_connections: u64,
    /// Server CPU per echo, 2 ÷ 1.
    pub cpu: Option<f64>,
}

impl Ratios {
    /// Of a section (the full run's sizes where a run is missing).
    pub fn of(s: &WorkersSection) -> Ratios {
        let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?).filter(|x| x.is_finite());
        let (one, two) = (roll(s, 1), roll(s, 2));
        let echo = |w: usize| s.echo.iter().find(|e| e.workers == w);
        Ratios {
            reload_connections: one.or(two).map_or(Sizes::FULL.reload_connections, |r| r.connections),
            latency: ratio(two.and_then(typical_worst), one.and_then(typical_worst)),
            echo_connections: echo(1).or(echo(2)).map_or(Sizes::FULL.echo_connections, |e| e.connections),
            cpu: ratio(echo(2).map(|e| e.server_cpu_us_per_echo), echo(1).map(|e| e.server_cpu_us_per_echo)),
        }
    }
}

/// The section's three targets (not measured when the section did not run).
pub fn targets(r: &Results) -> Vec<Target> {
    let empty = WorkersSection::default();
    let s = r.workers.as_ref().unwrap_or(&empty);
    let q = Ratios::of(s);
    let mut t = Vec::new();
    let two_silent = roll(s, 2).map_or(0, |r| r.silent_windows);
    let worst =
        |w: usize| roll(s, w).and_then(|r| r.during_reload.max_ms).map_or("–".into(), |m| format!("{:.2}", m.max));
    t.push(Target {
        name: format!(
            "{} conns: worst echo latency in a reload window, 2 workers against 1",
            group(q.reload_connections)
        ),
        target: format!("≤ {LATENCY_RATIO} ×"),
        measured: q.latency,
        unit: "×".into(),
        met: if two_silent > 0 { Some(false) } else { q.latency.map(|x| x <= LATENCY_RATIO) },
        basis: format!(
            "`--workers 2` ÷ `--workers 1`: the median over the reloads of each reload window's highest client \
             latency, pinned (the highest of all windows: {} ms with 2 workers, {} ms with 1){}",
            worst(2),
            worst(1),
            if two_silent > 0 {
                format!("; {two_silent} reload windows with 2 workers saw no echo at all")
            } else {
                String::new()
            }
        ),
    });
    t.push(Target {
        name: format!("{} conns: server CPU per echo, 2 workers against 1", group(q.echo_connections)),
        target: format!("≤ {CPU_RATIO} ×"),
        measured: q.cpu,
        unit: "×".into(),
        met: q.cpu.map(|x| x <= CPU_RATIO),
        basis: "takeoverd + workers utime+stime per echo, `--workers 2` ÷ `--workers 1`, `--interval-ms 0`, pinned \
                (both workers share the server's core)"
            .into(),
    });
    let b = s.balance.as_ref();
    t.push(Target {
        name: format!(
            "{} connects: largest worker's share, 2 workers",
            group(b.map_or(Sizes::FULL.balance_connections, |b| b.connections))
        ),
        target: format!("≤ {SHARE_PCT} %"),
        measured: b.map(|b| b.largest_share_pct),
        unit: "%".into(),
        met: b.map(|b| b.largest_share_pct <= SHARE_PCT),
        basis: "the larger of the two workers' `connections` in `ctl status --json`, in % of those held, once every \
                connection is up"
            .into(),
    });
    t
}

/// Lines for the console summary.
pub fn console(r: &Results) -> String {
    let mut out = String::new();
    let Some(s) = &r.workers else {
        return out;
    };
    let _ = writeln!(out, "\nWorkers (--workers N; latencies in ms, median (min–max) over the reloads)");
    for x in &s.reloads {
        let _ = writeln!(
            out,
            "{:>2} workers {:>6} conns: reloads ok {}/{}, max lat. during reload {}, same windows no reload {}, \
             longest slot pause {}, errors {}",
            x.workers,
            x.connections,
            x.reloads_ok,
            x.reloads,
            show(&x.during_reload.max_ms, 2),
            show(&x.without_reload.max_ms, 2),
            show(&x.rolls.pause_ms, 3),
            x.errors
        );
        for sl in &x.slots {
            let _ = writeln!(
                out,
                "             slot {}: {} handovers of {} connections, pause {} ms, staging {} ms",
                sl.slot,
                sl.handovers,
                show(&sl.connections, 0),
                show(&sl.pause_ms, 3),
                show(&sl.stage_ms, 2)
            );
        }
    }
    for e in &s.echo {
        let _ = writeln!(
            out,
            "{:>2} workers {:>6} conns echo: {:.0} echoes/s, server {:.2} µs/echo ({:.2} cores), errors {}",
            e.workers, e.connections, e.echoes_per_sec, e.server_cpu_us_per_echo, e.server_cores, e.errors
        );
    }
    if let Some(b) = &s.balance {
        let _ = writeln!(
            out,
            "{:>2} workers {:>6} connects: shares {:?} of {} held, largest {:.1} %",
            b.workers, b.connections, b.shares, b.held, b.largest_share_pct
        );
    }
    for f in &s.failures {
        let _ = writeln!(out, "{} {f}", tick(Some(false)));
    }
    out
}
