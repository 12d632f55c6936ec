//! `takeoverd ctl workers N`: the number of workers changes at runtime and
//! connections move between workers with the same rules as a handoff: a
//! worker stops serving a connection at a message boundary and reports what
//! takeoverd does not know of it before another worker gets it, and
//! takeoverd's copy and last state stand behind every step, so a failure
//! anywhere loses nothing.
//!
//! - **More workers**: the new slots start (as at takeoverd's start) and, once
//!   they serve, each worker with more than its share gives the excess back
//!   (`give`, version 3 of the channel) and takeoverd assigns it to the new
//!   ones. A version-2 worker cannot give: its connections stay, and new
//!   connections (which go to the worker with the fewest) even the shares out.
//! - **Fewer workers**: the last slot's worker is told to `stop` (any
//!   version 2 or 3 worker can), and its connections go to the others, each
//!   to the one with the fewest; then the next slot, down to N.
//!
//! One resize at a time, never during a reload or an upgrade. A worker that
//! dies or hangs while it gives or leaves is handled as any crash: its slot
//! restarts with the connections it still had (and a leaving slot stays).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::Instant;

use takeoverd::status::ResizeReply;

use crate::supervisor::Supervisor;
use crate::workers::{Proto, Slot, Who, Why};

/// The most workers `ctl workers` accepts (as `--workers`).
pub(crate) const MAX_WORKERS: usize = 1024;

/// A resize under way.
#[derive(Debug)]
pub(crate) struct Resize {
    from: usize,
    to: usize,
    t0: Instant,
    waiters: Vec<OwnedFd>,
    moved: usize,
    notes: Vec<String>,
    error: Option<String>,
    /// More workers: the new ones are starting (then connections move).
    starting: bool,
}

impl Resize {
    /// How many slots stay (the first ones).
    pub(crate) fn keeps(&self) -> usize {
        self.to
    }
}

impl Supervisor {
    /// `ctl workers N`: starts the change, or answers `conn` at once why not.
    pub(crate) fn request_resize(&mut self, to: usize, conn: OwnedFd) {
        let from = self.slots.len();
        let refuse = |why: String| ResizeReply {
            ok: false,
            error: Some(why),
            from,
            to: from,
            moved: 0,
            took_ms: 0.0,
            notes: Vec::new(),
        };
        let busy = if self.resize.is_some() {
            Some("the number of workers is already changing; try again once it is done")
        } else if self.roll.is_some() || self.slots.iter().any(|s| !matches!(s.who, Who::Serving(_))) {
            Some("a reload is in progress or a worker is being restarted; try again once every worker serves")
        } else {
            None
        };
        let answer = if let Some(why) = busy {
            Some(refuse(why.into()))
        } else if self.parked() > 0 {
            Some(refuse(format!(
                "{} connections are parked past --max-open-connections, which a resize cannot move yet",
                self.parked()
            )))
        } else if to == 0 || to > MAX_WORKERS {
            Some(refuse(format!("{to} workers: give 1 to {MAX_WORKERS}")))
        } else if self.slots.iter().any(|s| s.who.serving().is_some_and(|w| w.proto == Proto::V1)) {
            Some(refuse("a version-1 worker serves: it accepts connections itself and cannot share them".into()))
        } else if to == from {
            Some(ResizeReply { ok: true, error: None, from, to, moved: 0, took_ms: 0.0, notes: Vec::new() })
        } else {
            None
        };
        if let Some(answer) = answer {
            crate::control_server::reply(&conn, &answer);
            return;
        }
        tracing::info!(from, to, connections = self.conns.len(), "changing the number of workers");
        self.resize = Some(Resize {
            from,
            to,
            t0: Instant::now(),
            waiters: vec![conn],
            moved: 0,
            notes: Vec::new(),
            error: None,
            starting: to > from,
        });
        if to > from {
            for slot in from..to {
                self.slots.push(Slot::new());
                self.begin_handoff(slot, Why::Start, false);
            }
        } else {
            self.leave_next();
        }
        self.status_dirty = true;
        self.resize_progress();
    }

    /// Fewer workers: the last slot leaves (its worker stops), unless the
    /// count is reached.
    fn leave_next(&mut self) {
        let Some(r) = &mut self.resize else { return };
        let last = self.slots.len() - 1;
        if self.slots.len() <= r.to || self.slots[last].leaving.is_some() {
            return;
        }
        let deadline = Instant::now() + self.cfg.ack_timeout;
        let s = &mut self.slots[last];
        let Who::Serving(w) = &mut s.who else {
            // It crashed meanwhile: its connections' states may be stale, so
            // they stay for its successor (which recovers them), and so does it.
            r.error.get_or_insert(format!("worker {last} is being restarted; it stays"));
            r.to = self.slots.len();
            return;
        };
        s.leaving = Some(deadline);
        tracing::info!(slot = last, pid = w.pid(), connections = s.share, "worker leaving: stopping it");
        w.send_stop();
    }

    /// A leaving slot's worker stopped (or it had none): its connections go
    /// to the others, each to the one with the fewest, and the slot goes.
    pub(crate) fn left(&mut self, slot: usize) {
        let names: Vec<String> = self.conns.iter().filter(|(_, c)| c.slot == slot).map(|(n, _)| n.clone()).collect();
        let mut moves = Vec::with_capacity(names.len());
        for name in names {
            // One at a time: each move changes who has the fewest.
            let dest = self.least_loaded();
            self.move_conn(&name, dest);
            moves.push((name, dest));
        }
        let moved = self.assign_moved(moves);
        let s = self.slots.remove(slot);
        debug_assert_eq!(s.share, 0);
        match s.who {
            Who::Serving(w) => self.retire(w),
            Who::Down { .. } => {}
            // (A leaving slot whose worker fails stops leaving: never here.)
            Who::Handoff(h) => tracing::error!(slot, pid = h.new.pid(), "a leaving slot was in a handoff"),
        }
        tracing::info!(slot, moved, "worker left; its connections went to the others");
        self.status_dirty = true;
        self.leave_next();
        self.resize_progress();
    }

    /// Moves a held connection's share to `dest` (the bookkeeping only).
    fn move_conn(&mut self, name: &str, dest: usize) {
        if let Some(c) = self.conns.get_mut(name) {
            self.slots[c.slot].share -= 1;
            c.slot = dest;
            self.slots[dest].share += 1;
        }
    }

    /// Assigns moved connections `(name, slot)` to their new slots' workers,
    /// a batch per slot, and counts them for the resize's reply.
    fn assign_moved(&mut self, moves: Vec<(String, usize)>) -> usize {
        let moved = moves.len();
        let mut to: HashMap<usize, Vec<String>> = HashMap::new();
        for (name, dest) in moves {
            to.entry(dest).or_default().push(name);
        }
        for (dest, names) in to {
            self.assign_new(dest, names);
        }
        if let Some(r) = &mut self.resize {
            r.moved += moved;
        }
        moved
    }

    /// More workers, once the new ones serve: each worker above its share
    /// gives the excess to the ones below theirs.
    fn rebalance(&mut self) {
        let n = self.slots.len();
        let total = self.conns.len();
        let want = |i: usize| total / n + usize::from(i < total % n);
        let mut need: Vec<(usize, usize)> = (0..n)
            .filter(|&i| self.slots[i].who.serving().is_some() && self.slots[i].share < want(i))
            .map(|i| (i, want(i) - self.slots[i].share))
            .collect();
        let mut notes = Vec::new();
        for donor in 0..n {
            let excess = self.slots[donor].share.saturating_sub(want(donor));
            if excess == 0 || need.is_empty() {
                continue;
            }
            let Some(w) = self.slots[donor].who.serving() else { continue };
            if w.proto != Proto::V3 {
                notes.push(format!(
                    "worker {donor} (pid {}) speaks version {} of the channel and cannot give connections back: its \
                     {excess} extra connections stay with it, and new connections even the shares out",
                    w.pid(),
                    w.proto.number()
                ));
                continue;
            }
            let mut plan = HashMap::new();
            let names = self.conns.iter().filter(|(_, c)| c.slot == donor).map(|(n, _)| n.clone()).take(excess);
            for name in names {
                let Some((dest, left)) = need.first_mut() else { break };
                plan.insert(name, *dest);
                *left -= 1;
                if *left == 0 {
                    need.remove(0);
                }
            }
            let list: Vec<(String, Option<takeover::RawState>)> = plan.keys().map(|n| (n.clone(), None)).collect();
            let msgs = match takeover::channel::encode_lists("give", &list) {
                Ok(m) => m,
                Err(e) => {
                    notes.push(format!("worker {donor}: could not encode the give ({e})"));
                    continue;
                }
            };
            tracing::info!(slot = donor, connections = plan.len(), "asking the worker to give connections back");
            let s = &mut self.slots[donor];
            s.giving = plan;
            s.give_deadline = Some(Instant::now() + self.cfg.ack_timeout);
            if let Who::Serving(w) = &mut s.who {
                w.send_raw(msgs);
            }
        }
        if let Some(r) = &mut self.resize {
            r.notes.extend(notes);
        }
    }

    /// A worker gave connections back: each goes to the slot planned for it.
    pub(crate) fn on_given(&mut self, slot: usize, names: Vec<String>) {
        let mut moves = Vec::with_capacity(names.len());
        for name in names {
            let Some(dest) = self.slots[slot].giving.remove(&name) else { continue };
            if self.conns.get(&name).is_some_and(|c| c.slot == slot) {
                self.move_conn(&name, dest);
                moves.push((name, dest));
            }
        }
        self.assign_moved(moves);
        if self.slots[slot].giving.is_empty() {
            self.slots[slot].give_deadline = None;
        }
        self.status_dirty = true;
        self.resize_progress();
    }

    /// A worker that was giving or leaving failed (it died, hung or broke
    /// the protocol): the moves it had not made are off; a leaving slot
    /// stays (its worker is restarted with its connections).
    pub(crate) fn resize_worker_failed(&mut self, slot: usize, why: &str) {
        let s = &mut self.slots[slot];
        let (gave, left) = (!s.giving.is_empty(), s.leaving.take().is_some());
        s.giving.clear();
        s.give_deadline = None;
        if let (Some(r), true) = (&mut self.resize, gave || left) {
            let what = if left { "while leaving" } else { "while giving connections back" };
            r.error.get_or_insert(format!(
                "worker {slot} {why} {what}; it is restarted with the connections it still had, and {} workers run",
                self.slots.len()
            ));
            // A slot that could not leave stays: stop shrinking.
            if left {
                r.to = self.slots.len();
            }
        }
    }

    /// Deadlines of giving and leaving workers: past one, the worker is
    /// handled as hung.
    pub(crate) fn resize_timers(&mut self, now: Instant) {
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            let late = s.leaving.is_some_and(|d| now >= d) || s.give_deadline.is_some_and(|d| now >= d);
            if late {
                let why = format!("did not answer within {:?}", self.cfg.ack_timeout);
                tracing::error!(slot, "worker {why} while the number of workers changed; killing it");
                self.worker_gone(slot, &why);
                return; // the slots may have changed; the next turn looks again
            }
        }
    }

    /// The earliest deadline of a giving or leaving worker.
    pub(crate) fn resize_deadline(&self) -> Option<Instant> {
        self.slots.iter().flat_map(|s| s.leaving.into_iter().chain(s.give_deadline)).min()
    }

    /// Moves on when a step is done; answers when all are.
    pub(crate) fn resize_progress(&mut self) {
        let Some(r) = &mut self.resize else { return };
        if r.starting {
            if self.slots.iter().any(|s| matches!(s.who, Who::Handoff(_))) {
                return;
            }
            r.starting = false;
            self.rebalance();
        }
        let busy = self.slots.iter().any(|s| s.leaving.is_some() || !s.giving.is_empty());
        let Some(r) = &self.resize else { return };
        if busy || self.slots.len() > r.to {
            return;
        }
        let r = self.resize.take().expect("a resize");
        let reply = ResizeReply {
            ok: r.error.is_none(),
            error: r.error,
            from: r.from,
            to: self.slots.len(),
            moved: r.moved,
            took_ms: r.t0.elapsed().as_secs_f64() * 1e3,
            notes: r.notes,
        };
        tracing::info!(
            from = reply.from,
            to = reply.to,
            moved = reply.moved,
            took_ms = %format!("{:.2}", reply.took_ms),
            ok = reply.ok,
            "workers changed"
        );
        for note in &reply.notes {
            tracing::warn!("{note}");
        }
        for w in r.waiters {
            crate::control_server::reply(&w, &reply);
        }
        self.status_dirty = true;
    }
}
