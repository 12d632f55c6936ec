//! The transactional handoff: a giver offers fds with their state, a taker
//! validates and adopts them, then acks; until the ack the giver keeps every
//! fd and can resume as if nothing happened.
//!
//! ```text
//! taker                                  giver
//!   hello {version, pid}          ──▶
//!                                 ◀──    offer {version, fds, batches, app}
//!                                 ◀──    batch {seq, entries} + SCM_RIGHTS  (×batches)
//!                                 ◀──    end {fds}
//!   (validate, adopt)
//!   ack | nack {reason}           ──▶
//!                                 ◀──    commit   (the giver stops for good)
//!   (serve)
//! ```

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::{Error, ProtocolError, Result};
use crate::fd::{self, Kind};
use crate::manifest::{self, check_name, Message, RawState, PROTOCOL_VERSION};
use crate::wire;

/// One fd the giver offers.
#[derive(Debug)]
pub struct Item<'a> {
    /// Unique name (see [`check_name`]).
    pub name: &'a str,
    /// What it is.
    pub kind: Kind,
    /// The fd; the giver keeps it open until the taker acks.
    pub fd: BorrowedFd<'a>,
    /// Its state, as raw JSON (moved as bytes, never re-parsed here).
    pub state: Option<&'a RawValue>,
}

/// One fd the taker received, validated.
#[derive(Debug)]
pub struct Taken {
    /// Its name.
    pub name: String,
    /// What it is (checked).
    pub kind: Kind,
    /// The fd, now ours.
    pub fd: OwnedFd,
    /// Its state as the giver sent it, raw JSON for the application to parse.
    pub state: Option<RawState>,
}

/// Everything a taker received in one handoff.
#[derive(Debug)]
pub struct Handoff {
    /// Application state not tied to one fd.
    pub app: Value,
    /// True when the giver says the previous server of these sockets died,
    /// so per-fd states may be stale.
    pub recovered: bool,
    /// The fds, in the giver's order.
    pub taken: Vec<Taken>,
}

/// Giver: waits for the taker's `hello` and checks its version. On a version
/// mismatch the taker is sent a `refuse` naming both versions.
pub fn read_hello(chan: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<u32> {
    let (msg, fds) = manifest::recv(chan, deadline)?.ok_or(Error::Disconnected("before saying hello"))?;
    if !fds.is_empty() {
        return Err(ProtocolError::FdsWithHello { count: fds.len() }.into());
    }
    match msg {
        Message::Hello { version, pid } if version == PROTOCOL_VERSION => Ok(pid),
        Message::Hello { version, .. } => {
            let err = Error::Version { theirs: version };
            let _ = manifest::send(chan, &Message::Refuse { reason: err.to_string() }, &[], deadline);
            Err(err)
        }
        other => Err(unexpected("hello", &other)),
    }
}

/// Giver: sends every item (in as many batches as the limits need).
pub fn offer(
    chan: BorrowedFd<'_>,
    items: &[Item<'_>],
    app: &Value,
    recovered: bool,
    deadline: Option<Instant>,
) -> Result<()> {
    let mut names = HashSet::with_capacity(items.len());
    let mut encoded = Vec::with_capacity(items.len());
    for item in items {
        check_name(item.name)?;
        if !names.insert(item.name) {
            return Err(ProtocolError::DuplicateName { name: item.name.to_owned() }.into());
        }
        encoded.push(manifest::encode_entry(item.name, Some(item.kind), item.state));
    }
    let chunks = manifest::chunk(&encoded, manifest::WRAP_OVERHEAD)?;
    let head = Message::Offer {
        version: PROTOCOL_VERSION,
        fds: items.len(),
        batches: chunks.len(),
        recovered,
        app: app.clone(),
    };
    manifest::send(chan, &head, &[], deadline)?;
    for (seq, range) in chunks.into_iter().enumerate() {
        let body = manifest::wrap("batch", Some(seq), &encoded[range.clone()]);
        let fds: Vec<BorrowedFd<'_>> = items[range].iter().map(|i| i.fd).collect();
        wire::send(chan, &body, &fds, deadline)?;
    }
    manifest::send(chan, &Message::End { fds: items.len() }, &[], deadline)
}

/// Giver: waits for the taker's verdict. `Ok(())` is an ack, answered with a
/// `commit`: the taker owns everything now and the giver must stop serving.
/// Any error means the giver still owns everything and should resume; the
/// error says why.
pub fn await_ack(chan: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<()> {
    let (msg, fds) = manifest::recv(chan, deadline)?.ok_or(Error::Disconnected("before acking"))?;
    drop(fds);
    match msg {
        Message::Ack => manifest::send(chan, &Message::Commit, &[], deadline),
        Message::Nack { reason } => Err(Error::Refused(reason)),
        other => Err(unexpected("ack or nack", &other)),
    }
}

/// What a taker is willing to receive.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The most fds one handoff may carry.
    pub max_fds: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_fds: fd_headroom() }
    }
}

/// How many more fds this process can open: the soft `RLIMIT_NOFILE` minus
/// what is open now, less a margin for the process's own work.
pub fn fd_headroom() -> usize {
    let soft =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(s, _)| s).unwrap_or(1024);
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0) as u64;
    soft.saturating_sub(open).saturating_sub(32) as usize
}

/// Taker: says hello.
pub fn hello(chan: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<()> {
    manifest::send(chan, &Message::Hello { version: PROTOCOL_VERSION, pid: std::process::id() }, &[], deadline)
}

/// Taker: receives and validates a whole offer. On any error the giver is
/// sent a `nack` naming it, every fd received so far is closed, and the
/// error is returned.
pub fn receive(chan: BorrowedFd<'_>, limits: &Limits, deadline: Option<Instant>) -> Result<Handoff> {
    let result = receive_inner(chan, limits, deadline);
    if let Err(e) = &result {
        if !matches!(e, Error::Refused(_) | Error::Disconnected(_)) {
            let _ = nack(chan, &e.to_string());
        }
    }
    result
}

fn receive_inner(chan: BorrowedFd<'_>, limits: &Limits, deadline: Option<Instant>) -> Result<Handoff> {
    let recv = || manifest::recv(chan, deadline)?.ok_or(Error::Disconnected("in the middle of an offer"));
    let (msg, fds) = recv()?;
    if !fds.is_empty() {
        return Err(ProtocolError::FdsWithOffer { count: fds.len() }.into());
    }
    let (total, batches, recovered, app) = match msg {
        Message::Offer { version, fds, batches, recovered, app } => {
            if version != PROTOCOL_VERSION {
                return Err(Error::Version { theirs: version });
            }
            (fds, batches, recovered, app)
        }
        Message::Refuse { reason } => return Err(Error::Refused(reason)),
        other => return Err(unexpected("offer", &other)),
    };
    if total > limits.max_fds {
        return Err(ProtocolError::OfferTooBig { fds: total, max: limits.max_fds }.into());
    }
    if batches > total || (total > 0 && batches == 0) {
        return Err(ProtocolError::BatchCount { batches, fds: total }.into());
    }
    let mut taken = Vec::with_capacity(total);
    let mut names = HashSet::with_capacity(total);
    for seq in 0..batches {
        let msg = wire::recv(chan, deadline)?.ok_or(Error::Disconnected("in the middle of an offer"))?;
        let fds = msg.fds;
        let entries = match manifest::decode_entries(&msg.bytes, "batch") {
            Some((Some(s), entries)) if s == seq => entries,
            Some((got, _)) => return Err(ProtocolError::BatchOutOfOrder { expected: seq, got }.into()),
            // Not a well-formed batch: decode it in full for a precise error.
            None => match Message::decode(&msg.bytes)? {
                Message::Batch { seq: s, .. } if s != seq => {
                    return Err(ProtocolError::BatchOutOfOrder { expected: seq, got: Some(s) }.into())
                }
                Message::Batch { .. } => return Err(ProtocolError::MalformedBatch { seq }.into()),
                other => return Err(ProtocolError::NotABatch { seq, batches, got: other.name() }.into()),
            },
        };
        if entries.len() != fds.len() {
            return Err(ProtocolError::BatchFds { seq, listed: entries.len(), carried: fds.len() }.into());
        }
        if taken.len() + fds.len() > total {
            return Err(ProtocolError::MoreFdsThanAnnounced { announced: total }.into());
        }
        for ((name, kind, state), fd) in entries.into_iter().zip(fds) {
            let Some(kind) = kind else { return Err(ProtocolError::NoKind { name }.into()) };
            check_name(&name)?;
            fd::validate(fd.as_fd(), kind).map_err(|problem| Error::BadFd { name: name.clone(), problem })?;
            if !names.insert(name.clone()) {
                return Err(ProtocolError::DuplicateName { name }.into());
            }
            taken.push(Taken { name, kind, fd, state });
        }
    }
    let (msg, fds) = recv()?;
    if !fds.is_empty() {
        return Err(ProtocolError::FdsWithEnd { count: fds.len() }.into());
    }
    match msg {
        Message::End { fds } if fds == total && taken.len() == total => Ok(Handoff { app, recovered, taken }),
        Message::End { fds } => {
            Err(ProtocolError::EndMismatch { announced: total, end: fds, received: taken.len() }.into())
        }
        Message::Batch { .. } => Err(ProtocolError::MoreBatches { batches }.into()),
        other => Err(unexpected("end", &other)),
    }
}

/// Taker: everything is adopted; asks the giver to step down and waits for
/// its `commit`. `Ok(())` means the taker alone serves the fds now. An error
/// means the giver resumed (it timed out before our ack arrived): the taker
/// must close everything it received and not serve.
///
/// If the channel ends without a commit, the giver either resumed or died
/// right after reading the ack; the giver's pid (from `SO_PEERCRED`) tells
/// which, and a dead giver's sockets are ours.
pub fn ack(chan: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<()> {
    let giver = nix::sys::socket::getsockopt(&chan, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| Error::io("SO_PEERCRED", e))?
        .pid();
    manifest::send(chan, &Message::Ack, &[], deadline)?;
    match manifest::recv(chan, deadline) {
        Ok(Some((Message::Commit, _))) => Ok(()),
        Ok(Some((other, _))) => Err(unexpected("commit", &other)),
        Ok(None) | Err(Error::Disconnected(_)) => {
            if giver_gone(giver) {
                tracing::warn!(giver, "the giver exited after our ack without a commit; its sockets are ours");
                Ok(())
            } else {
                Err(Error::Disconnected("after our ack without a commit, and is still running: it resumed"))
            }
        }
        Err(e) => Err(e),
    }
}

/// A message other than the `expected` one.
fn unexpected(expected: &'static str, got: &Message) -> Error {
    ProtocolError::Unexpected { expected, got: got.name() }.into()
}

/// True when `pid` no longer runs (or is a zombie).
fn giver_gone(pid: i32) -> bool {
    // Give an exiting giver a moment to finish exiting.
    for _ in 0..50 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) => {
                let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
                if matches!(state, Some("Z" | "X")) {
                    return true;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    false
}

/// Taker (or a giver refusing a hello): the handoff is off, and why.
pub fn nack(chan: BorrowedFd<'_>, reason: &str) -> Result<()> {
    let deadline = Some(Instant::now() + std::time::Duration::from_millis(100));
    manifest::send(chan, &Message::Nack { reason: reason.chars().take(1024).collect() }, &[], deadline)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (a server that holds
/// thousands of connections needs it; systemd units set the hard limit with
/// `LimitNOFILE=`). Returns the new soft limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}
