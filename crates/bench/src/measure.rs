//! The measurements of a run, in order, each skipped unless `--only` asks
//! for it (or `--quick`, `--no-systemd`, `--no-profile` leave it out); a
//! measurement that fails is noted and counted, and the others go on.

use std::path::Path;

use crate::report::SystemdSection;
use crate::scenarios::{self, Ctx};
use crate::{churn, handoff, kinds, profile, profile_runs, systemd, target, upgrade, workers, Cli, Part};

/// Everything measured.
#[derive(Debug)]
pub struct Measured {
    /// 1. Reload handoff.
    pub handoff: Vec<handoff::HandoffResult>,
    /// 3. Echo cost against takeoverd.
    pub echo: Vec<scenarios::EchoResult>,
    /// The same against floor-echo.
    pub floor_echo: Vec<scenarios::EchoResult>,
    /// 7. In-place upgrades.
    pub upgrade: Vec<upgrade::UpgradeResult>,
    /// 6. Connection churn.
    pub churn: Option<churn::ChurnSection>,
    /// 8. Several workers.
    pub workers: Option<workers::WorkersSection>,
    /// 4. Memory.
    pub memory: Option<scenarios::MemoryResult>,
    /// 5. Scale.
    pub scale: Option<scenarios::ScaleResult>,
    /// 2. systemd.
    pub systemd: SystemdSection,
    /// perf profiles.
    pub profiles: Vec<profile::Profile>,
    /// What profiling did.
    pub profiling: String,
    /// Measurements that failed.
    pub failures: usize,
}

/// Runs every measurement `cli` asks for.
pub fn all(cli: &Cli, ctx: &mut Ctx, scratch: &Path, fd_limit: &str) -> Measured {
    let mut failures = 0;

    // 1. Reload handoff.
    let sizes: &[(u64, usize, f64, bool)] = if cli.quick {
        &[(100, 2, 400.0, true)]
    } else {
        &[
            (100, 10, 500.0, true),
            (1_000, 10, 700.0, true),
            (10_000, 10, 1500.0, true),
            (19_900, 10, 2000.0, true),
            (1_000, 10, 700.0, false),
            (10_000, 10, 1500.0, false),
        ]
    };
    let mut handoff = Vec::new();
    for &(n, reloads, spacing, pinned) in sizes.iter().filter(|_| cli.wants(Part::Handoff)) {
        match handoff::run(ctx, n, reloads, spacing, pinned) {
            Ok(h) => handoff.push(h),
            Err(e) => {
                failures += 1;
                ctx.note(format!("the handoff measurement at {n} connections failed: {e:#}"));
            }
        }
    }

    // 3. Echo cost, each size against takeoverd and then against the floor.
    let mut echo = Vec::new();
    let mut floor_echo = Vec::new();
    let echo_sizes: &[u64] = if cli.quick { &[1, 100] } else { &[1, 100, 1_000, 10_000] };
    let placements: &[bool] = if cli.quick { &[true] } else { &[true, false] };
    for &pinned in placements.iter().filter(|_| cli.wants(Part::Echo)) {
        for &n in echo_sizes {
            for (kind, out) in [(target::Kind::Takeoverd, &mut echo), (target::Kind::Floor, &mut floor_echo)] {
                match scenarios::echo(ctx, n, pinned, kind, 1) {
                    Ok(e) => out.push(e),
                    Err(e) => {
                        failures += 1;
                        ctx.note(format!("the echo measurement at {n} connections ({}) failed: {e:#}", kind.name()));
                    }
                }
            }
        }
    }

    // 7. In-place upgrades of takeoverd, then 100 in a row.
    let upgrade_sizes: &[(u64, f64)] = if cli.quick { &[(100, 400.0)] } else { &[(1_000, 700.0), (10_000, 1500.0)] };
    let mut upgrade = Vec::new();
    for &(n, spacing) in upgrade_sizes.iter().filter(|_| cli.wants(Part::Upgrade)) {
        match upgrade::run(ctx, n, if cli.quick { 2 } else { 10 }, spacing, true, !cli.quick) {
            Ok(u) => upgrade.push(u),
            Err(e) => {
                failures += 1;
                ctx.note(format!("the upgrade measurement at {n} connections failed: {e:#}"));
            }
        }
    }

    // 8. Several workers: one beside two.
    let sizes = if cli.quick { workers::Sizes::QUICK } else { workers::Sizes::FULL };
    let workers = cli.wants(Part::Workers).then(|| workers::run(ctx, sizes));
    failures += workers.as_ref().map_or(0, |w| w.failures.len());

    // 6. Connection churn (floor-echo, takeoverd, takeoverd through reloads and kills).
    let churn = cli.wants(Part::Churn).then(|| churn::run(ctx));
    failures += churn.as_ref().map_or(0, |c| c.runs.iter().filter(|r| r.failure.is_some()).count());

    // 4. Memory.
    let memory = if !cli.wants(Part::Memory) {
        None
    } else {
        match scenarios::memory(ctx, if cli.quick { 100 } else { 10_000 }) {
            Ok(m) => Some(m),
            Err(e) => {
                failures += 1;
                ctx.note(format!("the memory measurement failed: {e:#}"));
                None
            }
        }
    };

    // 5. Scale.
    let scale = if cli.quick || !cli.wants(Part::Scale) {
        None
    } else {
        Some(scenarios::scale(ctx, &[19_900, 20_000, 50_000, 100_000], fd_limit))
    };

    // 2. systemd.
    let systemd = if cli.quick || cli.no_systemd || !cli.wants(Part::Systemd) {
        SystemdSection {
            status: if cli.quick { "not run (--quick)".into() } else { "not run (--no-systemd or --only)".into() },
            unit: None,
            runs: Vec::new(),
        }
    } else {
        systemd_runs(ctx)
    };

    // Profiles.
    let (profiles, profiling) = if cli.quick || cli.no_profile || !cli.wants(Part::Profile) {
        (Vec::new(), "Not profiled in this run (`--quick`, `--no-profile` or `--only`).".to_owned())
    } else if !profile::available(scratch) {
        (Vec::new(), "Not profiled: `perf record -e cpu-clock` does not work here.".to_owned())
    } else {
        profile_runs::run(ctx)
    };

    Measured {
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
        failures,
    }
}

fn systemd_runs(ctx: &mut Ctx) -> SystemdSection {
    if let Some(why) = testkit::systemd::unavailable(false) {
        return SystemdSection { status: format!("not run: {why}"), unit: None, runs: Vec::new() };
    }
    let mut mgr = match testkit::systemd::UserManager::start_in(&ctx.dir, "systemd") {
        Ok(m) => m,
        Err(e) => {
            ctx.note(format!("the private systemd --user manager did not start: {e}"));
            return SystemdSection {
                status: format!("not run: the private systemd manager did not start: {e}"),
                unit: None,
                runs: Vec::new(),
            };
        }
    };
    let mut runs = Vec::new();
    let mut problems = Vec::new();
    // The fd-store settings of the shipped unit (units/seqnum.service).
    let shipped = systemd::ShippedUnit::load();
    use kinds::EventKind::{Kill, Reload, Restart, Upgrade};
    let plan = [Reload, Reload, Upgrade, Upgrade, Upgrade, Restart, Restart, Restart, Kill, Kill, Kill];
    // 19 900: as far as this machine lets the service go (its hard
    // RLIMIT_NOFILE of 20 000 is the unit's LimitNOFILE= ceiling).
    for n in [1_000, 10_000, 19_900] {
        match systemd::run(ctx, &mut mgr, n, &shipped, &plan) {
            Ok(r) => runs.push(r),
            Err(e) => {
                ctx.note(format!("systemd run at {n} connections failed: {e:#}"));
                problems.push(format!("{n} connections: {e:#}"));
            }
        }
    }
    drop(mgr);
    let status = if problems.is_empty() { "ok".to_owned() } else { format!("partly failed: {}", problems.join("; ")) };
    SystemdSection { status, unit: Some(shipped), runs }
}
