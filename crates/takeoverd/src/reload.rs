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
//!
//! Each slot (`--workers N`) hands over its own share. A reload is a
//! [`Roll`]: slot 0's handoff, then slot 1's, and so on, so that at most one
//! share pauses at a time. A failed handoff rolls back that slot only and
//! ends the roll: the slots before it serve the new generation, it and
//! those after the old one, and the reload's record says so.

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
use crate::workers::{Handoff, Proto, Slot, Step, Who, Why, Worker};
use takeoverd::status::{unix_now, ReloadRecord, SlotHandover};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A rolling reload: one slot's handoff after another.
#[derive(Debug)]
pub(crate) struct Roll {
    /// The slot being handed over now.
    pub(crate) slot: usize,
    /// Control connections waiting for the outcome.
    pub(crate) waiters: Vec<OwnedFd>,
    /// Unix time of the request.
    pub(crate) at: u64,
    /// When it was asked for.
    pub(crate) t0: Instant,
    /// The slots handed over so far.
    pub(crate) done: Vec<SlotHandover>,
}

impl Supervisor {
    /// A reload was asked for (SIGHUP, or `ctl reload` waiting on `waiter`).
    /// One that arrives during a reload joins it.
    pub(crate) fn request_reload(&mut self, waiter: Option<OwnedFd>) {
        if let Some(roll) = &mut self.roll {
            roll.waiters.extend(waiter);
            return;
        }
        if self.resize.is_some() {
            let why = "the number of workers is changing (ctl workers); reload once it is done";
            tracing::error!("reload refused: {why}");
            let mut rec = self.stopped_record();
            rec.error = Some(why.into());
            answer_reload(waiter.into_iter().collect(), &rec);
            return;
        }
        notify(&[
            NotifyState::Reloading,
            crate::fdstore::monotonic_usec(),
            NotifyState::ExtendTimeoutUsec(crate::fdstore::extend_usec(self.cfg.ack_timeout * self.slots.len() as u32)),
            NotifyState::Status("reloading: starting a new worker"),
        ]);
        self.roll = Some(Roll {
            slot: 0,
            waiters: waiter.into_iter().collect(),
            at: unix_now(),
            t0: Instant::now(),
            done: Vec::new(),
        });
        self.roll_step(0);
    }

    /// Hands `slot` over as a step of the roll (one that is being restarted
    /// already becomes the step).
    fn roll_step(&mut self, slot: usize) {
        if self.slots.len() > 1 {
            tracing::info!(slot, of = self.slots.len(), "rolling reload: replacing worker {slot}");
        }
        match &mut self.slots[slot].who {
            Who::Handoff(h) => h.why = Why::Reload,
            Who::Serving(_) => self.begin_handoff(slot, Why::Reload, false),
            Who::Down { .. } => self.begin_handoff(slot, Why::Reload, true),
        }
    }

    /// Starts a new worker to take over `slot`'s share from its serving
    /// worker (if any).
    pub(crate) fn begin_handoff(&mut self, slot: usize, why: Why, recovered: bool) {
        let t0 = Instant::now();
        tracing::info!(generation = self.generation + 1, slot, "{}: starting a new worker", why_name(why));
        let successor = matches!(self.slots[slot].who, Who::Serving(_));
        let proc = match WorkerProc::spawn(&self.cfg.worker, &self.cfg.worker_args, self.cfg.worker_user, successor) {
            Ok(p) => p,
            Err(e) => {
                let error = takeover::log::report(&*e);
                tracing::error!("{error}");
                self.handoff_failed_to_start(slot, why, error);
                return;
            }
        };
        let token = self.worker_token();
        let new = Worker::new(proc, token);
        self.watch(&new);
        let old = match std::mem::replace(&mut self.slots[slot].who, Who::Down { at: t0 }) {
            Who::Serving(w) => Some(w),
            _ => None,
        };
        self.slots[slot].who = Who::Handoff(Box::new(Handoff {
            why,
            // Without an old worker nobody serves the connections while the
            // new one is staged: it must serve each once (and reconcile it).
            recovered: recovered || old.is_none(),
            old,
            new,
            step: Step::Hello,
            deadline: t0 + self.cfg.ack_timeout,
            t0,
            hello_at: None,
            ready_at: None,
            stop_at: None,
            since_stop: Vec::new(),
        }));
        self.status_dirty = true;
    }

    /// The new worker could not even be started.
    fn handoff_failed_to_start(&mut self, slot: usize, why: Why, error: String) {
        if matches!(self.slots[slot].who, Who::Down { .. }) {
            self.schedule_restart(slot);
        }
        self.finish(slot, why, Err(error));
    }

    /// Whether `token` is the new or the old worker of `slot`'s handoff.
    pub(crate) fn is_handoff_worker(&self, slot: usize, token: Token) -> bool {
        matches!(&self.slots[slot].who, Who::Handoff(_)) && self.slots[slot].has(token)
    }

    /// Gives freshly accepted connections of `slot` to whoever serves them
    /// now, and to a staged successor.
    pub(crate) fn assign_new(&mut self, slot: usize, names: Vec<String>) {
        match &mut self.slots[slot].who {
            Who::Serving(w) => w.assign(names),
            Who::Handoff(h) => {
                if h.step <= Step::Staging {
                    if let Some(o) = h.old.as_mut().filter(|o| o.proto.assigns()) {
                        o.assign(names.iter().cloned());
                    }
                } else if h.old.is_some() {
                    h.since_stop.extend(names.iter().cloned());
                }
                if h.step >= Step::Staging {
                    h.new.assign(names);
                }
            }
            Who::Down { .. } => {}
        }
    }

    /// A message from the new or the old worker of `slot`'s handoff.
    pub(crate) fn on_handoff_message(&mut self, slot: usize, token: Token, msg: FromWorker) -> Result<(), String> {
        let Who::Handoff(h) = &mut self.slots[slot].who else { return Ok(()) };
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
                FromWorker::Stopped if h.step == Step::Stopping => self.old_stopped(slot),
                other => return Err(format!("unexpected {} from the old worker ({})", other.name(), h.step.name())),
            }
            return Ok(());
        }
        match (h.step, msg) {
            (Step::Hello, FromWorker::Hello { version, pid: _ }) => self.new_said_hello(slot, version)?,
            (Step::Staging, FromWorker::Ready { count }) => self.new_ready(slot, count),
            (Step::Committing, FromWorker::Serving { count: _ }) => self.commit(slot),
            // A worker told to serve may find connections ended before it says so.
            (Step::Committing, FromWorker::Closed { name }) => self.conn_closed(&name),
            (Step::Committing, FromWorker::State { entries }) => self.update_states(entries),
            (_, FromWorker::Nack { reason }) => return Err(format!("it refused: {reason}")),
            (_, FromWorker::Pong) => {}
            (step, other) => return Err(format!("unexpected {} ({})", other.name(), step.name())),
        }
        Ok(())
    }

    fn new_said_hello(&mut self, slot: usize, version: u32) -> Result<(), String> {
        let n = self.slots.len();
        let share = self.slots[slot].share;
        let Slot { who, park, unparking, parked_dead, .. } = &mut self.slots[slot];
        let Who::Handoff(h) = who else { return Ok(()) };
        h.hello_at = Some(Instant::now());
        match version {
            2 | 3 => {
                h.new.proto = if version == 3 { Proto::V3 } else { Proto::V2 };
                h.step = Step::Staging;
                h.deadline = Instant::now() + self.cfg.ack_timeout;
                // The open copies by name, then the parked ones (park.rs).
                let open = self.conns.iter().filter(|(_, c)| c.slot == slot && c.fd.is_some());
                h.new.assign(open.map(|(name, _)| name.clone()));
                if !park.is_empty() {
                    unparking.append(std::mem::take(park));
                    h.new.assign_parked();
                }
                // The pass drops the ended ones' copies.
                *parked_dead = 0;
                h.new.send(&ToWorker::Sync { count: share });
                self.inject(slot, Fault::NewStarted);
                Ok(())
            }
            1 if n > 1 => Err(refuse(
                h.new.chan(),
                format!(
                    "it speaks version 1 of the supervisor channel, whose workers accept connections themselves \
                     and cannot share them with {} others: run takeoverd with --workers 1 for it, or use version 2",
                    n - 1
                ),
            )),
            1 => {
                h.new.proto = Proto::V1;
                self.inject(slot, Fault::NewStarted);
                self.legacy_handoff(slot);
                Ok(())
            }
            v => Err(refuse(
                h.new.chan(),
                format!("this takeoverd speaks versions 1, 2 and 3 of the supervisor channel, not {v}"),
            )),
        }
    }

    /// Injects the configured fault at `step` of `slot`'s reload (tests only).
    pub(crate) fn inject(&self, slot: usize, step: Fault) {
        if let Who::Handoff(h) = &self.slots[slot].who {
            if h.why == Why::Reload {
                fault::at_slot(step, Some(slot), Some(h.new.pid()), h.old.as_ref().map(|o| o.pid()));
            }
        }
    }

    /// The new worker holds every connection of its share: stop the old one.
    fn new_ready(&mut self, slot: usize, _count: usize) {
        let Who::Handoff(h) = &mut self.slots[slot].who else { return };
        let now = Instant::now();
        h.ready_at = Some(now);
        h.deadline = now + self.cfg.ack_timeout;
        self.inject(slot, Fault::NewReady);
        let Who::Handoff(h) = &mut self.slots[slot].who else { return };
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
    pub(crate) fn old_stopped(&mut self, slot: usize) {
        self.inject(slot, Fault::OldStopped);
        let Who::Handoff(h) = &mut self.slots[slot].who else { return };
        h.step = Step::Committing;
        h.deadline = Instant::now() + self.cfg.ack_timeout;
        h.new.send(&ToWorker::Serve { recovered: h.recovered });
    }

    /// The channel's writes went out: a big staging is making progress.
    pub(crate) fn handoff_progress(&mut self, slot: usize, token: Token) {
        if let Who::Handoff(h) = &mut self.slots[slot].who {
            if h.new.token == token && h.step == Step::Staging {
                h.deadline = Instant::now() + self.cfg.ack_timeout;
            }
        }
    }

    pub(crate) fn handoff_timers(&mut self, slot: usize, now: Instant) {
        match &self.slots[slot].who {
            Who::Down { at } if now >= *at => {
                self.restarts += 1;
                self.begin_handoff(slot, Why::Restart, true);
            }
            Who::Handoff(h) if now >= h.deadline => {
                let (token, why) = match (h.step, &h.old) {
                    (Step::Stopping, Some(o)) => (o.token, format!("did not stop within {:?}", self.cfg.ack_timeout)),
                    (step, _) => {
                        (h.new.token, format!("did not answer within {:?} ({})", self.cfg.ack_timeout, step.name()))
                    }
                };
                self.handoff_worker_failed(slot, token, &why);
            }
            _ => {}
        }
    }

    /// The new or the old worker of a handoff failed (died, hung, broke
    /// the protocol).
    pub(crate) fn handoff_worker_failed(&mut self, slot: usize, token: Token, why: &str) {
        let Who::Handoff(h) = &mut self.slots[slot].who else { return };
        if h.new.token == token {
            return self.rollback(slot, why);
        }
        // The old worker: its connections are all here; the new worker
        // takes them as after a crash.
        let Some(old) = h.old.take() else { return };
        // (From here the new worker serves every connection once: recovered.)
        self.unwatch(&old);
        let pid = old.pid();
        let mut proc = old.proc;
        proc.kill();
        tracing::error!(pid, slot, "the old worker {why} during the handoff; the new worker recovers its connections");
        let Who::Handoff(h) = &mut self.slots[slot].who else { return };
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
    pub(crate) fn rollback(&mut self, slot: usize, why: &str) {
        let Who::Handoff(h) = std::mem::replace(&mut self.slots[slot].who, Who::Down { at: Instant::now() }) else {
            return;
        };
        // What was parked again and what was not taken out yet: all of it
        // stays this slot's.
        let s = &mut self.slots[slot];
        let rest = std::mem::take(&mut s.unparking);
        s.park.append(rest);
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
                tracing::error!(slot, "{error}");
                self.slots[slot].who = Who::Serving(old);
                self.slots[slot].ping = (Instant::now(), false);
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
                tracing::error!(slot, "{error}");
                self.schedule_restart(slot);
            }
        }
        self.finish(slot, h.why, Err(error));
    }

    /// The new worker serves: the old one goes.
    pub(crate) fn commit(&mut self, slot: usize) {
        let Who::Handoff(h) = std::mem::replace(&mut self.slots[slot].who, Who::Down { at: Instant::now() }) else {
            return;
        };
        let mut h = *h;
        let now = Instant::now();
        let (new_pid, old_pid) = (h.new.pid(), h.old.as_ref().map(|o| o.pid()));
        if h.why == Why::Reload {
            fault::at_slot(Fault::NewServing, Some(slot), Some(new_pid), old_pid);
        }
        self.generation += 1;
        self.slots[slot].generation = self.generation;
        h.new.serving_since = Some(now);
        let phases = Phases {
            pause: h.stop_at.map(|s| now - s),
            stage: h.hello_at.zip(h.ready_at).map(|(a, b)| b - a),
            total: now - h.t0,
            serving_at: now,
            pid: new_pid,
        };
        if let Some(old) = h.old.take() {
            self.retire(old);
        }
        tracing::info!(
            pid = new_pid,
            slot,
            generation = self.generation,
            connections = self.slots[slot].share,
            pause_ms = %phases.pause.map_or("none".into(), |p| format!("{:.3}", ms(p))),
            stage_ms = %format_args!("{:.2}", phases.stage.map_or(0.0, ms)),
            total_ms = %format_args!("{:.2}", ms(phases.total)),
            "{}",
            match h.why {
                Why::Reload => "reload complete",
                _ => "worker serving",
            }
        );
        self.slots[slot].who = Who::Serving(h.new);
        self.slots[slot].ping = (now, false);
        self.save_state();
        self.finish(slot, h.why, Ok(phases));
    }

    /// A slot's handoff ended: the roll goes on to the next slot, or ends
    /// (recorded, answered, told to systemd).
    fn finish(&mut self, slot: usize, why: Why, outcome: Result<Phases, String>) {
        let ok = outcome.is_ok();
        let pid = outcome.as_ref().ok().map(|p| p.pid);
        let rolling = why == Why::Reload && self.roll.as_ref().is_some_and(|r| r.slot == slot);
        if !rolling {
            if ok && why == Why::Restart {
                tracing::info!(slot, "worker restarted");
            }
            // READY=1 once every slot's first start has ended.
            if !self.ready_sent && !self.slots.iter().any(|s| matches!(s.who, Who::Handoff(_))) {
                self.publish_ready();
            }
            // New workers of `ctl workers` serve: connections can move.
            self.resize_progress();
            return;
        }
        let n = self.slots.len();
        let roll = self.roll.as_mut().expect("rolling");
        if let Ok(p) = &outcome {
            roll.done.push(SlotHandover {
                slot,
                pid: p.pid,
                connections: self.slots[slot].share,
                pause_ms: p.pause.map(ms),
                stage_ms: p.stage.map(ms),
                serving_at_ms: ms(p.serving_at - roll.t0),
            });
            if slot + 1 < n {
                roll.slot += 1;
                return self.roll_step(slot + 1);
            }
        }
        let roll = self.roll.take().expect("rolling");
        let error = outcome.err().map(|e| match n {
            1 => e,
            _ => format!(
                "worker {slot} of {n}: {e}; the roll stopped there: {} serve the new generation, {} the old",
                if slot == 0 { "none".to_string() } else { format!("workers 0-{}", slot - 1) },
                if slot + 1 == n { format!("worker {slot}") } else { format!("workers {slot}-{}", n - 1) },
            ),
        });
        let total = roll.t0.elapsed();
        let rec = ReloadRecord {
            generation: if ok { self.generation } else { self.generation + 1 },
            at: roll.at,
            ok,
            error,
            handoff_ms: ms(total),
            old_exit_ms: 0.0,
            pause_ms: longest(&roll.done, |d| d.pause_ms),
            stage_ms: longest(&roll.done, |d| d.stage_ms),
            total_ms: Some(ms(total)),
            worker_pid: pid.or_else(|| self.slots[slot].who.serving().map(|w| w.pid())),
            connections: self.conns.len(),
            failed_worker: (!ok).then_some(slot),
            slots: roll.done,
        };
        self.record(rec.clone());
        answer_reload(roll.waiters, &rec);
        self.publish_ready();
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
            failed_worker: None,
            slots: Vec::new(),
        }
    }

    /// Stops `w` and waits for it (SIGTERM, and the version-1 handoff):
    /// sends what is queued, then `stop` (`quiesce` for version 1), and
    /// keeps every state it reports.
    pub(crate) fn stop_blocking(&mut self, slot: usize, w: &mut Worker, deadline: Instant) -> Result<(), String> {
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
                if let Err(e) = self.v1_opened(slot, entry, fds) {
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
            w.flush(&self.conns, None).map_err(|e| e.to_string())?;
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
    /// When the new worker served.
    serving_at: Instant,
    /// The new worker.
    pid: u32,
}

/// The longest of the slots' `get` (what a client saw at worst).
fn longest(done: &[SlotHandover], get: fn(&SlotHandover) -> Option<f64>) -> Option<f64> {
    done.iter().filter_map(get).reduce(f64::max)
}

/// Tells a new worker its hello is refused (best effort, 100 ms); returns
/// the reason.
fn refuse(chan: std::os::fd::BorrowedFd<'_>, reason: String) -> String {
    let msg = Message::Refuse { reason: reason.clone() };
    let _ = takeover::manifest::send(chan, &msg, &[], Some(Instant::now() + Duration::from_millis(100)));
    reason
}

fn why_name(why: Why) -> &'static str {
    match why {
        Why::Start => "start",
        Why::Restart => "restart",
        Why::Reload => "reload",
    }
}
