//! The one corner of the project that calls into libc directly.
//!
//! Everything here is a thin, checked wrapper: raw fds become [`OwnedFd`] on
//! the line after the kernel hands them out, every call returns
//! `io::Result`, and every `unsafe` block says why it is sound.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Turns `ret == -1` into the thread's `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of an fd that the kernel just installed in our table
/// (received with `SCM_RIGHTS`, or inherited at exec).
///
/// # Safety
/// `raw` must be an open fd that nothing else in the process owns or will
/// close.
pub(crate) unsafe fn own(raw: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `raw` is open and unowned.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// `getsockopt` for an option whose value is a C `int`.
pub(crate) fn getsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes and `len` is the size of
    // `val`; the kernel writes at most `len` bytes.
    cvt(unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, (&mut val as *mut libc::c_int).cast(), &mut len) })?;
    Ok(val)
}

/// `SO_COOKIE`: a 64-bit number unique to this socket for the whole uptime
/// of the kernel (never reused, unlike fd numbers and inode numbers).
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let mut val: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: as in `getsockopt_int`, with a `u64` as the kernel defines it.
    cvt(unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_COOKIE, (&mut val as *mut u64).cast(), &mut len)
    })?;
    Ok(val)
}

/// An `ioctl` that returns a C `int` through its pointer argument
/// (`SIOCINQ`, `SIOCOUTQ`).
fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    // SAFETY: both requests write one `int` through the pointer, which is
    // valid for writes.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut val as *mut libc::c_int) })?;
    Ok(val)
}

/// What `TCP_INFO` tells about a connection's byte counts: its state
/// (`TCP_ESTABLISHED`, `TCP_CLOSE_WAIT`, ... as numbered in the kernel's
/// `include/net/tcp_states.h`) and the two byte counters the echo
/// protocol's crash safety rests on. The counters count sequence numbers, so
/// a FIN counts as one byte (see `tcp::stream_offsets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpCounters {
    /// `tcpi_state`.
    pub state: u8,
    /// `tcpi_bytes_acked`: sequence numbers we sent that the peer acknowledged.
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`: sequence numbers received in order.
    pub bytes_received: u64,
}

/// Reads [`TcpCounters`] with `getsockopt(TCP_INFO)`.
pub(crate) fn tcp_counters(fd: BorrowedFd<'_>) -> io::Result<TcpCounters> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is valid for `len` bytes of writes; the kernel writes at
    // most `len` bytes and reports how many it wrote in `len`.
    cvt(unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    })?;
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + size_of::<u64>();
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel's TCP_INFO has no byte counters (Linux 4.1 or later needed)",
        ));
    }
    // SAFETY: zero-initialised, and the kernel filled at least the fields we
    // read (`tcpi_state` is the first byte of the struct).
    let info = unsafe { info.assume_init() };
    Ok(TcpCounters {
        state: info.tcpi_state,
        bytes_acked: info.tcpi_bytes_acked,
        bytes_received: info.tcpi_bytes_received,
    })
}

/// Bytes waiting in the receive queue (`SIOCINQ`).
pub(crate) fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD).map(|n| n as u64)
}

/// Bytes written but not yet acknowledged by the peer (`SIOCOUTQ`).
pub(crate) fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ).map(|n| n as u64)
}

/// Arranges for `fd` to be fd number `target` in the child that `cmd`
/// spawns, without the close-on-exec flag, and for every fd above `target`
/// to be closed in the child when it execs, so it inherits nothing it was
/// not given (a stray fd the parent's own parent leaked, say). `fd` is
/// closed in the parent once the `Command` is dropped.
///
/// The fds above `target` are marked close-on-exec rather than closed at
/// once: one of them is the pipe on which `std` reports a failed `exec` to
/// the parent, so that `spawn` returns the error (a missing or
/// non-executable file) instead of the child aborting.
pub fn pass_fd(cmd: &mut Command, fd: OwnedFd, target: RawFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed; `dup2`, `fcntl` and the raw
    // `close_range` syscall are. `fd` is moved into the closure, so it stays
    // open until the Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            if raw == target {
                let flags = cvt(libc::fcntl(raw, libc::F_GETFD))?;
                cvt(libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
            } else {
                // dup2 clears FD_CLOEXEC on the new fd.
                cvt(libc::dup2(raw, target))?;
            }
            // close_range(2) with CLOSE_RANGE_CLOEXEC exists since Linux
            // 5.11; on older kernels the strays stay (they are close-on-exec
            // in a well-behaved parent).
            libc::syscall(
                libc::SYS_close_range,
                (target + 1) as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// Takes the fd whose number is in the environment variable `var` (a
/// convention like systemd's `LISTEN_FDS`), checks that the fd is open and
/// marks it close-on-exec.
///
/// Returns `Ok(None)` when the variable is not set. Each fd number can be
/// taken once per process; a second attempt is an error rather than a second
/// owner of the same fd.
///
/// The variable stays set: changing the environment is unsound while other
/// threads may read it (`std::env::remove_var` is `unsafe` in edition 2024),
/// and a library cannot know that no other thread runs. The fd itself is
/// close-on-exec, so a child never inherits it; a process that starts
/// children removes the variable from theirs (`Command::env_remove`), as
/// takeoverd does for the variables it reads.
pub fn take_env_fd(var: &str) -> io::Result<Option<OwnedFd>> {
    let Some(value) = std::env::var_os(var) else {
        return Ok(None);
    };
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("${var}={value:?}: {why}"));
    let raw: RawFd = value.to_str().and_then(|v| v.parse().ok()).ok_or_else(|| invalid("not an fd number".into()))?;
    take_raw_inherited(raw).map(Some).map_err(|e| invalid(e.to_string()))
}

/// Takes fd number `raw`, which this process's parent handed down at exec
/// (systemd's `LISTEN_FDS` convention: fds 3, 4, ...): checks it is open,
/// marks it close-on-exec and returns it owned. Each number can be taken
/// once per process; a second attempt is an error, never a second owner.
pub fn take_raw_inherited(raw: RawFd) -> io::Result<OwnedFd> {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static TAKEN: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

    if raw < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw} is a standard stream, not an inherited fd"),
        ));
    }
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if !taken.get_or_insert_with(HashSet::new).insert(raw) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("inherited fd {raw} was taken already")));
    }
    // SAFETY: F_GETFD only inspects the fd table; EBADF tells us it is closed.
    let flags = cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })
        .map_err(|e| io::Error::new(e.kind(), format!("inherited fd {raw} is not open ({e})")))?;
    // SAFETY: setting a flag on an fd we just saw open.
    cvt(unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    // SAFETY: the fd is open (checked above), was handed to this process by
    // its parent for it to own, and the set above makes sure we own it once.
    Ok(unsafe { own(raw) })
}

/// What one `recvmsg` returned.
#[derive(Debug)]
pub(crate) struct RecvWithFds {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// `MSG_TRUNC`: the datagram was longer than the buffer.
    pub truncated: bool,
    /// `MSG_CTRUNC`: some control data (fds) did not fit or could not be
    /// installed; the ones that were installed are in `fds`.
    pub ctruncated: bool,
    /// A control message other than `SCM_RIGHTS` arrived.
    pub foreign_cmsg: bool,
}

/// `recvmsg(MSG_DONTWAIT | MSG_CMSG_CLOEXEC)` with room for `max_fds` fds.
///
/// Unlike a wrapper that refuses to parse control data on `MSG_CTRUNC`, this
/// takes ownership of every fd that did arrive, truncated or not, so none
/// can leak.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<RecvWithFds> {
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    let space = unsafe { libc::CMSG_SPACE((max_fds * size_of::<RawFd>()) as u32) } as usize;
    // u64 elements keep the buffer aligned for `cmsghdr`.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` (valid for `buf.len()` bytes of writes)
    // and at `cbuf` (valid for `space` bytes); both outlive the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = RecvWithFds {
        len: n as usize,
        fds: Vec::new(),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        ctruncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        foreign_cmsg: false,
    };
    // SAFETY: `msg` was filled in by the kernel; CMSG_FIRSTHDR/NXTHDR walk
    // the control buffer within `msg_controllen`, which the kernel set to
    // the bytes it wrote.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points into `cbuf` (see above).
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at `count` fds inside `cbuf`; they may
            // be unaligned, so read each with read_unaligned.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as *const RawFd;
            for i in 0..count {
                // SAFETY: `i < count`, so the read is inside this cmsg.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed this fd for us with this
                // message; nothing else in the process knows of it.
                out.fds.push(unsafe { own(raw) });
            }
        } else {
            out.foreign_cmsg = true;
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(out)
}

/// `SO_MEMINFO`: (bytes charged to the receive queue, receive buffer size).
pub(crate) fn receive_memory(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    const SO_MEMINFO: libc::c_int = 55;
    let mut info = [0u32; 9]; // SK_MEMINFO_VARS
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is valid for `len` bytes of writes; the kernel writes at
    // most `len` bytes.
    cvt(unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_MEMINFO, info.as_mut_ptr().cast(), &mut len) })?;
    Ok((info[0], info[1]))
}

/// Sets the calling thread's scheduling policy: `SCHED_IDLE` (it runs only
/// when nothing else wants the CPU, and any other thread that wakes up
/// preempts it at once) or back to `SCHED_OTHER`.
pub(crate) fn set_sched_idle(idle: bool) -> io::Result<()> {
    let policy = if idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param the kernel only reads; pid 0 is
    // the calling thread.
    cvt(unsafe { libc::sched_setscheduler(0, policy, &param) }).map(drop)
}

/// Sets the calling thread's nice value (Linux keeps one per thread).
pub(crate) fn set_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority reads its three integer arguments only.
    cvt(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_failed_exec_is_an_error_of_spawn_with_an_fd_passed() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut cmd = Command::new("/nonexistent/worker");
        pass_fd(&mut cmd, OwnedFd::from(ours), 3);
        let err = cmd.spawn().expect_err("exec of a missing file must fail in spawn");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn a_passed_fd_is_inherited_and_strays_are_not() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        // F_DUPFD leaves close-on-exec clear: a stray a careless parent
        // would leak.
        // SAFETY: F_DUPFD only adds an fd to our table; we own it below.
        let raw = cvt(unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD, 10) }).unwrap();
        // SAFETY: the fd was just created for us and nothing else owns it.
        let stray = unsafe { own(raw) };
        let n = stray.as_raw_fd();
        let probe =
            format!("for f in 3 {n}; do if [ -e /proc/self/fd/$f ]; then echo $f open; else echo $f closed; fi; done");
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &probe]);
        pass_fd(&mut cmd, OwnedFd::from(ours), 3);
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("3 open\n{n} closed\n"));
        drop(stray);
    }
}
