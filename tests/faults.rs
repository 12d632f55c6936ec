//! Faults at every step of a reload (no systemd): SIGKILL and SIGSTOP of the
//! new worker and of the old one, at each step of the staged handoff
//! (channel version 2) and of the version-1 handoff an old worker gets. The
//! fault is injected deterministically by takeoverd itself
//! (`TAKEOVERD_FAULT=STEP:ACTION:MARKER`, see crates/takeoverd/src/fault.rs).
//! After each: the clients connected before the fault got every echo in
//! order, a second reload succeeds, exactly one worker runs, nothing leaked,
//! and SIGTERM stops everything.

use std::process::Command;
use std::time::Duration;

use testkit::*;

fn case(step: &str, action: &str, reload_ok: bool) {
    run_case(step, action, reload_ok, 2);
}

fn run_case(step: &str, action: &str, reload_ok: bool, channel: u32) {
    let dir = TempDir::new(&format!("fault-{step}-{action}-v{channel}"));
    let fault = ("TAKEOVERD_FAULT", format!("{step}:{action}:{}", dir.path("fired").display()));
    let channel_arg = channel.to_string();
    let Takeoverd { proc: mut d, pid: dpid, port, sock, log } =
        Takeoverd::start(&dir, &["--ack-timeout-ms", "500", "--", "--takeoverd-channel", &channel_arg], &[fault]);
    let fds_before = settled_fd_count(dpid);

    let load = client(port, &["--connections", "20", "--interval-ms", "5", "--duration", "3", "--timeout-ms", "5000"]);
    wait_until("takeoverd holds the client's 20 connections", Duration::from_secs(5), || {
        ctl_status(&sock).connections == 20
    });
    let first = ctl(&sock, &["reload"]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(first.status.success(), reload_ok, "{step}:{action}: first reload {:?}\n{}", first, log_text());
    assert!(dir.path("fired").exists(), "{step}:{action}: the fault was not injected\n{}", log_text());
    // A worker killed or hung after its commit is replaced by takeoverd.
    wait_until("a worker serves again", Duration::from_secs(5), || ctl_status(&sock).worker_pid.is_some());
    let second = ctl(&sock, &["reload"]);
    assert!(second.status.success(), "{step}:{action}: a reload after the fault failed: {second:?}\n{}", log_text());

    let (out, v) = client_summary(load);
    assert_clean(&out, &v);
    eprintln!("{step}:{action}: longest pause {} us", v.latency_us.max);

    // Every client connection is gone; takeoverd holds what it held before.
    wait_until("takeoverd drops the closed connections", Duration::from_secs(5), || ctl_status(&sock).connections == 0);
    let kids = live_children(dpid);
    assert_eq!(kids.len(), 1, "{step}:{action}: exactly one worker should run, found {kids:?}");
    assert_eq!(settled_fd_count(dpid), fds_before, "{step}:{action}: takeoverd leaked fds: {:?}", fds_of(dpid));
    let worker_sockets = fds_of(kids[0]).iter().filter(|f| f.starts_with("socket:")).count();
    // A version-2 worker holds its channel only (takeoverd accepts); a
    // version-1 worker also the listener.
    let want = if channel == 2 { 1 } else { 2 };
    assert_eq!(worker_sockets, want, "{step}:{action}: the worker should hold its channel (and v1: the listener) only");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dpid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_timeout(&mut d.0, Duration::from_secs(5)).expect("takeoverd did not stop on SIGTERM");
    assert!(status.success(), "takeoverd exited {status}");
    wait_until("the worker is gone", Duration::from_secs(2), || !alive(kids[0]));
}

macro_rules! fault_cases {
    ($($name:ident: $step:literal, $action:literal => $ok:literal;)*) => {
        $(#[test] fn $name() { case($step, $action, $ok); })*
    };
}

// Before `serve` the old worker owns everything: a failure of the new one
// rolls back (the reload fails), a failure of the old one makes the new one
// recover its connections (the reload succeeds). After `serve` the new one
// is committed: if it fails, a fresh worker recovers the connections.
fault_cases! {
    kill_new_when_started: "new-started", "kill-new" => false;
    kill_old_when_started: "new-started", "kill-old" => true;
    stop_new_when_started: "new-started", "stop-new" => false;
    stop_old_when_started: "new-started", "stop-old" => true;
    kill_new_when_ready: "new-ready", "kill-new" => false;
    kill_old_when_ready: "new-ready", "kill-old" => true;
    stop_new_when_ready: "new-ready", "stop-new" => false;
    stop_old_when_ready: "new-ready", "stop-old" => true;
    kill_new_when_old_stopped: "old-stopped", "kill-new" => false;
    kill_old_when_old_stopped: "old-stopped", "kill-old" => true;
    stop_new_when_old_stopped: "old-stopped", "stop-new" => false;
    stop_old_when_old_stopped: "old-stopped", "stop-old" => true;
    kill_new_when_serving: "new-serving", "kill-new" => true;
    kill_old_when_serving: "new-serving", "kill-old" => true;
    stop_new_when_serving: "new-serving", "stop-new" => true;
    stop_old_when_serving: "new-serving", "stop-old" => true;
}

macro_rules! v1_fault_cases {
    ($($name:ident: $step:literal, $action:literal => $ok:literal;)*) => {
        $(#[test] fn $name() { run_case($step, $action, $ok, 1); })*
    };
}

// Workers that speak version 1 of the channel get the version-1 handoff.
v1_fault_cases! {
    v1_kill_new_when_started: "new-started", "kill-new" => false;
    v1_kill_old_when_started: "new-started", "kill-old" => true;
    v1_kill_new_when_sockets_sent: "sockets-sent", "kill-new" => false;
    // (SIGSTOP before the offer: after it, the worker may ack before the
    // signal lands, and then the reload rightly succeeds.)
    v1_stop_new_when_started: "new-started", "stop-new" => false;
    v1_kill_old_when_sockets_sent: "sockets-sent", "kill-old" => true;
    v1_kill_new_when_serving: "new-serving", "kill-new" => true;
}

/// Reloads asked for while one runs wait for it and report its outcome;
/// they never start another (nor interleave with it).
#[test]
fn reloads_asked_during_a_reload_share_its_outcome() {
    let dir = TempDir::new("reload-join");
    let port = free_port();
    let sock = dir.path("ctl.sock");
    let log = dir.path("takeoverd.log");
    // The new worker is stopped at its first step, so the reload takes the
    // whole ack timeout (1 s) and fails: a window to ask again in.
    let d = Command::new(bin("takeoverd"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--ack-timeout-ms", "1000", "--control-socket"])
        .arg(&sock)
        .env("TAKEOVERD_FAULT", format!("new-started:stop-new:{}", dir.path("fired").display()))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _d = Reaper(d);
    wait_for_path(&sock, Duration::from_secs(10));
    wait_until("the first worker serves", Duration::from_secs(5), || ctl_status(&sock).worker_pid.is_some());
    let ask = |sock: std::path::PathBuf| {
        move || Command::new(bin("takeoverd")).arg("ctl").arg("--control-socket").arg(sock).arg("reload").output()
    };
    let first = std::thread::spawn(ask(sock.clone()));
    // The first reload is under way once its new worker has started (and
    // been stopped by the fault).
    wait_for_path(&dir.path("fired"), Duration::from_secs(5));
    let late: Vec<_> = (0..3).map(|_| std::thread::spawn(ask(sock.clone()))).collect();
    let first = first.join().unwrap().unwrap();
    assert!(!first.status.success(), "the first reload should fail: {first:?}");
    for l in late {
        let out = l.join().unwrap().unwrap();
        assert!(!out.status.success(), "a reload that joined the failing one must report its failure: {out:?}");
        assert_eq!(out.stderr, first.stderr, "every waiter reports the same outcome");
    }
    let st = ctl_status(&sock);
    assert_eq!(st.reloads.len(), 1, "only one reload ran: {st:?}");
    assert_eq!(st.generation, 1);
}
