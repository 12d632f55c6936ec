//! Processes the benchmark starts (what it reads about them in /proc is
//! `testkit::procfs`).
//!
//! Every child is started in a process group of its own, and every group is
//! recorded here, so that the benchmark can kill all it started (with the
//! workers takeoverd started in turn) on any exit: normal, error, panic or
//! SIGINT/SIGTERM/SIGHUP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use testkit::procfs;

/// Process groups started here and not known to be gone.
static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// Single processes started on our behalf outside our groups (the services
/// of the private systemd manager), with the name they must still have.
static STRAYS: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());

/// Starts `cmd` in a process group of its own and records the group.
pub fn spawn(cmd: &mut Command) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))?;
    GROUPS.lock().unwrap_or_else(|e| e.into_inner()).push(child.id() as i32);
    Ok(child)
}

/// Kills the group of `child` (SIGKILL) and reaps it.
pub fn kill_group(child: &mut Child) {
    let pgid = child.id() as i32;
    let _ = signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
    GROUPS.lock().unwrap_or_else(|e| e.into_inner()).retain(|g| *g != pgid);
}

/// Records a process to kill at exit if it still runs under the name `comm`.
pub fn note_stray(pid: u32, comm: &str) {
    let mut s = STRAYS.lock().unwrap_or_else(|e| e.into_inner());
    if !s.iter().any(|(p, _)| *p == pid as i32) {
        s.push((pid as i32, comm.to_owned()));
    }
}

/// Kills every process group and stray this benchmark started.
pub fn kill_all() {
    let groups: Vec<i32> = std::mem::take(&mut *GROUPS.lock().unwrap_or_else(|e| e.into_inner()));
    for g in groups {
        let _ = signal::killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    let strays: Vec<(i32, String)> = std::mem::take(&mut *STRAYS.lock().unwrap_or_else(|e| e.into_inner()));
    for (pid, comm) in strays {
        if procfs::alive(pid as u32) && procfs::comm(pid as u32).as_deref() == Some(comm.as_str()) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Kills everything on drop: the last line of defence on error or panic.
#[derive(Debug)]
pub struct KillAllOnDrop;

impl Drop for KillAllOnDrop {
    fn drop(&mut self) {
        kill_all();
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this (still single) thread and
/// starts a thread that waits for them, kills everything and exits 130.
/// Children start with an empty signal mask (the standard library resets it).
pub fn handle_signals() -> anyhow::Result<()> {
    let mut set = signal::SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("\nseqnum-bench: {sig}: killing every process it started");
            kill_all();
            std::process::exit(130);
        }
    })?;
    Ok(())
}

/// The benchmark's clock: milliseconds since it started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// Starts the clock now.
    pub fn new() -> Clock {
        Clock { start: Instant::now() }
    }

    /// Milliseconds since the start.
    pub fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `takeoverd`.
    pub takeoverd: PathBuf,
    /// `seqnum-worker`.
    pub worker: PathBuf,
    /// `seqnum-client`.
    pub client: PathBuf,
    /// `floor-echo`, the floor (built with seqnum-bench itself).
    pub floor: PathBuf,
}

impl Bins {
    /// Finds the binaries in `dir` (`floor-echo`, part of the benchmark
    /// rather than of what it measures, also beside this executable); fails
    /// with advice when one is missing.
    pub fn in_dir(dir: &Path) -> anyhow::Result<Bins> {
        let own = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("floor-echo")));
        let floor = Some(dir.join("floor-echo")).into_iter().chain(own).find(|p| p.is_file());
        let b = Bins {
            takeoverd: dir.join("takeoverd"),
            worker: dir.join("seqnum-worker"),
            client: dir.join("seqnum-client"),
            floor: floor.unwrap_or_else(|| dir.join("floor-echo")),
        };
        let missing: Vec<String> = b.all().iter().filter(|p| !p.is_file()).map(|p| p.display().to_string()).collect();
        if !missing.is_empty() {
            bail!(
                "missing {}: seqnum-bench builds nothing itself. Build the release binaries first:\n    \
                 cargo build --release --workspace && cargo run --release -p seqnum-bench\n\
                 (or point --bin-dir at a directory holding takeoverd, seqnum-worker and seqnum-client; \
                 floor-echo is also looked for beside seqnum-bench)",
                missing.join(", ")
            );
        }
        Ok(b)
    }

    /// Every binary, in a fixed order.
    pub fn all(&self) -> [&PathBuf; 4] {
        [&self.takeoverd, &self.worker, &self.client, &self.floor]
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `taskset -c CPU PROGRAM` when `cpu` is given and taskset exists, else
/// `PROGRAM`. taskset execs the program: the pid is the program's.
pub fn command(program: &Path, cpu: Option<usize>) -> Command {
    match cpu {
        Some(c) if have_taskset() => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        _ => Command::new(program),
    }
}

/// Whether `taskset` can be run.
pub fn have_taskset() -> bool {
    Command::new("taskset").arg("-V").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Number of online CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Sleeps until `clock` reads `at_ms` (no-op if that is past).
pub fn sleep_until(clock: &Clock, at_ms: f64) {
    let left = at_ms - clock.now_ms();
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left / 1e3));
    }
}

/// Parses a log line's `2026-11-26T11:48:12.360511Z` timestamp into Unix
/// seconds.
pub fn parse_log_time(line: &str) -> Option<f64> {
    let ts =
        line.split_whitespace().find(|w| w.len() >= 20 && w.as_bytes().get(10) == Some(&b'T') && w.ends_with('Z'))?;
    let t = humantime::parse_rfc3339(ts).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_time() {
        let t = super::parse_log_time("takeoverd[1]: 1970-01-02T00:00:01.500000Z  INFO x").unwrap();
        assert!((t - 86_401.5).abs() < 1e-6, "{t}");
        let t = super::parse_log_time("w[2]: 2026-11-18T11:06:40.000000Z  INFO y").unwrap();
        assert!((t - 1_795_000_000.0).abs() < 1e-6, "{t}");
        assert!(super::parse_log_time("no time here").is_none());
    }
}
