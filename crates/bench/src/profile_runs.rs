//! The runs that `perf` profiles, apart from the measurements (perf would
//! disturb them): an echo run at 1 000 connections and reloads at 10 000.

use std::time::Duration;

use crate::client::{ClientRun, ClientSpec};
use crate::procs;
use crate::scenarios::{self, Ctx};
use crate::server::Server;

/// Profiles an echo run at 1 000 connections and reloads at 10 000.
pub fn run(ctx: &mut Ctx) -> (Vec<crate::profile::Profile>, String) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    match echo(ctx) {
        Ok(p) => out.push(p),
        Err(e) => problems.push(format!("echo profile: {e:#}")),
    }
    match reload(ctx) {
        Ok(p) => out.push(p),
        Err(e) => problems.push(format!("reload profile: {e:#}")),
    }
    let mut text = "Whole-system `perf record` with the software `cpu-clock` event (this VM exposes no hardware \
                    counters) and DWARF call graphs, in separate runs from the measurements above (so that perf \
                    does not disturb them). \"Inclusive\" counts a sample for a function when the function is anywhere \
                    on its stack."
        .to_owned();
    if !problems.is_empty() {
        text.push_str(&format!(" Problems: {}", problems.join("; ")));
        for p in problems {
            ctx.note(p);
        }
    }
    (out, text)
}

fn echo(ctx: &mut Ctx) -> anyhow::Result<crate::profile::Profile> {
    let n = 1_000;
    ctx.say("profile: echo, 1 000 connections, pinned");
    let server = Server::start(&ctx.bins, &ctx.dir, "profile-echo", ctx.server_cpu)?;
    let spec = ClientSpec {
        port: server.port,
        connections: n,
        interval_ms: 0,
        duration_s: 9.0,
        timeout_ms: 5000,
        ramp_ms: 100,
        source_addresses: 1,
        cpu: ctx.client_cpu,
        churn_messages: None,
    };
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, "profile-echo", &spec)?;
    server.wait_connections(n, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(1000));
    let worker = server.worker_pid()?;
    let syscalls = crate::profile::syscall_mix(&ctx.dir, worker, 1.0);
    let secs = 3.0;
    let rec = crate::profile::record(&ctx.dir, "echo", secs)?;
    let t1 = ctx.clock.now_ms();
    let p = rec.finish(
        "Echo, 1 000 connections, --interval-ms 0, pinned",
        "second",
        secs,
        crate::profile::ECHO_PROBES,
        &["seqnum-worker", "takeoverd", "seqnum-client"],
    )?;
    let result = run.finish(&ctx.clock, Duration::from_secs(30))?;
    server.stop();
    let echoes: u64 = result
        .timelines
        .iter()
        .flatten()
        .filter(|r| r.t_ms >= t1 && r.t_ms + 100.0 <= t1 + secs * 1e3)
        .map(|r| r.echoes)
        .sum();
    let mut p = p;
    p.title = format!("{} (≈{:.0} echoes/s while profiled)", p.title, echoes as f64 / (secs - 0.3));
    match syscalls {
        Ok(m) => p.syscalls = Some(m),
        Err(e) => ctx.note(format!("counting the worker's syscalls failed: {e:#}")),
    }
    Ok(p)
}

fn reload(ctx: &mut Ctx) -> anyhow::Result<crate::profile::Profile> {
    let n = 10_000;
    let reloads = 3;
    ctx.say("profile: 3 reloads at 10 000 connections");
    let server = Server::start(&ctx.bins, &ctx.dir, "profile-reload", ctx.server_cpu)?;
    let spec = ClientSpec {
        port: server.port,
        connections: n,
        interval_ms: scenarios::interval_for(n),
        duration_s: 16.0,
        timeout_ms: 2000,
        ramp_ms: 1000,
        source_addresses: 1,
        cpu: ctx.client_cpu,
        churn_messages: None,
    };
    let run = ClientRun::start(&ctx.bins, &ctx.clock, &ctx.dir, "profile-reload", &spec)?;
    server.wait_connections(n, Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_millis(1000));
    let spacing = 1500.0;
    let rec = crate::profile::record(&ctx.dir, "reload", reloads as f64 * spacing / 1e3 + 0.2)?;
    for _ in 0..reloads {
        let at = ctx.clock.now_ms();
        let out = server.reload()?;
        if !out.ok {
            ctx.note(format!("profiled reload failed: {}", out.output));
        }
        procs::sleep_until(&ctx.clock, at + spacing);
    }
    let p = rec.finish(
        "Reload, 10 000 connections (interval 1 000 ms), 3 reloads",
        "reload",
        reloads as f64,
        crate::profile::RELOAD_PROBES,
        &["takeoverd", "seqnum-worker", "seqnum-client"],
    )?;
    let _ = run.finish(&ctx.clock, Duration::from_secs(30));
    server.stop();
    Ok(p)
}
