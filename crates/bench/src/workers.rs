//! Section 8: `takeoverd --workers N`, one worker beside two in the same
//! run. What clients see in a rolling reload (and each slot's own pause,
//! from takeoverd's reload records), the server CPU per echo, and how evenly new
//! connections are shared out. The reload and echo runs are the handoff's
//! and the echo section's runners with a worker count; only the balance
//! run is this file's own.

use std::time::Duration;

use serde::Serialize;
use takeoverd::status::{ReloadRecord, SlotHandover};

use crate::client::{ClientRun, ClientSpec, Summary, Window};
use crate::handoff::{take_records, under_load, LoadPlan, LoadedRun};
use crate::kinds::{EventKind, Placement};
use crate::phases::Phases;
use crate::scenarios::{self, interval_for, ramp_for, spread_windows, Ctx, EchoResult, Event, WindowSpread};
use crate::server::{workers_args, Server};
use crate::stats::Spread;
use crate::target::Kind;

/// The worker counts compared.
pub const COUNTS: [usize; 2] = [1, 2];

/// The sizes of a run of the section.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Connections of the reload runs.
    pub reload_connections: u64,
    /// Reloads per worker count.
    pub reloads: usize,
    /// Apart by, ms.
    pub spacing_ms: f64,
    /// Connections of the echo runs.
    pub echo_connections: u64,
    /// Connects of the balance run.
    pub balance_connections: u64,
}

impl Sizes {
    /// A full run's: the sizes.
    pub const FULL: Sizes = Sizes {
        reload_connections: 10_000,
        reloads: 10,
        spacing_ms: 1500.0,
        echo_connections: 1_000,
        balance_connections: 10_000,
    };
    /// `--quick`: small and fast, every step still run.
    pub const QUICK: Sizes = Sizes {
        reload_connections: 200,
        reloads: 2,
        spacing_ms: 400.0,
        echo_connections: 200,
        balance_connections: 200,
    };
}

/// Everything the section measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkersSection {
    /// Rolling reloads under load, one run per worker count.
    pub reloads: Vec<RollResult>,
    /// Echo cost, one run per worker count (pinned).
    pub echo: Vec<EchoResult>,
    /// The shares after the balance run's connects, with 2 workers.
    pub balance: Option<Balance>,
    /// Measurements that failed, and why.
    pub failures: Vec<String>,
}

/// Reloads under lock-step load with `workers` workers.
#[derive(Debug, Clone, Serialize)]
pub struct RollResult {
    /// takeoverd's `--workers`.
    pub workers: usize,
    /// Live connections.
    pub connections: u64,
    /// Server on one CPU, clients on the other.
    pub placement: Placement,
    /// Per-connection interval, ms.
    pub interval_ms: u64,
    /// Reloads asked for.
    pub reloads: usize,
    /// Reloads that succeeded (the command and takeoverd's record).
    pub reloads_ok: usize,
    /// The slots named by takeoverd's records of failed rolls.
    pub failed_workers: Vec<usize>,
    /// The rolls, from takeoverd's records: a roll's `pause_ms` is its
    /// longest slot pause, its `stage_ms` its longest staging.
    pub rolls: Phases,
    /// Each slot's handovers, from takeoverd's reload records.
    pub slots: Vec<SlotPauses>,
    /// Within a roll, one slot serving again → the next slot's old worker
    /// told to stop, ms (negative: their pauses overlapped).
    pub gap_between_pauses_ms: Option<Spread>,
    /// Client latency in the windows holding a reload.
    pub during_reload: WindowSpread,
    /// The same windows in a run without reloads.
    pub without_reload: WindowSpread,
    /// Each reload window's worst latency minus that of the same window
    /// without reloads, ms (windows where either saw no echo left out):
    /// what the reload added.
    pub above_no_reload_ms: Option<Spread>,
    /// Reload windows in which no echo arrived at all.
    pub silent_windows: usize,
    /// The reload run's client summary.
    pub client_reload_run: Summary,
    /// The baseline run's client summary.
    pub client_baseline_run: Summary,
    /// Errors of both runs (must be 0).
    pub errors: u64,
    /// The reloads.
    pub events: Vec<Event>,
    /// The same windows in the run without reloads, one by one.
    pub baseline_windows: Vec<Window>,
}

/// One slot's handovers over the reloads of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SlotPauses {
    /// The slot.
    pub slot: usize,
    /// Its handovers that completed.
    pub handovers: usize,
    /// Its pause: its old worker told to stop → its new worker serving, ms.
    pub pause_ms: Option<Spread>,
    /// Its new worker's hello → its share registered with it, ms.
    pub stage_ms: Option<Spread>,
    /// Connections in its share when it handed over.
    pub connections: Option<Spread>,
}

/// How the connections were shared out.
#[derive(Debug, Clone, Serialize)]
pub struct Balance {
    /// takeoverd's `--workers`.
    pub workers: usize,
    /// Connects asked for.
    pub connections: u64,
    /// Connections takeoverd held when every one was up.
    pub held: usize,
    /// Each worker's share, slot by slot, from `ctl status --json`.
    pub shares: Vec<usize>,
    /// The largest share, in % of those held.
    pub largest_share_pct: f64,
    /// Client errors.
    pub errors: u64,
}

/// Runs the section at `sizes`: the reload runs, the echo runs, the
/// balance run. A run that fails is noted and named in `failures`; the
/// others go on.
pub fn run(ctx: &mut Ctx, sizes: Sizes) -> WorkersSection {
    let mut s = WorkersSection::default();
    for workers in COUNTS {
        match roll(ctx, sizes, workers) {
            Ok(r) => s.reloads.push(r),
            Err(e) => s.failures.push(failed(ctx, format!("the reload run with {workers} workers"), e)),
        }
    }
    for workers in COUNTS {
        match scenarios::echo(ctx, sizes.echo_connections, true, Kind::Takeoverd, workers) {
            Ok(e) => s.echo.push(e),
            Err(e) => s.failures.push(failed(ctx, format!("the echo run with {workers} workers"), e)),
        }
    }
    match balance(ctx, sizes.balance_connections, 2) {
        Ok(b) => s.balance = Some(b),
        Err(e) => s.failures.push(failed(ctx, "the balance run".into(), e)),
    }
    s
}

/// Notes a failed run; returns what the section keeps of it.
fn failed(ctx: &mut Ctx, what: String, e: anyhow::Error) -> String {
    let text = format!("{what} failed: {e:#}");
    ctx.note(format!("workers: {text}"));
    text
}

/// `sizes.reloads` reloads of takeoverd with `workers` workers under
/// `sizes.reload_connections` lock-step connections, pinned, against the
/// same run without reloads.
fn roll(ctx: &mut Ctx, sizes: Sizes, workers: usize) -> anyhow::Result<RollResult> {
    let n = sizes.reload_connections;
    let plan = LoadPlan {
        n,
        tag: "workers",
        placement: Placement::Pinned,
        workers,
        kind: EventKind::Reload,
        count: sizes.reloads,
        spacing_ms: sizes.spacing_ms,
        extra_ms: 0.0,
    };
    let mut records = Vec::new();
    let LoadedRun { events, result, base, base_windows } = under_load(
        ctx,
        &plan,
        |server| server.reload(),
        |server, events| {
            records = take_records(server, events)?.reloads;
            Ok(())
        },
    )?;
    let recent = &records[records.len().saturating_sub(events.len())..];
    let windows: Vec<Window> = events.iter().map(|e| e.window).collect();
    Ok(RollResult {
        workers,
        connections: n,
        placement: Placement::Pinned,
        interval_ms: interval_for(n),
        reloads: sizes.reloads,
        reloads_ok: events.iter().filter(|e| e.ok).count(),
        failed_workers: recent.iter().filter_map(|r| r.failed_worker).collect(),
        rolls: Phases::from_records(&records, events.len()),
        slots: slot_pauses(recent, workers),
        gap_between_pauses_ms: Spread::of(&gaps(recent)),
        during_reload: spread_windows(&windows),
        without_reload: spread_windows(&base_windows),
        above_no_reload_ms: Spread::of(&above(&windows, &base_windows)),
        silent_windows: windows.iter().filter(|w| w.echoes == 0).count(),
        errors: result.summary.errors + base.summary.errors,
        client_reload_run: result.summary,
        client_baseline_run: base.summary,
        events,
        baseline_windows: base_windows,
    })
}

/// Each window of `during` against the same one of `without`: the worst
/// latency it added, ms (pairs where either saw no echo left out).
fn above(during: &[Window], without: &[Window]) -> Vec<f64> {
    during
        .iter()
        .zip(without)
        .filter(|(d, b)| d.echoes > 0 && b.echoes > 0)
        .map(|(d, b)| (d.max_us as f64 - b.max_us as f64) / 1e3)
        .collect()
}

/// `n` idle connects to takeoverd with `workers` workers; each worker's
/// share once they are all up.
fn balance(ctx: &mut Ctx, n: u64, workers: usize) -> anyhow::Result<Balance> {
    ctx.say(&format!("workers: balance of {n} connects over {workers} workers"));
    let tag = format!("workers-balance-{n}-w{workers}");
    let server = Server::start_with(&ctx.bins, &ctx.dir, &tag, None, &workers_args(workers))?;
    let ramp = ramp_for(n);
    let spec = ClientSpec::idle(server.port, n, ramp, scenarios::source_addresses(n));
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &tag, &spec)?;
    let up = server.wait_connections(n, Duration::from_secs_f64(ramp as f64 / 1e3 + 20.0));
    // The client never ends on its own (600 s): kill it.
    let result = run.kill_and_collect()?;
    server.stop();
    let st = up?;
    let shares: Vec<usize> = st.workers.iter().map(|w| w.connections).collect();
    let largest = shares.iter().copied().max().unwrap_or(st.connections);
    Ok(Balance {
        workers,
        connections: n,
        held: st.connections,
        largest_share_pct: if st.connections > 0 { 100.0 * largest as f64 / st.connections as f64 } else { 0.0 },
        shares,
        errors: result.summary.errors,
    })
}

/// Each of `workers` slots' pauses, stagings and shares over the handovers
/// of `records`.
fn slot_pauses(records: &[ReloadRecord], workers: usize) -> Vec<SlotPauses> {
    (0..workers)
        .map(|slot| {
            let mine: Vec<&SlotHandover> = records.iter().flat_map(|r| &r.slots).filter(|h| h.slot == slot).collect();
            let spread = |get: fn(&SlotHandover) -> Option<f64>| {
                Spread::of(&mine.iter().filter_map(|h| get(h)).collect::<Vec<_>>())
            };
            SlotPauses {
                slot,
                handovers: mine.len(),
                pause_ms: spread(|h| h.pause_ms),
                stage_ms: spread(|h| h.stage_ms),
                connections: spread(|h| Some(h.connections as f64)),
            }
        })
        .collect()
}

/// Within each roll, from one slot serving again to the next slot's old
/// worker told to stop (its serving time minus its pause), ms.
fn gaps(records: &[ReloadRecord]) -> Vec<f64> {
    records
        .iter()
        .flat_map(|r| r.slots.windows(2))
        .filter_map(|w| Some(w[1].serving_at_ms - w[1].pause_ms? - w[0].serving_at_ms))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handover(slot: usize, connections: usize, pause_ms: Option<f64>, stage_ms: f64, at: f64) -> SlotHandover {
        SlotHandover { slot, pid: 10 + slot as u32, connections, pause_ms, stage_ms: Some(stage_ms), serving_at_ms: at }
    }

    fn record(slots: Vec<SlotHandover>) -> ReloadRecord {
        ReloadRecord {
            generation: 1,
            at: 0,
            ok: true,
            error: None,
            handoff_ms: 0.0,
            old_exit_ms: 0.0,
            pause_ms: None,
            stage_ms: None,
            total_ms: None,
            worker_pid: None,
            connections: 0,
            failed_worker: None,
            slots,
        }
    }

    #[test]
    fn reads_each_slots_handover_from_takeoverds_records() {
        let records = [
            record(vec![handover(0, 5000, Some(0.25), 40.0, 80.0), handover(1, 4998, Some(0.5), 42.0, 180.0)]),
            record(vec![handover(0, 5000, Some(0.35), 38.0, 70.0)]),
        ];
        let slots = slot_pauses(&records, 2);
        assert_eq!((slots[0].handovers, slots[1].handovers), (2, 1));
        assert_eq!(slots[0].pause_ms.map(|s| (s.min, s.max)), Some((0.25, 0.35)));
        assert_eq!(slots[1].connections.map(|s| s.median), Some(4998.0));
        // Slot 1 paused 0.5 ms before it served, 100 ms after slot 0 did.
        let g = gaps(&records);
        assert_eq!(g.len(), 1);
        assert!((g[0] - 99.5).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn a_pause_of_none_is_no_figure() {
        let records = [record(vec![handover(0, 0, None, 0.0, 1.0), handover(1, 0, None, 0.0, 2.0)])];
        assert_eq!(slot_pauses(&records, 2)[0].pause_ms.map(|s| s.max), None);
        assert!(gaps(&records).is_empty());
    }

    #[test]
    fn a_window_without_echoes_is_left_out_of_what_a_reload_added() {
        let w = |echoes, max_us| Window { echoes, max_us, ..Window::default() };
        let d = [w(5, 4_000), w(0, 0), w(5, 1_000)];
        let b = [w(5, 1_500), w(5, 900), w(5, 2_000)];
        assert_eq!(above(&d, &b), vec![2.5, -1.0]);
    }
}
