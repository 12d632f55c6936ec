//! Messages with attached fds over a `SOCK_SEQPACKET` Unix socket.
//!
//! One message is one datagram: a JSON document of at most [`MAX_MESSAGE`]
//! bytes, with at most [`MAX_FDS`] fds attached as `SCM_RIGHTS`. Every fd the
//! kernel hands us becomes an [`OwnedFd`] before anything else is looked at,
//! so a message that is rejected for any reason closes its fds.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, ControlMessage, MsgFlags};

use crate::error::{Error, ProtocolError, Result};
use crate::sys;

/// The largest message, in bytes, either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The most fds one message carries: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS: usize = 253;

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// The payload (JSON).
    pub bytes: Vec<u8>,
    /// The fds that came with it, in order.
    pub fds: Vec<OwnedFd>,
}

/// Waits until `fd` is ready for `events` or `deadline` passes.
fn wait(fd: BorrowedFd<'_>, events: PollFlags, deadline: Option<Instant>, what: &'static str) -> Result<()> {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Timeout(what));
                }
                // Round up so we never spin on a sub-millisecond remainder.
                PollTimeout::try_from(left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(fd, events)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("poll on the takeover channel", e)),
        }
    }
}

/// Sends one message, waiting for room until `deadline`.
pub fn send(chan: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>], deadline: Option<Instant>) -> Result<()> {
    if bytes.len() > MAX_MESSAGE {
        return Err(ProtocolError::SendTooLarge { len: bytes.len() }.into());
    }
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::SendTooManyFds { count: fds.len() }.into());
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(bytes)];
    loop {
        match socket::sendmsg::<()>(
            chan.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => return Err(ProtocolError::ShortSend { sent: n, len: bytes.len() }.into()),
            Err(Errno::EAGAIN) => {
                wait(chan, PollFlags::POLLOUT, deadline, "waiting for room to send on the takeover channel")?
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(Error::Disconnected("while we were sending")),
            Err(e) => return Err(Error::io("sendmsg on the takeover channel", e)),
        }
    }
}

/// Receives one message, waiting until `deadline`. `Ok(None)` is an orderly
/// end of the channel.
pub fn recv(chan: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<Option<Received>> {
    loop {
        match try_recv(chan)? {
            Some(r) => return Ok(r),
            None => wait(chan, PollFlags::POLLIN, deadline, "waiting for the peer on the takeover channel")?,
        }
    }
}

/// Receives one message if one is queued: `Ok(None)` when none is,
/// `Ok(Some(None))` at the end of the channel.
pub fn try_recv(chan: BorrowedFd<'_>) -> Result<Option<Option<Received>>> {
    // One receive buffer per thread, reused: a fresh zeroed 64 KiB per
    // message cost more than most messages (a `closed` is 40 bytes).
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MESSAGE + 1]);
    }
    BUF.with(|buf| try_recv_into(chan, &mut buf.borrow_mut()))
}

fn try_recv_into(chan: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<Option<Received>>> {
    let r = loop {
        match sys::recv_with_fds(chan, buf, MAX_FDS) {
            Ok(r) => break r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(Some(None)),
            Err(e) => return Err(Error::io("recvmsg on the takeover channel", e)),
        }
    };
    // Every fd in `r.fds` is owned already: any error below closes them.
    if r.ctruncated {
        return Err(Error::Truncated { arrived: r.fds.len() });
    }
    if r.foreign_cmsg {
        return Err(ProtocolError::ForeignControlMessage.into());
    }
    if r.truncated || r.len > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge.into());
    }
    if r.len == 0 && r.fds.is_empty() {
        return Ok(Some(None));
    }
    Ok(Some(Some(Received { bytes: buf[..r.len].to_vec(), fds: r.fds })))
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets, close-on-exec.
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        None,
        socket::SockFlag::SOCK_CLOEXEC | socket::SockFlag::SOCK_NONBLOCK,
    )
    .map_err(|e| Error::io("socketpair", e))
}
