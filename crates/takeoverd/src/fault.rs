//! Deterministic fault injection for the reliability tests.
//!
//! `TAKEOVERD_FAULT=STEP:ACTION:MARKER` makes takeoverd, on reaching STEP of
//! a reload, do ACTION, once: it first creates the file MARKER and skips the
//! fault if MARKER exists already, so the fault fires once even across
//! restarts of takeoverd. Unset (always, in production), it costs one branch.
//!
//! STEP may name a slot of `--workers N` as `STEP@SLOT` (`new-ready@1`: the
//! fault fires in worker 1's handoff of a rolling reload); without one it
//! fires in the first slot that reaches the step.
//!
//! Steps, in the order a reload passes them: `new-started` (the new worker
//! said hello), `new-ready` (it holds every connection; the old one is about
//! to be stopped), `old-stopped` (the old one stopped; the new one is about
//! to be told to serve), `new-serving` (it serves; the old one is about to be
//! told to exit). A version-1 new worker passes `sockets-sent` (the offer went
//! out) instead of `new-ready` and `old-stopped`. Outside reloads,
//! `accepted` is reached when takeoverd has accepted a connection and queued
//! it for the serving worker (the "old" worker of the actions).
//! Actions: `kill-new`, `kill-old` (SIGKILL), `stop-new`, `stop-old` (SIGSTOP,
//! so the step's deadline runs out), `kill-self` (SIGKILL takeoverd).
//!
//! `ctl upgrade` has steps of its own: `upgrade-exec` (about to exec the
//! new binary) and `upgrade-restore` (the new image, about to take the
//! snapshot), with the action `fail` (the step fails as if the exec, or
//! taking the snapshot, had) or `kill-self`.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Points in a reload where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    NewStarted,
    NewReady,
    OldStopped,
    SocketsSent,
    NewServing,
    Accepted,
    /// `ctl upgrade`, about to exec the new binary (action `fail`: exec a
    /// path that does not exist).
    UpgradeExec,
    /// The new image, about to take the snapshot (action `fail`: act as if
    /// it could not, and go back to the previous binary).
    UpgradeRestore,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::NewStarted => "new-started",
            Step::NewReady => "new-ready",
            Step::OldStopped => "old-stopped",
            Step::SocketsSent => "sockets-sent",
            Step::NewServing => "new-serving",
            Step::Accepted => "accepted",
            Step::UpgradeExec => "upgrade-exec",
            Step::UpgradeRestore => "upgrade-restore",
        }
    }
}

/// Whether the configured fault is `STEP:fail:MARKER` for `step` (and had
/// not fired yet): the caller then fails that step on purpose.
pub fn fail_at(step: Step) -> bool {
    let Ok(spec) = std::env::var("TAKEOVERD_FAULT") else { return false };
    let mut parts = spec.splitn(3, ':');
    let (Some(s), Some("fail"), Some(marker)) = (parts.next(), parts.next(), parts.next()) else { return false };
    if s != step.name() || std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_err() {
        return false;
    }
    tracing::warn!(step = step.name(), "injecting a failure (TAKEOVERD_FAULT)");
    true
}

/// Injects the configured fault if `step` is its step. `new`/`old` are the
/// workers' pids.
pub fn at(step: Step, new: Option<u32>, old: Option<u32>) {
    at_slot(step, None, new, old)
}

/// [`at`], in the handoff of `slot` (a fault for another slot is skipped).
pub fn at_slot(step: Step, slot: Option<usize>, new: Option<u32>, old: Option<u32>) {
    let Ok(spec) = std::env::var("TAKEOVERD_FAULT") else { return };
    let mut parts = spec.splitn(3, ':');
    let (Some(s), Some(action), Some(marker)) = (parts.next(), parts.next(), parts.next()) else {
        tracing::warn!(%spec, "TAKEOVERD_FAULT must be STEP:ACTION:MARKER; ignored");
        return;
    };
    let (s, only) = match s.split_once('@') {
        Some((s, n)) => (s, n.parse::<usize>().ok()),
        None => (s, None),
    };
    if s != step.name() || only.is_some_and(|n| Some(n) != slot) {
        return;
    }
    let (target, signal) = match action {
        "kill-new" => (new, Signal::SIGKILL),
        "kill-old" => (old, Signal::SIGKILL),
        "stop-new" => (new, Signal::SIGSTOP),
        "stop-old" => (old, Signal::SIGSTOP),
        "kill-self" => (Some(std::process::id()), Signal::SIGKILL),
        "fail" => return, // see fail_at
        _ => {
            tracing::warn!(%action, "unknown TAKEOVERD_FAULT action; ignored");
            return;
        }
    };
    // No such process at this step (yet): wait for a step that has one.
    let Some(pid) = target else { return };
    if std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_err() {
        return; // fired already
    }
    tracing::warn!(step = step.name(), action, pid, "injecting a fault (TAKEOVERD_FAULT)");
    let _ = kill(Pid::from_raw(pid as i32), signal);
    // Let the kernel deliver it before the next step runs.
    std::thread::sleep(std::time::Duration::from_millis(20));
}
