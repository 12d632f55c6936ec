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
    /// Request to the new worker serving, in milliseconds (the same as
    /// `total_ms`; kept for readers of earlier versions).
    pub handoff_ms: f64,
    /// Unused since the old worker exits after the reload completes (0).
    #[serde(default)]
    pub old_exit_ms: f64,
    /// The pause every client sees: the old worker told to stop → the new
    /// one serving, in milliseconds. None when nobody was stopped.
    #[serde(default)]
    pub pause_ms: Option<f64>,
    /// The new worker's hello → it holds every connection (the old one
    /// serves meanwhile), in milliseconds.
    #[serde(default)]
    pub stage_ms: Option<f64>,
    /// Request → new worker serving, in milliseconds.
    #[serde(default)]
    pub total_ms: Option<f64>,
    /// The pid serving after the attempt.
    #[serde(default)]
    pub worker_pid: Option<u32>,
    /// Connections handed over.
    pub connections: usize,
    /// With `--workers N`: the worker (slot) whose handoff failed and
    /// stopped the roll; the ones before it serve the new generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_worker: Option<usize>,
    /// Each worker's handover that completed, in the order of the roll
    /// (one entry with a single worker).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<SlotHandover>,
}

/// One worker's handover within a (rolling) reload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotHandover {
    /// The worker (slot).
    pub slot: usize,
    /// The new worker's pid.
    pub pid: u32,
    /// Its share, handed over.
    pub connections: usize,
    /// Its old worker told to stop → its new worker serving, ms: the pause
    /// its share saw. None when nobody was stopped.
    pub pause_ms: Option<f64>,
    /// Its new worker's hello → its share registered with it, ms.
    pub stage_ms: Option<f64>,
    /// The reload's request → its new worker serving, ms.
    pub serving_at_ms: f64,
}

/// One worker slot of `--workers N`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Its index, from 0.
    pub slot: usize,
    /// The pid of the worker that serves its share (none while it restarts).
    pub pid: Option<u32>,
    /// The generation of that worker (0: none served yet).
    pub generation: u64,
    /// Connections in its share.
    pub connections: usize,
    /// `serving`, `restarting`, or `handoff: <step>`.
    pub state: String,
}

/// The answer to `ctl upgrade`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeReply {
    /// Whether the new binary runs.
    pub ok: bool,
    /// Why not; with `ok`, why the previous binary runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// takeoverd's pid (the same before and after).
    pub pid: u32,
    /// Package versions before and after.
    #[serde(default)]
    pub from: String,
    /// The version that runs now.
    #[serde(default)]
    pub to: String,
    /// Request to the new image serving, in ms.
    #[serde(default)]
    pub took_ms: f64,
    /// The serving worker's pid (untouched).
    #[serde(default)]
    pub worker_pid: Option<u32>,
    /// Connections carried.
    #[serde(default)]
    pub connections: usize,
}

/// The answer to `ctl workers N`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResizeReply {
    /// Whether takeoverd runs `to` workers now and every planned move was
    /// made.
    pub ok: bool,
    /// What went wrong (nothing is lost: a connection that could not move
    /// stays with its worker, or with that worker's successor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Workers before.
    pub from: usize,
    /// Workers now.
    pub to: usize,
    /// Connections moved from one worker to another.
    pub moved: usize,
    /// Request to done, in ms.
    pub took_ms: f64,
    /// What an operator should know (a worker that speaks version 2 keeps
    /// its connections, which new connections then even out).
    #[serde(default)]
    pub notes: Vec<String>,
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
    /// Worker generation (1 for the first worker, +1 per worker that took
    /// over a share: a reload with N workers adds N).
    pub generation: u64,
    /// The first serving worker's pid (the only one with `--workers 1`).
    pub worker_pid: Option<u32>,
    /// `serving`, `restarting`, or `handoff: <step>`; with several workers
    /// in different states, each one's (`worker 1: handoff: ...`).
    #[serde(default)]
    pub state: String,
    /// Live connections held.
    pub connections: usize,
    /// Each worker slot.
    #[serde(default)]
    pub workers: Vec<WorkerInfo>,
    /// The slot a rolling reload is replacing now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling: Option<usize>,
    /// Listeners held.
    pub listeners: Vec<ListenerInfo>,
    /// Whether the systemd fd store is in use.
    pub fdstore: bool,
    /// fds in the store by name (listeners, connections, state, the
    /// overflow queue's two ends).
    pub fdstore_fds: usize,
    /// Connections whose copy in takeoverd is parked in flight, past
    /// `--max-open-connections` (not open files of takeoverd).
    #[serde(default)]
    pub parked: usize,
    /// Connections carried in the overflow queue (past the names budget).
    pub fdstore_overflow: usize,
    /// Socket pairs of the overflow queue (two named fds each).
    pub fdstore_pairs: usize,
    /// Connections kept neither way: they would not survive a restart.
    pub fdstore_refused: u64,
    /// Workers restarted after a crash.
    pub worker_restarts: u64,
    /// In-place upgrades of takeoverd (`ctl upgrade`) since it started.
    #[serde(default)]
    pub upgrades: u64,
    /// takeoverd's own package version.
    #[serde(default)]
    pub version: String,
    /// The last reloads, oldest first.
    pub reloads: Vec<ReloadRecord>,
}

impl Status {
    /// The one-line `STATUS=` text.
    pub fn line(&self) -> String {
        let mut s = if self.workers.len() > 1 {
            let each: Vec<String> = self
                .workers
                .iter()
                .map(|w| {
                    let pid = w.pid.map_or("none".into(), |p| p.to_string());
                    let state = if w.state == "serving" { String::new() } else { format!(" {}", w.state) };
                    format!("{pid}/g{}/{}{state}", w.generation, w.connections)
                })
                .collect();
            format!(
                "generation {}, {} workers (pid/generation/connections: {}), {} connections",
                self.generation,
                self.workers.len(),
                each.join(" "),
                self.connections
            )
        } else {
            format!(
                "generation {}, worker {}, {} connections",
                self.generation,
                self.worker_pid.map_or("none".into(), |p| p.to_string()),
                self.connections
            )
        };
        if let Some(r) = self.reloads.last() {
            let when = takeover::log::utc(r.at);
            if r.ok {
                let _ = write!(s, "; last reload ok at {when} (pause {}, total {:.1} ms)", pause(r), r.handoff_ms);
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
        let _ = writeln!(s, "state:        {}", self.state);
        let _ = writeln!(s, "connections:  {}", self.connections);
        if self.parked > 0 {
            let _ = writeln!(s, "parked:       {} (copies in flight past --max-open-connections)", self.parked);
        }
        if self.workers.len() > 1 {
            for w in &self.workers {
                let _ = writeln!(
                    s,
                    "worker {:<6}pid {}, generation {}, {} connections, {}",
                    format!("{}:", w.slot),
                    w.pid.map_or("none".into(), |p| p.to_string()),
                    w.generation,
                    w.connections,
                    w.state
                );
            }
        }
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
        let _ = writeln!(s, "takeoverd:    version {}, {} in-place upgrades", self.version, self.upgrades);
        for r in &self.reloads {
            let outcome = if r.ok {
                format!("ok, pause {}, staging {}, total {:.2} ms", pause(r), opt_ms(r.stage_ms), r.handoff_ms)
            } else {
                format!("FAILED: {}", r.error.as_deref().unwrap_or("?"))
            };
            let _ = writeln!(s, "reload:       {} generation {}: {outcome}", takeover::log::utc(r.at), r.generation);
        }
        s
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2} ms"))
}

fn pause(r: &ReloadRecord) -> String {
    r.pause_ms.map_or("none".into(), |v| format!("{v:.3} ms"))
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
