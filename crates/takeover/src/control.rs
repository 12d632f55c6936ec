//! The supervisor's control channel, version 1: what a worker and its
//! supervisor say to each other after the initial handoff (the takeover
//! protocol, [`crate::offer`] to [`crate::ack`], on the same `SOCK_SEQPACKET` socket pair).
//! Version 2 is [`crate::channel`].
//!
//! ```text
//! worker                                 supervisor
//!   opened {entry} + fd           ──▶    (keeps a copy, stores it)
//!   closed {name}                 ──▶    (drops its copy)
//!                                 ◀──    quiesce
//!   state {entries}  (×n)         ──▶
//!   quiesced {count}              ──▶
//!                                 ◀──    resume | exit
//! ```

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ProtocolError, Result};
use crate::manifest::{self, Entry, RawState, StateEntry};

/// The environment variable that names the control channel's fd in a
/// worker started by a supervisor.
pub const CONTROL_FD_ENV: &str = "TAKEOVERD_FD";

/// Supervisor → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToWorker {
    /// Stop accepting and reading, report state.
    Quiesce,
    /// The handoff failed; serve again.
    Resume,
    /// The handoff succeeded; close everything and exit 0.
    Exit,
    /// Are you alive? (answered with `pong`)
    Ping,
}

/// Worker → supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum FromWorker {
    /// A connection was accepted; its fd is attached.
    Opened {
        /// The connection.
        entry: Entry,
    },
    /// A connection ended.
    Closed {
        /// Its name.
        name: String,
    },
    /// State of some connections (after `quiesce`).
    State {
        /// One per connection.
        entries: Vec<StateEntry>,
    },
    /// Quiesced; `count` state entries were sent.
    Quiesced {
        /// How many connections the worker holds.
        count: usize,
    },
    /// The answer to `ping`.
    Pong,
}

manifest::codec!(ToWorker);
manifest::codec!(FromWorker);

impl ToWorker {
    /// The message's `type`, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ToWorker::Quiesce => "quiesce",
            ToWorker::Resume => "resume",
            ToWorker::Exit => "exit",
            ToWorker::Ping => "ping",
        }
    }
}

impl FromWorker {
    /// The message's `type`, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            FromWorker::Opened { .. } => "opened",
            FromWorker::Closed { .. } => "closed",
            FromWorker::State { .. } => "state",
            FromWorker::Quiesced { .. } => "quiesced",
            FromWorker::Pong => "pong",
        }
    }
}

/// Worker: reports its state after a `quiesce`, in as many `state` messages
/// as the size limits need, then `quiesced`.
pub fn report_quiesced(chan: BorrowedFd<'_>, states: &[(String, RawState)], deadline: Option<Instant>) -> Result<()> {
    let encoded: Vec<String> =
        states.iter().map(|(name, state)| manifest::encode_entry(name, None, Some(state))).collect();
    for range in manifest::chunk(&encoded, manifest::WRAP_OVERHEAD)? {
        crate::wire::send(chan, &manifest::wrap("state", None, &encoded[range]), &[], deadline)?;
    }
    manifest::send(chan, &FromWorker::Quiesced { count: states.len() }, &[], deadline)
}

/// Supervisor: collects a worker's state after sending `quiesce`. Messages
/// the worker sent before it saw the `quiesce` (`opened`, `closed`) are
/// passed to `other` in order.
pub fn collect_quiesced(
    chan: BorrowedFd<'_>,
    deadline: Option<Instant>,
    mut other: impl FnMut(FromWorker, Vec<OwnedFd>),
) -> Result<Vec<(String, Option<RawState>)>> {
    let mut states = Vec::new();
    loop {
        let raw = crate::wire::recv(chan, deadline)?.ok_or(Error::Disconnected("while quiescing"))?;
        if let Some((_, entries)) = manifest::decode_entries(&raw.bytes, "state") {
            if !raw.fds.is_empty() {
                return Err(ProtocolError::FdsWithState.into());
            }
            states.extend(entries.into_iter().map(|(name, _, state)| (name, state)));
            continue;
        }
        let (msg, fds) = (FromWorker::decode(&raw.bytes)?, raw.fds);
        match msg {
            FromWorker::State { .. } => return Err(ProtocolError::MalformedState.into()),
            FromWorker::Quiesced { count } if count == states.len() => return Ok(states),
            FromWorker::Quiesced { count } => {
                return Err(ProtocolError::StateCount { said: count, arrived: states.len() }.into())
            }
            m @ (FromWorker::Opened { .. } | FromWorker::Closed { .. } | FromWorker::Pong) => other(m, fds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;
    use serde_json::json;

    /// Every message round-trips, in the exact bytes old peers speak.
    #[test]
    fn every_message_round_trips_in_pinned_bytes() {
        let entry = Entry { name: "c1".into(), kind: Kind::TcpStream, state: json!({"next": 7}) };
        let to = [
            (ToWorker::Quiesce, r#"{"type":"quiesce"}"#),
            (ToWorker::Resume, r#"{"type":"resume"}"#),
            (ToWorker::Exit, r#"{"type":"exit"}"#),
            (ToWorker::Ping, r#"{"type":"ping"}"#),
        ];
        for (m, want) in to {
            assert_eq!(String::from_utf8(m.encode()).unwrap(), want);
            assert_eq!(ToWorker::decode(want.as_bytes()).unwrap(), m);
        }
        let from = [
            (
                FromWorker::Opened { entry },
                r#"{"type":"opened","entry":{"name":"c1","kind":"tcp-stream","state":{"next":7}}}"#,
            ),
            (FromWorker::Closed { name: "c1".into() }, r#"{"type":"closed","name":"c1"}"#),
            (
                FromWorker::State { entries: vec![StateEntry { name: "c1".into(), state: json!(null) }] },
                r#"{"type":"state","entries":[{"name":"c1","state":null}]}"#,
            ),
            (FromWorker::Quiesced { count: 1 }, r#"{"type":"quiesced","count":1}"#),
            (FromWorker::Pong, r#"{"type":"pong"}"#),
        ];
        for (m, want) in from {
            assert_eq!(String::from_utf8(m.encode()).unwrap(), want);
            assert_eq!(FromWorker::decode(want.as_bytes()).unwrap(), m);
        }
    }
}
