//! The single-threaded mio event loop that drives every connection.
//!
//! Work per event is O(1). Timers: sends after `--interval-ms` go into a
//! FIFO (the interval is constant, so deadlines are pushed in order); echo
//! and connect deadlines go into a min-heap holding at most one entry per
//! connection, re-armed lazily when it fires early (the connection has
//! sent again since), so a fast connection costs no heap work per message.
//!
//! With churn (`--churn-messages K`) a connection that has its K-th echo
//! closes cleanly and a new one takes its slot (and its token) at once; so
//! does one that fails after connecting.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};
use tracing::warn;

use super::conn::{Conn, ConnectStep, ReadStep, State};
use super::histogram::Histogram;
use super::monitor::{ErrorLog, Progress, Timeline};
use super::report::{Counters, ErrorKind};

/// What the driver needs from the arguments.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) target: SocketAddr,
    pub(crate) connections: usize,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) ramp: Duration,
    pub(crate) count: Option<u64>,
    /// `--churn-messages`: replace each connection after this many echoes.
    pub(crate) churn: Option<u64>,
    pub(crate) duration: Option<Duration>,
    /// Spread connections over 127.0.0.1..=127.0.0.N (1 = no binding).
    pub(crate) source_addresses: u32,
}

impl Config {
    /// The source address of connection `i`, when spreading over several.
    fn source(&self, i: usize) -> Option<std::net::IpAddr> {
        match self.target {
            SocketAddr::V4(t) if t.ip().is_loopback() && self.source_addresses > 1 => {
                let n = (i % self.source_addresses as usize) as u32 + 1;
                Some(std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 0, 0, 0)) + n).into())
            }
            _ => None,
        }
    }
}

/// What a finished run measured.
pub(crate) struct Outcome {
    pub(crate) counters: Counters,
    pub(crate) latency: Histogram,
    pub(crate) elapsed: Duration,
}

pub(crate) struct Driver {
    cfg: Config,
    registry: Registry,
    conns: Vec<Conn>,
    start: Instant,
    /// End of the sending phase, for `--duration`.
    end: Option<Instant>,
    stopping: bool,
    /// Next connection to start.
    next_connect: usize,
    /// Connections not closed yet (including those not started).
    active: usize,
    /// Connections established and not closed.
    live: usize,
    sends: VecDeque<(Instant, usize)>,
    deadlines: BinaryHeap<Reverse<(Instant, usize)>>,
    counters: Counters,
    latency: Histogram,
    errlog: ErrorLog,
    timeline: Option<Timeline>,
    progress: Option<Progress>,
}

impl Driver {
    pub(crate) fn new(cfg: Config, registry: Registry, timeline: Option<Timeline>, show_progress: bool) -> Self {
        let start = Instant::now();
        Driver {
            conns: (0..cfg.connections).map(|_| Conn::new(start)).collect(),
            end: cfg.duration.map(|d| start + d),
            active: cfg.connections,
            cfg,
            registry,
            start,
            stopping: false,
            next_connect: 0,
            live: 0,
            sends: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            counters: Counters::default(),
            latency: Histogram::new(),
            errlog: ErrorLog::default(),
            timeline,
            progress: show_progress.then(|| Progress::new(start)),
        }
    }

    /// Runs until every connection is closed.
    pub(crate) fn run(mut self, poll: &mut Poll) -> io::Result<Outcome> {
        let mut events = Events::with_capacity(4096);
        loop {
            let now = Instant::now();
            self.start_connects(now);
            if let Some(end) = self.end {
                if !self.stopping && now >= end {
                    self.stop();
                }
            }
            self.fire_timers(now);
            self.tick(now);
            if self.active == 0 {
                break;
            }
            let wait = self.next_wakeup().map(|t| t.saturating_duration_since(now));
            if let Err(e) = poll.poll(&mut events, wait) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                let i = ev.token().0;
                if i >= self.conns.len() {
                    continue;
                }
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                self.on_event(i, ev.is_writable(), readable);
            }
        }
        let elapsed = self.start.elapsed();
        if let Some(p) = self.progress.as_mut() {
            p.clear();
        }
        if let Some(t) = self.timeline.as_mut() {
            if let Err(e) = t.finish(elapsed) {
                warn!("writing the timeline: {e}");
            }
        }
        self.errlog.finish();
        Ok(Outcome { counters: self.counters, latency: self.latency, elapsed })
    }

    /// When the loop must wake up at the latest.
    fn next_wakeup(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(&(due, _)) = self.sends.front() {
            at(due);
        }
        if let Some(Reverse((due, _))) = self.deadlines.peek() {
            at(*due);
        }
        if !self.stopping {
            if self.next_connect < self.conns.len() {
                at(self.connect_due(self.next_connect));
            }
            if let Some(end) = self.end {
                at(end);
            }
        }
        if let Some(p) = &self.progress {
            at(p.next());
        }
        if let Some(tl) = &self.timeline {
            at(self.start + tl.next_boundary());
        }
        t
    }

    /// When connection `i` is due to connect, spread over the ramp.
    fn connect_due(&self, i: usize) -> Instant {
        let n = self.conns.len() as u128;
        let offset = self.cfg.ramp.as_nanos() * i as u128 / n;
        self.start + Duration::from_nanos(offset as u64)
    }

    fn start_connects(&mut self, now: Instant) {
        while !self.stopping && self.next_connect < self.conns.len() && self.connect_due(self.next_connect) <= now {
            let i = self.next_connect;
            self.next_connect += 1;
            self.connect(i);
        }
    }

    fn connect(&mut self, i: usize) {
        let now = Instant::now();
        let source = self.cfg.source(i);
        let mut stream = match connect_from(source, self.cfg.target) {
            Ok(s) => s,
            Err(e) => return self.fail(i, ErrorKind::Connect, connect_detail(&e)),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self.registry.register(&mut stream, Token(i), interest) {
            return self.fail(i, ErrorKind::Connect, format!("registering with epoll: {e}"));
        }
        let c = &mut self.conns[i];
        c.stream = Some(stream);
        c.state = State::Connecting;
        c.since = now;
        self.arm_deadline(i, now);
    }

    fn arm_deadline(&mut self, i: usize, since: Instant) {
        let c = &mut self.conns[i];
        if !c.timeout_armed {
            c.timeout_armed = true;
            self.deadlines.push(Reverse((since + self.cfg.timeout, i)));
        }
    }

    fn on_event(&mut self, i: usize, writable: bool, readable: bool) {
        match self.conns[i].state {
            State::Connecting => match self.conns[i].check_connect() {
                ConnectStep::Pending => {}
                ConnectStep::Failed(e) => self.fail(i, ErrorKind::Connect, connect_detail(&e)),
                ConnectStep::Connected => {
                    self.live += 1;
                    self.counters.connects += 1;
                    if let Some(s) = &self.conns[i].stream {
                        let _ = s.set_nodelay(true);
                    }
                    self.send(i);
                    // The edge may also have carried data or an EOF.
                    self.drain(i);
                }
            },
            State::InFlight | State::Idle => {
                if writable && self.conns[i].state == State::InFlight {
                    if let Err(e) = self.conns[i].flush() {
                        return self.fail(i, ErrorKind::Reset, format!("write: {e}"));
                    }
                }
                if readable {
                    self.drain(i);
                }
            }
            State::Pending | State::Closed => {}
        }
    }

    /// Begins sending the next seqnum on connection `i`.
    fn send(&mut self, i: usize) {
        let now = Instant::now();
        self.conns[i].begin_send(now);
        self.counters.sent += 1;
        self.arm_deadline(i, now);
        if let Err(e) = self.conns[i].flush() {
            self.fail(i, ErrorKind::Reset, format!("write: {e}"));
        }
    }

    /// Reads everything available on connection `i` (edge-triggered: until
    /// `WouldBlock`); sends the next message at the end if it is due now.
    fn drain(&mut self, i: usize) {
        let mut send_next = false;
        loop {
            if !self.conns[i].is_established() {
                return;
            }
            match self.conns[i].read_step() {
                ReadStep::WouldBlock => break,
                ReadStep::Echo { value, early } => send_next = self.on_echo(i, value, early),
                ReadStep::Eof => {
                    return self.fail(i, ErrorKind::Eof, "the server closed the connection");
                }
                ReadStep::Unexpected(n) => {
                    let msg = format!("{n} unexpected byte(s) with no message in flight");
                    return self.fail(i, ErrorKind::Discontinuity, msg);
                }
                ReadStep::Failed(e) => return self.fail(i, ErrorKind::Reset, format!("read: {e}")),
            }
        }
        if send_next && self.conns[i].state == State::Idle {
            self.send(i);
        }
    }

    /// A complete echo arrived; true if the next message should go at once.
    fn on_echo(&mut self, i: usize, value: u32, early: bool) -> bool {
        let now = Instant::now();
        let c = &mut self.conns[i];
        if early || value != c.seq {
            let sent = c.seq;
            let msg = if early {
                format!("echo {value} arrived before seqnum {sent} was fully sent")
            } else {
                format!("echo {value} != seqnum sent {sent}")
            };
            self.fail(i, ErrorKind::Discontinuity, msg);
            return false;
        }
        let us = now.duration_since(c.since).as_micros() as u64;
        c.seq = c.seq.wrapping_add(1);
        c.state = State::Idle;
        let done = self.cfg.count.is_some_and(|k| c.sent >= k);
        let churned = self.cfg.churn.is_some_and(|k| c.sent >= k);
        self.counters.echoed += 1;
        self.latency.record(us);
        if let Some(p) = self.progress.as_mut() {
            p.echo(us);
        }
        if let Some(t) = self.timeline.as_mut() {
            if let Err(e) = t.echo(now.duration_since(self.start), us) {
                self.timeline_failed(e);
            }
        }
        if done || self.stopping {
            self.close(i, true);
            false
        } else if churned {
            self.close(i, true);
            self.replace(i);
            false
        } else if self.cfg.interval.is_zero() {
            true
        } else {
            self.sends.push_back((now + self.cfg.interval, i));
            false
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&(due, i)) = self.sends.front() {
            if due > now {
                break;
            }
            self.sends.pop_front();
            if self.conns[i].state == State::Idle && !self.stopping {
                self.send(i);
            }
        }
        while let Some(&Reverse((due, i))) = self.deadlines.peek() {
            if due > now {
                break;
            }
            self.deadlines.pop();
            let c = &mut self.conns[i];
            c.timeout_armed = false;
            let (kind, what) = match c.state {
                State::Connecting => (ErrorKind::Connect, "connect did not complete"),
                State::InFlight => (ErrorKind::Timeout, "no echo"),
                State::Pending | State::Idle | State::Closed => continue,
            };
            let real = c.since + self.cfg.timeout;
            if real > now {
                // Sent again since this deadline was armed.
                c.timeout_armed = true;
                self.deadlines.push(Reverse((real, i)));
            } else {
                let ms = self.cfg.timeout.as_millis();
                self.fail(i, kind, format!("{what} within {ms} ms"));
            }
        }
    }

    /// End of `--duration`: stop sending and close what is not in flight.
    fn stop(&mut self) {
        self.stopping = true;
        self.next_connect = self.conns.len();
        for i in 0..self.conns.len() {
            match self.conns[i].state {
                State::Pending | State::Connecting => self.close(i, false),
                State::Idle => self.close(i, true),
                State::InFlight | State::Closed => {}
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.start);
        if let Some(t) = self.timeline.as_mut() {
            if let Err(e) = t.roll(elapsed) {
                self.timeline_failed(e);
            }
        }
        if let Some(p) = self.progress.as_mut() {
            p.tick(now, elapsed, self.live, self.counters.errors());
        }
    }

    fn timeline_failed(&mut self, e: io::Error) {
        warn!("writing the timeline failed, no more rows: {e}");
        self.timeline = None;
    }

    /// Closes connection `i` for good.
    fn close(&mut self, i: usize, clean: bool) {
        let c = &mut self.conns[i];
        if c.state == State::Closed {
            return;
        }
        if c.is_established() {
            self.live -= 1;
        }
        c.close(&self.registry, clean);
        self.active -= 1;
    }

    /// Churn: a new connection in the slot of connection `i`, which was
    /// just closed cleanly; it connects at once.
    fn replace(&mut self, i: usize) {
        let now = Instant::now();
        // A deadline of the old connection may still sit in the heap: keep
        // the flag that says so, and that entry re-arms itself lazily for the
        // new one (see `fire_timers`), so the heap keeps one entry per slot.
        let armed = self.conns[i].timeout_armed;
        self.conns[i] = Conn::new(now);
        self.conns[i].timeout_armed = armed;
        self.active += 1;
        self.connect(i);
    }

    /// Records an error on connection `i`, logs it (rate-limited) and
    /// closes the connection. With churn, a connection that had connected
    /// is replaced, as after a clean close (a failed connect is not, so that
    /// a refused port does not spin).
    fn fail(&mut self, i: usize, kind: ErrorKind, detail: impl Display) {
        self.counters.add_error(kind);
        let now = Instant::now();
        if let Some(t) = self.timeline.as_mut() {
            if let Err(e) = t.error(now.duration_since(self.start)) {
                self.timeline_failed(e);
            }
        }
        if self.errlog.admit() {
            if let Some(p) = self.progress.as_mut() {
                p.clear();
            }
            let c = &self.conns[i];
            let local = c.stream.as_ref().and_then(|s| s.local_addr().ok());
            let local = local.map_or_else(|| "-".to_string(), |a| a.to_string());
            warn!(
                conn = i,
                peer = %self.cfg.target,
                local = %local,
                seq = c.seq,
                sent = c.sent,
                "{kind}: {detail}"
            );
        }
        let established = self.conns[i].is_established();
        self.close(i, false);
        if self.cfg.churn.is_some() && established && !self.stopping {
            self.replace(i);
        }
    }
}

/// A non-blocking connect, from `source` when given (bind before connect,
/// to use more than one loopback source address). `IP_BIND_ADDRESS_NO_PORT`
/// leaves the choice of the port to `connect`, which only needs the whole
/// 4-tuple to be unique: a bound port would have to be free for every
/// destination, and TIME_WAITs of earlier runs would run the range out.
fn connect_from(source: Option<std::net::IpAddr>, target: std::net::SocketAddr) -> io::Result<TcpStream> {
    let Some(source) = source else { return TcpStream::connect(target) };
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if target.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    socket::setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
    use std::os::fd::AsRawFd;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(std::net::SocketAddr::new(source, 0)))?;
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(target)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(fd)))
}

/// A connect error, with a hint for the usual resource limits.
fn connect_detail(e: &io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(24) | Some(23) => " (raise the open-file limit: ulimit -n)",
        Some(99) => " (out of ephemeral ports for this source address)",
        _ => "",
    };
    format!("connect: {e}{hint}")
}
