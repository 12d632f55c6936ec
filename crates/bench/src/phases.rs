//! Where a reload's time goes, as takeoverd itself reports it: the
//! `reloads` records of `takeoverd ctl status --json` (it keeps the last
//! 20), read once after a run's reloads. No log scraping: log wording
//! changes with the code, the records are the interface.
//!
//! A takeoverd with the constant-time reload reports `pause_ms` (old worker
//! told to stop → new worker serving: the pause clients see), `stage_ms`
//! (new worker's hello → every connection registered with it) and
//! `total_ms` (request → done); an older one only `handoff_ms` (request →
//! new worker's ack), which then stands in for the pause.

use serde::Serialize;
use takeoverd::status::ReloadRecord;

use crate::stats::Spread;

/// Reload records takeoverd keeps in its status.
pub const HISTORY: usize = 20;

/// Spreads of the phases over the successful reloads read.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// Successful reload records read (at most [`HISTORY`]).
    pub records: usize,
    /// Old worker told to stop → new worker serving, ms (new takeoverd only).
    pub pause_ms: Option<Spread>,
    /// New worker's hello → every connection registered, ms (new takeoverd only).
    pub stage_ms: Option<Spread>,
    /// Request → done, ms (new takeoverd only).
    pub total_ms: Option<Spread>,
    /// Request → new worker's ack, ms (every takeoverd).
    pub handoff_ms: Option<Spread>,
}

impl Phases {
    /// The phases of the last `reloads` records (at most [`HISTORY`]) of a
    /// `ctl status --json`; failed reloads are left out.
    pub fn from_records(all: &[ReloadRecord], reloads: usize) -> Phases {
        let last = &all[all.len().saturating_sub(reloads.min(HISTORY))..];
        let ok: Vec<&ReloadRecord> = last.iter().filter(|r| r.ok).collect();
        let spread =
            |get: fn(&ReloadRecord) -> Option<f64>| Spread::of(&ok.iter().filter_map(|r| get(r)).collect::<Vec<_>>());
        Phases {
            records: ok.len(),
            pause_ms: spread(|r| r.pause_ms),
            stage_ms: spread(|r| r.stage_ms),
            total_ms: spread(|r| r.total_ms),
            handoff_ms: spread(|r| Some(r.handoff_ms)),
        }
    }

    /// The client-visible pause: `pause_ms`, or `handoff_ms` from a
    /// takeoverd that does not report it; with the name of the figure used.
    pub fn pause(&self) -> (Option<Spread>, &'static str) {
        match self.pause_ms {
            Some(p) => (Some(p), "pause_ms"),
            None => (self.handoff_ms, "handoff_ms"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as takeoverd writes them (the fields every version has,
    /// plus `extra`).
    fn records(extra: serde_json::Value) -> Vec<ReloadRecord> {
        let all = extra
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut r = serde_json::json!({"generation": 2, "at": 0, "connections": 1});
                r.as_object_mut().unwrap().extend(e.as_object().unwrap().clone());
                r
            })
            .collect();
        serde_json::from_value(serde_json::Value::Array(all)).unwrap()
    }

    #[test]
    fn new_fields_when_present_else_handoff() {
        let old = records(serde_json::json!([
            {"ok": true, "handoff_ms": 4.0, "old_exit_ms": 5.0},
            {"ok": false, "handoff_ms": 99.0, "old_exit_ms": 0.0},
            {"ok": true, "handoff_ms": 2.0, "old_exit_ms": 3.0},
        ]));
        let p = Phases::from_records(&old, 10);
        assert_eq!(p.records, 2);
        assert!(p.pause_ms.is_none() && p.stage_ms.is_none() && p.total_ms.is_none());
        let (pause, name) = p.pause();
        assert_eq!((pause.map(|s| s.max), name), (Some(4.0), "handoff_ms"));
        let new = records(serde_json::json!([
            {"ok": true, "handoff_ms": 9.0, "pause_ms": 1.5, "stage_ms": 0.5, "total_ms": 12.0},
            {"ok": true, "handoff_ms": 7.0, "pause_ms": 0.5, "stage_ms": 0.25, "total_ms": 10.0},
        ]));
        let p = Phases::from_records(&new, 1);
        assert_eq!(p.records, 1, "only the last one asked for");
        let (pause, name) = p.pause();
        assert_eq!((pause.map(|s| s.median), name), (Some(0.5), "pause_ms"));
        assert_eq!(p.total_ms.map(|s| s.median), Some(10.0));
        assert_eq!(Phases::from_records(&[], 5).records, 0);
    }
}
