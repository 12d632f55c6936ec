//! What kind of socket an fd is, and checking that a received fd is what
//! its sender says.

use std::fmt;
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

/// Checks that `fd` is of kind `kind`; the error says what it is instead.
pub fn validate(fd: BorrowedFd<'_>, kind: Kind) -> Result<(), String> {
    if kind == Kind::File {
        let st = nix::sys::stat::fstat(fd).map_err(|e| format!("fstat failed: {e}"))?;
        return if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            Ok(())
        } else {
            Err(format!("expected a regular file (memfd), got file mode {:o}", st.st_mode))
        };
    }
    let opt = |o, name: &str| {
        sys::getsockopt_int(fd, libc::SOL_SOCKET, o).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTSOCK) {
                format!("expected a {kind} socket, got something that is not a socket")
            } else {
                format!("getsockopt({name}) failed: {e}")
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
        return Err(format!("expected a {kind} socket, got {}", describe(domain, ty)));
    }
    if let Some(listening) = want_listening {
        let accepting = opt(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 0;
        if accepting != listening {
            let state = if accepting { "listening" } else { "not listening" };
            return Err(format!("expected a {kind} socket, got a {state} {}", describe(domain, ty)));
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
        assert_eq!(validate(l.as_fd(), Kind::TcpListener), Ok(()));
        assert_eq!(validate(c.as_fd(), Kind::TcpStream), Ok(()));
        let e = validate(l.as_fd(), Kind::TcpStream).unwrap_err();
        assert!(e.contains("listening AF_INET SOCK_STREAM"), "{e}");
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = validate(u.as_fd(), Kind::TcpStream).unwrap_err();
        assert!(e.contains("SOCK_DGRAM"), "{e}");
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let e = validate(f.as_fd(), Kind::TcpListener).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(validate(f.as_fd(), Kind::File), Ok(()));
    }
}
