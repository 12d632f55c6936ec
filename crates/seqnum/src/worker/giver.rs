//! The worker's takeover endpoint (`-t PATH`, or the path it took over
//! from with `-T`): a successor connects, says hello, and gets every
//! listener and connection offered; this worker exits once the successor
//! acks, or serves on if it does not.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use serde_json::json;
use serde_json::value::to_raw_value;
use takeover::{Item, Kind, RawState};

use super::event_loop::{Flow, Worker, MAX_PENDING_TAKERS, TAKER_BASE};
use crate::echo::conn_name;

/// A successor that connected and has not said hello yet.
pub(super) struct PendingTaker {
    pub(super) chan: OwnedFd,
    pub(super) deadline: Instant,
}

impl Worker {
    pub(super) fn on_endpoint(&mut self) -> Flow {
        loop {
            let Some(ep) = &self.endpoint else {
                return Flow::Continue;
            };
            match ep.accept() {
                Ok(Some(chan)) => {
                    if self.takers.len() >= MAX_PENDING_TAKERS {
                        self.taker_log
                            .warn(format!("refusing a takeover connection: {MAX_PENDING_TAKERS} are already waiting"));
                        continue;
                    }
                    let entry = self.takers.vacant_entry();
                    let token = Token(TAKER_BASE + entry.key());
                    if let Err(e) =
                        self.poll.registry().register(&mut SourceFd(&chan.as_raw_fd()), token, Interest::READABLE)
                    {
                        tracing::warn!("registering a takeover connection: {e}");
                        continue;
                    }
                    entry.insert(PendingTaker { chan, deadline: Instant::now() + self.ack_timeout });
                }
                Ok(None) => return Flow::Continue,
                Err(e @ takeover::Error::PeerNotAllowed { .. }) => {
                    self.taker_log.warn(format!("refused a takeover: {e}"))
                }
                Err(e) => {
                    tracing::warn!("takeover endpoint: {e}");
                    return Flow::Continue;
                }
            }
        }
    }

    pub(super) fn expire_takers(&mut self) {
        let now = Instant::now();
        let late: Vec<usize> = self.takers.iter().filter(|(_, t)| t.deadline <= now).map(|(k, _)| k).collect();
        for k in late {
            let t = self.takers.remove(k);
            let _ = self.poll.registry().deregister(&mut SourceFd(&t.chan.as_raw_fd()));
            self.taker_log.warn(format!("dropped a takeover connection that said nothing for {:?}", self.ack_timeout));
        }
    }

    pub(super) fn on_taker(&mut self, key: usize) -> Flow {
        let Some(t) = self.takers.try_remove(key) else {
            return Flow::Continue;
        };
        let _ = self.poll.registry().deregister(&mut SourceFd(&t.chan.as_raw_fd()));
        let chan = t.chan;
        let pid = match takeover::read_hello(chan.as_fd(), Some(Instant::now() + Duration::from_millis(50))) {
            Ok(pid) => pid,
            Err(e) => {
                self.taker_log.warn(format!("takeover request rejected: {e}"));
                return Flow::Continue;
            }
        };
        tracing::info!(
            pid,
            listeners = self.listeners.len(),
            connections = self.conns.len(),
            "handing over to a successor"
        );
        let started = Instant::now();
        match self.give(chan.as_fd()) {
            Ok(()) => {
                tracing::info!(pid, elapsed_us = started.elapsed().as_micros() as u64, "handoff acked; exiting");
                Flow::Exit(0)
            }
            Err(e) => {
                tracing::warn!(pid, "handoff failed, resuming service: {e}");
                self.poke_all();
                Flow::Continue
            }
        }
    }

    /// Every socket's name, kind, fd and state (raw JSON), for a successor.
    fn items(&self) -> Vec<(String, Kind, std::os::fd::BorrowedFd<'_>, RawState)> {
        let mut out = Vec::with_capacity(self.listeners.len() + self.conns.len());
        for l in &self.listeners {
            let state = to_raw_value(&json!({"addr": l.addr})).expect("state serialises");
            out.push((l.name.clone(), Kind::TcpListener, l.sock.as_fd(), state));
        }
        for (_, c) in &self.conns {
            let state = to_raw_value(&c.state()).expect("state serialises");
            out.push((conn_name(c.cookie), Kind::TcpStream, c.stream.as_fd(), state));
        }
        out
    }

    /// Offers everything on `chan` and waits for the ack. We are stopped at
    /// message boundaries: nothing is read or accepted until this returns.
    fn give(&self, chan: std::os::fd::BorrowedFd<'_>) -> takeover::Result<()> {
        let deadline = Some(Instant::now() + self.ack_timeout);
        let all = self.items();
        let items: Vec<Item<'_>> =
            all.iter().map(|(name, kind, fd, state)| Item { name, kind: *kind, fd: *fd, state: Some(state) }).collect();
        takeover::offer(chan, &items, &serde_json::Value::Null, false, deadline)?;
        takeover::await_ack(chan, deadline)
    }
}
