//! The requests of the control socket (`takeoverd ctl ...`): one JSON
//! object per request, answered by one JSON reply: a
//! [`Status`](crate::status::Status) for `status`, a
//! [`ReloadRecord`](crate::status::ReloadRecord) for `reload`, an
//! [`UpgradeReply`](crate::status::UpgradeReply) for `upgrade`, a
//! [`ResizeReply`](crate::status::ResizeReply) for `workers`.

use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Reload now (or join the reload that is running) and report the outcome.
    Reload,
    /// Report the status.
    Status,
    /// Re-execute the binary on disk in place and report the outcome (an
    /// [`UpgradeReply`](crate::status::UpgradeReply)).
    Upgrade,
    /// Run `count` workers from now on, moving connections between them,
    /// and report the outcome (a [`ResizeReply`](crate::status::ResizeReply)).
    Workers {
        /// How many.
        count: usize,
    },
}
