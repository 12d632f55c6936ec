//! Byte offsets of a TCP stream, as the kernel counts them.
//!
//! A process that reads from a socket and dies before it acted on the bytes
//! loses them; no user-space bookkeeping can close that window, because a
//! `SIGKILL` lands as the `read` returns. The kernel, however, counts every
//! byte the peer sent us (`tcpi_bytes_received`) and every byte we queued for
//! the peer (`tcpi_bytes_acked` plus what still waits in the send queue). With
//! the bytes not yet read (`SIOCINQ`) that gives two exact stream offsets that
//! survive the death of any process holding the socket: how far the stream
//! was *consumed*, and how far it was *written*. An echo-like protocol that
//! peeks, writes, and only then consumes what it wrote can always tell, after
//! a crash, which bytes were already answered.

use std::io;
use std::os::fd::BorrowedFd;

use crate::sys;

/// How far a TCP stream has been read and written, in bytes since it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOffsets {
    /// Bytes read out of the receive queue by any holder of the socket.
    pub consumed: u64,
    /// Bytes written into the send queue by any holder of the socket.
    pub written: u64,
}

/// Reads the [`StreamOffsets`] of a TCP socket that was *accepted* (a
/// passive open). On a socket that connected out, the kernel counts the SYN
/// in `tcpi_bytes_acked`, so `written` is one more than the data written.
///
/// The counters are read twice around the queue sizes and the read is
/// retried until no segment arrived or was acknowledged in between, so the
/// result is consistent even while the peer keeps sending.
pub fn stream_offsets(fd: BorrowedFd<'_>) -> io::Result<StreamOffsets> {
    for _ in 0..1000 {
        let before = sys::tcp_info_bytes(fd)?;
        let inq = sys::inq(fd)?;
        let outq = sys::outq(fd)?;
        let after = sys::tcp_info_bytes(fd)?;
        if before == after {
            let (acked, received) = after;
            return Ok(StreamOffsets { consumed: received.saturating_sub(inq), written: acked + outq });
        }
    }
    Err(io::Error::new(io::ErrorKind::WouldBlock, "TCP counters kept moving; could not read a consistent snapshot"))
}

/// True when more than half of the socket's receive buffer is charged to
/// data already queued. A reader that leaves a few bytes unread (a partial
/// message) can then keep the receive window shut: the kernel frees a
/// buffer only when all of it is read, and coalesced buffers can be large.
pub fn receive_memory_pinned(fd: BorrowedFd<'_>) -> bool {
    match sys::receive_memory(fd) {
        Ok((queued, rcvbuf)) => u64::from(queued) * 2 > u64::from(rcvbuf),
        Err(_) => false,
    }
}

/// A listening TCP socket on `addr` (IPv4 or IPv6), close-on-exec,
/// non-blocking, with `SO_REUSEADDR` so a restarted server can bind again
/// while old connections linger in TIME_WAIT.
pub fn bind_tcp(addr: std::net::SocketAddr, backlog: i32) -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(addr))?;
    socket::listen(&fd, Backlog::new(backlog).map_err(io::Error::from)?)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn offsets_follow_reads_and_writes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let at = |s: &TcpStream| stream_offsets(s.as_fd()).unwrap();
        assert_eq!(at(&server), StreamOffsets { consumed: 0, written: 0 });
        client.write_all(b"abcdefgh").unwrap();
        let mut buf = [0u8; 3];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(at(&server).consumed, 3);
        server.write_all(b"xyz").unwrap();
        assert_eq!(at(&server), StreamOffsets { consumed: 3, written: 3 });
        // Bytes the peer sent but we did not read yet are not consumed.
        client.read_exact(&mut buf).unwrap();
        assert_eq!(at(&server), StreamOffsets { consumed: 3, written: 3 });
    }
}
