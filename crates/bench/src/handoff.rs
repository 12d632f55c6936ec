//! Section 1: reload handoff under live connections, and the runner it
//! shares with section 7 (upgrades): events against takeoverd under
//! lock-step load, each event's client window compared with the same window
//! of a run without events.

use std::time::Duration;

use serde::Serialize;
use takeoverd::status::Status;

use crate::client::{self, ClientRun, ClientSpec, Row, Summary, Window};
use crate::kinds::{EventKind, Placement};
use crate::phases::Phases;
use crate::procs;
use crate::scenarios::{interval_for, ramp_for, source_addresses, spread_windows, Ctx, Event, WindowSpread};
use crate::server::{workers_args, Server};
use crate::stats::Spread;

/// Reload handoff at one size.
#[derive(Debug, Clone, Serialize)]
pub struct HandoffResult {
    /// Live connections.
    pub connections: u64,
    /// "pinned" (server on one CPU, clients on the other) or "shared".
    pub placement: Placement,
    /// Per-connection interval, ms (lock-step: next message this long after the echo).
    pub interval_ms: u64,
    /// Reloads asked for.
    pub reloads: usize,
    /// Reloads that succeeded.
    pub reloads_ok: usize,
    /// takeoverd's request → new worker's ack, ms.
    pub handoff_ms: Option<Spread>,
    /// takeoverd's request → old worker exited, ms.
    pub old_exit_ms: Option<Spread>,
    /// Where the time goes, from takeoverd's reload records.
    pub phases: Phases,
    /// Client latency in the windows holding a reload.
    pub during_reload: WindowSpread,
    /// The same windows in a run without reloads.
    pub without_reload: WindowSpread,
    /// Those windows one by one, in the order of `events`.
    pub baseline_windows: Vec<Window>,
    /// The reload run's client summary.
    pub client_reload_run: Summary,
    /// The baseline run's client summary.
    pub client_baseline_run: Summary,
    /// Errors of both runs (must be 0).
    pub errors: u64,
    /// The reloads.
    pub events: Vec<Event>,
    /// The reload run's timelines (for the plot).
    #[serde(skip)]
    pub timelines: Vec<Vec<Row>>,
}

/// Reload `reloads` times, `spacing_ms` apart, with `n` live connections;
/// then the same run without reloads.
pub fn run(ctx: &mut Ctx, n: u64, reloads: usize, spacing_ms: f64, pinned: bool) -> anyhow::Result<HandoffResult> {
    let placement = Placement::of(pinned);
    let plan = LoadPlan {
        n,
        tag: "handoff",
        placement,
        workers: 1,
        kind: EventKind::Reload,
        count: reloads,
        spacing_ms,
        extra_ms: 0.0,
    };
    let mut status = None;
    let LoadedRun { events, result, base, base_windows } = under_load(
        ctx,
        &plan,
        |server| server.reload(),
        |server, events| {
            status = Some(take_records(server, events)?);
            Ok(())
        },
    )?;
    let phases = Phases::from_records(&status.map(|s| s.reloads).unwrap_or_default(), reloads);
    let errors = result.summary.errors + base.summary.errors;
    let windows: Vec<Window> = events.iter().map(|e| e.window).collect();
    Ok(HandoffResult {
        connections: n,
        placement,
        interval_ms: interval_for(n),
        reloads,
        reloads_ok: events.iter().filter(|e| e.ok).count(),
        handoff_ms: Spread::of(&events.iter().filter_map(|e| e.handoff_ms).collect::<Vec<_>>()),
        old_exit_ms: Spread::of(&events.iter().filter_map(|e| e.old_exit_ms).collect::<Vec<_>>()),
        phases,
        during_reload: spread_windows(&windows),
        without_reload: spread_windows(&base_windows),
        baseline_windows: base_windows,
        client_reload_run: result.summary,
        client_baseline_run: base.summary,
        errors,
        events,
        timelines: result.timelines,
    })
}

/// takeoverd's own record of each of `events` (reloads, the last ones it
/// made): their timings, and their outcome (a reload takeoverd records as
/// failed is marked failed). Returns the status they were read from.
pub fn take_records(server: &Server, events: &mut [Event]) -> anyhow::Result<Status> {
    let st = server.status()?;
    let records = &st.reloads[st.reloads.len().saturating_sub(events.len())..];
    for (e, r) in events.iter_mut().zip(records) {
        e.handoff_ms = Some(r.handoff_ms);
        e.old_exit_ms = Some(r.old_exit_ms);
        if !r.ok {
            e.ok = false;
        }
    }
    Ok(st)
}

/// What [`under_load`] does: `count` events of `kind`, `spacing_ms` apart,
/// against takeoverd (with `workers` workers) holding `n` lock-step
/// connections.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Connections.
    pub n: u64,
    /// Names the runs' files.
    pub tag: &'static str,
    /// Pinned or shared.
    pub placement: Placement,
    /// takeoverd's `--workers` (1: its default), in both runs.
    pub workers: usize,
    /// What is done.
    pub kind: EventKind,
    /// How many times.
    pub count: usize,
    /// Apart by.
    pub spacing_ms: f64,
    /// Client time to add for what `after` does.
    pub extra_ms: f64,
}

/// What [`under_load`] measured.
#[derive(Debug)]
pub struct LoadedRun {
    /// Each event, with the clients' window around it.
    pub events: Vec<Event>,
    /// The clients of the run with the events.
    pub result: client::ClientResult,
    /// The clients of the same run without them.
    pub base: client::ClientResult,
    /// The events' windows in the run without them.
    pub base_windows: Vec<Window>,
}

/// Runs `plan.count` events (`act`) against takeoverd under `plan.n`
/// lock-step connections, then the same load without events; each event's
/// client window is compared with the same window of the quiet run. `after`
/// sees the server once the events are done (before the clients end).
pub fn under_load(
    ctx: &mut Ctx,
    plan: &LoadPlan,
    mut act: impl FnMut(&Server) -> anyhow::Result<crate::server::ReloadOutcome>,
    mut after: impl FnMut(&Server, &mut Vec<Event>) -> anyhow::Result<()>,
) -> anyhow::Result<LoadedRun> {
    let LoadPlan { n, tag, placement, workers, kind, count, spacing_ms, extra_ms } = *plan;
    let pinned = placement == Placement::Pinned;
    let (scpu, ccpu) = if pinned { (ctx.server_cpu, ctx.client_cpu) } else { (None, None) };
    let interval = interval_for(n);
    let ramp = ramp_for(n);
    let slack_ms = if ctx.quick { 500.0 } else { 1000.0 } + n as f64 / 5.0;
    let warm_ms = if ctx.quick { 300.0 } else { 1000.0 };
    let tail_ms = if ctx.quick { 500.0 } else { 1500.0 };
    let duration_s = (ramp as f64 + slack_ms + warm_ms + count as f64 * spacing_ms + extra_ms + tail_ms) / 1e3;
    let (args, w) = (workers_args(workers), if workers > 1 { format!("-w{workers}") } else { String::new() });
    ctx.say(&format!(
        "{tag}: {n} connections, {placement}, {interval} ms interval, {count} {kind}s{}",
        if workers > 1 { format!(", --workers {workers}") } else { String::new() }
    ));

    // The run with the events.
    let name = format!("{tag}-{n}-{placement}{w}");
    let server = Server::start_with(&ctx.bins, &ctx.dir, &name, scpu, &args)?;
    let spec = ClientSpec {
        port: server.port,
        connections: n,
        interval_ms: interval,
        duration_s,
        timeout_ms: 2000,
        ramp_ms: ramp,
        source_addresses: source_addresses(n),
        cpu: ccpu,
        churn_messages: None,
    };
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &name, &spec)?;
    server.wait_connections(n, Duration::from_secs_f64((ramp as f64 + slack_ms) / 1e3 + 10.0))?;
    let t_conn = ctx.clock.now_ms();
    procs::sleep_until(&ctx.clock, t_conn + warm_ms);
    let mut events = Vec::new();
    for _ in 0..count {
        let at = ctx.clock.now_ms();
        let out = act(&server)?;
        let done = ctx.clock.now_ms();
        if !out.ok {
            ctx.note(format!("{kind} FAILED at {n} connections: {}", out.output));
        }
        events.push(Event {
            kind,
            at_ms: at,
            done_ms: done,
            ok: out.ok,
            detail: out.output,
            window: Window::default(),
            handoff_ms: None,
            old_exit_ms: None,
        });
        procs::sleep_until(&ctx.clock, at + spacing_ms);
    }
    if events.last().is_some_and(|e| e.done_ms + 300.0 > run.end_ms) {
        ctx.note(format!("{tag} {n}: the {kind}s ran past the client's planned end; late windows may be empty"));
    }
    after(&server, &mut events)?;
    let result = run.finish(&ctx.clock, Duration::from_secs(30))?;
    server.stop();
    for e in &mut events {
        e.window = client::window(&result.timelines, e.at_ms, e.done_ms + 50.0);
    }

    // The same without the events: the same windows, relative to the
    // moment every connection was up.
    let name = format!("{tag}-baseline-{n}-{placement}{w}");
    let server = Server::start_with(&ctx.bins, &ctx.dir, &name, scpu, &args)?;
    let spec = ClientSpec { port: server.port, ..spec };
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &name, &spec)?;
    server.wait_connections(n, Duration::from_secs_f64((ramp as f64 + slack_ms) / 1e3 + 10.0))?;
    let t_conn2 = ctx.clock.now_ms();
    let base = run.finish(&ctx.clock, Duration::from_secs(30))?;
    server.stop();
    let base_windows: Vec<Window> = events
        .iter()
        .map(|e| client::window(&base.timelines, t_conn2 + (e.at_ms - t_conn), t_conn2 + (e.done_ms - t_conn) + 50.0))
        .collect();
    let errors = result.summary.errors + base.summary.errors;
    if errors > 0 || result.summary.failed_processes + base.summary.failed_processes > 0 {
        ctx.note(format!(
            "ERRORS in the {tag} runs at {n} connections ({placement}): {} with {kind}s, {} without ({:?} / {:?})",
            result.summary.errors, base.summary.errors, result.summary.failure, base.summary.failure
        ));
    }
    Ok(LoadedRun { events, result, base, base_windows })
}
