//! `takeoverd ctl upgrade`: takeoverd re-executes its binary in place. The
//! pid, the serving worker and every connection stay; clients see no error;
//! every way it can fail leaves the running takeoverd serving.
//!
//! The sleeps between operations are pacing (clients echo under each image
//! before the next upgrade); every wait for a state polls it (`wait_until`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use testkit::*;

/// 30 connections, lock-step, ~5 ms between an echo and the next seqnum.
fn load(port: u16, secs: &str) -> Child {
    client(port, &["--connections", "30", "--interval-ms", "5", "--duration", secs, "--timeout-ms", "5000"])
}

fn upgrade(sock: &Path) -> Output {
    let out = ctl(sock, &["upgrade"]);
    let _ = writeln!(
        std::io::stderr(),
        "ctl upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

fn upgrade_ok(d: &Takeoverd) {
    let out = upgrade(&d.sock);
    assert!(out.status.success(), "upgrade failed: {out:?}\n{}", log(d));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("pid {} (unchanged)", d.pid)),
        "the upgraded takeoverd is not pid {}: {said}",
        d.pid
    );
}

/// A refused or failed upgrade: exit 1, and the message names `why`.
fn upgrade_fails(d: &Takeoverd, why: &str) {
    let out = upgrade(&d.sock);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the upgrade should have failed ({why}): {out:?}");
    assert!(err.contains(why), "the error should say {why:?}: {err}");
}

fn log(d: &Takeoverd) -> String {
    format!("---- takeoverd's log:\n{}", std::fs::read_to_string(&d.log).unwrap_or_default())
}

fn worker_pid(d: &Takeoverd) -> u32 {
    ctl_status(&d.sock).worker_pid.expect("a worker serves")
}

/// Five upgrades under load: same takeoverd pid, same worker, every
/// connection, no client error; then a reload and a SIGKILL of the worker,
/// which the upgraded image handles (it adopted the worker by pid).
#[test]
fn upgrades_keep_the_pid_the_worker_and_every_connection() {
    let dir = TempDir::new("upgrade");
    let d = Takeoverd::start(&dir, &[], &[]);
    let mut load = load(d.port, "5");
    wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 30);
    let worker = worker_pid(&d);
    for i in 1..=5 {
        // Pacing: clients echo between upgrades, as in production.
        std::thread::sleep(Duration::from_millis(100));
        upgrade_ok(&d);
        let st = ctl_status(&d.sock);
        assert_eq!(st.upgrades, i, "{st:?}");
        assert_eq!(st.worker_pid, Some(worker), "the worker must never be replaced by an upgrade: {st:?}");
        assert_eq!(st.connections, 30, "{st:?}");
        assert!(alive(d.pid), "takeoverd {} is gone", d.pid);
        assert!(children_of(d.pid).iter().any(|(p, z)| *p == worker && !z), "the worker is still our child");
    }
    std::thread::sleep(Duration::from_millis(200)); // pacing, as above
    let out = ctl(&d.sock, &["reload"]);
    assert!(out.status.success(), "a reload after the upgrades failed: {out:?}\n{}", log(&d));
    let second = worker_pid(&d);
    assert_ne!(second, worker);
    wait_until("the old worker is reaped (no zombie)", Duration::from_secs(5), || {
        !children_of(d.pid).iter().any(|(p, _)| *p == worker)
    });
    upgrade_ok(&d);
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(second as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("a new worker serves after the kill", Duration::from_secs(5), || {
        try_ctl_status(&d.sock).and_then(|s| s.worker_pid).is_some_and(|p| p != second)
    });
    assert!(load.try_wait().unwrap().is_none(), "the client ended before the upgrades were done");
    let (out, v) = client_summary(load);
    assert_clean(&out, &v);
    let st = ctl_status(&d.sock);
    assert_eq!(st.worker_restarts, 1, "{st:?}");
}

/// takeoverd started from a copy of its binary in `dir`, so that the test
/// can break the binary on disk.
fn start_copy(dir: &TempDir, env: &[(&str, String)]) -> (Takeoverd, PathBuf) {
    let exe = dir.path("takeoverd");
    std::fs::copy(bin("takeoverd"), &exe).unwrap();
    let worker = bin("seqnum-worker");
    (Takeoverd::start_binary(&exe, dir, &["--worker", worker.to_str().unwrap()], env), exe)
}

fn write_script(path: &Path, body: &str) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// A binary on disk that is missing, not executable, reads another
/// snapshot version, or is not a takeoverd at all: each upgrade is refused
/// with the reason, and the running takeoverd serves on, untouched. With
/// the real binary back, the upgrade works.
#[test]
fn upgrade_is_refused_when_the_binary_on_disk_cannot_take_over() {
    let dir = TempDir::new("upgrade-refused");
    let (d, exe) = start_copy(&dir, &[]);
    let mut load = load(d.port, "4");
    wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 30);
    let worker = worker_pid(&d);

    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    upgrade_fails(&d, "cannot be run");
    std::fs::remove_file(&exe).unwrap();
    upgrade_fails(&d, "cannot be run");
    write_script(&exe, "echo 'takeoverd upgrade-state 999 9.9.9'");
    upgrade_fails(&d, "reads upgrade state version 999");
    write_script(&exe, "echo hello");
    upgrade_fails(&d, "does not look like a takeoverd");

    std::fs::remove_file(&exe).unwrap();
    std::fs::copy(bin("takeoverd"), &exe).unwrap();
    upgrade_ok(&d);
    let st = ctl_status(&d.sock);
    assert_eq!(st.upgrades, 1, "{st:?}");
    assert_eq!(st.worker_pid, Some(worker), "{st:?}");
    assert!(alive(d.pid));
    let (out, v) = client_summary(load_done(&mut load));
    assert_clean(&out, &v);
}

fn load_done(load: &mut Child) -> Child {
    assert!(load.try_wait().unwrap().is_none(), "the client ended before the upgrades were done");
    std::mem::replace(load, Command::new("true").spawn().unwrap())
}

/// The exec fails (`upgrade-exec:fail`): the old image serves on. The new
/// image cannot take the snapshot (`upgrade-restore:fail`): it execs the
/// previous binary, which takes it; `ctl upgrade` says so and fails. Then an
/// upgrade works. Not one client error throughout.
#[test]
fn a_failed_exec_or_snapshot_leaves_takeoverd_serving() {
    for (step, why) in [("upgrade-exec", "executing /nonexistent"), ("upgrade-restore", "previous binary")] {
        let dir = TempDir::new(step);
        let marker = dir.path("fault-fired");
        let fault = format!("{step}:fail:{}", marker.display());
        let (d, _exe) = start_copy(&dir, &[("TAKEOVERD_FAULT", fault)]);
        let mut load = load(d.port, "3");
        wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 30);
        let worker = worker_pid(&d);
        std::thread::sleep(Duration::from_millis(200));
        upgrade_fails(&d, why);
        assert!(marker.exists(), "the fault did not fire");
        let st = ctl_status(&d.sock);
        assert_eq!(st.worker_pid, Some(worker), "{st:?}");
        assert_eq!(st.connections, 30, "{st:?}");
        std::thread::sleep(Duration::from_millis(200));
        upgrade_ok(&d);
        assert!(alive(d.pid));
        assert_eq!(worker_pid(&d), worker);
        let (out, v) = client_summary(load_done(&mut load));
        assert_clean(&out, &v);
    }
}

/// 100 upgrades: takeoverd holds the same number of fds after as before
/// (nothing the exec carries leaks), and one worker, still the same.
#[test]
fn a_hundred_upgrades_leak_no_fd() {
    let dir = TempDir::new("upgrade-100");
    let d = Takeoverd::start(&dir, &[], &[]);
    let mut load =
        client(d.port, &["--connections", "20", "--interval-ms", "20", "--duration", "30", "--timeout-ms", "5000"]);
    wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 20);
    let before = settled_fd_count(d.pid);
    let worker = worker_pid(&d);
    for _ in 0..100 {
        let out = ctl(&d.sock, &["upgrade"]);
        assert!(out.status.success(), "{out:?}\n{}", log(&d));
    }
    let after = settled_fd_count(d.pid);
    assert_eq!(before, after, "takeoverd's fds: {before} before 100 upgrades, {after} after");
    assert_eq!(worker_pid(&d), worker);
    assert_eq!(live_children(d.pid), vec![worker], "one worker, the same");
    let _ = load.kill();
    let _ = load.wait();
}

/// A worker that speaks version 1 of the channel (it accepts itself) is
/// carried too, and a reload after the upgrade replaces it.
#[test]
fn a_version_1_worker_is_carried_across_an_upgrade() {
    let dir = TempDir::new("upgrade-v1");
    let d = Takeoverd::start(&dir, &["--", "--takeoverd-channel", "1"], &[]);
    let mut load = load(d.port, "3");
    wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 30);
    let worker = worker_pid(&d);
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(200));
        upgrade_ok(&d);
        assert_eq!(worker_pid(&d), worker);
    }
    std::thread::sleep(Duration::from_millis(200));
    let out = ctl(&d.sock, &["reload"]);
    assert!(out.status.success(), "a reload after the upgrades failed: {out:?}\n{}", log(&d));
    assert_ne!(worker_pid(&d), worker);
    let (out, v) = client_summary(load_done(&mut load));
    assert_clean(&out, &v);
}
