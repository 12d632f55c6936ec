//! The error type of the handoff protocol.

use std::fmt;
use std::io;

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
    /// The peer sent something the protocol does not allow.
    Protocol(String),
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
        problem: String,
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

    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        Error::Protocol(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Protocol(msg) => write!(f, "protocol error: {msg}"),
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
                crate::wire::MAX_FDS
            ),
            Error::PeerNotAllowed { pid, uid } => {
                write!(f, "peer pid {pid} uid {uid} is neither root nor our uid {}", nix::unistd::geteuid())
            }
        }
    }
}

/// The OS error is part of the message already, so it is not repeated as
/// a source (a cause chain would print it twice).
impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::Timeout(_) => io::ErrorKind::TimedOut,
            Error::Disconnected(_) => io::ErrorKind::ConnectionAborted,
            Error::PeerNotAllowed { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}
