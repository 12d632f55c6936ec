//! takeoverd accepts every connection itself: the listeners are in its
//! poll while it accepts (not while a version-1 worker, which accepts
//! itself, serves or takes over), a batch per listener per loop turn, and
//! each new connection is stored and assigned to the worker of the slot
//! with the fewest connections.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};

use crate::supervisor::{Supervisor, LISTENER_BASE};
use crate::workers::HeldConn;

/// Connections accepted per listener per loop turn, so that a connect storm
/// does not starve the workers' channels.
const ACCEPT_BATCH: usize = 1024;

impl Supervisor {
    /// Puts the listeners into the poll, or takes them out, as the workers'
    /// state says who accepts.
    pub(crate) fn sync_accepting(&mut self) {
        let want = self.slots.iter().all(|s| s.who.takeoverd_accepts());
        if want == self.accepting {
            return;
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let raw = l.fd.as_raw_fd();
            let mut src = SourceFd(&raw);
            let r = if want {
                self.poll.registry().register(&mut src, Token(LISTENER_BASE + i), Interest::READABLE)
            } else {
                self.poll.registry().deregister(&mut src)
            };
            if let Err(e) = r {
                tracing::error!(listener = %l.name, "watching the listener: {e}");
            }
        }
        self.accepting = want;
        // Connections may have queued while a version-1 worker was leaving.
        self.accept_more = want;
    }

    /// Accepts what waits on every listener (a batch each) and assigns it.
    pub(crate) fn accept_all(&mut self) {
        self.accept_more = false;
        let mut fresh = Vec::new();
        for l in &self.listeners {
            for n in 0.. {
                if n == ACCEPT_BATCH {
                    self.accept_more = true;
                    break;
                }
                match takeover::channel::accept_tcp(l.fd.as_fd()) {
                    Ok(Some(fd)) => match takeover::socket_cookie(fd.as_fd()) {
                        Ok(cookie) => fresh.push((takeover::channel::conn_name(cookie), fd)),
                        Err(e) => tracing::warn!("dropping a new connection: SO_COOKIE: {e}"),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        // EMFILE/ENFILE/ENOBUFS: the connection stays in the
                        // backlog; retry shortly rather than spin.
                        self.accept_log.warn(format!(
                            "accept on {} failed: {e}; retrying every 100 ms (raise LimitNOFILE= if it is EMFILE)",
                            l.name
                        ));
                        self.accept_retry = Some(Instant::now() + Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        let mut names: Vec<Vec<String>> = vec![Vec::new(); self.slots.len()];
        for (name, fd) in fresh {
            self.store.store(&name, fd.as_fd(), false);
            let slot = self.hold(name.clone(), HeldConn::new(fd, None));
            names[slot].push(name);
        }
        for (slot, names) in names.into_iter().enumerate() {
            if !names.is_empty() {
                self.assign_new(slot, names);
            }
        }
        crate::fault::at(crate::fault::Step::Accepted, None, self.first_serving_pid());
    }
}
