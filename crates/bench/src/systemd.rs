//! Restarts through the fd store under a real, private `systemd --user`
//! manager (the technique of /work/shared/SYSTEMD.md): on a host not booted
//! with systemd, the manager runs in a private mount namespace
//! (`unshare -m --propagation private`) with a tmpfs on /run/systemd holding
//! the "booted with systemd" marker; `systemctl --user` reaches it through
//! `$XDG_RUNTIME_DIR/systemd/private`, from outside that namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::client::{self, ClientRun, ClientSpec, Row, Summary};
use crate::procs::{self, Bins};
use crate::scenarios::{interval_for, Ctx, Event};
use crate::server;
use crate::stats::Spread;

/// The private manager.
#[derive(Debug)]
pub struct Manager {
    child: Child,
    runtime: PathBuf,
    config: PathBuf,
    units: Vec<String>,
}

fn systemd_binary() -> Option<PathBuf> {
    ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"].iter().map(PathBuf::from).find(|p| p.is_file())
}

impl Manager {
    /// Starts a private `systemd --user` with its runtime and config dirs
    /// under `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Manager> {
        let systemd = systemd_binary().context("no systemd binary (/lib/systemd/systemd)")?;
        let runtime = dir.join("sd-run");
        let config = dir.join("sd-config");
        std::fs::create_dir_all(&runtime)?;
        std::fs::create_dir_all(config.join("systemd/user"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700))?;
        let booted = Path::new("/run/systemd/system").is_dir();
        let mut cmd = if booted {
            // A host booted with systemd: a private manager with its own
            // XDG_RUNTIME_DIR does not disturb the user's own.
            let mut c = Command::new(&systemd);
            c.arg("--user");
            c
        } else {
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "sh", "-c"]).arg(format!(
                "mount -t tmpfs tmpfs /run/systemd && mkdir -p /run/systemd/system && exec {} --user",
                systemd.display()
            ));
            c
        };
        let log = std::fs::File::create(dir.join("systemd-manager.log"))?;
        cmd.env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_CONFIG_HOME", &config)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = procs::spawn(&mut cmd)?;
        let private = runtime.join("systemd/private");
        let t0 = Instant::now();
        while !private.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                let text = std::fs::read_to_string(dir.join("systemd-manager.log")).unwrap_or_default();
                bail!("systemd --user exited ({st}): {}", server::last_lines(&text, 5));
            }
            if t0.elapsed() > Duration::from_secs(15) {
                procs::kill_group(&mut child);
                bail!("systemd --user did not create {} within 15 s", private.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Manager { child, runtime, config, units: Vec::new() })
    }

    /// The manager's pid (unshare and sh exec into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `systemctl --user ARGS`; fails when it exits non-zero.
    pub fn systemctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("systemctl")
            .arg("--user")
            .args(args)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env("XDG_CONFIG_HOME", &self.config)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::null())
            .output()
            .context("running systemctl")?;
        if !out.status.success() {
            bail!(
                "systemctl --user {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `systemctl --user show -p PROP --value UNIT`.
    pub fn show(&self, unit: &str, prop: &str) -> String {
        self.systemctl(&["show", "-p", prop, "--value", unit]).unwrap_or_default()
    }

    /// Writes `unit` into the manager's unit directory.
    pub fn install(&mut self, name: &str, text: &str) -> anyhow::Result<()> {
        std::fs::write(self.config.join("systemd/user").join(name), text)?;
        self.units.push(name.to_owned());
        self.systemctl(&["daemon-reload"])?;
        Ok(())
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        for u in self.units.clone() {
            let _ = self.systemctl(&["stop", &u]);
        }
        procs::kill_group(&mut self.child);
    }
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
    format!(
        "[Unit]\nDescription=seqnum-bench: takeoverd + seqnum-worker\n\n[Service]\nType=notify\nNotifyAccess=main\n\
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

/// Runs `plan` (a list of "reload", "restart", "kill") against `n` live
/// connections of a takeoverd service configured as `shipped` under the
/// private manager.
pub fn run(
    ctx: &mut Ctx,
    mgr: &mut Manager,
    n: u64,
    shipped: &ShippedUnit,
    plan: &[&str],
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
        plan.join(", ")
    ));
    let port = procs::free_port()?;
    let tag = format!("sd-{n}");
    let unit = format!("seqnum-bench-{n}.service");
    let ctl = ctx.dir.join(format!("{tag}.ctl"));
    let log = ctx.dir.join(format!("{tag}.log"));
    mgr.install(&unit, &unit_text(&ctx.bins, port, &ctl, &log, ctx.server_cpu, shipped))?;
    mgr.systemctl(&["start", &unit])?;
    let note_pids = |mgr: &Manager, bins: &Bins| {
        if let Ok(p) = mgr.show(&unit, "MainPID").parse::<u32>() {
            if p > 0 {
                procs::note_stray(p, "takeoverd");
            }
        }
        if let Ok(s) = server::ctl_status(bins, &ctl) {
            if let Some(w) = s["worker_pid"].as_u64() {
                procs::note_stray(w as u32, "seqnum-worker");
            }
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
        let _ = mgr.systemctl(&["stop", &unit]);
        bail!(
            "connections did not all come up under systemd: {e:#} (client errors so far: {:?})",
            r.ok().map(|r| r.summary.errors)
        );
    }
    let fdstore_fds = mgr.show(&unit, "NFileDescriptorStore");
    std::thread::sleep(Duration::from_millis(1500));
    let mut events = Vec::new();
    let mut mgr_cpu = Vec::new();
    let tick_ms = 1e3 / procs::clk_tck() as f64;
    for kind in plan {
        let held = server::ctl_status(&ctx.bins, &ctl).ok().and_then(|s| s["connections"].as_u64()).unwrap_or(n);
        let main_before = mgr.show(&unit, "MainPID");
        let cpu0 = procs::cpu_ticks(mgr.pid());
        let at = ctx.clock.now_ms();
        let (ok, detail) = match *kind {
            "reload" => match mgr.systemctl(&["reload", &unit]) {
                Ok(o) => (true, o),
                Err(e) => (false, format!("{e:#}")),
            },
            "restart" => match mgr.systemctl(&["restart", &unit]) {
                Ok(o) => (true, o),
                Err(e) => (false, format!("{e:#}")),
            },
            "kill" => match mgr.systemctl(&["kill", "-s", "KILL", "--kill-who=main", &unit]) {
                Ok(o) => (true, o),
                Err(e) => (false, format!("{e:#}")),
            },
            other => bail!("unknown event {other}"),
        };
        // Back when a (new) main process serves every connection again.
        let t0 = Instant::now();
        let mut back = false;
        while t0.elapsed() < Duration::from_secs(300) {
            let main = mgr.show(&unit, "MainPID");
            let fresh = *kind == "reload" || (main != main_before && main != "0");
            if fresh && mgr.show(&unit, "ActiveState") == "active" {
                if let Ok(s) = server::ctl_status(&ctx.bins, &ctl) {
                    if s["connections"].as_u64().unwrap_or(0) >= held && s["worker_pid"].as_u64().is_some() {
                        back = true;
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let done = ctx.clock.now_ms();
        let cpu1 = procs::cpu_ticks(mgr.pid());
        if *kind != "reload" {
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
        if *kind == "reload" {
            if let Ok(s) = server::ctl_status(&ctx.bins, &ctl) {
                if let Some(r) = s["reloads"].as_array().and_then(|a| a.last()) {
                    handoff = r["handoff_ms"].as_f64();
                    old_exit = r["old_exit_ms"].as_f64();
                }
            }
        }
        events.push(Event {
            kind: (*kind).to_owned(),
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
    let _ = mgr.systemctl(&["stop", &unit]);
    for e in &mut events {
        e.window = client::window(&result.timelines, e.at_ms, e.done_ms + 50.0);
    }
    let pause = |k: &str| {
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
        restart_pause_ms: pause("restart"),
        kill_pause_ms: pause("kill"),
        reload_pause_ms: pause("reload"),
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
