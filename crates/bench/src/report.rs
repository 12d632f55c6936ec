//! Everything the benchmark writes: the console table, benchmarks.json,
//! BENCHMARKS.md and latency.svg.

use std::fmt::Write as _;

use serde::Serialize;

use crate::client::Row;
use crate::kinds::{EventKind, Placement};
use crate::profile::Profile;
use crate::scenarios::{EchoResult, Event, HandoffResult, MemoryResult, ScaleResult, WindowSpread};
use crate::stats::{show, Spread};
use crate::systemd::SystemdResult;

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Whether /proc/cpuinfo shows the `hypervisor` flag.
    pub virtualised: bool,
    /// MemTotal.
    pub memory: String,
    /// Kernel release.
    pub kernel: String,
    /// /proc/loadavg when the run started.
    pub loadavg_at_start: String,
    /// /proc/loadavg when it ended.
    pub loadavg_at_end: String,
    /// `systemd --version`, first line.
    pub systemd: String,
    /// net.ipv4.tcp_congestion_control.
    pub tcp_congestion_control: String,
    /// The hard RLIMIT_NOFILE, and whether it could be raised.
    pub fd_limit: String,
}

/// What was measured: the workspace's commit and the binaries.
#[derive(Debug, Clone, Serialize)]
pub struct Build {
    /// `git rev-parse --short HEAD`.
    pub commit: String,
    /// Tracked files were modified.
    pub dirty: bool,
    /// Each binary: name, size, modification time.
    pub binaries: Vec<String>,
}

/// A target and whether it was met.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What.
    pub name: String,
    /// The bound, as text.
    pub target: String,
    /// The figure compared with it.
    pub measured: Option<f64>,
    /// Its unit.
    pub unit: String,
    /// `None` when not measured.
    pub met: Option<bool>,
    /// Which figure was used.
    pub basis: String,
}

/// The systemd part.
#[derive(Debug, Clone, Serialize)]
pub struct SystemdSection {
    /// "ok", or why not.
    pub status: String,
    /// The fd-store settings copied from the shipped unit.
    pub unit: Option<crate::systemd::ShippedUnit>,
    /// The runs.
    pub runs: Vec<SystemdResult>,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// "full" or "quick".
    pub mode: String,
    /// The command that reproduces this run.
    pub command: String,
    /// The benchmark's own arguments.
    pub argv: Vec<String>,
    /// When (UTC).
    pub date_utc: String,
    /// Where.
    pub machine: Machine,
    /// Which binaries.
    pub bin_dir: String,
    /// The commit and binaries measured.
    pub build: Build,
    /// How processes were placed on the CPUs.
    pub placement: String,
    /// 1. Reload handoff.
    pub handoff: Vec<HandoffResult>,
    /// 2. systemd.
    pub systemd: SystemdSection,
    /// 3. Echo cost.
    pub echo: Vec<EchoResult>,
    /// The same echo loads against floor-echo.
    pub floor_echo: Vec<EchoResult>,
    /// 4. Memory.
    pub memory: Option<MemoryResult>,
    /// 5. Scale.
    pub scale: Option<ScaleResult>,
    /// 6. Connection churn.
    pub churn: Option<crate::churn::ChurnSection>,
    /// Profiles.
    pub profiles: Vec<Profile>,
    /// Profiling status.
    pub profiling: String,
    /// Targets.
    pub targets: Vec<Target>,
    /// Client errors over every run (must be 0).
    pub total_errors: u64,
    /// Odd things seen.
    pub notes: Vec<String>,
    /// What the plot shows.
    pub plot: String,
    /// How long the benchmark ran, s.
    pub duration_s: f64,
}

fn tick(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "✔",
        Some(false) => "✘",
        None => "–",
    }
}

/// Evaluates the targets of the issue.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let h = |n: u64| r.handoff.iter().find(|h| h.connections == n && h.placement == Placement::Pinned);
    let mut push = |name: &str, bound: f64, unit: &str, measured: Option<f64>, basis: &str| {
        t.push(Target {
            name: name.to_owned(),
            target: format!("≤ {bound} {unit}"),
            measured,
            unit: unit.to_owned(),
            met: measured.map(|m| m <= bound),
            basis: basis.to_owned(),
        });
    };
    let worst = |w: &WindowSpread| w.max_ms.map(|s| s.max);
    for (n, label) in [(1_000, "1 000"), (10_000, "10 000"), (19_900, "19 900")] {
        push(
            &format!("{label} conns: reload pause (pause_ms)"),
            1.0,
            "ms",
            h(n).and_then(|h| h.phases.pause_ms.map(|s| s.max)),
            "longest of the reloads: takeoverd's pause_ms, old worker told to stop → new worker serving, pinned",
        );
    }
    push(
        "10 000 conns: worst echo latency during a reload",
        50.0,
        "ms",
        h(10_000).and_then(|h| worst(&h.during_reload)),
        "highest client latency in any reload window, pinned placement",
    );
    let sd10k = r.systemd.runs.iter().find(|s| s.connections == 10_000);
    push(
        "10 000 conns: `systemctl restart` pause",
        300.0,
        "ms",
        sd10k.and_then(|s| s.restart_pause_ms.map(|p| p.max)),
        "highest client latency in any restart window (fd-store settings of units/seqnum.service)",
    );
    push(
        "1 000 conns: worst echo latency during a reload",
        10.0,
        "ms",
        h(1_000).and_then(|h| worst(&h.during_reload)),
        "highest client latency in any reload window, pinned placement",
    );
    let echo1k = r
        .echo
        .iter()
        .find(|e| e.connections == 1_000 && e.placement == Placement::Pinned)
        .or_else(|| r.echo.iter().find(|e| e.connections == 1_000));
    push(
        "1 000 conns: server CPU per echo",
        3.0,
        "µs",
        echo1k.map(|e| e.server_cpu_us_per_echo),
        "takeoverd + worker utime+stime / echoes (pinned run)",
    );
    let mem = r.memory.as_ref().filter(|m| m.connections >= 10_000);
    push(
        "worker RSS per idle connection",
        1024.0,
        "B",
        mem.map(|m| m.worker_bytes_per_conn.max(m.worker_after_reload_bytes_per_conn)),
        "(RSS at 10 000 − RSS at 0) / 10 000, the larger of the first worker and a worker after a reload",
    );
    push(
        "takeoverd RSS per idle connection",
        512.0,
        "B",
        mem.map(|m| m.takeoverd_bytes_per_conn),
        "(RSS at 10 000 − RSS at 0) / 10 000",
    );
    t
}

/// The console summary.
pub fn console(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n== seqnum-bench ({}) — {} ==", r.mode, r.date_utc);
    let _ = writeln!(s, "\nReload handoff (median (min–max) over the reloads; latencies in ms)");
    let _ = writeln!(
        s,
        "{:>7} {:>8} {:>9} {:>26} {:>26} {:>26} {:>26} {:>7}",
        "conns",
        "place",
        "interval",
        "handoff_ms",
        "old_exit_ms",
        "max lat. during reload",
        "same windows, no reload",
        "errors"
    );
    for h in &r.handoff {
        let _ = writeln!(
            s,
            "{:>7} {:>8} {:>7}ms {:>26} {:>26} {:>26} {:>26} {:>7}",
            h.connections,
            h.placement,
            h.interval_ms,
            show(&h.handoff_ms, 2),
            show(&h.old_exit_ms, 2),
            show(&h.during_reload.max_ms, 2),
            show(&h.without_reload.max_ms, 2),
            h.errors
        );
    }
    let _ = writeln!(s, "\nsystemd: {}", r.systemd.status);
    for sd in &r.systemd.runs {
        let _ = writeln!(
            s,
            "{:>7} conns: restart pause {} ms, kill pause {} ms, reload pause {} ms, errors {}",
            sd.connections,
            show(&sd.restart_pause_ms, 1),
            show(&sd.kill_pause_ms, 1),
            show(&sd.reload_pause_ms, 1),
            sd.errors
        );
    }
    let _ = writeln!(s, "\nEcho cost (--interval-ms 0)");
    let _ = writeln!(
        s,
        "{:>7} {:>8} {:>11} {:>14} {:>14} {:>10} {:>7}",
        "conns", "placement", "echoes/s", "server µs/echo", "client µs/echo", "p99 µs", "errors"
    );
    for e in &r.echo {
        let _ = writeln!(
            s,
            "{:>7} {:>8} {:>11.0} {:>14.2} {:>14.2} {:>10} {:>7}",
            e.connections,
            e.placement,
            e.echoes_per_sec,
            e.server_cpu_us_per_echo,
            e.client_cpu_us_per_echo,
            e.p99_us,
            e.errors
        );
    }
    if let Some(m) = &r.memory {
        let _ = writeln!(
            s,
            "\nMemory at {} idle conns: worker {:.0} B/conn ({:.0} after a reload), takeoverd {:.0} B/conn",
            m.connections, m.worker_bytes_per_conn, m.worker_after_reload_bytes_per_conn, m.takeoverd_bytes_per_conn
        );
    }
    if let Some(sc) = &r.scale {
        let _ = writeln!(
            s,
            "\nScale: reached {} connections; stopped by: {}",
            sc.reached.map_or("none".into(), |n| n.to_string()),
            sc.stopped_by
        );
    }
    let _ = writeln!(s);
    s.push_str(&crate::report_floor::console(r));
    let _ = writeln!(s, "\nTargets");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "  {} {:<48} {:>10} measured {}",
            tick(t.met),
            t.name,
            t.target,
            t.measured.map_or("–".into(), |m| format!("{m:.2} {}", t.unit))
        );
    }
    if r.total_errors > 0 {
        let _ = writeln!(s, "\n!!! {} CLIENT ERRORS IN ALL — see the notes !!!", r.total_errors);
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

fn ms(s: &Option<Spread>) -> String {
    show(s, 2)
}

/// BENCHMARKS.md.
pub fn markdown(r: &Results, diagnosis: &str) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "_Generated by `seqnum-bench` ({} run) on {}; every figure below comes from `benchmarks.json` of the same \
         run. Do not edit by hand: rerun the command below._\n",
        r.mode, r.date_utc
    );
    if r.total_errors > 0 {
        let _ = writeln!(
            w,
            "> **⚠ {} client errors were seen in this run** (a connection reset, closed, timed out, failed to \
             connect or got a wrong echo). See *Notes* at the end.\n",
            r.total_errors
        );
    }
    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "| | target | bound | measured | compared figure |\n|---|---|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            tick(t.met),
            t.name,
            t.target,
            t.measured.map_or("not measured".into(), |m| format!("{m:.2} {}", t.unit)),
            t.basis
        );
    }
    let _ = writeln!(w, "\nWhy each ✘ is missed, with its profile and the proposed fix: see *Diagnosis* below.\n");

    let m = &r.machine;
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ =
        writeln!(w, "| CPU | {} × {}{} |", m.cpus, m.cpu_model, if m.virtualised { " (virtual machine)" } else { "" });
    let _ = writeln!(w, "| memory | {} |", m.memory);
    let _ = writeln!(w, "| kernel | {} |", m.kernel);
    let _ = writeln!(w, "| systemd | {} |", m.systemd);
    let _ = writeln!(w, "| TCP congestion control | {} |", m.tcp_congestion_control);
    let _ = writeln!(w, "| open files | {} |", m.fd_limit);
    let _ = writeln!(w, "| load average at start / end | {} / {} |", m.loadavg_at_start, m.loadavg_at_end);
    let _ = writeln!(w, "| date | {} |", r.date_utc);
    let _ = writeln!(
        w,
        "| code | commit `{}`{}; binaries in `{}`: {} |",
        r.build.commit,
        if r.build.dirty { " with uncommitted changes" } else { "" },
        r.bin_dir,
        r.build.binaries.join("; ")
    );
    let _ = writeln!(w, "| benchmark duration | {:.0} s |\n", r.duration_s);

    let _ = writeln!(w, "## Reproduce\n");
    let _ = writeln!(w, "```sh\n{}\n```\n", r.command);
    let _ = writeln!(
        w,
        "`seqnum-bench` builds nothing: it runs the `takeoverd`, `seqnum-worker` and `seqnum-client` that sit beside \
         its own executable (`target/release/`), or those in `--bin-dir`. `--quick` is a seconds-long smoke run \
         (100 connections, 2 reloads, no systemd, nothing at 10 000) that writes into a temporary directory. \
         The benchmark kills every process it started when it ends, fails, or gets SIGINT/SIGTERM.\n"
    );

    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(
        w,
        "- Everything runs on 127.0.0.1: a fresh `takeoverd --listen 127.0.0.1:PORT --control-socket TMP` (its own \
         `seqnum-worker`) per run, on a free port, and `seqnum-client --json --timeline` against it.\n\
         - **Placement:** {}\n\
         - **Load:** the client is lock-step (the next message on a connection goes out once the echo of the \
         previous one is in) with a per-connection interval of *connections / 10* ms (at least 10 ms): 100 \
         connections every 10 ms, 1 000 every 100 ms, 10 000 every 1 000 ms, 19 900 every 1 990 ms — about \
         10 000 messages/s in all, well below what the two cores can echo (see *Echo cost*), so the latency \
         measured is the server's pause, not queueing. Connects are spread over *connections / 10* ms \
         (`--ramp-ms`). `--timeout-ms 2000` (5 000 for the scale ladder, 300 000 under systemd so that a long \
         pause is measured instead of being cut short by timeouts).\n\
         - **Reloads:** `takeoverd ctl reload`, one at a time, after every connection is up and 1 s of warm-up; \
         `handoff_ms` (request → new worker's ack, including starting the new process) and `old_exit_ms` \
         (request → old worker exited) come from `takeoverd ctl status --json`.\n\
         - **Latency around an event:** the client's timeline has one row per 100 ms (echoes received in it, \
         their p50/p99/max latency, errors). An event's window is every row overlapping [request, command \
         returned + 50 ms]; a message caught by the pause has its echo arrive at the end of the pause, so its \
         whole wait lands in the window. Per window we take the highest row p50, the highest row p99, and the \
         max, then report median (min–max) over the events. The same windows (same offsets from the moment \
         every connection was up) are cut from a second, identical run without reloads.\n\
         - **Echo cost:** `--interval-ms 0` (each connection sends again as soon as its echo is in); CPU = \
         utime+stime of takeoverd and the worker from `/proc/PID/stat` (clock ticks → µs) over a 3 s window after \
         1 s of warm-up, divided by the echoes the client's timeline counts in that window. Run twice: \
         *pinned* (server and client on different cores with `taskset`) and *shared* (no pinning).\n\
         - **Memory:** VmRSS from `/proc/PID/status` of takeoverd and the worker with no connection, then with \
         N idle connections (each sent one message, then nothing for an hour), then after one reload.\n\
         - **Scale:** the ladder below, 3 reloads each; a step passes when every reload succeeds and the clients \
         count zero errors. More than {} connections are spread over several client processes, and more than 10 000 \
         over several loopback source addresses (127.0.0.x, one per 10 000; the handoff at 19 900 too).\n\
         - **systemd:** a private `systemd --user` manager (`unshare -m --propagation private`, a tmpfs on \
         /run/systemd, `/lib/systemd/systemd --user`, `systemctl --user` through \
         `$XDG_RUNTIME_DIR/systemd/private`), a `Type=notify` unit running takeoverd with \
         `Restart=on-failure`, `RestartSec=100ms`, `KillMode=mixed`, \
         `LimitNOFILE=` the hard limit, and the fd-store settings of `units/seqnum.service` (below). Connects are \
         spread over max(n/10, m²/500) ms, m being the connections stored by name (systemd spends about 1 µs per \
         stored fd on each new one; connecting faster than it can store stalls the service). Events: `systemctl --user reload`, `systemctl --user restart` (returns once the new \
         takeoverd said READY=1), `systemctl --user kill -s KILL --kill-who=main` (systemd restarts it). An event \
         is over when a new main process runs and `ctl status` shows every connection again. The pause is the \
         highest client latency in the event's window. The client is killed after the last event; its errors \
         are counted from its timeline.\n\
         - Clients, servers, timelines and logs live in a temporary directory that is removed at the end.",
        r.placement,
        crate::client::MAX_PER_CLIENT,
    );
    crate::report_floor::method(w);

    // 1. handoff
    let _ = writeln!(w, "## 1. Reload handoff\n");
    let _ = writeln!(
        w,
        "Median (min–max) over the reloads. Latency columns: the worst 100 ms row of each reload's window, in ms; \
         \"no reload\" is the same windows in a run without reloads.\n"
    );
    let _ = writeln!(
        w,
        "| connections | placement | interval | reloads ok | handoff_ms | old_exit_ms | p50 during reload | p99 during \
         reload | max during reload | p50 no reload | p99 no reload | max no reload | errors |\n\
         |---:|---|---:|---:|---|---|---|---|---|---|---|---|---:|"
    );
    for h in &r.handoff {
        let _ = writeln!(
            w,
            "| {} | {} | {} ms | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            h.connections,
            h.placement,
            h.interval_ms,
            h.reloads_ok,
            h.reloads,
            ms(&h.handoff_ms),
            ms(&h.old_exit_ms),
            ms(&h.during_reload.p50_ms),
            ms(&h.during_reload.p99_ms),
            ms(&h.during_reload.max_ms),
            ms(&h.without_reload.p50_ms),
            ms(&h.without_reload.p99_ms),
            ms(&h.without_reload.max_ms),
            bold_if(h.errors)
        );
    }
    crate::report_floor::reload_pause(w, r);
    crate::report_floor::reload_phases(w, r);
    let _ = writeln!(w, "\nWhole-run client figures (µs):\n");
    let _ =
        writeln!(w, "| connections | run | echoed | p50 | p99 | max | errors |\n|---:|---|---:|---:|---:|---:|---:|");
    for h in &r.handoff {
        for (name, c) in [("with reloads", &h.client_reload_run), ("without", &h.client_baseline_run)] {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} |",
                h.connections,
                name,
                c.echoed,
                c.p50_us,
                c.p99_us,
                c.max_us,
                bold_if(c.errors)
            );
        }
    }

    // 2. systemd
    let _ = writeln!(w, "\n## 2. Restart through the fd store (systemd)\n");
    let _ = writeln!(w, "Status: **{}**\n", r.systemd.status);
    if let Some(u) = &r.systemd.unit {
        let _ = writeln!(
            w,
            "The unit copies the fd-store settings of {}: takeoverd `{}`, `FileDescriptorStoreMax={}`{}.\n",
            u.source.as_deref().map_or("(no units/seqnum.service found: defaults)".to_owned(), |p| format!("`{p}`")),
            u.fdstore_max.map_or("(default --fdstore-max)".to_owned(), |m| format!("--fdstore-max {m}")),
            u.store_max,
            u.watchdog.as_deref().map(|w| format!(", `WatchdogSec={w}`")).unwrap_or_default()
        );
    }
    if !r.systemd.runs.is_empty() {
        let _ = writeln!(
            w,
            "Pause = the highest client latency in the event's window, ms, median (min–max) over the events.\n\n\
             | connections | fds in the store (`NFileDescriptorStore`) | `systemctl reload` pause | `systemctl \
             restart` pause | `kill -s KILL --kill-who=main` pause | errors |\n|---:|---:|---|---|---|---:|"
        );
        for sd in &r.systemd.runs {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} |",
                sd.connections,
                sd.fdstore_fds,
                show(&sd.reload_pause_ms, 1),
                show(&sd.restart_pause_ms, 1),
                show(&sd.kill_pause_ms, 1),
                bold_if(sd.errors)
            );
        }
        let _ = writeln!(
            w,
            "\nWhere a restart's time goes (ms), from the service log and the manager's /proc/PID/stat:\n\n\
             | connections | restart: old takeoverd \"stopping\" → new one \"restored from the fd store\" | restored → \
             control socket ready | ready → first worker serving | manager CPU per restart/kill |\n|---:|---|---|---|---|"
        );
        for sd in &r.systemd.runs {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} |",
                sd.connections,
                show(&sd.stop_to_restored_ms, 1),
                show(&sd.restore_to_ready_ms, 1),
                show(&sd.ready_to_serving_ms, 1),
                show(&sd.manager_cpu_ms, 0)
            );
        }
        let _ = writeln!(
            w,
            "\nEvery event:\n\n| connections | event | took (ms) | pause (ms) | errors in window | ok \
             |\n|---:|---|---:|---:|---:|---|"
        );
        for sd in &r.systemd.runs {
            for e in &sd.events {
                let _ = writeln!(
                    w,
                    "| {} | {} | {:.0} | {:.1} | {} | {} |",
                    sd.connections,
                    e.kind,
                    e.done_ms - e.at_ms,
                    e.window.max_us as f64 / 1e3,
                    bold_if(e.window.errors),
                    if e.ok { "yes" } else { "**no**" }
                );
            }
        }
    }

    // 3. echo
    let _ = writeln!(w, "\n## 3. Echo cost\n");
    let _ = writeln!(
        w,
        "`--interval-ms 0`. Server CPU = takeoverd + worker. *pinned*: server on one core, client on the other; \
         *shared*: no pinning. CPU use is in cores (1.0 = one core busy). p50/p99 are the client's whole-run \
         figures.\n\n\
         | connections | placement | echoes/s | server CPU µs/echo | of which worker | client CPU µs/echo | server \
         cores | client cores | p50 µs | p99 µs | errors |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for e in &r.echo {
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            e.connections,
            e.placement,
            e.echoes_per_sec,
            e.server_cpu_us_per_echo,
            e.worker_cpu_us_per_echo,
            e.client_cpu_us_per_echo,
            e.server_cores,
            e.client_cores,
            e.p50_us,
            e.p99_us,
            bold_if(e.errors)
        );
    }

    crate::report_floor::echo_floor(w, r);

    // 4. memory
    let _ = writeln!(w, "\n## 4. Memory\n");
    if let Some(mm) = &r.memory {
        let _ = writeln!(
            w,
            "| process | RSS, 0 connections | RSS, {n} idle | after a reload | per connection |\n|---|---:|---:|---:|---:|\n\
             | seqnum-worker | {} KiB | {} KiB | {} KiB (fresh worker) | {:.0} B ({:.0} B after the reload) |\n\
             | takeoverd | {} KiB | {} KiB | {} KiB | {:.0} B |\n\n\
             Kernel memory of the sockets themselves is not in RSS and not counted.",
            mm.worker_idle_kib,
            mm.worker_loaded_kib,
            mm.worker_after_reload_kib,
            mm.worker_bytes_per_conn,
            mm.worker_after_reload_bytes_per_conn,
            mm.takeoverd_idle_kib,
            mm.takeoverd_loaded_kib,
            mm.takeoverd_after_reload_kib,
            mm.takeoverd_bytes_per_conn,
            n = mm.connections
        );
    } else {
        let _ = writeln!(w, "Not measured.");
    }

    // 5. scale
    let _ = writeln!(w, "\n## 5. Scale\n");
    if let Some(sc) = &r.scale {
        let _ = writeln!(
            w,
            "Reached: **{}** live connections surviving 3 reloads with zero errors. Open-file limit: {}.\n\n\
             Stopped by: {}\n\n\
             | connections | client processes | held | reloads ok | handoff_ms | old_exit_ms | worst latency in a \
             reload window (ms) | errors | result |\n|---:|---:|---:|---:|---|---|---:|---:|---|",
            sc.reached.map_or("none".into(), |n| n.to_string()),
            sc.fd_limit,
            sc.stopped_by
        );
        for st in &sc.steps {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {}/{} | {} | {} | {:.1} | {} | {} |",
                st.connections,
                st.client_processes,
                st.held,
                st.reloads_ok,
                st.reloads,
                ms(&st.handoff_ms),
                ms(&st.old_exit_ms),
                st.worst_latency_ms,
                bold_if(st.errors),
                if st.ok { "pass".to_owned() } else { format!("**fail**: {}", st.failure.as_deref().unwrap_or("?")) }
            );
        }
    } else {
        let _ = writeln!(w, "Not run (`--quick`).");
    }

    crate::report_floor::churn(w, r);

    let _ = writeln!(w, "\n## Latency over time\n");
    let _ = writeln!(w, "{}\n\n![latency](latency.svg)\n", r.plot);

    let _ = writeln!(w, "## Profiles\n");
    let _ = writeln!(w, "{}\n", r.profiling);
    for p in &r.profiles {
        let _ = writeln!(w, "### {}\n", p.title);
        let _ = writeln!(w, "`{}`; CPU per {} from samples at {} Hz.\n", p.command, p.unit, crate::profile::FREQ);
        let mut procs: Vec<(&String, &f64)> = p.process_ms_per_unit.iter().collect();
        procs.sort_by(|a, b| a.0.cmp(b.0));
        for (c, v) in procs {
            let _ = writeln!(
                w,
                "- `{c}`: {v:.1} ms CPU per {} ({:.0} % of it in the kernel)",
                p.unit,
                p.kernel_pct.get(c).copied().unwrap_or(0.0)
            );
        }
        if let Some(m) = &p.syscalls {
            let per = |n: u64| n as f64 / m.sendto.max(1) as f64;
            let _ = writeln!(
                w,
                "- the worker's syscalls over {:.0} s (perf tracepoints, just before the profile): {} `sendto`, {} \
                 `recvfrom` returning data, {} `recvfrom` returning EAGAIN, {} `epoll_wait` — per echo: 1 send, \
                 {:.2} recv with data, {:.2} recv with EAGAIN, {:.4} epoll_wait",
                m.secs,
                m.sendto,
                m.recvfrom_data,
                m.recvfrom_eagain,
                m.epoll_wait,
                per(m.recvfrom_data),
                per(m.recvfrom_eagain),
                per(m.epoll_wait)
            );
        }
        let _ = writeln!(
            w,
            "\n| process | function (inclusive) | CPU ms per {} | share of the process |\n|---|---|---:|---:|",
            p.unit
        );
        for row in &p.rows {
            let _ = writeln!(
                w,
                "| {} | {} | {:.2} | {:.1} % |",
                row.comm,
                row.label.replace("  ", "&nbsp;&nbsp;"),
                row.ms_per_unit,
                row.share_pct
            );
        }
        if !p.top_inclusive.is_empty() {
            let _ = writeln!(
                w,
                "\nThe processes' own functions with the most CPU, inclusive (found from the stacks, not chosen):\n\n\
                 | process | function | CPU ms per {} | share of the process |\n|---|---|---:|---:|",
                p.unit
            );
            for row in &p.top_inclusive {
                let _ = writeln!(
                    w,
                    "| {} | `{}` | {:.2} | {:.1} % |",
                    row.comm,
                    row.label.replace('|', "\\|"),
                    row.ms_per_unit,
                    row.share_pct
                );
            }
        }
        let _ = writeln!(w, "\nHottest leaf symbols (self time):\n\n| process | self | symbol |\n|---|---:|---|");
        for hsym in &p.hot {
            let _ = writeln!(w, "| {} | {:.1} % | `{}` |", hsym.comm, hsym.share_pct, hsym.symbol.replace('|', "\\|"));
        }
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "## Diagnosis of the missed targets\n");
    let _ = writeln!(w, "{diagnosis}\n");

    let _ = writeln!(w, "## Notes\n");
    if r.notes.is_empty() {
        let _ = writeln!(w, "Nothing odd was seen in this run.");
    } else {
        for n in &r.notes {
            let _ = writeln!(w, "- {n}");
        }
    }
    s
}

fn bold_if(n: u64) -> String {
    if n > 0 {
        format!("**{n}**")
    } else {
        "0".into()
    }
}

/// latency.svg: p99 and max per 100 ms row over one run, log scale, with a
/// vertical marker at each event.
pub fn svg(title: &str, timelines: &[Vec<Row>], events: &[Event]) -> String {
    let rows: Vec<&Row> = timelines.first().map(|t| t.iter().collect()).unwrap_or_default();
    let (w, h) = (960.0_f64, 420.0_f64);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>",
        w / 2.0,
        escape(title)
    );
    let live: Vec<&&Row> = rows.iter().filter(|r| r.echoes > 0).collect();
    if live.is_empty() {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">no data</text>\n</svg>", w / 2.0, h / 2.0);
        return s;
    }
    let t0 = rows.first().map_or(0.0, |r| r.t_ms);
    let t1 = rows.last().map_or(1.0, |r| r.t_ms + 100.0);
    let span = (t1 - t0).max(1.0);
    let min_p99 = live.iter().map(|r| r.p99_us.max(1) as f64 / 1e3).fold(f64::INFINITY, f64::min);
    let lo_ms = 10f64.powf(min_p99.log10().floor()).max(0.001);
    let hi_ms = live.iter().map(|r| r.max_us as f64 / 1e3).fold(1.0, f64::max) * 1.5;
    let (lo, hi) = (lo_ms.log10(), hi_ms.log10().ceil().max(lo_ms.log10() + 1.0));
    let x = |t: f64| left + (t - t0) / span * pw;
    let y = |v_ms: f64| top + ph - (v_ms.max(lo_ms).log10() - lo) / (hi - lo) * ph;
    // Axes and grid.
    let _ =
        writeln!(s, "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>");
    let mut d = lo.floor() as i32;
    while d as f64 <= hi {
        let v = 10f64.powi(d);
        let yy = y(v);
        let label = if v >= 1.0 { format!("{v:.0} ms") } else { format!("{} ms", v) };
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            left + pw,
            left - 6.0,
            yy + 4.0
        );
        d += 1;
    }
    let step = nice_step(span / 1e3 / 10.0);
    let mut tt = 0.0;
    while tt <= span / 1e3 {
        let xx = x(t0 + tt * 1e3);
        let _ = writeln!(
            s,
            "<line x1=\"{xx:.1}\" y1=\"{}\" x2=\"{xx:.1}\" y2=\"{}\" stroke=\"#444\"/>\
             <text x=\"{xx:.1}\" y=\"{}\" text-anchor=\"middle\">{tt:.d$}</text>",
            top + ph,
            top + ph + 5.0,
            top + ph + 18.0,
            d = if step < 1.0 { 1 } else { 0 }
        );
        tt += step;
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since the client started (s); one point per 100 ms row</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">echo latency (log scale)</text>",
        left + pw / 2.0,
        h - 18.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
    // 100 ms rows without a single echo (between the first and the last
    // echo): every connection was waiting.
    let (first, last) = (live.first().map_or(0.0, |r| r.t_ms), live.last().map_or(0.0, |r| r.t_ms));
    for r in rows.iter().filter(|r| r.echoes == 0 && r.t_ms > first && r.t_ms < last) {
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#f4c7c3\" opacity=\"0.6\"/>",
            x(r.t_ms),
            (x(r.t_ms + 100.0) - x(r.t_ms)).max(0.5)
        );
    }
    // Event markers.
    for e in events {
        let color = match e.kind {
            EventKind::Reload => "#2a9d3a",
            EventKind::Restart => "#8e44ad",
            EventKind::Kill => "#e67e22",
        };
        let xx = x(e.at_ms);
        if !(left..=left + pw).contains(&xx) {
            continue;
        }
        let _ = writeln!(
            s,
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{:.1}\" y=\"{}\" fill=\"{color}\" font-size=\"10\" transform=\"rotate(90 {:.1} {})\">{}</text>",
            top + ph,
            xx + 3.0,
            top + 24.0,
            xx + 3.0,
            top + 24.0,
            e.kind
        );
    }
    // Series: one polyline per run of consecutive rows with echoes.
    for (name, color, get) in
        [("max", "#d62728", (|r: &Row| r.max_us) as fn(&Row) -> u64), ("p99", "#1f77b4", |r: &Row| r.p99_us)]
    {
        let mut segment: Vec<String> = Vec::new();
        let mut segments = Vec::new();
        for r in &rows {
            if r.echoes == 0 {
                if !segment.is_empty() {
                    segments.push(std::mem::take(&mut segment));
                }
                continue;
            }
            segment.push(format!("{:.1},{:.1}", x(r.t_ms + 50.0), y(get(r) as f64 / 1e3)));
        }
        segments.push(segment);
        for seg in segments.iter().filter(|g| !g.is_empty()) {
            if seg.len() == 1 {
                let (cx, cy) = seg[0].split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    s,
                    "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"2\" fill=\"{color}\"><title>{name}</title></circle>"
                );
            } else {
                let _ = writeln!(
                    s,
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"><title>{name}</title></polyline>",
                    seg.join(" ")
                );
            }
        }
    }
    // Legend.
    let lx = left + 10.0;
    let _ = writeln!(
        s,
        "<g font-size=\"11\"><line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"#d62728\" stroke-width=\"2\"/>\
         <text x=\"{}\" y=\"{}\">max</text>\
         <line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\
         <text x=\"{}\" y=\"{}\">p99</text>\
         <text x=\"{}\" y=\"{}\" fill=\"#2a9d3a\">┆ reload</text>\
         <text x=\"{}\" y=\"{}\" fill=\"#8e44ad\">┆ systemctl restart</text>\
         <text x=\"{}\" y=\"{}\" fill=\"#e67e22\">┆ kill -9 main, auto-restart</text>\
         <rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"#f4c7c3\"/><text x=\"{}\" y=\"{}\">no echo in 100 ms</text></g>",
        lx + 20.0,
        lx + 24.0,
        top + 14.0,
        lx + 60.0,
        lx + 80.0,
        lx + 84.0,
        top + 14.0,
        lx + 120.0,
        top + 14.0,
        lx + 185.0,
        top + 14.0,
        lx + 310.0,
        top + 14.0,
        lx + 480.0,
        top + 5.0,
        lx + 494.0,
        top + 14.0,
        ly = top + 10.0
    );
    let _ = writeln!(s, "</svg>");
    s
}

fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(0.1);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_well_formed_enough() {
        let rows: Vec<Row> = (0..50)
            .map(|i| Row {
                t_ms: i as f64 * 100.0,
                echoes: 10,
                p50_us: 100,
                p99_us: 200 + i * 10,
                max_us: 300 + i * 100,
                errors: 0,
            })
            .collect();
        let ev = Event {
            kind: EventKind::Reload,
            at_ms: 1000.0,
            done_ms: 1010.0,
            ok: true,
            detail: String::new(),
            window: Default::default(),
            handoff_ms: None,
            old_exit_ms: None,
        };
        let s = svg("a <b>", &[rows], &[ev]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("polyline") && s.contains("a &lt;b&gt;") && s.contains("reload"));
        assert_eq!(s.matches("<polyline").count(), 2);
        let mut gap: Vec<Row> = (0..10)
            .map(|i| Row { t_ms: i as f64 * 100.0, echoes: 1, p50_us: 1, p99_us: 2, max_us: 3, errors: 0 })
            .collect();
        gap[5].echoes = 0;
        let s = svg("gap", &[gap], &[]);
        assert_eq!(s.matches("<polyline").count(), 4, "a gap splits each series");
        assert!(s.contains("#f4c7c3"));
    }

    #[test]
    fn steps() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.5), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(7.0), 10.0);
    }
}
