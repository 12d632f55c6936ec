//! The worker's event loop: one thread, one epoll (mio), every socket
//! non-blocking and edge-triggered.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::json;
use slab::Slab;
use takeover::control as v1;
use takeover::{Endpoint, Entry, Kind};

use super::giver::PendingTaker;
use super::supervised::Control;
use crate::echo::{conn_name, EchoConn, End};

const SIGNALS: Token = Token(0);
const ENDPOINT: Token = Token(1);
const CONTROL: Token = Token(2);
const LISTENER_BASE: usize = 16;
pub(super) const TAKER_BASE: usize = 1 << 16;
const CONN_BASE: usize = 1 << 20;

/// Takers that connected but have not said hello yet; more are refused.
pub(super) const MAX_PENDING_TAKERS: usize = 16;

/// Bytes echoed per loop iteration before the loop polls again, so that the
/// control channel (pings), new connections and every other connection get
/// their turn however much a few clients pipeline.
const LOOP_BUDGET: u64 = 1024 * 1024;

pub(super) struct Listener {
    pub(super) name: String,
    pub(super) sock: TcpListener,
    pub(super) addr: SocketAddr,
}

/// What the loop does next.
pub(super) enum Flow {
    Continue,
    Exit(i32),
}

/// A seqnum worker: its sockets and its event loop.
pub struct Worker {
    pub(super) poll: Poll,
    pub(super) listeners: Vec<Listener>,
    pub(super) conns: Slab<EchoConn>,
    scratch: Vec<u8>,
    signals: SignalFd,
    pub(super) endpoint: Option<Endpoint>,
    pub(super) takers: Slab<PendingTaker>,
    /// takeoverd's channel, and which version of it we speak.
    pub(super) control: Option<Control>,
    /// Serving: reading, echoing, accepting. Off before takeoverd says
    /// `serve`, and after it says `stop` or `quiesce`.
    pub(super) serving: bool,
    /// While not serving: whether connection events are remembered (in
    /// `ready`) for when serving starts. Off while a staged worker receives
    /// its connections: its predecessor serves those events.
    pub(super) record: bool,
    /// A `stop` is being answered at the end of this loop turn.
    pub(super) stop_pending: bool,
    /// A `sync` is answered once a loop turn finds no more events waiting.
    pub(super) sync_pending: bool,
    /// The `sync` came in this loop turn: connections registered in it
    /// raised events that only the next turn's poll sees.
    pub(super) sync_fresh: bool,
    /// Staging runs at a low CPU priority until this instant (or `ready`,
    /// whichever comes first), then at nice 0 again.
    pub staging_in_background: Option<Instant>,
    /// Connection keys by socket cookie (connections are named by cookie).
    pub(super) by_cookie: std::collections::HashMap<u64, usize>,
    /// Connections whose echo is waiting for room in the send buffer.
    pub(super) blocked: std::collections::HashSet<usize>,
    /// Connections whose state takeoverd does not know: in the middle of a
    /// message (after a partial echo) now, or since the last report.
    pub(super) mid_message: std::collections::HashSet<usize>,
    accept_retry: Option<Instant>,
    /// accept() is failing (EMFILE...): warn once per burst, not per retry.
    accept_failing: bool,
    /// Connections to serve without waiting for an event: input left after
    /// their budget (round-robin), or events that came while not serving.
    pub(super) ready: std::collections::VecDeque<usize>,
    /// Bytes echoed in this loop iteration.
    spent: u64,
    pub(super) ack_timeout: Duration,
    /// Refused or failed takeover connections, logged at most once a second.
    pub(super) taker_log: takeover::Throttle,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("listeners", &self.listeners.len()).field("conns", &self.conns.len()).finish()
    }
}

impl Worker {
    /// An empty worker with its signal handling in place.
    pub fn new(ack_timeout: Duration) -> io::Result<Worker> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block()?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        let poll = Poll::new()?;
        poll.registry().register(&mut SourceFd(&signals.as_fd().as_raw_fd()), SIGNALS, Interest::READABLE)?;
        Ok(Worker {
            poll,
            listeners: Vec::new(),
            conns: Slab::new(),
            scratch: vec![0u8; 64 * 1024],
            signals,
            endpoint: None,
            takers: Slab::new(),
            control: None,
            serving: true,
            record: true,
            stop_pending: false,
            sync_pending: false,
            sync_fresh: false,
            staging_in_background: None,
            by_cookie: std::collections::HashMap::new(),
            blocked: std::collections::HashSet::new(),
            mid_message: std::collections::HashSet::new(),
            accept_retry: None,
            accept_failing: false,
            ready: std::collections::VecDeque::new(),
            spent: 0,
            ack_timeout,
            taker_log: takeover::Throttle::new(Duration::from_secs(1)),
        })
    }

    /// Serves `l` under `name`.
    pub fn add_listener(&mut self, name: String, l: std::net::TcpListener) -> io::Result<()> {
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let mut sock = TcpListener::from_std(l);
        let token = Token(LISTENER_BASE + self.listeners.len());
        assert!(token.0 < TAKER_BASE, "too many listeners");
        self.poll.registry().register(&mut sock, token, Interest::READABLE)?;
        self.listeners.push(Listener { name, sock, addr });
        Ok(())
    }

    /// Serves `conn`, starting with whatever is already queued on it.
    pub fn add_conn(&mut self, conn: EchoConn) -> io::Result<usize> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let conn = entry.insert(conn);
        let cookie = conn.cookie;
        if let Err(e) = self.poll.registry().register(
            &mut conn.stream,
            Token(CONN_BASE + key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.conns.remove(key);
            return Err(e);
        }
        self.by_cookie.insert(cookie, key);
        Ok(key)
    }

    /// Offers takeovers on `ep`.
    pub fn set_endpoint(&mut self, ep: Endpoint) -> io::Result<()> {
        self.poll.registry().register(&mut SourceFd(&ep.as_fd().as_raw_fd()), ENDPOINT, Interest::READABLE)?;
        tracing::info!(path = %ep.path().display(), "offering takeover");
        self.endpoint = Some(ep);
        Ok(())
    }

    /// Talks to takeoverd from now on: version 1 (we accept and report)
    /// or version 2 (takeoverd assigns, and we serve only once told to).
    pub(super) fn set_control(&mut self, control: Control) -> io::Result<()> {
        let raw = match &control {
            Control::V1(chan) => chan.as_raw_fd(),
            Control::V2(sup) => sup.as_fd().as_raw_fd(),
        };
        self.poll.registry().register(&mut SourceFd(&raw), CONTROL, Interest::READABLE)?;
        if matches!(control, Control::V2(_)) {
            self.serving = false;
            self.record = false;
        }
        self.control = Some(control);
        Ok(())
    }

    /// Number of listeners.
    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// Number of live connections.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Names and addresses of the listeners.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.iter().map(|l| (l.name.clone(), l.addr)).collect()
    }

    /// Runs until the worker stops; returns the exit status.
    pub fn run(&mut self) -> i32 {
        // Sockets adopted at start may have input queued already; epoll
        // reports a socket that is ready when it is registered (even
        // edge-triggered), so the first poll finds them.
        const EVENTS: usize = 1024;
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = if self.stop_pending || self.sync_pending || (!self.ready.is_empty() && self.serving) {
                Some(Duration::ZERO)
            } else {
                self.next_timeout()
            };
            self.spent = 0;
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("epoll failed: {e}");
                return 1;
            }
            // takeoverd's messages first: a stop must not wait behind a
            // batch of connection events (they are remembered, for whoever
            // serves next).
            if events.iter().any(|e| e.token() == CONTROL) {
                if let Flow::Exit(code) = self.on_control() {
                    return code;
                }
            }
            for ev in events.iter() {
                let flow = match ev.token() {
                    SIGNALS => self.on_signals(),
                    ENDPOINT => self.on_endpoint(),
                    CONTROL => Flow::Continue,
                    Token(t) if t >= CONN_BASE => {
                        let key = t - CONN_BASE;
                        if self.serving {
                            self.serve(key, ev.is_read_closed() || ev.is_error());
                        } else if self.record {
                            self.defer(key);
                        }
                        Flow::Continue
                    }
                    Token(t) if t >= TAKER_BASE => self.on_taker(t - TAKER_BASE),
                    Token(t) => {
                        if self.serving {
                            self.accept(t - LISTENER_BASE);
                        }
                        Flow::Continue
                    }
                };
                if let Flow::Exit(code) = flow {
                    return code;
                }
            }
            // A full batch may have left events in the kernel: drain them
            // (remembered after a stop, dropped before a sync) first.
            let drained = events.iter().count() < EVENTS;
            if self.sync_pending && drained && !std::mem::take(&mut self.sync_fresh) {
                self.sync_pending = false;
                if let Flow::Exit(code) = self.report_ready() {
                    return code;
                }
            }
            if self.stop_pending && drained {
                self.stop_pending = false;
                if let Flow::Exit(code) = self.report_stopped() {
                    return code;
                }
            }
            if self.serving {
                for _ in 0..self.ready.len() {
                    if self.spent >= LOOP_BUDGET {
                        break;
                    }
                    let Some(k) = self.ready.pop_front() else { break };
                    if let Some(c) = self.conns.get_mut(k) {
                        c.queued = false;
                    }
                    self.serve(k, false);
                }
            }
            self.expire_takers();
            if self.staging_in_background.is_some_and(|t| Instant::now() >= t) {
                self.leave_background();
            }
            if self.accept_retry.is_some_and(|t| Instant::now() >= t) {
                self.accept_retry = None;
                for i in 0..self.listeners.len() {
                    self.accept(i);
                }
            }
        }
    }

    /// Back to nice 0 after staging in the background.
    pub(super) fn leave_background(&mut self) {
        if self.staging_in_background.take().is_some() {
            if let Err(e) = takeover::priority::foreground() {
                tracing::warn!("could not raise the CPU priority back after staging: {e}");
            }
        }
    }

    /// Remembers that `key` needs serving once we serve.
    pub(super) fn defer(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if !c.queued {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Forgets every remembered event (a staged worker's predecessor served them).
    pub(super) fn forget_deferred(&mut self) {
        for k in self.ready.drain(..) {
            if let Some(c) = self.conns.get_mut(k) {
                c.queued = false;
            }
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let soonest = self
            .takers
            .iter()
            .map(|(_, t)| t.deadline)
            .chain(self.accept_retry)
            .chain(self.staging_in_background)
            .min()?;
        Some(soonest.saturating_duration_since(Instant::now()) + Duration::from_millis(1))
    }

    /// Serves every connection and accepts on every listener: after a
    /// pause, edges that came in meanwhile were consumed without action.
    pub(super) fn poke_all(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.serve(k, false);
        }
        for i in 0..self.listeners.len() {
            self.accept(i);
        }
    }

    fn serve(&mut self, key: usize, read_closed: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if self.spent >= LOOP_BUDGET && !read_closed {
            if !conn.queued {
                conn.queued = true;
                self.ready.push_back(key);
            }
            return;
        }
        let before = conn.consumed();
        let end = conn.serve(&mut self.scratch, read_closed);
        self.spent += conn.consumed() - before;
        let (blocked, mid) = (conn.blocked, conn.phase() != 0);
        if end.is_none() && conn.more && !conn.queued {
            conn.queued = true;
            self.ready.push_back(key);
        }
        // Kept exact, so that a stop reports them without a scan.
        if blocked {
            self.blocked.insert(key);
        } else if !self.blocked.is_empty() {
            self.blocked.remove(&key);
        }
        if mid {
            // Left in the set when back at a boundary: that state is news too.
            self.mid_message.insert(key);
        }
        if let Some(end) = end {
            self.close(key, end);
        }
    }

    pub(super) fn close(&mut self, key: usize, end: End) {
        let mut conn = self.conns.remove(key);
        self.by_cookie.remove(&conn.cookie);
        self.blocked.remove(&key);
        self.mid_message.remove(&key);
        let name = conn_name(conn.cookie);
        match end {
            End::Eof => {
                tracing::debug!(peer = ?conn.peer, %name, "connection closed by the client")
            }
            End::EofMidMessage => {
                tracing::info!(peer = ?conn.peer, %name, "client closed in the middle of a message")
            }
            End::Reset => tracing::info!(peer = ?conn.peer, %name, "connection reset"),
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        // Other processes (takeoverd) may hold a copy: shut down so the
        // client sees the close now, not when the last copy goes.
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        drop(conn);
        let told = match &self.control {
            None => Ok(()),
            Some(Control::V2(sup)) => sup.closed(&name),
            Some(Control::V1(chan)) => {
                let deadline = Some(Instant::now() + self.ack_timeout);
                takeover::manifest::send(chan.as_fd(), &v1::FromWorker::Closed { name }, &[], deadline)
            }
        };
        if let Err(e) = told {
            tracing::warn!("could not tell takeoverd about a closed connection: {e}");
        }
    }

    fn accept(&mut self, i: usize) {
        loop {
            let Some(l) = self.listeners.get(i) else {
                return;
            };
            match l.sock.accept() {
                Ok((stream, peer)) => {
                    self.accept_failing = false;
                    if let Err(e) = self.on_accepted(stream, peer) {
                        tracing::warn!(%peer, "dropping a new connection: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::ConnectionAborted => {
                    continue
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the connection stays in the
                    // backlog. Retry shortly rather than spin; log once per burst.
                    if !self.accept_failing {
                        self.accept_failing = true;
                        tracing::warn!(listener = %l.name, "accept failed: {e}; existing connections are served, retrying every 100 ms");
                    }
                    self.accept_retry = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    fn on_accepted(&mut self, stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
        let conn = EchoConn::accepted(stream, peer)?;
        tracing::debug!(%peer, name = %conn_name(conn.cookie), "accepted");
        if let Some(Control::V1(chan)) = &self.control {
            // takeoverd (channel version 1) keeps a copy of every connection
            // we accept, so that it outlives us. Under version 2 we have no
            // listener: takeoverd accepts.
            let entry = Entry { name: conn_name(conn.cookie), kind: Kind::TcpStream, state: json!({"peer": peer}) };
            let deadline = Some(Instant::now() + self.ack_timeout);
            takeover::manifest::send(chan.as_fd(), &v1::FromWorker::Opened { entry }, &[conn.stream.as_fd()], deadline)
                .map_err(io::Error::other)?;
        }
        self.add_conn(conn)?;
        Ok(())
    }

    /// Handles every queued signal: the signalfd is edge-triggered, so one
    /// wakeup may carry several (a SIGHUP and a SIGTERM sent together).
    fn on_signals(&mut self) -> Flow {
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => {
                    let sig = Signal::try_from(info.ssi_signo as i32).map(|s| s.as_str()).unwrap_or("?");
                    if sig == "SIGHUP" {
                        tracing::info!("SIGHUP: nothing to reload in a worker (use -T to replace it)");
                        continue;
                    }
                    tracing::info!(signal = sig, connections = self.conns.len(), "stopping");
                    if let Some(ep) = &self.endpoint {
                        ep.unlink_if_ours();
                    }
                    return Flow::Exit(0);
                }
                Ok(None) => return Flow::Continue,
                Err(e) => {
                    tracing::error!("reading signals: {e}");
                    return Flow::Exit(1);
                }
            }
        }
    }
}
