//! Background work at a low CPU priority: a staged worker registering
//! thousands of connections, or a worker tearing them down after its
//! successor took over, runs at nice 19, so that on a shared core the
//! worker that serves clients wins every wakeup and its latency does not
//! grow with the connection count.
//!
//! Lowering a priority is always allowed; raising it back to nice 0 needs
//! `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20 (`LimitNICE=+0` in a unit), and a
//! seccomp filter may forbid `setpriority` altogether. [`background`] only
//! lowers the priority where it can be raised again, so that no worker is
//! ever left to serve at nice 19.

use std::io;

/// The nice value of background work.
pub const BACKGROUND_NICE: i32 = 19;

/// Lowers the calling thread's priority for background work, if it can be
/// raised again with [`foreground`]. Returns whether it was lowered.
pub fn background() -> bool {
    if !can_return() {
        return false;
    }
    crate::sys::set_nice(BACKGROUND_NICE).is_ok()
}

/// Back to nice 0, after [`background`].
pub fn foreground() -> io::Result<()> {
    crate::sys::set_nice(0)
}

/// Lowers the calling thread's priority for good (a process about to exit).
pub fn wind_down() {
    let _ = crate::sys::set_nice(BACKGROUND_NICE);
}

/// Whether this thread may go from nice 19 back to nice 0.
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
        super::wind_down();
    }
}
