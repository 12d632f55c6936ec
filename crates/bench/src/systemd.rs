//! The systemd section: reloads, restarts and kills of a takeoverd service
//! configured like the shipped unit, with live connections carried through
//! the fd store, under the tests' private `systemd --user` manager
//! ([`testkit::systemd::UserManager`]: a private mount namespace on a host
//! not booted with systemd, its own cgroup, a scrubbed environment).

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use testkit::systemd::UserManager;
use testkit::{poll_until, procfs};

use crate::client::{self, ClientRun, ClientSpec, Row, Summary};
use crate::kinds::EventKind;
use crate::procs::{self, Bins};
use crate::scenarios::{interval_for, Ctx, Event};
use crate::server;
use crate::stats::Spread;

/// How long a `systemctl` call may take (a restart re-reads a store of
/// 10 000 fds).
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(600);

/// `systemctl --user ARGS` against `mgr`, as an `anyhow` result.
fn systemctl(mgr: &UserManager, args: &[&str]) -> anyhow::Result<String> {
    mgr.systemctl_checked(args, SYSTEMCTL_TIMEOUT).map_err(anyhow::Error::msg)
}

/// One property of a unit, empty when systemctl fails.
fn show(mgr: &UserManager, unit: &str, prop: &str) -> String {
    systemctl(mgr, &["show", "-p", prop, "--value", unit]).unwrap_or_default()
}

/// What the benchmark copies from the shipped unit (`units/seqnum.service`).
#[derive(Debug, Clone, Serialize)]
pub struct ShippedUnit {
    /// Where it was read from, if it was found.
    pub source: Option<String>,
    /// `--fdstore-max` on its `ExecStart=` (None: takeoverd's default).
    pub fdstore_max: Option<usize>,
    /// `FileDescriptorStoreMax=`.
    pub store_max: usize,
    /// `WatchdogSec=`.
    pub watchdog: Option<String>,
    /// `StartLimitIntervalSec=` and `StartLimitBurst=` (restarts and kills
    /// in a row count against them: past the limit the unit fails and its fd
    /// store is emptied).
    pub start_limit: Option<(String, String)>,
}

impl ShippedUnit {
    /// Reads the unit next to the workspace (this crate is crates/bench).
    pub fn load() -> ShippedUnit {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../units/seqnum.service");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let value =
            |key: &str| text.lines().map(str::trim).find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned());
        let fdstore_max = value("ExecStart=").and_then(|cmd| {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            words.iter().position(|w| *w == "--fdstore-max").and_then(|i| words.get(i + 1)?.parse().ok())
        });
        ShippedUnit {
            source: (!text.is_empty()).then(|| path.canonicalize().unwrap_or(path).display().to_string()),
            fdstore_max,
            store_max: value("FileDescriptorStoreMax=").and_then(|v| v.parse().ok()).unwrap_or(1024),
            watchdog: value("WatchdogSec="),
            start_limit: value("StartLimitIntervalSec=").zip(value("StartLimitBurst=")),
        }
    }
}

/// Systemd results at one size.
#[derive(Debug, Clone, Serialize)]
pub struct SystemdResult {
    /// Live connections.
    pub connections: u64,
    /// takeoverd's `--fdstore-max` (None: its default): connections past it
    /// ride in the overflow queue.
    pub fdstore_max: Option<usize>,
    /// The unit's `FileDescriptorStoreMax=`.
    pub store_max: usize,
    /// Connect ramp, ms.
    pub ramp_ms: u64,
    /// Per-connection interval, ms.
    pub interval_ms: u64,
    /// Client `--timeout-ms` (long, so that a long pause is measured rather than cut short).
    pub timeout_ms: u64,
    /// `NFileDescriptorStore` with every connection up.
    pub fdstore_fds: String,
    /// Every event, in order.
    pub events: Vec<Event>,
    /// Longest client latency in the `systemctl restart` windows, ms.
    pub restart_pause_ms: Option<Spread>,
    /// Same for `systemctl kill -s KILL --kill-who=main` (automatic restart).
    pub kill_pause_ms: Option<Spread>,
    /// Same for `systemctl reload`.
    pub reload_pause_ms: Option<Spread>,
    /// Same for `takeoverd ctl upgrade` (same pid, the worker untouched).
    pub upgrade_pause_ms: Option<Spread>,
    /// CPU the systemd manager spent per restart/kill event, ms.
    pub manager_cpu_ms: Option<Spread>,
    /// A restarted takeoverd: from "restored from the fd store" to its
    /// control socket being ready (re-sending every fd to the store), ms.
    pub restore_to_ready_ms: Option<Spread>,
    /// From there to its first worker serving, ms.
    pub ready_to_serving_ms: Option<Spread>,
    /// `systemctl restart`: the old takeoverd's "stopping" to the new one's
    /// "restored from the fd store" (old one's stop, systemd's restart, exec,
    /// reading the store), ms.
    pub stop_to_restored_ms: Option<Spread>,
    /// Errors in the client's timeline.
    pub errors: u64,
    /// The client's figures (from its timeline: it is killed at the end).
    pub client: Summary,
    /// The timelines (for the plot).
    #[serde(skip)]
    pub timelines: Vec<Vec<Row>>,
}

fn unit_text(bins: &Bins, port: u16, ctl: &Path, log: &Path, cpu: Option<usize>, shipped: &ShippedUnit) -> String {
    let affinity = cpu.map(|c| format!("CPUAffinity={c}\n")).unwrap_or_default();
    let fdstore = shipped.fdstore_max.map(|m| format!(" --fdstore-max {m}")).unwrap_or_default();
    let watchdog = shipped.watchdog.as_ref().map(|w| format!("WatchdogSec={w}\n")).unwrap_or_default();
    let start_limit = shipped
        .start_limit
        .as_ref()
        .map(|(i, b)| format!("StartLimitIntervalSec={i}\nStartLimitBurst={b}\n"))
        .unwrap_or_default();
    format!(
        "[Unit]\nDescription=seqnum-bench: takeoverd + seqnum-worker\n{start_limit}\n[Service]\nType=notify\nNotifyAccess=main\n\
ExecStart={td} --listen 127.0.0.1:{port} --control-socket {ctl} --worker {w}{fdstore}\n\
ExecReload={td} ctl --control-socket {ctl} reload\n\
FileDescriptorStoreMax={store_max}\nLimitNOFILE={nofile}\nRestart=on-failure\nRestartSec=100ms\nKillMode=mixed\n\
TimeoutStartSec=300\nTimeoutStopSec=60\n{watchdog}{affinity}Environment=RUST_LOG=info\n\
StandardOutput=append:{log}\nStandardError=append:{log}\n",
        td = bins.takeoverd.display(),
        w = bins.worker.display(),
        ctl = ctl.display(),
        log = log.display(),
        store_max = shipped.store_max,
        nofile = nofile_hard(),
    )
}

/// The hard open-file limit (a unit cannot get more than the manager has).
fn nofile_hard() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(_, h)| h).unwrap_or(20_000)
}

/// Runs `plan` against `n` live connections of a takeoverd service
/// configured as `shipped` under the private manager.
pub fn run(
    ctx: &mut Ctx,
    mgr: &mut UserManager,
    n: u64,
    shipped: &ShippedUnit,
    plan: &[EventKind],
) -> anyhow::Result<SystemdResult> {
    let fdstore_max = shipped.fdstore_max;
    // Each FDSTORE=1 costs the manager a scan of the whole store (about 1 µs
    // per stored fd here): past a rate of 1 / (n × 1 µs) connects per second
    // it falls behind, takeoverd blocks on the notify socket and the worker
    // on takeoverd. Connect slowly enough (2 µs per stored fd) when every
    // connection is stored by name.
    let by_name = (fdstore_max.unwrap_or(256) as u64).min(shipped.store_max as u64).min(n);
    let ramp = (n / 10).max(by_name * by_name / 500);
    ctx.say(&format!(
        "systemd: {n} connections, --fdstore-max {}, connects over {:.0} s: {}",
        fdstore_max.map_or("(default)".into(), |m| m.to_string()),
        ramp as f64 / 1e3,
        plan.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    ));
    let port = procs::free_port()?;
    let tag = format!("sd-{n}");
    let unit = format!("seqnum-bench-{n}.service");
    let ctl = ctx.dir.join(format!("{tag}.ctl"));
    let log = ctx.dir.join(format!("{tag}.log"));
    mgr.install_unit(&unit, &unit_text(&ctx.bins, port, &ctl, &log, ctx.server_cpu, shipped));
    systemctl(mgr, &["daemon-reload"])?;
    systemctl(mgr, &["start", &unit])?;
    let note_pids = |mgr: &UserManager, bins: &Bins| {
        if let Ok(p) = show(mgr, &unit, "MainPID").parse::<u32>() {
            if p > 0 {
                procs::note_stray(p, "takeoverd");
            }
        }
        if let Some(w) = server::ctl_status(bins, &ctl).ok().and_then(|s| s.worker_pid) {
            procs::note_stray(w, "seqnum-worker");
        }
    };
    server::wait_connections(&ctx.bins, &ctl, 0, Duration::from_secs(10))?;
    note_pids(mgr, &ctx.bins);

    let timeout_ms = 300_000;
    let spec = ClientSpec {
        port,
        connections: n,
        interval_ms: interval_for(n),
        duration_s: 3600.0,
        timeout_ms,
        ramp_ms: ramp,
        source_addresses: 1,
        cpu: ctx.client_cpu,
        churn_messages: None,
    };
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, &tag, &spec)?;
    let up = server::wait_connections(&ctx.bins, &ctl, n, Duration::from_secs_f64(ramp as f64 / 1e3 + 60.0));
    if let Err(e) = up {
        let r = run.kill_and_collect();
        let _ = systemctl(mgr, &["stop", &unit]);
        bail!(
            "connections did not all come up under systemd: {e:#} (client errors so far: {:?})",
            r.ok().map(|r| r.summary.errors)
        );
    }
    let fdstore_fds = show(mgr, &unit, "NFileDescriptorStore");
    std::thread::sleep(Duration::from_millis(1500));
    let mut events = Vec::new();
    let mut mgr_cpu = Vec::new();
    let tick_ms = 1e3 / procfs::clk_tck() as f64;
    for &kind in plan {
        let held = server::ctl_status(&ctx.bins, &ctl).map_or(n as usize, |s| s.connections);
        let main_before = show(mgr, &unit, "MainPID");
        let cpu0 = procfs::cpu_ticks(mgr.pid());
        let at = ctx.clock.now_ms();
        let args: &[&str] = match kind {
            EventKind::Reload => &["reload", &unit],
            EventKind::Restart => &["restart", &unit],
            EventKind::Kill => &["kill", "-s", "KILL", "--kill-who=main", &unit],
            EventKind::Upgrade => &[],
        };
        let (ok, detail) = if kind == EventKind::Upgrade {
            match server::ctl_upgrade(&ctx.bins, &ctl) {
                Ok(o) => (o.ok, o.output),
                Err(e) => (false, format!("{e:#}")),
            }
        } else {
            match systemctl(mgr, args) {
                Ok(o) => (true, o),
                Err(e) => (false, format!("{e:#}")),
            }
        };
        // Back when a (new) main process serves every connection again.
        let back = poll_until("a main process serves every connection again", Duration::from_secs(300), || {
            let main = show(mgr, &unit, "MainPID");
            // A reload and an upgrade keep the main process; the others replace it.
            let fresh = match kind {
                EventKind::Reload | EventKind::Upgrade => main == main_before,
                _ => main != main_before && main != "0",
            };
            fresh
                && show(mgr, &unit, "ActiveState") == "active"
                && server::ctl_status(&ctx.bins, &ctl).is_ok_and(|s| s.connections >= held && s.worker_pid.is_some())
        })
        .is_ok();
        let done = ctx.clock.now_ms();
        let cpu1 = procfs::cpu_ticks(mgr.pid());
        if matches!(kind, EventKind::Restart | EventKind::Kill) {
            if let (Some(a), Some(b)) = (cpu0, cpu1) {
                mgr_cpu.push((b - a) as f64 * tick_ms);
            }
        }
        note_pids(mgr, &ctx.bins);
        let ok = ok && back;
        if !ok {
            ctx.note(format!("systemd {kind} at {n} connections did not come back cleanly: {detail}"));
        }
        let (mut handoff, mut old_exit) = (None, None);
        if kind == EventKind::Reload {
            if let Some(r) = server::ctl_status(&ctx.bins, &ctl).ok().and_then(|mut s| s.reloads.pop()) {
                (handoff, old_exit) = (Some(r.handoff_ms), Some(r.old_exit_ms));
            }
        }
        events.push(Event {
            kind,
            at_ms: at,
            done_ms: done,
            ok,
            detail,
            window: client::Window::default(),
            handoff_ms: handoff,
            old_exit_ms: old_exit,
        });
        procs::sleep_until(&ctx.clock, done + 1500.0);
    }
    std::thread::sleep(Duration::from_millis(500));
    let result = run.kill_and_collect()?;
    let _ = systemctl(mgr, &["stop", &unit]);
    for e in &mut events {
        e.window = client::window(&result.timelines, e.at_ms, e.done_ms + 50.0);
    }
    let pause = |k: EventKind| {
        Spread::of(&events.iter().filter(|e| e.kind == k).map(|e| e.window.max_us as f64 / 1e3).collect::<Vec<_>>())
    };
    let (stop, restore, serving) = restart_phases(&log);
    if result.summary.errors > 0 || result.summary.failed_processes > 0 {
        ctx.note(format!(
            "ERRORS under systemd at {n} connections: {} in the client's timeline ({:?})",
            result.summary.errors, result.summary.failure
        ));
    }
    Ok(SystemdResult {
        connections: n,
        fdstore_max,
        store_max: shipped.store_max,
        ramp_ms: ramp,
        interval_ms: interval_for(n),
        timeout_ms,
        fdstore_fds,
        restart_pause_ms: pause(EventKind::Restart),
        kill_pause_ms: pause(EventKind::Kill),
        reload_pause_ms: pause(EventKind::Reload),
        upgrade_pause_ms: pause(EventKind::Upgrade),
        manager_cpu_ms: Spread::of(&mgr_cpu),
        restore_to_ready_ms: restore,
        ready_to_serving_ms: serving,
        stop_to_restored_ms: stop,
        errors: result.summary.errors,
        client: result.summary,
        events,
        timelines: result.timelines,
    })
}

/// From the service log: for each `systemctl restart`, the old takeoverd's
/// "stopping" → the new one's "restored from the fd store"; for each
/// takeoverd restored from the fd store, restored → control socket ready,
/// and ready → first worker serving.
fn restart_phases(log: &Path) -> (Option<Spread>, Option<Spread>, Option<Spread>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut s, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    let (mut stopping, mut restored, mut ready) = (None, None, None);
    for line in text.lines() {
        let Some(t) = procs::parse_log_time(line) else { continue };
        if line.contains("INFO stopping") {
            stopping = Some(t);
        } else if line.contains("restored from the fd store") {
            if let Some(st) = stopping.take() {
                s.push((t - st) * 1e3);
            }
            (restored, ready) = (Some(t), None);
        } else if line.contains("control socket ready") && restored.is_some() && ready.is_none() {
            ready = Some(t);
        } else if line.contains("worker serving") {
            if let (Some(r), Some(c)) = (restored, ready) {
                a.push((c - r) * 1e3);
                b.push((t - c) * 1e3);
            }
            (restored, ready) = (None, None);
        }
    }
    (Spread::of(&s), Spread::of(&a), Spread::of(&b))
}
