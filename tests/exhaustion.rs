//! File-descriptor exhaustion of a standalone `seqnum-worker`, started under
//! `prlimit --nofile=40:40`: 100 clients connect, each sends seqnum 0. The
//! worker accepts until it runs out of fds; the rest wait in the listen
//! backlog. It must then keep serving what it accepted, not spin (its CPU
//! time over 2 s of this state stays small: a 100 ms retry, not a busy
//! loop), log the accept failure once per burst (not once per retry), and
//! accept the waiting connections as soon as fds are freed. When every
//! client is gone its fd count is back to where it started.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::*;

/// `RLIMIT_NOFILE` of the worker (soft and hard).
const LIMIT: usize = 40;
const CONNS: usize = 100;
const WARNING: &str = "accept failed";

/// One client connection and what it has been echoed so far.
struct Client {
    s: Option<TcpStream>,
    /// Seqnum of the message in flight (sent, echo not yet read).
    inflight: u32,
    /// Bytes of the in-flight echo read so far.
    got: Vec<u8>,
    /// Whether the worker has accepted it (it echoed message 0).
    accepted: bool,
}

impl Client {
    fn stream(&mut self) -> &mut TcpStream {
        self.s.as_mut().expect("an open connection")
    }

    /// Reads what is there of the in-flight echo without blocking; true once
    /// it is complete (and equal to what was sent).
    fn poll_echo(&mut self) -> bool {
        let want = self.inflight.to_be_bytes();
        while self.got.len() < 4 {
            let mut buf = [0u8; 4];
            let n = 4 - self.got.len();
            match self.stream().read(&mut buf[..n]) {
                Ok(0) => panic!("the worker closed a connection (echo of {} pending)", self.inflight),
                Ok(k) => self.got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) => panic!("reading an echo: {e}"),
            }
        }
        assert_eq!(self.got, want, "wrong echo");
        true
    }

    /// One more message, echo awaited (blocking, with a deadline).
    fn round_trip(&mut self) {
        let n = self.inflight + 1;
        let s = self.stream();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&n.to_be_bytes()).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap_or_else(|e| panic!("no echo of {n} on an accepted connection: {e}"));
        assert_eq!(u32::from_be_bytes(buf), n);
        s.set_nonblocking(true).unwrap();
        self.inflight = n;
    }
}

/// fds of `pid`, by number.
fn warnings(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains(WARNING)).count()
}

/// Polls every connection whose message 0 is not echoed yet until `want`
/// more are, then for 300 ms more to make sure no more than that are.
/// Returns the indexes that were newly accepted.
fn collect_accepted(clients: &mut [Client], want: usize, timeout: Duration) -> Vec<usize> {
    let mut newly = Vec::new();
    let t0 = Instant::now();
    let mut done_at: Option<Instant> = None;
    loop {
        for (i, c) in clients.iter_mut().enumerate() {
            if !c.accepted && c.s.is_some() && c.poll_echo() {
                c.accepted = true;
                newly.push(i);
            }
        }
        if newly.len() >= want && done_at.is_none() {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|t| t.elapsed() > Duration::from_millis(300)) {
            return newly;
        }
        assert!(
            t0.elapsed() < timeout,
            "only {} connections were accepted and echoed within {timeout:?}, expected {want}",
            newly.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fd_exhaustion_neither_spins_nor_floods_the_log_and_recovers() {
    let dir = TempDir::new("exhaustion");
    let port = free_port();
    let log = dir.path("worker.log");
    let limit = format!("--nofile={LIMIT}:{LIMIT}");
    let w = Command::new("prlimit")
        .arg(&limit)
        .arg(bin("seqnum-worker"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting prlimit (util-linux)");
    let mut w = Reaper(w);
    // prlimit sets the limit on itself and execs the worker: same pid.
    let pid = w.0.id();
    wait_for_port(port, Duration::from_secs(10));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
    assert!(
        nofile.split_whitespace().nth(3) == Some("40") && nofile.split_whitespace().nth(4) == Some("40"),
        "the worker does not run under the fd limit: {nofile}"
    );
    // The connection wait_for_port made is closed again.
    settled_fd_count(pid);
    let start_fds = fd_numbers(pid);
    // accept(2) needs a free fd *number* below the limit.
    let low = start_fds.iter().filter(|&&n| n < LIMIT).count();
    let capacity = LIMIT - low;
    eprintln!(
        "worker pid {pid}: {} fds at start ({low} below {LIMIT}): room for {capacity} connections",
        start_fds.len()
    );

    let mut clients: Vec<Client> = (0..CONNS)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect (the backlog takes them all)");
            s.set_nodelay(true).unwrap();
            s.write_all(&0u32.to_be_bytes()).unwrap();
            s.set_nonblocking(true).unwrap();
            Client { s: Some(s), inflight: 0, got: Vec::new(), accepted: false }
        })
        .collect();

    // Exactly as many as there are fds get accepted and echoed.
    let first = collect_accepted(&mut clients, capacity, Duration::from_secs(10));
    eprintln!("accepted and echoed: {} of {CONNS}; waiting in the backlog: {}", first.len(), CONNS - first.len());
    assert_eq!(first.len(), capacity, "accepted connections vs free fds");
    assert!(alive(pid), "the worker died when it ran out of fds:\n{}", std::fs::read_to_string(&log).unwrap());
    assert!(warnings(&log) >= 1, "no accept warning logged:\n{}", std::fs::read_to_string(&log).unwrap());

    // Two seconds of this state: no spinning, no log flood.
    let hz = clk_tck();
    let cpu = || cpu_ticks(pid).expect("the worker runs");
    let (cpu0, warn0, t0) = (cpu(), warnings(&log), Instant::now());
    // The thing under test: two seconds of exhaustion.
    std::thread::sleep(Duration::from_secs(2));
    let (cpu1, warn1, wall) = (cpu(), warnings(&log), t0.elapsed());
    let cpu_s = (cpu1 - cpu0) as f64 / hz as f64;
    eprintln!(
        "exhausted for {:.2} s: worker CPU {cpu_s:.3} s, accept warnings logged meanwhile: {}",
        wall.as_secs_f64(),
        warn1 - warn0
    );
    assert!(alive(pid), "the worker died while out of fds");
    assert!(
        cpu_s < 0.5,
        "the worker used {cpu_s:.3} s of CPU in {:.2} s while out of fds: it spins instead of retrying every 100 ms",
        wall.as_secs_f64()
    );

    // What was accepted is still served.
    for round in 0..5 {
        for &i in &first {
            clients[i].round_trip();
        }
        if round == 0 {
            eprintln!("the {} accepted connections are served while the worker is out of fds", first.len());
        }
    }

    // Free fds by closing the accepted connections: the waiting ones are
    // accepted, their queued message 0 echoed, and they are served too.
    let mut rounds = 0;
    let mut echoed = first.len();
    while echoed < CONNS {
        rounds += 1;
        let open: Vec<usize> = (0..CONNS).filter(|&i| clients[i].accepted && clients[i].s.is_some()).collect();
        for &i in &open {
            clients[i].s = None;
        }
        let waiting = CONNS - echoed;
        let want = open.len().min(waiting);
        let newly = collect_accepted(&mut clients, want, Duration::from_secs(10));
        assert_eq!(newly.len(), want, "round {rounds}: closing {} connections let {} in", open.len(), newly.len());
        for &i in &newly {
            clients[i].round_trip();
        }
        echoed += newly.len();
        eprintln!("round {rounds}: closed {}, accepted {} more ({echoed} of {CONNS} echoed)", open.len(), newly.len());
    }
    assert!(alive(pid));

    // Everything closed: the worker holds what it held at the start.
    drop(clients);
    let mut now_fds = Vec::new();
    let settled = poll_until("the worker is back to its fds of the start", Duration::from_secs(5), || {
        now_fds = fd_numbers(pid);
        now_fds.len() == start_fds.len()
    })
    .is_ok();
    let text = std::fs::read_to_string(&log).unwrap();
    let total = warnings(&log);
    eprintln!("fds: {} at start, {} at the end; accept warnings in all: {total}", start_fds.len(), now_fds.len());
    assert!(settled, "the worker leaked fds: {} at start, {} now: {:?}", start_fds.len(), now_fds.len(), fds_of(pid));
    assert!(
        total < 10,
        "the accept warning was logged {total} times: once per retry, not once per burst\n{}",
        text.lines().filter(|l| l.contains(WARNING)).take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(!text.contains("ERROR"), "the worker logged an error:\n{text}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_timeout(&mut w.0, Duration::from_secs(5)).expect("the worker did not stop on SIGTERM");
    assert!(status.success(), "the worker exited {status}");
    wait_until("the worker is gone", Duration::from_secs(2), || !alive(pid));
}
