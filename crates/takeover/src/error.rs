//! The error types of the handoff protocol and the supervisor channels.

use std::fmt;
use std::io;

use crate::fd::FdError;
use crate::manifest::NameError;
use crate::wire::{MAX_FDS, MAX_MESSAGE};

/// Why a handoff, or one step of it, failed.
///
/// Every variant names the problem in words an operator can act on; the
/// [`Display`](fmt::Display) text is what ends up in logs and in a `nack`.
#[derive(Debug)]
pub enum Error {
    /// A system call failed.
    Io {
        /// What we were doing.
        context: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The peer sent something the protocol does not allow (or we were
    /// about to).
    Protocol(ProtocolError),
    /// The peer speaks a protocol version we do not.
    Version {
        /// The version the peer announced.
        theirs: u32,
    },
    /// The peer refused the handoff (a `nack` or `refuse` message).
    Refused(String),
    /// The peer closed the channel before the handoff finished.
    Disconnected(&'static str),
    /// No answer within the deadline.
    Timeout(&'static str),
    /// A received fd is not what the manifest says it is.
    BadFd {
        /// The manifest name of the fd.
        name: String,
        /// What is wrong with it.
        problem: FdError,
    },
    /// Control data was truncated (`MSG_CTRUNC`): the peer sent more fds than
    /// one message may carry, or this process is out of fds
    /// (`RLIMIT_NOFILE`). The fds that did arrive were closed.
    Truncated {
        /// How many fds arrived (and were closed).
        arrived: usize,
    },
    /// The peer's credentials are not allowed to take sockets from us.
    PeerNotAllowed {
        /// The peer's pid.
        pid: i32,
        /// The peer's uid.
        uid: u32,
    },
}

/// `Result` with the handoff [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io { context, source: source.into() }
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        Error::Protocol(ProtocolError::BadName(e))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Protocol(e) => write!(f, "protocol error: {e}"),
            Error::Version { theirs } => write!(
                f,
                "peer speaks takeover protocol version {theirs}, this build speaks {}",
                crate::PROTOCOL_VERSION
            ),
            Error::Refused(reason) => write!(f, "peer refused the handoff: {reason}"),
            Error::Disconnected(when) => write!(f, "peer closed the channel {when}"),
            Error::Timeout(what) => write!(f, "timed out {what}"),
            Error::BadFd { name, problem } => write!(f, "fd {name:?}: {problem}"),
            Error::Truncated { arrived } => write!(
                f,
                "control data truncated (MSG_CTRUNC): more than {} fds in one message, or this process ran out of \
                 fds (RLIMIT_NOFILE); the {arrived} fds that arrived were closed",
                MAX_FDS
            ),
            Error::PeerNotAllowed { pid, uid } => {
                write!(f, "peer pid {pid} uid {uid} is neither root nor our uid {}", nix::unistd::geteuid())
            }
        }
    }
}

/// The message is complete by itself (it is what a `nack` and a log line
/// carry), so it already includes the text of the [`source`]: the source is
/// there for a program that inspects the cause (an `io::Error`'s kind, a
/// `serde_json::Error`'s line), not for printing.
///
/// [`source`]: std::error::Error::source
impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Protocol(e) => e.source(),
            Error::BadFd { problem, .. } => problem.source(),
            _ => None,
        }
    }
}

/// What the peer sent that the protocol does not allow, or what we refused
/// to send. The text names the message and the numbers involved.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Not JSON, or not one of the protocol's messages.
    Malformed {
        /// What the JSON parser said.
        error: serde_json::Error,
        /// The message's first bytes.
        shown: String,
    },
    /// A datagram longer than [`MAX_MESSAGE`].
    TooLarge,
    /// Control data other than `SCM_RIGHTS`.
    ForeignControlMessage,
    /// We refused to send a message longer than [`MAX_MESSAGE`].
    SendTooLarge {
        /// Its length.
        len: usize,
    },
    /// We refused to send more than [`MAX_FDS`] fds in one message.
    SendTooManyFds {
        /// How many.
        count: usize,
    },
    /// The kernel took part of a datagram.
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Bytes in the message.
        len: usize,
    },
    /// One entry alone does not fit in a message.
    EntryTooLarge {
        /// Its encoded length.
        len: usize,
    },
    /// A name that cannot be an fd name.
    BadName(NameError),
    /// Two fds with one name.
    DuplicateName {
        /// The name.
        name: String,
    },
    /// An entry of a `batch` or `assign` without a kind.
    NoKind {
        /// The entry's name.
        name: String,
    },
    /// A message other than the one the protocol expects next.
    Unexpected {
        /// What the protocol expects (`hello`, `ack or nack`, ...).
        expected: &'static str,
        /// The type of what came.
        got: &'static str,
    },
    /// Fds attached to a `hello`.
    FdsWithHello {
        /// How many (they were closed).
        count: usize,
    },
    /// Fds attached to an `offer`.
    FdsWithOffer {
        /// How many.
        count: usize,
    },
    /// Fds attached to an `end`.
    FdsWithEnd {
        /// How many.
        count: usize,
    },
    /// An offer of more fds than this process can hold.
    OfferTooBig {
        /// Fds offered.
        fds: usize,
        /// Fds we can hold.
        max: usize,
    },
    /// An offer whose batch count cannot carry its fd count.
    BatchCount {
        /// Batches announced.
        batches: usize,
        /// Fds announced.
        fds: usize,
    },
    /// A batch out of sequence.
    BatchOutOfOrder {
        /// The batch expected.
        expected: usize,
        /// The batch that came (`None`: it had no `seq`).
        got: Option<usize>,
    },
    /// A batch that is not well formed.
    MalformedBatch {
        /// Its sequence number.
        seq: usize,
    },
    /// Another message where a batch belongs.
    NotABatch {
        /// The batch expected.
        seq: usize,
        /// Batches announced.
        batches: usize,
        /// The type of what came.
        got: &'static str,
    },
    /// A batch whose entries and fds differ in number.
    BatchFds {
        /// Its sequence number.
        seq: usize,
        /// Entries listed.
        listed: usize,
        /// Fds attached.
        carried: usize,
    },
    /// More fds than the offer announced.
    MoreFdsThanAnnounced {
        /// Fds announced.
        announced: usize,
    },
    /// An `end` that disagrees with the offer.
    EndMismatch {
        /// Fds the offer announced.
        announced: usize,
        /// Fds the end says.
        end: usize,
        /// Fds received.
        received: usize,
    },
    /// A batch after the last announced one.
    MoreBatches {
        /// Batches announced.
        batches: usize,
    },
    /// An `assign` that is not well formed.
    MalformedAssign,
    /// An `assign` whose entries and fds differ in number.
    AssignFds {
        /// Entries listed.
        listed: usize,
        /// Fds attached.
        carried: usize,
    },
    /// A `state` message that is not well formed.
    MalformedState,
    /// Fds attached to a `state` message.
    FdsWithState,
    /// A `quiesced` whose count disagrees with the states that came.
    StateCount {
        /// The count the worker said.
        said: usize,
        /// The states that arrived.
        arrived: usize,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProtocolError as P;
        match self {
            P::Malformed { error, shown } => write!(f, "malformed message ({error}): {shown:?}"),
            P::TooLarge => write!(f, "message larger than {MAX_MESSAGE} bytes"),
            P::ForeignControlMessage => f.write_str("control message other than SCM_RIGHTS"),
            P::SendTooLarge { len } => write!(f, "refusing to send a {len} byte message (limit {MAX_MESSAGE})"),
            P::SendTooManyFds { count } => write!(f, "refusing to send {count} fds in one message (limit {MAX_FDS})"),
            P::ShortSend { sent, len } => write!(f, "short send of a seqpacket message ({sent} of {len} bytes)"),
            P::EntryTooLarge { len } => {
                write!(f, "one entry encodes to {len} bytes, more than fits in a {MAX_MESSAGE} byte message")
            }
            P::BadName(e) => e.fmt(f),
            P::DuplicateName { name } => write!(f, "two fds named {name:?}"),
            P::NoKind { name } => write!(f, "entry {name:?} has no kind"),
            P::Unexpected { expected, got } => write!(f, "expected {expected}, got {got}"),
            P::FdsWithHello { count } => write!(f, "hello came with {count} unexpected fds (closed)"),
            P::FdsWithOffer { count } => write!(f, "offer came with {count} unexpected fds"),
            P::FdsWithEnd { count } => write!(f, "more fds than announced: {count} came with the end message"),
            P::OfferTooBig { fds, max } => {
                write!(f, "offer of {fds} fds is more than this process can hold ({max}; raise RLIMIT_NOFILE)")
            }
            P::BatchCount { batches, fds } => write!(f, "offer announces {batches} batches for {fds} fds"),
            P::BatchOutOfOrder { expected, got: Some(got) } => write!(f, "expected batch {expected}, got batch {got}"),
            P::BatchOutOfOrder { expected, got: None } => {
                write!(f, "expected batch {expected}, got a batch without seq")
            }
            P::MalformedBatch { seq } => write!(f, "malformed batch {seq}"),
            P::NotABatch { seq, batches, got } => write!(f, "expected batch {seq} of {batches}, got {got}"),
            P::BatchFds { seq, listed, carried } => write!(f, "batch {seq} lists {listed} fds but carries {carried}"),
            P::MoreFdsThanAnnounced { announced } => write!(f, "more fds than the {announced} announced"),
            P::EndMismatch { announced, end, received } => {
                write!(f, "offer announced {announced} fds, end says {end}, received {received}")
            }
            P::MoreBatches { batches } => write!(f, "more batches than the {batches} announced"),
            P::MalformedAssign => f.write_str("malformed assign message"),
            P::AssignFds { listed, carried } => {
                write!(f, "assign lists {listed} connections but carries {carried} fds")
            }
            P::MalformedState => f.write_str("malformed state message"),
            P::FdsWithState => f.write_str("state message came with fds"),
            P::StateCount { said, arrived } => write!(f, "worker said it reported {said} states, {arrived} arrived"),
        }
    }
}

/// Like [`Error`], the message includes the source's text.
impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtocolError::Malformed { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn sources_are_the_wrapped_errors_and_the_text_stays_whole() {
        let e = Error::io("connecting", io::Error::from_raw_os_error(libc::ECONNREFUSED));
        let source = e.source().and_then(|s| s.downcast_ref::<io::Error>()).expect("an io::Error source");
        assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().starts_with("connecting: Connection refused"), "{e}");

        let e = crate::Message::decode(b"{not json").unwrap_err();
        let source = e.source().and_then(|s| s.downcast_ref::<serde_json::Error>()).expect("a serde source");
        assert_eq!(source.line(), 1);
        assert_eq!(e.to_string(), format!("protocol error: malformed message ({source}): \"{{not json\""));

        let e = Error::from(ProtocolError::StateCount { said: 3, arrived: 2 });
        assert!(e.source().is_none());
        assert_eq!(e.to_string(), "protocol error: worker said it reported 3 states, 2 arrived");
    }
}
