//! What takeoverd holds when it starts: the listeners, connections, state
//! memfd and overflow pairs systemd hands back (`LISTEN_FDS`, matched by
//! what each fd is and by name, never by position), or listeners bound from
//! `--listen`; and the fd store brought up to date with them.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use takeover::Kind;

use crate::fdstore::{self, FdStore};
use crate::overflow;
use crate::state::{StateFile, STATE_NAME};
use crate::supervisor::{Config, HeldListener};
use crate::workers::{Conns, HeldConn};

/// Everything takeoverd starts with.
#[derive(Debug)]
pub struct Restored {
    /// The listeners.
    pub listeners: Vec<HeldListener>,
    /// Connections that came back from the store.
    pub conns: Conns,
    /// The fd store, up to date.
    pub store: FdStore,
    /// The state memfd (new, or the stored one).
    pub state: StateFile,
    /// The last worker generation, from the state memfd.
    pub generation: u64,
}

/// Gathers what systemd handed us, binds `--listen` when it handed no
/// listener, and stores whatever the store does not hold yet.
pub fn restore(cfg: &Config) -> anyhow::Result<Restored> {
    let mut g = Gathered::default();
    for inh in fdstore::inherited()? {
        classify(inh, &mut g);
    }
    let mut queue = Vec::new();
    for (k, ends) in std::mem::take(&mut g.queue) {
        match ends {
            (Some(r), Some(w)) => queue.push((k, r, w)),
            _ => tracing::warn!(pair = k, "only one end of an overflow pair came back from the fd store; dropped"),
        }
    }
    let (mut store, carried) = FdStore::new(cfg.fdstore_max, queue);
    if !carried.is_empty() {
        tracing::info!(connections = carried.len(), "restored connections from the overflow queue");
    }
    // Connections that came back by name (not from the overflow queue).
    let named: HashSet<String> = g.conns.keys().cloned().collect();
    let restored_state = g.state.is_some();
    for (name, fd) in carried {
        g.conns.entry(name).or_insert(HeldConn::new(fd, None));
    }
    let Gathered { mut listeners, mut conns, state, .. } = g;
    let restored = conns.len();
    let (state, saved) = match state {
        Some(mut s) => {
            let saved = s.load();
            (s, saved)
        }
        None => (StateFile::create()?, None),
    };
    let mut generation = 0;
    if let Some(saved) = saved {
        generation = saved.generation;
        for (name, st) in saved.conns {
            if let Some(c) = conns.get_mut(&name) {
                c.state = Some(st);
            }
        }
    }
    if listeners.is_empty() {
        if cfg.listen.is_empty() {
            anyhow::bail!("no listening socket: pass --listen ADDR:PORT, or start takeoverd from a .socket unit");
        }
        for (i, addr) in cfg.listen.iter().enumerate() {
            let fd = takeover::bind_tcp(*addr, cfg.backlog).map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
            listeners.push(HeldListener { name: format!("l{i}"), fd, addr: addr.to_string() });
        }
    } else if !cfg.listen.is_empty() {
        tracing::info!("listeners came from systemd; --listen is not used");
    }
    // takeoverd accepts from its event loop: a listener from a .socket unit
    // comes blocking.
    for l in &listeners {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = OFlag::from_bits_truncate(fcntl(&l.fd, FcntlArg::F_GETFL)?);
        fcntl(&l.fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    if restored > 0 {
        tracing::info!(connections = restored, listeners = listeners.len(), "restored from the fd store");
    }

    // Listeners may come from a .socket unit rather than the store: store
    // them (systemd keeps one copy of an open file). Connections and the
    // state memfd can only have come from the store, where they still are.
    for l in &listeners {
        store.store(&l.name, l.fd.as_fd(), true);
    }
    if restored_state {
        store.mark_stored(STATE_NAME);
    } else {
        store.store(STATE_NAME, state.fd(), true);
    }
    for name in conns.keys().filter(|n| named.contains(n.as_str())) {
        store.mark_stored(name);
    }
    for (name, c) in conns.iter().filter(|(n, _)| !named.contains(n.as_str())) {
        if let Some(fd) = c.open_fd() {
            store.store(name, fd, false);
        }
    }
    store.flush(|n| conns.get(n).and_then(HeldConn::open_fd));
    Ok(Restored { listeners, conns, store, state, generation })
}

/// What systemd handed us at start, sorted.
#[derive(Default)]
struct Gathered {
    listeners: Vec<HeldListener>,
    conns: Conns,
    state: Option<StateFile>,
    /// Overflow pairs by index: (read end, write end).
    queue: HashMap<usize, (Option<OwnedFd>, Option<OwnedFd>)>,
}

/// Sorts an fd systemd handed us by what it is, never by its position.
fn classify(inh: fdstore::Inherited, g: &mut Gathered) {
    let fdstore::Inherited { name, fd } = inh;
    let is = |kind| takeover::validate(fd.as_fd(), kind).is_ok();
    if name == STATE_NAME && is(Kind::File) {
        g.state = Some(StateFile::from_fd(fd));
    } else if let Some((k, read)) = overflow::parse_end(&name).filter(|_| is(Kind::UnixSeqpacket)) {
        let slot = g.queue.entry(k).or_default();
        if read {
            slot.0 = Some(fd);
        } else {
            slot.1 = Some(fd);
        }
    } else if is(Kind::TcpListener) {
        let addr = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let name = if takeover::check_name(&name).is_ok() { name } else { format!("l{}", g.listeners.len()) };
        g.listeners.push(HeldListener { name, fd, addr });
    } else if is(Kind::TcpStream) && takeover::check_name(&name).is_ok() {
        g.conns.insert(name, HeldConn::new(fd, None));
    } else {
        tracing::warn!(%name, "ignoring an inherited fd that is none of ours (closed)");
    }
}
