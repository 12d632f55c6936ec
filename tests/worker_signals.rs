//! A standalone seqnum-worker that gets SIGHUP and SIGTERM at once stops:
//! its signalfd is edge-triggered, so one wakeup must read every queued
//! signal (it used to read one, and the SIGTERM behind a SIGHUP was lost, and
//! every later SIGTERM with it).

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit::*;

#[test]
fn sighup_and_sigterm_together_stop_a_worker() {
    let port = free_port();
    let w = Command::new(bin("seqnum-worker"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut w = Reaper(w);
    wait_for_port(port, Duration::from_secs(10));
    let pid = Pid::from_raw(w.0.id() as i32);
    // Stopped, the worker cannot read either signal before both are queued:
    // they reach it together, on one edge of its signalfd.
    kill(pid, Signal::SIGSTOP).unwrap();
    wait_until("the worker is stopped", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) == Some("T"))
    });
    kill(pid, Signal::SIGHUP).unwrap();
    kill(pid, Signal::SIGTERM).unwrap();
    kill(pid, Signal::SIGCONT).unwrap();
    let status =
        wait_timeout(&mut w.0, Duration::from_secs(5)).expect("the worker ignored the SIGTERM sent with a SIGHUP");
    assert!(status.success(), "the worker exited {status}");
}
