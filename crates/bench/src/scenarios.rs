//! The measurements against takeoverd + seqnum-worker started directly:
//! reload handoff, echo cost, memory, scale.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use testkit::procfs;

use crate::client::{self, ClientRun, ClientSpec, Row, Window};
use crate::kinds::{EventKind, Placement};
use crate::procs::{self, Bins, Clock};
use crate::server::Server;
use crate::stats::Spread;
use crate::target::{Kind, Running};

/// What every scenario needs.
#[derive(Debug)]
pub struct Ctx {
    /// The binaries.
    pub bins: Bins,
    /// The benchmark's clock.
    pub clock: Clock,
    /// Scratch directory (logs, timelines, control sockets).
    pub dir: PathBuf,
    /// `--quick`.
    pub quick: bool,
    /// CPU for takeoverd and its workers (None: not pinned).
    pub server_cpu: Option<usize>,
    /// CPU for the clients.
    pub client_cpu: Option<usize>,
    /// Odd things seen, for the report.
    pub notes: Vec<String>,
}

impl Ctx {
    /// Prints a progress line and keeps nothing.
    pub fn say(&self, msg: &str) {
        eprintln!("[{:7.1}s] {msg}", self.clock.now_ms() / 1e3);
    }

    /// Records (and prints) something odd.
    pub fn note(&mut self, msg: String) {
        eprintln!("[{:7.1}s] NOTE: {msg}", self.clock.now_ms() / 1e3);
        self.notes.push(msg);
    }
}

/// Per-connection interval that keeps the offered load at about
/// 10 000 messages/s whatever the number of connections (at least 10 ms).
pub fn interval_for(connections: u64) -> u64 {
    (connections / 10).max(10)
}

/// Loopback source addresses for `n` connections: one per 10 000. Past
/// about 14 000 connections from one address to one port, each connect
/// scans the whole half of the port range the kernel tries first (about a
/// millisecond here), and a client doing thousands of them stalls.
pub fn source_addresses(n: u64) -> u32 {
    n.div_ceil(10_000).clamp(1, 254) as u32
}

/// Ramp of the initial connects: 10 per ms.
pub fn ramp_for(connections: u64) -> u64 {
    connections / 10
}

/// One event (reload, restart, kill) and what clients saw around it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// What was done.
    pub kind: EventKind,
    /// When it was asked for, ms on the benchmark's clock.
    pub at_ms: f64,
    /// When it was over (the command returned, or service was back).
    pub done_ms: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// What the command said.
    pub detail: String,
    /// Client latency over the timeline rows overlapping [at, done + 50 ms].
    pub window: Window,
    /// takeoverd's `handoff_ms` for a reload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff_ms: Option<f64>,
    /// takeoverd's `old_exit_ms` for a reload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_exit_ms: Option<f64>,
}

/// Median/min/max of window figures, in ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowSpread {
    /// Per-window highest row median.
    pub p50_ms: Option<Spread>,
    /// Per-window highest row p99.
    pub p99_ms: Option<Spread>,
    /// Per-window maximum.
    pub max_ms: Option<Spread>,
    /// Errors in the windows.
    pub errors: u64,
}

/// Summarises windows.
pub fn spread_windows(ws: &[Window]) -> WindowSpread {
    let f = |g: fn(&Window) -> u64| Spread::of(&ws.iter().map(|w| g(w) as f64 / 1e3).collect::<Vec<_>>());
    WindowSpread {
        p50_ms: f(|w| w.p50_us),
        p99_ms: f(|w| w.p99_us),
        max_ms: f(|w| w.max_us),
        errors: ws.iter().map(|w| w.errors).sum(),
    }
}

/// Echo throughput and cost at one size and placement.
#[derive(Debug, Clone, Serialize)]
pub struct EchoResult {
    /// "takeoverd" (takeoverd + seqnum-worker) or "floor-echo".
    pub server: String,
    /// Connections (each sends its next message as soon as the echo is in).
    pub connections: u64,
    /// takeoverd's `--workers` (1, its default, but in the workers
    /// section; floor-echo: 1).
    pub workers: usize,
    /// "pinned" (server on one CPU, client on the other) or "shared".
    pub placement: Placement,
    /// Echoes per second in the measured window.
    pub echoes_per_sec: f64,
    /// CPU time of takeoverd + workers (or of floor-echo) per echo, µs.
    pub server_cpu_us_per_echo: f64,
    /// Of which the workers (floor-echo: all of it).
    pub worker_cpu_us_per_echo: f64,
    /// CPU time of the client per echo, µs.
    pub client_cpu_us_per_echo: f64,
    /// Server CPU use in the window, in cores.
    pub server_cores: f64,
    /// Client CPU use, in cores.
    pub client_cores: f64,
    /// The client's whole-run latency p50, µs.
    pub p50_us: u64,
    /// The client's whole-run latency p99, µs.
    pub p99_us: u64,
    /// Errors.
    pub errors: u64,
    /// Measured window, s.
    pub window_s: f64,
}

/// Echo cost with `n` connections at `--interval-ms 0`, against takeoverd
/// (with `workers` workers) or against the floor.
pub fn echo(ctx: &mut Ctx, n: u64, pinned: bool, kind: Kind, workers: usize) -> anyhow::Result<EchoResult> {
    let placement = Placement::of(pinned);
    let workers = if kind == Kind::Floor { 1 } else { workers.max(1) };
    let with = if workers > 1 { format!(" --workers {workers}") } else { String::new() };
    ctx.say(&format!("echo cost: {n} connections, {placement}, {}{with}", kind.name()));
    let (scpu, ccpu) = if pinned { (ctx.server_cpu, ctx.client_cpu) } else { (None, None) };
    let ramp = ramp_for(n);
    let warm_ms = if ctx.quick { 300.0 } else { 1000.0 };
    let measure_ms = if ctx.quick { 1000.0 } else { 3000.0 };
    let slack_ms = 500.0 + n as f64 / 10.0;
    let tag = match kind {
        Kind::Takeoverd if workers > 1 => format!("echo-{n}-{placement}-w{workers}"),
        Kind::Takeoverd => format!("echo-{n}-{placement}"),
        Kind::Floor => format!("floor-echo-{n}-{placement}"),
    };
    let server = Running::start(&ctx.bins, &ctx.dir, kind, &tag, scpu, workers)?;
    let spec = ClientSpec {
        port: server.port(),
        connections: n,
        interval_ms: 0,
        duration_s: (ramp as f64 + slack_ms + warm_ms + measure_ms + 500.0) / 1e3,
        timeout_ms: 5000,
        ramp_ms: ramp,
        source_addresses: 1,
        cpu: ccpu,
        churn_messages: None,
    };
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &tag, &spec)?;
    server.wait_connections(n, Duration::from_secs_f64((ramp as f64 + slack_ms) / 1e3 + 10.0))?;
    let echoing = server.echo_pids()?;
    let others = server.other_pids();
    procs::sleep_until(&ctx.clock, ctx.clock.now_ms() + warm_ms);
    let pids = run.pids();
    let client_ticks = |ps: &[u32]| ps.iter().filter_map(|p| procfs::cpu_ticks(*p)).sum::<u64>();
    let server_ticks = |ps: &[u32]| ps.iter().map(|p| procfs::cpu_ticks(*p)).sum::<Option<u64>>();
    let t1 = ctx.clock.now_ms();
    let (w1, d1, c1) = (server_ticks(&echoing), server_ticks(&others), client_ticks(&pids));
    procs::sleep_until(&ctx.clock, t1 + measure_ms);
    let (w2, d2, c2) = (server_ticks(&echoing), server_ticks(&others), client_ticks(&pids));
    let t2 = ctx.clock.now_ms();
    let result = run.finish(&ctx.clock, Duration::from_secs(30))?;
    server.stop();
    // Echoes in the rows wholly inside the window.
    let rows: Vec<&Row> = result.timelines.iter().flatten().filter(|r| r.t_ms >= t1 && r.t_ms + 100.0 <= t2).collect();
    let slices =
        if result.timelines.len() > 1 { rows.len() as f64 / result.timelines.len() as f64 } else { rows.len() as f64 };
    let echoes: u64 = rows.iter().map(|r| r.echoes).sum();
    let rate = if slices > 0.0 { echoes as f64 / (slices * 0.1) } else { 0.0 };
    let secs = (t2 - t1) / 1e3;
    let tick_us = 1e6 / procfs::clk_tck() as f64;
    let (Some(w1), Some(w2), Some(d1), Some(d2)) = (w1, w2, d1, d2) else {
        anyhow::bail!("could not read the CPU times of the server ({})", kind.name())
    };
    let server_us = ((w2 - w1) + (d2 - d1)) as f64 * tick_us;
    let worker_us = (w2 - w1) as f64 * tick_us;
    let client_us = (c2 - c1) as f64 * tick_us;
    let total_echoes = rate * secs;
    let per = |us: f64| if total_echoes > 0.0 { us / total_echoes } else { f64::NAN };
    if result.summary.errors > 0 || result.summary.failed_processes > 0 {
        ctx.note(format!(
            "ERRORS in the echo run ({n}, {placement}, {}{with}): {} ({:?})",
            kind.name(),
            result.summary.errors,
            result.summary.failure
        ));
    }
    Ok(EchoResult {
        server: kind.name().into(),
        connections: n,
        workers,
        placement,
        echoes_per_sec: rate,
        server_cpu_us_per_echo: per(server_us),
        worker_cpu_us_per_echo: per(worker_us),
        client_cpu_us_per_echo: per(client_us),
        server_cores: server_us / 1e6 / secs,
        client_cores: client_us / 1e6 / secs,
        p50_us: result.summary.p50_us,
        p99_us: result.summary.p99_us,
        errors: result.summary.errors,
        window_s: secs,
    })
}

/// Resident memory at 0 and at `n` idle connections.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    /// Idle connections.
    pub connections: u64,
    /// Worker VmRSS with no connection, KiB.
    pub worker_idle_kib: u64,
    /// Worker VmRSS with the connections, KiB.
    pub worker_loaded_kib: u64,
    /// A fresh worker's VmRSS after a reload with the connections, KiB.
    pub worker_after_reload_kib: u64,
    /// takeoverd VmRSS with no connection, KiB.
    pub takeoverd_idle_kib: u64,
    /// takeoverd VmRSS with the connections, KiB.
    pub takeoverd_loaded_kib: u64,
    /// takeoverd VmRSS after that reload, KiB.
    pub takeoverd_after_reload_kib: u64,
    /// (loaded − idle) / n, bytes.
    pub worker_bytes_per_conn: f64,
    /// Same for a fresh worker after a reload.
    pub worker_after_reload_bytes_per_conn: f64,
    /// (loaded − idle) / n, bytes.
    pub takeoverd_bytes_per_conn: f64,
    /// Errors (connections that failed to come up).
    pub errors: u64,
}

/// RSS of takeoverd and worker with 0 and `n` idle connections.
pub fn memory(ctx: &mut Ctx, n: u64) -> anyhow::Result<MemoryResult> {
    ctx.say(&format!("memory: 0 and {n} idle connections"));
    let server = Server::start(&ctx.bins, &ctx.dir, &format!("memory-{n}"), None)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss = |pid: u32| procfs::rss_kib(pid).unwrap_or(0);
    let w0 = server.worker_pid()?;
    let (wi, di) = (rss(w0), rss(server.pid));
    let ramp = ramp_for(n);
    let spec = ClientSpec::idle(server.port, n, ramp, 1);
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &format!("memory-{n}"), &spec)?;
    let up = server.wait_connections(n, Duration::from_secs_f64(ramp as f64 / 1e3 + 20.0));
    std::thread::sleep(Duration::from_millis(1000));
    let w1 = server.worker_pid()?;
    let (wl, dl) = (rss(w1), rss(server.pid));
    let reload = server.reload()?;
    if !reload.ok {
        ctx.note(format!("memory run: reload failed: {}", reload.output));
    }
    std::thread::sleep(Duration::from_millis(500));
    let w2 = server.worker_pid()?;
    let (wr, dr) = (rss(w2), rss(server.pid));
    let errors = u64::from(up.is_err()) + u64::from(!reload.ok);
    if let Err(e) = up {
        ctx.note(format!("memory run: {e}"));
    }
    // The client never ends on its own (600 s): kill it.
    let _ = run.kill_and_collect();
    server.stop();
    let per = |a: u64, b: u64| (a as f64 - b as f64) * 1024.0 / n as f64;
    Ok(MemoryResult {
        connections: n,
        worker_idle_kib: wi,
        worker_loaded_kib: wl,
        worker_after_reload_kib: wr,
        takeoverd_idle_kib: di,
        takeoverd_loaded_kib: dl,
        takeoverd_after_reload_kib: dr,
        worker_bytes_per_conn: per(wl, wi),
        worker_after_reload_bytes_per_conn: per(wr, wi),
        takeoverd_bytes_per_conn: per(dl, di),
        errors,
    })
}

/// One step of the scale ladder.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleStep {
    /// Connections asked for.
    pub connections: u64,
    /// Connections takeoverd held before the first reload.
    pub held: u64,
    /// Whether every reload succeeded with zero client errors.
    pub ok: bool,
    /// Reloads asked for and succeeded.
    pub reloads: usize,
    /// Succeeded.
    pub reloads_ok: usize,
    /// handoff_ms.
    pub handoff_ms: Option<Spread>,
    /// old_exit_ms.
    pub old_exit_ms: Option<Spread>,
    /// Worst client latency in a reload window, ms.
    pub worst_latency_ms: f64,
    /// Client errors.
    pub errors: u64,
    /// Client processes.
    pub client_processes: u64,
    /// Workers sharing the connections (`--workers`).
    pub workers: usize,
    /// takeoverd's RSS growth per connection held, bytes (its copies open
    /// or parked).
    pub takeoverd_rss_per_conn_b: f64,
    /// The workers' RSS growth (all of them) per connection held, bytes.
    pub workers_rss_per_conn_b: f64,
    /// Whether a SIGKILL of one worker, after the reloads, was recovered
    /// (a new worker served its share) with the other untouched.
    pub worker_kill_ok: bool,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// The scale ladder.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    /// The steps tried, in order.
    pub steps: Vec<ScaleStep>,
    /// The largest count that survived its reloads with zero errors.
    pub reached: Option<u64>,
    /// The hard RLIMIT_NOFILE, and whether it could be raised.
    pub fd_limit: String,
    /// What stopped the ladder.
    pub stopped_by: String,
}

/// Tries each count of `ladder` in turn (3 reloads each) until one fails.
pub fn scale(ctx: &mut Ctx, ladder: &[u64], fd_limit: &str) -> ScaleResult {
    let mut steps = Vec::new();
    let mut stopped_by = "every step passed".to_owned();
    for &n in ladder {
        match scale_step(ctx, n) {
            Ok(step) => {
                let ok = step.ok;
                if !ok {
                    stopped_by = format!(
                        "{n} connections: {}",
                        step.failure.clone().unwrap_or_else(|| format!("{} client errors", step.errors))
                    );
                }
                steps.push(step);
                if !ok {
                    break;
                }
            }
            Err(e) => {
                stopped_by = format!("{n} connections: {e:#}");
                ctx.note(format!("scale step {n} could not run: {e:#}"));
                steps.push(ScaleStep {
                    connections: n,
                    held: 0,
                    ok: false,
                    reloads: 0,
                    reloads_ok: 0,
                    handoff_ms: None,
                    old_exit_ms: None,
                    worst_latency_ms: 0.0,
                    errors: 0,
                    client_processes: 0,
                    workers: scale_workers(n),
                    worker_kill_ok: false,
                    takeoverd_rss_per_conn_b: 0.0,
                    workers_rss_per_conn_b: 0.0,
                    failure: Some(format!("{e:#}")),
                });
                break;
            }
        }
    }
    let reached = steps.iter().filter(|s| s.ok).map(|s| s.connections).max();
    ScaleResult { steps, reached, fd_limit: fd_limit.to_owned(), stopped_by }
}

/// Workers at a step of the scale ladder: at least 2, and enough that no
/// worker holds more than 18 000 connections (this machine's hard
/// `RLIMIT_NOFILE` is 20 000 per process; takeoverd itself parks its copies
/// past its budget, `--max-open-connections`).
pub fn scale_workers(n: u64) -> usize {
    (n.div_ceil(18_000) as usize).max(2)
}

fn scale_step(ctx: &mut Ctx, n: u64) -> anyhow::Result<ScaleStep> {
    let reloads = 3;
    let interval = interval_for(n);
    let ramp = ramp_for(n);
    let slack_ms = 5000.0 + n as f64 / 5.0;
    let spacing_ms = 3000.0;
    let duration_s = (ramp as f64 + slack_ms + 1000.0 + (reloads + 1) as f64 * spacing_ms + 2000.0) / 1e3;
    let source_addresses = source_addresses(n);
    ctx.say(&format!(
        "scale: {n} connections, {} workers, {interval} ms interval, {reloads} reloads, 1 worker SIGKILL",
        scale_workers(n)
    ));
    let extra = vec!["--workers".to_string(), scale_workers(n).to_string()];
    let server = Server::start_with(&ctx.bins, &ctx.dir, &format!("scale-{n}"), None, &extra)?;
    let rss_before = scale_rss(&server);
    let spec = ClientSpec {
        port: server.port,
        connections: n,
        interval_ms: interval,
        duration_s,
        timeout_ms: 5000,
        ramp_ms: ramp,
        source_addresses,
        cpu: None,
        churn_messages: None,
    };
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &format!("scale-{n}"), &spec)?;
    let client_processes = run.pids().len() as u64;
    let up = server.wait_connections(n, Duration::from_secs_f64((ramp as f64 + slack_ms) / 1e3));
    let held = server.status().map_or(0, |s| s.connections as u64);
    // What the connections cost in memory, before any reload replaces a
    // worker (a new one starts from nothing).
    let rss_after = scale_rss(&server);
    let per_conn = |before: u64, after: u64| after.saturating_sub(before) as f64 * 1024.0 / held.max(1) as f64;
    let rss_per_conn = (per_conn(rss_before.0, rss_after.0), per_conn(rss_before.1, rss_after.1));
    let mut failure = up.err().map(|e| format!("{e:#}"));
    let mut events = Vec::new();
    if failure.is_none() {
        std::thread::sleep(Duration::from_millis(1000));
        for _ in 0..reloads {
            let at = ctx.clock.now_ms();
            let out = server.reload()?;
            let done = ctx.clock.now_ms();
            if !out.ok && failure.is_none() {
                failure = Some(format!("reload failed: {}", out.output));
            }
            events.push((at, done, out.ok));
            procs::sleep_until(&ctx.clock, at + spacing_ms);
        }
    }
    // Then a SIGKILL of the last worker: takeoverd restarts it with its
    // share; the other serves on.
    let mut worker_kill_ok = false;
    if failure.is_none() {
        let at = ctx.clock.now_ms();
        match kill_last_worker(&server) {
            Ok(()) => worker_kill_ok = true,
            Err(e) => failure = Some(format!("worker SIGKILL: {e:#}")),
        }
        events.push((at, ctx.clock.now_ms(), worker_kill_ok));
        procs::sleep_until(&ctx.clock, at + spacing_ms);
    }
    let status = server.status().ok();
    let result = run.finish(&ctx.clock, Duration::from_secs(60))?;
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    server.stop();
    if failure.is_some() {
        // Why: the first warning or error in takeoverd's and the workers' log.
        if let Some(line) = log.lines().find(|l| l.contains(" WARN ") || l.contains(" ERROR ")) {
            failure = Some(format!("{}; log: {}", failure.unwrap_or_default(), line.trim()));
        }
    }
    let records = status.map(|s| s.reloads).unwrap_or_default();
    let records = &records[records.len().saturating_sub(events.len())..];
    let handoff = Spread::of(&records.iter().map(|r| r.handoff_ms).collect::<Vec<_>>());
    let old_exit = Spread::of(&records.iter().map(|r| r.old_exit_ms).collect::<Vec<_>>());
    let worst = events.iter().map(|(a, d, _)| client::window(&result.timelines, *a, d + 50.0).max_us).max().unwrap_or(0)
        as f64
        / 1e3;
    let errors = result.summary.errors;
    if failure.is_none() && (errors > 0 || result.summary.failed_processes > 0) {
        failure = Some(format!(
            "{errors} client errors (timeouts {}, connect errors {}, resets {}, EOFs {}){}",
            result.summary.timeouts,
            result.summary.connect_errors,
            result.summary.resets,
            result.summary.eofs,
            result.summary.failure.as_deref().map(|f| format!("; {f}")).unwrap_or_default()
        ));
    }
    let reloads_ok = events.iter().take(reloads).filter(|e| e.2).count();
    let ok = failure.is_none() && reloads_ok == reloads && worker_kill_ok;
    if !ok {
        ctx.say(&format!("scale: {n} failed: {}", failure.as_deref().unwrap_or("?")));
    }
    Ok(ScaleStep {
        connections: n,
        held,
        ok,
        reloads,
        reloads_ok,
        handoff_ms: handoff,
        old_exit_ms: old_exit,
        worst_latency_ms: worst,
        errors,
        client_processes,
        workers: scale_workers(n),
        worker_kill_ok,
        takeoverd_rss_per_conn_b: rss_per_conn.0,
        workers_rss_per_conn_b: rss_per_conn.1,
        failure,
    })
}

/// RSS of takeoverd and of all its workers, KiB.
fn scale_rss(server: &Server) -> (u64, u64) {
    let workers =
        server.status().map(|s| s.workers.iter().filter_map(|w| w.pid).collect::<Vec<_>>()).unwrap_or_default();
    let rss = |pid: u32| procfs::rss_kib(pid).unwrap_or(0);
    (rss(server.pid), workers.into_iter().map(rss).sum())
}

/// SIGKILLs the last slot's worker and waits until a new one serves its
/// share while the others keep their pids.
fn kill_last_worker(server: &Server) -> anyhow::Result<()> {
    let before = server.status()?;
    let Some(last) = before.workers.last() else { anyhow::bail!("takeoverd reports no workers") };
    let victim = last.pid.ok_or_else(|| anyhow::anyhow!("worker {} is not serving", last.slot))?;
    let others: Vec<Option<u32>> = before.workers.iter().rev().skip(1).map(|w| w.pid).collect();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL)?;
    let back = testkit::poll_until("a new worker serves the killed one's share", Duration::from_secs(30), || {
        server
            .status()
            .is_ok_and(|s| s.workers.last().is_some_and(|w| w.state == "serving" && w.pid.is_some_and(|p| p != victim)))
    });
    back.map_err(|e| anyhow::anyhow!("{e}"))?;
    let after = server.status()?;
    let now: Vec<Option<u32>> = after.workers.iter().rev().skip(1).map(|w| w.pid).collect();
    anyhow::ensure!(now == others, "the other workers changed when one was killed: {others:?} -> {now:?}");
    Ok(())
}
