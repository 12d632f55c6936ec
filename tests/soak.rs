//! Soak: takeoverd and its worker under 1 000 connections at full speed
//! (`seqnum-client --interval-ms 0`), through N back-to-back `ctl reload`s,
//! each of which must succeed; the second test also SIGKILLs the serving
//! worker after every 10th reload (and reloads straight on). After each
//! reload takeoverd's fd count (`/proc/PID/fd`) and `VmRSS` are recorded:
//! the fd count after the last reload must equal the one after the first
//! (the same 1 000 connections are held), and the RSS after the last must
//! not exceed the RSS after the first 10 % of the reloads by more than
//! 2 MiB (a leak check, generous for allocator noise). The client, which
//! runs through every reload, must see no error at all; when it is gone,
//! takeoverd is back to its idle fd count and runs exactly one worker.
//!
//! N is `SOAK_RELOADS` (default 50, which keeps each test under ~20 s in a
//! debug build). With `SOAK_CSV=PATH` the curves (reload, t_s, fds, rss_kb,
//! handoff_ms, killed) are written to PATH, and the kill variant's to PATH
//! with `-kill` before the extension. The long run:
//!
//! ```sh
//! cargo build --release --workspace
//! SOAK_RELOADS=1000 SOAK_CSV=/tmp/soak.csv cargo test --release --test soak -- --nocapture
//! ```
//!
//! The client must stay connected through all N reloads, so its
//! `--duration` is an estimate (3 s + 0.25 s per reload in a debug build,
//! 0.1 s in a release one); should the reloads outlast it, that attempt's
//! client is still judged, and the soak starts over with a new client and an
//! estimate from the rate measured (at most three attempts).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use testkit::*;

const CONNS: usize = 1000;
/// The two tests each drive 1 000 connections at full speed: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The fd count of `pid` without transients: right after a `ctl` command
/// returns, takeoverd may not have closed its end of it yet. A transient
/// only adds, so this is the least of a few reads, unless the first read
/// is already the count `expect`ed.
fn quiet_fds(pid: u32, expect: Option<usize>) -> usize {
    let mut least = fds_of(pid).len();
    if Some(least) == expect {
        return least;
    }
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(5));
        least = least.min(fds_of(pid).len());
    }
    least
}

/// Waits up to 5 s for the fd count of `pid` to be `want`; the last count.
fn fds_become(pid: u32, want: usize) -> usize {
    let mut n = 0;
    let _ = poll_until(&format!("{pid} has {want} fds"), Duration::from_secs(5), || {
        n = fds_of(pid).len();
        n == want
    });
    n
}

/// The reload time in `reload ok: generation G, worker pid P, clients paused
/// X ms, reload took H ms`.
fn handoff_ms(stdout: &str) -> f64 {
    stdout
        .split("reload took ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no handoff time in `{stdout}`"))
}

/// Lines of the log that tell of trouble, for assertion messages.
fn trouble(log: &str) -> String {
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| !l.contains("restarting the worker") && !l.contains("signal: 9"))
        .take(15)
        .collect();
    bad.join("\n")
}

struct Sample {
    reload: usize,
    t_s: f64,
    fds: usize,
    rss_kb: u64,
    handoff_ms: f64,
    killed: bool,
}

fn csv_path(tag: &str) -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("SOAK_CSV")?);
    if tag.is_empty() {
        return Some(p);
    }
    let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match p.extension() {
        Some(ext) => format!("{stem}-{tag}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{tag}"),
    };
    Some(p.with_file_name(name))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn start_client(port: u16, duration_s: f64) -> Child {
    let d = format!("{duration_s:.1}");
    let conns = CONNS.to_string();
    client(port, &["--connections", &conns, "--interval-ms", "0", "--timeout-ms", "10000", "--duration", &d])
}

/// Judges a finished client; returns its summary.
fn judge(c: Child, log: &Path) -> Summary {
    let (out, v) = client_summary(c);
    if v.errors != 0 || !out.status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        panic!(
            "the client saw errors: {v}\nclient stderr: {}\ntakeoverd/worker trouble:\n{}",
            String::from_utf8_lossy(&out.stderr).lines().take(10).collect::<Vec<_>>().join("\n"),
            trouble(&text)
        );
    }
    assert_clean(&out, &v);
    v
}

fn soak(kill_every: Option<usize>, tag: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n: usize = std::env::var("SOAK_RELOADS").ok().map(|v| v.parse().expect("SOAK_RELOADS: a number")).unwrap_or(50);
    assert!(n >= 1, "SOAK_RELOADS must be at least 1");
    let name = if tag.is_empty() { "soak" } else { "soak with kills" };
    let dir = TempDir::new(&format!("soak{tag}"));
    let Takeoverd { proc: mut d, pid: dpid, port, sock, log } = Takeoverd::start(&dir, &[], &[]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the probe connection is gone", Duration::from_secs(5), || ctl_status(&sock).connections == 0);
    let idle_fds = quiet_fds(dpid, None);

    let per_reload = if cfg!(debug_assertions) { 0.25 } else { 0.1 };
    let mut duration_s = (3.0 + per_reload * n as f64).min(3600.0);
    let mut kills = 0;
    let mut attempt = 0;
    let (load, samples, t_all) = loop {
        attempt += 1;
        assert!(attempt <= 3, "{name}: the client never stayed connected through {n} reloads");
        let t_client = Instant::now();
        let mut load = start_client(port, duration_s);
        wait_until("the client's connections are all held", Duration::from_secs(30), || {
            ctl_status(&sock).connections == CONNS
        });
        let t0 = Instant::now();
        let mut samples: Vec<Sample> = Vec::with_capacity(n);
        let mut killed = false;
        for i in 1..=n {
            if load.try_wait().unwrap().is_some() {
                break;
            }
            let out = ctl(&sock, &["reload", "--timeout-s", "60"]);
            assert!(
                out.status.success(),
                "{name}: reload {i} failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                trouble(&log_text())
            );
            samples.push(Sample {
                reload: i,
                t_s: t0.elapsed().as_secs_f64(),
                fds: quiet_fds(dpid, samples.last().map(|s| s.fds)),
                rss_kb: rss_kib(dpid).unwrap_or(0),
                handoff_ms: handoff_ms(&String::from_utf8_lossy(&out.stdout)),
                killed,
            });
            killed = false;
            if kill_every.is_some_and(|k| i % k == 0 && i < n) {
                // Straight on to the next reload: it races the crash restart.
                if let Some(pid) = ctl_status(&sock).worker_pid {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
                        .unwrap();
                    kills += 1;
                    killed = true;
                }
            }
        }
        let t_all = t0.elapsed();
        let margin_left = (t_client + Duration::from_secs_f64(duration_s))
            .checked_duration_since(Instant::now())
            .is_some_and(|left| left > Duration::from_millis(500));
        if samples.len() == n && margin_left && load.try_wait().unwrap().is_none() {
            let held = ctl_status(&sock).connections;
            if held != CONNS {
                judge(load, &log);
                panic!("{name}: takeoverd holds {held} connections after {n} reloads, not {CONNS}");
            }
            break (load, samples, t_all);
        }
        // The reloads outlasted the client: judge it anyway, then start over
        // with an estimate from the measured rate.
        let rate = samples.len().max(1) as f64 / t_all.as_secs_f64();
        eprintln!(
            "{name}: the client ({duration_s:.1} s) ran out after {} of {n} reloads ({rate:.1} reloads/s); starting over",
            samples.len()
        );
        judge(load, &log);
        duration_s = 5.0 + 1.5 * n as f64 / rate;
        wait_until("the client's connections are gone", Duration::from_secs(10), || ctl_status(&sock).connections == 0);
    };

    // Every reload held the same 1 000 connections: fds back to where the
    // first reload left them (a crash restart may still be finishing).
    let first = &samples[0];
    let last_fds = fds_become(dpid, first.fds);
    let last = samples.last().unwrap();
    let tenth = &samples[(n / 10).max(1) - 1];
    let max_fds = samples.iter().map(|s| s.fds).max().unwrap();
    let max_rss = samples.iter().map(|s| s.rss_kb).max().unwrap();
    let handoffs: Vec<f64> = samples.iter().map(|s| s.handoff_ms).collect();
    eprintln!(
        "{name}: {n} reloads with {CONNS} connections at full speed in {:.1} s ({:.1} reloads/s), {kills} worker kills; \
         handoff median {:.1} ms, max {:.1} ms",
        t_all.as_secs_f64(),
        n as f64 / t_all.as_secs_f64(),
        median(&handoffs),
        handoffs.iter().copied().fold(0.0, f64::max)
    );
    eprintln!(
        "{name}: takeoverd fds first {} last {} max {} (idle {idle_fds}); RSS first {} KiB, after {} reloads {} KiB, \
         last {} KiB, max {} KiB",
        first.fds, last.fds, max_fds, first.rss_kb, tenth.reload, tenth.rss_kb, last.rss_kb, max_rss
    );
    if let Some(path) = csv_path(tag) {
        let mut csv = String::from("reload,t_s,fds,rss_kb,handoff_ms,killed\n");
        for s in &samples {
            csv +=
                &format!("{},{:.3},{},{},{:.3},{}\n", s.reload, s.t_s, s.fds, s.rss_kb, s.handoff_ms, s.killed as u8);
        }
        std::fs::write(&path, csv).unwrap();
        eprintln!("{name}: curves written to {}", path.display());
    }
    assert_eq!(
        last_fds,
        first.fds,
        "{name}: takeoverd holds {last_fds} fds after {n} reloads, {} after the first: {:?}",
        first.fds,
        fds_of(dpid)
    );
    assert!(
        last.rss_kb <= tenth.rss_kb + 2048,
        "{name}: takeoverd's RSS grew from {} KiB after {} reloads to {} KiB after {n}",
        tenth.rss_kb,
        tenth.reload,
        last.rss_kb
    );

    let v = judge(load, &log);
    eprintln!(
        "{name}: client {} echoes, 0 errors; latency p99 {:.1} ms, max {:.1} ms",
        v.echoed,
        v.latency_us.p99 as f64 / 1e3,
        v.latency_us.max as f64 / 1e3
    );

    // Everything closed: takeoverd as idle as at the start, with one worker
    // and no unreaped one.
    wait_until("takeoverd drops the closed connections", Duration::from_secs(10), || {
        ctl_status(&sock).connections == 0
    });
    let end_fds = fds_become(dpid, idle_fds);
    assert_eq!(end_fds, idle_fds, "{name}: takeoverd leaked fds: {:?}", fds_of(dpid));
    let mut kids = Vec::new();
    let _ = poll_until("takeoverd has one child", Duration::from_secs(5), || {
        kids = children_of(dpid);
        kids.len() == 1
    });
    let text = log_text();
    assert!(
        !text.contains("takeoverd went away"),
        "{name}: a worker lost its control channel while takeoverd ran (it was replaced without being told):\n{}",
        trouble(&text)
    );
    assert_eq!(kids.len(), 1, "{name}: takeoverd should have exactly one child, the worker; it has {kids:?}");
    assert!(!kids[0].1, "{name}: takeoverd's only child is a zombie: {kids:?}");
    assert!(!text.contains("discontinuity"), "{name}: a worker saw a seqnum discontinuity:\n{}", trouble(&text));

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dpid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = wait_timeout(&mut d.0, Duration::from_secs(10)).expect("takeoverd did not stop on SIGTERM");
    assert!(st.success(), "takeoverd exited {st}");
}

#[test]
fn reloads_back_to_back_under_full_load_leak_nothing() {
    soak(None, "");
}

#[test]
fn reloads_back_to_back_with_a_worker_kill_every_ten_leak_nothing() {
    soak(Some(10), "kill");
}
