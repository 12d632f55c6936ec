//! systemd's fd store: every listener and live connection is stored under a
//! name of its own (`FDSTORE=1`, `FDNAME=`), removed when it ends, and comes
//! back as `LISTEN_FDS`/`LISTEN_FDNAMES` when the service restarts.
//!
//! `LISTEN_FDNAMES` is a single environment string, and the kernel refuses
//! an exec whose one string exceeds 128 KiB (`MAX_ARG_STRLEN`). If the
//! stored names did not fit, systemd could not start the service at all, so
//! the store keeps a byte budget and stores no connection beyond it (it is
//! still served; it would not survive a restart of takeoverd).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use sd_notify::NotifyState;

use crate::overflow::{self, Overflow};

/// `MAX_ARG_STRLEN`: the longest single environment string exec accepts.
const MAX_ENV_STRING: usize = 32 * 4096;

/// Bytes of `LISTEN_FDNAMES` we allow ourselves: the kernel's limit less the
/// `LISTEN_FDNAMES=` prefix, the NUL, and a margin.
pub const NAMES_BUDGET: usize = MAX_ENV_STRING - "LISTEN_FDNAMES=".len() - 1 - 1024;

/// The store's bookkeeping, carried across an upgrade (`ctl upgrade`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StoreSnapshot {
    /// Whether systemd is there.
    pub enabled: bool,
    /// The names stored.
    pub stored: Vec<String>,
    /// The `--fdstore-max` in force.
    pub max_fds: usize,
    /// The overflow queue.
    pub overflow: crate::overflow::OverflowSnapshot,
}

/// The fd store, or nothing when not running under systemd.
#[derive(Debug)]
pub struct FdStore {
    enabled: bool,
    /// Name → bytes it takes in `LISTEN_FDNAMES` (name + separator).
    stored: HashMap<Box<str>, u16>,
    used: usize,
    max_fds: usize,
    /// Where connections go once `max_fds` names are used.
    overflow: Overflow,
}

impl FdStore {
    /// Enabled when `NOTIFY_SOCKET` is set. At most `max_fds` fds are stored
    /// by name (the essentials always are); connections past that ride in
    /// the overflow queue. `queue` holds the overflow pairs an earlier
    /// takeoverd stored (already in the store); the connections they carried
    /// are returned.
    pub fn new(max_fds: usize, queue: Vec<(usize, OwnedFd, OwnedFd)>) -> (FdStore, Vec<(String, OwnedFd)>) {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut store = FdStore { enabled, stored: HashMap::new(), used: 0, max_fds, overflow: Overflow::default() };
        if !enabled {
            return (store, Vec::new());
        }
        for (k, _, _) in &queue {
            let (r, w) = overflow::end_names(*k);
            store.mark_stored(&r);
            store.mark_stored(&w);
        }
        let (overflow, carried) = Overflow::restore(queue);
        store.overflow = overflow;
        (store, carried)
    }

    /// What an upgraded takeoverd needs to go on with this store.
    pub fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot {
            enabled: self.enabled,
            stored: self.stored.keys().map(|n| n.to_string()).collect(),
            max_fds: self.max_fds,
            overflow: self.overflow.snapshot(),
        }
    }

    /// The store as a previous image left it (systemd still holds every fd
    /// it names); `take` hands over the fd carried under each number.
    pub fn from_snapshot(s: StoreSnapshot, take: impl FnMut(i32) -> OwnedFd) -> FdStore {
        let mut store = FdStore {
            enabled: s.enabled,
            stored: HashMap::new(),
            used: 0,
            max_fds: s.max_fds,
            overflow: Overflow::from_snapshot(s.overflow, take),
        };
        for name in s.stored {
            store.mark_stored(&name);
        }
        store
    }

    /// The overflow pairs' fds (both ends of each).
    pub fn pair_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.overflow.fds()
    }

    /// Whether a service manager is there to store fds.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records `name` as stored without sending it: it came back from the
    /// store, where it still is. (Sending it again would cost systemd a
    /// comparison with every stored fd, for nothing.)
    pub fn mark_stored(&mut self, name: &str) {
        if self.enabled && !self.stored.contains_key(name) {
            self.stored.insert(name.into(), (name.len() + 1) as u16);
            self.used += name.len() + 1;
        }
    }

    /// Stores `fd` as `name`. `essential` entries (listeners, the state, the
    /// overflow pairs) are stored by name even past the limits; a
    /// connection past them goes to the overflow queue at the next
    /// [`flush`](Self::flush). Returns whether it is (or will be) kept.
    pub fn store(&mut self, name: &str, fd: BorrowedFd<'_>, essential: bool) -> bool {
        if !self.enabled {
            return false;
        }
        if self.stored.contains_key(name) {
            return true;
        }
        let cost = name.len() + 1;
        if !essential && (self.used + cost > NAMES_BUDGET || self.stored.len() + 1 > self.max_fds) {
            self.overflow.push(name);
            return true;
        }
        match sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd]) {
            Ok(()) => {
                self.stored.insert(name.into(), cost as u16);
                self.used += cost;
                true
            }
            Err(e) => {
                tracing::warn!(%name, "storing an fd with systemd failed: {e}");
                false
            }
        }
    }

    /// Forgets `name` (no-op if it was never stored).
    pub fn remove(&mut self, name: &str) {
        if let Some(cost) = self.stored.remove(name) {
            self.used -= cost as usize;
            if let Err(e) = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]) {
                tracing::warn!(%name, "removing an fd from the systemd store failed: {e}");
            }
        } else if self.enabled {
            self.overflow.remove(name);
        }
    }

    /// Sends connections waiting for the overflow queue.
    pub fn flush<'a>(&mut self, fd_of: impl Fn(&str) -> Option<BorrowedFd<'a>>) {
        if !self.enabled {
            return;
        }
        let mut q = std::mem::take(&mut self.overflow);
        q.flush(fd_of, |name, fd| {
            self.store(name, fd, true);
        });
        self.overflow = q;
    }

    /// How many fds are stored by name.
    pub fn len(&self) -> usize {
        self.stored.len()
    }

    /// How many connections ride in the overflow queue.
    pub fn overflowed(&self) -> usize {
        self.overflow.len()
    }

    /// Socket pairs of the overflow queue.
    pub fn pairs(&self) -> usize {
        self.overflow.pairs()
    }

    /// Connections that could be kept neither way.
    pub fn lost(&self) -> u64 {
        self.overflow.lost()
    }
}

/// Sends a plain notification (READY=1, STATUS=..., ...); a failure is
/// logged, never fatal.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// `MONOTONIC_USEC=` now: sent with `RELOADING=1`, as `Type=notify-reload`
/// (systemd 253+) asks, so that systemd can tell this reload from an earlier
/// one; older systemd ignores it.
pub fn monotonic_usec() -> NotifyState<'static> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as i128 * 1_000_000 + t.tv_nsec() as i128 / 1000)
        .unwrap_or(0);
    NotifyState::MonotonicUsec(now)
}

/// What `EXTEND_TIMEOUT_USEC=` asks for while a reload or an upgrade runs:
/// room for every deadline of a handoff (each step has `ack_timeout`), so
/// that systemd's reload job (`TimeoutStartSec=` applies) never times out a
/// handoff that is still within its own deadlines.
pub fn extend_usec(ack_timeout: std::time::Duration) -> u32 {
    (ack_timeout * 4).as_micros().min(u32::MAX as u128) as u32
}

/// One fd handed to us at start (`LISTEN_FDS`), with its name.
#[derive(Debug)]
pub struct Inherited {
    /// Its `LISTEN_FDNAMES` entry.
    pub name: String,
    /// The fd.
    pub fd: OwnedFd,
}

/// Takes every fd systemd passed (socket units and the fd store alike),
/// and drops duplicates of the same open socket (a socket unit's listener
/// we also stored comes back twice).
///
/// The `LISTEN_*` variables stay in our environment (removing them is
/// unsound whenever another thread may read the environment, and takeoverd
/// runs threads: the stderr forwarders, the reaper); workers are started without them (`PRIVATE_ENV` in worker.rs), and
/// the fds themselves are close-on-exec, taken once
/// (`takeover::take_raw_inherited`).
pub fn inherited() -> anyhow::Result<Vec<Inherited>> {
    let pid_ok = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count: usize = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    if !pid_ok || count == 0 {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = if names.is_empty() { Vec::new() } else { names.split(':').collect() };
    let mut out = Vec::with_capacity(count);
    let mut seen = std::collections::HashSet::new();
    for i in 0..count {
        let raw = 3 + i as i32;
        let fd = takeover::take_raw_inherited(raw)?;
        let name = names.get(i).copied().unwrap_or("unknown").to_owned();
        let st = nix::sys::stat::fstat(fd.as_fd())?;
        if !seen.insert((st.st_dev, st.st_ino)) {
            tracing::debug!(%name, "dropping a second copy of an inherited socket");
            continue;
        }
        out.push(Inherited { name, fd });
    }
    Ok(out)
}
