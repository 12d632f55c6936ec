//! The benchmark's two closed vocabularies: where a run's processes are
//! placed ([`Placement`]) and what is done to a service ([`EventKind`]).
//! They serialize (results JSON) and print as the lowercase words the
//! report has always used.

use serde::Serialize;

/// Where a run's processes are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// takeoverd and its workers on one CPU, the clients on another.
    Pinned,
    /// No pinning: everything shares the CPUs.
    Shared,
}

impl Placement {
    /// `Pinned` when `pinned`.
    pub fn of(pinned: bool) -> Placement {
        if pinned {
            Placement::Pinned
        } else {
            Placement::Shared
        }
    }

    /// The word in the report.
    pub fn name(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::Shared => "shared",
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What is done to a running service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A reload (`takeoverd ctl reload` or `systemctl reload`).
    Reload,
    /// `systemctl restart`.
    Restart,
    /// `systemctl kill -s KILL --kill-who=main` (systemd restarts it).
    Kill,
    /// `takeoverd ctl upgrade` (takeoverd re-executes itself in place).
    Upgrade,
}

impl EventKind {
    /// The word in the report.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Reload => "reload",
            EventKind::Restart => "restart",
            EventKind::Kill => "kill",
            EventKind::Upgrade => "upgrade",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialize_as_the_report_words() {
        assert_eq!(serde_json::to_string(&Placement::Pinned).unwrap(), "\"pinned\"");
        assert_eq!(serde_json::to_string(&EventKind::Kill).unwrap(), "\"kill\"");
        assert_eq!(Placement::of(false).to_string(), "shared");
        assert_eq!(EventKind::Restart.to_string(), "restart");
    }
}
