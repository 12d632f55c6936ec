//! Carrying connections across a restart without naming each in the fd
//! store.
//!
//! systemd hands stored fds back with their names in one environment
//! string, which the kernel caps at 128 KiB, and systemd 252 compares every
//! fd it is asked to store with every fd already stored (a `kcmp` each):
//! storing n connections by name costs the manager O(n²) — 36 s of CPU per
//! restart at 10 000 connections on our test machine (docs/BENCHMARKS.md).
//! So past a small number of names, connections ride in the receive queue of
//! stored `SOCK_SEQPACKET` socket pairs instead: takeoverd sends them to one
//! end in batches of 253 (a `batch` message of the takeover protocol: names
//! in the JSON, fds as `SCM_RIGHTS`), and both ends of each pair sit in the
//! fd store as `ovfK-r` and `ovfK-w`. A datagram in flight keeps its fds
//! open, so after a restart the new takeoverd reads every batch back. A pair
//! holds what its send buffer allows (2 × `net.core.wmem_max` unprivileged,
//! about 6 500 connections with the kernel's default); when it is full the
//! next pair is opened. A connection that closes lingers in its pair until
//! the pair is rebuilt (drained and refilled with the live ones), which
//! happens once its dead outnumber its live.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use takeover::{wire, Entry, Kind, Message};

/// At most this many pairs (2 fds each in the store by name).
const MAX_PAIRS: usize = 64;

/// The send buffer asked for: room for about 400 batches of 253. Above
/// `net.core.wmem_max` it needs `CAP_NET_ADMIN` (`SO_SNDBUFFORCE`); without
/// it the kernel gives 2 × `wmem_max`.
const SNDBUF: usize = 8 << 20;

/// The fd-store names of pair `k`'s two ends.
pub fn end_names(k: usize) -> (String, String) {
    (format!("ovf{k}-r"), format!("ovf{k}-w"))
}

/// Which pair and which end `name` is, if it is one of ours.
pub fn parse_end(name: &str) -> Option<(usize, bool)> {
    let rest = name.strip_prefix("ovf")?;
    let (k, end) = rest.split_once('-')?;
    let k = k.parse().ok()?;
    match end {
        "r" => Some((k, true)),
        "w" => Some((k, false)),
        _ => None,
    }
}

#[derive(Debug)]
struct Pair {
    r: OwnedFd,
    w: OwnedFd,
    live: usize,
    dead: usize,
}

impl Pair {
    fn new() -> anyhow::Result<Pair> {
        let (r, w) = wire::seqpacket_pair()?;
        grow_sndbuf(w.as_fd());
        Ok(Pair { r, w, live: 0, dead: 0 })
    }

    /// Reads every batch out of the pair.
    fn drain(&mut self) -> Vec<(String, OwnedFd)> {
        let mut out = Vec::new();
        loop {
            match recv_batch(self.r.as_fd()) {
                Ok(Some(batch)) => out.extend(batch),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("reading the overflow queue: {e}");
                    break;
                }
            }
        }
        self.live = 0;
        self.dead = 0;
        out
    }
}

/// Sends one batch (at most [`wire::MAX_FDS`]) of named connections into a
/// queue pair's write end, never blocking (a full pair: `Error::Timeout`).
/// Shared with the parks of `park.rs`.
pub(crate) fn send_batch(w: BorrowedFd<'_>, batch: &[(&str, BorrowedFd<'_>)]) -> takeover::Result<()> {
    let entries: Vec<Entry> = batch
        .iter()
        .map(|(n, _)| Entry { name: n.to_string(), kind: Kind::TcpStream, state: serde_json::Value::Null })
        .collect();
    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| *fd).collect();
    takeover::manifest::send(w, &Message::Batch { seq: 0, entries }, &fds, Some(Instant::now()))
}

/// Receives the next batch from a queue pair's read end: `Ok(None)` when it
/// is empty; fds that are not TCP streams are closed and left out, and a
/// message that is not a batch is dropped (an empty batch).
pub(crate) fn recv_batch(r: BorrowedFd<'_>) -> takeover::Result<Option<Vec<(String, OwnedFd)>>> {
    match takeover::manifest::try_recv(r)? {
        Some(Some((Message::Batch { entries, .. }, fds))) if entries.len() == fds.len() => Ok(Some(
            entries
                .into_iter()
                .zip(fds)
                .filter(|(_, fd)| takeover::validate(fd.as_fd(), Kind::TcpStream).is_ok())
                .map(|(e, fd)| (e.name, fd))
                .collect(),
        )),
        Some(Some((m, _))) => {
            tracing::warn!("dropping an unexpected {} from a queue pair", m.name());
            Ok(Some(Vec::new()))
        }
        Some(None) | None => Ok(None),
    }
}

/// The queue's bookkeeping, carried across an upgrade (`ctl upgrade`)
/// together with its pairs' fds, which keep their numbers across `execve`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct OverflowSnapshot {
    /// Each pair: (read end, write end, live, dead).
    pub pairs: Vec<(i32, i32, usize, usize)>,
    /// Which pair each queued connection is in.
    pub which: Vec<(String, u16)>,
    /// Names to add at the next flush.
    pub pending: Vec<String>,
    /// Connections no pair had room for.
    pub lost: u64,
}

/// The overflow queue: one or more pairs.
#[derive(Debug, Default)]
pub struct Overflow {
    pairs: Vec<Pair>,
    /// Which pair each queued, live connection is in.
    which: HashMap<Box<str>, u16>,
    /// Names to add at the next flush.
    pending: Vec<Box<str>>,
    /// Connections no pair had room for (would not survive a restart).
    lost: u64,
}

impl Overflow {
    /// The pairs of an earlier takeoverd, from the fd store (by index), and
    /// every connection they carried.
    pub fn restore(ends: Vec<(usize, OwnedFd, OwnedFd)>) -> (Overflow, Vec<(String, OwnedFd)>) {
        let mut q = Overflow::default();
        let mut carried = Vec::new();
        let mut ends = ends;
        ends.sort_by_key(|(k, _, _)| *k);
        for (_, r, w) in ends {
            grow_sndbuf(w.as_fd());
            let mut pair = Pair { r, w, live: 0, dead: 0 };
            // Read it out now: the connections are re-queued (compactly) at
            // the first flush, and the pair reused.
            carried.extend(pair.drain());
            q.pairs.push(pair);
        }
        (q, carried)
    }

    /// What an upgraded takeoverd needs to go on with this queue.
    pub fn snapshot(&self) -> OverflowSnapshot {
        use std::os::fd::AsRawFd;
        OverflowSnapshot {
            pairs: self.pairs.iter().map(|p| (p.r.as_raw_fd(), p.w.as_raw_fd(), p.live, p.dead)).collect(),
            which: self.which.iter().map(|(n, i)| (n.to_string(), *i)).collect(),
            pending: self.pending.iter().map(|n| n.to_string()).collect(),
            lost: self.lost,
        }
    }

    /// The queue as a previous image left it; `take` hands over the fd
    /// carried under each number.
    pub fn from_snapshot(s: OverflowSnapshot, mut take: impl FnMut(i32) -> OwnedFd) -> Overflow {
        Overflow {
            pairs: s.pairs.into_iter().map(|(r, w, live, dead)| Pair { r: take(r), w: take(w), live, dead }).collect(),
            which: s.which.into_iter().map(|(n, i)| (n.into_boxed_str(), i)).collect(),
            pending: s.pending.into_iter().map(String::into_boxed_str).collect(),
            lost: s.lost,
        }
    }

    /// Both ends of every pair.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.pairs.iter().flat_map(|p| [p.r.as_fd(), p.w.as_fd()]).collect()
    }

    /// Queues `name` at the next flush.
    pub fn push(&mut self, name: &str) {
        self.pending.push(name.into());
    }

    /// Notes that `name` closed.
    pub fn remove(&mut self, name: &str) {
        if let Some(i) = self.which.remove(name) {
            let p = &mut self.pairs[i as usize];
            p.live -= 1;
            p.dead += 1;
        } else {
            self.pending.retain(|p| &**p != name);
        }
    }

    /// How many live connections the queue carries (or will after a flush).
    pub fn len(&self) -> usize {
        self.which.len() + self.pending.len()
    }

    /// How many pairs are open.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Connections no pair had room for.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Sends the pending connections (`fd_of` looks a name up, `None` once it
    /// has closed), opening new pairs as needed; `store` puts a new pair's
    /// ends in the fd store.
    pub fn flush<'a>(
        &mut self,
        fd_of: impl Fn(&str) -> Option<BorrowedFd<'a>>,
        mut store: impl FnMut(&str, BorrowedFd<'_>),
    ) {
        self.rebuild_if_wasteful(&fd_of);
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let found: Vec<(Box<str>, BorrowedFd<'a>)> =
            pending.into_iter().filter_map(|n| fd_of(&n).map(|fd| (n, fd))).collect();
        'chunks: for chunk in found.chunks(wire::MAX_FDS) {
            let batch: Vec<(&str, BorrowedFd<'_>)> = chunk.iter().map(|(n, fd)| (&**n, *fd)).collect();
            loop {
                // Never block: a full pair answers at once and the next opens.
                let sent = match self.pairs.last() {
                    Some(p) => send_batch(p.w.as_fd(), &batch),
                    None => Err(takeover::Error::Timeout("no pair yet")),
                };
                match sent {
                    Ok(()) => {
                        let i = self.pairs.len() - 1;
                        self.pairs[i].live += chunk.len();
                        self.which.extend(chunk.iter().map(|(n, _)| (n.clone(), i as u16)));
                        continue 'chunks;
                    }
                    Err(takeover::Error::Timeout(_)) if self.pairs.len() < MAX_PAIRS => match Pair::new() {
                        Ok(p) => {
                            let (r, w) = end_names(self.pairs.len());
                            store(&r, p.r.as_fd());
                            store(&w, p.w.as_fd());
                            tracing::info!(pair = self.pairs.len(), "opened an overflow queue pair");
                            self.pairs.push(p);
                        }
                        Err(e) => {
                            self.give_up(chunk.len(), &takeover::log::report(&*e));
                            continue 'chunks;
                        }
                    },
                    Err(e) => {
                        self.give_up(chunk.len(), &e.to_string());
                        continue 'chunks;
                    }
                }
            }
        }
    }

    fn give_up(&mut self, n: usize, why: &str) {
        self.lost += n as u64;
        tracing::warn!(
            connections = n,
            lost_total = self.lost,
            "no room in the overflow queue ({why}): these connections would not survive a restart of takeoverd"
        );
    }

    /// Rebuilds each pair whose closed connections outnumber its live ones.
    fn rebuild_if_wasteful<'a>(&mut self, fd_of: &impl Fn(&str) -> Option<BorrowedFd<'a>>) {
        for i in 0..self.pairs.len() {
            let p = &self.pairs[i];
            if p.dead <= 256 || p.dead <= p.live {
                continue;
            }
            let drained = self.pairs[i].drain();
            let mut still = 0;
            for (name, _fd) in drained {
                if self.which.get(name.as_str()) == Some(&(i as u16)) {
                    self.which.remove(name.as_str());
                    if fd_of(&name).is_some() {
                        self.pending.push(name.into_boxed_str());
                        still += 1;
                    }
                }
            }
            tracing::debug!(pair = i, live = still, "rebuilt an overflow queue pair");
        }
    }
}

/// Asks for [`SNDBUF`] of send buffer on a queue pair's write end.
pub(crate) fn grow_sndbuf(fd: BorrowedFd<'_>) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&fd, sockopt::SndBufForce, &SNDBUF).is_err() {
        // Without CAP_NET_ADMIN: as much as net.core.wmem_max allows.
        let _ = setsockopt(&fd, sockopt::SndBuf, &SNDBUF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_names_round_trip() {
        let (r, w) = end_names(12);
        assert_eq!(parse_end(&r), Some((12, true)));
        assert_eq!(parse_end(&w), Some((12, false)));
        assert_eq!(parse_end("ovfx-r"), None);
        assert_eq!(parse_end("c1z"), None);
    }

    #[test]
    fn a_full_pair_opens_the_next_and_everything_comes_back() {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut keep = Vec::new();
        let mut names = HashMap::new();
        for i in 0..600 {
            let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            names.insert(format!("c{i}"), OwnedFd::from(s));
            keep.push(_c);
        }
        let mut q = Overflow::default();
        for n in names.keys() {
            q.push(n);
        }
        let mut stored = Vec::new();
        q.flush(|n| names.get(n).map(|f| f.as_fd()), |n, _| stored.push(n.to_owned()));
        assert_eq!(q.len(), 600);
        assert_eq!(stored[..2], ["ovf0-r".to_owned(), "ovf0-w".to_owned()]);
        // A restart: the pairs come back and so does every connection.
        let pairs: Vec<_> = std::mem::take(&mut q.pairs).into_iter().enumerate().map(|(k, p)| (k, p.r, p.w)).collect();
        let (_q2, carried) = Overflow::restore(pairs);
        assert_eq!(carried.len(), 600);
        // Closed ones are dropped at the next rebuild, not sent again.
        let mut q = Overflow::default();
        for n in names.keys() {
            q.push(n);
        }
        q.flush(|n| names.get(n).map(|f| f.as_fd()), |_, _| {});
        let closed: Vec<String> = names.keys().take(400).cloned().collect();
        for n in &closed {
            q.remove(n);
            names.remove(n);
        }
        q.flush(|n| names.get(n).map(|f| f.as_fd()), |_, _| {});
        assert_eq!(q.len(), 200);
        assert_eq!(q.pairs[0].dead, 0, "the pair was rebuilt");
        assert_eq!(q.pairs[0].live, 200);
    }
}
