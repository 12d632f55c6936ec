//! takeoverd's state machine: it holds every listener and live connection,
//! keeps them in the fd store, and moves them into fresh workers.
//!
//! ```text
//!            start / crash restart (recovered)          reload (SIGHUP, ctl reload)
//!   ┌──────────────────────────────────────┐   ┌──────────────────────────────────────────┐
//!   spawn W ─ hello ─ offer ─ ack ─ commit    spawn W2 ─ hello ─▶ quiesce W1 ─ states ─▶
//!                                              offer W2 ─ ack ─ commit ─▶ exit W1   (ok)
//!                                                         └─ fail ─▶ kill W2, resume W1
//! ```
//! Every step has a deadline; nothing is ever closed until its successor
//! has acked, so a failure at any step leaves the sockets served.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use sd_notify::NotifyState;
use serde_json::value::to_raw_value;
use slab::Slab;
use takeover::{Endpoint, Existing, Item, Kind, Message, RawState};

use crate::ctl::Request;
use crate::fault::{self, Step};
use crate::fdstore::{self, notify, FdStore};
use crate::overflow;
use crate::state::{SavedRef, StateFile, STATE_NAME};
use crate::status::{unix_now, ListenerInfo, ReloadRecord, Status};
use crate::worker::WorkerProc;

const SIGNALS: Token = Token(0);
const CTL: Token = Token(1);
const WORKER: Token = Token(2);
const CTL_CONN_BASE: usize = 1 << 16;

/// Reloads kept for `ctl status`.
const HISTORY: usize = 20;
/// Crash-restart backoff: the first restart is immediate, a crash loop
/// backs off from 100 ms to 5 s; a worker that ran 10 s resets it.
const BACKOFF_STEP: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);
/// How often the serving worker is pinged; one that does not answer within
/// the ack timeout is hung (or stopped) and is replaced.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Control connections that may wait for their request at once, and for how
/// long: a peer that connects and never speaks costs an fd for that long.
const MAX_CTL_CONNS: usize = 64;
const CTL_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What takeoverd was told on its command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// The worker binary, executed afresh at every start.
    pub worker: PathBuf,
    /// Its arguments.
    pub worker_args: Vec<String>,
    /// uid and gid to run it as.
    pub worker_user: Option<(u32, u32)>,
    /// Deadline of each handoff step.
    pub ack_timeout: Duration,
    /// The control socket.
    pub control_socket: PathBuf,
    /// The unit's `FileDescriptorStoreMax=`.
    pub fdstore_max: usize,
    /// Addresses to bind when systemd passes no listener.
    pub listen: Vec<std::net::SocketAddr>,
    /// Listen backlog for those.
    pub backlog: i32,
}

struct HeldListener {
    name: String,
    fd: OwnedFd,
    addr: String,
}

struct HeldConn {
    fd: OwnedFd,
    /// What its worker reported at the last handoff (or `opened`), as raw
    /// JSON: takeoverd moves it, never parses it.
    state: Option<RawState>,
}

/// The supervisor.
pub struct Supervisor {
    cfg: Config,
    poll: Poll,
    signals: SignalFd,
    ctl: Endpoint,
    /// Control connections waiting for their request, with a deadline.
    ctl_conns: Slab<(OwnedFd, Instant)>,
    /// Problems on the control socket, logged at most once a second.
    ctl_log: takeover::Throttle,
    /// When to try accepting on the control socket again after a failure.
    ctl_retry: Option<Instant>,
    /// Connections whose fd we could not receive, logged at most once a second.
    hold_log: takeover::Throttle,
    listeners: Vec<HeldListener>,
    conns: HashMap<String, HeldConn>,
    worker: Option<WorkerProc>,
    generation: u64,
    store: FdStore,
    state: StateFile,
    reloads: VecDeque<ReloadRecord>,
    restarts: u64,
    restart_at: Option<Instant>,
    backoff: Duration,
    watchdog: Option<(Duration, Instant)>,
    status_dirty: bool,
    status_at: Instant,
    /// When the last ping went out, and whether its pong is still due.
    ping: (Instant, bool),
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").field("generation", &self.generation).field("conns", &self.conns.len()).finish()
    }
}

impl Supervisor {
    /// Gathers the sockets (systemd's, or bound here), the control socket
    /// and signal handling. Does not start a worker yet.
    pub fn new(cfg: Config) -> anyhow::Result<Supervisor> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD] {
            mask.add(s);
        }
        mask.thread_block()?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        let poll = Poll::new()?;
        poll.registry().register(&mut SourceFd(&signals.as_fd().as_raw_fd()), SIGNALS, Interest::READABLE)?;

        let mut g = Gathered::default();
        for inh in fdstore::inherited()? {
            classify(inh, &mut g);
        }
        let mut queue = Vec::new();
        for (k, ends) in std::mem::take(&mut g.queue) {
            match ends {
                (Some(r), Some(w)) => queue.push((k, r, w)),
                _ => tracing::warn!(pair = k, "only one end of an overflow pair came back from the fd store; dropped"),
            }
        }
        let (mut store, carried) = FdStore::new(cfg.fdstore_max, queue);
        if !carried.is_empty() {
            tracing::info!(connections = carried.len(), "restored connections from the overflow queue");
        }
        // Connections that came back by name (not from the overflow queue).
        let named: std::collections::HashSet<String> = g.conns.keys().cloned().collect();
        let restored_state = g.state.is_some();
        for (name, fd) in carried {
            g.conns.entry(name).or_insert(HeldConn { fd, state: None });
        }
        let Gathered { mut listeners, mut conns, state, .. } = g;
        let restored = conns.len();
        let (state, saved) = match state {
            Some(mut s) => {
                let saved = s.load();
                (s, saved)
            }
            None => (StateFile::create()?, None),
        };
        let mut generation = 0;
        if let Some(saved) = saved {
            generation = saved.generation;
            for (name, st) in saved.conns {
                if let Some(c) = conns.get_mut(&name) {
                    c.state = Some(st);
                }
            }
        }
        if listeners.is_empty() {
            if cfg.listen.is_empty() {
                anyhow::bail!("no listening socket: pass --listen ADDR:PORT, or start takeoverd from a .socket unit");
            }
            for (i, addr) in cfg.listen.iter().enumerate() {
                let fd = takeover::bind_tcp(*addr, cfg.backlog).map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
                listeners.push(HeldListener { name: format!("l{i}"), fd, addr: addr.to_string() });
            }
        } else if !cfg.listen.is_empty() {
            tracing::info!("listeners came from systemd; --listen is not used");
        }
        if restored > 0 {
            tracing::info!(connections = restored, listeners = listeners.len(), "restored from the fd store");
        }

        // Listeners may come from a .socket unit rather than the store: store
        // them (systemd keeps one copy of an open file). Connections and the
        // state memfd can only have come from the store, where they still are.
        for l in &listeners {
            store.store(&l.name, l.fd.as_fd(), true);
        }
        if restored_state {
            store.mark_stored(STATE_NAME);
        } else {
            store.store(STATE_NAME, state.fd(), true);
        }
        for name in conns.keys().filter(|n| named.contains(n.as_str())) {
            store.mark_stored(name);
        }
        for (name, c) in conns.iter().filter(|(n, _)| !named.contains(n.as_str())) {
            store.store(name, c.fd.as_fd(), false);
        }
        store.flush(|n| conns.get(n).map(|c| c.fd.as_fd()));

        let ctl = Endpoint::bind(&cfg.control_socket, Existing::ReplaceStale)?;
        poll.registry().register(&mut SourceFd(&ctl.as_fd().as_raw_fd()), CTL, Interest::READABLE)?;
        let watchdog = sd_notify::watchdog_enabled().map(|d| (d / 2, Instant::now()));
        Ok(Supervisor {
            cfg,
            poll,
            signals,
            ctl,
            ctl_conns: Slab::new(),
            ctl_log: takeover::Throttle::new(Duration::from_secs(1)),
            ctl_retry: None,
            hold_log: takeover::Throttle::new(Duration::from_secs(1)),
            listeners,
            conns,
            worker: None,
            generation,
            store,
            state,
            reloads: VecDeque::new(),
            restarts: 0,
            restart_at: None,
            backoff: Duration::ZERO,
            watchdog,
            status_dirty: true,
            status_at: Instant::now(),
            ping: (Instant::now(), false),
        })
    }

    /// Starts the first worker, tells systemd we are ready, and serves until
    /// stopped. Returns the exit status.
    pub fn run(&mut self) -> i32 {
        for l in &self.listeners {
            tracing::info!(name = %l.name, addr = %l.addr, "holding listener");
        }
        tracing::info!(path = %self.cfg.control_socket.display(), fdstore = self.store.enabled(), "control socket ready");
        // Connections restored from the store were served by a process that
        // is gone: their states may be stale.
        let recovered = !self.conns.is_empty();
        if let Err(e) = self.start_worker(recovered) {
            tracing::error!("the first worker did not start: {e}");
            self.schedule_restart();
        }
        notify(&[NotifyState::Ready, NotifyState::Status(&self.status().line())]);
        self.status_dirty = false;

        let mut events = Events::with_capacity(256);
        loop {
            if let Err(e) = self.poll.poll(&mut events, self.next_timeout()) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("epoll failed: {e}");
                    return 1;
                }
            }
            let tokens: Vec<Token> = events.iter().map(|e| e.token()).collect();
            for token in tokens {
                match token {
                    SIGNALS => {
                        if let Some(code) = self.on_signals() {
                            return code;
                        }
                    }
                    CTL => self.on_ctl_accept(),
                    WORKER => self.on_worker(),
                    Token(t) => self.on_ctl_request(t - CTL_CONN_BASE),
                }
            }
            self.on_timers();
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let mut soonest: Option<Instant> = self.restart_at;
        if self.worker.is_some() {
            let (sent, due) = self.ping;
            let at = if due { sent + self.cfg.ack_timeout } else { sent + PING_EVERY };
            soonest = Some(soonest.map_or(at, |s| s.min(at)));
        }
        if let Some((every, last)) = self.watchdog {
            soonest = Some(soonest.map_or(last + every, |s| s.min(last + every)));
        }
        if self.status_dirty {
            let at = self.status_at + Duration::from_secs(1);
            soonest = Some(soonest.map_or(at, |s| s.min(at)));
        }
        if let Some(at) = self.ctl_conns.iter().map(|(_, (_, d))| *d).chain(self.ctl_retry).min() {
            soonest = Some(soonest.map_or(at, |s| s.min(at)));
        }
        soonest.map(|s| s.saturating_duration_since(Instant::now()))
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if let Some((every, last)) = self.watchdog {
            if now >= last + every {
                notify(&[NotifyState::Watchdog]);
                self.watchdog = Some((every, now));
            }
        }
        if self.restart_at.is_some_and(|t| now >= t) {
            self.restart_at = None;
            // A reload may have started a worker meanwhile: never start a
            // second one over it.
            if self.worker.is_none() {
                self.restarts += 1;
                if let Err(e) = self.start_worker(true) {
                    tracing::error!("restarting the worker failed: {e}");
                    self.schedule_restart();
                }
            }
        }
        if self.status_dirty && now >= self.status_at + Duration::from_secs(1) {
            self.publish_status();
        }
        self.check_ping(now);
        self.expire_ctl(now);
        if self.ctl_retry.is_some_and(|t| now >= t) {
            self.ctl_retry = None;
            self.on_ctl_accept();
        }
    }

    /// Pings the worker; replaces one that stays silent past the ack timeout.
    fn check_ping(&mut self, now: Instant) {
        let Some(w) = &mut self.worker else { return };
        let (sent, due) = self.ping;
        if due && now >= sent + self.cfg.ack_timeout {
            tracing::error!(
                pid = w.pid(),
                "worker did not answer a ping within {:?}; killing it",
                self.cfg.ack_timeout
            );
            w.kill();
            self.on_worker_gone("hung");
        } else if !due && now >= sent + PING_EVERY {
            let deadline = Some(now + self.cfg.ack_timeout);
            if takeover::manifest::send(w.chan(), &Message::Ping, &[], deadline).is_ok() {
                self.ping = (now, true);
            }
        }
    }

    fn publish_status(&mut self) {
        notify(&[NotifyState::Status(&self.status().line())]);
        self.status_dirty = false;
        self.status_at = Instant::now();
    }

    /// The status as `ctl status` reports it.
    pub fn status(&self) -> Status {
        Status {
            generation: self.generation,
            worker_pid: self.worker.as_ref().map(|w| w.pid()),
            connections: self.conns.len(),
            listeners: self
                .listeners
                .iter()
                .map(|l| ListenerInfo { name: l.name.clone(), addr: l.addr.clone() })
                .collect(),
            fdstore: self.store.enabled(),
            fdstore_fds: self.store.len(),
            fdstore_overflow: self.store.overflowed(),
            fdstore_pairs: self.store.pairs(),
            fdstore_refused: self.store.lost(),
            worker_restarts: self.restarts,
            reloads: self.reloads.iter().cloned().collect(),
        }
    }

    // ---- workers ----

    /// Starts a worker and waits for its hello.
    fn spawn_ready(&self) -> Result<WorkerProc, String> {
        let w = WorkerProc::spawn(&self.cfg.worker, &self.cfg.worker_args, self.cfg.worker_user)
            .map_err(|e| format!("{e:#}"))?;
        let deadline = Some(Instant::now() + self.cfg.ack_timeout);
        match takeover::read_hello(w.chan(), deadline) {
            Ok(_) => Ok(w),
            Err(e) => {
                // A worker that closed the channel is exiting: give it a
                // moment so its exit status makes the error.
                let status = w.finish(Duration::from_millis(200));
                Err(format!("new worker {} failed before taking over ({status}): {e}", self.cfg.worker.display()))
            }
        }
    }

    /// Offers every socket to `w` and waits for its ack. `reloading` and
    /// `old` (the quiesced predecessor's pid) are for fault injection.
    fn hand(&self, w: &WorkerProc, recovered: bool, reloading: bool, old: Option<u32>) -> takeover::Result<()> {
        let deadline = Some(Instant::now() + self.cfg.ack_timeout);
        let mut items = Vec::with_capacity(self.listeners.len() + self.conns.len());
        for l in &self.listeners {
            items.push(Item { name: &l.name, kind: Kind::TcpListener, fd: l.fd.as_fd(), state: None });
        }
        for (name, c) in &self.conns {
            items.push(Item { name, kind: Kind::TcpStream, fd: c.fd.as_fd(), state: c.state.as_deref() });
        }
        let app = serde_json::json!({ "generation": self.generation + 1 });
        takeover::offer(w.chan(), &items, &app, recovered, deadline)?;
        if reloading {
            fault::at(Step::SocketsSent, Some(w.pid()), old);
        }
        takeover::await_ack(w.chan(), deadline)
    }

    /// Starts a worker with no predecessor to quiesce (first start, or after
    /// a crash).
    fn start_worker(&mut self, recovered: bool) -> Result<(), String> {
        let t0 = Instant::now();
        let mut w = self.spawn_ready()?;
        if let Err(e) = self.hand(&w, recovered, false, None) {
            w.kill();
            return Err(format!("worker {} refused the sockets: {e}", w.pid()));
        }
        self.generation += 1;
        tracing::info!(
            pid = w.pid(),
            generation = self.generation,
            connections = self.conns.len(),
            elapsed_ms = %format_args!("{:.2}", t0.elapsed().as_secs_f64() * 1e3),
            "worker serving"
        );
        self.adopt_worker(w);
        self.save_state();
        Ok(())
    }

    fn adopt_worker(&mut self, w: WorkerProc) {
        if let Some(mut stale) = self.drop_worker() {
            // Two workers must never serve the same sockets.
            tracing::error!(pid = stale.pid(), "a worker was still registered when another took over; killing it");
            stale.kill();
        }
        if let Err(e) = self.poll.registry().register(&mut SourceFd(&w.chan().as_raw_fd()), WORKER, Interest::READABLE)
        {
            tracing::error!("watching the worker's channel: {e}");
        }
        self.worker = Some(w);
        self.status_dirty = true;
        self.ping = (Instant::now(), false);
    }

    fn drop_worker(&mut self) -> Option<WorkerProc> {
        let w = self.worker.take()?;
        let _ = self.poll.registry().deregister(&mut SourceFd(&w.chan().as_raw_fd()));
        self.status_dirty = true;
        Some(w)
    }

    fn schedule_restart(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        tracing::warn!(in_ms = self.backoff.as_millis() as u64, "restarting the worker");
        self.backoff = (self.backoff * 2).clamp(BACKOFF_STEP, BACKOFF_MAX);
    }

    fn on_worker(&mut self) {
        loop {
            let Some(w) = &self.worker else { return };
            match takeover::manifest::try_recv(w.chan()) {
                Ok(Some(Some((Message::Pong, _)))) => self.ping.1 = false,
                Ok(Some(Some((msg, fds)))) => on_worker_msg(&mut self.conns, &mut self.store, msg, fds),
                Ok(None) => {
                    let conns = &self.conns;
                    self.store.flush(|n| conns.get(n).map(|c| c.fd.as_fd()));
                    return;
                }
                Ok(Some(None)) => return self.on_worker_gone("closed its control channel"),
                Err(e @ takeover::Error::Truncated { .. }) => {
                    // Out of fds: we cannot hold a copy of a connection the
                    // worker accepted. It is served; it would not survive a
                    // crash of the worker. Not the worker's fault.
                    self.hold_log.warn(format!(
                        "could not receive a new connection from the worker ({e}): it is served but not held here; raise LimitNOFILE="
                    ));
                }
                Err(e) => {
                    tracing::error!("worker channel: {e}");
                    return self.on_worker_gone("broke the control protocol");
                }
            }
            self.status_dirty = true;
        }
    }

    fn on_worker_gone(&mut self, why: &str) {
        let Some(w) = self.drop_worker() else { return };
        let pid = w.pid();
        let ran = w.uptime();
        let status = w.finish(Duration::from_millis(500));
        tracing::error!(pid, %status, "worker {why}; its connections are held here and go to a new worker");
        if ran > BACKOFF_RESET_AFTER {
            self.backoff = Duration::ZERO;
        }
        self.schedule_restart();
    }

    // ---- reload ----

    /// Replaces the worker. Never interleaves: it runs to the end before
    /// anything else is looked at.
    fn reload(&mut self) -> ReloadRecord {
        let t0 = Instant::now();
        let at = unix_now();
        notify(&[NotifyState::Reloading, NotifyState::Status("reloading: starting a new worker")]);
        tracing::info!(generation = self.generation + 1, "reload: starting a new worker");
        let outcome = self.reload_inner(t0);
        let (ok, error, handoff, old_exit) = match outcome {
            Ok((h, o)) => (true, None, h, o),
            Err(e) => {
                tracing::error!("reload failed: {e}");
                (false, Some(e), t0.elapsed(), Duration::ZERO)
            }
        };
        let rec = ReloadRecord {
            generation: if ok { self.generation } else { self.generation + 1 },
            at,
            ok,
            error,
            handoff_ms: handoff.as_secs_f64() * 1e3,
            old_exit_ms: old_exit.as_secs_f64() * 1e3,
            worker_pid: self.worker.as_ref().map(|w| w.pid()),
            connections: self.conns.len(),
        };
        if self.reloads.len() == HISTORY {
            self.reloads.pop_front();
        }
        self.reloads.push_back(rec.clone());
        let line = self.status().line();
        notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
        self.status_dirty = false;
        self.status_at = Instant::now();
        rec
    }

    /// Returns (request → new worker's ack, request → old worker's exit).
    fn reload_inner(&mut self, t0: Instant) -> Result<(Duration, Duration), String> {
        let new = self.spawn_ready()?;
        let started = t0.elapsed();
        // The new worker is up; only now does the old one stop serving.
        let deadline = Some(Instant::now() + self.cfg.ack_timeout);
        let mut old = self.drop_worker();
        let old_pid = old.as_ref().map(|w| w.pid());
        fault::at(Step::NewStarted, Some(new.pid()), old_pid);
        let mut recovered = old.is_none();
        if let Some(w) = &old {
            match self.quiesce(w, deadline) {
                Ok(()) => fault::at(Step::OldQuiesced, Some(new.pid()), old_pid),
                Err(e) => {
                    tracing::warn!(
                        pid = w.pid(),
                        "old worker failed to quiesce ({e}); killing it, the new one recovers"
                    );
                    if let Some(mut w) = old.take() {
                        w.kill();
                    }
                    recovered = true;
                }
            }
        }
        let quiesced = t0.elapsed();
        match self.hand(&new, recovered, true, old_pid) {
            Ok(()) => {
                let handoff = t0.elapsed();
                fault::at(Step::NewAcked, Some(new.pid()), old_pid);
                self.generation += 1;
                let new_pid = new.pid();
                // This worker replaces any crash restart still pending.
                self.restart_at = None;
                self.adopt_worker(new);
                let mut old_exit = handoff;
                if let Some(w) = old {
                    let _ = takeover::manifest::send(w.chan(), &Message::Exit, &[], deadline);
                    fault::at(Step::OldExiting, Some(new_pid), old_pid);
                    let status = w.finish(self.cfg.ack_timeout);
                    old_exit = t0.elapsed();
                    if !status.success() {
                        tracing::warn!(%status, "the old worker did not exit cleanly after the handoff");
                    }
                }
                self.save_state();
                tracing::info!(
                    pid = new_pid,
                    generation = self.generation,
                    connections = self.conns.len(),
                    handoff_ms = %format_args!("{:.2}", handoff.as_secs_f64() * 1e3),
                    old_exit_ms = %format_args!("{:.2}", old_exit.as_secs_f64() * 1e3),
                    new_ready_ms = %format_args!("{:.2}", started.as_secs_f64() * 1e3),
                    quiesced_ms = %format_args!("{:.2}", quiesced.as_secs_f64() * 1e3),
                    "reload complete"
                );
                Ok((handoff, old_exit))
            }
            Err(e) => {
                let mut new = new;
                let pid = new.pid();
                new.kill();
                match old {
                    Some(w) => {
                        let _ = takeover::manifest::send(w.chan(), &Message::Resume, &[], deadline);
                        self.adopt_worker(w);
                    }
                    None => self.schedule_restart(),
                }
                Err(format!("new worker {pid} did not take over: {e}; the old worker resumed"))
            }
        }
    }

    /// Stops `w` at message boundaries and records the state it reports of
    /// each connection (handling what it said before the quiesce first).
    fn quiesce(&mut self, w: &WorkerProc, deadline: Option<Instant>) -> takeover::Result<()> {
        takeover::manifest::send(w.chan(), &Message::Quiesce, &[], deadline)?;
        let (conns, store) = (&mut self.conns, &mut self.store);
        let states =
            takeover::control::collect_quiesced(w.chan(), deadline, |m, fds| on_worker_msg(conns, store, m, fds))?;
        for (name, state) in states {
            if let Some(c) = self.conns.get_mut(&name) {
                c.state = state;
            }
        }
        Ok(())
    }

    /// Rewrites the state memfd. Only a later takeoverd reads it, through
    /// the fd store: without one there is nothing to save.
    fn save_state(&mut self) {
        if !self.store.enabled() {
            return;
        }
        let conns = self.conns.iter().filter_map(|(n, c)| Some((n.as_str(), c.state.as_deref()?))).collect();
        if let Err(e) = self.state.save(&SavedRef { version: 1, generation: self.generation, conns }) {
            tracing::warn!("writing the state memfd: {e}");
        }
    }

    // ---- signals, control socket ----

    fn on_signals(&mut self) -> Option<i32> {
        let mut reload = false;
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGHUP) => reload = true,
                    Ok(Signal::SIGCHLD) if self.worker.as_mut().is_some_and(|w| w.exited().is_some()) => {
                        self.on_worker_gone("exited")
                    }
                    Ok(s @ (Signal::SIGTERM | Signal::SIGINT)) => return Some(self.stop(s)),
                    _ => {}
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("reading signals: {e}");
                    break;
                }
            }
        }
        if reload {
            tracing::info!("SIGHUP: reloading");
            let rec = self.reload();
            self.answer_waiting(&rec);
        }
        None
    }

    fn stop(&mut self, sig: Signal) -> i32 {
        tracing::info!(signal = sig.as_str(), connections = self.conns.len(), "stopping");
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        if let Some(w) = self.drop_worker() {
            let deadline = Some(Instant::now() + self.cfg.ack_timeout.min(Duration::from_secs(2)));
            if let Err(e) = self.quiesce(&w, deadline) {
                tracing::warn!("the worker did not quiesce ({e}); the saved states may be stale");
            }
            let _ = takeover::manifest::send(w.chan(), &Message::Exit, &[], deadline);
            w.finish(Duration::from_secs(2));
        }
        self.save_state();
        self.ctl.unlink_if_ours();
        0
    }

    fn on_ctl_accept(&mut self) {
        loop {
            match self.ctl.accept() {
                Ok(Some(conn)) => {
                    if self.ctl_conns.len() >= MAX_CTL_CONNS {
                        self.ctl_log
                            .warn(format!("refusing a control connection: {MAX_CTL_CONNS} are already waiting"));
                        continue;
                    }
                    let entry = self.ctl_conns.vacant_entry();
                    let token = Token(CTL_CONN_BASE + entry.key());
                    let registered =
                        self.poll.registry().register(&mut SourceFd(&conn.as_raw_fd()), token, Interest::READABLE);
                    if registered.is_ok() {
                        entry.insert((conn, Instant::now() + CTL_REQUEST_TIMEOUT));
                    }
                }
                Ok(None) => return,
                Err(e @ takeover::Error::PeerNotAllowed { .. }) => self.ctl_log.warn(format!("control socket: {e}")),
                Err(e) => {
                    // EMFILE and the like: the connection waits in the
                    // backlog; retry on a timer instead of spinning.
                    self.ctl_log.warn(format!("control socket: {e}; retrying in 100 ms"));
                    self.ctl_retry = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    /// Forgets a control connection (closing it when the caller drops it).
    fn take_ctl(&mut self, key: usize) -> Option<OwnedFd> {
        let (conn, _) = self.ctl_conns.try_remove(key)?;
        let _ = self.poll.registry().deregister(&mut SourceFd(&conn.as_raw_fd()));
        Some(conn)
    }

    fn expire_ctl(&mut self, now: Instant) {
        let late: Vec<usize> = self.ctl_conns.iter().filter(|(_, (_, d))| *d <= now).map(|(k, _)| k).collect();
        for key in late {
            self.take_ctl(key);
            self.ctl_log
                .warn(format!("closed a control connection that sent no request within {CTL_REQUEST_TIMEOUT:?}"));
        }
    }

    fn on_ctl_request(&mut self, key: usize) {
        let Some(conn) = self.take_ctl(key) else { return };
        let Some(req) = read_request(&conn) else { return };
        match req {
            Request::Status => reply(&conn, &self.status()),
            Request::Reload => {
                tracing::info!("reload requested on the control socket");
                let rec = self.reload();
                reply(&conn, &rec);
                self.answer_waiting(&rec);
            }
        }
    }

    /// After a reload: requests that arrived while it ran are answered now;
    /// a reload request among them gets the outcome of the reload it waited
    /// for rather than starting another.
    fn answer_waiting(&mut self, rec: &ReloadRecord) {
        self.on_ctl_accept();
        let keys: Vec<usize> = self.ctl_conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some((conn, _)) = self.ctl_conns.get(key) else { continue };
            let asked = takeover::wire::try_recv(conn.as_fd());
            if let Ok(None) = asked {
                continue; // nothing asked yet
            }
            let Some(conn) = self.take_ctl(key) else { continue };
            if let Ok(Some(Some(msg))) = asked {
                match serde_json::from_slice::<Request>(&msg.bytes) {
                    Ok(Request::Reload) => reply(&conn, rec),
                    Ok(Request::Status) => reply(&conn, &self.status()),
                    Err(e) => tracing::warn!("bad control request: {e}"),
                }
            }
        }
    }
}

/// Handles `opened`/`closed` from a worker.
fn on_worker_msg(conns: &mut HashMap<String, HeldConn>, store: &mut FdStore, msg: Message, mut fds: Vec<OwnedFd>) {
    match msg {
        Message::Opened { entry } => {
            if fds.len() != 1 || entry.kind != Kind::TcpStream {
                tracing::warn!(name = %entry.name, fds = fds.len(), "worker sent a malformed 'opened'; ignored");
                return;
            }
            let fd = fds.pop().expect("one fd");
            if let Err(problem) = takeover::validate(fd.as_fd(), Kind::TcpStream) {
                tracing::warn!(name = %entry.name, "worker sent a bad fd: {problem}");
                return;
            }
            if let Err(problem) = takeover::check_name(&entry.name) {
                tracing::warn!("worker sent a bad name: {problem}");
                return;
            }
            store.store(&entry.name, fd.as_fd(), false);
            let state = Some(&entry.state).filter(|s| !s.is_null()).and_then(|s| to_raw_value(s).ok());
            conns.insert(entry.name, HeldConn { fd, state });
        }
        Message::Closed { name } => {
            if conns.remove(&name).is_some() {
                store.remove(&name);
            }
        }
        Message::Pong => {}
        other => tracing::warn!("unexpected {} from the worker; ignored", other.name()),
    }
}

fn read_request(conn: &OwnedFd) -> Option<Request> {
    let deadline = Some(Instant::now() + Duration::from_millis(100));
    match takeover::wire::recv(conn.as_fd(), deadline) {
        Ok(Some(msg)) => match serde_json::from_slice::<Request>(&msg.bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("bad control request: {e}");
                reply(conn, &serde_json::json!({ "error": format!("bad request: {e}") }));
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("control request: {e}");
            None
        }
    }
}

fn reply(conn: &OwnedFd, body: &impl serde::Serialize) {
    let bytes = serde_json::to_vec(body).expect("replies serialise");
    if let Err(e) = takeover::wire::send(conn.as_fd(), &bytes, &[], Some(Instant::now() + Duration::from_secs(1))) {
        tracing::warn!("answering on the control socket: {e}");
    }
}

/// Sorts an fd systemd handed us by what it is, never by its position.
/// What systemd handed us at start, sorted.
#[derive(Default)]
struct Gathered {
    listeners: Vec<HeldListener>,
    conns: HashMap<String, HeldConn>,
    state: Option<StateFile>,
    /// Overflow pairs by index: (read end, write end).
    queue: HashMap<usize, (Option<OwnedFd>, Option<OwnedFd>)>,
}

/// Sorts an fd systemd handed us by what it is, never by its position.
fn classify(inh: fdstore::Inherited, g: &mut Gathered) {
    let fdstore::Inherited { name, fd } = inh;
    let is = |kind| takeover::validate(fd.as_fd(), kind).is_ok();
    if name == STATE_NAME && is(Kind::File) {
        g.state = Some(StateFile::from_fd(fd));
    } else if let Some((k, read)) = overflow::parse_end(&name).filter(|_| is(Kind::UnixSeqpacket)) {
        let slot = g.queue.entry(k).or_default();
        if read {
            slot.0 = Some(fd);
        } else {
            slot.1 = Some(fd);
        }
    } else if is(Kind::TcpListener) {
        let addr = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let name = if takeover::check_name(&name).is_ok() { name } else { format!("l{}", g.listeners.len()) };
        g.listeners.push(HeldListener { name, fd, addr });
    } else if is(Kind::TcpStream) && takeover::check_name(&name).is_ok() {
        g.conns.insert(name, HeldConn { fd, state: None });
    } else {
        tracing::warn!(%name, "ignoring an inherited fd that is none of ours (closed)");
    }
}
