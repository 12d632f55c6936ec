//! The `state` memfd: what a later takeoverd needs to know of each stored
//! connection. It lives in the fd store beside the sockets and is rewritten
//! at each handoff; a torn write (a crash in the middle) is detected by the
//! JSON parser and costs only the carried states, never a connection: the
//! sockets themselves come back by name, and the kernel's byte counters are
//! the truth about their streams.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The fd-store name of the state memfd.
pub const STATE_NAME: &str = "state";

/// The document in the memfd, as read back.
#[derive(Debug, Default, Deserialize)]
pub struct Saved {
    /// Format version.
    pub version: u32,
    /// The generation of the last worker.
    pub generation: u64,
    /// Per connection name, the state its worker reported at the last handoff.
    pub conns: HashMap<String, Box<RawValue>>,
}

/// The document in the memfd, as written (borrowing, so nothing is copied).
#[derive(Debug, Serialize)]
pub struct SavedRef<'a> {
    /// Format version.
    pub version: u32,
    /// The generation of the last worker.
    pub generation: u64,
    /// Per connection name, its state.
    pub conns: HashMap<&'a str, &'a RawValue>,
}

/// The state memfd.
#[derive(Debug)]
pub struct StateFile {
    file: std::fs::File,
}

impl StateFile {
    /// A new, empty memfd.
    pub fn create() -> anyhow::Result<StateFile> {
        let fd = nix::sys::memfd::memfd_create(c"takeoverd-state", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        Ok(StateFile { file: fd.into() })
    }

    /// The memfd received from the fd store.
    pub fn from_fd(fd: OwnedFd) -> StateFile {
        StateFile { file: fd.into() }
    }

    /// Reads what a previous takeoverd saved; `None` (logged) when it is
    /// missing or torn.
    pub fn load(&mut self) -> Option<Saved> {
        let mut buf = Vec::new();
        if let Err(e) = self.file.seek(SeekFrom::Start(0)).and_then(|_| self.file.read_to_end(&mut buf)) {
            tracing::warn!("reading the state memfd: {e}");
            return None;
        }
        match serde_json::from_slice::<Saved>(&buf) {
            Ok(s) if s.version == 1 => Some(s),
            Ok(s) => {
                tracing::warn!(
                    version = s.version,
                    "the state memfd has a format this takeoverd does not know; ignored"
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    "the state memfd is unreadable ({e}); connections are restored without their saved state"
                );
                None
            }
        }
    }

    /// Replaces the content with `saved`.
    pub fn save(&mut self, saved: &SavedRef<'_>) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(saved).expect("state serialises");
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&bytes)?;
        self.file.set_len(bytes.len() as u64)
    }

    /// The fd, for the store.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
