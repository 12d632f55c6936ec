//! Section 7: `takeoverd ctl upgrade`, takeoverd re-executing itself in
//! place under live connections. What clients see in each upgrade's window
//! against the same window of a run without upgrades, how long an upgrade
//! takes, that the pid and the worker stay, and takeoverd's fds and RSS
//! over 100 upgrades in a row.

use std::time::Duration;

use serde::Serialize;
use testkit::procfs;

use crate::client::{ClientRun, ClientSpec, Summary};
use crate::handoff::{under_load, LoadPlan, LoadedRun};
use crate::kinds::{EventKind, Placement};
use crate::scenarios::{self, spread_windows, Ctx, Event, WindowSpread};
use crate::server::Server;
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
    /// takeoverd's fds and RSS before and after 100 upgrades in a row (a
    /// run of its own, every connection up throughout).
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
    /// Connections takeoverd held before and after.
    pub connections: (usize, usize),
    /// Client errors during them.
    pub errors: u64,
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
    let plan = LoadPlan {
        n,
        tag: "upgrade",
        placement,
        workers: 1,
        kind: EventKind::Upgrade,
        count: upgrades,
        spacing_ms,
        extra_ms: 0.0,
    };
    let mut took = Vec::new();
    let (mut pid_unchanged, mut worker_unchanged) = (true, true);
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
        |_, _| Ok(()),
    )?;
    if !pid_unchanged || !worker_unchanged {
        ctx.note(format!(
            "upgrade at {n} connections: pid unchanged {pid_unchanged}, worker unchanged {worker_unchanged}"
        ));
    }
    let windows: Vec<_> = events.iter().map(|e| e.window).collect();
    let hundred = if hundred { Some(hundred_in_a_row(ctx, n, pinned)?) } else { None };
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
        errors: result.summary.errors + base.summary.errors + hundred.as_ref().map_or(0, |h| h.errors),
        client_upgrade_run: result.summary,
        client_baseline_run: base.summary,
        hundred,
        events,
    })
}

/// 100 upgrades in a row under `n` connections that stay up throughout
/// (a client run longer than they take, ended once they are done).
fn hundred_in_a_row(ctx: &mut Ctx, n: u64, pinned: bool) -> anyhow::Result<Hundred> {
    let (scpu, ccpu) = if pinned { (ctx.server_cpu, ctx.client_cpu) } else { (None, None) };
    ctx.say(&format!("upgrade: 100 in a row under {n} connections"));
    let server = Server::start(&ctx.bins, &ctx.dir, &format!("upgrade-100-{n}"), scpu)?;
    let spec = ClientSpec {
        port: server.port,
        connections: n,
        interval_ms: scenarios::interval_for(n),
        duration_s: 3600.0,
        timeout_ms: 5000,
        ramp_ms: scenarios::ramp_for(n),
        source_addresses: scenarios::source_addresses(n),
        cpu: ccpu,
        churn_messages: None,
    };
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &format!("upgrade-100-{n}"), &spec)?;
    let before = server.wait_connections(n, Duration::from_secs(60))?.connections;
    let fds0 = procfs::settled_fd_count(server.pid);
    let rss0 = procfs::rss_kib(server.pid).unwrap_or(0);
    let t0 = std::time::Instant::now();
    let mut ok = 0;
    for _ in 0..100 {
        ok += usize::from(server.upgrade()?.ok);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let fds1 = procfs::settled_fd_count(server.pid);
    let rss1 = procfs::rss_kib(server.pid).unwrap_or(0);
    let after = server.status()?.connections;
    let result = run.kill_and_collect()?;
    server.stop();
    Ok(Hundred {
        ok,
        fds: (fds0, fds1),
        rss_kib: (rss0, rss1),
        seconds,
        connections: (before, after),
        errors: result.summary.errors,
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
