//! The worker's side of takeoverd's channel (fd 3, `TAKEOVERD_FD`):
//! version 2 through the library's [`takeover::worker::Supervisor`]
//! (takeoverd assigns every connection, we are staged while our predecessor
//! serves, and stop and report only what changed), and version 1 by hand
//! (we accept and report `opened`; `quiesce` reports every state), kept for
//! tests that takeoverd still serves workers built before version 2.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use serde_json::value::to_raw_value;
use takeover::control as v1;
use takeover::worker::{Assigned, Event, Supervisor};
use takeover::RawState;

use super::event_loop::{Flow, Worker};
use crate::echo::{conn_name, cookie_of_name, ConnState, EchoConn};

/// The channel to takeoverd, in the version the worker speaks.
#[derive(Debug)]
pub(super) enum Control {
    /// Version 1: the raw channel.
    V1(OwnedFd),
    /// Version 2: the library's worker side.
    V2(Supervisor),
}

impl Worker {
    /// Handles every message takeoverd has sent.
    pub(super) fn on_control(&mut self) -> Flow {
        loop {
            let flow = match &mut self.control {
                None => return Flow::Continue,
                Some(Control::V2(sup)) => match sup.next_event() {
                    Ok(None) => return Flow::Continue,
                    Ok(Some(event)) => self.on_v2(event),
                    Err(e) => {
                        // The library told takeoverd (nack); it holds every connection.
                        tracing::error!("control channel: {e}; stopping");
                        return Flow::Exit(1);
                    }
                },
                Some(Control::V1(chan)) => match takeover::manifest::try_recv(chan.as_fd()) {
                    Ok(None) => return Flow::Continue,
                    Ok(Some(Some((msg, _fds)))) => self.on_v1(msg),
                    Ok(Some(None)) => return takeoverd_gone(),
                    Err(e) => {
                        tracing::error!("control channel: {e}; stopping");
                        return Flow::Exit(1);
                    }
                },
            };
            if matches!(flow, Flow::Exit(_)) {
                return flow;
            }
        }
    }

    /// The version-2 channel; the event loop only calls this when there is one.
    fn supervisor(&self) -> &Supervisor {
        match &self.control {
            Some(Control::V2(sup)) => sup,
            _ => unreachable!("version-2 messages come only on a version-2 channel"),
        }
    }

    fn on_v2(&mut self, event: Event) -> Flow {
        match event {
            Event::Assign(conns) => return self.assigned(conns),
            Event::Release(names) => {
                for name in names {
                    if let Some(key) = self.key_of(&name) {
                        // Ended before we served it: close our copy quietly.
                        let conn = self.conns.remove(key);
                        self.by_cookie.remove(&conn.cookie);
                        let mut stream = conn.stream;
                        let _ = self.poll.registry().deregister(&mut stream);
                    }
                }
            }
            Event::Sync => {
                // Answered at the end of the loop turn that finds no more
                // events waiting: each connection registered raised one, and
                // every event until `ready` is our predecessor's to serve.
                self.sync_pending = true;
                self.sync_fresh = true;
            }
            Event::State(entries) => {
                for e in entries {
                    let Some(key) = self.key_of(&e.name) else { continue };
                    // `null` clears: back at a message boundary.
                    let state = serde_json::from_value::<Option<ConnState>>(e.state).ok().flatten().unwrap_or_default();
                    if let Some(c) = self.conns.get_mut(key) {
                        c.set_state(state);
                        if c.phase() != 0 {
                            // Ours to report at our own stop, even if never served.
                            self.mid_message.insert(key);
                        }
                    }
                }
            }
            Event::Wake(names) => {
                for name in names {
                    if let Some(key) = self.key_of(&name) {
                        self.defer(key);
                    }
                }
            }
            Event::Serve { recovered } => {
                if recovered && !self.conns.is_empty() {
                    tracing::info!(
                        "no worker stopped cleanly before us; reconciling every connection with the kernel's byte counters"
                    );
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        let failed = self.conns.get_mut(key).map(|c| c.reconcile().is_err()).unwrap_or(false);
                        if failed {
                            self.close(key, crate::echo::End::Reset);
                        } else {
                            if self.conns.get(key).is_some_and(|c| c.phase() != 0) {
                                self.mid_message.insert(key);
                            }
                            self.defer(key);
                        }
                    }
                }
                self.serving = true;
                if let Err(e) = self.supervisor().serving(self.conns.len()) {
                    tracing::error!("telling takeoverd we serve: {e}");
                    return Flow::Exit(1);
                }
                tracing::info!(connections = self.conns.len(), woken = self.ready.len(), "serving for takeoverd");
            }
            Event::Stop => {
                // Answered at the end of this loop turn, once the events
                // already here are remembered (see `report_stopped`).
                self.serving = false;
                self.record = true;
                self.stop_pending = true;
            }
            Event::Resume => {
                tracing::info!("handoff abandoned by takeoverd; serving again");
                self.serving = true;
                self.stop_pending = false;
            }
            Event::Exit => {
                tracing::info!(connections = self.conns.len(), "handed over; exiting");
                // Closing every connection is background work: our successor serves.
                takeover::priority::wind_down();
                return Flow::Exit(0);
            }
            Event::Gone => return takeoverd_gone(),
            Event::Give(names) => return self.give_back(names),
        }
        Flow::Continue
    }

    /// Hands connections back for another worker (version 3): between two
    /// events every connection is at a message boundary as far as this loop
    /// goes; what takeoverd does not know of it (a state changed since it
    /// was last told, work left) is told, and our copy is closed without a
    /// shutdown. A name we no longer hold was closed and told already.
    fn give_back(&mut self, names: Vec<String>) -> Flow {
        let mut states = Vec::new();
        let mut wakes = Vec::new();
        let mut given = Vec::new();
        let mut gone = std::collections::HashSet::new();
        for name in names {
            let Some(key) = self.key_of(&name) else { continue };
            let mut conn = self.conns.remove(key);
            self.by_cookie.remove(&conn.cookie);
            gone.insert(key);
            if self.blocked.remove(&key) || conn.queued {
                wakes.push(name.clone());
            }
            if self.mid_message.remove(&key) {
                states.push((name.clone(), to_raw_value(&conn.state()).expect("state serialises")));
            }
            let _ = self.poll.registry().deregister(&mut conn.stream);
            drop(conn);
            given.push(name);
        }
        self.ready.retain(|k| !gone.contains(k));
        match self.supervisor().given(&states, &wakes, &given) {
            Ok(()) => {
                tracing::info!(
                    given = given.len(),
                    states = states.len(),
                    wake = wakes.len(),
                    connections = self.conns.len(),
                    "gave connections to another worker"
                );
                Flow::Continue
            }
            Err(e) => {
                tracing::error!("reporting to takeoverd: {e}; exiting (takeoverd holds every connection)");
                Flow::Exit(1)
            }
        }
    }

    /// Connections takeoverd gives us: served at once if we serve, else held.
    fn assigned(&mut self, conns: Vec<Assigned>) -> Flow {
        for Assigned { name, state, fd } in conns {
            let stream = std::net::TcpStream::from(fd);
            let state: ConnState = state.and_then(|s| serde_json::from_str(s.get()).ok()).unwrap_or_default();
            let adopted = stream
                .set_nonblocking(true)
                .and_then(|()| stream.set_nodelay(true))
                .and_then(|()| EchoConn::staged(mio::net::TcpStream::from_std(stream), &name, state))
                .and_then(|c| {
                    let mid = c.phase() != 0;
                    let key = self.add_conn(c)?;
                    if mid {
                        // Ours to report at our own stop, even if never served.
                        self.mid_message.insert(key);
                    }
                    Ok(key)
                });
            if let Err(e) = adopted {
                // Out of fds or the like: we cannot serve what we cannot hold.
                let reason = format!("cannot take connection {name}: {e}");
                tracing::error!("{reason}; exiting (takeoverd holds it)");
                let _ = self.supervisor().nack(&reason);
                return Flow::Exit(1);
            }
        }
        Flow::Continue
    }

    fn key_of(&self, name: &str) -> Option<usize> {
        self.by_cookie.get(&cookie_of_name(name)?).copied()
    }

    /// Tells takeoverd we hold every connection it assigned: events from
    /// now on are remembered for when we serve.
    pub(super) fn report_ready(&mut self) -> Flow {
        self.forget_deferred();
        self.record = true;
        self.leave_background();
        if let Err(e) = self.supervisor().ready(self.conns.len()) {
            tracing::error!("telling takeoverd we are ready: {e}");
            return Flow::Exit(1);
        }
        Flow::Continue
    }

    /// Tells takeoverd we stopped: the states it does not know (a
    /// connection in the middle of a message) and the connections with work
    /// left (events not served, a blocked echo). Everything else is in the
    /// kernel, where the successor finds it.
    pub(super) fn report_stopped(&mut self) -> Flow {
        let mut wake: Vec<usize> = self.ready.iter().copied().collect();
        wake.extend(self.blocked.iter().copied());
        let wakes: Vec<String> = wake.iter().filter_map(|k| self.conns.get(*k)).map(|c| conn_name(c.cookie)).collect();
        let states: Vec<(String, RawState)> = self
            .mid_message
            .iter()
            .filter_map(|k| self.conns.get(*k))
            .map(|c| (conn_name(c.cookie), to_raw_value(&c.state()).expect("state serialises")))
            .collect();
        // Reported: only those still in the middle of a message stay news.
        let conns = &self.conns;
        self.mid_message.retain(|k| conns.get(*k).is_some_and(|c| c.phase() != 0));
        match self.supervisor().stopped(&states, &wakes) {
            Ok(()) => {
                tracing::info!(
                    connections = self.conns.len(),
                    states = states.len(),
                    wake = wakes.len(),
                    "stopped for a handoff"
                );
                Flow::Continue
            }
            Err(e) => {
                tracing::error!("reporting to takeoverd: {e}; exiting (takeoverd holds every connection)");
                Flow::Exit(1)
            }
        }
    }

    fn on_v1(&mut self, msg: v1::ToWorker) -> Flow {
        let Some(Control::V1(chan)) = &self.control else { return Flow::Continue };
        match msg {
            v1::ToWorker::Quiesce => {
                self.serving = false;
                let states: Vec<(String, RawState)> = self
                    .conns
                    .iter()
                    .map(|(_, c)| (conn_name(c.cookie), to_raw_value(&c.state()).expect("state serialises")))
                    .collect();
                let deadline = Some(Instant::now() + self.ack_timeout);
                if let Err(e) = takeover::control::report_quiesced(chan.as_fd(), &states, deadline) {
                    tracing::error!("reporting state to takeoverd: {e}; resuming");
                    self.serving = true;
                    self.poke_all();
                } else {
                    tracing::info!(connections = states.len(), "quiesced for a handoff");
                }
            }
            v1::ToWorker::Resume => {
                tracing::info!("handoff abandoned by takeoverd; serving again");
                self.serving = true;
                self.poke_all();
            }
            v1::ToWorker::Ping => {
                let deadline = Some(Instant::now() + self.ack_timeout);
                if let Err(e) = takeover::manifest::send(chan.as_fd(), &v1::FromWorker::Pong, &[], deadline) {
                    tracing::warn!("answering takeoverd's ping: {e}");
                }
            }
            v1::ToWorker::Exit => {
                tracing::info!(connections = self.conns.len(), "handed over; exiting");
                return Flow::Exit(0);
            }
        }
        Flow::Continue
    }
}

fn takeoverd_gone() -> Flow {
    tracing::error!("takeoverd went away; stopping without touching the sockets (its successor will serve them)");
    Flow::Exit(1)
}
