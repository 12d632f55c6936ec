//! Hostile clients beside well-behaved ones, across a reload.
//!
//! takeoverd serves 100 well-behaved `seqnum-client` connections (one
//! seqnum every 5 ms) beside 1 000 hostile connections made here: 500 that
//! send half a message and then nothing, and 500 that send a stream of
//! seqnums and never read, so that the echoes pile up in the kernel. Of
//! those, every 25th pushes until its writes block: its receive buffer, the
//! worker's send buffer, the worker's receive buffer and its own send buffer
//! are all full, and the worker has stopped consuming it. A `ctl reload`
//! in the middle must succeed, the well-behaved client must see no error,
//! and afterwards every hostile connection must find its state intact in
//! the new worker: a half message is completed and echoed whole, and a
//! never-reader reads back exactly the bytes it sent, in order (nothing
//! lost, nothing echoed twice), then does one more round trip.
//!
//! The test holds over 1 000 sockets: it raises its own `RLIMIT_NOFILE`,
//! which is why it is alone in its file.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::*;

const HALF: usize = 500;
const NEVER_READERS: usize = 500;
/// What each never-reader sends.
const STREAM: usize = 256 * 1024;
/// Every HEAVY_EVERY-th never-reader pushes until its writes block, up to
/// HEAVY_CAP bytes.
const HEAVY_EVERY: usize = 25;
const HEAVY_CAP: usize = 32 * 1024 * 1024;

fn raise_nofile() {
    let hard = takeover::raise_fd_limit().expect("raising RLIMIT_NOFILE");
    assert!(hard >= 2000, "this test needs RLIMIT_NOFILE of at least 2000, the hard limit is {hard}");
}

/// The byte stream of a seqnum client: 0, 1, 2, ... as 4-byte big-endian.
fn seqnum_stream(bytes: usize) -> Vec<u8> {
    (0..bytes / 4).flat_map(|n| (n as u32).to_be_bytes()).collect()
}

/// A never-reader: what it has written so far and what it means to write.
struct NeverReader {
    s: TcpStream,
    sent: usize,
    target: usize,
    heavy: bool,
}

impl NeverReader {
    /// Writes without blocking; returns the bytes written.
    fn push(&mut self, stream: &[u8]) -> usize {
        let before = self.sent;
        while self.sent < self.target {
            match self.s.write(&stream[self.sent..self.target]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("a never-reader's write failed: {e}"),
            }
        }
        self.sent - before
    }
}

/// Nothing more than what was read is waiting on `s`.
fn nothing_more(s: &mut TcpStream, what: &str) {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok(n) => panic!("{what}: {n} unexpected bytes after the echo: {:?}", &b[..n]),
        Err(e) => panic!("{what}: {e}"),
    }
}

#[test]
fn hostile_clients_hurt_nobody_and_keep_their_state_across_a_reload() {
    raise_nofile();
    let dir = TempDir::new("hostile");
    let Takeoverd { proc: mut d, pid: dpid, port, sock, log } = Takeoverd::start(&dir, &[], &[]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the probe connection is gone", Duration::from_secs(5), || ctl_status(&sock).connections == 0);
    // The least of a few reads: takeoverd may not have closed the last ctl
    // connection yet.
    let fds_before = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            fds_of(dpid).len()
        })
        .min()
        .unwrap();
    let well_behaved = ["--connections", "100", "--interval-ms", "5", "--timeout-ms", "5000"];

    // The same well-behaved load alone, for comparison.
    let (out, alone) = client_summary(client(port, &[&well_behaved[..], &["--duration", "3"]].concat()));
    assert_clean(&out, &alone);

    // 500 connections that send half a message: its first 2 bytes.
    let t0 = Instant::now();
    let mut halves: Vec<TcpStream> = (0..HALF)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&(i as u32).to_be_bytes()[..2]).unwrap();
            s
        })
        .collect();
    // 500 that send seqnums and never read.
    let stream = seqnum_stream(HEAVY_CAP);
    let mut readers: Vec<NeverReader> = (0..NEVER_READERS)
        .map(|i| {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_nonblocking(true).unwrap();
            let heavy = i % HEAVY_EVERY == 0;
            NeverReader { s, sent: 0, target: if heavy { HEAVY_CAP } else { STREAM }, heavy }
        })
        .collect();
    // Push until nothing moves any more: everything sent, or every buffer
    // on the way full, and the worker done with what it could echo (idle).
    let worker = || ctl_status(&sock).worker_pid;
    let first_worker = worker();
    let mut quiet_rounds = 0;
    let mut cpu = None;
    while quiet_rounds < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "the hostile connections did not settle within 40 s (the worker is still busy)"
        );
        let moved: usize = readers.iter_mut().map(|r| r.push(&stream)).sum();
        std::thread::sleep(Duration::from_millis(100));
        let now = worker().and_then(|pid| Some((pid, cpu_ticks(pid)?)));
        quiet_rounds = if moved == 0 && now.is_some() && now == cpu { quiet_rounds + 1 } else { 0 };
        cpu = now;
    }
    assert_eq!(
        worker(),
        first_worker,
        "takeoverd replaced its worker while the hostile connections were flooding it:\n{}",
        log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let heavy_blocked = readers.iter().filter(|r| r.heavy && r.sent < r.target).count();
    for r in readers.iter_mut().filter(|r| r.heavy) {
        // A heavy one stops at the end of the message it was in.
        r.target = r.sent.div_ceil(4) * 4;
    }
    let pushed: usize = readers.iter().map(|r| r.sent).sum();
    let heavy: Vec<usize> = readers.iter().filter(|r| r.heavy).map(|r| r.sent).collect();
    let light_pending = readers.iter().filter(|r| !r.heavy && r.sent < r.target).count();
    eprintln!(
        "hostile: {HALF} half-message connections, {NEVER_READERS} never-readers holding {:.1} MiB in flight \
         ({} of {} light ones could not send all {} KiB; {heavy_blocked} of {} heavy ones blocked, after {:.1}..{:.1} MiB) in {:.1} s",
        pushed as f64 / (1 << 20) as f64,
        light_pending,
        NEVER_READERS - heavy.len(),
        STREAM / 1024,
        heavy.len(),
        heavy.iter().min().copied().unwrap_or(0) as f64 / (1 << 20) as f64,
        heavy.iter().max().copied().unwrap_or(0) as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    assert!(heavy_blocked > 0, "no never-reader filled its buffers: the worker was never kept from writing");
    wait_until("takeoverd holds every hostile connection", Duration::from_secs(10), || {
        ctl_status(&sock).connections == HALF + NEVER_READERS
    });

    // The well-behaved load beside them, with a reload in the middle.
    let load = client(port, &[&well_behaved[..], &["--duration", "6"]].concat());
    // The reload comes in the middle of the 6 s run (the thing measured).
    std::thread::sleep(Duration::from_secs(3));
    let mut reload = Command::new(bin("takeoverd"))
        .args(["ctl", "--control-socket"])
        .arg(&sock)
        .args(["reload", "--timeout-s", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rs = wait_timeout(&mut reload, Duration::from_secs(40)).expect("ctl reload hung past its own timeout");
    let mut reload_out = String::new();
    reload.stdout.take().unwrap().read_to_string(&mut reload_out).unwrap();
    reload.stderr.take().unwrap().read_to_string(&mut reload_out).unwrap();
    assert!(rs.success(), "the reload failed ({rs}): {reload_out}\n{}", log_text());
    let (out, beside) = client_summary(load);
    assert_clean(&out, &beside);
    let st = ctl_status(&sock);
    let rec = st.reloads.last().expect("the reload is recorded");
    eprintln!(
        "reload with {} connections: handoff {:.1} ms, clients paused {:?} ms",
        rec.connections, rec.handoff_ms, rec.pause_ms
    );
    let ms = |us: u64| us as f64 / 1e3;
    eprintln!(
        "well-behaved client, 100 connections: alone p99 {:.2} ms max {:.2} ms ({} echoes); \
         beside 1 000 hostile ones and a reload p99 {:.2} ms max {:.2} ms ({} echoes)",
        ms(alone.latency_us.p99),
        ms(alone.latency_us.max),
        alone.echoed,
        ms(beside.latency_us.p99),
        ms(beside.latency_us.max),
        beside.echoed
    );
    wait_until("the well-behaved connections are closed", Duration::from_secs(5), || {
        ctl_status(&sock).connections == HALF + NEVER_READERS
    });

    // Each half message, completed now, is echoed whole by the new worker.
    for (i, s) in halves.iter_mut().enumerate() {
        let msg = (i as u32).to_be_bytes();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&msg[2..]).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap_or_else(|e| panic!("half-message connection {i}: no echo: {e}"));
        assert_eq!(buf, msg, "half-message connection {i}: the echo is not the message");
    }

    // Each never-reader reads back exactly what it sent, then goes on.
    let t1 = Instant::now();
    let mut echoed_bytes = 0;
    for (i, r) in readers.iter_mut().enumerate() {
        r.s.set_nonblocking(false).unwrap();
        r.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = vec![0u8; r.target];
        let mut have = 0;
        let outcome = std::thread::scope(|scope| {
            if r.sent < r.target {
                // What did not fit before goes now, while we read.
                let mut w = r.s.try_clone().unwrap();
                w.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let rest = &stream[r.sent..r.target];
                scope.spawn(move || {
                    let _ = w.write_all(rest);
                });
            }
            while have < r.target {
                match r.s.read(&mut got[have..]) {
                    Ok(0) => return Err("EOF".to_owned()),
                    Ok(n) => have += n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        });
        if let Err(e) = outcome {
            panic!(
                "never-reader {i} ({}): read back only {have} of the {} bytes it sent ({} before the reload) \
                 and then nothing for 10 s ({e}); first never-reader to fail, after {:.1} MiB from the others",
                if r.heavy { "heavy" } else { "light" },
                r.target,
                r.sent,
                echoed_bytes as f64 / (1 << 20) as f64
            );
        }
        if got[..] != stream[..r.target] {
            let at = got.iter().zip(&stream[..r.target]).position(|(a, b)| a != b).unwrap();
            panic!(
                "never-reader {i}: the echo differs from what was sent at byte {at} (seqnum {}): got {:?}, sent {:?}",
                at / 4,
                &got[at / 4 * 4..(at / 4 * 4 + 8).min(r.target)],
                &stream[at / 4 * 4..(at / 4 * 4 + 8).min(r.target)]
            );
        }
        echoed_bytes += r.target;
        let next = ((r.target / 4) as u32).to_be_bytes();
        r.s.write_all(&next).unwrap();
        let mut buf = [0u8; 4];
        r.s.read_exact(&mut buf).unwrap_or_else(|e| panic!("never-reader {i}: no echo of one more message: {e}"));
        assert_eq!(buf, next, "never-reader {i}: one more message");
    }
    eprintln!(
        "never-readers: {:.1} MiB read back intact after the reload in {:.1} s",
        echoed_bytes as f64 / (1 << 20) as f64,
        t1.elapsed().as_secs_f64()
    );
    // Exactly those bytes: nothing echoed twice. A negative, so no state to
    // wait on: give anything extra 200 ms to arrive.
    std::thread::sleep(Duration::from_millis(200));
    for (i, s) in halves.iter_mut().enumerate() {
        nothing_more(s, &format!("half-message connection {i}"));
    }
    for (i, r) in readers.iter_mut().enumerate() {
        nothing_more(&mut r.s, &format!("never-reader {i}"));
    }
    let text = log_text();
    assert!(!text.contains("discontinuity"), "a worker saw a seqnum discontinuity:\n{text}");
    assert!(!text.contains("ERROR"), "takeoverd or a worker logged an error:\n{text}");

    // All gone: takeoverd holds what it held before, the worker only its
    // channel (takeoverd accepts: the worker holds no listener).
    drop(halves);
    drop(readers);
    wait_until("takeoverd drops the closed connections", Duration::from_secs(10), || {
        ctl_status(&sock).connections == 0
    });
    let _ = poll_until("takeoverd is back to its fds of the start", Duration::from_secs(5), || {
        fds_of(dpid).len() == fds_before
    });
    assert_eq!(fds_of(dpid).len(), fds_before, "takeoverd leaked fds: {:?}", fds_of(dpid));
    let wpid = ctl_status(&sock).worker_pid.unwrap();
    wait_until("the worker closes its copies", Duration::from_secs(5), || socket_count(wpid) == 1);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dpid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = wait_timeout(&mut d.0, Duration::from_secs(10)).expect("takeoverd did not stop on SIGTERM");
    assert!(st.success(), "takeoverd exited {st}");
}
