//! What takeoverd does with its workers' channels: sends what each
//! worker's outbox holds when the channel has room, reads what workers say
//! (version 2: `closed`, `state`, `pong` and the handoff's messages;
//! version 1: `opened` too), and replaces a worker whose channel breaks.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use takeover::channel::{FromWorker, ToWorker};
use takeover::control as v1;

use crate::supervisor::{Supervisor, BACKOFF_MAX, BACKOFF_STEP, HEALTHY_AFTER, WORKER_BASE};
use crate::workers::{HeldConn, Proto, Slot, Unpark, Who, Worker};

/// Why a worker is reaped in the background (for the log).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reaped {
    /// Told to exit after its successor took over.
    Retired,
    /// It died, hung or broke the protocol, and was killed.
    Failed,
}

impl Supervisor {
    /// A fresh token for a worker's channel.
    pub(crate) fn worker_token(&mut self) -> Token {
        self.next_token += 1;
        Token(WORKER_BASE + self.next_token)
    }

    /// Sends every worker what the channel takes; a broken channel is the
    /// worker's end.
    pub(crate) fn flush_workers(&mut self) {
        let conns = &self.conns;
        let mut broken = Vec::new();
        let mut progressed = Vec::new();
        let mut each = |slot: usize, w: &mut Worker, unpark: Option<Unpark<'_>>| match w.flush(conns, unpark) {
            Ok(p) => {
                if p {
                    progressed.push((slot, w.token));
                }
                let want_room = !w.drained();
                if want_room != w.wants_room {
                    w.wants_room = want_room;
                    let interest = if want_room { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
                    let _ = self.poll.registry().reregister(&mut SourceFd(&w.chan().as_raw_fd()), w.token, interest);
                }
            }
            Err(e) => broken.push((w.token, e)),
        };
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Slot { who, park, unparking, .. } = slot;
            match who {
                Who::Serving(w) => each(i, w, None),
                Who::Handoff(h) => {
                    if let Some(o) = &mut h.old {
                        each(i, o, None);
                    }
                    // The staged worker takes the slot's parked connections.
                    each(i, &mut h.new, Some(Unpark { from: unparking, into: park, slot: i }));
                }
                Who::Down { .. } => {}
            }
        }
        for (slot, token) in progressed {
            self.handoff_progress(slot, token);
        }
        for (token, e) in broken {
            self.channel_broken(token, &format!("its channel broke ({e})"));
        }
    }

    /// Registers a worker's channel in the poll.
    pub(crate) fn watch(&self, w: &Worker) {
        if let Err(e) = self.poll.registry().register(&mut SourceFd(&w.chan().as_raw_fd()), w.token, Interest::READABLE)
        {
            tracing::error!("watching a worker's channel: {e}");
        }
    }

    /// Takes a worker's channel out of the poll.
    pub(crate) fn unwatch(&self, w: &Worker) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&w.chan().as_raw_fd()));
    }

    /// Tells `w` to exit, and reaps it later.
    pub(crate) fn retire(&mut self, mut w: Worker) {
        self.unwatch(&w);
        // Best effort and never blocking: a worker that cannot hear it is
        // killed past its grace.
        w.send(&ToWorker::Exit);
        let _ = w.flush(&self.conns, None);
        // Reaped by a thread of its own at nice 19: the kernel frees what
        // the old worker held (its /proc entries, one per fd if anything
        // looked at them: milliseconds at 10 000 connections) in the reaper's
        // context, and that must not delay the new worker on a shared core.
        let (pid, grace) = (w.pid(), self.cfg.ack_timeout);
        self.reap_in_background(pid, Reaped::Retired, move || w.proc.finish(grace));
    }

    /// Reaps worker `pid` (told to exit, or killed) from a thread at nice
    /// 19: `finish` waits for it to exit, killing it past its grace. The
    /// kernel's teardown of a worker that held thousands of sockets takes
    /// milliseconds, which the other workers' clients must not wait for.
    pub(crate) fn reap_in_background(
        &mut self,
        pid: u32,
        why: Reaped,
        finish: impl FnOnce() -> std::process::ExitStatus + Send + 'static,
    ) {
        let reaper = std::thread::Builder::new().name("reaper".into()).spawn(move || {
            takeover::priority::wind_down();
            let status = finish();
            match why {
                Reaped::Retired if !status.success() => {
                    tracing::warn!(pid, %status, "the old worker did not exit cleanly after the handoff")
                }
                Reaped::Retired => {}
                Reaped::Failed => tracing::warn!(pid, %status, "the failed worker is gone"),
            }
        });
        match reaper {
            Ok(handle) => self.retiring.push((pid, handle)),
            Err(e) => tracing::error!(pid, "could not start a thread to reap the old worker: {e}"),
        }
    }

    pub(crate) fn on_worker_event(&mut self, token: Token, writable: bool) {
        if writable {
            return; // the flush at the end of the turn sends what waits
        }
        loop {
            let Some(w) = self.worker_by_token(token) else { return };
            let proto = w.proto;
            let received = match takeover::wire::try_recv(w.chan()) {
                Ok(None) => return,
                Ok(Some(None)) => return self.channel_broken(token, "closed its control channel"),
                Ok(Some(Some(r))) => r,
                Err(e @ takeover::Error::Truncated { .. }) => {
                    // Out of fds: a version-1 worker's new connection could
                    // not be held. It is served; it would not survive a
                    // crash of the worker. Not the worker's fault.
                    self.accept_log.warn(format!(
                        "could not receive a new connection from the worker ({e}): it is served but not held here; raise LimitNOFILE="
                    ));
                    continue;
                }
                Err(e) => return self.channel_broken(token, &format!("broke the control protocol ({e})")),
            };
            let outcome = if proto == Proto::V1 {
                self.on_v1_message(token, received)
            } else {
                match FromWorker::decode(&received.bytes) {
                    Ok(_) if !received.fds.is_empty() => Err(format!("sent {} fds with a message", received.fds.len())),
                    Ok(msg) => self.on_message(token, msg),
                    Err(e) => Err(e.to_string()),
                }
            };
            if let Err(why) = outcome {
                return self.channel_broken(token, &format!("broke the control protocol: {why}"));
            }
        }
    }

    /// A message from a version-2 worker (or a hello from any).
    fn on_message(&mut self, token: Token, msg: FromWorker) -> Result<(), String> {
        let Some(slot) = self.slot_of(token) else { return Ok(()) };
        if self.is_handoff_worker(slot, token) {
            return self.on_handoff_message(slot, token, msg);
        }
        match msg {
            FromWorker::Pong => self.slots[slot].ping.1 = false,
            FromWorker::Closed { name } => self.conn_closed(&name),
            FromWorker::State { entries } => self.update_states(entries),
            // A worker leaving (`ctl workers`) stopped: its connections go.
            FromWorker::Stopped if self.slots[slot].leaving.is_some() => self.left(slot),
            FromWorker::Given { names } if !self.slots[slot].giving.is_empty() => self.on_given(slot, names),
            // The tail of a stop that a rollback overtook (it was told to resume).
            FromWorker::Wake { .. } | FromWorker::Stopped => {}
            other => return Err(format!("unexpected {} from a serving worker", other.name())),
        }
        Ok(())
    }

    /// A message from a version-1 worker: `opened`, `closed`, `pong`, and
    /// what it says when it is quiesced.
    fn on_v1_message(&mut self, token: Token, received: takeover::wire::Received) -> Result<(), String> {
        let msg = v1::FromWorker::decode(&received.bytes).map_err(|e| e.to_string())?;
        let Some(slot) = self.slot_of(token) else { return Ok(()) };
        match msg {
            v1::FromWorker::Opened { entry } => {
                let name = self.v1_opened(slot, entry, received.fds)?;
                // A staged successor gets it too.
                if let Who::Handoff(h) = &mut self.slots[slot].who {
                    if h.step >= crate::workers::Step::Staging {
                        h.new.assign([name]);
                    }
                }
            }
            v1::FromWorker::Closed { name } => self.conn_closed(&name),
            v1::FromWorker::Pong => self.slots[slot].ping.1 = false,
            v1::FromWorker::State { .. } | v1::FromWorker::Quiesced { .. } => {
                return self.on_handoff_v1_quiesce(slot, token, msg)
            }
        }
        Ok(())
    }

    /// Holds a connection a version-1 worker of `slot` accepted; returns its
    /// name.
    pub(crate) fn v1_opened(
        &mut self,
        slot: usize,
        entry: takeover::Entry,
        fds: Vec<OwnedFd>,
    ) -> Result<String, String> {
        let [fd] = <[OwnedFd; 1]>::try_from(fds).map_err(|f| format!("'opened' came with {} fds", f.len()))?;
        if entry.kind != takeover::Kind::TcpStream {
            return Err(format!("'opened' of a {}", entry.kind));
        }
        takeover::validate(fd.as_fd(), takeover::Kind::TcpStream).map_err(|p| format!("bad fd: {p}"))?;
        takeover::check_name(&entry.name).map_err(|e| e.to_string())?;
        self.store.store(&entry.name, fd.as_fd(), false);
        let state = Some(&entry.state).filter(|s| !s.is_null()).and_then(|s| serde_json::value::to_raw_value(s).ok());
        self.hold(entry.name.clone(), HeldConn { fd: Some(fd), state, slot });
        Ok(entry.name)
    }

    /// A worker reported that a connection ended: drop our copy; a staged
    /// successor drops its own.
    pub(crate) fn conn_closed(&mut self, name: &str) {
        let Some((slot, _)) = self.unhold(name) else { return };
        self.store.remove(name);
        // One being given back ended first: nothing to move.
        let s = &mut self.slots[slot];
        if s.giving.remove(name).is_some() && s.giving.is_empty() {
            s.give_deadline = None;
            self.resize_progress();
        }
        if let Who::Handoff(h) = &mut self.slots[slot].who {
            if h.step >= crate::workers::Step::Staging && h.step < crate::workers::Step::Committing {
                h.new.send(&ToWorker::Release { names: vec![name.to_string()] });
            }
        }
    }

    /// Keeps the states a worker reported (for its successor and the store).
    pub(crate) fn update_states(&mut self, entries: Vec<takeover::StateEntry>) {
        for e in entries {
            if let Some(c) = self.conns.get_mut(&e.name) {
                c.state = if e.state.is_null() { None } else { serde_json::value::to_raw_value(&e.state).ok() };
            }
        }
    }

    /// The worker behind `token` among the live ones.
    pub(crate) fn worker_by_token(&self, token: Token) -> Option<&Worker> {
        self.slots.iter().find_map(|s| match &s.who {
            Who::Serving(w) if w.token == token => Some(w),
            Who::Handoff(h) if h.new.token == token => Some(&h.new),
            Who::Handoff(h) => h.old.as_ref().filter(|o| o.token == token),
            _ => None,
        })
    }

    /// The worker behind `token` has a broken channel (or exited): it is gone.
    pub(crate) fn channel_broken(&mut self, token: Token, why: &str) {
        let Some(slot) = self.slot_of(token) else { return };
        if self.is_handoff_worker(slot, token) {
            return self.handoff_worker_failed(slot, token, why);
        }
        self.worker_gone(slot, why);
    }

    /// `slot`'s serving worker died or hung: its connections are held here
    /// and go to a new worker; the other slots never notice.
    pub(crate) fn worker_gone(&mut self, slot: usize, why: &str) {
        let Who::Serving(w) = std::mem::replace(&mut self.slots[slot].who, Who::Down { at: Instant::now() }) else {
            return;
        };
        self.resize_worker_failed(slot, why);
        self.unwatch(&w);
        let pid = w.pid();
        let healthy = w.serving_since.is_some_and(|t| t.elapsed() >= HEALTHY_AFTER);
        let mut proc = w.proc;
        let status = proc.exited();
        tracing::error!(
            pid,
            slot,
            status = %status.map_or("not reaped yet (logged when it is)".to_string(), |s| s.to_string()),
            connections = self.slots[slot].share,
            "worker {why}; its connections are held here and go to a new worker"
        );
        if status.is_none() {
            proc.kill();
            self.reap_in_background(pid, Reaped::Failed, move || proc.finish(Duration::from_millis(500)));
        }
        if healthy {
            self.slots[slot].backoff = Duration::ZERO;
        }
        self.schedule_restart(slot);
        self.resize_progress();
    }

    /// Starts a new worker for `slot` after its backoff.
    pub(crate) fn schedule_restart(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        let at = Instant::now() + s.backoff;
        tracing::warn!(slot, in_ms = s.backoff.as_millis() as u64, "restarting the worker");
        s.backoff = (s.backoff * 2).clamp(BACKOFF_STEP, BACKOFF_MAX);
        s.who = Who::Down { at };
        self.status_dirty = true;
    }
}
