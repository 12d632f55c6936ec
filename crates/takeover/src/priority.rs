//! Background work at a low CPU priority: a staged worker registering
//! thousands of connections, or a worker tearing them down after its
//! successor took over, runs at nice 10, so that on a shared core the
//! worker that serves clients wins its wakeups and its latency does not
//! grow with the connection count. Not nice 19: a serving worker that keeps
//! its core busy (a connect storm) would leave a successor at nice 19 about
//! 1.5 % of it, too little to keep up with the connections assigned to it
//! meanwhile; at nice 10 it gets about 10 %, and the caller returns to nice 0
//! after a while anyway (see `seqnum-worker`).
//!
//!
//! Lowering a priority is always allowed; raising it back to nice 0 needs
//! `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20 (`LimitNICE=+0` in a unit), and a
//! seccomp filter may forbid `setpriority` altogether. [`background`] only
//! lowers the priority where it can be raised again, so that no worker is
//! ever left to serve at nice 19.

use std::io;

/// The nice value of background work.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority for background work, if it can be
/// raised again with [`foreground`]. Returns whether it was lowered.
pub fn background() -> bool {
    if !can_return() {
        return false;
    }
    crate::sys::set_nice(BACKGROUND_NICE).is_ok()
}

/// Puts the calling thread in `SCHED_IDLE` for work that may take as long
/// as it needs while anything else wants the core (a supervisor
/// re-executing itself beside the worker that serves): it runs in the
/// core's idle time, and a worker that wakes up preempts it at once, which
/// a low nice value alone does not promise. Only where it can return with
/// [`foreground`] (`RLIMIT_NICE`, as for [`background`]); returns whether it
/// did. The policy survives `execve`.
pub fn idle() -> bool {
    can_return() && crate::sys::set_sched_idle(true).is_ok()
}

/// Back to nice 0 and `SCHED_OTHER`, after [`background`] or [`idle`].
pub fn foreground() -> io::Result<()> {
    crate::sys::set_sched_idle(false)?;
    crate::sys::set_nice(0)
}

/// Lowers the calling thread's priority for good (a process about to exit).
pub fn wind_down() {
    let _ = crate::sys::set_nice(19);
}

/// Whether this thread may go from background priority back to nice 0.
fn can_return() -> bool {
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE).map(|(soft, _)| soft);
    nix::unistd::geteuid().is_root() || limit.is_ok_and(|soft| soft >= 20)
}

#[cfg(test)]
mod tests {
    #[test]
    fn background_and_back() {
        if super::background() {
            super::foreground().expect("back to nice 0");
        }
        if super::idle() {
            super::foreground().expect("back to SCHED_OTHER");
        }
        super::wind_down();
    }
}
