//! `--processes`: the coordinator that runs the connections in several
//! client processes and merges their summaries.
//!
//! The coordinator holds no connection. It runs its own executable once per
//! share of the connections (`--processes 1 --json` and the other options
//! as given), passes their stderr on line by line, prefixed, waits for them
//! (polling every 100 ms, and a signalfd for SIGINT, SIGTERM and SIGHUP,
//! which kill them all), then judges each one's output and merges the
//! summaries. A client process also gets `PR_SET_PDEATHSIG`: if the
//! coordinator dies without killing it (SIGKILL), it is sent SIGTERM.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tracing::{debug, error};

use super::plan::Plan;
use super::report::Summary;
use super::Error;

/// Set in a client process's environment to the coordinator's pid.
const PARENT_ENV: &str = "SEQNUM_CLIENT_COORDINATOR";

/// Lines of a failed process's stderr repeated in its failure report.
const TAIL_LINES: usize = 5;

/// The signals that end a run (and its client processes).
const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// In a client process started by a coordinator: unblocks the signals the
/// coordinator blocked (a process started by [`Command`] inherits the
/// mask), asks the kernel for a SIGTERM when the coordinator dies, and
/// exits at once if it already has. Returns whether this is such a process.
pub fn watch_coordinator() -> bool {
    let Some(pid) = std::env::var(PARENT_ENV).ok().and_then(|v| v.parse::<i32>().ok()) else {
        return false;
    };
    if let Err(e) = signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&signal_set()), None) {
        tracing::warn!("unblocking SIGINT, SIGTERM and SIGHUP: {e}; they will not end this process");
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        tracing::warn!("PR_SET_PDEATHSIG: {e}; this process outlives its coordinator if that is killed");
    }
    if nix::unistd::getppid().as_raw() != pid {
        error!("the coordinator (pid {pid}) that started this client process is gone: not starting");
        std::process::exit(1);
    }
    true
}

/// Runs `plan` in its client processes and returns their merged summary
/// (`Err` when the run could not be carried out: the processes could not
/// be started or waited for).
///
/// SIGINT, SIGTERM and SIGHUP are blocked while the processes run and read
/// from a signalfd; on one, every process is killed and reaped, and the
/// signal is raised again, so that the process dies of it (as a single
/// `seqnum-client` would).
pub fn run_processes(plan: &Plan) -> Result<Summary, Error> {
    let signals = Blocked::new().map_err(Error::Signals)?;
    let exe = std::env::current_exe().map_err(Error::Executable)?;
    let total = plan.processes();
    let mut procs: Vec<Proc> = Vec::with_capacity(plan.shares.len());
    for (i, &connections) in plan.shares.iter().enumerate() {
        let n = i as u32 + 1;
        match Proc::spawn(&exe, plan, n, connections) {
            Ok(p) => procs.push(p),
            Err(source) => {
                kill_all(&mut procs, "another client process could not be started");
                return Err(Error::Spawn { process: n, of: total, source });
            }
        }
    }
    debug!(pids = ?procs.iter().map(|p| p.child.id()).collect::<Vec<_>>(), "client processes started");
    let endless = plan.args.count.is_none() && plan.args.duration.is_none();
    loop {
        match signals.take() {
            Ok(Some(sig)) => {
                kill_all(&mut procs, &format!("the coordinator got {sig}"));
                return Err(signals.die_of(sig));
            }
            Ok(None) => {}
            Err(e) => {
                kill_all(&mut procs, "the coordinator could not read its signals");
                return Err(Error::Waiting(e));
            }
        }
        let mut ended = None;
        for p in procs.iter_mut().filter(|p| p.status.is_none()) {
            match p.child.try_wait() {
                Ok(Some(status)) => {
                    debug!(process = p.n, %status, "client process ended");
                    p.status = Some(status);
                    ended = Some(p.n);
                }
                Ok(None) => {}
                Err(e) => {
                    kill_all(&mut procs, "the coordinator could not wait for the client processes");
                    return Err(Error::Waiting(e));
                }
            }
        }
        if let (true, Some(n)) = (endless, ended) {
            // Without --count or --duration the others would run until
            // killed, and this one's connections are gone.
            kill_all(
                &mut procs,
                &format!("client process {n} ended, and without --count or --duration the others run until killed"),
            );
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break;
        }
        if let Err(e) = signals.wait(100) {
            kill_all(&mut procs, "the coordinator could not poll");
            return Err(Error::Waiting(e));
        }
    }
    drop(signals);

    let mut parts = Vec::with_capacity(procs.len());
    for p in procs {
        let (n, connections) = (p.n, p.connections);
        match p.finish() {
            Ok(s) => parts.push(s),
            Err((why, tail)) => {
                let said = if tail.is_empty() {
                    "it printed nothing on stderr".to_string()
                } else {
                    format!("the last lines it printed on stderr:\n    {}", tail.join("\n    "))
                };
                error!("client process {n} of {total} ({connections} connections) failed: {why}; {said}");
            }
        }
    }
    let mut summary = Summary::merge(u64::from(plan.args.connections), total, &parts);
    summary.churn_messages = plan.args.churn_messages;
    Ok(summary)
}

/// The arguments of client process `n` (from 1), which runs `connections`.
fn child_command_line(plan: &Plan, n: u32, connections: u32) -> Vec<OsString> {
    let mut args = plan.args.clone();
    args.connections = connections;
    args.processes = Some(1);
    args.json = true;
    args.timeline = args.timeline.as_deref().map(|p| numbered(p, n).into());
    args.to_command_line()
}

/// `path` with `.n` appended.
pub(crate) fn numbered(path: &Path, n: u32) -> OsString {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    s
}

/// One client process.
struct Proc {
    /// From 1.
    n: u32,
    connections: u32,
    child: Child,
    stdout: JoinHandle<io::Result<Vec<u8>>>,
    /// The last [`TAIL_LINES`] lines of its stderr.
    stderr: JoinHandle<Vec<String>>,
    status: Option<ExitStatus>,
    /// Why the coordinator killed it.
    killed: Option<String>,
}

impl Proc {
    fn spawn(exe: &Path, plan: &Plan, n: u32, connections: u32) -> io::Result<Proc> {
        let mut child = Command::new(exe)
            .args(child_command_line(plan, n, connections))
            .env(PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (Some(mut out), Some(err)) = (child.stdout.take(), child.stderr.take()) else { unreachable!("both piped") };
        let prefix = format!("[client {n}/{}] ", plan.processes());
        let threads = std::thread::Builder::new().name(format!("client {n} stdout")).spawn(move || {
            let mut v = Vec::new();
            out.read_to_end(&mut v).map(|_| v)
        });
        let stdout = match threads {
            Ok(t) => t,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let stderr =
            match std::thread::Builder::new().name(format!("client {n} stderr")).spawn(move || pass_on(err, &prefix)) {
                Ok(t) => t,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            };
        Ok(Proc { n, connections, child, stdout, stderr, status: None, killed: None })
    }

    /// Kills it (SIGKILL) if it still runs, and reaps it.
    fn kill(&mut self, why: &str) {
        if self.status.is_some() {
            return;
        }
        self.killed = Some(why.to_string());
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => self.status = Some(status),
            Err(e) => error!("reaping client process {} (pid {}): {e}", self.n, self.child.id()),
        }
    }

    /// Its summary, or why it failed and the end of its stderr.
    fn finish(self) -> Result<Summary, (String, Vec<String>)> {
        let stdout = self.stdout.join().unwrap_or_else(|_| Err(io::Error::other("the reading thread panicked")));
        let tail = self.stderr.join().unwrap_or_default();
        let status = self.status.expect("reaped");
        let judged = match stdout {
            Ok(out) => judge(status, &out, self.connections),
            Err(e) => Err(format!("{}; reading its output failed: {e}", describe(status))),
        };
        judged.map_err(|why| match self.killed {
            Some(k) => (format!("killed by the coordinator ({k}); {why}"), tail),
            None => (why, tail),
        })
    }
}

fn kill_all(procs: &mut [Proc], why: &str) {
    for p in procs {
        p.kill(why);
    }
}

/// Passes each line of a client process's stderr on to ours with
/// `prefix`, and returns the last [`TAIL_LINES`] lines.
fn pass_on(err: ChildStderr, prefix: &str) -> Vec<String> {
    let mut tail = VecDeque::with_capacity(TAIL_LINES + 1);
    let mut reader = BufReader::new(err);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let _ = writeln!(io::stderr().lock(), "{prefix}{text}");
        tail.push_back(text);
        if tail.len() > TAIL_LINES {
            tail.pop_front();
        }
    }
    tail.into()
}

/// A client process's summary, if it printed one that its exit status
/// agrees with (0 for a clean run, 1 for one with errors), for its share of
/// the connections.
pub(crate) fn judge(status: ExitStatus, stdout: &[u8], connections: u32) -> Result<Summary, String> {
    let text = String::from_utf8_lossy(stdout);
    let Some(line) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
        return Err(format!("{} without printing a summary", describe(status)));
    };
    let summary: Summary = serde_json::from_str(line)
        .map_err(|e| format!("{}; its output is not a summary ({e}): {line:.200}", describe(status)))?;
    let expected = if summary.is_success() { 0 } else { 1 };
    if status.code() != Some(expected) {
        return Err(format!("{} though its summary counts {} errors", describe(status), summary.errors));
    }
    if summary.connections != u64::from(connections) {
        return Err(format!("its summary is of {} connections, not of its {connections}", summary.connections));
    }
    Ok(summary)
}

/// "exited with status 3", "was killed by SIGKILL".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("it exited with status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("it was killed by {s}"),
            Err(_) => format!("it was killed by signal {sig}"),
        },
        (None, None) => format!("it ended ({status})"),
    }
}

fn signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in SIGNALS {
        set.add(s);
    }
    set
}

/// [`SIGNALS`] blocked in this thread (and in the threads and processes it
/// starts: a client process unblocks them, see [`watch_coordinator`]) and
/// read from a signalfd; the previous mask comes back on drop.
struct Blocked {
    fd: SignalFd,
    old: SigSet,
}

impl Blocked {
    fn new() -> io::Result<Blocked> {
        let set = signal_set();
        let mut old = SigSet::empty();
        signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))?;
        match SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => Ok(Blocked { fd, old }),
            Err(e) => {
                let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
                Err(e.into())
            }
        }
    }

    /// A signal that came, if any.
    fn take(&self) -> io::Result<Option<Signal>> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Ok(Signal::try_from(info.ssi_signo as i32).ok()),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `ms` for a signal.
    fn wait(&self, ms: u16) -> io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Raises `sig` again and unblocks it: the process dies of it, unless
    /// it was blocked before or has a handler (then this returns).
    fn die_of(self, sig: Signal) -> Error {
        let _ = signal::raise(sig);
        drop(self);
        Error::Interrupted(sig)
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::histogram::Histogram;
    use crate::client::report::Counters;
    use std::time::Duration;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn summary(connections: u64, errors: u64) -> Vec<u8> {
        let c = Counters { sent: 5, echoed: 5, resets: errors, ..Counters::default() };
        let s = Summary::new(connections, &c, &Histogram::new(), Duration::from_secs(1));
        format!("{}\n", s.to_json()).into_bytes()
    }

    #[test]
    fn judging_a_client_process() {
        assert_eq!(judge(exited(0), &summary(10, 0), 10).unwrap().echoed, 5);
        assert_eq!(judge(exited(1), &summary(10, 2), 10).unwrap().resets, 2);
        let e = judge(exited(1), b"", 10).unwrap_err();
        assert_eq!(e, "it exited with status 1 without printing a summary");
        let e = judge(ExitStatus::from_raw(9), b"", 10).unwrap_err();
        assert_eq!(e, "it was killed by SIGKILL without printing a summary");
        let e = judge(exited(1), b"{\"connections\":", 10).unwrap_err();
        assert!(e.contains("not a summary"), "{e}");
        let e = judge(exited(0), &summary(10, 2), 10).unwrap_err();
        assert!(e.contains("status 0 though its summary counts 2 errors"), "{e}");
        let e = judge(exited(1), &summary(10, 0), 10).unwrap_err();
        assert!(e.contains("status 1 though"), "{e}");
        let e = judge(exited(0), &summary(9, 0), 10).unwrap_err();
        assert!(e.contains("9 connections, not of its 10"), "{e}");
    }

    #[test]
    fn timeline_of_each_process() {
        assert_eq!(numbered(Path::new("/tmp/t.csv"), 3), "/tmp/t.csv.3");
    }

    #[test]
    fn child_command_line_takes_its_share() {
        use crate::client::plan::{Limits, Plan};
        use clap::Parser;
        let args = crate::client::Args::try_parse_from([
            "seqnum-client",
            "--connections",
            "100000",
            "--timeline",
            "t.csv",
            "--interval-ms",
            "7",
            "--duration",
            "2.5",
        ])
        .unwrap();
        let limits = Limits { files_per_process: 20_000, ephemeral_ports: 28_232 };
        let plan = Plan::new(&args, &limits).unwrap();
        let line = child_command_line(&plan, 6, plan.shares[5]);
        let child = crate::client::Args::try_parse_from(std::iter::once(OsString::from("x")).chain(line)).unwrap();
        let want = crate::client::Args {
            connections: 16_666,
            processes: Some(1),
            json: true,
            timeline: Some("t.csv.6".into()),
            source_addresses: 8,
            ..args
        };
        assert_eq!(child, want);
    }
}
