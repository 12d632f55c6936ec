//! The targets of `takeoverd --workers N` (section 8) and its lines of the
//! console summary: two workers against one, in the same run.

use std::fmt::Write as _;

use crate::report::{tick, Results, Target};
use crate::report_floor::group;
use crate::stats::show;
use crate::workers::{RollResult, Sizes, WorkersSection};

/// What the names of the section's targets start with.
pub const PREFIX: &str = "`--workers 2`";

/// The most the largest worker's share may be, in % of the connections.
pub const SHARE_PCT: f64 = 55.0;
/// The most two workers' server CPU per echo may be, in one worker's.
pub const CPU_RATIO: f64 = 1.1;

/// The reload run with `workers` workers.
pub fn roll(s: &WorkersSection, workers: usize) -> Option<&RollResult> {
    s.reloads.iter().find(|r| r.workers == workers)
}

/// What a reload added to the worst latency of its window with `workers`
/// workers: the median over the reloads, ms.
pub fn added(s: &WorkersSection, workers: usize) -> Option<f64> {
    roll(s, workers)?.above_no_reload_ms.map(|a| a.median)
}

/// The worst latency of the reload windows with `workers` workers, as
/// measured (nothing subtracted), median and highest over the reloads.
fn raw(s: &WorkersSection, workers: usize) -> String {
    roll(s, workers)
        .and_then(|r| r.during_reload.max_ms)
        .map_or("–".into(), |m| format!("{:.2} ms ({:.2} ms at the highest)", m.median, m.max))
}

/// The sizes the targets were measured at (the full run's where a run is
/// missing).
fn sizes(s: &WorkersSection) -> (u64, u64, u64) {
    (
        s.reloads.first().map_or(Sizes::FULL.reload_connections, |r| r.connections),
        s.echo.first().map_or(Sizes::FULL.echo_connections, |e| e.connections),
        s.balance.as_ref().map_or(Sizes::FULL.balance_connections, |b| b.connections),
    )
}

/// The section's three targets (not measured when the section did not run).
pub fn targets(r: &Results) -> Vec<Target> {
    let empty = WorkersSection::default();
    let s = r.workers.as_ref().unwrap_or(&empty);
    let (reload_n, echo_n, balance_n) = sizes(s);
    let mut t = Vec::new();
    let two_silent = roll(s, 2).map_or(0, |r| r.silent_windows);
    let (one, two) = (added(s, 1), added(s, 2));
    t.push(Target {
        name: format!("{PREFIX} against 1, {} conns: worst echo latency a reload adds to its window", group(reload_n)),
        target: match one {
            Some(b) => format!("≤ {b:.2} ms (1 worker's)"),
            None => "≤ 1 worker's".into(),
        },
        measured: two,
        unit: "ms".into(),
        met: if two_silent > 0 { Some(false) } else { two.zip(one).map(|(a, b)| a <= b) },
        basis: format!(
            "median over the reloads of (a reload window's highest client latency − the same window's in a run \
             without reloads), `--workers 2` against `--workers 1`, pinned. Nothing subtracted, the reload windows' \
             worst was, median over the reloads, {} with 2 workers and {} with 1{}",
            raw(s, 2),
            raw(s, 1),
            if two_silent > 0 {
                format!("; {two_silent} reload windows with 2 workers saw no echo at all")
            } else {
                String::new()
            }
        ),
    });
    let echo = |w: usize| s.echo.iter().find(|e| e.workers == w).map(|e| e.server_cpu_us_per_echo);
    let cpu = echo(2).zip(echo(1)).map(|(a, b)| a / b).filter(|x| x.is_finite());
    t.push(Target {
        name: format!("{PREFIX} against 1, {} conns: server CPU per echo", group(echo_n)),
        target: format!("≤ {CPU_RATIO} ×"),
        measured: cpu,
        unit: "×".into(),
        met: cpu.map(|x| x <= CPU_RATIO),
        basis: "takeoverd + workers utime+stime per echo, `--workers 2` ÷ `--workers 1`, `--interval-ms 0`, pinned \
                (both workers share the server's core)"
            .into(),
    });
    let b = s.balance.as_ref();
    t.push(Target {
        name: format!("{PREFIX}, {} connects: largest worker's share", group(balance_n)),
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
             added by the reload {}, longest slot pause {}, errors {}",
            x.workers,
            x.connections,
            x.reloads_ok,
            x.reloads,
            show(&x.during_reload.max_ms, 2),
            show(&x.without_reload.max_ms, 2),
            show(&x.above_no_reload_ms, 2),
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
