//! Carrying more connections across a restart than `LISTEN_FDNAMES` can
//! name.
//!
//! systemd hands stored fds back with their names in one environment
//! string, which the kernel caps at 128 KiB: about 14 000 of our names. Past
//! that budget, connections ride in the receive queue of a stored
//! `SOCK_SEQPACKET` socket pair instead: takeoverd sends them to one end in
//! batches of 253 (a `batch` message of the takeover protocol, names in the
//! JSON, fds as `SCM_RIGHTS`), and both ends sit in the fd store under the
//! names `overflow-r` and `overflow-w`. A datagram in flight keeps its fds
//! open, so after a restart the new takeoverd reads every batch back from
//! `overflow-r`. A connection that closes lingers in the queue until the
//! queue is rebuilt (drained and refilled with the live ones), which
//! happens once the dead outnumber the live.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use takeover::{wire, Entry, Kind, Message};

/// fd-store names of the two ends.
pub const READ_END: &str = "overflow-r";
/// See [`READ_END`].
pub const WRITE_END: &str = "overflow-w";

/// The queue's send buffer: room for about 400 batches of 253 (100 000
/// connections). Above `net.core.wmem_max` it needs `CAP_NET_ADMIN`
/// (`SO_SNDBUFFORCE`); without it the kernel gives 2 × `wmem_max`: about
/// 6 500 connections with the default 212 992, about 127 000 with 4 MiB.
const SNDBUF: usize = 8 << 20;

/// The overflow queue.
#[derive(Debug)]
pub struct Overflow {
    r: OwnedFd,
    w: OwnedFd,
    /// Connections in the queue and still open.
    live: HashSet<Box<str>>,
    /// Entries in the queue whose connection has closed since.
    dead: usize,
    /// Names to add at the next flush.
    pending: Vec<Box<str>>,
    /// Connections the queue had no room for (would not survive a restart).
    lost: u64,
}

impl Overflow {
    /// A new, empty queue.
    pub fn create() -> anyhow::Result<Overflow> {
        let (r, w) = wire::seqpacket_pair()?;
        grow_sndbuf(w.as_fd());
        Ok(Overflow { r, w, live: HashSet::new(), dead: 0, pending: Vec::new(), lost: 0 })
    }

    /// The queue of an earlier takeoverd, from the fd store, and every
    /// connection it carried (names and fds).
    pub fn restore(r: OwnedFd, w: OwnedFd) -> (Overflow, Vec<(String, OwnedFd)>) {
        grow_sndbuf(w.as_fd());
        let mut q = Overflow { r, w, live: HashSet::new(), dead: 0, pending: Vec::new(), lost: 0 };
        let conns = q.drain();
        (q, conns)
    }

    /// The two ends, for the fd store.
    pub fn ends(&self) -> [(&'static str, BorrowedFd<'_>); 2] {
        [(READ_END, self.r.as_fd()), (WRITE_END, self.w.as_fd())]
    }

    /// Queues `name` at the next flush.
    pub fn push(&mut self, name: &str) {
        self.pending.push(name.into());
    }

    /// Notes that `name` closed; `true` if it was in the queue.
    pub fn remove(&mut self, name: &str) -> bool {
        if self.live.remove(name) {
            self.dead += 1;
            true
        } else {
            self.pending.retain(|p| &**p != name);
            false
        }
    }

    /// How many live connections the queue carries (or will after a flush).
    pub fn len(&self) -> usize {
        self.live.len() + self.pending.len()
    }

    /// Connections the queue had no room for.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Sends the pending connections. `fd_of` looks a name up (`None` once
    /// it has closed).
    pub fn flush<'a>(&mut self, fd_of: impl Fn(&str) -> Option<BorrowedFd<'a>>) {
        if self.dead > 1000 && self.dead > self.live.len() {
            self.rebuild(&fd_of);
        }
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let found: Vec<(Box<str>, BorrowedFd<'a>)> =
            pending.into_iter().filter_map(|n| fd_of(&n).map(|fd| (n, fd))).collect();
        for chunk in found.chunks(wire::MAX_FDS) {
            let entries = chunk
                .iter()
                .map(|(n, _)| Entry { name: n.to_string(), kind: Kind::TcpStream, state: serde_json::Value::Null })
                .collect();
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
            match takeover::manifest::send(self.w.as_fd(), &Message::Batch { seq: 0, entries }, &fds, None) {
                Ok(()) => self.live.extend(chunk.iter().map(|(n, _)| n.clone())),
                Err(e) => {
                    self.lost += chunk.len() as u64;
                    tracing::warn!(
                        connections = chunk.len(),
                        "the overflow queue is full ({e}): these connections would not survive a restart of takeoverd"
                    );
                }
            }
        }
    }

    /// Empties the queue and refills it with the live connections.
    fn rebuild<'a>(&mut self, fd_of: &impl Fn(&str) -> Option<BorrowedFd<'a>>) {
        let drained = self.drain();
        let still: Vec<Box<str>> =
            drained.into_iter().map(|(n, _)| n.into_boxed_str()).filter(|n| fd_of(n).is_some()).collect();
        tracing::debug!(live = still.len(), dead = self.dead, "rebuilding the overflow queue");
        self.live.clear();
        self.dead = 0;
        self.pending.extend(still);
    }

    /// Reads every batch out of the queue.
    fn drain(&mut self) -> Vec<(String, OwnedFd)> {
        let mut out = Vec::new();
        loop {
            match takeover::manifest::try_recv(self.r.as_fd()) {
                Ok(Some(Some((Message::Batch { entries, .. }, fds)))) if entries.len() == fds.len() => {
                    for (e, fd) in entries.into_iter().zip(fds) {
                        if takeover::validate(fd.as_fd(), Kind::TcpStream).is_ok() {
                            out.push((e.name, fd));
                        }
                    }
                }
                Ok(Some(Some((m, _)))) => tracing::warn!("dropping an unexpected {} from the overflow queue", m.name()),
                Ok(Some(None)) | Ok(None) => break,
                Err(e) => {
                    tracing::warn!("reading the overflow queue: {e}");
                    break;
                }
            }
        }
        out
    }
}

fn grow_sndbuf(fd: BorrowedFd<'_>) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&fd, sockopt::SndBufForce, &SNDBUF).is_err() {
        // Not root: as much as net.core.wmem_max allows.
        let _ = setsockopt(&fd, sockopt::SndBuf, &SNDBUF);
    }
}
