//! The staged handoff's promises, end to end (no systemd):
//! - a new worker that hangs while it is staged costs clients nothing: the
//!   old worker serves on until the new one said it is ready;
//! - takeoverd owns every connection from its first instant: a worker
//!   SIGKILLed right after takeoverd accepted a connection loses nothing,
//!   and neither do connections opened while workers are killed over and over;
//! - workers that speak version 1 of the channel still work, and reloads
//!   between version-1 and version-2 workers lose nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testkit::*;

/// SIGSTOP of the new worker as soon as it said hello: the reload fails
/// after the ack timeout (2 s), and meanwhile no client waited anywhere
/// near that long for an echo.
#[test]
fn a_hung_new_worker_does_not_pause_clients() {
    let dir = TempDir::new("hung-new");
    let fault = ("TAKEOVERD_FAULT", format!("new-started:stop-new:{}", dir.path("fired").display()));
    let d = Takeoverd::start(&dir, &["--ack-timeout-ms", "2000"], &[fault]);
    let load =
        client(d.port, &["--connections", "50", "--interval-ms", "5", "--duration", "4", "--timeout-ms", "5000"]);
    wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 50);
    let t0 = Instant::now();
    let out = ctl(&d.sock, &["reload"]);
    assert!(!out.status.success(), "the reload should fail: {out:?}");
    assert!(t0.elapsed() >= Duration::from_millis(1900), "the reload should wait for the deadline");
    let (out, v) = client_summary(load);
    assert_clean(&out, &v);
    let worst_us = v.latency_us.max;
    assert!(
        worst_us < 1_000_000,
        "a client waited {worst_us} us for an echo while the new worker hung: the old one should have served it"
    );
}

/// The serving worker is SIGKILLed right after takeoverd accepted a
/// connection and queued it for that worker: the connection is served by
/// the next worker.
#[test]
fn a_worker_killed_just_after_an_accept_loses_nothing() {
    let dir = TempDir::new("kill-after-accept");
    let fault = ("TAKEOVERD_FAULT", format!("accepted:kill-old:{}", dir.path("fired").display()));
    let d = Takeoverd::start(&dir, &["--ack-timeout-ms", "1000"], &[fault]);
    let load =
        client(d.port, &["--connections", "20", "--interval-ms", "5", "--duration", "2", "--timeout-ms", "5000"]);
    let (out, v) = client_summary(load);
    assert!(dir.path("fired").exists(), "the fault was not injected");
    assert_clean(&out, &v);
    assert_eq!(ctl_status(&d.sock).worker_restarts, 1);
}

/// Connections opened one after another while the worker is SIGKILLed ten
/// times: every one connects and gets its echoes.
#[test]
fn connections_opened_during_worker_kills_are_all_served() {
    let dir = TempDir::new("churn-kills");
    let d = Takeoverd::start(&dir, &["--ack-timeout-ms", "1000"], &[]);
    let port = d.port;
    let opener = std::thread::spawn(move || {
        let mut served = 0;
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut open = Vec::new();
        while Instant::now() < deadline {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for seq in 0u32..3 {
                s.write_all(&seq.to_be_bytes()).expect("write");
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).unwrap_or_else(|e| panic!("connection {served}, seqnum {seq}: {e}"));
                assert_eq!(u32::from_be_bytes(buf), seq);
            }
            served += 1;
            // Keep every other one open, so that kills find live ones too.
            if served % 2 == 0 {
                open.push(s);
            }
        }
        served
    });
    for _ in 0..10 {
        // The pace of the kills: connections open and close between them.
        std::thread::sleep(Duration::from_millis(200));
        let pid = ctl_status(&d.sock).worker_pid;
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            wait_until("a new worker serves", Duration::from_secs(5), || {
                ctl_status(&d.sock).worker_pid.is_some_and(|p| p != pid)
            });
        }
    }
    let served = opener.join().expect("a connection failed");
    assert!(served > 10, "only {served} connections were served");
}

/// A worker script that runs seqnum-worker with the channel version written
/// in `version_file`, so that one takeoverd can reload between versions.
fn versioned_worker(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let version_file = dir.path("channel");
    let script = dir.path("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} --takeoverd-channel \"$(cat {})\" \"$@\"\n",
            bin("seqnum-worker").display(),
            version_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (script, version_file)
}

/// Reloads 1 → 2 → 1 → 2 under load and a SIGKILL of a version-1 worker:
/// nothing lost, and the version-1 worker holds the listener while the
/// version-2 one does not.
#[test]
fn version_1_and_version_2_workers_hand_over_to_each_other() {
    let dir = TempDir::new("mixed-versions");
    let (script, version_file) = versioned_worker(&dir);
    std::fs::write(&version_file, "1").unwrap();
    let worker = script.display().to_string();
    let d = Takeoverd::start(&dir, &["--ack-timeout-ms", "2000", "--worker", &worker], &[]);
    let load =
        client(d.port, &["--connections", "50", "--interval-ms", "5", "--duration", "5", "--timeout-ms", "5000"]);
    wait_until("the clients are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 50);
    let sockets = |pid: u32| fds_of(pid).iter().filter(|f| f.starts_with("socket:")).count();
    for version in ["2", "1", "2"] {
        std::fs::write(&version_file, version).unwrap();
        let out = ctl(&d.sock, &["reload"]);
        assert!(out.status.success(), "reload to version {version} failed: {out:?}");
        let st = ctl_status(&d.sock);
        let pid = st.worker_pid.unwrap();
        let held = sockets(pid);
        if version == "1" {
            assert!(held > 50, "a version-1 worker holds the listener, its channel and 50 connections: {held}");
            // And a crash of it loses nothing either.
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
            wait_until("a new worker serves", Duration::from_secs(5), || {
                ctl_status(&d.sock).worker_pid.is_some_and(|p| p != pid)
            });
        } else {
            assert_eq!(held, 51, "a version-2 worker holds its channel and the 50 connections, no listener");
        }
    }
    let (out, v) = client_summary(load);
    assert_clean(&out, &v);
}
