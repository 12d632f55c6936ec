//! takeoverd under a real systemd: `units/seqnum.socket` and
//! `units/seqnum.service` run in a private `systemd --user` manager (see
//! crates/testkit/src/systemd/). Each test has its own manager, directory and
//! port; the harness runs one manager at a time.
//!
//! Skipped (with a `SKIP:` line on stderr) when not root or when
//! systemd/unshare are missing; with `CI=true` those skips are failures.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::time::{Duration, Instant};

use testkit::systemd::UserManager;
use testkit::{
    assert_clean, bin, client, client_summary, fds_of, free_port, poll_until, wait_for_port, wait_until, Status,
    Summary,
};

const SERVICE: &str = "seqnum.service";
const SOCKET: &str = "seqnum.socket";

/// A client that is killed if the test fails before collecting it.
struct Client(Option<Child>);

impl Client {
    fn start(port: u16, args: &[&str]) -> Client {
        Client(Some(client(port, args)))
    }
    /// Waits for the summary and asserts a clean run.
    fn finish(mut self, what: &str) -> Summary {
        let (out, v) = client_summary(self.0.take().unwrap());
        eprintln!("{what}: {v}");
        assert_clean(&out, &v);
        v
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts a manager and, in it, seqnum.socket and seqnum.service on a free
/// port. `None` when the systemd tests are skipped here.
fn start(tag: &str, takeoverd_args: &[&str]) -> Option<(UserManager, u16)> {
    let mut m = UserManager::start(tag)?;
    let port = free_port();
    m.install_seqnum(port, takeoverd_args);
    up(&m, port);
    Some((m, port))
}

fn up(m: &UserManager, port: u16) {
    m.systemctl_ok(&["start", SOCKET]);
    m.systemctl_ok(&["start", SERVICE]);
    m.wait_running(SERVICE, 0, Duration::from_secs(30));
    wait_for_port(port, Duration::from_secs(10));
    wait_until(
        &format!("takeoverd's control socket {} answers", m.control_socket().display()),
        Duration::from_secs(10),
        || status(m).is_some(),
    );
}

/// `ctl status --json`, or `None` while takeoverd is not there (restarting).
fn status(m: &UserManager) -> Option<Status> {
    m.try_ctl_status()
}

fn connections(st: &Status) -> u64 {
    st.connections as u64
}

fn listeners(st: &Status) -> u64 {
    st.listeners.len() as u64
}

fn worker_pid(st: &Status) -> Option<u32> {
    st.worker_pid
}

/// Waits until takeoverd reports `n` live connections.
fn wait_connections(m: &UserManager, n: u64, timeout: Duration) -> Status {
    let mut last = None;
    let waited = poll_until(&format!("takeoverd reports {n} connections"), timeout, || {
        last = status(m);
        last.as_ref().is_some_and(|st| connections(st) == n && worker_pid(st).is_some())
    });
    if let Err(e) = waited {
        panic!("{e}: {last:?}\n{}", m.service_log_tail(30));
    }
    last.unwrap()
}

/// What systemd's fd store must hold for takeoverd's status `st`: every
/// listener, every live connection stored by name, the `state` memfd, and
/// the two ends of each overflow queue pair (`ovfK-r`, `ovfK-w`; takeoverd
/// reports `fdstore_pairs`); connections carried in that queue are not
/// stored by name. Returns (expected, how).
fn expected_store(st: &Status) -> (u64, String) {
    let overflowed = st.fdstore_overflow as u64;
    let queue_ends = 2 * st.fdstore_pairs as u64;
    let named = connections(st) - overflowed;
    let n = listeners(st) + named + 1 + queue_ends;
    let how = format!(
        "{} listeners + {named} connections + 1 state + {queue_ends} overflow queue ends ({overflowed} connections \
         in the queue)",
        listeners(st)
    );
    (n, how)
}

/// NFileDescriptorStore must be exactly what takeoverd holds (see
/// `expected_store`) with `expect_conns` live connections, and what
/// takeoverd believes it stored; waits for it to settle, then asserts it.
fn assert_fd_store(m: &UserManager, expect_conns: u64, timeout: Duration) {
    let mut seen = (0, None);
    let settled = poll_until("the fd store holds what takeoverd holds", timeout, || {
        let Some(st) = status(m) else { return false };
        let n = m.show_u64(SERVICE, "NFileDescriptorStore");
        let done = connections(&st) == expect_conns && n == expected_store(&st).0 && st.fdstore_fds as u64 == n;
        seen = (n, Some(st));
        done
    });
    let st = seen.1.expect("takeoverd never answered");
    let (want, how) = expected_store(&st);
    assert!(
        settled.is_ok(),
        "NFileDescriptorStore={} but takeoverd holds {how} = {want} (expected {expect_conns} connections; takeoverd \
         counts {} stored): {st:?}",
        seen.0,
        st.fdstore_fds
    );
    eprintln!("fd store: NFileDescriptorStore={} = {how}", seen.0);
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
}

/// 200 clients at 5 ms through 20 reloads, 3 restarts, a SIGKILL of takeoverd
/// and a SIGKILL of the worker: not one error, and the fd store holds
/// exactly what takeoverd holds.
#[test]
fn reloads_restarts_and_kills_under_systemd_drop_nothing() {
    const CLIENT_S: u64 = 20;
    let Some((m, port)) = start("storm", &[]) else { return };
    let t0 = Instant::now();
    let dur = CLIENT_S.to_string();
    let busy = Client::start(
        port,
        &["--connections", "200", "--interval-ms", "5", "--duration", &dur, "--timeout-ms", "10000"],
    );
    // Idle connections, so that the store is checked with clients connected.
    let idle = Client::start(
        port,
        &["--connections", "10", "--interval-ms", "1000", "--duration", &dur, "--timeout-ms", "10000"],
    );
    wait_connections(&m, 210, Duration::from_secs(20));
    // The clients run at full rate for a moment before the storm begins:
    // the storm is tested against traffic, not against a ramp.
    std::thread::sleep(Duration::from_millis(500));

    let t_reloads = Instant::now();
    for i in 0..20 {
        let out = m.systemctl_ok(&["reload", SERVICE]);
        let _ = (i, out);
        // The storm's pace: 20 reloads in about 2 s, each followed by traffic.
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = status(&m).expect("status after the reloads");
    let reloads = st.reloads;
    assert!(reloads.len() >= 20 && reloads.iter().all(|r| r.ok), "reload history: {reloads:?}");
    eprintln!("20 reloads in {:?}; generation {}", t_reloads.elapsed(), st.generation);

    for i in 0..3 {
        let old = m.main_pid(SERVICE);
        let t = Instant::now();
        m.systemctl_ok(&["restart", SERVICE]);
        let new = m.wait_running(SERVICE, old, Duration::from_secs(30));
        // Every connection came back from the fd store.
        let st = wait_connections(&m, 210, Duration::from_secs(10));
        eprintln!("restart {}: takeoverd {old} -> {new} in {:?}; {}", i + 1, t.elapsed(), st.connections);
        // Traffic between two operations (the storm's pace).
        std::thread::sleep(Duration::from_millis(300));
    }

    let old = m.main_pid(SERVICE);
    let t = Instant::now();
    m.systemctl_ok(&["kill", "-s", "KILL", "--kill-who=main", SERVICE]);
    let new = m.wait_running(SERVICE, old, Duration::from_secs(30));
    wait_connections(&m, 210, Duration::from_secs(10));
    eprintln!("SIGKILL of takeoverd {old}: restarted as {new} in {:?}", t.elapsed());
    // Traffic between two operations (the storm's pace).
    std::thread::sleep(Duration::from_millis(300));

    let st = status(&m).unwrap();
    let w = worker_pid(&st).expect("a worker serves");
    let t = Instant::now();
    sigkill(w);
    let mut after = None;
    wait_until("a new worker serves the 210 connections after the SIGKILL", Duration::from_secs(10), || {
        after = status(&m);
        after.as_ref().is_some_and(|a| worker_pid(a).is_some_and(|p| p != w) && connections(a) == 210)
    });
    let after = after.unwrap();
    assert_eq!(m.main_pid(SERVICE), new, "takeoverd itself must survive the worker's crash");
    assert_eq!(after.worker_restarts, 1, "{after:?}");
    eprintln!("SIGKILL of worker {w}: replaced by {:?} in {:?}", worker_pid(&after), t.elapsed());
    // Traffic between two operations (the storm's pace).
    std::thread::sleep(Duration::from_millis(300));

    // With both clients still connected.
    assert_fd_store(&m, 210, Duration::from_secs(5));
    let ops = t0.elapsed();
    eprintln!("all operations done {ops:?} into a {CLIENT_S} s client run");
    assert!(
        ops + Duration::from_secs(2) < Duration::from_secs(CLIENT_S),
        "the operations took {ops:?}: too long for the {CLIENT_S} s client run; the fd store check above may \
         have raced the clients' end"
    );

    let v = busy.finish("busy client (200 connections, 5 ms)");
    let vi = idle.finish("idle client (10 connections, 1 s)");
    eprintln!(
        "longest pause seen by a client: {} us (busy client), {} us (idle client)",
        v.latency_us.max, vi.latency_us.max
    );
    assert_eq!(v.connections, 200);

    assert_fd_store(&m, 0, Duration::from_secs(10));
    eprintln!("test took {:?}", t0.elapsed());
}

/// `systemctl reload` to a worker binary that exits at once fails, the old
/// worker goes on serving, `ctl status` shows the failure; with the real
/// binary back a reload succeeds.
#[test]
fn failed_reload_under_systemd_keeps_serving() {
    let Some(mut m) = UserManager::start("badworker") else { return };
    let port = free_port();
    let worker = m.dir.path("worker");
    let tmp = m.dir.path("worker.new");
    let put = |src: &[u8]| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&tmp, src).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &worker).unwrap();
    };
    let real = std::fs::read(bin("seqnum-worker")).unwrap();
    put(&real);
    let worker_arg = worker.display().to_string();
    m.install_seqnum(port, &["--worker", &worker_arg]);
    up(&m, port);

    let c =
        Client::start(port, &["--connections", "20", "--interval-ms", "5", "--duration", "8", "--timeout-ms", "10000"]);
    wait_connections(&m, 20, Duration::from_secs(10));
    m.systemctl_ok(&["reload", SERVICE]);
    let before = status(&m).unwrap();
    assert!(before.reloads.last().unwrap().ok, "{before:?}");

    put(b"#!/bin/sh\nexit 1\n");
    let t = Instant::now();
    let out = m.systemctl(&["reload", SERVICE]);
    eprintln!("failing reload: {} in {:?}: {}", out.status, t.elapsed(), String::from_utf8_lossy(&out.stderr).trim());
    assert!(!out.status.success(), "systemctl reload must fail when the new worker exits at once");
    let st = status(&m).expect("takeoverd still answers");
    let last = st.reloads.last().unwrap().clone();
    assert!(!last.ok, "{st:?}");
    let err = last.error.as_deref().unwrap_or_default();
    assert!(!err.is_empty(), "a failed reload must say why: {st:?}");
    eprintln!("ctl status shows: {err}");
    assert_eq!(worker_pid(&st), worker_pid(&before), "the old worker must go on serving: {st:?}");
    assert_eq!(connections(&st), 20, "{st:?}");
    assert_eq!(m.show(SERVICE, "ActiveState"), "active");

    put(&real);
    m.systemctl_ok(&["reload", SERVICE]);
    let st = status(&m).unwrap();
    let last = st.reloads.last().unwrap().clone();
    assert!(last.ok, "{st:?}");
    assert_ne!(worker_pid(&st), worker_pid(&before), "{st:?}");
    assert_fd_store(&m, 20, Duration::from_secs(5));

    c.finish("client across the failed reload");
}

/// 1 000 connect/echo/close cycles leave nothing behind: not in the fd
/// store, not in takeoverd, not in the worker.
#[test]
fn connection_churn_under_systemd_leaks_no_fd() {
    let Some((m, port)) = start("churn", &[]) else { return };
    let d = m.main_pid(SERVICE);
    assert_fd_store(&m, 0, Duration::from_secs(10));
    let st = status(&m).unwrap();
    let w = worker_pid(&st).unwrap();
    let (base_d, base_w) = (fds_of(d), fds_of(w));

    let t = Instant::now();
    let threads: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.write_all(&0u32.to_be_bytes()).unwrap();
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf).unwrap_or_else(|e| panic!("cycle {i}: no echo: {e}"));
                    assert_eq!(buf, 0u32.to_be_bytes(), "cycle {i}: wrong echo");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("a connect/close thread failed");
    }
    eprintln!("1000 connect/echo/close cycles in {:?}", t.elapsed());

    assert_fd_store(&m, 0, Duration::from_secs(10));
    let settled = poll_until("takeoverd and the worker are back to their fds", Duration::from_secs(10), || {
        fds_of(d).len() == base_d.len() && fds_of(w).len() == base_w.len()
    });
    let (now_d, now_w) = (fds_of(d), fds_of(w));
    assert!(
        settled.is_ok(),
        "fd leak: takeoverd {} -> {} fds, worker {} -> {} fds\ntakeoverd now: {now_d:?}\nworker now: {now_w:?}",
        base_d.len(),
        now_d.len(),
        base_w.len(),
        now_w.len()
    );
    assert_eq!(m.main_pid(SERVICE), d, "takeoverd restarted during the churn");
    assert_eq!(worker_pid(&status(&m).unwrap()), Some(w), "the worker restarted during the churn");
    eprintln!("fds: takeoverd {} (as before), worker {} (as before)", now_d.len(), now_w.len());
}

/// The Python worker of examples/python (written from docs/PROTOCOL.md
/// alone) as the unit's worker: 50 clients through two reloads, a
/// `systemctl restart`, a SIGKILL of takeoverd and a SIGKILL of the worker,
/// without one error. Each takeoverd restart hands the connections from the
/// fd store to a fresh Python worker with `recovered: true`.
#[test]
fn a_python_worker_survives_reloads_and_takeoverd_restarts_under_systemd() {
    let python = std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    if !python {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "python3 is not on PATH, and CI=true: install it");
        let _ = writeln!(
            std::io::stderr(),
            "SKIP a_python_worker_survives_reloads_and_takeoverd_restarts_under_systemd: no python3"
        );
        return;
    }
    let Some(mut m) = UserManager::start("python") else { return };
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/seqnum_worker.py");
    let bins = m.service_bins();
    // The service's private /tmp hides a checkout under /tmp: then the
    // script goes where the harness copied the binaries.
    let script = if bins == testkit::bin_dir() {
        src
    } else {
        let to = bins.join("seqnum_worker.py");
        std::fs::copy(&src, &to).unwrap();
        to
    };
    let port = free_port();
    m.install_seqnum(port, &["--worker", script.to_str().unwrap()]);
    up(&m, port);
    let load =
        Client::start(port, &["--connections", "50", "--interval-ms", "5", "--duration", "8", "--timeout-ms", "10000"]);
    wait_connections(&m, 50, Duration::from_secs(10));
    let python_serves = |st: &Status| {
        let pid = worker_pid(st).expect("a worker serves");
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(String::from_utf8_lossy(&cmd).contains("seqnum_worker.py"), "worker {pid} is not the Python worker");
    };
    python_serves(&status(&m).unwrap());
    for _ in 0..2 {
        // Pacing: the clients echo under each worker before the next event.
        std::thread::sleep(Duration::from_millis(300));
        m.systemctl_ok(&["reload", SERVICE]);
    }
    let old = m.main_pid(SERVICE);
    m.systemctl_ok(&["restart", SERVICE]);
    let new = m.wait_running(SERVICE, old, Duration::from_secs(30));
    python_serves(&wait_connections(&m, 50, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(300));
    m.systemctl_ok(&["kill", "-s", "KILL", "--kill-who=main", SERVICE]);
    m.wait_running(SERVICE, new, Duration::from_secs(30));
    let st = wait_connections(&m, 50, Duration::from_secs(10));
    python_serves(&st);
    std::thread::sleep(Duration::from_millis(300));
    let w = worker_pid(&st).unwrap();
    sigkill(w);
    wait_until("the Python worker is replaced after its SIGKILL", Duration::from_secs(10), || {
        status(&m).is_some_and(|st| worker_pid(&st).is_some_and(|p| p != w) && connections(&st) == 50)
    });
    python_serves(&status(&m).unwrap());
    let v = load.finish("50 clients, Python worker, reloads and restarts under systemd");
    assert_eq!(v.connections, 50);
}

/// `takeoverd ctl upgrade` under systemd: `MainPID` stays, the unit goes
/// back to active (RELOADING=1, then READY=1), the fd store still holds
/// exactly what takeoverd holds, and a SIGKILL of the upgraded takeoverd is
/// recovered from it like any crash. 100 clients, not one error.
#[test]
fn upgrades_under_systemd_keep_main_pid_and_the_fd_store() {
    let Some((m, port)) = start("upgrade", &[]) else { return };
    let load = Client::start(
        port,
        &["--connections", "100", "--interval-ms", "5", "--duration", "6", "--timeout-ms", "10000"],
    );
    wait_connections(&m, 100, Duration::from_secs(10));
    let main = m.main_pid(SERVICE);
    let worker = worker_pid(&status(&m).unwrap());
    for i in 1..=3 {
        // Pacing: the clients echo under each image before the next upgrade.
        std::thread::sleep(Duration::from_millis(300));
        let out = m.ctl(&["upgrade"]);
        assert!(out.status.success(), "upgrade {i} failed: {out:?}\n{}", m.service_log_tail(30));
        assert_eq!(m.main_pid(SERVICE), main, "MainPID changed");
        wait_until("the unit is active again after the upgrade", Duration::from_secs(5), || {
            m.show(SERVICE, "ActiveState") == "active"
        });
        let st = status(&m).unwrap();
        assert_eq!(st.upgrades, i, "{st:?}");
        assert_eq!(worker_pid(&st), worker, "an upgrade must not replace the worker: {st:?}");
    }
    assert_fd_store(&m, 100, Duration::from_secs(5));
    // The unit's system call filter lets takeoverd upgrade at SCHED_IDLE
    // (and return), as the benchmark's figures assume, wherever the unit's
    // LimitNICE=+0 takes effect: a manager without CAP_SYS_RESOURCE (this
    // machine's test manager) cannot raise RLIMIT_NICE, and then takeoverd
    // rightly stays at SCHED_OTHER, since it could not come back.
    let log = m.service_log();
    let limits = std::fs::read_to_string(format!("/proc/{main}/limits")).unwrap_or_default();
    let nice_limit: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max nice priority"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0);
    if nice_limit >= 20 {
        assert!(log.contains("sched_idle=true"), "the upgrades did not run at SCHED_IDLE:\n{}", m.service_log_tail(20));
    } else {
        assert!(log.contains("sched_idle=false"), "{}", m.service_log_tail(20));
        eprintln!(
            "note: RLIMIT_NICE is {nice_limit} in this manager (LimitNICE=+0 not granted): upgrades ran at SCHED_OTHER"
        );
    }
    assert!(!log.contains("returning to SCHED_OTHER"), "{}", m.service_log_tail(20));
    m.systemctl_ok(&["kill", "-s", "KILL", "--kill-who=main", SERVICE]);
    m.wait_running(SERVICE, main, Duration::from_secs(30));
    wait_connections(&m, 100, Duration::from_secs(10));
    let v = load.finish("100 clients through 3 upgrades and a SIGKILL of the upgraded takeoverd");
    assert_eq!(v.connections, 100);
}

/// units/seqnum-newer-systemd.conf as a drop-in. Where a setting applies
/// (Type=notify-reload on 253+, FileDescriptorStorePreserve= on 254+) it
/// must be in force; where it does not (this machine's 252) the unit must
/// run exactly as without it. Either way a reload under load drops nothing.
#[test]
fn the_newer_systemd_drop_in_applies_where_it_can_and_is_harmless_elsewhere() {
    let Some(mut m) = UserManager::start("newer-systemd") else { return };
    let port = free_port();
    m.install_seqnum(port, &[]);
    let dir = m.config_dir.join("systemd/user/seqnum.service.d");
    std::fs::create_dir_all(&dir).unwrap();
    let drop_in = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("units/seqnum-newer-systemd.conf");
    std::fs::copy(&drop_in, dir.join("newer-systemd.conf")).unwrap();
    m.systemctl_ok(&["daemon-reload"]);
    up(&m, port);
    let version = std::process::Command::new("systemctl")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1)?.parse::<u32>().ok())
        .expect("systemctl --version names a version");
    let ty = m.show(SERVICE, "Type");
    eprintln!("systemd {version}: Type={ty}");
    assert_eq!(ty, if version >= 253 { "notify-reload" } else { "notify" }, "systemd {version}");
    if version >= 254 {
        assert_eq!(m.show(SERVICE, "FileDescriptorStorePreserve"), "yes");
    }
    let load =
        Client::start(port, &["--connections", "50", "--interval-ms", "5", "--duration", "3", "--timeout-ms", "10000"]);
    wait_connections(&m, 50, Duration::from_secs(10));
    let worker = worker_pid(&status(&m).unwrap());
    m.systemctl_ok(&["reload", SERVICE]);
    let st = status(&m).unwrap();
    assert_ne!(worker_pid(&st), worker, "the reload did not replace the worker: {st:?}");
    load.finish("50 clients through a reload with the newer-systemd drop-in");
}

/// `--workers 2` under systemd: the connections are shared out; rolling
/// reloads replace both workers; a SIGKILL of one worker leaves the other
/// untouched; `systemctl restart` and a SIGKILL of takeoverd bring both
/// back with every connection from the fd store. 150 clients, not one
/// error; the fd store holds what takeoverd holds; `STATUS=` names both.
#[test]
fn two_workers_under_systemd_through_reloads_restarts_and_kills() {
    let Some((m, port)) = start("workers", &["--workers", "2"]) else { return };
    let load = Client::start(
        port,
        &["--connections", "150", "--interval-ms", "5", "--duration", "12", "--timeout-ms", "10000"],
    );
    let st = wait_connections(&m, 150, Duration::from_secs(10));
    let shares: Vec<usize> = st.workers.iter().map(|w| w.connections).collect();
    assert_eq!(shares, vec![75, 75], "{st:?}");
    let both = |st: &Status| -> Vec<Option<u32>> { st.workers.iter().map(|w| w.pid).collect() };
    let serving = |st: &Status| st.workers.len() == 2 && st.workers.iter().all(|w| w.state == "serving");

    for i in 1..=2 {
        let before = both(&status(&m).unwrap());
        m.systemctl_ok(&["reload", SERVICE]);
        let after = both(&status(&m).unwrap());
        assert!(before[0] != after[0] && before[1] != after[1], "reload {i} replaced both: {before:?} -> {after:?}");
    }

    let st = status(&m).unwrap();
    let (keep, victim) = (st.workers[0].pid.unwrap(), st.workers[1].pid.unwrap());
    sigkill(victim);
    wait_until("worker 1 is replaced", Duration::from_secs(10), || {
        status(&m).is_some_and(|st| serving(&st) && st.workers[1].pid != Some(victim))
    });
    assert_eq!(status(&m).unwrap().workers[0].pid, Some(keep), "worker 0 must not notice worker 1's crash");

    for how in [&["restart", SERVICE][..], &["kill", "-s", "KILL", "--kill-who=main", SERVICE][..]] {
        let main = m.main_pid(SERVICE);
        m.systemctl_ok(how);
        m.wait_running(SERVICE, main, Duration::from_secs(30));
        let st = wait_connections(&m, 150, Duration::from_secs(10));
        wait_until("both workers serve", Duration::from_secs(10), || status(&m).is_some_and(|st| serving(&st)));
        assert_eq!(st.workers.iter().map(|w| w.connections).sum::<usize>(), 150, "{how:?}: {st:?}");
    }
    assert_fd_store(&m, 150, Duration::from_secs(5));
    let text = m.show(SERVICE, "StatusText");
    assert!(text.contains("2 workers"), "STATUS= names the workers: {text}");
    load.finish("150 clients, 2 workers, through reloads, a worker SIGKILL, a restart and a takeoverd SIGKILL");
}
