//! A worker's side of takeoverd's supervisor channel (version 2), for any
//! event loop: what a Rust service needs to run under takeoverd.
//!
//! takeoverd starts a worker with its end of a `SOCK_SEQPACKET` channel in
//! `$TAKEOVERD_FD`. [`Supervisor::from_env`] takes it and says `hello`.
//! Register [`Supervisor::as_fd`] for readability in your event loop (epoll,
//! mio, tokio's `AsyncFd`, a `poll` loop) and on every wakeup call
//! [`Supervisor::next_event`] until it returns `Ok(None)`. It answers takeoverd's
//! pings itself; every other message becomes an [`Event`] that says what to
//! do and which method answers it:
//!
//! | event                | what the worker does                                  | answer            |
//! |----------------------|-------------------------------------------------------|-------------------|
//! | [`Event::Assign`]    | holds the connections; reads them only while serving | —                 |
//! | [`Event::Release`]   | closes its copies (they ended before it served)       | —                 |
//! | [`Event::Sync`]      | finishes registering what it was assigned             | [`Supervisor::ready`] |
//! | [`Event::State`]     | replaces those connections' states                    | —                 |
//! | [`Event::Wake`]      | serves those at once when serving starts              | —                 |
//! | [`Event::Serve`]     | starts serving (`recovered`: states may be stale)    | [`Supervisor::serving`] |
//! | [`Event::Stop`]      | stops at a message boundary                           | [`Supervisor::stopped`] |
//! | [`Event::Resume`]    | serves again (the handoff after a stop failed)        | —                 |
//! | [`Event::Exit`]      | closes everything and exits 0 (a successor serves)    | —                 |
//! | [`Event::Gone`]      | exits 1 *without* touching the sockets                | —                 |
//! | [`Event::Give`]      | (version 3) stops serving those at a message boundary and closes its copies | [`Supervisor::given`] |
//!
//! [`Supervisor::from_env`] speaks version 2. A worker that can hand some of
//! its connections back while it serves (so that `takeoverd ctl workers N`
//! can move them to another worker) starts with
//! [`Supervisor::from_env_giving`] instead, which speaks version 3 and may
//! receive [`Event::Give`]. With version 2, `ctl workers N` still works:
//! a worker being removed hands everything over with a `stop`, and a new
//! worker gets new connections only.
//!
//! While serving, the worker tells [`Supervisor::closed`] when it closes a
//! connection and may tell [`Supervisor::state`] whenever a connection's
//! application state changes (then a stop has less to report). takeoverd
//! holds a copy of every connection, so a worker that crashes loses
//! nothing: its successor gets every connection with the last state told.
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use takeover::worker::{Event, Supervisor};
//! # fn main() -> Result<(), takeover::Error> {
//! let Some(sup) = Supervisor::from_env()? else { return Ok(()) }; // not under takeoverd
//! let mut conns = Vec::new();
//! loop {
//!     // (wait for sup.as_fd() to be readable, with your connections' fds)
//!     while let Some(event) = sup.next_event()? {
//!         match event {
//!             Event::Assign(assigned) => conns.extend(assigned),
//!             Event::Sync => sup.ready(conns.len())?,
//!             Event::Serve { .. } => sup.serving(conns.len())?,
//!             Event::Stop => sup.stopped(&[], &[])?,
//!             Event::Exit => return Ok(()),
//!             Event::Gone => std::process::exit(1),
//!             _ => {}
//!         }
//!     }
//! }
//! # }
//! ```
//!
//! `docs/PROTOCOL.md` is the whole protocol, for workers in other languages.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::channel::{self, FromWorker, Incoming, ToWorker, CHANNEL_VERSION, GIVE_VERSION, STAGING_ENV};
use crate::control::CONTROL_FD_ENV;
use crate::error::Result;
use crate::manifest::{RawState, StateEntry};

/// How long a send waits for room in the channel before it fails: takeoverd
/// reads its channels all the time, so a full one means it is stuck.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection takeoverd assigned to this worker.
#[derive(Debug)]
pub struct Assigned {
    /// Its name: say it in [`Supervisor::closed`], [`Supervisor::state`] and
    /// [`Supervisor::stopped`].
    pub name: String,
    /// The state last told for it (by this worker's predecessor, or by this
    /// worker before a `resume`); `None` for a new connection.
    pub state: Option<RawState>,
    /// The socket: a connected TCP stream, already validated, close-on-exec
    /// and non-blocking.
    pub fd: OwnedFd,
}

/// What takeoverd asks of the worker; see the table in the module
/// documentation for what to do and how to answer.
#[derive(Debug)]
pub enum Event {
    /// These connections are the worker's. Before [`Event::Serve`]: hold
    /// them and read nothing (the worker still serving may be reading them).
    /// While serving: serve them.
    Assign(Vec<Assigned>),
    /// Before [`Event::Serve`]: these connections ended; close the copies.
    Release(Vec<String>),
    /// Answer [`Supervisor::ready`] once everything before this is held.
    Sync,
    /// Before [`Event::Serve`]: newer states for these connections
    /// (`null`: back at a message boundary).
    State(Vec<StateEntry>),
    /// Before [`Event::Serve`]: serve these at once when serving starts,
    /// without waiting for them to become readable.
    Wake(Vec<String>),
    /// Start serving and answer [`Supervisor::serving`]. `recovered`: the
    /// previous holder died, so the states may be stale: reconcile every
    /// connection with what the kernel says before serving it.
    Serve {
        /// The previous holder died.
        recovered: bool,
    },
    /// Stop at a message boundary (read nothing more) and answer
    /// [`Supervisor::stopped`].
    Stop,
    /// The handoff after a stop failed: serve again.
    Resume,
    /// The successor serves: close everything and exit 0.
    Exit,
    /// takeoverd closed the channel (it exited or crashed; its successor
    /// will hand every connection to a new worker). Exit 1 without shutting
    /// any socket down.
    Gone,
    /// Version 3 ([`Supervisor::from_env_giving`]), while serving: stop
    /// serving these connections at a message boundary, close the copies
    /// (without shutting them down: another worker serves them next) and
    /// answer [`Supervisor::given`]. Names the worker no longer holds (it
    /// closed them and said so) are left out of the answer.
    Give(Vec<String>),
}

/// The worker's end of takeoverd's channel.
#[derive(Debug)]
pub struct Supervisor {
    chan: OwnedFd,
    send_timeout: Duration,
    /// The channel version said in `hello`.
    version: u32,
}

impl Supervisor {
    /// Takes the channel named by `$TAKEOVERD_FD` and says `hello`:
    /// `Ok(None)` when the variable is unset (not under takeoverd).
    pub fn from_env() -> Result<Option<Supervisor>> {
        match crate::sys::take_env_fd(CONTROL_FD_ENV)
            .map_err(|e| crate::Error::io("taking the channel in $TAKEOVERD_FD", e))?
        {
            Some(chan) => Supervisor::new(chan).map(Some),
            None => Ok(None),
        }
    }

    /// [`from_env`](Self::from_env), speaking version 3: the worker
    /// handles [`Event::Give`].
    pub fn from_env_giving() -> Result<Option<Supervisor>> {
        match crate::sys::take_env_fd(CONTROL_FD_ENV)
            .map_err(|e| crate::Error::io("taking the channel in $TAKEOVERD_FD", e))?
        {
            Some(chan) => Supervisor::new_giving(chan).map(Some),
            None => Ok(None),
        }
    }

    /// Says `hello` (version 2, our pid) on `chan`, a worker's end of the
    /// channel.
    pub fn new(chan: OwnedFd) -> Result<Supervisor> {
        Supervisor::hello(chan, CHANNEL_VERSION)
    }

    /// [`new`](Self::new), speaking version 3 (the worker handles
    /// [`Event::Give`]).
    pub fn new_giving(chan: OwnedFd) -> Result<Supervisor> {
        Supervisor::hello(chan, GIVE_VERSION)
    }

    fn hello(chan: OwnedFd, version: u32) -> Result<Supervisor> {
        let sup = Supervisor { chan, send_timeout: DEFAULT_SEND_TIMEOUT, version };
        sup.send(&FromWorker::Hello { version, pid: std::process::id() })?;
        Ok(sup)
    }

    /// The channel version this worker said in its `hello` (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Sets how long a send waits for room in the channel (default
    /// [`DEFAULT_SEND_TIMEOUT`]).
    pub fn with_send_timeout(mut self, timeout: Duration) -> Supervisor {
        self.send_timeout = timeout;
        self
    }

    /// Whether takeoverd started this worker beside one that serves
    /// (`$TAKEOVERD_STAGING=background`): taking the connections then
    /// competes with serving clients, and may run at a low CPU priority for
    /// a while (see [`crate::priority`]).
    pub fn staged_beside_a_server() -> bool {
        std::env::var_os(STAGING_ENV).is_some_and(|v| v == "background")
    }

    /// The next message from takeoverd, if one is queued (the channel is
    /// non-blocking): `Ok(None)` when none is. Answers `ping` itself. An
    /// error (a malformed message, an fd that is not a TCP stream) is also
    /// told to takeoverd as `nack`: the worker should exit 1; takeoverd holds
    /// every connection.
    pub fn next_event(&self) -> Result<Option<Event>> {
        loop {
            let msg = match channel::try_recv_from_supervisor(self.chan.as_fd()) {
                Ok(None) => return Ok(None),
                Ok(Some(None)) => return Ok(Some(Event::Gone)),
                Ok(Some(Some(Incoming::Assign(conns)))) => {
                    let conns = conns.into_iter().map(|(name, state, fd)| Assigned { name, state, fd }).collect();
                    return Ok(Some(Event::Assign(conns)));
                }
                Ok(Some(Some(Incoming::Msg(msg)))) => msg,
                Err(e) => {
                    let _ = self.send(&FromWorker::Nack { reason: e.to_string() });
                    return Err(e);
                }
            };
            return Ok(Some(match msg {
                ToWorker::Ping => {
                    self.send(&FromWorker::Pong)?;
                    continue;
                }
                ToWorker::Assign { entries } => {
                    // try_recv_from_supervisor decodes every assign with its
                    // fds; one without any is a protocol violation.
                    let e =
                        crate::Error::Protocol(crate::ProtocolError::AssignFds { listed: entries.len(), carried: 0 });
                    let _ = self.send(&FromWorker::Nack { reason: e.to_string() });
                    return Err(e);
                }
                ToWorker::Release { names } => Event::Release(names),
                ToWorker::Sync { .. } => Event::Sync,
                ToWorker::State { entries } => Event::State(entries),
                ToWorker::Wake { names } => Event::Wake(names),
                ToWorker::Serve { recovered } => Event::Serve { recovered },
                ToWorker::Stop => Event::Stop,
                ToWorker::Resume => Event::Resume,
                ToWorker::Exit => Event::Exit,
                ToWorker::Give { names } if self.version >= GIVE_VERSION => Event::Give(names),
                ToWorker::Give { .. } => {
                    let e = crate::Error::Protocol(crate::ProtocolError::Unexpected {
                        expected: "a version-2 message (this worker said hello with version 2)",
                        got: "give",
                    });
                    let _ = self.send(&FromWorker::Nack { reason: e.to_string() });
                    return Err(e);
                }
            }));
        }
    }

    /// Answers [`Event::Sync`]: every connection assigned is held.
    pub fn ready(&self, count: usize) -> Result<()> {
        self.send(&FromWorker::Ready { count })
    }

    /// Answers [`Event::Serve`]: serving `count` connections.
    pub fn serving(&self, count: usize) -> Result<()> {
        self.send(&FromWorker::Serving { count })
    }

    /// The worker closed connection `name` (takeoverd closes its copy).
    pub fn closed(&self, name: &str) -> Result<()> {
        self.send(&FromWorker::Closed { name: name.to_string() })
    }

    /// New application states of some connections, `(name, state)`: a
    /// successor, or a restarted worker after a crash, gets each connection
    /// with the last state told.
    pub fn state(&self, states: &[(String, RawState)]) -> Result<()> {
        let items: Vec<(String, Option<RawState>)> = states.iter().map(|(n, s)| (n.clone(), Some(s.clone()))).collect();
        self.send_lists("state", &items)
    }

    /// Answers [`Event::Stop`]: the states takeoverd has not been told
    /// (a connection stopped in the middle of a message) and the connections
    /// with work left (input read but not answered, a write that would
    /// block), which the successor serves at once.
    pub fn stopped(&self, states: &[(String, RawState)], wake: &[String]) -> Result<()> {
        self.state(states)?;
        let wake: Vec<(String, Option<RawState>)> = wake.iter().map(|n| (n.clone(), None)).collect();
        self.send_lists("wake", &wake)?;
        self.send(&FromWorker::Stopped)
    }

    /// Answers [`Event::Give`]: the states takeoverd has not been told and
    /// the connections with work left (as for [`stopped`](Self::stopped)),
    /// then the names given up (their copies are closed).
    pub fn given(&self, states: &[(String, RawState)], wake: &[String], names: &[String]) -> Result<()> {
        self.state(states)?;
        let wake: Vec<(String, Option<RawState>)> = wake.iter().map(|n| (n.clone(), None)).collect();
        self.send_lists("wake", &wake)?;
        let names: Vec<(String, Option<RawState>)> = names.iter().map(|n| (n.clone(), None)).collect();
        // An empty list still answers the give.
        if names.is_empty() {
            return self.send(&FromWorker::Given { names: Vec::new() });
        }
        self.send_lists("given", &names)
    }

    /// Tells takeoverd the worker cannot go on (then exit 1).
    pub fn nack(&self, reason: &str) -> Result<()> {
        self.send(&FromWorker::Nack { reason: reason.to_string() })
    }

    fn send(&self, msg: &FromWorker) -> Result<()> {
        channel::send_to_supervisor(self.chan.as_fd(), msg, Some(Instant::now() + self.send_timeout))
    }

    fn send_lists(&self, kind: &str, items: &[(String, Option<RawState>)]) -> Result<()> {
        let deadline = Some(Instant::now() + self.send_timeout);
        for msg in channel::encode_lists(kind, items)? {
            crate::wire::send(self.chan.as_fd(), &msg, &[], deadline)?;
        }
        Ok(())
    }
}

impl AsFd for Supervisor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.chan.as_fd()
    }
}

/// For event loops that register raw fds (tokio's `AsyncFd`, mio's
/// `SourceFd`): the fd stays owned by the `Supervisor`.
impl AsRawFd for Supervisor {
    fn as_raw_fd(&self) -> RawFd {
        self.chan.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
            .unwrap()
    }

    fn from_worker(takeoverd: &OwnedFd) -> FromWorker {
        let r = crate::wire::try_recv(takeoverd.as_fd()).unwrap().expect("a message").expect("open");
        FromWorker::decode(&r.bytes).unwrap()
    }

    fn to_worker(takeoverd: &OwnedFd, msg: &ToWorker) {
        crate::wire::send(takeoverd.as_fd(), &msg.encode(), &[], None).unwrap();
    }

    /// A whole life, as takeoverd drives it: hello, assign, sync → ready,
    /// ping → pong (answered inside `next`), serve → serving, stop →
    /// state + wake + stopped, exit; then the channel's end.
    #[test]
    fn a_worker_life_over_a_socketpair() {
        let (takeoverd, worker) = pair();
        let sup = Supervisor::new(worker).unwrap();
        assert!(matches!(from_worker(&takeoverd), FromWorker::Hello { version: 2, .. }));
        assert!(sup.next_event().unwrap().is_none(), "nothing queued yet");

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let state = serde_json::value::to_raw_value(&serde_json::json!({"n": 1})).unwrap();
        let bytes = channel::encode_assign([("c1", Some(&*state))].into_iter());
        crate::wire::send(takeoverd.as_fd(), &bytes, &[conn.as_fd()], None).unwrap();
        to_worker(&takeoverd, &ToWorker::Sync { count: 1 });
        to_worker(&takeoverd, &ToWorker::Ping);
        to_worker(&takeoverd, &ToWorker::Serve { recovered: false });

        let Some(Event::Assign(assigned)) = sup.next_event().unwrap() else { panic!("assign first") };
        assert_eq!(assigned.len(), 1);
        assert_eq!(assigned[0].name, "c1");
        assert_eq!(assigned[0].state.as_ref().map(|s| s.get()), Some(r#"{"n":1}"#));
        assert!(matches!(sup.next_event().unwrap(), Some(Event::Sync)));
        sup.ready(1).unwrap();
        assert_eq!(from_worker(&takeoverd), FromWorker::Ready { count: 1 });
        assert!(
            matches!(sup.next_event().unwrap(), Some(Event::Serve { recovered: false })),
            "the ping is answered inside"
        );
        assert_eq!(from_worker(&takeoverd), FromWorker::Pong);
        sup.serving(1).unwrap();
        assert_eq!(from_worker(&takeoverd), FromWorker::Serving { count: 1 });

        to_worker(&takeoverd, &ToWorker::Stop);
        assert!(matches!(sup.next_event().unwrap(), Some(Event::Stop)));
        let st = serde_json::value::to_raw_value(&serde_json::json!({"n": 2})).unwrap();
        sup.stopped(&[("c1".into(), st)], &["c1".into()]).unwrap();
        let FromWorker::State { entries } = from_worker(&takeoverd) else { panic!("state first") };
        assert_eq!(entries, vec![manifest::StateEntry { name: "c1".into(), state: serde_json::json!({"n": 2}) }]);
        assert_eq!(from_worker(&takeoverd), FromWorker::Wake { names: vec!["c1".into()] });
        assert_eq!(from_worker(&takeoverd), FromWorker::Stopped);

        to_worker(&takeoverd, &ToWorker::Exit);
        assert!(matches!(sup.next_event().unwrap(), Some(Event::Exit)));
        drop(takeoverd);
        assert!(matches!(sup.next_event().unwrap(), Some(Event::Gone)));
    }

    /// Version 3: `give` becomes [`Event::Give`], answered by `state`,
    /// `wake` and `given`; a version-2 worker refuses it with a nack.
    #[test]
    fn give_needs_version_3() {
        let (takeoverd, worker) = pair();
        let sup = Supervisor::new_giving(worker).unwrap();
        assert_eq!(sup.version(), 3);
        assert!(matches!(from_worker(&takeoverd), FromWorker::Hello { version: 3, .. }));
        to_worker(&takeoverd, &ToWorker::Give { names: vec!["c1".into(), "c2".into()] });
        let Some(Event::Give(names)) = sup.next_event().unwrap() else { panic!("a give") };
        assert_eq!(names, vec!["c1".to_string(), "c2".to_string()]);
        let st = serde_json::value::to_raw_value(&serde_json::json!({"n": 3})).unwrap();
        sup.given(&[("c1".into(), st)], &["c1".into()], &["c1".into()]).unwrap();
        assert!(matches!(from_worker(&takeoverd), FromWorker::State { .. }));
        assert_eq!(from_worker(&takeoverd), FromWorker::Wake { names: vec!["c1".into()] });
        assert_eq!(from_worker(&takeoverd), FromWorker::Given { names: vec!["c1".into()] });
        sup.given(&[], &[], &[]).unwrap();
        assert_eq!(from_worker(&takeoverd), FromWorker::Given { names: vec![] }, "an empty give is answered too");

        let (takeoverd, worker) = pair();
        let sup = Supervisor::new(worker).unwrap();
        let _hello = from_worker(&takeoverd);
        to_worker(&takeoverd, &ToWorker::Give { names: vec!["c1".into()] });
        assert!(sup.next_event().is_err());
        assert!(matches!(from_worker(&takeoverd), FromWorker::Nack { .. }));
    }

    /// An assign whose fd is not a TCP stream is refused, told to takeoverd
    /// as a nack, and its fd closed.
    #[test]
    fn a_bad_fd_is_nacked() {
        let (takeoverd, worker) = pair();
        let sup = Supervisor::new(worker).unwrap();
        let _hello = from_worker(&takeoverd);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let bytes = channel::encode_assign([("c1", None)].into_iter());
        crate::wire::send(takeoverd.as_fd(), &bytes, &[a.as_fd()], None).unwrap();
        assert!(sup.next_event().is_err());
        assert!(matches!(from_worker(&takeoverd), FromWorker::Nack { .. }));
    }
}
