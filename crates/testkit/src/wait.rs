//! The one polling wait of the tests and the benchmark: a condition, a
//! deadline, and on timeout a message naming what was awaited. Tests use
//! [`wait_until`] (which panics); code that must carry on after a timeout
//! uses [`poll_until`].

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// A condition did not hold before its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    /// What was awaited.
    pub what: String,
    /// How long.
    pub timeout: Duration,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "timed out after {:?} waiting until {}", self.timeout, self.what)
    }
}

impl std::error::Error for TimedOut {}

/// Polls `ok` until it holds or `timeout` passes.
pub fn poll_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<(), TimedOut> {
    let t0 = Instant::now();
    loop {
        if ok() {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(TimedOut { what: what.to_owned(), timeout });
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `ok` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, ok: impl FnMut() -> bool) {
    if let Err(e) = poll_until(what, timeout, ok) {
        panic!("{e}");
    }
}

/// Waits until something accepts on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    wait_until(&format!("something listens on port {port}"), timeout, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    wait_until(&format!("{} exists", path.display()), timeout, || path.exists());
}

/// Waits for a child with a deadline; `None` (and the child killed and
/// reaped) when the deadline passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    let _ = poll_until("the child exits", timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_it_awaited() {
        let e = poll_until("pigs fly", Duration::from_millis(30), || false).unwrap_err();
        assert_eq!(e.to_string(), "timed out after 30ms waiting until pigs fly");
        let mut n = 0;
        poll_until("the third poll", Duration::from_secs(5), || {
            n += 1;
            n == 3
        })
        .unwrap();
    }

    #[test]
    fn a_child_past_its_deadline_is_killed() {
        let mut c = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        assert_eq!(wait_timeout(&mut c, Duration::from_millis(50)), None);
        assert!(c.try_wait().unwrap().is_some(), "killed and reaped");
        let mut c = std::process::Command::new("true").spawn().unwrap();
        assert!(wait_timeout(&mut c, Duration::from_secs(10)).unwrap().success());
    }
}
