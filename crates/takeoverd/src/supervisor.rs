//! takeoverd's event loop: it owns every listener and connection (it accepts
//! them itself, so no connection ever lives only in a worker), keeps them in
//! the fd store, assigns them to the serving worker, and drives
//! [`Workers`], the state machine of who serves.
//! The handoff between workers is in `reload.rs`, what takeoverd starts
//! with in `restore.rs`, the control socket in `control_server.rs`.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use sd_notify::NotifyState;
use slab::Slab;
use takeover::channel::ToWorker;
use takeover::{Endpoint, Existing};

use crate::fdstore::{notify, FdStore};
use crate::state::{SavedRef, StateFile};
use crate::workers::{Conns, HeldConn, Slot, Who};
use takeoverd::status::{ListenerInfo, ReloadRecord, Status, WorkerInfo};

pub(crate) const SIGNALS: Token = Token(0);
pub(crate) const CTL: Token = Token(1);
pub(crate) const LISTENER_BASE: usize = 16;
pub(crate) const WORKER_BASE: usize = 1 << 12;
pub(crate) const CTL_CONN_BASE: usize = 1 << 40;

/// Reloads kept for `ctl status`.
const HISTORY: usize = 20;
/// Crash-restart backoff: a worker that served (for 100 ms: it completed its
/// handoff and ran) is healthy, and its death is followed by an immediate
/// restart however often it happens; workers that die before they serve
/// back off from 100 ms to 5 s.
pub(crate) const BACKOFF_STEP: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
pub(crate) const HEALTHY_AFTER: Duration = Duration::from_millis(100);
/// How often the serving worker is pinged; one that does not answer within
/// the ack timeout is hung (or stopped) and is replaced.
const PING_EVERY: Duration = Duration::from_secs(1);

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
    /// takeoverd's own binary, as started: what `ctl upgrade` executes.
    pub exe: PathBuf,
    /// Open copies of connections takeoverd keeps at most; past it, the
    /// copies of served connections are parked (park.rs). `None`: never
    /// park (the fd store is in use, or parking is off).
    pub max_open: Option<usize>,
    /// Addresses to bind when systemd passes no listener.
    pub listen: Vec<std::net::SocketAddr>,
    /// Listen backlog for those.
    pub backlog: i32,
    /// How many workers share the connections (at least 1).
    pub workers: usize,
}

/// A listening socket takeoverd holds.
#[derive(Debug)]
pub struct HeldListener {
    /// Its name (fd store, manifests).
    pub name: String,
    /// The socket.
    pub fd: OwnedFd,
    /// Its address, for logs and status.
    pub addr: String,
}

/// The supervisor.
pub struct Supervisor {
    pub(crate) cfg: Config,
    pub(crate) poll: Poll,
    signals: SignalFd,
    pub(crate) ctl: Endpoint,
    /// Control connections waiting for their request, with a deadline.
    pub(crate) ctl_conns: Slab<(OwnedFd, Instant)>,
    /// Problems on the control socket, logged at most once a second.
    pub(crate) ctl_log: takeover::Throttle,
    /// When to try accepting on the control socket again after a failure.
    pub(crate) ctl_retry: Option<Instant>,
    pub(crate) listeners: Vec<HeldListener>,
    /// Whether the listeners are in the poll (takeoverd accepts).
    pub(crate) accepting: bool,
    /// Listeners with connections left after their batch.
    pub(crate) accept_more: bool,
    /// accept() failed (EMFILE...): when to try again; warned once per burst.
    pub(crate) accept_retry: Option<Instant>,
    pub(crate) accept_log: takeover::Throttle,
    pub(crate) conns: Conns,
    /// The shares of the connections and who serves each.
    pub(crate) slots: Vec<Slot>,
    /// A rolling reload under way: the slot it is at, who waits for it.
    pub(crate) roll: Option<crate::reload::Roll>,
    /// `ctl workers N` under way.
    pub(crate) resize: Option<crate::resize::Resize>,
    /// Connections whose copy is open here (the others are parked).
    pub(crate) open_conns: usize,
    /// Threads reaping workers told to exit (killed past their grace).
    pub(crate) retiring: Vec<(u32, std::thread::JoinHandle<()>)>,
    pub(crate) next_token: usize,
    pub(crate) generation: u64,
    pub(crate) store: FdStore,
    pub(crate) state: StateFile,
    pub(crate) reloads: VecDeque<ReloadRecord>,
    pub(crate) restarts: u64,
    /// In-place upgrades since the service started.
    pub(crate) upgrades: u64,
    /// READY=1 goes out when the first worker's start ends.
    pub(crate) ready_sent: bool,
    watchdog: Option<(Duration, Instant)>,
    pub(crate) status_dirty: bool,
    status_at: Instant,
    /// This image was exec'd by `ctl upgrade`: what to report once it runs.
    pub(crate) upgraded: Option<crate::upgrade::Upgraded>,
}

/// The epoll instance and the signalfd (SIGTERM, SIGINT, SIGHUP, SIGCHLD
/// blocked and read from it), registered.
pub(crate) fn event_basics() -> anyhow::Result<(Poll, SignalFd)> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD] {
        mask.add(s);
    }
    mask.thread_block()?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    let poll = Poll::new()?;
    poll.registry().register(&mut SourceFd(&signals.as_fd().as_raw_fd()), SIGNALS, Interest::READABLE)?;
    Ok((poll, signals))
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
        let (poll, signals) = event_basics()?;
        let restored = crate::restore::restore(&cfg)?;
        let ctl = Endpoint::bind(&cfg.control_socket, Existing::ReplaceStale)?;
        Self::assemble(cfg, poll, signals, ctl, restored)
    }

    /// The supervisor around what it holds, no worker yet.
    pub(crate) fn assemble(
        cfg: Config,
        poll: Poll,
        signals: SignalFd,
        ctl: Endpoint,
        restored: crate::restore::Restored,
    ) -> anyhow::Result<Supervisor> {
        poll.registry().register(&mut SourceFd(&ctl.as_fd().as_raw_fd()), CTL, Interest::READABLE)?;
        let watchdog = sd_notify::watchdog_enabled().map(|d| (d / 2, Instant::now()));
        let workers = cfg.workers.max(1);
        let mut sup = Supervisor {
            cfg,
            poll,
            signals,
            ctl,
            ctl_conns: Slab::new(),
            ctl_log: takeover::Throttle::new(Duration::from_secs(1)),
            ctl_retry: None,
            listeners: restored.listeners,
            accepting: false,
            accept_more: false,
            accept_retry: None,
            accept_log: takeover::Throttle::new(Duration::from_secs(1)),
            conns: Conns::new(),
            slots: (0..workers).map(|_| Slot::new()).collect(),
            roll: None,
            resize: None,
            open_conns: 0,
            retiring: Vec::new(),
            next_token: 0,
            generation: restored.generation,
            store: restored.store,
            state: restored.state,
            reloads: VecDeque::new(),
            restarts: 0,
            upgrades: 0,
            ready_sent: false,
            watchdog,
            status_dirty: true,
            status_at: Instant::now(),
            upgraded: None,
        };
        for (name, conn) in restored.conns {
            sup.hold(name, conn);
        }
        Ok(sup)
    }

    /// Holds a connection: it joins the share of `conn.slot`, or of the live
    /// slot with the fewest connections when it has none (or one that does
    /// not exist). Returns the slot.
    pub(crate) fn hold(&mut self, name: String, mut conn: HeldConn) -> usize {
        if conn.slot >= self.slots.len() {
            conn.slot = self.least_loaded();
        }
        let slot = conn.slot;
        self.slots[slot].share += 1;
        self.open_conns += usize::from(conn.fd.is_some());
        if let Some(old) = self.conns.insert(name, conn) {
            self.slots[old.slot].share -= 1;
            self.open_conns -= usize::from(old.fd.is_some());
        }
        self.status_dirty = true;
        slot
    }

    /// Forgets a connection; its slot, if it was held.
    pub(crate) fn unhold(&mut self, name: &str) -> Option<(usize, HeldConn)> {
        let conn = self.conns.remove(name)?;
        self.slots[conn.slot].share -= 1;
        if conn.fd.is_some() {
            self.open_conns -= 1;
        } else {
            self.slots[conn.slot].parked_dead += 1;
        }
        self.status_dirty = true;
        Some((conn.slot, conn))
    }

    /// The slot a new connection goes to: the one with the fewest
    /// connections among those whose worker lives (serves or takes over),
    /// else among all. Least connections rather than a hash of the socket
    /// cookie: it keeps the shares even as connections come and go, and
    /// after a crash (docs/BENCHMARKS.md has the balance figure).
    pub(crate) fn least_loaded(&self) -> usize {
        let live = |s: &&Slot| !matches!(s.who, Who::Down { .. });
        // Slots that `ctl workers` is about to remove get nothing.
        let kept = self.resize.as_ref().map_or(self.slots.len(), |r| r.keeps());
        let pick = |only_live: bool| {
            self.slots
                .iter()
                .take(kept.max(1))
                .enumerate()
                .filter(|(_, s)| s.leaving.is_none())
                .filter(|(_, s)| !only_live || live(s))
                .min_by_key(|(_, s)| s.share)
                .map(|(i, _)| i)
        };
        pick(true).or_else(|| pick(false)).unwrap_or(0)
    }

    /// The slot whose worker `token` is.
    pub(crate) fn slot_of(&self, token: Token) -> Option<usize> {
        self.slots.iter().position(|s| s.has(token))
    }

    /// The pid of the first worker that serves now (the only one with
    /// `--workers 1`).
    pub(crate) fn first_serving_pid(&self) -> Option<u32> {
        self.slots.iter().find_map(|s| s.who.serving()).map(|w| w.pid())
    }

    /// Starts the first worker and serves until stopped. Returns the exit
    /// status.
    pub fn run(&mut self) -> i32 {
        for l in &self.listeners {
            tracing::info!(name = %l.name, addr = %l.addr, "holding listener");
        }
        tracing::info!(path = %self.cfg.control_socket.display(), fdstore = self.store.enabled(), "control socket ready");
        if let Some(upgrade) = self.upgraded.take() {
            // The previous image's worker serves on: nothing to start.
            self.finish_upgrade(upgrade);
        } else {
            // Connections restored from the store were served by a process
            // that is gone: their states may be stale.
            for slot in 0..self.slots.len() {
                let recovered = self.slots[slot].share > 0;
                self.begin_handoff(slot, crate::workers::Why::Start, recovered);
            }
        }
        self.sync_accepting();

        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.accept_more { Some(Duration::ZERO) } else { self.next_timeout() };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("epoll failed: {e}");
                    return 1;
                }
            }
            let tokens: Vec<(Token, bool)> = events.iter().map(|e| (e.token(), e.is_writable())).collect();
            // Workers first: what they said (closes, a `ready`) comes before
            // assigning new connections.
            for &(token, writable) in &tokens {
                if token.0 >= WORKER_BASE && token.0 < CTL_CONN_BASE {
                    self.on_worker_event(token, writable);
                }
            }
            let mut accept = self.accept_more;
            for &(token, _) in &tokens {
                match token {
                    SIGNALS => {
                        if let Some(code) = self.on_signals() {
                            return code;
                        }
                    }
                    CTL => self.on_ctl_accept(),
                    Token(t) if t >= CTL_CONN_BASE => self.on_ctl_request(t - CTL_CONN_BASE),
                    Token(t) if t >= WORKER_BASE => {}
                    Token(t) if t >= LISTENER_BASE => accept = true,
                    _ => {}
                }
            }
            // Who accepts may have changed in this turn (a version-1 worker
            // took over): never assign to a worker that accepts itself.
            self.sync_accepting();
            if accept && self.accepting {
                self.accept_all();
            }
            self.on_timers();
            self.flush_workers();
            self.park_excess();
            self.sync_accepting();
            let conns = &self.conns;
            self.store.flush(|n| conns.get(n).and_then(HeldConn::open_fd));
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let mut soonest: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                soonest = Some(soonest.map_or(at, |s| s.min(at)));
            }
        };
        for slot in &self.slots {
            let (sent, due) = slot.ping;
            consider(slot.who.deadline(Some(if due { sent + self.cfg.ack_timeout } else { sent + PING_EVERY })));
        }
        consider(self.watchdog.map(|(every, last)| last + every));
        consider(self.resize_deadline());
        consider(self.status_dirty.then(|| self.status_at + Duration::from_secs(1)));
        consider(self.ctl_deadline());
        consider(self.accept_retry);
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
        if self.status_dirty && now >= self.status_at + Duration::from_secs(1) {
            self.publish_status();
        }
        for slot in 0..self.slots.len() {
            self.handoff_timers(slot, now);
            self.check_ping(slot, now);
        }
        self.resize_timers(now);
        self.ctl_timers(now);
        if self.accept_retry.is_some_and(|t| now >= t) {
            self.accept_retry = None;
            self.accept_more = true;
        }
        self.retiring.retain(|(_, r)| !r.is_finished());
    }

    /// Pings the slot's serving worker; replaces one that stays silent past
    /// the ack timeout.
    fn check_ping(&mut self, slot: usize, now: Instant) {
        let s = &mut self.slots[slot];
        let Who::Serving(w) = &mut s.who else { return };
        let (sent, due) = s.ping;
        if due && now >= sent + self.cfg.ack_timeout {
            tracing::error!(
                pid = w.pid(),
                slot,
                "worker did not answer a ping within {:?}; killing it",
                self.cfg.ack_timeout
            );
            self.worker_gone(slot, "hung");
        } else if !due && now >= sent + PING_EVERY {
            w.send(&ToWorker::Ping);
            s.ping = (now, true);
        }
    }

    fn publish_status(&mut self) {
        notify(&[NotifyState::Status(&self.status().line())]);
        self.status_dirty = false;
        self.status_at = Instant::now();
    }

    /// Tells systemd the status now (after a reload or a start).
    pub(crate) fn publish_ready(&mut self) {
        let line = self.status().line();
        notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
        self.ready_sent = true;
        self.status_dirty = false;
        self.status_at = Instant::now();
    }

    /// The status as `ctl status` reports it.
    pub fn status(&self) -> Status {
        Status {
            generation: self.generation,
            worker_pid: self.first_serving_pid(),
            state: self.state_name(),
            connections: self.conns.len(),
            parked: self.parked(),
            workers: self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| WorkerInfo {
                    slot: i,
                    pid: s.who.serving().map(|w| w.pid()),
                    generation: s.generation,
                    connections: s.share,
                    state: s.state_name(),
                })
                .collect(),
            rolling: self.roll.as_ref().map(|r| r.slot),
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
            upgrades: self.upgrades,
            version: env!("CARGO_PKG_VERSION").into(),
            reloads: self.reloads.iter().cloned().collect(),
        }
    }

    /// The one slot's state, or each slot's when they differ.
    fn state_name(&self) -> String {
        let names: Vec<String> = self.slots.iter().map(Slot::state_name).collect();
        if names.iter().all(|n| *n == names[0]) {
            return names[0].clone();
        }
        names.iter().enumerate().map(|(i, n)| format!("worker {i}: {n}")).collect::<Vec<_>>().join("; ")
    }

    /// Records a reload's outcome for `ctl status`.
    pub(crate) fn record(&mut self, rec: ReloadRecord) {
        if self.reloads.len() == HISTORY {
            self.reloads.pop_front();
        }
        self.reloads.push_back(rec);
        self.status_dirty = true;
    }

    /// Rewrites the state memfd. Only a later takeoverd reads it, through
    /// the fd store: without one there is nothing to save.
    pub(crate) fn save_state(&mut self) {
        if !self.store.enabled() {
            return;
        }
        let conns = self.conns.iter().filter_map(|(n, c)| Some((n.as_str(), c.state.as_deref()?))).collect();
        if let Err(e) = self.state.save(&SavedRef { version: 1, generation: self.generation, conns }) {
            tracing::warn!("writing the state memfd: {e}");
        }
    }

    // ---- signals ----

    fn on_signals(&mut self) -> Option<i32> {
        let mut reload = false;
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGHUP) => reload = true,
                    Ok(Signal::SIGCHLD) => self.reap(),
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
            self.request_reload(None);
        }
        None
    }

    /// Reaps exited workers: retired ones are done; a live one that exited
    /// is gone.
    fn reap(&mut self) {
        let mut gone = Vec::new();
        for slot in &mut self.slots {
            for w in slot.workers_mut() {
                if w.proc.exited().is_some() {
                    gone.push(w.token);
                }
            }
        }
        for token in gone {
            self.channel_broken(token, "exited");
        }
    }

    fn stop(&mut self, sig: Signal) -> i32 {
        tracing::info!(signal = sig.as_str(), connections = self.conns.len(), "stopping");
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        if let Some(roll) = self.roll.take() {
            crate::control_server::answer_reload(roll.waiters, &self.stopped_record());
        }
        let mut serving = Vec::new();
        for slot in 0..self.slots.len() {
            match std::mem::replace(&mut self.slots[slot].who, Who::Down { at: Instant::now() }) {
                Who::Serving(w) => serving.push((slot, w)),
                Who::Handoff(h) => {
                    let h = *h;
                    let mut new = h.new.proc;
                    new.kill();
                    serving.extend(h.old.map(|o| (slot, o)));
                }
                Who::Down { .. } => {}
            }
        }
        let deadline = Instant::now() + self.cfg.ack_timeout.min(Duration::from_secs(2));
        for (slot, mut w) in serving {
            if let Err(e) = self.stop_blocking(slot, &mut w, deadline) {
                tracing::warn!(pid = w.pid(), "the worker did not stop ({e}); the saved states may be stale");
            }
            w.send(&ToWorker::Exit);
            let _ = w.flush(&self.conns, None);
            w.proc.finish(Duration::from_secs(2));
        }
        for (_, reaper) in std::mem::take(&mut self.retiring) {
            let _ = reaper.join();
        }
        self.save_state();
        self.ctl.unlink_if_ours();
        0
    }
}
