//! What kind of socket an fd is, and checking that a received fd is what
//! its sender says.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use serde::{Deserialize, Serialize};

use crate::sys;

/// The kinds of fd the protocol carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A listening TCP socket (IPv4 or IPv6).
    TcpListener,
    /// A connected TCP socket (IPv4 or IPv6).
    TcpStream,
    /// A listening Unix stream socket.
    UnixListener,
    /// A connected Unix stream socket.
    UnixStream,
    /// A Unix `SOCK_SEQPACKET` socket (a channel, e.g. a queue of fds).
    UnixSeqpacket,
    /// A memfd or other regular file (e.g. a state blob).
    File,
}

impl Kind {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TcpListener => "tcp-listener",
            Kind::TcpStream => "tcp-stream",
            Kind::UnixListener => "unix-listener",
            Kind::UnixStream => "unix-stream",
            Kind::UnixSeqpacket => "unix-seqpacket",
            Kind::File => "file",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an fd is not of the kind its sender says.
#[derive(Debug)]
#[non_exhaustive]
pub enum FdError {
    /// `fstat` failed.
    Fstat(io::Error),
    /// Not a regular file (a [`Kind::File`] must be one).
    NotRegularFile {
        /// Its `st_mode`.
        mode: u32,
    },
    /// Not a socket at all.
    NotSocket {
        /// The kind it should be.
        expected: Kind,
    },
    /// `getsockopt` failed.
    Getsockopt {
        /// The option (`SO_DOMAIN`, ...).
        option: &'static str,
        /// The OS error.
        error: io::Error,
    },
    /// A socket of another family or type, or listening where it should
    /// not be (or the other way round).
    WrongSocket {
        /// The kind it should be.
        expected: Kind,
        /// Its `SO_DOMAIN`.
        domain: i32,
        /// Its `SO_TYPE`.
        ty: i32,
        /// Whether it listens, when that was the difference.
        listening: Option<bool>,
    },
}

impl fmt::Display for FdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FdError::Fstat(e) => write!(f, "fstat failed: {e}"),
            FdError::NotRegularFile { mode } => write!(f, "expected a regular file (memfd), got file mode {mode:o}"),
            FdError::NotSocket { expected } => {
                write!(f, "expected a {expected} socket, got something that is not a socket")
            }
            FdError::Getsockopt { option, error } => write!(f, "getsockopt({option}) failed: {error}"),
            FdError::WrongSocket { expected, domain, ty, listening: None } => {
                write!(f, "expected a {expected} socket, got {}", describe(*domain, *ty))
            }
            FdError::WrongSocket { expected, domain, ty, listening: Some(listening) } => {
                let state = if *listening { "listening" } else { "not listening" };
                write!(f, "expected a {expected} socket, got a {state} {}", describe(*domain, *ty))
            }
        }
    }
}

/// The message includes the OS error's text; the source is there for a
/// program that inspects it.
impl std::error::Error for FdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FdError::Fstat(e) | FdError::Getsockopt { error: e, .. } => Some(e),
            _ => None,
        }
    }
}

/// Checks that `fd` is of kind `kind`; the error says what it is instead.
pub fn validate(fd: BorrowedFd<'_>, kind: Kind) -> Result<(), FdError> {
    if kind == Kind::File {
        let st = nix::sys::stat::fstat(fd).map_err(|e| FdError::Fstat(e.into()))?;
        return if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            Ok(())
        } else {
            Err(FdError::NotRegularFile { mode: st.st_mode })
        };
    }
    let opt = |o, option: &'static str| {
        sys::getsockopt_int(fd, libc::SOL_SOCKET, o).map_err(|error| {
            if error.raw_os_error() == Some(libc::ENOTSOCK) {
                FdError::NotSocket { expected: kind }
            } else {
                FdError::Getsockopt { option, error }
            }
        })
    };
    let domain = opt(libc::SO_DOMAIN, "SO_DOMAIN")?;
    let ty = opt(libc::SO_TYPE, "SO_TYPE")?;
    let (want_domain_ok, want_type, want_listening) = match kind {
        Kind::TcpListener => (domain == libc::AF_INET || domain == libc::AF_INET6, libc::SOCK_STREAM, Some(true)),
        Kind::TcpStream => (domain == libc::AF_INET || domain == libc::AF_INET6, libc::SOCK_STREAM, Some(false)),
        Kind::UnixListener => (domain == libc::AF_UNIX, libc::SOCK_STREAM, Some(true)),
        Kind::UnixStream => (domain == libc::AF_UNIX, libc::SOCK_STREAM, Some(false)),
        Kind::UnixSeqpacket => (domain == libc::AF_UNIX, libc::SOCK_SEQPACKET, None),
        Kind::File => unreachable!(),
    };
    if !want_domain_ok || ty != want_type {
        return Err(FdError::WrongSocket { expected: kind, domain, ty, listening: None });
    }
    if let Some(listening) = want_listening {
        let accepting = opt(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 0;
        if accepting != listening {
            return Err(FdError::WrongSocket { expected: kind, domain, ty, listening: Some(accepting) });
        }
    }
    Ok(())
}

fn describe(domain: i32, ty: i32) -> String {
    let d = match domain {
        libc::AF_INET => "AF_INET",
        libc::AF_INET6 => "AF_INET6",
        libc::AF_UNIX => "AF_UNIX",
        libc::AF_NETLINK => "AF_NETLINK",
        _ => return format!("socket of family {domain} and type {ty}"),
    };
    let t = match ty {
        libc::SOCK_STREAM => "SOCK_STREAM",
        libc::SOCK_DGRAM => "SOCK_DGRAM",
        libc::SOCK_SEQPACKET => "SOCK_SEQPACKET",
        libc::SOCK_RAW => "SOCK_RAW",
        _ => return format!("{d} socket of type {ty}"),
    };
    format!("{d} {t} socket")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;

    #[test]
    fn accepts_what_it_is_and_names_what_it_is_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        validate(l.as_fd(), Kind::TcpListener).unwrap();
        validate(c.as_fd(), Kind::TcpStream).unwrap();
        let e = validate(l.as_fd(), Kind::TcpStream).unwrap_err();
        assert!(matches!(e, FdError::WrongSocket { expected: Kind::TcpStream, listening: Some(true), .. }), "{e:?}");
        assert_eq!(e.to_string(), "expected a tcp-stream socket, got a listening AF_INET SOCK_STREAM socket");
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = validate(u.as_fd(), Kind::TcpStream).unwrap_err();
        assert!(matches!(e, FdError::WrongSocket { ty: libc::SOCK_DGRAM, listening: None, .. }), "{e:?}");
        assert_eq!(e.to_string(), "expected a tcp-stream socket, got AF_INET SOCK_DGRAM socket");
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let e = validate(f.as_fd(), Kind::TcpListener).unwrap_err();
        assert!(matches!(e, FdError::NotSocket { expected: Kind::TcpListener }), "{e:?}");
        validate(f.as_fd(), Kind::File).unwrap();
        let e = validate(l.as_fd(), Kind::File).unwrap_err();
        assert!(e.to_string().starts_with("expected a regular file (memfd), got file mode 14"), "{e}");
    }
}
