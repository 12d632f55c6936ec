//! The handoff to a worker that speaks version 1 of the channel (it
//! accepts itself and reports `opened`; docs/PROTOCOL.md): stop the old
//! worker, offer the new one every listener and connection over the
//! takeover protocol, wait for its ack, commit. Synchronous, as version 1
//! is: clients pause for all of it. And the old worker's side when *it*
//! speaks version 1: its states after `quiesce`.

use std::os::fd::AsFd;
use std::time::Instant;

use mio::Token;
use takeover::channel::ToWorker;
use takeover::control as v1;
use takeover::{Item, Kind, RawState};

use crate::fault::Step as Fault;
use crate::supervisor::Supervisor;
use crate::workers::{Step, Who};

impl Supervisor {
    /// A version-1 old worker reports its states after `quiesce`: they all
    /// go to the new worker, which serves every connection once (a version-1
    /// worker cannot say which have work left).
    pub(crate) fn on_handoff_v1_quiesce(
        &mut self,
        slot: usize,
        token: Token,
        msg: v1::FromWorker,
    ) -> Result<(), String> {
        let Who::Handoff(h) = &mut self.slots[slot].who else { return Err("state outside a handoff".into()) };
        if h.step != Step::Stopping || h.old.as_ref().is_none_or(|o| o.token != token) {
            return Err(format!("unexpected {} from a worker", msg.name()));
        }
        match msg {
            v1::FromWorker::State { entries } => {
                h.new.send(&ToWorker::State { entries: entries.clone() });
                self.update_states(entries);
            }
            v1::FromWorker::Quiesced { .. } => {
                let all: Vec<(String, Option<RawState>)> =
                    self.conns.iter().filter(|(_, c)| c.slot == slot).map(|(n, _)| (n.clone(), None)).collect();
                let wakes = takeover::channel::encode_lists("wake", &all).map_err(|e| e.to_string())?;
                let Who::Handoff(h) = &mut self.slots[slot].who else { return Ok(()) };
                h.new.send_raw(wakes);
                self.old_stopped(slot);
            }
            _ => {}
        }
        Ok(())
    }

    /// The new worker speaks version 1: stop the old one, offer it every
    /// listener and connection, wait for its ack, commit. Synchronous, as in
    /// version 1: clients pause for all of it.
    pub(crate) fn legacy_handoff(&mut self, slot: usize) {
        let Who::Handoff(h) = &mut self.slots[slot].who else { return };
        let deadline = Instant::now() + self.cfg.ack_timeout;
        let mut old = h.old.take();
        let mut recovered = h.recovered;
        let stop_at = Instant::now();
        if let Some(o) = &mut old {
            if let Err(e) = self.stop_blocking(slot, o, deadline) {
                tracing::warn!(pid = o.pid(), "old worker failed to stop ({e}); killing it, the new one recovers");
                self.unwatch(o);
                let mut proc = old.take().expect("old").proc;
                proc.kill();
                recovered = true;
            }
        }
        let Who::Handoff(h) = &mut self.slots[slot].who else { return };
        h.stop_at = Some(stop_at);
        h.recovered = recovered;
        h.old = old;
        let offered = self.offer_v1(slot, recovered, deadline);
        let Who::Handoff(h) = &mut self.slots[slot].who else { return };
        match offered {
            Ok(()) => {
                h.step = Step::Committing;
                h.ready_at = Some(Instant::now());
                self.commit(slot);
            }
            Err(e) => {
                // Resume goes out with the rollback (the old one was stopped).
                h.step = Step::Stopping;
                self.rollback(slot, &format!("did not take the version-1 handoff ({e})"));
            }
        }
    }

    /// The version-1 offer of every listener and connection to the new worker.
    fn offer_v1(&self, slot: usize, recovered: bool, deadline: Instant) -> takeover::Result<()> {
        let Who::Handoff(h) = &self.slots[slot].who else { return Ok(()) };
        let mut items = Vec::with_capacity(self.listeners.len() + self.conns.len());
        for l in &self.listeners {
            items.push(Item { name: &l.name, kind: Kind::TcpListener, fd: l.fd.as_fd(), state: None });
        }
        for (name, c) in self.conns.iter().filter(|(_, c)| c.slot == slot) {
            // (Never parked: a version-1 worker's slot does not park.)
            let Some(fd) = c.open_fd() else { continue };
            items.push(Item { name, kind: Kind::TcpStream, fd, state: c.state.as_deref() });
        }
        let app = serde_json::json!({ "generation": self.generation + 1 });
        takeover::offer(h.new.chan(), &items, &app, recovered, Some(deadline))?;
        self.inject(slot, Fault::SocketsSent);
        takeover::await_ack(h.new.chan(), Some(deadline))
    }
}
