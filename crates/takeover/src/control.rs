//! The supervisor's control channel: what a worker and its supervisor say to
//! each other after the initial handoff (a `SOCK_SEQPACKET` socket pair).
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

use crate::error::{Error, Result};
use crate::manifest::{self, Message, RawState};

/// The environment variable that names the control channel's fd in a
/// worker started by a supervisor.
pub const CONTROL_FD_ENV: &str = "TAKEOVERD_FD";

/// Worker: reports its state after a `quiesce`, in as many `state` messages
/// as the size limits need, then `quiesced`.
pub fn report_quiesced(chan: BorrowedFd<'_>, states: &[(String, RawState)], deadline: Option<Instant>) -> Result<()> {
    let encoded: Vec<String> =
        states.iter().map(|(name, state)| manifest::encode_entry(name, None, Some(state))).collect();
    for range in manifest::chunk(&encoded, manifest::WRAP_OVERHEAD)? {
        crate::wire::send(chan, &manifest::wrap("state", None, &encoded[range]), &[], deadline)?;
    }
    manifest::send(chan, &Message::Quiesced { count: states.len() }, &[], deadline)
}

/// Supervisor: collects a worker's state after sending `quiesce`. Messages
/// the worker sent before it saw the `quiesce` (`opened`, `closed`) are
/// passed to `other` in order.
pub fn collect_quiesced(
    chan: BorrowedFd<'_>,
    deadline: Option<Instant>,
    mut other: impl FnMut(Message, Vec<OwnedFd>),
) -> Result<Vec<(String, Option<RawState>)>> {
    let mut states = Vec::new();
    loop {
        let raw = crate::wire::recv(chan, deadline)?.ok_or(Error::Disconnected("while quiescing"))?;
        if let Some((_, entries)) = manifest::decode_entries(&raw.bytes, "state") {
            if !raw.fds.is_empty() {
                return Err(Error::protocol("state message came with fds"));
            }
            states.extend(entries.into_iter().map(|(name, _, state)| (name, state)));
            continue;
        }
        let (msg, fds) = (Message::decode(&raw.bytes)?, raw.fds);
        match msg {
            Message::State { .. } => return Err(Error::protocol("malformed state message")),
            Message::Quiesced { count } if count == states.len() => return Ok(states),
            Message::Quiesced { count } => {
                return Err(Error::protocol(format!(
                    "worker said it reported {count} states, {} arrived",
                    states.len()
                )))
            }
            m @ (Message::Opened { .. } | Message::Closed { .. } | Message::Pong) => other(m, fds),
            m => return Err(Error::protocol(format!("unexpected {} while quiescing", m.name()))),
        }
    }
}
