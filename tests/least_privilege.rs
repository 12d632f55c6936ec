//! Least privilege: a worker holds exactly the fds it should (no strays from
//! takeoverd or takeoverd's parent), takeoverd's own fds are close-on-exec,
//! and `--worker-user` runs workers as another user.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::*;

fn start(dir: &TempDir, extra: &[&str]) -> (Reaper, u16, std::path::PathBuf) {
    let port = free_port();
    let sock = dir.path("ctl.sock");
    let d = Command::new(bin("takeoverd"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--control-socket", sock.to_str().unwrap()])
        .args(extra)
        .stderr(std::fs::File::create(dir.path("takeoverd.log")).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, Duration::from_secs(10));
    wait_for_path(&sock, Duration::from_secs(10));
    (Reaper(d), port, sock)
}

fn worker_pid(sock: &std::path::Path) -> u32 {
    let mut pid = None;
    wait_until("a worker serves", Duration::from_secs(2), || {
        pid = try_ctl_status(sock).and_then(|s| s.worker_pid);
        pid.is_some()
    });
    pid.unwrap()
}

#[test]
fn a_worker_holds_only_its_own_fds_and_takeoverd_leaks_none_into_it() {
    let dir = TempDir::new("fds");
    let (d, port, sock) = start(&dir, &[]);
    let conns: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let wpid = worker_pid(&sock);
    wait_until("the worker holds the five connections", Duration::from_secs(5), || {
        socket_count(wpid) == 1 + conns.len()
    });
    let fds = fds_of(wpid);
    let count = |p: &str| fds.iter().filter(|f| f.starts_with(p)).count();
    // stdin (/dev/null), stdout, stderr; the control channel; epoll; signalfd;
    // five connections (takeoverd accepts: no listener). Nothing else:
    // takeoverd closes every fd above 3 in the child, so not even a stray of
    // the test harness's.
    assert_eq!(fds.len(), 3 + 1 + 1 + 1 + conns.len(), "the worker holds stray fds: {fds:?}");
    assert_eq!(count("socket:"), 1 + conns.len(), "{fds:?}");
    assert_eq!(count("anon_inode:[eventpoll]"), 1, "{fds:?}");
    assert_eq!(count("anon_inode:[signalfd]"), 1, "{fds:?}");

    // Every fd takeoverd made itself is close-on-exec (fds 0-2 and what the
    // test harness itself leaked into takeoverd are not its own).
    let dpid = d.0.id();
    for entry in std::fs::read_dir(format!("/proc/{dpid}/fdinfo")).unwrap().flatten() {
        let fd: i32 = entry.file_name().to_string_lossy().parse().unwrap();
        let target =
            std::fs::read_link(format!("/proc/{dpid}/fd/{fd}")).map(|p| p.display().to_string()).unwrap_or_default();
        let own = target.starts_with("socket:") || target.starts_with("anon_inode:") || target.contains("memfd:");
        if fd < 3 || !own {
            continue;
        }
        let info = std::fs::read_to_string(entry.path()).unwrap();
        let flags = info.lines().find(|l| l.starts_with("flags:")).unwrap().split_whitespace().nth(1).unwrap();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert!(flags & 0o2000000 != 0, "takeoverd's fd {fd} ({target}) is not close-on-exec");
    }
    drop(conns);
}

#[test]
fn workers_can_run_as_another_user() {
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root");
    }
    let dir = TempDir::new("worker-user");
    let (d, port, sock) = start(&dir, &["--worker-user", "nobody"]);
    let load = client(port, &["--connections", "10", "--interval-ms", "5", "--duration", "2"]);
    wait_until("the client's 10 connections are held", Duration::from_secs(5), || {
        try_ctl_status(&sock).is_some_and(|s| s.connections == 10)
    });
    let reload =
        Command::new(bin("takeoverd")).args(["ctl", "--control-socket"]).arg(&sock).arg("reload").output().unwrap();
    assert!(reload.status.success(), "{reload:?}");
    let wpid = worker_pid(&sock);
    let proc_status = std::fs::read_to_string(format!("/proc/{wpid}/status")).unwrap();
    let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == "65534"), "the worker runs as {uid_line}");
    let groups = proc_status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert_eq!(groups.trim(), "Groups:", "the worker kept supplementary groups: {groups}");
    let (out, v) = client_summary(load);
    assert_clean(&out, &v);
    drop(d);
}
