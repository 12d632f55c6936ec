//! Keeps a burst of the same problem from flooding the log.

use std::time::{Duration, Instant};

/// Lets one event through per `every`, and counts the rest.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// One event per `every`.
    pub const fn new(every: Duration) -> Throttle {
        Throttle { every, last: None, suppressed: 0 }
    }

    /// `Some(n)` when this event should be logged, `n` being how many were
    /// suppressed since the last one logged; `None` to stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now < last + self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl Throttle {
    /// Logs `msg` as a warning if allowed now, with the count of the ones
    /// kept quiet since.
    pub fn warn(&mut self, msg: impl std::fmt::Display) {
        match self.allow(Instant::now()) {
            Some(0) => tracing::warn!("{msg}"),
            Some(n) => tracing::warn!("{msg} (and {n} more like it since the last report)"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_with_a_count() {
        let mut t = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(t.allow(t0), Some(0));
        assert_eq!(t.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(t.allow(t0 + Duration::from_millis(20)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(2)), Some(2));
    }
}
