//! A worker process and its private control channel.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use takeover::control::CONTROL_FD_ENV;

/// Environment variables a worker must not inherit from takeoverd: they
/// describe takeoverd's own relation to systemd.
const PRIVATE_ENV: &[&str] =
    &["NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC", "JOURNAL_STREAM"];

/// A running worker.
#[derive(Debug)]
pub struct WorkerProc {
    child: Child,
    chan: OwnedFd,
}

impl WorkerProc {
    /// Starts `path` with `args`, its control channel as fd 3 (named by
    /// `TAKEOVERD_FD`).
    pub fn spawn(path: &Path, args: &[String], user: Option<(u32, u32)>) -> anyhow::Result<WorkerProc> {
        let (ours, theirs) = takeover::wire::seqpacket_pair()?;
        let mut cmd = Command::new(path);
        cmd.args(args).env(CONTROL_FD_ENV, "3").stdin(Stdio::null());
        for v in PRIVATE_ENV {
            cmd.env_remove(v);
        }
        // Keep JOURNAL_STREAM: the worker writes to the same stderr.
        if let Some(js) = std::env::var_os("JOURNAL_STREAM") {
            cmd.env("JOURNAL_STREAM", js);
        }
        if let Some((uid, gid)) = user {
            // std drops supplementary groups (setgroups(0)) when it changes uid.
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        takeover::pass_fd(&mut cmd, theirs, 3);
        let child = cmd.spawn().with_context(|| format!("starting worker {}", path.display()))?;
        // `cmd` (and with it our copy of the worker's end) is dropped here.
        Ok(WorkerProc { child, chan: ours })
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Our end of the control channel.
    pub fn chan(&self) -> BorrowedFd<'_> {
        self.chan.as_fd()
    }

    /// `Some(status)` once it has exited (reaped).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `grace` for it to exit, then kills it. Returns how it
    /// ended.
    pub fn finish(mut self, grace: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if let Some(status) = self.exited() {
                return status;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        tracing::warn!(pid = self.pid(), "worker did not exit within {grace:?}; killing it");
        let _ = self.child.kill();
        self.child.wait().unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(9))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
