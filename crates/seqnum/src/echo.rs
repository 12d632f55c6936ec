//! The server side of one seqnum connection.
//!
//! The echo never holds a byte in user space: it *peeks* at the receive
//! queue, writes the complete messages it finds, and only then consumes as
//! many bytes as the kernel accepted. A message that is incomplete stays in
//! the kernel; an echo that does not fit the send buffer stays unread. So a
//! worker can stop at any instant — a handoff, or a `SIGKILL` — and the next
//! holder of the socket finds everything still in the kernel. The one gap,
//! a kill between the write and the consume, is closed by the kernel's byte
//! counters ([`takeover::stream_offsets`]): written minus consumed is exactly
//! the bytes that were echoed but not yet consumed, and [`EchoConn::adopt`]
//! discards them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use mio::net::TcpStream;
use serde::{Deserialize, Serialize};

use crate::MESSAGE_LEN;

/// What travels with a connection in a handoff.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnState {
    /// The client's address, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// The next seqnum we expect, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u32>,
    /// Stream bytes consumed when this state was taken.
    #[serde(default)]
    pub consumed: u64,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed at a message boundary.
    Eof,
    /// The client closed in the middle of a message.
    EofMidMessage,
    /// The client reset the connection.
    Reset,
}

/// One client connection.
#[derive(Debug)]
pub struct EchoConn {
    /// The socket.
    pub stream: TcpStream,
    /// `SO_COOKIE`: names the connection across processes.
    pub cookie: u64,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    next: Option<u32>,
    consumed: u64,
    /// The last `serve` stopped at its budget with input left.
    pub more: bool,
    /// The last `serve` could not write all it had: waiting for room.
    pub blocked: bool,
    /// In the event loop's ready queue.
    pub queued: bool,
}

/// Bytes one `serve` call echoes at most before yielding to other work.
pub const SERVE_BUDGET: u64 = 64 * 1024;

pub use takeover::channel::{conn_name, cookie_of_name};

impl EchoConn {
    /// A connection we just accepted.
    pub fn accepted(stream: TcpStream, peer: SocketAddr) -> io::Result<EchoConn> {
        stream.set_nodelay(true)?;
        let cookie = takeover::socket_cookie(stream.as_fd())?;
        Ok(EchoConn {
            stream,
            cookie,
            peer: Some(peer),
            next: None,
            consumed: 0,
            more: false,
            blocked: false,
            queued: false,
        })
    }

    /// A connection received in a handoff. When `recovered` (the previous
    /// holder died), bytes it echoed but did not consume are discarded, and
    /// a stale expected seqnum is forgotten.
    pub fn adopt(stream: TcpStream, name: &str, state: ConnState, recovered: bool) -> io::Result<EchoConn> {
        let consumed = state.consumed;
        let mut conn = EchoConn::staged(stream, name, state)?;
        if recovered || consumed == 0 {
            conn.reconcile()?;
        }
        Ok(conn)
    }

    /// A connection assigned by takeoverd, not served yet: no system call.
    /// Its previous holder stopped at a message boundary (or reports its
    /// state before this one serves), so `state.consumed`, counted from any
    /// message boundary, gives the position in the current message.
    pub fn staged(stream: TcpStream, name: &str, state: ConnState) -> io::Result<EchoConn> {
        // The name carries the cookie; ask the kernel only for a foreign name.
        let cookie = match cookie_of_name(name) {
            Some(c) => c,
            None => takeover::socket_cookie(stream.as_fd())?,
        };
        Ok(EchoConn {
            stream,
            cookie,
            peer: state.peer,
            next: state.next,
            consumed: state.consumed,
            more: false,
            blocked: false,
            queued: false,
        })
    }

    /// Takes a newer state (reported by the previous holder when it stopped).
    pub fn set_state(&mut self, state: ConnState) {
        self.peer = state.peer.or(self.peer);
        self.next = state.next;
        self.consumed = state.consumed;
    }

    /// After the previous holder died: discards the bytes it echoed but did
    /// not consume (the kernel's byte counters say how many), and learns the
    /// stream position from the kernel.
    pub fn reconcile(&mut self) -> io::Result<()> {
        let at = takeover::stream_offsets(self.stream.as_fd())?;
        if at.written > at.consumed {
            let extra = at.written - at.consumed;
            discard(&self.stream, &mut vec![0u8; extra as usize])?;
            tracing::info!(peer = ?self.peer, bytes = extra, "discarded input that the previous worker echoed but did not consume");
        }
        let consumed = at.written.max(at.consumed);
        if consumed != self.consumed {
            // Messages went by since the state was taken: the expected
            // seqnum is re-learnt from the next message.
            self.next = None;
        }
        self.consumed = consumed;
        Ok(())
    }

    /// Position inside the current message (0 at a message boundary): the
    /// one thing about a connection that the kernel cannot tell a successor
    /// without its byte counters.
    pub fn phase(&self) -> usize {
        (self.consumed % MESSAGE_LEN as u64) as usize
    }

    /// Stream bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The state to carry in a handoff.
    pub fn state(&self) -> ConnState {
        ConnState { peer: self.peer, next: self.next, consumed: self.consumed }
    }

    /// Echoes every complete message waiting, until the socket has nothing
    /// more or cannot take more. `read_closed` is the event loop's view that
    /// the peer shut down its side. Returns `Some(end)` when the connection
    /// is over.
    pub fn serve(&mut self, scratch: &mut [u8], read_closed: bool) -> Option<End> {
        let fd = self.stream.as_raw_fd();
        self.more = false;
        self.blocked = false;
        let start = self.consumed;
        loop {
            if self.consumed - start >= SERVE_BUDGET {
                self.more = true;
                return None;
            }
            let n = match nix::sys::socket::recv(fd, scratch, peek_flags()) {
                Ok(0) => {
                    return Some(if self.consumed % MESSAGE_LEN as u64 == 0 { End::Eof } else { End::EofMidMessage })
                }
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => return None,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Some(End::Reset),
            };
            let phase = (self.consumed % MESSAGE_LEN as u64) as usize;
            // Bytes up to the last message boundary in what is queued.
            let mut k = n - (phase + n) % MESSAGE_LEN;
            if k == 0 {
                // Only an incomplete message is queued. It normally stays in
                // the kernel until the rest arrives. But if its few bytes sit
                // in a large coalesced buffer (a client that pipelined a lot),
                // that buffer's memory stays charged to the socket, the
                // receive window closes, and the rest can never arrive: echo
                // the partial bytes then, to free it.
                // (Served without its event, e.g. woken after a handoff, the
                // close is asked of the kernel: no further event would come.)
                if read_closed || takeover::peer_closed(self.stream.as_fd()) {
                    return Some(End::EofMidMessage);
                }
                if !takeover::receive_memory_pinned(self.stream.as_fd()) {
                    return None;
                }
                k = n;
            }
            let w = match nix::sys::socket::send(fd, &scratch[..k], send_flags()) {
                Ok(w) => w,
                Err(nix::errno::Errno::EAGAIN) => 0,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Some(End::Reset),
            };
            if w > 0 {
                self.check_seqnums(&scratch[..k], w, phase);
                if discard(&self.stream, &mut scratch[..w]).is_err() {
                    return Some(End::Reset);
                }
                self.consumed += w as u64;
            }
            if w < k {
                self.blocked = true;
                return None; // wait until writable
            }
            if k == n && n < scratch.len() {
                // All that was queued is echoed and consumed. Bytes arriving
                // since the peek raise a new edge, so there is no need to
                // peek again only to hear EAGAIN: a syscall saved per echo.
                // (With a partial message left, peek again: it may need the
                // pinned-memory check above.)
                return None;
            }
        }
    }

    /// Warns about each message whose head is among the first `w` bytes of
    /// `queued` (which holds only complete messages after the first `phase`
    /// bytes' worth) and is not the expected seqnum.
    fn check_seqnums(&mut self, queued: &[u8], w: usize, phase: usize) {
        let first = (MESSAGE_LEN - phase) % MESSAGE_LEN;
        for start in (first..w).step_by(MESSAGE_LEN) {
            let Some(msg) = queued.get(start..start + MESSAGE_LEN) else {
                // A partial message echoed early (see `serve`): its value is
                // not known yet; the next whole message sets the baseline.
                self.next = None;
                break;
            };
            let got = u32::from_be_bytes(msg.try_into().expect("4 bytes"));
            match self.next {
                Some(want) if want != got => {
                    tracing::warn!(peer = ?self.peer, expected = want, got, "seqnum discontinuity (echoed anyway)")
                }
                _ => tracing::trace!(peer = ?self.peer, seqnum = got),
            }
            self.next = Some(got.wrapping_add(1));
        }
    }
}

fn peek_flags() -> nix::sys::socket::MsgFlags {
    nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT
}

fn send_flags() -> nix::sys::socket::MsgFlags {
    nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT
}

/// Consumes `buf.len()` queued bytes. `MSG_TRUNC` on TCP drops them
/// without copying.
fn discard(stream: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let flags = nix::sys::socket::MsgFlags::MSG_TRUNC | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
    let mut left = buf.len();
    while left > 0 {
        match nix::sys::socket::recv(stream.as_raw_fd(), &mut buf[..left], flags) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed while discarding")),
            Ok(n) => left -= n.min(left),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// How long a test waits for an echo, or to send, before it fails
    /// (rather than hang).
    const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

    fn pair() -> (std::net::TcpStream, EchoConn) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        client.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        let (s, peer) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (client, EchoConn::accepted(TcpStream::from_std(s), peer).unwrap())
    }

    fn settle() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    #[test]
    fn echoes_whole_messages_and_leaves_a_partial_one_in_the_kernel() {
        let (mut client, mut conn) = pair();
        let mut scratch = vec![0u8; 4096];
        client.write_all(&[0, 0, 0, 0, 0, 0]).unwrap();
        settle();
        assert_eq!(conn.serve(&mut scratch, false), None);
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [0, 0, 0, 0]);
        let at = takeover::stream_offsets(conn.stream.as_fd()).unwrap();
        assert_eq!((at.consumed, at.written), (4, 4), "the partial message stays unread");
        client.write_all(&[0, 1]).unwrap();
        settle();
        assert_eq!(conn.serve(&mut scratch, false), None);
        client.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [0, 0, 0, 1]);
        assert_eq!(conn.state().next, Some(2));
    }

    #[test]
    fn adopting_after_a_crash_discards_what_was_echoed_but_not_consumed() {
        let (mut client, conn) = pair();
        client.write_all(&7u32.to_be_bytes()).unwrap();
        settle();
        // A worker that died between its write and its consume.
        nix::sys::socket::send(conn.stream.as_raw_fd(), &7u32.to_be_bytes(), send_flags()).unwrap();
        let state = conn.state();
        let name = conn_name(conn.cookie);
        let mut conn = EchoConn::adopt(conn.stream, &name, state, true).unwrap();
        let mut scratch = vec![0u8; 4096];
        assert_eq!(conn.serve(&mut scratch, false), None);
        client.write_all(&8u32.to_be_bytes()).unwrap();
        settle();
        assert_eq!(conn.serve(&mut scratch, false), None);
        let mut buf = [0u8; 8];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [0, 0, 0, 7, 0, 0, 0, 8], "7 echoed exactly once, then 8");
    }

    #[test]
    fn adopting_after_a_crash_is_exact_when_the_client_half_closed() {
        let (mut client, conn) = pair();
        client.write_all(&[0, 0, 0, 7, 0, 0, 0, 8]).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        settle();
        // A worker that echoed the first message and died before consuming it.
        nix::sys::socket::send(conn.stream.as_raw_fd(), &7u32.to_be_bytes(), send_flags()).unwrap();
        let state = conn.state();
        let name = conn_name(conn.cookie);
        let mut conn = EchoConn::adopt(conn.stream, &name, state, true).unwrap();
        // The peer's FIN is no stream byte: exactly the echoed 4 bytes went.
        assert_eq!(conn.consumed(), 4);
        let mut queued = [0u8; 16];
        let n = nix::sys::socket::recv(conn.stream.as_raw_fd(), &mut queued, peek_flags()).unwrap();
        assert_eq!(&queued[..n], &[0, 0, 0, 8], "only the second message is left");
        let mut scratch = vec![0u8; 4096];
        let end = (0..3).find_map(|_| conn.serve(&mut scratch, true));
        assert_eq!(end, Some(End::Eof), "the client closed at a message boundary");
        conn.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut echoed = Vec::new();
        client.read_to_end(&mut echoed).unwrap();
        assert_eq!(echoed, [0, 0, 0, 7, 0, 0, 0, 8], "7 echoed exactly once, then 8");
    }

    #[test]
    fn eof_is_reported() {
        let (client, mut conn) = pair();
        drop(client);
        settle();
        let mut scratch = vec![0u8; 64];
        assert_eq!(conn.serve(&mut scratch, true), Some(End::Eof));
    }
}
