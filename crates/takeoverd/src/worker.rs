//! A worker process, its private control channel, and its stderr.
//!
//! A worker's stderr is a pipe to takeoverd, not takeoverd's own stderr: a
//! thread per worker forwards every line to takeoverd's stderr unchanged
//! (the worker's lines carry their own `seqnum-worker[pid]: ` tag, and the
//! sd-daemon `<N>` priority under the journal) and keeps the first lines,
//! so that a worker that fails before its hello can be reported with what
//! it said ([`WorkerProc::finish_with_stderr`]). The thread ends when the pipe
//! does: when the worker and every child it left behind have closed it.
//!
//! Under the journal, the worker is told that its stderr *is* the journal
//! stream: `JOURNAL_STREAM` names the pipe (its device and inode), so it
//! keeps writing `<N>` prefixes (see `takeover::log`), and the lines reach
//! takeoverd's own journal stream verbatim, priorities included. A worker
//! that would switch to journald's native protocol on seeing
//! `JOURNAL_STREAM` still logs to the journal, but its lines then bypass
//! takeoverd (and [`WorkerProc::finish_with_stderr`]).
//!
//! If takeoverd dies, the pipe has no reader: the worker's next log line
//! fails with `EPIPE` (Rust ignores `SIGPIPE`; a worker in another language
//! may die of it), and the worker exits anyway as its control channel ends.

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use takeover::control::CONTROL_FD_ENV;

/// Environment variables a worker must not inherit from takeoverd: they
/// describe takeoverd's own relation to systemd. (`JOURNAL_STREAM` is set
/// anew for the worker's own stderr when takeoverd's is the journal.)
const PRIVATE_ENV: &[&str] =
    &["NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC", "JOURNAL_STREAM"];

/// How many of a worker's first stderr lines are kept for error messages,
/// and how many bytes of them at most.
const EARLY_LINES: usize = 20;
const EARLY_BYTES: usize = 4096;
/// A line longer than this (without a newline) is forwarded in pieces.
const MAX_LINE: usize = 64 * 1024;
/// How long to wait for a worker's stderr to end once the worker is gone
/// (a child it left behind may keep the pipe open).
const STDERR_END_WAIT: Duration = Duration::from_millis(200);

/// A running worker. Known by its pid rather than a `std::process::Child`,
/// so that a takeoverd that re-executed itself (`ctl upgrade`) can adopt the
/// workers its previous image started.
#[derive(Debug)]
pub struct WorkerProc {
    pid: nix::unistd::Pid,
    /// How it ended, once reaped.
    status: Option<ExitStatus>,
    chan: OwnedFd,
    stderr: Arc<StderrTap>,
    /// A copy of the read end of its stderr pipe (the forwarding thread
    /// reads the other): what an upgraded takeoverd forwards from.
    stderr_pipe: OwnedFd,
}

impl WorkerProc {
    /// Starts `path` with `args`, its control channel as fd 3 (named by
    /// `TAKEOVERD_FD`), its stderr a pipe whose lines a thread forwards to
    /// takeoverd's stderr (see the module's documentation).
    /// `successor`: another worker serves while this one is staged (it is
    /// told so in `TAKEOVERD_STAGING=background`, a hint to stage at a low
    /// CPU priority).
    pub fn spawn(
        path: &Path,
        args: &[String],
        user: Option<(u32, u32)>,
        successor: bool,
    ) -> anyhow::Result<WorkerProc> {
        Self::spawn_forwarding(path, args, user, true, successor)
    }

    /// [`spawn`](Self::spawn), forwarding the worker's stderr to ours only
    /// if `to_stderr` (unit tests keep theirs quiet).
    fn spawn_forwarding(
        path: &Path,
        args: &[String],
        user: Option<(u32, u32)>,
        to_stderr: bool,
        successor: bool,
    ) -> anyhow::Result<WorkerProc> {
        let (ours, theirs) = takeover::wire::seqpacket_pair()?;
        let mut cmd = Command::new(path);
        cmd.args(args).env(CONTROL_FD_ENV, "3").stdin(Stdio::null());
        if successor {
            cmd.env(takeover::channel::STAGING_ENV, "background");
        }
        for v in PRIVATE_ENV {
            cmd.env_remove(v);
        }
        // Close-on-exec, so that no other child inherits the write end and
        // keeps the forwarding thread waiting for an end of file.
        let (err_read, err_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe for the worker's stderr")?;
        if takeover::log::stderr_is_journal() {
            let st = nix::sys::stat::fstat(&err_write).context("fstat of the worker's stderr pipe")?;
            cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        }
        cmd.stderr(Stdio::from(err_write));
        // Started before the worker, so that it never writes into a pipe no
        // one reads; if the worker does not start, `cmd` drops the write end
        // and the thread ends.
        let (tap, stderr_pipe) = start_forwarding(err_read, to_stderr)?;
        if let Some((uid, gid)) = user {
            // std drops supplementary groups (setgroups(0)) when it changes uid.
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        takeover::pass_fd(&mut cmd, theirs, 3);
        let child = cmd.spawn().with_context(|| format!("starting worker {}", path.display()))?;
        // `cmd` (and with it our copies of the worker's ends of the channel
        // and of the stderr pipe) is dropped here; so is `child`, which
        // neither kills nor reaps: the worker is known by its pid from now on.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        Ok(WorkerProc { pid, status: None, chan: ours, stderr: tap, stderr_pipe })
    }

    /// A worker the previous image of this takeoverd started (it is our
    /// child): its pid, our end of its channel, and the read end of its
    /// stderr pipe, forwarded from now on.
    pub fn adopt(pid: u32, chan: OwnedFd, stderr_read: OwnedFd) -> anyhow::Result<WorkerProc> {
        let (stderr, stderr_pipe) = start_forwarding(stderr_read, true)?;
        Ok(WorkerProc { pid: nix::unistd::Pid::from_raw(pid as i32), status: None, chan, stderr, stderr_pipe })
    }

    /// The read end of its stderr pipe (a copy), to carry across an upgrade.
    pub fn stderr_pipe(&self) -> BorrowedFd<'_> {
        self.stderr_pipe.as_fd()
    }

    /// [`finish`](Self::finish), then the first lines the worker wrote to
    /// its stderr (at most 20, about 4 KiB, each without its sd-daemon `<N>`
    /// prefix, joined with `" | "` into one line fit for an error; empty if
    /// it wrote nothing): how a worker that failed before its hello ended,
    /// and what it said.
    pub fn finish_with_stderr(self, grace: Duration) -> (ExitStatus, String) {
        let tap = Arc::clone(&self.stderr);
        let status = self.finish(grace);
        (status, tap.early_text())
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Our end of the control channel.
    pub fn chan(&self) -> BorrowedFd<'_> {
        self.chan.as_fd()
    }

    /// `Some(status)` once it has exited (reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = reap(self.pid, false);
        }
        self.status
    }

    /// Waits up to `grace` for it to exit, then kills it. Returns how it
    /// ended, once its last stderr lines are forwarded (or 200 ms later, if
    /// a child it left behind holds its stderr).
    pub fn finish(mut self, grace: Duration) -> ExitStatus {
        let t0 = Instant::now();
        let status = loop {
            if let Some(status) = self.exited() {
                break status;
            }
            if t0.elapsed() >= grace {
                tracing::warn!(pid = self.pid(), "worker did not exit within {grace:?}; killing it");
                break self.kill_and_reap();
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        self.stderr.wait_end(STDERR_END_WAIT);
        status
    }

    /// SIGKILL and reap (and let its last stderr lines through, as
    /// [`finish`](Self::finish)).
    pub fn kill(&mut self) {
        self.kill_and_reap();
        self.stderr.wait_end(STDERR_END_WAIT);
    }

    fn kill_and_reap(&mut self) -> ExitStatus {
        if let Some(status) = self.exited() {
            return status;
        }
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let status =
            reap(self.pid, true).unwrap_or_else(|| ExitStatus::from_raw(nix::sys::signal::Signal::SIGKILL as i32));
        self.status = Some(status);
        status
    }
}

/// Waits up to `grace` for child `pid` (a worker told to exit, known only
/// by its pid) to exit, then kills it; how it ended.
pub fn finish_pid(pid: u32, grace: Duration) -> ExitStatus {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let t0 = Instant::now();
    loop {
        if let Some(status) = reap(pid, false) {
            return status;
        }
        if t0.elapsed() >= grace {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return reap(pid, true).unwrap_or_else(|| ExitStatus::from_raw(nix::sys::signal::Signal::SIGKILL as i32));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reaps child `pid` if it has exited (or, with `block`, once it has):
/// `None` while it runs. A pid that is not our child (reaped elsewhere)
/// counts as exited with an unknown status (0xff00: "exit 255").
fn reap(pid: nix::unistd::Pid, block: bool) -> Option<ExitStatus> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let flags = if block { None } else { Some(WaitPidFlag::WNOHANG) };
    loop {
        return match waitpid(pid, flags) {
            Ok(WaitStatus::Exited(_, code)) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
            Ok(WaitStatus::Signaled(_, sig, core)) => {
                Some(ExitStatus::from_raw(sig as i32 | if core { 0x80 } else { 0 }))
            }
            Ok(WaitStatus::StillAlive) => None,
            Ok(_) if block => continue,
            Ok(_) => None,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => Some(ExitStatus::from_raw(0xff00)),
        };
    }
}

/// Starts the thread that forwards a worker's stderr from `pipe` (see the
/// module's documentation); returns what it keeps and a copy of the pipe.
fn start_forwarding(pipe: OwnedFd, to_stderr: bool) -> anyhow::Result<(Arc<StderrTap>, OwnedFd)> {
    let copy = pipe.try_clone().context("duplicating the worker's stderr pipe")?;
    let tap = Arc::new(StderrTap::default());
    let thread_tap = Arc::clone(&tap);
    std::thread::Builder::new()
        .name("worker-stderr".into())
        .spawn(move || forward(pipe, &thread_tap, to_stderr))
        .context("starting a thread for the worker's stderr")?;
    Ok((tap, copy))
}

/// A worker's stderr as its forwarding thread saw it: the first lines, and
/// whether the pipe has ended.
#[derive(Debug, Default)]
struct StderrTap {
    early: Mutex<Early>,
    ended: Condvar,
}

#[derive(Debug, Default)]
struct Early {
    lines: Vec<String>,
    bytes: usize,
    ended: bool,
}

impl StderrTap {
    fn lock(&self) -> std::sync::MutexGuard<'_, Early> {
        self.early.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `line` if there is room, without its newline and its sd-daemon
    /// priority prefix.
    fn keep(&self, line: &[u8]) {
        let mut early = self.lock();
        if early.lines.len() >= EARLY_LINES || early.bytes >= EARLY_BYTES {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let mut text = strip_priority(text.trim_end_matches(['\n', '\r'])).to_owned();
        let room = EARLY_BYTES - early.bytes;
        if text.len() > room {
            let mut cut = room;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        early.bytes += text.len();
        early.lines.push(text);
    }

    fn end(&self) {
        self.lock().ended = true;
        self.ended.notify_all();
    }

    /// Waits up to `timeout` for the pipe to end; true if it has.
    fn wait_end(&self, timeout: Duration) -> bool {
        let early = self.lock();
        let (early, _) = self.ended.wait_timeout_while(early, timeout, |e| !e.ended).unwrap_or_else(|e| e.into_inner());
        early.ended
    }

    fn early_text(&self) -> String {
        self.lock().lines.join(" | ")
    }
}

/// `line` without a leading sd-daemon priority prefix (`<0>` to `<7>`).
fn strip_priority(line: &str) -> &str {
    match line.as_bytes() {
        [b'<', b'0'..=b'7', b'>', ..] => &line[3..],
        _ => line,
    }
}

/// The forwarding thread: copies `pipe` to takeoverd's stderr (if
/// `to_stderr`) line by line, verbatim, keeping the first lines in `tap`,
/// until the pipe ends.
fn forward(pipe: OwnedFd, tap: &StderrTap, to_stderr: bool) {
    let mut reader = std::io::BufReader::with_capacity(8192, std::fs::File::from(pipe));
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            break;
        }
        let (take, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if complete || line.len() >= MAX_LINE {
            emit(&line, tap, to_stderr);
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(&line, tap, to_stderr);
    }
    tap.end();
}

/// One line to takeoverd's stderr, in one write under std's stderr lock
/// (which takeoverd's own log lines take too, so lines never interleave).
/// A failing stderr is no reason to stop draining the worker's.
fn emit(line: &[u8], tap: &StderrTap, to_stderr: bool) {
    if to_stderr {
        let _ = std::io::stderr().lock().write_all(line);
    }
    tap.keep(line);
}

#[cfg(test)]
mod stderr_tests {
    use super::*;

    fn sh(script: &str) -> WorkerProc {
        WorkerProc::spawn_forwarding(Path::new("/bin/sh"), &["-c".into(), script.into()], None, false, false).unwrap()
    }

    #[test]
    fn the_first_lines_are_kept_without_priority_prefixes() {
        let w = sh("echo 'worker[1]: one' >&2; echo '<3>worker[1]: two' >&2; printf 'no newline' >&2; exit 3");
        let (status, early) = w.finish_with_stderr(Duration::from_secs(5));
        assert_eq!(status.code(), Some(3));
        assert_eq!(early, "worker[1]: one | worker[1]: two | no newline");
    }

    #[test]
    fn the_last_lines_of_a_dead_worker_are_in() {
        let mut w = sh("echo last words >&2; exit 1");
        while w.exited().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(w.finish_with_stderr(Duration::ZERO).1, "last words");
    }

    #[test]
    fn only_the_first_lines_are_kept_and_every_line_is_drained() {
        // 5000 lines: more than the pipe holds, so a thread that stopped
        // reading would leave the worker blocked and `finish` would kill it.
        let w = sh("i=0; while [ $i -lt 5000 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 0");
        let (status, early) = w.finish_with_stderr(Duration::from_secs(20));
        assert!(status.success(), "{status}");
        let lines: Vec<&str> = early.split(" | ").collect();
        assert_eq!(lines.len(), EARLY_LINES);
        assert_eq!(lines[0], "line 0");
        assert_eq!(lines[EARLY_LINES - 1], format!("line {}", EARLY_LINES - 1));
    }

    #[test]
    fn the_bytes_kept_are_bounded() {
        let long = "x".repeat(3000);
        let w = sh(&format!("echo {long} >&2; echo {long} >&2; echo third >&2"));
        let (_, early) = w.finish_with_stderr(Duration::from_secs(5));
        assert!(early.len() <= EARLY_BYTES + 10, "{} bytes", early.len());
        assert!(early.ends_with("..."), "the second line is cut");
        assert!(!early.contains("third"), "no room left for a third line");
    }

    #[test]
    fn strips_only_a_priority_prefix() {
        assert_eq!(strip_priority("<3>a"), "a");
        assert_eq!(strip_priority("<8>a"), "<8>a");
        assert_eq!(strip_priority("<3"), "<3");
        assert_eq!(strip_priority("a<3>"), "a<3>");
    }
}
