//! The supervisor channel, version 2: what takeoverd and a worker say to each
//! other over their private `SOCK_SEQPACKET` socket pair once the worker has
//! said `hello` with `"version":2`. `docs/PROTOCOL.md` is the prose version.
//!
//! The supervisor owns every connection from its first instant (it accepts
//! them) and *assigns* each to a worker. A new worker is *staged* while the
//! old one still serves: it receives and registers every connection, says
//! `ready`, and only then is the old worker stopped; the stop-the-world
//! window carries only what changed meanwhile.
//!
//! ```text
//! worker                                   supervisor
//!   hello {version:2, pid}          ──▶
//!                                   ◀──    assign {entries} + fds     (×n, hold: do not read yet)
//!                                   ◀──    release {names}            (they ended; until `serve`)
//!                                   ◀──    sync {count}
//!   ready {count}                   ──▶
//!                                   ◀──    assign*, release*, state {entries}*, wake {names}*
//!                                   ◀──    serve {recovered}
//!   serving {count}                 ──▶
//!   closed {name}, state {entries}  ──▶    (while serving)
//!                                   ◀──    assign {entries} + fds     (while serving: new connections)
//!                                   ◀──    ping          pong ──▶
//!                                   ◀──    stop
//!   state*, wake*, stopped          ──▶
//!                                   ◀──    exit | resume
//! ```
//!
//! Version 3 is version 2 plus one exchange, for `takeoverd --workers N`:
//! takeoverd moves some of a serving worker's connections to another worker
//! (`takeoverd ctl workers N`).
//!
//! ```text
//!                                   ◀──    give {names}               (while serving)
//!   state*, wake*, given {names}    ──▶    (stopped at a message boundary, copies closed)
//! ```

use std::os::fd::{BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ProtocolError, Result};
use crate::fd::Kind;
use crate::manifest::{self, RawState, StateEntry};

/// Set to `background` in the environment of a worker that is started while
/// another one serves: a hint that its staging competes with a serving
/// worker and may run at a low CPU priority ([`crate::priority`]). Absent
/// when nobody serves (a first start, a restart after a crash): then staging
/// is all there is to do.
pub const STAGING_ENV: &str = "TAKEOVERD_STAGING";

/// The supervisor channel version this build speaks. Version 1 is the
/// channel of `control.rs` (the worker accepts, reports `opened`).
pub const CHANNEL_VERSION: u32 = 2;

/// Version 2 plus `give`/`given`: the worker can hand some of its
/// connections back while it serves.
pub const GIVE_VERSION: u32 = 3;

/// Supervisor → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToWorker {
    /// These connections are yours (their fds are attached, one per entry).
    /// Before `serve`: register them but read nothing. While serving: serve
    /// them.
    Assign {
        /// One per attached fd.
        entries: Vec<manifest::Entry>,
    },
    /// Before `serve`: these connections ended; close your copies.
    Release {
        /// Their names.
        names: Vec<String>,
    },
    /// Answer `ready` once every message before this one is handled.
    Sync {
        /// How many connections you should hold now.
        count: usize,
    },
    /// States newer than the ones the connections were assigned with.
    State {
        /// One per connection.
        entries: Vec<StateEntry>,
    },
    /// Connections to serve at once when serving starts, without waiting
    /// for an event (the previous worker left work on them).
    Wake {
        /// Their names.
        names: Vec<String>,
    },
    /// Start serving; answer `serving`.
    Serve {
        /// The previous holder died: states may be stale, reconcile every
        /// connection with the kernel and serve each once.
        #[serde(default)]
        recovered: bool,
    },
    /// Stop serving at a message boundary; answer `state`*, `wake`*, `stopped`.
    Stop,
    /// The handoff after a `stop` failed: serve again.
    Resume,
    /// Your successor serves: close everything and exit 0.
    Exit,
    /// Are you alive? Answer `pong` within the deadline.
    Ping,
    /// Version 3, while serving: stop serving these connections at a
    /// message boundary, close your copies and answer `state`*, `wake`*,
    /// `given` (another worker serves them next).
    Give {
        /// Their names.
        names: Vec<String>,
    },
}

/// Worker → supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum FromWorker {
    /// First message: the worker's channel version and pid.
    Hello {
        /// 2 for this channel.
        version: u32,
        /// The worker's pid.
        #[serde(default)]
        pid: u32,
    },
    /// The answer to `sync`: everything is registered.
    Ready {
        /// Connections held.
        count: usize,
    },
    /// The answer to `serve`.
    Serving {
        /// Connections served.
        count: usize,
    },
    /// A connection ended (the worker closed its copy).
    Closed {
        /// Its name.
        name: String,
    },
    /// Application state of some connections changed (any time; after
    /// `stop`, every state the supervisor has not been told yet).
    State {
        /// One per connection.
        entries: Vec<StateEntry>,
    },
    /// After `stop`: connections with work left (input not yet looked at, a
    /// blocked write); the successor serves them at once.
    Wake {
        /// Their names.
        names: Vec<String>,
    },
    /// After `stop`: the worker is stopped; every `state` and `wake` came
    /// before this.
    Stopped,
    /// The answer to `ping`.
    Pong,
    /// Version 3, the answer to `give`: these connections are no longer
    /// served here; every `state` and `wake` of them came before this. A
    /// name of the `give` that is missing here ended first (`closed`).
    Given {
        /// Their names.
        names: Vec<String>,
    },
    /// The worker cannot go on (a bad fd, out of fds): it is exiting.
    Nack {
        /// Why.
        reason: String,
    },
}

manifest::codec!(ToWorker);
manifest::codec!(FromWorker);

impl ToWorker {
    /// The message's `type`, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ToWorker::Assign { .. } => "assign",
            ToWorker::Release { .. } => "release",
            ToWorker::Sync { .. } => "sync",
            ToWorker::State { .. } => "state",
            ToWorker::Wake { .. } => "wake",
            ToWorker::Serve { .. } => "serve",
            ToWorker::Stop => "stop",
            ToWorker::Resume => "resume",
            ToWorker::Exit => "exit",
            ToWorker::Ping => "ping",
            ToWorker::Give { .. } => "give",
        }
    }
}

impl FromWorker {
    /// The message's `type`, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            FromWorker::Hello { .. } => "hello",
            FromWorker::Ready { .. } => "ready",
            FromWorker::Serving { .. } => "serving",
            FromWorker::Closed { .. } => "closed",
            FromWorker::State { .. } => "state",
            FromWorker::Wake { .. } => "wake",
            FromWorker::Stopped => "stopped",
            FromWorker::Pong => "pong",
            FromWorker::Nack { .. } => "nack",
            FromWorker::Given { .. } => "given",
        }
    }
}

/// An `assign` message for connections `(name, state)`, encoded without
/// building a JSON tree (the hot path of accepting). At most
/// [`crate::wire::MAX_FDS`] entries; the caller attaches the fds in order.
pub fn encode_assign<'a>(conns: impl Iterator<Item = (&'a str, Option<&'a serde_json::value::RawValue>)>) -> Vec<u8> {
    let encoded: Vec<String> =
        conns.map(|(name, state)| manifest::encode_entry(name, Some(Kind::TcpStream), state)).collect();
    manifest::wrap("assign", None, &encoded)
}

/// Encodes `kind` messages (`"state"`, `"wake"`, `"release"`, `"give"`,
/// `"given"`) that carry
/// `items`, as many as the message size needs. `state` items are
/// `(name, Some(state))`; the others `(name, None)`.
pub fn encode_lists(kind: &str, items: &[(String, Option<RawState>)]) -> Result<Vec<Vec<u8>>> {
    let field = if kind == "state" { "entries" } else { "names" };
    let encoded: Vec<String> = items
        .iter()
        .map(|(name, state)| match state {
            Some(s) => manifest::encode_entry(name, None, Some(s)),
            None => serde_json::to_string(name).expect("a string serialises"),
        })
        .collect();
    let mut out = Vec::new();
    for range in manifest::chunk(&encoded, manifest::WRAP_OVERHEAD)? {
        out.push(manifest::wrap_field(kind, field, &encoded[range]));
    }
    Ok(out)
}

/// A decoded `assign`: each entry's name and raw state with its fd, the
/// fds already validated as TCP streams.
pub type Assigned = Vec<(String, Option<RawState>, OwnedFd)>;

/// Decodes an `assign` and validates its fds. Any error closes every fd.
pub fn decode_assign(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Assigned> {
    let (_, entries) = manifest::decode_entries(bytes, "assign").ok_or(ProtocolError::MalformedAssign)?;
    if entries.len() != fds.len() {
        return Err(ProtocolError::AssignFds { listed: entries.len(), carried: fds.len() }.into());
    }
    let mut out = Vec::with_capacity(fds.len());
    for ((name, kind, state), fd) in entries.into_iter().zip(fds) {
        let Some(kind) = kind else { return Err(ProtocolError::NoKind { name }.into()) };
        manifest::check_name(&name)?;
        crate::fd::validate(std::os::fd::AsFd::as_fd(&fd), kind)
            .map_err(|problem| Error::BadFd { name: name.clone(), problem })?;
        out.push((name, state, fd));
    }
    Ok(out)
}

/// Sends a worker message with no fds, waiting for room until `deadline`.
pub fn send_to_supervisor(chan: BorrowedFd<'_>, msg: &FromWorker, deadline: Option<std::time::Instant>) -> Result<()> {
    crate::wire::send(chan, &msg.encode(), &[], deadline)
}

/// The name of a connection: `c` and its socket cookie (`SO_COOKIE`, unique
/// for the kernel's uptime) in base 36. Short, so that many fit in systemd's
/// `LISTEN_FDNAMES`; the same in every process that holds the socket.
pub fn conn_name(cookie: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut digits = Vec::with_capacity(14);
    let mut n = cookie;
    loop {
        digits.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.push(b'c');
    digits.reverse();
    String::from_utf8(digits).expect("ASCII")
}

/// The cookie in a name made by [`conn_name`].
pub fn cookie_of_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('c')?;
    if digits.is_empty() || digits.len() > 13 {
        return None;
    }
    u64::from_str_radix(digits, 36).ok().filter(|c| conn_name(*c) == name)
}

/// A message a worker received from its supervisor.
#[derive(Debug)]
pub enum Incoming {
    /// An `assign`, decoded and every fd validated.
    Assign(Assigned),
    /// Any other message (they carry no fds).
    Msg(ToWorker),
}

/// Worker: receives one supervisor message if one is queued: `Ok(None)` when
/// none is, `Ok(Some(None))` when the supervisor closed the channel.
pub fn try_recv_from_supervisor(chan: BorrowedFd<'_>) -> Result<Option<Option<Incoming>>> {
    let Some(received) = crate::wire::try_recv(chan)? else { return Ok(None) };
    let Some(r) = received else { return Ok(Some(None)) };
    if !r.fds.is_empty() || r.bytes.starts_with(br#"{"type":"assign""#) {
        return decode_assign(&r.bytes, r.fds).map(|a| Some(Some(Incoming::Assign(a))));
    }
    ToWorker::decode(&r.bytes).map(|m| Some(Some(Incoming::Msg(m))))
}

/// Accepts one connection on a TCP listener, non-blocking and close-on-exec:
/// `Ok(None)` when none is waiting (or it was aborted before we got it).
pub fn accept_tcp(listener: BorrowedFd<'_>) -> std::io::Result<Option<OwnedFd>> {
    use nix::sys::socket::SockFlag;
    loop {
        match nix::sys::socket::accept4(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        ) {
            // SAFETY: accept4 just created this fd for us; nothing else owns it.
            Ok(raw) => return Ok(Some(unsafe { crate::sys::own(raw) })),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ECONNABORTED) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_every_message() {
        let entry = manifest::Entry { name: "c1".into(), kind: Kind::TcpStream, state: json!({"n": 1}) };
        let to = vec![
            ToWorker::Assign { entries: vec![entry] },
            ToWorker::Release { names: vec!["c1".into()] },
            ToWorker::Sync { count: 3 },
            ToWorker::State { entries: vec![StateEntry { name: "c1".into(), state: json!({"x": 1}) }] },
            ToWorker::Wake { names: vec!["c2".into()] },
            ToWorker::Serve { recovered: true },
            ToWorker::Stop,
            ToWorker::Resume,
            ToWorker::Exit,
            ToWorker::Ping,
            ToWorker::Give { names: vec!["c1".into()] },
        ];
        for m in to {
            assert_eq!(ToWorker::decode(&m.encode()).unwrap(), m);
        }
        let from = vec![
            FromWorker::Hello { version: 2, pid: 7 },
            FromWorker::Ready { count: 3 },
            FromWorker::Serving { count: 3 },
            FromWorker::Closed { name: "c1".into() },
            FromWorker::State { entries: vec![StateEntry { name: "c1".into(), state: json!(null) }] },
            FromWorker::Wake { names: vec!["c1".into()] },
            FromWorker::Stopped,
            FromWorker::Pong,
            FromWorker::Nack { reason: "no".into() },
            FromWorker::Given { names: vec!["c1".into()] },
        ];
        for m in from {
            assert_eq!(FromWorker::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn hand_encoded_messages_decode() {
        let state = serde_json::value::to_raw_value(&json!({"k": [1, 2]})).unwrap();
        let bytes = encode_assign([("c1", Some(&*state)), ("c2", None)].into_iter());
        let m = ToWorker::decode(&bytes).unwrap();
        let ToWorker::Assign { entries } = m else { panic!("{m:?}") };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].state, json!({"k": [1, 2]}));
        let items: Vec<(String, Option<RawState>)> = (0..5000).map(|i| (format!("c{i}"), None)).collect();
        let wakes = encode_lists("wake", &items).unwrap();
        assert!(wakes.len() > 1, "5000 names need several messages");
        let mut names = Vec::new();
        for w in wakes {
            assert!(w.len() <= crate::wire::MAX_MESSAGE);
            match ToWorker::decode(&w).unwrap() {
                ToWorker::Wake { names: n } => names.extend(n),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(names.len(), 5000);
        let states = vec![("c1".to_string(), Some(state))];
        let st = encode_lists("state", &states).unwrap();
        assert!(matches!(FromWorker::decode(&st[0]).unwrap(), FromWorker::State { .. }));
    }

    #[test]
    fn names_are_short_base36() {
        assert_eq!(conn_name(0), "c0");
        assert_eq!(conn_name(35), "cz");
        assert_eq!(conn_name(36), "c10");
        assert_eq!(conn_name(u64::MAX), "c3w5e11264sgsf");
        for c in [0, 35, 36, 1 << 40, u64::MAX] {
            assert_eq!(cookie_of_name(&conn_name(c)), Some(c));
        }
        assert_eq!(cookie_of_name("l0"), None);
        assert_eq!(cookie_of_name("c00"), None, "not a name conn_name makes");
    }
}
