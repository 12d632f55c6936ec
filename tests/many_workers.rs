//! `takeoverd --workers N` (no systemd): the connections are shared out,
//! a reload replaces the workers one at a time, a failed step stops the roll
//! and says where, a crashed worker pauses only its own share, and an
//! upgrade of takeoverd carries every worker. Clients see no error in any of
//! it; nothing leaks.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit::*;

/// `connections` lock-step clients, ~5 ms between an echo and the next.
fn load(port: u16, connections: usize, secs: &str) -> std::process::Child {
    let n = connections.to_string();
    client(port, &["--connections", &n, "--interval-ms", "5", "--duration", secs, "--timeout-ms", "5000"])
}

/// Starts takeoverd with `n` workers and waits until every one serves.
fn start(dir: &TempDir, n: usize, extra: &[&str], env: &[(&str, String)]) -> Takeoverd {
    let n_arg = n.to_string();
    let mut args = vec!["--workers", &n_arg];
    args.extend_from_slice(extra);
    let d = Takeoverd::start(dir, &args, env);
    wait_until(&format!("{n} workers serve"), Duration::from_secs(10), || every_worker_serves(&d, n));
    d
}

fn every_worker_serves(d: &Takeoverd, n: usize) -> bool {
    let s = d.status();
    s.workers.len() == n && s.workers.iter().all(|w| w.state == "serving" && w.pid.is_some())
}

fn pids(d: &Takeoverd) -> Vec<Option<u32>> {
    d.status().workers.iter().map(|w| w.pid).collect()
}

fn reload(d: &Takeoverd) -> std::process::Output {
    ctl(&d.sock, &["reload"])
}

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
}

/// After the clients are done: no connection held, exactly `n` workers,
/// takeoverd's fds as before, and SIGTERM ends it all cleanly.
fn finish(mut d: Takeoverd, n: usize, fds_before: usize) {
    wait_until("takeoverd drops the closed connections", Duration::from_secs(5), || d.status().connections == 0);
    let kids = live_children(d.pid);
    assert_eq!(kids.len(), n, "exactly {n} workers should run, found {kids:?}\n{}", d.log_text());
    assert_eq!(settled_fd_count(d.pid), fds_before, "takeoverd leaked fds: {:?}", fds_of(d.pid));
    kill(Pid::from_raw(d.pid as i32), Signal::SIGTERM).unwrap();
    let status = wait_timeout(&mut d.proc.0, Duration::from_secs(10)).expect("takeoverd did not stop on SIGTERM");
    assert!(status.success(), "takeoverd exited {status}");
    for k in kids {
        wait_until("the workers are gone", Duration::from_secs(5), || !alive(k));
    }
}

/// Connections are shared evenly; three rolling reloads replace every
/// worker each time, one after the other; no client sees an error.
#[test]
fn rolling_reloads_replace_every_worker_without_a_client_error() {
    let dir = TempDir::new("workers-roll");
    let d = start(&dir, 3, &[], &[]);
    let fds_before = settled_fd_count(d.pid);
    let c = load(d.port, 60, "6");
    wait_until("takeoverd holds the 60 connections", Duration::from_secs(5), || d.status().connections == 60);
    let shares: Vec<usize> = d.status().workers.iter().map(|w| w.connections).collect();
    assert_eq!(shares, vec![20, 20, 20], "least connections shares 60 connections evenly");

    for round in 1..=3 {
        let before = pids(&d);
        let g0 = d.status().generation;
        let out = reload(&d);
        assert!(out.status.success(), "reload {round} failed: {out:?}\n{}", d.log_text());
        let s = d.status();
        let after: Vec<Option<u32>> = s.workers.iter().map(|w| w.pid).collect();
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            assert!(b.is_some() && a != b, "reload {round}: worker {i} was not replaced ({a:?} -> {b:?})");
        }
        // One slot after the other: their generations are consecutive.
        let gens: Vec<u64> = s.workers.iter().map(|w| w.generation).collect();
        assert_eq!(gens, vec![g0 + 1, g0 + 2, g0 + 3], "reload {round}: the roll goes slot by slot");
        let rec = s.reloads.last().unwrap();
        assert!(rec.ok && rec.failed_worker.is_none(), "reload {round}: {rec:?}");
        // The record has each slot's handover, in the order of the roll,
        // with the pid that serves it now.
        let handed: Vec<(usize, Option<u32>)> = rec.slots.iter().map(|h| (h.slot, Some(h.pid))).collect();
        assert_eq!(handed, after.iter().copied().enumerate().collect::<Vec<_>>(), "reload {round}: {rec:?}");
        assert!(rec.slots.windows(2).all(|w| w[0].serving_at_ms <= w[1].serving_at_ms), "{rec:?}");
        assert_eq!(s.workers.iter().map(|w| w.connections).sum::<usize>(), 60);
    }
    let human = String::from_utf8_lossy(&ctl(&d.sock, &["status"]).stdout).into_owned();
    assert!(human.contains("worker 2:"), "ctl status shows each worker:\n{human}");

    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
    finish(d, 3, fds_before);
}

/// A worker's handoff that fails in the middle of a roll is rolled back,
/// the roll stops there, the reload fails and says which worker; the ones
/// before it serve the new generation, it and the ones after the old one.
/// The next reload replaces them all.
#[test]
fn a_failed_step_stops_the_roll_and_says_which_worker() {
    let dir = TempDir::new("workers-roll-fail");
    let fault = ("TAKEOVERD_FAULT", format!("new-ready@1:kill-new:{}", dir.path("fired").display()));
    let d = start(&dir, 3, &["--ack-timeout-ms", "1000"], &[fault]);
    let fds_before = settled_fd_count(d.pid);
    let c = load(d.port, 30, "5");
    wait_until("takeoverd holds the 30 connections", Duration::from_secs(5), || d.status().connections == 30);
    let before = pids(&d);

    let out = reload(&d);
    assert!(!out.status.success(), "the reload should fail: {out:?}");
    assert!(dir.path("fired").exists(), "the fault was not injected\n{}", d.log_text());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker 1 of 3"), "the failure names the worker: {err}");
    let s = d.status();
    assert_eq!(s.reloads.last().unwrap().failed_worker, Some(1), "{:?}", s.reloads.last());
    let done: Vec<usize> = s.reloads.last().unwrap().slots.iter().map(|h| h.slot).collect();
    assert_eq!(done, vec![0], "only worker 0's handover completed: {:?}", s.reloads.last());
    let after = pids(&d);
    assert_ne!(after[0], before[0], "worker 0 was replaced before the failure");
    assert_eq!(after[1..], before[1..], "workers 1 and 2 serve on, untouched");
    assert!(every_worker_serves(&d, 3), "every worker serves after the rollback: {s:?}");

    let out = reload(&d);
    assert!(out.status.success(), "the next reload failed: {out:?}\n{}", d.log_text());
    let last = pids(&d);
    for i in 0..3 {
        assert_ne!(last[i], after[i], "worker {i} was replaced by the second reload");
    }
    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
    finish(d, 3, fds_before);
}

/// SIGKILL of one worker: takeoverd restarts that one with its share; the
/// other serves on untouched throughout (same pid, never out of
/// `serving`). A worker that served is healthy: eight kills in a row are
/// each followed by an immediate restart, not a growing backoff.
#[test]
fn a_crashed_worker_pauses_only_its_own_share() {
    let dir = TempDir::new("workers-crash");
    let d = start(&dir, 2, &[], &[]);
    let fds_before = settled_fd_count(d.pid);
    let c = load(d.port, 40, "6");
    wait_until("takeoverd holds the 40 connections", Duration::from_secs(5), || d.status().connections == 40);
    let other = d.status().workers[1].pid.unwrap();

    for round in 0..8 {
        let victim = d.status().workers[0].pid.unwrap();
        sigkill(victim);
        // Restarted at once (well under the 5 s a backoff would reach), and
        // the other worker never left `serving`.
        let mut other_served = true;
        wait_until(&format!("kill {round}: worker 0 serves again"), Duration::from_secs(2), || {
            let s = d.status();
            other_served &= s.workers[1].pid == Some(other) && s.workers[1].state == "serving";
            s.workers[0].pid.is_some_and(|p| p != victim) && s.workers[0].state == "serving"
        });
        assert!(other_served, "kill {round}: worker 1 was disturbed by worker 0's crash\n{}", d.log_text());
        assert_eq!(d.status().workers.iter().map(|w| w.connections).sum::<usize>(), 40);
        // Let it serve (a worker is healthy once it has served 100 ms).
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(d.status().worker_restarts >= 8);
    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
    finish(d, 2, fds_before);
}

/// `ctl upgrade` with two workers: same takeoverd pid, both workers adopted
/// (same pids, each with its share), and they reload afterwards.
#[test]
fn an_upgrade_carries_every_worker_and_its_share() {
    let dir = TempDir::new("workers-upgrade");
    let d = start(&dir, 2, &[], &[]);
    let c = load(d.port, 40, "4");
    wait_until("takeoverd holds the 40 connections", Duration::from_secs(5), || d.status().connections == 40);
    let before = d.status();
    let out = ctl(&d.sock, &["upgrade"]);
    assert!(out.status.success(), "upgrade failed: {out:?}\n{}", d.log_text());
    let after = d.status();
    assert_eq!(after.upgrades, 1);
    for (a, b) in before.workers.iter().zip(&after.workers) {
        assert_eq!((a.pid, a.connections), (b.pid, b.connections), "worker {} after the upgrade", a.slot);
    }
    assert_eq!(live_children(d.pid).len(), 2);
    let out = reload(&d);
    assert!(out.status.success(), "reload after the upgrade failed: {out:?}\n{}", d.log_text());
    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
}

/// Connections that close are taken off their worker's share, and new ones
/// go to the worker with the fewest: after churn the shares stay even.
#[test]
fn new_connections_go_to_the_worker_with_the_fewest() {
    let dir = TempDir::new("workers-balance");
    let d = start(&dir, 2, &[], &[]);
    let first = load(d.port, 30, "2");
    wait_until("30 connections", Duration::from_secs(5), || d.status().connections == 30);
    // 30 more arrive while the first 30 are served, then those leave.
    let second = load(d.port, 30, "3");
    let (out, v) = client_summary(first);
    assert_clean(&out, &v);
    wait_until("the first 30 are gone", Duration::from_secs(5), || d.status().connections == 30);
    let shares: Vec<usize> = d.status().workers.iter().map(|w| w.connections).collect();
    assert!(shares.iter().all(|&s| (12..=18).contains(&s)), "uneven shares after churn: {shares:?}");
    let (out, v) = client_summary(second);
    assert_clean(&out, &v);
}

/// `--workers` rejects what is not a count, before anything starts.
#[test]
fn workers_must_be_a_count_or_auto() {
    for bad in ["two", "-1", "5000"] {
        let out = std::process::Command::new(bin("takeoverd"))
            .args(["--listen", "127.0.0.1:1", &format!("--workers={bad}")])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--workers {bad}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--workers"), "{out:?}");
    }
}

fn resize(d: &Takeoverd, n: &str) -> std::process::Output {
    let out = ctl(&d.sock, &["workers", n]);
    eprintln!(
        "ctl workers {n}: {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

fn shares(d: &Takeoverd) -> Vec<usize> {
    d.status().workers.iter().map(|w| w.connections).collect()
}

/// `ctl workers N` at runtime: 1 → 3 starts two workers and moves two
/// thirds of the connections to them (version 3: the first worker gives
/// them back at a message boundary); 3 → 1 hands the two workers' shares
/// back. Clients see no error; then a rolling reload of what is left.
#[test]
fn ctl_workers_moves_connections_both_ways_without_a_client_error() {
    let dir = TempDir::new("workers-resize");
    let d = start(&dir, 1, &[], &[]);
    let fds_before = settled_fd_count(d.pid);
    let c = load(d.port, 60, "6");
    wait_until("takeoverd holds the 60 connections", Duration::from_secs(5), || d.status().connections == 60);

    let out = resize(&d, "3");
    assert!(out.status.success(), "1 -> 3 failed: {out:?}\n{}", d.log_text());
    assert!(String::from_utf8_lossy(&out.stdout).contains("40 connections moved"), "{out:?}");
    assert!(every_worker_serves(&d, 3));
    assert_eq!(shares(&d), vec![20, 20, 20]);
    assert_eq!(live_children(d.pid).len(), 3);
    std::thread::sleep(Duration::from_millis(500)); // the moved connections echo in their new workers

    let out = resize(&d, "1");
    assert!(out.status.success(), "3 -> 1 failed: {out:?}\n{}", d.log_text());
    assert!(String::from_utf8_lossy(&out.stdout).contains("40 connections moved"), "{out:?}");
    assert_eq!(shares(&d), vec![60]);
    wait_until("the two leaving workers exit", Duration::from_secs(5), || live_children(d.pid).len() == 1);

    let out = resize(&d, "2");
    assert!(out.status.success(), "1 -> 2 failed: {out:?}\n{}", d.log_text());
    let out = reload(&d);
    assert!(out.status.success(), "a reload after the resizes failed: {out:?}\n{}", d.log_text());
    assert_eq!(shares(&d), vec![30, 30]);
    let out = resize(&d, "1");
    assert!(out.status.success(), "2 -> 1 failed: {out:?}\n{}", d.log_text());

    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
    wait_until("the leaving worker exits", Duration::from_secs(5), || live_children(d.pid).len() == 1);
    finish(d, 1, fds_before);
}

/// Workers that speak version 2 cannot give connections back: growing
/// starts the new worker, moves nothing and says why; shrinking still works
/// (the leaving worker stops, as in a reload).
#[test]
fn ctl_workers_with_version_2_workers_moves_only_what_it_can() {
    let dir = TempDir::new("workers-resize-v2");
    let d = start(&dir, 1, &["--", "--takeoverd-channel", "2"], &[]);
    let c = load(d.port, 20, "4");
    wait_until("takeoverd holds the 20 connections", Duration::from_secs(5), || d.status().connections == 20);
    let out = resize(&d, "2");
    assert!(out.status.success(), "1 -> 2 failed: {out:?}\n{}", d.log_text());
    assert!(String::from_utf8_lossy(&out.stderr).contains("version 2"), "the note says why nothing moved: {out:?}");
    assert_eq!(shares(&d), vec![20, 0]);
    let more = load(d.port, 10, "2");
    wait_until("30 connections", Duration::from_secs(5), || d.status().connections == 30);
    assert_eq!(shares(&d), vec![20, 10], "new connections go to the worker with the fewest");
    let out = resize(&d, "1");
    assert!(out.status.success(), "2 -> 1 failed: {out:?}\n{}", d.log_text());
    assert_eq!(shares(&d), vec![30]);
    for c in [more, c] {
        let (out, v) = client_summary(c);
        assert_clean(&out, &v);
    }
}

/// A worker that hangs while it should give connections back is handled as
/// any hung worker: killed, and restarted with every connection it had.
/// The resize reports the failure; no client sees an error.
#[test]
fn a_worker_that_hangs_during_a_resize_loses_nothing() {
    let dir = TempDir::new("workers-resize-hang");
    let d = start(&dir, 1, &["--ack-timeout-ms", "1000"], &[]);
    let c = load(d.port, 20, "6");
    wait_until("takeoverd holds the 20 connections", Duration::from_secs(5), || d.status().connections == 20);
    let first = d.status().workers[0].pid.unwrap();
    kill(Pid::from_raw(first as i32), Signal::SIGSTOP).unwrap();
    let out = resize(&d, "2");
    assert!(!out.status.success(), "the resize should fail: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker 0"), "the failure names the worker: {out:?}");
    wait_until("both workers serve", Duration::from_secs(5), || every_worker_serves(&d, 2));
    assert_ne!(d.status().workers[0].pid, Some(first), "the hung worker was replaced");
    assert_eq!(d.status().connections, 20);
    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
}

/// `--max-open-connections`: past it, takeoverd's copies of served
/// connections wait in flight (parked) instead of open, so takeoverd holds
/// more connections than open files. 600 clients with a budget of 100:
/// takeoverd's open fds stay near the budget, and rolling reloads and a
/// worker SIGKILL take the parked connections out, hand them over and park
/// them again, with no client error. An upgrade is refused while they are
/// parked.
#[test]
fn connections_past_the_open_budget_are_parked_and_survive_reloads_and_crashes() {
    let dir = TempDir::new("workers-park");
    let d = start(&dir, 2, &["--max-open-connections", "100"], &[]);
    let c = client(
        d.port,
        &["--connections", "600", "--interval-ms", "5", "--duration", "8", "--timeout-ms", "5000", "--ramp-ms", "500"],
    );
    wait_until("600 connections, most parked", Duration::from_secs(10), || {
        let s = d.status();
        s.connections == 600 && s.parked >= 500
    });
    let open_fds = || fd_count(d.pid).unwrap_or(usize::MAX);
    assert!(open_fds() < 300, "takeoverd holds {} fds for 600 connections", open_fds());

    for round in 1..=2 {
        let out = reload(&d);
        assert!(out.status.success(), "reload {round} failed: {out:?}\n{}", d.log_text());
        wait_until("the connections are parked again", Duration::from_secs(5), || d.status().parked >= 500);
    }
    let victim = d.status().workers[0].pid.unwrap();
    sigkill(victim);
    wait_until("worker 0 serves again", Duration::from_secs(5), || {
        let s = d.status();
        s.workers[0].pid.is_some_and(|p| p != victim) && every_worker_serves(&d, 2)
    });
    let out = reload(&d);
    assert!(out.status.success(), "a reload after the crash failed: {out:?}\n{}", d.log_text());
    assert!(open_fds() < 300, "takeoverd holds {} fds after the reloads", open_fds());

    let out = ctl(&d.sock, &["upgrade"]);
    assert!(!out.status.success(), "an upgrade with parked connections must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("parked"), "{out:?}");

    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
    wait_until("takeoverd drops the closed connections", Duration::from_secs(5), || d.status().connections == 0);
}
