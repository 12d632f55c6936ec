//! Counters and the final summary of a `seqnum-client` run.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::histogram::Histogram;

/// What can go wrong on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An echo differs from the seqnum sent, or bytes came with nothing in
    /// flight.
    Discontinuity,
    /// A read or write failed (`ECONNRESET`, `EPIPE`, ...).
    Reset,
    /// A read returned 0: the server closed the connection.
    Eof,
    /// No echo within `--timeout-ms`.
    Timeout,
    /// The connect failed or did not complete within `--timeout-ms`.
    Connect,
}

impl ErrorKind {
    /// Name used in log lines, as in the JSON keys.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Discontinuity => "discontinuity",
            ErrorKind::Reset => "reset",
            ErrorKind::Eof => "eof",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect_error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Running totals of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Messages whose sending began.
    pub sent: u64,
    /// Correct echoes received.
    pub echoed: u64,
    /// See [`ErrorKind::Discontinuity`].
    pub discontinuities: u64,
    /// See [`ErrorKind::Reset`].
    pub resets: u64,
    /// See [`ErrorKind::Eof`].
    pub eofs: u64,
    /// See [`ErrorKind::Timeout`].
    pub timeouts: u64,
    /// See [`ErrorKind::Connect`].
    pub connect_errors: u64,
    /// Connects that completed (one per connection, more with churn).
    pub connects: u64,
}

impl Counters {
    /// Counts one error of `kind`.
    pub fn add_error(&mut self, kind: ErrorKind) {
        *match kind {
            ErrorKind::Discontinuity => &mut self.discontinuities,
            ErrorKind::Reset => &mut self.resets,
            ErrorKind::Eof => &mut self.eofs,
            ErrorKind::Timeout => &mut self.timeouts,
            ErrorKind::Connect => &mut self.connect_errors,
        } += 1;
    }

    /// Sum of all errors.
    pub fn errors(&self) -> u64 {
        self.discontinuities + self.resets + self.eofs + self.timeouts + self.connect_errors
    }
}

/// Latency of the echoes, in microseconds, from the send of a message to
/// the full receipt of its echo.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum (exact).
    pub max: u64,
    /// Mean (exact).
    pub mean: f64,
}

impl LatencySummary {
    /// Summarizes a histogram of microseconds.
    pub fn from_histogram(h: &Histogram) -> Self {
        LatencySummary {
            p50: h.percentile(0.50),
            p99: h.percentile(0.99),
            p999: h.percentile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// The outcome of a run; serializes to the `--json` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Connections requested.
    pub connections: u64,
    /// Messages whose sending began.
    pub sent: u64,
    /// Correct echoes received.
    pub echoed: u64,
    /// Echoes that differed from the seqnum sent.
    pub discontinuities: u64,
    /// Connections that failed with a read or write error.
    pub resets: u64,
    /// Connections the server closed early.
    pub eofs: u64,
    /// Echoes that did not come back in time.
    pub timeouts: u64,
    /// Connects that failed or timed out.
    pub connect_errors: u64,
    /// Sum of the five error counts and of `failed_processes`.
    pub errors: u64,
    /// Latency of the echoes.
    pub latency_us: LatencySummary,
    /// Correct echoes per second of the run.
    pub echoes_per_sec: f64,
    /// Length of the run, in seconds.
    pub duration_s: f64,
    /// Connects that completed: one per connection, more with
    /// `--churn-messages`.
    #[serde(default)]
    pub connects: u64,
    /// Completed connects per second of the run.
    #[serde(default)]
    pub connects_per_sec: f64,
    /// `--churn-messages`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn_messages: Option<u64>,
    /// The latency histogram of the whole run, µs (`latency_us` is made
    /// from it): several clients' histograms merge into the percentiles of
    /// them all.
    #[serde(default)]
    pub latency_histogram: Histogram,
    /// Client processes the run was split over (`--processes`), when more
    /// than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
    /// Client processes that failed: no summary, or an exit status their
    /// summary does not explain. Their connections are in `connections`
    /// only; each counts as one error.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_processes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Summary {
    /// Builds the summary of a run that lasted `elapsed`.
    pub fn new(connections: u64, c: &Counters, latency: &Histogram, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        Summary {
            connections,
            sent: c.sent,
            echoed: c.echoed,
            discontinuities: c.discontinuities,
            resets: c.resets,
            eofs: c.eofs,
            timeouts: c.timeouts,
            connect_errors: c.connect_errors,
            errors: c.errors(),
            latency_us: LatencySummary::from_histogram(latency),
            echoes_per_sec: per_sec(c.echoed, secs),
            duration_s: (secs * 1000.0).round() / 1000.0,
            connects: c.connects,
            connects_per_sec: per_sec(c.connects, secs),
            churn_messages: None,
            latency_histogram: latency.clone(),
            processes: None,
            failed_processes: 0,
        }
    }

    /// The summary of a run split over `processes` client processes, of
    /// `connections` in all, from the summaries of those that did not fail
    /// (`parts`; the others are counted in `failed_processes` and
    /// `errors`). Counts and rates are summed; the latency figures come
    /// from the merged histogram (a percentile of percentiles is not a
    /// percentile; the mean is over every echo); the duration is the
    /// longest. `churn_messages` is the caller's to set.
    pub fn merge(connections: u64, processes: u32, parts: &[Summary]) -> Summary {
        let mut c = Counters::default();
        let mut latency = Histogram::new();
        let (mut echoes_per_sec, mut connects_per_sec, mut duration_s) = (0.0, 0.0, 0.0f64);
        for p in parts {
            c.sent += p.sent;
            c.echoed += p.echoed;
            c.discontinuities += p.discontinuities;
            c.resets += p.resets;
            c.eofs += p.eofs;
            c.timeouts += p.timeouts;
            c.connect_errors += p.connect_errors;
            c.connects += p.connects;
            latency.merge(&p.latency_histogram);
            echoes_per_sec += p.echoes_per_sec;
            connects_per_sec += p.connects_per_sec;
            duration_s = duration_s.max(p.duration_s);
        }
        let failed_processes = u64::from(processes).saturating_sub(parts.len() as u64);
        let mut merged = Summary::new(connections, &c, &latency, Duration::from_secs_f64(duration_s));
        merged.errors += failed_processes;
        merged.echoes_per_sec = (echoes_per_sec * 10.0).round() / 10.0;
        merged.connects_per_sec = (connects_per_sec * 10.0).round() / 10.0;
        merged.processes = Some(processes);
        merged.failed_processes = failed_processes;
        merged
    }

    /// True when nothing went wrong: exit status 0.
    pub fn is_success(&self) -> bool {
        self.errors == 0
    }

    /// The summary as one line of JSON (no trailing newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a summary always serializes")
    }
}

/// `n` per second over `secs`, to one decimal.
fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n as f64 / secs * 10.0).round() / 10.0
    } else {
        0.0
    }
}

/// Human-readable latency: `850µs`, `1.23ms`, `2.50s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency_us;
        let processes = match self.processes {
            Some(p) if p > 1 => format!(" in {p} processes"),
            _ => String::new(),
        };
        writeln!(
            f,
            "connections {}{processes}, {:.3} s: sent {}, echoed {} ({:.1} echoes/s)",
            self.connections, self.duration_s, self.sent, self.echoed, self.echoes_per_sec
        )?;
        if let Some(k) = self.churn_messages {
            writeln!(
                f,
                "churn: {} connects ({:.1} connects/s), {k} messages each, then a clean close",
                self.connects, self.connects_per_sec
            )?;
        }
        writeln!(
            f,
            "latency: p50 {}, p99 {}, p99.9 {}, max {}, mean {}",
            fmt_us(l.p50),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max),
            fmt_us(l.mean.round() as u64)
        )?;
        let failed = match self.failed_processes {
            0 => String::new(),
            n => format!(", failed client processes {n}"),
        };
        write!(
            f,
            "errors: {} (discontinuities {}, resets {}, eofs {}, timeouts {}, connect errors {}{failed}): {}",
            self.errors,
            self.discontinuities,
            self.resets,
            self.eofs,
            self.timeouts,
            self.connect_errors,
            if self.is_success() { "PASS" } else { "FAIL" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keys() {
        let mut c = Counters { sent: 10, echoed: 9, ..Counters::default() };
        c.add_error(ErrorKind::Timeout);
        let mut h = Histogram::new();
        h.record(100);
        h.record(300);
        let s = Summary::new(2, &c, &h, Duration::from_secs(2));
        assert_eq!(s.errors, 1);
        assert!(!s.is_success());
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "connections",
            "sent",
            "echoed",
            "discontinuities",
            "resets",
            "eofs",
            "timeouts",
            "connect_errors",
            "errors",
            "latency_us",
            "echoes_per_sec",
            "duration_s",
            "connects",
            "connects_per_sec",
            "latency_histogram",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert_eq!(keys.len(), 15, "churn_messages only with --churn-messages, processes with several");
        assert_eq!(v["latency_histogram"]["count"], 2);
        let lat = v["latency_us"].as_object().unwrap();
        for k in ["p50", "p99", "p999", "max", "mean"] {
            assert!(lat.contains_key(k), "{k}");
        }
        assert_eq!(v["latency_us"]["max"], 300);
        assert_eq!(v["latency_us"]["mean"], 200.0);
        assert_eq!(v["echoes_per_sec"], 4.5);
        assert_eq!(v["timeouts"], 1);
        let back: Summary = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(back, s);
        assert!(s.to_string().contains("FAIL"));
        assert!(!s.to_string().contains("churn"));
    }

    #[test]
    fn churn_summary() {
        let c = Counters { sent: 30, echoed: 30, connects: 10, ..Counters::default() };
        let mut s = Summary::new(2, &c, &Histogram::new(), Duration::from_secs(4));
        s.churn_messages = Some(3);
        assert_eq!(s.connects_per_sec, 2.5);
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!((v["connects"].as_u64(), v["churn_messages"].as_u64()), (Some(10), Some(3)));
        assert!(s.to_string().contains("churn: 10 connects (2.5 connects/s), 3 messages each"), "{s}");
        // A summary from before these keys still reads.
        let old = r#"{"connections":1,"sent":1,"echoed":1,"discontinuities":0,"resets":0,"eofs":0,"timeouts":0,
            "connect_errors":0,"errors":0,"latency_us":{"p50":1,"p99":1,"p999":1,"max":1,"mean":1.0},
            "echoes_per_sec":1.0,"duration_s":1.0}"#;
        let back: Summary = serde_json::from_str(old).unwrap();
        assert_eq!((back.connects, back.churn_messages), (0, None));
        assert_eq!(back.latency_histogram.count(), 0);
    }

    fn part(sent: u64, resets: u64, latencies: &[u64], secs: f64) -> Summary {
        let mut h = Histogram::new();
        for &us in latencies {
            h.record(us);
        }
        let c = Counters { sent, echoed: latencies.len() as u64, resets, connects: 2, ..Counters::default() };
        Summary::new(2, &c, &h, Duration::from_secs_f64(secs))
    }

    #[test]
    fn merge_sums_counts_and_merges_histograms() {
        // One fast process, one slow: the median of all is fast, where the
        // highest median would be slow.
        let fast = part(100, 0, &[100; 99], 1.0);
        let slow = part(60, 1, &[50_000; 60], 2.0);
        let m = Summary::merge(4, 2, &[fast.clone(), slow.clone()]);
        assert_eq!((m.connections, m.sent, m.echoed, m.resets, m.errors), (4, 160, 159, 1, 1));
        assert_eq!((m.connects, m.processes, m.failed_processes), (4, Some(2), 0));
        assert_eq!(m.latency_histogram.count(), 159);
        assert_eq!(m.latency_us.p50, 100);
        assert!(fast.latency_us.p50.max(slow.latency_us.p50) > 49_000);
        // 50 000 µs lands in a bucket reported at its midpoint.
        assert!((49_600..=50_000).contains(&m.latency_us.p99), "{:?}", m.latency_us);
        assert_eq!(m.latency_us.max, 50_000);
        // Weighted: (99 * 100 + 60 * 50 000) / 159, not (100 + 50 000) / 2.
        assert_eq!(m.latency_us.mean, 18_930.2);
        assert_eq!(m.echoes_per_sec, 99.0 + 30.0);
        assert_eq!(m.connects_per_sec, 2.0 + 1.0);
        assert_eq!(m.duration_s, 2.0);
        assert!(m.to_string().starts_with("connections 4 in 2 processes, 2.000 s"), "{m}");
        assert!(!m.to_string().contains("failed"), "{m}");
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(v["processes"], 2);
        assert!(v.get("failed_processes").is_none(), "{v}");
        assert_eq!(serde_json::from_str::<Summary>(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn merge_counts_a_failed_process_as_an_error() {
        let ok = part(10, 0, &[200; 10], 1.0);
        let m = Summary::merge(6, 3, &[ok.clone(), ok]);
        assert_eq!((m.connections, m.echoed, m.failed_processes, m.errors), (6, 20, 1, 1));
        assert!(!m.is_success());
        assert!(m.to_string().contains("failed client processes 1): FAIL"), "{m}");
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(v["failed_processes"], 1);
        // Nothing at all came back.
        let m = Summary::merge(6, 3, &[]);
        assert_eq!((m.errors, m.echoed, m.latency_us.p99, m.duration_s), (3, 0, 0, 0.0));
    }

    #[test]
    fn human_units() {
        assert_eq!(fmt_us(999), "999µs");
        assert_eq!(fmt_us(1500), "1.50ms");
        assert_eq!(fmt_us(2_500_000), "2.50s");
    }
}
