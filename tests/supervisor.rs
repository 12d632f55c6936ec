//! takeoverd run directly (no systemd): reloads over the control socket,
//! worker crashes and SIGHUP reloads under a steady client, then a clean
//! SIGTERM. Runs everywhere.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit::{
    alive, assert_clean, bin, client, client_summary, ctl, ctl_status, free_port, poll_until, wait_for_path,
    wait_for_port, wait_timeout, Status,
};
use testkit::{Reaper, TempDir};

/// Kills the client if the test fails before collecting it.
struct ClientGuard(Option<std::process::Child>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn worker_pid(st: &Status) -> Option<u32> {
    st.worker_pid
}

/// Polls `ctl status` until `cond` holds; panics after `timeout`, with the
/// last status.
fn wait_status(sock: &Path, timeout: Duration, what: &str, cond: impl Fn(&Status) -> bool) -> Status {
    let mut st = ctl_status(sock);
    if let Err(e) = poll_until(what, timeout, || {
        st = ctl_status(sock);
        cond(&st)
    }) {
        panic!("{e}; status {st:?}");
    }
    st
}

#[test]
fn reloads_crashes_and_sighup_without_systemd_drop_nothing() {
    let dir = TempDir::new("supervisor");
    let sock = dir.path("ctl.sock");
    let port = free_port();
    let log = std::fs::File::create(dir.path("takeoverd.log")).unwrap();
    let d = Command::new(bin("takeoverd"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--control-socket")
        .arg(&sock)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting takeoverd");
    let mut d = Reaper(d);
    let dpid = d.0.id();
    wait_for_port(port, Duration::from_secs(10));
    wait_for_path(&sock, Duration::from_secs(10));
    let log_tail = || std::fs::read_to_string(dir.path("takeoverd.log")).unwrap_or_default();

    let t0 = Instant::now();
    let mut c = ClientGuard(Some(client(
        port,
        &["--connections", "50", "--interval-ms", "5", "--duration", "10", "--timeout-ms", "10000"],
    )));
    wait_status(&sock, Duration::from_secs(10), "50 connections", |st| st.connections == 50);
    let mut workers = vec![worker_pid(&ctl_status(&sock)).expect("a worker serves")];

    for i in 0..10 {
        let out = ctl(&sock, &["reload"]);
        assert!(
            out.status.success(),
            "ctl reload {} failed ({}): {}{}\n{}",
            i + 1,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log_tail()
        );
        workers.extend(worker_pid(&ctl_status(&sock)));
        // The pace of the reloads: the client runs between two of them.
        std::thread::sleep(Duration::from_millis(50));
    }

    for i in 0..3 {
        let st = ctl_status(&sock);
        let w = worker_pid(&st).expect("a worker serves");
        let restarts = st.worker_restarts;
        kill(Pid::from_raw(w as i32), Signal::SIGKILL).unwrap();
        let st = wait_status(&sock, Duration::from_secs(10), "worker restart after SIGKILL", |st| {
            worker_pid(st).is_some_and(|p| p != w) && st.worker_restarts == (restarts + 1)
        });
        eprintln!("SIGKILL {}: worker {w} -> {:?}", i + 1, worker_pid(&st));
        workers.extend(worker_pid(&st));
        // The pace of the crashes: the client runs between two of them.
        std::thread::sleep(Duration::from_millis(200));
    }

    for i in 0..3 {
        let before = ctl_status(&sock).reloads.len();
        let gen = ctl_status(&sock).generation;
        kill(Pid::from_raw(dpid as i32), Signal::SIGHUP).unwrap();
        let st = wait_status(&sock, Duration::from_secs(10), "reload after SIGHUP", |st| {
            st.generation > gen && st.reloads.len() > before
        });
        let last = st.reloads.last().unwrap().clone();
        assert!(last.ok, "SIGHUP reload {} failed: {st:?}", i + 1);
        workers.extend(worker_pid(&st));
        // The pace of the SIGHUPs: the client runs between two of them.
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("operations done in {:?}", t0.elapsed());

    let st = ctl_status(&sock);
    let reloads = &st.reloads;
    assert_eq!(reloads.len(), 13, "10 ctl reloads + 3 SIGHUP: {reloads:?}");
    assert!(reloads.iter().all(|r| r.ok), "{reloads:?}");
    assert_eq!(st.worker_restarts, 3, "{st:?}");
    assert_eq!(st.connections, 50, "{st:?}");
    assert!(!st.fdstore, "no systemd here: {st:?}");

    let (out, v) = client_summary(c.0.take().unwrap());
    eprintln!("client: {v}");
    assert_clean(&out, &v);
    eprintln!("longest pause seen by the client: {} us", v.latency_us.max);

    let t = Instant::now();
    kill(Pid::from_raw(dpid as i32), Signal::SIGTERM).unwrap();
    let code = wait_timeout(&mut d.0, Duration::from_secs(5));
    assert!(code.is_some(), "takeoverd did not exit within 5 s of SIGTERM\n{}", log_tail());
    assert!(code.unwrap().success(), "takeoverd exited {:?} after SIGTERM\n{}", code, log_tail());
    eprintln!("SIGTERM: takeoverd exited 0 in {:?}", t.elapsed());
    workers.sort_unstable();
    workers.dedup();
    let left: Vec<u32> = workers.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "workers still running after takeoverd stopped: {left:?}");
    assert!(!sock.exists(), "the control socket should be removed on a clean stop");
}
