//! Parking: takeoverd's copies of connections beyond its open-file budget
//! (`--max-open-connections`), kept in flight instead of open.
//!
//! takeoverd keeps a copy of every connection so that no worker crash or
//! handoff can lose one. A copy need not be an open file of takeoverd: an
//! fd sent over a Unix socket and not yet received stays open in the
//! socket's receive queue, and counts against no process's `RLIMIT_NOFILE`
//! (only against its sender's user's in-flight limit, which is that same
//! limit unless the sender has `CAP_SYS_ADMIN` or `CAP_SYS_RESOURCE`). So
//! once takeoverd holds more open copies than its budget, the copies of
//! connections that a serving worker has received are *parked*: sent in
//! batches of up to 253 (a takeover-protocol `batch`: names in the JSON,
//! fds as `SCM_RIGHTS`) into a `SOCK_SEQPACKET` pair of their slot, and
//! closed here. A handoff or a crash restart of the slot takes them out one
//! batch at a time, parks each batch again in a fresh pair and assigns it
//! to the new worker, so takeoverd never holds more than one batch of them
//! open. A parked connection that ends lingers in its pair until the next
//! such pass drops it.
//!
//! Only without the systemd fd store (whose overflow queue needs an open
//! copy of each connection it stores), and not across `ctl upgrade` or
//! `ctl workers` yet: both are refused while connections are parked.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use takeover::wire;

use crate::overflow::{grow_sndbuf, recv_batch, send_batch};

use crate::workers::Who;

/// One slot's parked copies: pairs, oldest first.
#[derive(Debug, Default)]
pub struct Park {
    pairs: Vec<(OwnedFd, OwnedFd)>,
    /// Connections put in and not taken out (some may have ended).
    pub count: usize,
}

impl Park {
    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Parks a batch (at most [`wire::MAX_FDS`]) of connections: on
    /// success their copies are in flight and the caller closes its own.
    pub fn put(&mut self, batch: &[(&str, BorrowedFd<'_>)]) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        for fresh in [false, true] {
            if fresh || self.pairs.is_empty() {
                let (r, w) = wire::seqpacket_pair().map_err(|e| format!("a parking pair: {e}"))?;
                grow_sndbuf(w.as_fd());
                self.pairs.push((r, w));
            }
            let (_, w) = self.pairs.last().expect("a pair");
            // Never block: a full pair answers at once, and a fresh one opens.
            match send_batch(w.as_fd(), batch) {
                Ok(()) => {
                    self.count += batch.len();
                    return Ok(());
                }
                Err(takeover::Error::Timeout(_)) if !fresh => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("a fresh parking pair had no room for one batch".into())
    }

    /// Takes the oldest batch out (its fds open again, checked to be TCP
    /// streams); `None` once the park is empty.
    pub fn take(&mut self) -> Option<Vec<(String, OwnedFd)>> {
        while let Some((r, _)) = self.pairs.first() {
            match recv_batch(r.as_fd()) {
                Ok(Some(batch)) => {
                    self.count = self.count.saturating_sub(batch.len());
                    return Some(batch);
                }
                Ok(None) => {
                    self.pairs.remove(0);
                }
                Err(e) => {
                    tracing::error!("reading a parking pair: {e}; its connections are lost to takeoverd");
                    self.pairs.remove(0);
                }
            }
        }
        self.count = 0;
        None
    }

    /// Adds `other`'s pairs after ours (a handoff rolled back: what was
    /// parked again and what was not yet taken out are both this slot's).
    pub fn append(&mut self, mut other: Park) {
        self.count += other.count;
        self.pairs.append(&mut other.pairs);
    }
}

/// How far below `--max-open-connections` a parking pass goes, so that the
/// next one waits for that many new connections.
const SLACK: usize = 1024;

impl crate::supervisor::Supervisor {
    /// Connections whose copy is parked.
    pub(crate) fn parked(&self) -> usize {
        self.conns.len() - self.open_conns
    }

    /// Parks the copies of served connections while takeoverd holds more
    /// open than its budget, and rebuilds a park whose ended connections
    /// outnumber its live ones. Only slots whose worker serves and has been
    /// sent everything (so that nothing queued for it needs a parked fd).
    pub(crate) fn park_excess(&mut self) {
        let Some(max) = self.cfg.max_open else { return };
        if self.store.enabled() || self.resize.is_some() {
            return;
        }
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            if s.parked_dead > SLACK && s.parked_dead > s.park.count / 2 && matches!(s.who, Who::Serving(_)) {
                self.rebuild_park(slot);
            }
        }
        if self.open_conns <= max {
            return;
        }
        let mut excess = self.open_conns - max.saturating_sub(SLACK.min(max / 2));
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            let Who::Serving(w) = &s.who else { continue };
            if excess == 0 || !w.drained() || !w.proto.assigns() || !s.giving.is_empty() || s.leaving.is_some() {
                continue;
            }
            let names: Vec<String> = self
                .conns
                .iter()
                .filter(|(_, c)| c.slot == slot && c.fd.is_some())
                .map(|(n, _)| n.clone())
                .take(excess)
                .collect();
            for chunk in names.chunks(wire::MAX_FDS) {
                let batch: Vec<(&str, BorrowedFd<'_>)> =
                    chunk.iter().filter_map(|n| Some((n.as_str(), self.conns.get(n)?.open_fd()?))).collect();
                if let Err(e) = self.slots[slot].park.put(&batch) {
                    self.accept_log.warn(format!(
                        "parking connections past --max-open-connections failed ({e}); takeoverd keeps them open"
                    ));
                    return;
                }
                for n in chunk {
                    if self.conns.get_mut(n).and_then(|c| c.fd.take()).is_some() {
                        self.open_conns -= 1;
                        excess = excess.saturating_sub(1);
                    }
                }
            }
            tracing::debug!(slot, parked = self.slots[slot].park.count, "parked connections past the open-file budget");
        }
    }

    /// Takes everything out of `slot`'s park and parks again only what is
    /// still parked and this slot's (ended connections' copies close).
    fn rebuild_park(&mut self, slot: usize) {
        let mut old = std::mem::take(&mut self.slots[slot].park);
        self.slots[slot].parked_dead = 0;
        while let Some(batch) = old.take() {
            let keep: Vec<(String, OwnedFd)> = batch
                .into_iter()
                .filter(|(n, _)| self.conns.get(n).is_some_and(|c| c.slot == slot && c.fd.is_none()))
                .collect();
            let refs: Vec<(&str, BorrowedFd<'_>)> = keep.iter().map(|(n, f)| (n.as_str(), f.as_fd())).collect();
            if self.slots[slot].park.put(&refs).is_err() {
                // Keep them open rather than lose takeoverd's copies.
                for (n, fd) in keep {
                    if let Some(c) = self.conns.get_mut(&n) {
                        c.fd = Some(fd);
                        self.open_conns += 1;
                    }
                }
            }
        }
        tracing::debug!(slot, parked = self.slots[slot].park.count, "rebuilt a park");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_connections_come_back_in_order_and_the_park_empties() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // Each connect accepted at once: the listen backlog is small.
        let pairs: Vec<(std::net::TcpStream, std::net::TcpStream)> = (0..300)
            .map(|_| (std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap(), l.accept().unwrap().0))
            .collect();
        let conns: Vec<&std::net::TcpStream> = pairs.iter().map(|(c, _)| c).collect();
        let names: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
        let mut park = Park::default();
        for chunk in names.iter().zip(conns).collect::<Vec<_>>().chunks(wire::MAX_FDS) {
            let batch: Vec<(&str, BorrowedFd<'_>)> = chunk.iter().map(|(n, c)| (n.as_str(), c.as_fd())).collect();
            park.put(&batch).unwrap();
        }
        assert_eq!(park.count, 300);
        let mut back = Vec::new();
        while let Some(batch) = park.take() {
            back.extend(batch.into_iter().map(|(n, _)| n));
        }
        assert_eq!(back, names);
        assert!(park.is_empty());
        assert_eq!(park.count, 0);
    }
}
