//! The control socket's server side (`takeoverd ctl ...` is the client, in
//! `ctl.rs`): a 0600 `SOCK_SEQPACKET` socket, one JSON request and one JSON
//! reply per connection. A reload request is answered when its reload ends;
//! requests that arrive meanwhile join it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};

use crate::supervisor::{Supervisor, CTL_CONN_BASE};
use takeoverd::protocol::Request;
use takeoverd::status::ReloadRecord;

/// Control connections that may wait for their request at once, and for how
/// long: a peer that connects and never speaks costs an fd for that long.
const MAX_CTL_CONNS: usize = 64;
const CTL_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Supervisor {
    pub(crate) fn on_ctl_accept(&mut self) {
        loop {
            match self.ctl.accept() {
                Ok(Some(conn)) => {
                    if self.ctl_conns.len() >= MAX_CTL_CONNS {
                        self.ctl_log
                            .warn(format!("refusing a control connection: {MAX_CTL_CONNS} are already waiting"));
                        continue;
                    }
                    let entry = self.ctl_conns.vacant_entry();
                    let token = Token(CTL_CONN_BASE + entry.key());
                    let registered =
                        self.poll.registry().register(&mut SourceFd(&conn.as_raw_fd()), token, Interest::READABLE);
                    if registered.is_ok() {
                        entry.insert((conn, Instant::now() + CTL_REQUEST_TIMEOUT));
                    }
                }
                Ok(None) => return,
                Err(e @ takeover::Error::PeerNotAllowed { .. }) => self.ctl_log.warn(format!("control socket: {e}")),
                Err(e) => {
                    // EMFILE and the like: the connection waits in the
                    // backlog; retry on a timer instead of spinning.
                    self.ctl_log.warn(format!("control socket: {e}; retrying in 100 ms"));
                    self.ctl_retry = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    /// Forgets a control connection (closing it when the caller drops it).
    fn take_ctl(&mut self, key: usize) -> Option<OwnedFd> {
        let (conn, _) = self.ctl_conns.try_remove(key)?;
        let _ = self.poll.registry().deregister(&mut SourceFd(&conn.as_raw_fd()));
        Some(conn)
    }

    /// The earliest deadline of a control connection, or of the accept retry.
    pub(crate) fn ctl_deadline(&self) -> Option<Instant> {
        self.ctl_conns.iter().map(|(_, (_, d))| *d).chain(self.ctl_retry).min()
    }

    pub(crate) fn ctl_timers(&mut self, now: Instant) {
        let late: Vec<usize> = self.ctl_conns.iter().filter(|(_, (_, d))| *d <= now).map(|(k, _)| k).collect();
        for key in late {
            self.take_ctl(key);
            self.ctl_log
                .warn(format!("closed a control connection that sent no request within {CTL_REQUEST_TIMEOUT:?}"));
        }
        if self.ctl_retry.is_some_and(|t| now >= t) {
            self.ctl_retry = None;
            self.on_ctl_accept();
        }
    }

    pub(crate) fn on_ctl_request(&mut self, key: usize) {
        let Some(conn) = self.take_ctl(key) else { return };
        let Some(req) = read_request(&conn) else { return };
        match req {
            Request::Status => reply(&conn, &self.status()),
            Request::Reload => {
                tracing::info!("reload requested on the control socket");
                self.request_reload(Some(conn));
            }
            Request::Upgrade => {
                tracing::info!("in-place upgrade requested on the control socket");
                self.upgrade(conn);
            }
            Request::Workers { count } => {
                tracing::info!(count, "a change of the number of workers requested on the control socket");
                self.request_resize(count, conn);
            }
        }
    }
}

fn read_request(conn: &OwnedFd) -> Option<Request> {
    let deadline = Some(Instant::now() + Duration::from_millis(100));
    match takeover::wire::recv(conn.as_fd(), deadline) {
        Ok(Some(msg)) => match serde_json::from_slice::<Request>(&msg.bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("bad control request: {e}");
                reply(conn, &serde_json::json!({ "error": format!("bad request: {e}") }));
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("control request: {e}");
            None
        }
    }
}

/// Sends one reply and forgets the connection.
pub(crate) fn reply(conn: &OwnedFd, body: &impl serde::Serialize) {
    let bytes = serde_json::to_vec(body).expect("replies serialise");
    if let Err(e) = takeover::wire::send(conn.as_fd(), &bytes, &[], Some(Instant::now() + Duration::from_secs(1))) {
        tracing::warn!("answering on the control socket: {e}");
    }
}

/// Answers every control connection that waited for a reload.
pub(crate) fn answer_reload(waiters: Vec<OwnedFd>, rec: &ReloadRecord) {
    for conn in waiters {
        reply(&conn, rec);
    }
}
