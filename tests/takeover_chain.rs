//! seqnum-worker on its own (development mode, no supervisor): chained `-T`
//! takeovers under load, rollback, a message split across a takeover, and a
//! taker of another uid.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::*;

fn worker(args: &[&str], log: &Path) -> Child {
    Command::new(bin("seqnum-worker"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("starting seqnum-worker")
}

fn start_first(dir: &TempDir, extra: &[&str]) -> (Reaper, u16, std::path::PathBuf) {
    let port = free_port();
    let sock = dir.path("takeover.sock");
    let mut args = vec!["-a", "127.0.0.1", "-p"];
    let port_s = port.to_string();
    args.push(&port_s);
    let sock_s = sock.to_str().unwrap().to_owned();
    args.extend(["-t", &sock_s]);
    args.extend(extra);
    let w = worker(&args, &dir.path("w0.log"));
    wait_for_port(port, Duration::from_secs(10));
    wait_for_path(&sock, Duration::from_secs(10));
    (Reaper(w), port, sock)
}

/// Starts `seqnum-worker -T sock`, waits for `old` to exit, and returns the
/// new worker and the old one's exit status.
fn take_over(dir: &TempDir, i: usize, sock: &Path, old: Reaper) -> (Reaper, std::process::ExitStatus) {
    let new = worker(&["-T", sock.to_str().unwrap()], &dir.path(&format!("w{i}.log")));
    let mut old = old;
    let status =
        wait_timeout(&mut old.0, Duration::from_secs(10)).expect("the old worker did not exit after the takeover");
    (Reaper(new), status)
}

#[test]
fn twenty_chained_takeovers_under_load_lose_nothing() {
    let dir = TempDir::new("chain");
    let (mut w, port, sock) = start_first(&dir, &[]);
    // What a worker holds with no connection: stdio, epoll, signalfd, the
    // endpoint, the listener (and whatever the test harness leaks into its
    // children, e.g. cargo's jobserver pipe).
    let baseline = fds_of(w.0.id()).len();
    let load = client(port, &["--connections", "50", "--interval-ms", "0", "--duration", "6", "--timeout-ms", "3000"]);
    wait_until("the first worker holds the 50 connections", Duration::from_secs(5), || {
        socket_count(w.0.id()) == 2 + 50
    });
    for i in 1..=20 {
        let (next, status) = take_over(&dir, i, &sock, w);
        assert!(status.success(), "worker {} exited {status} after handing over", i - 1);
        w = next;
        // The pace of the chain: the clients run between two takeovers.
        std::thread::sleep(Duration::from_millis(100));
    }
    let (out, v) = client_summary(load);
    assert_clean(&out, &v);
    eprintln!("50 connections across 20 takeovers: {v}");

    // The last worker holds exactly what the first one did, plus its live
    // connections: nothing leaked across 20 handoffs.
    let idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let _ = poll_until("the last worker accepts the 5 idle connections", Duration::from_secs(5), || {
        socket_count(w.0.id()) >= 2 + idle.len()
    });
    let fds = fds_of(w.0.id());
    let sockets = fds.iter().filter(|f| f.starts_with("socket:")).count();
    assert_eq!(
        sockets,
        2 + idle.len(),
        "the last worker should hold its listener, its endpoint and {} connections: {fds:?}",
        idle.len()
    );
    assert!(
        fds.len() <= baseline + idle.len(),
        "the last worker holds more fds than the first ({baseline}) plus its connections: {fds:?}"
    );
    drop(idle);

    // New connections after the takeovers are served by the last worker.
    let fresh = client(port, &["--connections", "5", "--count", "20", "--interval-ms", "0"]);
    let (out, v) = client_summary(fresh);
    assert_clean(&out, &v);
    assert_eq!(v.echoed, 100);
    let log = std::fs::read_to_string(dir.path("w20.log")).unwrap();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "the last worker logged trouble:\n{log}");
}

#[test]
fn a_taker_that_dies_before_acking_leaves_the_old_worker_serving() {
    let dir = TempDir::new("rollback");
    let (w, port, sock) = start_first(&dir, &["--ack-timeout-ms", "1000"]);
    let load = client(port, &["--connections", "20", "--interval-ms", "2", "--duration", "3", "--timeout-ms", "3000"]);
    wait_until("the worker holds the 20 connections", Duration::from_secs(5), || socket_count(w.0.id()) == 2 + 20);
    let rollbacks = || {
        std::fs::read_to_string(dir.path("w0.log"))
            .unwrap_or_default()
            .matches("handoff failed, resuming service")
            .count()
    };

    // A taker that receives every fd, then dies without a word.
    let chan = takeover::connect(&sock).unwrap();
    let deadline = Some(Instant::now() + Duration::from_secs(5));
    takeover::hello(chan.as_fd(), deadline).unwrap();
    let got = takeover::receive(chan.as_fd(), &takeover::Limits { max_fds: 10_000 }, deadline).unwrap();
    assert!(got.taken.len() >= 21, "expected the listener and 20 connections, got {}", got.taken.len());
    drop(got);
    drop(chan);
    wait_until("the worker resumes after the dead taker", Duration::from_secs(5), || rollbacks() == 1);

    // A taker that says nothing after its hello until the giver gives up.
    let chan = takeover::connect(&sock).unwrap();
    takeover::hello(chan.as_fd(), deadline).unwrap();
    let got = takeover::receive(chan.as_fd(), &takeover::Limits { max_fds: 10_000 }, deadline).unwrap();
    wait_until("the worker gives up on the silent taker and resumes", Duration::from_secs(5), || rollbacks() == 2);
    // Too late: the giver resumed, so our ack gets no commit and we must not serve.
    let late = takeover::ack(chan.as_fd(), Some(Instant::now() + Duration::from_secs(2)));
    assert!(late.is_err(), "a late ack must not be committed");
    drop(got);

    let (out, v) = client_summary(load);
    assert_clean(&out, &v);
    let mut w = w;
    assert!(w.0.try_wait().unwrap().is_none(), "the old worker must still be running");
    let log = std::fs::read_to_string(dir.path("w0.log")).unwrap();
    assert!(log.contains("handoff failed, resuming service"), "no rollback logged:\n{log}");
    // And a real takeover still works afterwards.
    let (w2, status) = take_over(&dir, 1, &sock, w);
    assert!(status.success());
    let c = client(port, &["--connections", "3", "--count", "10", "--interval-ms", "0"]);
    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
    drop(w2);
}

#[test]
fn a_message_split_across_a_takeover_is_echoed_whole_by_the_new_worker() {
    let dir = TempDir::new("partial");
    let (w, port, sock) = start_first(&dir, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4];
    for n in 0u32..3 {
        s.write_all(&n.to_be_bytes()).unwrap();
        s.read_exact(&mut buf).unwrap();
        assert_eq!(u32::from_be_bytes(buf), n);
    }
    let msg = 3u32.to_be_bytes();
    s.write_all(&msg[..2]).unwrap();
    // Time for the old worker to read the half message, the case under
    // test (were it still in the socket buffer, the new worker would read
    // it, and the test would pass all the same): no state shows it.
    std::thread::sleep(Duration::from_millis(100));
    let (w2, status) = take_over(&dir, 1, &sock, w);
    assert!(status.success());
    s.write_all(&msg[2..]).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg, "the new worker echoes the whole message");
    s.write_all(&4u32.to_be_bytes()).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(u32::from_be_bytes(buf), 4);
    let log = std::fs::read_to_string(dir.path("w1.log")).unwrap();
    assert!(!log.contains("discontinuity"), "the new worker saw a discontinuity:\n{log}");
    drop(w2);
}

#[test]
fn a_taker_of_another_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root to start a child as nobody");
    }
    let dir = TempDir::new("perm");
    // nobody must be able to reach the socket file for the SO_PEERCRED check
    // to be what refuses it, so open the directory and the file up.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (w, port, sock) = start_first(&dir, &[]);
    let run_as_nobody = || {
        Command::new(bin("seqnum-worker"))
            .args(["-T", sock.to_str().unwrap(), "--ack-timeout-ms", "2000"])
            .uid(65534)
            .gid(65534)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // The socket file is 0600: nobody cannot even connect.
    let out = run_as_nobody();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ermission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With the file opened up, the giver's credential check refuses it.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = run_as_nobody();
    assert!(!out.status.success(), "a taker of another uid must fail");
    let log = || std::fs::read_to_string(dir.path("w0.log")).unwrap_or_default();
    let _ = poll_until("the worker logs the refusal", Duration::from_secs(5), || log().contains("refused a takeover"));
    let log = log();
    assert!(log.contains("refused a takeover") && log.contains("uid 65534"), "refusal not logged with the uid:\n{log}");
    // The worker still serves.
    let c = client(port, &["--connections", "2", "--count", "5", "--interval-ms", "0"]);
    let (out, v) = client_summary(c);
    assert_clean(&out, &v);
    drop(w);
}
