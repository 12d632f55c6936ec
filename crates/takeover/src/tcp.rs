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
//!
//! The kernel's counters count sequence numbers, in which each FIN takes
//! one; [`stream_offsets`] takes the FINs out again, so the offsets stay
//! exact after the peer half-closed its side, or we closed ours.

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
/// The counters count sequence numbers, and a FIN takes one, like the SYN.
/// The peer's FIN is counted in `tcpi_bytes_received` as soon as it arrives
/// in order (but never in `SIOCINQ`, which the kernel gives as data bytes
/// only), and ours in `tcpi_bytes_acked` (or in `SIOCOUTQ` until it is
/// acknowledged) as soon as `shutdown(SHUT_WR)` queues it. Both are taken
/// out again here, by the connection's state: the offsets stay data bytes
/// after either side closed its direction. A socket in `CLOSE` is taken to
/// have exchanged both FINs, as a socket someone still holds gets there
/// only that way or by a reset; after a reset the offsets may be one short,
/// which matters to no one: nothing more can be read or written.
///
/// The counters are read twice around the queue sizes and the read is
/// retried until no segment arrived or was acknowledged in between, so the
/// result is consistent even while the peer keeps sending.
pub fn stream_offsets(fd: BorrowedFd<'_>) -> io::Result<StreamOffsets> {
    for _ in 0..1000 {
        let before = sys::tcp_counters(fd)?;
        let inq = sys::inq(fd)?;
        let outq = sys::outq(fd)?;
        let after = sys::tcp_counters(fd)?;
        if before == after {
            let peer_fin = u64::from(peer_fin_counted(after.state));
            let our_fin = u64::from(our_fin_counted(after.state));
            return Ok(StreamOffsets {
                consumed: after.bytes_received.saturating_sub(inq).saturating_sub(peer_fin),
                written: (after.bytes_acked + outq).saturating_sub(our_fin),
            });
        }
    }
    Err(io::Error::new(io::ErrorKind::WouldBlock, "TCP counters kept moving; could not read a consistent snapshot"))
}

// TCP states as the kernel numbers them (include/net/tcp_states.h), as
// `tcpi_state` reports them.
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// Whether, in `state`, the peer's FIN has been received (in order) and so
/// counts in `tcpi_bytes_received`. The kernel sets the state as it counts
/// the FIN (`tcp_fin`): ESTABLISHED becomes CLOSE_WAIT, FIN_WAIT1 becomes
/// CLOSING, FIN_WAIT2 becomes TIME_WAIT; from CLOSE_WAIT our own FIN leads
/// to LAST_ACK. A socket that a process holds shows CLOSE rather than
/// TIME_WAIT, and CLOSE once LAST_ACK or CLOSING has its ack (see
/// [`stream_offsets`] for CLOSE after a reset).
fn peer_fin_counted(state: u8) -> bool {
    matches!(state, TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT | TCP_CLOSE)
}

/// Whether, in `state`, our own FIN was queued (`shutdown(SHUT_WR)` or a
/// close): it then counts in `SIOCOUTQ` (the send queue's sequence numbers)
/// until the peer acknowledges it, and in `tcpi_bytes_acked` after. The
/// kernel changes the state (ESTABLISHED to FIN_WAIT1, CLOSE_WAIT to
/// LAST_ACK) as it queues the FIN, under the same socket lock.
fn our_fin_counted(state: u8) -> bool {
    matches!(state, TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK | TCP_TIME_WAIT | TCP_CLOSE)
}

/// Whether the peer has closed its side (its FIN is in): a reader that
/// serves without an event (a connection it was handed, or woken) learns it
/// here. False when the state cannot be read.
pub fn peer_closed(fd: BorrowedFd<'_>) -> bool {
    sys::tcp_counters(fd).is_ok_and(|c| peer_fin_counted(c.state))
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
    use std::net::{Shutdown, TcpListener, TcpStream};
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

    /// Waits until the kernel shows `state` for `s` (loopback delivers at
    /// once, but an ack may be sent a moment later).
    fn wait_state(s: &TcpStream, state: u8) {
        let t0 = std::time::Instant::now();
        loop {
            let now = sys::tcp_counters(s.as_fd()).unwrap().state;
            if now == state {
                return;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "TCP state {now}, waited for {state}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A connection whose client sent 8 bytes, of which the server read 4,
    /// and whose server wrote 3: (client, server).
    fn half_echoed() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        client.write_all(b"abcdefgh").unwrap();
        server.read_exact(&mut [0u8; 4]).unwrap();
        server.write_all(b"xyz").unwrap();
        (client, server)
    }

    #[test]
    fn the_peers_fin_is_not_a_consumed_byte() {
        let (client, mut server) = half_echoed();
        let at = |s: &TcpStream| stream_offsets(s.as_fd()).unwrap();
        let mut buf = [0u8; 4];
        client.shutdown(Shutdown::Write).unwrap();
        wait_state(&server, TCP_CLOSE_WAIT);
        // The kernel counts the FIN in tcpi_bytes_received, not in SIOCINQ.
        assert_eq!(at(&server), StreamOffsets { consumed: 4, written: 3 });
        server.read_exact(&mut buf).unwrap();
        assert_eq!(at(&server), StreamOffsets { consumed: 8, written: 3 });
        assert_eq!(server.read(&mut buf).unwrap(), 0, "end of stream");
        assert_eq!(at(&server), StreamOffsets { consumed: 8, written: 3 });
        // Then we close our side too: LAST_ACK, and CLOSE once it is acked.
        server.shutdown(Shutdown::Write).unwrap();
        wait_state(&server, TCP_CLOSE);
        assert_eq!(at(&server), StreamOffsets { consumed: 8, written: 3 });
    }

    #[test]
    fn our_own_fin_is_not_a_written_byte() {
        let (mut client, mut server) = half_echoed();
        let at = |s: &TcpStream| stream_offsets(s.as_fd()).unwrap();
        let mut buf = [0u8; 4];
        server.shutdown(Shutdown::Write).unwrap();
        wait_state(&server, TCP_FIN_WAIT2);
        // The kernel counts our acked FIN in tcpi_bytes_acked, as it does
        // the SYN of a connection we open.
        assert_eq!(at(&server), StreamOffsets { consumed: 4, written: 3 });
        let mut echoed = Vec::new();
        client.read_to_end(&mut echoed).unwrap();
        assert_eq!(echoed, b"xyz");
        // The peer closes its side as well: both FINs are counted now.
        client.shutdown(Shutdown::Write).unwrap();
        wait_state(&server, TCP_CLOSE);
        assert_eq!(at(&server), StreamOffsets { consumed: 4, written: 3 });
        server.read_exact(&mut buf).unwrap();
        assert_eq!(at(&server), StreamOffsets { consumed: 8, written: 3 });
    }
}
