//! Connection churn: how many connections per second a server takes when
//! every connection sends K seqnums lock-step and closes, and whether any
//! of them fails. `seqnum-client --churn-messages K` keeps N connections
//! going at the highest rate it can drive, against floor-echo (the floor),
//! against takeoverd + seqnum-worker undisturbed, and against takeoverd
//! through reloads and `kill -9`s of the serving worker spaced evenly over
//! the run.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use testkit::procfs;

use crate::client::{ClientRun, ClientSpec};
use crate::kinds::Placement;
use crate::phases::Phases;
use crate::procs;
use crate::scenarios::Ctx;
use crate::server::Server;
use crate::stats::Spread;
use crate::target::{Kind, Running};

/// Concurrent connections.
const CONNECTIONS: u64 = 50;
/// Seqnums per connection before it closes.
const MESSAGES: u64 = 3;
/// Loopback source addresses: every connect leaves a TIME_WAIT behind, and
/// one address would run past the ~14 000 ports the kernel tries first
/// within a second or two (see `scenarios::source_addresses`).
const SOURCE_ADDRESSES: u32 = 4;

/// One client run against one server.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnRun {
    /// "floor-echo" or "takeoverd".
    pub server: String,
    /// What happened to the server meanwhile: "none", or the reloads and kills.
    pub events: String,
    /// The client's run, s.
    pub duration_s: f64,
    /// Connects that completed.
    pub connects: u64,
    /// Connects per second over the client's run.
    pub connects_per_sec: f64,
    /// Echoes per second.
    pub echoes_per_sec: f64,
    /// Server CPU (utime+stime; for takeoverd with the workers it reaped)
    /// per connect, µs.
    pub server_cpu_us_per_connect: Option<f64>,
    /// Server CPU use over the client's run, in cores.
    pub server_cores: Option<f64>,
    /// Client CPU use over its run, in cores (1.0: the client is the limit).
    pub client_cores: Option<f64>,
    /// Echo latency p99 over the run, µs.
    pub p99_us: u64,
    /// Highest echo latency, µs.
    pub max_us: u64,
    /// Connects that failed or timed out.
    pub connect_errors: u64,
    /// Reads or writes that failed.
    pub resets: u64,
    /// Connections the server closed.
    pub eofs: u64,
    /// Echoes that did not come in time.
    pub timeouts: u64,
    /// Wrong echoes.
    pub discontinuities: u64,
    /// All of the above (must be 0).
    pub errors: u64,
    /// `ctl reload`s asked for.
    pub reloads: usize,
    /// Succeeded.
    pub reloads_ok: usize,
    /// `kill -9`s of the serving worker.
    pub kills: usize,
    /// Followed by a new worker within 10 s.
    pub kills_ok: usize,
    /// Events not run: the earlier ones took so long that the client's run
    /// was over before their turn.
    pub events_skipped: usize,
    /// The reload pause from takeoverd's records (last 20 reloads), ms.
    pub reload_pause_ms: Option<Spread>,
    /// Which record field that is (`pause_ms`, or `handoff_ms` from an older takeoverd).
    pub reload_pause_figure: String,
    /// `kill -9` → a new worker pid in `ctl status`, ms.
    pub kill_to_new_worker_ms: Option<Spread>,
    /// What went wrong, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// The churn part.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnSection {
    /// `--connections`.
    pub connections: u64,
    /// `--churn-messages`.
    pub messages: u64,
    /// "pinned" or "shared".
    pub placement: Placement,
    /// floor-echo, takeoverd, takeoverd with events.
    pub runs: Vec<ChurnRun>,
}

/// An event of the disturbed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Reload,
    Kill,
}

/// `reloads` reloads and `kills` kills, the kills spread evenly among them.
fn plan(reloads: usize, kills: usize) -> Vec<Ev> {
    let total = reloads + kills;
    (0..total).map(|i| if (i + 1) * kills / total > i * kills / total { Ev::Kill } else { Ev::Reload }).collect()
}

/// "none", or "R reloads + K kill -9".
fn label(events: &[Ev]) -> String {
    if events.is_empty() {
        return "none".to_owned();
    }
    let k = events.iter().filter(|e| **e == Ev::Kill).count();
    format!("{} reloads + {k} kill -9", events.len() - k)
}

/// The three runs; a run that cannot be carried out is recorded with its
/// failure.
pub fn run(ctx: &mut Ctx) -> ChurnSection {
    let (quiet_s, reloads, kills, spacing_ms) = if ctx.quick { (1.5, 4, 2, 250.0) } else { (6.0, 50, 10, 200.0) };
    let mut runs = Vec::new();
    for (kind, events) in
        [(Kind::Floor, Vec::new()), (Kind::Takeoverd, Vec::new()), (Kind::Takeoverd, plan(reloads, kills))]
    {
        let label = label(&events);
        match one(ctx, kind, &events, quiet_s, spacing_ms) {
            Ok(r) => runs.push(r),
            Err(e) => {
                ctx.note(format!("the churn run against {} ({label}) failed: {e:#}", kind.name()));
                runs.push(failed(kind, label, format!("{e:#}")));
            }
        }
    }
    let placement = Placement::of(ctx.server_cpu.is_some());
    ChurnSection { connections: CONNECTIONS, messages: MESSAGES, placement, runs }
}

fn one(ctx: &mut Ctx, kind: Kind, events: &[Ev], quiet_s: f64, spacing_ms: f64) -> anyhow::Result<ChurnRun> {
    let warm_ms = 300.0;
    let label = label(events);
    let duration_s =
        if events.is_empty() { quiet_s } else { (warm_ms + events.len() as f64 * spacing_ms + 500.0) / 1e3 };
    ctx.say(&format!("churn: {CONNECTIONS} connections × {MESSAGES} messages, {}, events: {label}", kind.name()));
    let tag = format!("churn-{}-{}", kind.name(), if events.is_empty() { "quiet" } else { "events" });
    let server = Running::start(&ctx.bins, &ctx.dir, kind, &tag, ctx.server_cpu, 1)?;
    let spec = ClientSpec {
        port: server.port(),
        connections: CONNECTIONS,
        interval_ms: 0,
        duration_s,
        timeout_ms: 2000,
        ramp_ms: 0,
        source_addresses: SOURCE_ADDRESSES,
        cpu: ctx.client_cpu,
        churn_messages: Some(MESSAGES),
    };
    let cpu0 = server_ticks(&server);
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &tag, &spec)?;
    let t0 = ctx.clock.now_ms();
    let (mut reloads_ok, mut kills_ok, mut kill_ms, mut skipped) = (0, 0, Vec::new(), 0);
    let mut failure = None;
    if let (Running::Takeoverd(td), false) = (&server, events.is_empty()) {
        for (i, ev) in events.iter().enumerate() {
            // An event the client would not see is not run.
            if ctx.clock.now_ms() > run.end_ms - 300.0 {
                skipped = events.len() - i;
                ctx.note(format!(
                    "churn: the events ran late (kill -9 waits for the new worker): the last {skipped} of {} were \
                     not run, the client's run was over",
                    events.len()
                ));
                break;
            }
            procs::sleep_until(&ctx.clock, t0 + warm_ms + i as f64 * spacing_ms);
            let ok = match ev {
                Ev::Reload => {
                    let out = td.reload()?;
                    if !out.ok && failure.is_none() {
                        failure = Some(format!("reload failed: {}", out.output));
                    }
                    reloads_ok += usize::from(out.ok);
                    out.ok
                }
                Ev::Kill => match kill_worker(td) {
                    Ok(ms) => {
                        kill_ms.push(ms);
                        kills_ok += 1;
                        true
                    }
                    Err(e) => {
                        failure.get_or_insert(format!("kill -9: {e:#}"));
                        false
                    }
                },
            };
            if !ok {
                ctx.note(format!("churn: event {i} ({ev:?}) failed: {}", failure.as_deref().unwrap_or("?")));
            }
        }
    }
    // The client's CPU, read just before its planned end (it is reaped at
    // the end, and its ticks with it).
    procs::sleep_until(&ctx.clock, run.end_ms - 100.0);
    let client_ticks: u64 = run.pids().iter().filter_map(|p| procfs::cpu_ticks(*p)).sum();
    let client_span_ms = ctx.clock.now_ms() - t0;
    let status = match &server {
        Running::Takeoverd(td) => td.status().ok(),
        Running::Floor(_) => None,
    };
    let result = run.finish(&ctx.clock, Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(200));
    let cpu1 = server_ticks(&server);
    server.stop();
    let c = &result.summary;
    if failure.is_none() && (c.errors > 0 || c.failed_processes > 0) {
        failure = Some(format!(
            "{} client errors{}",
            c.errors,
            c.failure.as_deref().map(|f| format!("; {f}")).unwrap_or_default()
        ));
    }
    if failure.is_none() && skipped > 0 {
        failure = Some(format!("{skipped} of the {} events were not run", events.len()));
    }
    if c.errors > 0 {
        ctx.note(format!(
            "ERRORS in the churn run against {} ({label}): connect errors {}, resets {}, EOFs {}, timeouts {}, \
             discontinuities {}",
            kind.name(),
            c.connect_errors,
            c.resets,
            c.eofs,
            c.timeouts,
            c.discontinuities
        ));
    }
    let tick_us = 1e6 / procfs::clk_tck() as f64;
    let cpu = cpu0.zip(cpu1).filter(|_| c.connects > 0).map(|(a, b)| b.saturating_sub(a) as f64 * tick_us);
    let reloads = events.iter().filter(|e| **e == Ev::Reload).count();
    let phases = status.as_ref().map(|s| Phases::from_records(&s.reloads, reloads)).unwrap_or_default();
    let (pause, figure) = phases.pause();
    Ok(ChurnRun {
        server: kind.name().into(),
        events: label,
        duration_s: c.duration_s,
        connects: c.connects,
        connects_per_sec: c.connects_per_sec,
        echoes_per_sec: c.echoes_per_sec,
        server_cpu_us_per_connect: cpu.map(|us| us / c.connects as f64),
        server_cores: cpu.filter(|_| c.duration_s > 0.0).map(|us| us / 1e6 / c.duration_s),
        client_cores: (client_span_ms > 0.0).then(|| client_ticks as f64 * tick_us / 1e3 / client_span_ms),
        p99_us: c.p99_us,
        max_us: c.max_us,
        connect_errors: c.connect_errors,
        resets: c.resets,
        eofs: c.eofs,
        timeouts: c.timeouts,
        discontinuities: c.discontinuities,
        errors: c.errors,
        reloads,
        reloads_ok,
        kills: events.len() - reloads,
        kills_ok,
        events_skipped: skipped,
        reload_pause_ms: if reloads > 0 { pause } else { None },
        reload_pause_figure: figure.into(),
        kill_to_new_worker_ms: Spread::of(&kill_ms),
        failure,
    })
}

/// CPU ticks of the server so far: floor-echo's, or takeoverd's with the
/// workers it reaped plus the serving worker's.
fn server_ticks(server: &Running) -> Option<u64> {
    match server {
        Running::Floor(f) => procfs::cpu_ticks(f.pid),
        Running::Takeoverd(td) => {
            Some(procfs::cpu_ticks_with_reaped(td.pid)? + procfs::cpu_ticks(td.worker_pid().ok()?)?)
        }
    }
}

/// `kill -9` of the serving worker; returns the ms until `ctl status` shows
/// another worker pid.
fn kill_worker(td: &Server) -> anyhow::Result<f64> {
    let old = td.worker_pid()?;
    let t0 = Instant::now();
    kill(Pid::from_raw(old as i32), Signal::SIGKILL)?;
    // Not testkit's wait: this loop is a stopwatch, polled every 2 ms.
    loop {
        if td.status().is_ok_and(|s| s.worker_pid.is_some_and(|p| p != old)) {
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            anyhow::bail!("no new worker 10 s after killing {old}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn failed(kind: Kind, events: String, why: String) -> ChurnRun {
    ChurnRun {
        server: kind.name().into(),
        events,
        duration_s: 0.0,
        connects: 0,
        connects_per_sec: 0.0,
        echoes_per_sec: 0.0,
        server_cpu_us_per_connect: None,
        server_cores: None,
        client_cores: None,
        p99_us: 0,
        max_us: 0,
        connect_errors: 0,
        resets: 0,
        eofs: 0,
        timeouts: 0,
        discontinuities: 0,
        errors: 0,
        reloads: 0,
        reloads_ok: 0,
        kills: 0,
        kills_ok: 0,
        events_skipped: 0,
        reload_pause_ms: None,
        reload_pause_figure: String::new(),
        kill_to_new_worker_ms: None,
        failure: Some(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_are_spread_evenly() {
        let p = plan(50, 10);
        assert_eq!(p.len(), 60);
        let kills: Vec<usize> = p.iter().enumerate().filter(|(_, e)| **e == Ev::Kill).map(|(i, _)| i).collect();
        assert_eq!(kills, [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]);
        assert_eq!(plan(4, 2), [Ev::Reload, Ev::Reload, Ev::Kill, Ev::Reload, Ev::Reload, Ev::Kill]);
        assert!(plan(3, 0).iter().all(|e| *e == Ev::Reload));
    }
}
