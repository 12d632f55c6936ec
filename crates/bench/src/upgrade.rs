//! Section 7: `takeoverd ctl upgrade`, takeoverd re-executing itself in
//! place under live connections. What clients see in each upgrade's window
//! against the same window of a run without upgrades, how long an upgrade
//! takes, that the pid and the worker stay, and takeoverd's fds and RSS
//! over 100 upgrades in a row.

use std::time::Duration;

use serde::Serialize;
use testkit::procfs;

use crate::client::Summary;
use crate::handoff::{under_load, LoadPlan, LoadedRun};
use crate::kinds::{EventKind, Placement};
use crate::scenarios::{spread_windows, Ctx, Event, WindowSpread};
use crate::stats::Spread;

/// Upgrades at one size.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeResult {
    /// Live connections.
    pub connections: u64,
    /// Pinned or shared.
    pub placement: Placement,
    /// Upgrades measured.
    pub upgrades: usize,
    /// Of which succeeded.
    pub upgrades_ok: usize,
    /// Request → the new image serving, as takeoverd reports it, ms.
    pub took_ms: Option<Spread>,
    /// takeoverd's pid was the same after every upgrade.
    pub pid_unchanged: bool,
    /// The serving worker was the same after every upgrade.
    pub worker_unchanged: bool,
    /// The clients' worst rows in the upgrade windows.
    pub during_upgrade: WindowSpread,
    /// The same windows of a run without upgrades.
    pub without_upgrade: WindowSpread,
    /// Whole-run client figures, with and without upgrades.
    pub client_upgrade_run: Summary,
    /// Without.
    pub client_baseline_run: Summary,
    /// Client errors in both runs.
    pub errors: u64,
    /// takeoverd's fds and RSS before and after 100 more upgrades (run
    /// after the measured ones, with the clients still connected).
    pub hundred: Option<Hundred>,
    /// Each upgrade.
    pub events: Vec<Event>,
}

/// takeoverd across 100 upgrades in a row.
#[derive(Debug, Clone, Serialize)]
pub struct Hundred {
    /// Upgrades that succeeded (of 100).
    pub ok: usize,
    /// Open fds before and after.
    pub fds: (usize, usize),
    /// RSS before and after, KiB.
    pub rss_kib: (u64, u64),
    /// How long the 100 took, s.
    pub seconds: f64,
}

/// `upgrades` upgrades `spacing_ms` apart under `n` connections, compared
/// with the same run without; then, if `hundred`, 100 more in a row.
pub fn run(
    ctx: &mut Ctx,
    n: u64,
    upgrades: usize,
    spacing_ms: f64,
    pinned: bool,
    hundred: bool,
) -> anyhow::Result<UpgradeResult> {
    let placement = Placement::of(pinned);
    // Room in the client run for the 100 upgrades in a row (each costs
    // about 20 ms plus 5 ms per 1 000 connections on the test machine).
    let extra_ms = if hundred { 100.0 * (20.0 + n as f64 / 200.0) } else { 0.0 };
    let plan =
        LoadPlan { n, tag: "upgrade", placement, kind: EventKind::Upgrade, count: upgrades, spacing_ms, extra_ms };
    let mut took = Vec::new();
    let (mut pid_unchanged, mut worker_unchanged) = (true, true);
    let mut after_hundred = None;
    let LoadedRun { events, result, base, base_windows } = under_load(
        ctx,
        &plan,
        |server| {
            let before = (server.pid, server.status()?.worker_pid);
            let out = server.upgrade()?;
            if let Some(ms) = took_ms(&out.output) {
                took.push(ms);
            }
            let st = server.status()?;
            worker_unchanged &= st.worker_pid == before.1;
            pid_unchanged &= procfs::alive(server.pid) && out.output.contains(&format!("pid {} ", server.pid));
            Ok(out)
        },
        |server, _| {
            if hundred {
                let fds0 = procfs::settled_fd_count(server.pid);
                let rss0 = procfs::rss_kib(server.pid).unwrap_or(0);
                let t0 = std::time::Instant::now();
                let mut ok = 0;
                for _ in 0..100 {
                    ok += usize::from(server.upgrade()?.ok);
                }
                let seconds = t0.elapsed().as_secs_f64();
                std::thread::sleep(Duration::from_millis(200));
                let fds1 = procfs::settled_fd_count(server.pid);
                let rss1 = procfs::rss_kib(server.pid).unwrap_or(0);
                after_hundred = Some(Hundred { ok, fds: (fds0, fds1), rss_kib: (rss0, rss1), seconds });
            }
            Ok(())
        },
    )?;
    if !pid_unchanged || !worker_unchanged {
        ctx.note(format!(
            "upgrade at {n} connections: pid unchanged {pid_unchanged}, worker unchanged {worker_unchanged}"
        ));
    }
    let windows: Vec<_> = events.iter().map(|e| e.window).collect();
    Ok(UpgradeResult {
        connections: n,
        placement,
        upgrades,
        upgrades_ok: events.iter().filter(|e| e.ok).count(),
        took_ms: Spread::of(&took),
        pid_unchanged,
        worker_unchanged,
        during_upgrade: spread_windows(&windows),
        without_upgrade: spread_windows(&base_windows),
        errors: result.summary.errors + base.summary.errors,
        client_upgrade_run: result.summary,
        client_baseline_run: base.summary,
        hundred: after_hundred,
        events,
    })
}

/// The "took N ms" of `takeoverd ctl upgrade`'s answer.
fn took_ms(output: &str) -> Option<f64> {
    let rest = &output[output.find("took ")? + 5..];
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_time_an_upgrade_took() {
        let out = "upgrade ok: takeoverd 0.1.0 -> 0.1.0, pid 7 (unchanged), worker 9 untouched, 3 connections \
                   carried, took 5.57 ms";
        assert_eq!(super::took_ms(out), Some(5.57));
        assert_eq!(super::took_ms("upgrade failed: no"), None);
    }
}
