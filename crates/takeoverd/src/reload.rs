//! The handoff from one worker to the next (a reload, a first start, a
//! restart after a crash), as steps of [`Handoff`]:
//!
//! 1. **hello**: the new worker is started; the old one serves on.
//! 2. **staging**: takeoverd assigns the new worker every connection (it
//!    registers them and reads nothing), then `sync`; connections accepted
//!    or closed meanwhile follow as `assign`/`release`. The old one serves on:
//!    a new worker that hangs here costs clients nothing.
//! 3. **stopping**: the new worker said `ready`; the old one is told to
//!    `stop` at a message boundary and answers with only what changed: the
//!    states it had not reported and the connections with work left (`wake`),
//!    forwarded as they come.
//! 4. **committing**: `stopped` came; the new worker is told to `serve`. Its
//!    `serving` ends the client-visible pause (`pause_ms`), and the old one
//!    is told to exit.
//!
//! Until `serve` the old worker owns everything, and any failure rolls back
//! to it (`resume`). A worker that speaks version 1 of the channel gets the
//! version-1 handoff (`reload_v1.rs`): stop, offer everything, ack, commit.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use mio::Token;
use sd_notify::NotifyState;
use takeover::channel::{FromWorker, ToWorker};
use takeover::control as v1;
use takeover::Message;

use crate::control_server::answer_reload;
use crate::fault::{self, Step as Fault};
use crate::fdstore::notify;
use crate::supervisor::Supervisor;
use crate::worker::WorkerProc;
use crate::workers::{Handoff, Proto, Step, Why, Worker, Workers};
use takeoverd::status::{unix_now, ReloadRecord};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Supervisor {
    /// A reload was asked for (SIGHUP, or `ctl reload` waiting on `waiter`).
    /// One that arrives during a handoff joins it.
    pub(crate) fn request_reload(&mut self, waiter: Option<OwnedFd>) {
        let waiters: Vec<OwnedFd> = waiter.into_iter().collect();
        match &mut self.workers {
            Workers::Handoff(h) => {
                h.waiters.extend(waiters);
                h.why = Why::Reload;
            }
            Workers::Serving(_) => self.begin_handoff(Why::Reload, false, waiters),
            Workers::Down { .. } => self.begin_handoff(Why::Reload, true, waiters),
        }
    }

    /// Starts a new worker to take over from the serving one (if any).
    pub(crate) fn begin_handoff(&mut self, why: Why, recovered: bool, waiters: Vec<OwnedFd>) {
        let t0 = Instant::now();
        let at = unix_now();
        if why == Why::Reload {
            notify(&[
                NotifyState::Reloading,
                crate::fdstore::monotonic_usec(),
                NotifyState::ExtendTimeoutUsec(crate::fdstore::extend_usec(self.cfg.ack_timeout)),
                NotifyState::Status("reloading: starting a new worker"),
            ]);
        }
        tracing::info!(generation = self.generation + 1, "{}: starting a new worker", why_name(why));
        let successor = matches!(self.workers, Workers::Serving(_));
        let proc = match WorkerProc::spawn(&self.cfg.worker, &self.cfg.worker_args, self.cfg.worker_user, successor) {
            Ok(p) => p,
            Err(e) => {
                let error = takeover::log::report(&*e);
                tracing::error!("{error}");
                self.handoff_failed_to_start(why, at, t0, error, waiters);
                return;
            }
        };
        let token = self.worker_token();
        let new = Worker::new(proc, token);
        self.watch(&new);
        let old = match std::mem::replace(&mut self.workers, Workers::Down { at: t0 }) {
            Workers::Serving(w) => Some(w),
            _ => None,
        };
        self.workers = Workers::Handoff(Box::new(Handoff {
            why,
            // Without an old worker nobody serves the connections while the
            // new one is staged: it must serve each once (and reconcile it).
            recovered: recovered || old.is_none(),
            old,
            new,
            step: Step::Hello,
            deadline: t0 + self.cfg.ack_timeout,
            t0,
            at,
            hello_at: None,
            ready_at: None,
            stop_at: None,
            since_stop: Vec::new(),
            waiters,
        }));
        self.status_dirty = true;
    }

    /// The new worker could not even be started.
    fn handoff_failed_to_start(&mut self, why: Why, at: u64, t0: Instant, error: String, waiters: Vec<OwnedFd>) {
        if matches!(self.workers, Workers::Down { .. }) {
            self.schedule_restart();
        }
        self.finish(why, at, t0, Err(error), None, waiters);
    }

    /// Whether `token` is the new or the old worker of a handoff.
    pub(crate) fn is_handoff_worker(&self, token: Token) -> bool {
        match &self.workers {
            Workers::Handoff(h) => h.new.token == token || h.old.as_ref().is_some_and(|o| o.token == token),
            _ => false,
        }
    }

    /// Gives freshly accepted connections to whoever serves them now, and to
    /// a staged successor.
    pub(crate) fn assign_new(&mut self, names: Vec<String>) {
        match &mut self.workers {
            Workers::Serving(w) => w.assign(names),
            Workers::Handoff(h) => {
                if h.step <= Step::Staging {
                    if let Some(o) = h.old.as_mut().filter(|o| o.proto == Proto::V2) {
                        o.assign(names.iter().cloned());
                    }
                } else if h.old.is_some() {
                    h.since_stop.extend(names.iter().cloned());
                }
                if h.step >= Step::Staging {
                    h.new.assign(names);
                }
            }
            Workers::Down { .. } => {}
        }
    }

    /// A message from the new or the old worker of the handoff.
    pub(crate) fn on_handoff_message(&mut self, token: Token, msg: FromWorker) -> Result<(), String> {
        let Workers::Handoff(h) = &mut self.workers else { return Ok(()) };
        if h.new.token != token {
            // The old worker: it serves until `stop`, then reports.
            match msg {
                FromWorker::Pong => {}
                FromWorker::Closed { name } => self.conn_closed(&name),
                FromWorker::State { entries } => {
                    // The staged worker has (or will get with its assign)
                    // the state we knew; this one is newer.
                    if h.step >= Step::Staging && h.step < Step::Committing {
                        h.new.send(&ToWorker::State { entries: entries.clone() });
                    }
                    self.update_states(entries);
                }
                FromWorker::Wake { names } if h.step == Step::Stopping => h.new.send(&ToWorker::Wake { names }),
                FromWorker::Stopped if h.step == Step::Stopping => self.old_stopped(),
                other => return Err(format!("unexpected {} from the old worker ({})", other.name(), h.step.name())),
            }
            return Ok(());
        }
        match (h.step, msg) {
            (Step::Hello, FromWorker::Hello { version, pid: _ }) => self.new_said_hello(version)?,
            (Step::Staging, FromWorker::Ready { count }) => self.new_ready(count),
            (Step::Committing, FromWorker::Serving { count: _ }) => self.commit(),
            // A worker told to serve may find connections ended before it says so.
            (Step::Committing, FromWorker::Closed { name }) => self.conn_closed(&name),
            (Step::Committing, FromWorker::State { entries }) => self.update_states(entries),
            (_, FromWorker::Nack { reason }) => return Err(format!("it refused: {reason}")),
            (_, FromWorker::Pong) => {}
            (step, other) => return Err(format!("unexpected {} ({})", other.name(), step.name())),
        }
        Ok(())
    }

    fn new_said_hello(&mut self, version: u32) -> Result<(), String> {
        let Workers::Handoff(h) = &mut self.workers else { return Ok(()) };
        h.hello_at = Some(Instant::now());
        match version {
            2 => {
                h.new.proto = Proto::V2;
                h.step = Step::Staging;
                h.deadline = Instant::now() + self.cfg.ack_timeout;
                h.new.assign(self.conns.keys().cloned());
                h.new.send(&ToWorker::Sync { count: self.conns.len() });
                self.inject(Fault::NewStarted);
                Ok(())
            }
            1 => {
                h.new.proto = Proto::V1;
                self.inject(Fault::NewStarted);
                self.legacy_handoff();
                Ok(())
            }
            v => {
                let reason = format!("this takeoverd speaks versions 1 and 2 of the supervisor channel, not {v}");
                let refuse = Message::Refuse { reason: reason.clone() };
                let _ = takeover::manifest::send(
                    h.new.chan(),
                    &refuse,
                    &[],
                    Some(Instant::now() + Duration::from_millis(100)),
                );
                Err(reason)
            }
        }
    }

    /// Injects the configured fault at `step` of a reload (tests only).
    pub(crate) fn inject(&self, step: Fault) {
        if let Workers::Handoff(h) = &self.workers {
            if h.why == Why::Reload {
                fault::at(step, Some(h.new.pid()), h.old.as_ref().map(|o| o.pid()));
            }
        }
    }

    /// The new worker holds every connection: stop the old one.
    fn new_ready(&mut self, _count: usize) {
        let Workers::Handoff(h) = &mut self.workers else { return };
        let now = Instant::now();
        h.ready_at = Some(now);
        h.deadline = now + self.cfg.ack_timeout;
        self.inject(Fault::NewReady);
        let Workers::Handoff(h) = &mut self.workers else { return };
        match &mut h.old {
            Some(o) => {
                h.step = Step::Stopping;
                h.stop_at = Some(now);
                o.send_stop();
            }
            None => {
                h.step = Step::Committing;
                h.new.send(&ToWorker::Serve { recovered: h.recovered });
            }
        }
    }

    /// The old worker stopped; every state and wake it had came before.
    pub(crate) fn old_stopped(&mut self) {
        self.inject(Fault::OldStopped);
        let Workers::Handoff(h) = &mut self.workers else { return };
        h.step = Step::Committing;
        h.deadline = Instant::now() + self.cfg.ack_timeout;
        h.new.send(&ToWorker::Serve { recovered: h.recovered });
    }

    /// The channel's writes went out: a big staging is making progress.
    pub(crate) fn handoff_progress(&mut self, token: Token) {
        if let Workers::Handoff(h) = &mut self.workers {
            if h.new.token == token && h.step == Step::Staging {
                h.deadline = Instant::now() + self.cfg.ack_timeout;
            }
        }
    }

    pub(crate) fn handoff_timers(&mut self, now: Instant) {
        match &self.workers {
            Workers::Down { at } if now >= *at => {
                self.restarts += 1;
                self.begin_handoff(Why::Restart, true, Vec::new());
            }
            Workers::Handoff(h) if now >= h.deadline => {
                let (token, why) = match (h.step, &h.old) {
                    (Step::Stopping, Some(o)) => (o.token, format!("did not stop within {:?}", self.cfg.ack_timeout)),
                    (step, _) => {
                        (h.new.token, format!("did not answer within {:?} ({})", self.cfg.ack_timeout, step.name()))
                    }
                };
                self.handoff_worker_failed(token, &why);
            }
            _ => {}
        }
    }

    /// The new or the old worker of a handoff failed (died, hung, broke
    /// the protocol).
    pub(crate) fn handoff_worker_failed(&mut self, token: Token, why: &str) {
        let Workers::Handoff(h) = &mut self.workers else { return };
        if h.new.token == token {
            return self.rollback(why);
        }
        // The old worker: its connections are all here; the new worker
        // takes them as after a crash.
        let Some(old) = h.old.take() else { return };
        // (From here the new worker serves every connection once: recovered.)
        self.unwatch(&old);
        let pid = old.pid();
        let mut proc = old.proc;
        proc.kill();
        tracing::error!(pid, "the old worker {why} during the handoff; the new worker recovers its connections");
        let Workers::Handoff(h) = &mut self.workers else { return };
        h.recovered = true;
        h.since_stop.clear();
        if h.step == Step::Stopping {
            h.step = Step::Committing;
            h.deadline = Instant::now() + self.cfg.ack_timeout;
            h.new.send(&ToWorker::Serve { recovered: true });
        }
    }

    /// The new worker failed: before `serve`, the old one (if any) serves
    /// on; after `serve`, the new one may have touched the sockets, so it is
    /// a crash: a fresh worker recovers them.
    pub(crate) fn rollback(&mut self, why: &str) {
        let Workers::Handoff(h) = std::mem::replace(&mut self.workers, Workers::Down { at: Instant::now() }) else {
            return;
        };
        let h = *h;
        self.unwatch(&h.new);
        let pid = h.new.pid();
        let mut proc = h.new.proc;
        proc.kill();
        let (status, said) = proc.finish_with_stderr(Duration::from_millis(100));
        let mut error = format!("new worker {pid} {why} ({status}) while {}", h.step.name());
        if h.step == Step::Hello && !said.is_empty() {
            error.push_str(&format!("; its stderr: {said}"));
        }
        let committed = h.step == Step::Committing;
        match h.old {
            Some(mut old) if !committed => {
                if h.step == Step::Stopping {
                    old.assign(h.since_stop);
                    old.send(&ToWorker::Resume);
                }
                error.push_str("; the old worker serves on");
                tracing::error!("{error}");
                self.workers = Workers::Serving(old);
                self.ping = (Instant::now(), false);
            }
            old => {
                if let Some(old) = old {
                    self.retire(old);
                }
                error.push_str(if committed {
                    "; a fresh worker takes the connections over"
                } else {
                    "; its connections are held here and go to a new worker"
                });
                tracing::error!("{error}");
                self.schedule_restart();
            }
        }
        self.finish(h.why, h.at, h.t0, Err(error), None, h.waiters);
    }

    /// The new worker serves: the old one goes.
    pub(crate) fn commit(&mut self) {
        let Workers::Handoff(h) = std::mem::replace(&mut self.workers, Workers::Down { at: Instant::now() }) else {
            return;
        };
        let mut h = *h;
        let now = Instant::now();
        let (new_pid, old_pid) = (h.new.pid(), h.old.as_ref().map(|o| o.pid()));
        if h.why == Why::Reload {
            fault::at(Fault::NewServing, Some(new_pid), old_pid);
        }
        self.generation += 1;
        h.new.serving_since = Some(now);
        let phases = Phases {
            pause: h.stop_at.map(|s| now - s),
            stage: h.hello_at.zip(h.ready_at).map(|(a, b)| b - a),
            total: now - h.t0,
        };
        if let Some(old) = h.old.take() {
            self.retire(old);
        }
        tracing::info!(
            pid = new_pid,
            generation = self.generation,
            connections = self.conns.len(),
            pause_ms = %phases.pause.map_or("none".into(), |p| format!("{:.3}", ms(p))),
            stage_ms = %format_args!("{:.2}", phases.stage.map_or(0.0, ms)),
            total_ms = %format_args!("{:.2}", ms(phases.total)),
            "{}",
            match h.why {
                Why::Reload => "reload complete",
                _ => "worker serving",
            }
        );
        self.workers = Workers::Serving(h.new);
        self.ping = (now, false);
        self.save_state();
        self.finish(h.why, h.at, h.t0, Ok(phases), Some(new_pid), h.waiters);
    }

    /// Records a handoff's outcome, answers who waited, tells systemd.
    fn finish(
        &mut self,
        why: Why,
        at: u64,
        t0: Instant,
        outcome: Result<Phases, String>,
        pid: Option<u32>,
        waiters: Vec<OwnedFd>,
    ) {
        let ok = outcome.is_ok();
        if why == Why::Reload {
            let (error, phases) = match outcome {
                Ok(p) => (None, p),
                Err(e) => (Some(e), Phases { pause: None, stage: None, total: t0.elapsed() }),
            };
            let rec = ReloadRecord {
                generation: if ok { self.generation } else { self.generation + 1 },
                at,
                ok,
                error,
                handoff_ms: ms(phases.total),
                old_exit_ms: 0.0,
                pause_ms: phases.pause.map(ms),
                stage_ms: phases.stage.map(ms),
                total_ms: Some(ms(phases.total)),
                worker_pid: pid.or_else(|| self.workers.serving().map(|w| w.pid())),
                connections: self.conns.len(),
            };
            self.record(rec.clone());
            answer_reload(waiters, &rec);
            self.publish_ready();
        } else {
            if ok && why == Why::Restart {
                tracing::info!("worker restarted");
            }
            if !self.ready_sent {
                self.publish_ready();
            }
            answer_reload(waiters, &self.stopped_record());
        }
    }

    /// What a waiter hears when takeoverd stops in the middle of a handoff.
    pub(crate) fn stopped_record(&self) -> ReloadRecord {
        ReloadRecord {
            generation: self.generation,
            at: unix_now(),
            ok: false,
            error: Some("takeoverd is stopping".into()),
            handoff_ms: 0.0,
            old_exit_ms: 0.0,
            pause_ms: None,
            stage_ms: None,
            total_ms: None,
            worker_pid: None,
            connections: self.conns.len(),
        }
    }

    /// Stops `w` and waits for it (SIGTERM, and the version-1 handoff):
    /// sends what is queued, then `stop` (`quiesce` for version 1), and
    /// keeps every state it reports.
    pub(crate) fn stop_blocking(&mut self, w: &mut Worker, deadline: Instant) -> Result<(), String> {
        if w.proto == Proto::V1 {
            takeover::manifest::send(w.chan(), &v1::ToWorker::Quiesce, &[], Some(deadline))
                .map_err(|e| e.to_string())?;
            let mut opened = Vec::new();
            let mut closed = Vec::new();
            let states = takeover::control::collect_quiesced(w.chan(), Some(deadline), |m, fds| match m {
                v1::FromWorker::Opened { entry } => opened.push((entry, fds)),
                v1::FromWorker::Closed { name } => closed.push(name),
                _ => {}
            })
            .map_err(|e| e.to_string())?;
            for (entry, fds) in opened {
                if let Err(e) = self.v1_opened(entry, fds) {
                    tracing::warn!("worker sent a bad 'opened': {e}");
                }
            }
            for name in closed {
                self.conn_closed(&name);
            }
            for (name, state) in states {
                if let Some(c) = self.conns.get_mut(&name) {
                    c.state = state;
                }
            }
            return Ok(());
        }
        w.send(&ToWorker::Stop);
        while !w.drained() {
            w.flush(&self.conns).map_err(|e| e.to_string())?;
            if Instant::now() >= deadline {
                return Err("timed out sending to the worker".into());
            }
            if !w.drained() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        loop {
            let r = takeover::wire::recv(w.chan(), Some(deadline))
                .map_err(|e| e.to_string())?
                .ok_or("the worker closed its channel while stopping")?;
            match FromWorker::decode(&r.bytes).map_err(|e| e.to_string())? {
                FromWorker::Closed { name } => self.conn_closed(&name),
                FromWorker::State { entries } => self.update_states(entries),
                FromWorker::Stopped => return Ok(()),
                _ => {}
            }
        }
    }
}

/// Where a handoff's time went.
struct Phases {
    /// `stop` → `serving`: what a client sees.
    pause: Option<Duration>,
    /// hello → ready.
    stage: Option<Duration>,
    /// Request → `serving`.
    total: Duration,
}

fn why_name(why: Why) -> &'static str {
    match why {
        Why::Start => "start",
        Why::Restart => "restart",
        Why::Reload => "reload",
    }
}
