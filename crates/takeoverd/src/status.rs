//! What takeoverd reports: `STATUS=` and `takeoverd ctl status`.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// One reload attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadRecord {
    /// The generation that was (or would have been) started.
    pub generation: u64,
    /// Unix time of the request, in seconds.
    pub at: u64,
    /// Whether the new worker took over.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Request to the new worker's ack, in milliseconds.
    pub handoff_ms: f64,
    /// Request to the old worker's exit, in milliseconds.
    pub old_exit_ms: f64,
    /// The pid serving after the attempt.
    #[serde(default)]
    pub worker_pid: Option<u32>,
    /// Connections handed over.
    pub connections: usize,
}

/// A listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// Its name.
    pub name: String,
    /// Its address.
    pub addr: String,
}

/// The whole status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Worker generation (1 for the first worker, +1 per reload or restart).
    pub generation: u64,
    /// The serving worker's pid.
    pub worker_pid: Option<u32>,
    /// Live connections held.
    pub connections: usize,
    /// Listeners held.
    pub listeners: Vec<ListenerInfo>,
    /// Whether the systemd fd store is in use.
    pub fdstore: bool,
    /// fds in the store by name (listeners, connections, state, the
    /// overflow queue's two ends).
    pub fdstore_fds: usize,
    /// Connections carried in the overflow queue (past the names budget).
    pub fdstore_overflow: usize,
    /// Socket pairs of the overflow queue (two named fds each).
    pub fdstore_pairs: usize,
    /// Connections kept neither way: they would not survive a restart.
    pub fdstore_refused: u64,
    /// Workers restarted after a crash.
    pub worker_restarts: u64,
    /// The last reloads, oldest first.
    pub reloads: Vec<ReloadRecord>,
}

impl Status {
    /// The one-line `STATUS=` text.
    pub fn line(&self) -> String {
        let mut s = format!(
            "generation {}, worker {}, {} connections",
            self.generation,
            self.worker_pid.map_or("none".into(), |p| p.to_string()),
            self.connections
        );
        if let Some(r) = self.reloads.last() {
            let when = format_time(r.at);
            if r.ok {
                let _ = write!(s, "; last reload ok at {when} ({:.1} ms)", r.handoff_ms);
            } else {
                let _ = write!(s, "; last reload FAILED at {when}: {}", r.error.as_deref().unwrap_or("?"));
            }
        }
        if self.fdstore_refused > 0 {
            let _ = write!(s, "; {} connections would not survive a restart (fd store full)", self.fdstore_refused);
        }
        s
    }

    /// The multi-line text of `takeoverd ctl status`.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "generation:   {}", self.generation);
        let _ = writeln!(s, "worker pid:   {}", self.worker_pid.map_or("none".into(), |p| p.to_string()));
        let _ = writeln!(s, "connections:  {}", self.connections);
        for l in &self.listeners {
            let _ = writeln!(s, "listener:     {} {}", l.name, l.addr);
        }
        if self.fdstore {
            let _ = writeln!(
                s,
                "fd store:     {} fds by name, {} connections in the overflow queue, {} not kept",
                self.fdstore_fds, self.fdstore_overflow, self.fdstore_refused
            );
        } else {
            let _ = writeln!(s, "fd store:     not in use (not started by systemd)");
        }
        let _ = writeln!(s, "restarts:     {} worker crash restarts", self.worker_restarts);
        for r in &self.reloads {
            let outcome = if r.ok {
                format!("ok, {:.2} ms", r.handoff_ms)
            } else {
                format!("FAILED: {}", r.error.as_deref().unwrap_or("?"))
            };
            let _ = writeln!(s, "reload:       {} generation {}: {outcome}", format_time(r.at), r.generation);
        }
        s
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_time(unix: u64) -> String {
    let (days, secs) = (unix / 86400, unix % 86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_time() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::format_time(1_795_000_000), "2026-11-18 11:06:40 UTC");
    }
}
