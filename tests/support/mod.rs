//! Shared helpers of the end-to-end tests: where the binaries are, a temp
//! dir per test, free ports, running the client, counting fds.
#![allow(missing_docs)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries (`target/debug`), found
/// from this test executable (`target/debug/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// The path of one of the workspace's binaries; panics with advice when it
/// was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds every binary",
        p.display()
    );
    p
}

/// A fresh temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("takeover-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something accepts on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < timeout, "nothing listens on port {port} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < timeout, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `seqnum-client --json` against `port` with extra `args`.
pub fn client(port: u16, args: &[&str]) -> Child {
    Command::new(bin("seqnum-client"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting seqnum-client")
}

/// Waits for a client and parses its JSON summary.
pub fn client_summary(c: Child) -> (Output, serde_json::Value) {
    let out = c.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default().to_owned();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON summary ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

/// Asserts a client summary shows no error of any kind.
pub fn assert_clean(out: &Output, v: &serde_json::Value) {
    assert_eq!(v["errors"], 0, "client saw errors: {v}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "client exited {:?}: {v}", out.status);
    assert!(v["echoed"].as_u64().unwrap_or(0) > 0, "client got no echo at all: {v}");
}

/// Open fds of `pid`, with what they point at.
pub fn fds_of(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

/// Number of TCP sockets among the fds of `pid` (sockets of any kind, in fact:
/// the caller subtracts the known non-TCP ones).
pub fn socket_count(pid: u32) -> usize {
    fds_of(pid).iter().filter(|l| l.starts_with("socket:")).count()
}

/// Whether `pid` still runs (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => !matches!(s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()), Some("Z" | "X")),
    }
}

/// Waits for a child with a deadline; kills it when the deadline passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills a child on drop, so a failing test leaves no process behind.
pub struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
pub mod systemd;

/// The fd count of `pid` once it has stopped changing (two reads 50 ms
/// apart agree), so a connection being closed as we look is not counted.
pub fn settled_fd_count(pid: u32) -> usize {
    let mut last = fds_of(pid).len();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(50));
        let now = fds_of(pid).len();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// `takeoverd ctl --control-socket SOCK ARGS`.
pub fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(bin("takeoverd"))
        .arg("ctl")
        .arg("--control-socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("running takeoverd ctl")
}

/// `takeoverd ctl status --json`, which must succeed.
pub fn ctl_status(sock: &Path) -> serde_json::Value {
    try_ctl_status(sock).unwrap_or_else(|| panic!("takeoverd ctl status failed on {}", sock.display()))
}

/// `takeoverd ctl status --json`, or `None` when takeoverd does not answer.
pub fn try_ctl_status(sock: &Path) -> Option<serde_json::Value> {
    let out = ctl(sock, &["status", "--json"]);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

/// Polls `ok` every 20 ms; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Children of `ppid`: (pid, is a zombie).
pub fn children_of(ppid: u32) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push((pid, f.first() == Some(&"Z")));
        }
    }
    out
}

/// Live (not zombie) children of `ppid`.
pub fn live_children(ppid: u32) -> Vec<u32> {
    children_of(ppid).into_iter().filter(|(_, zombie)| !zombie).map(|(pid, _)| pid).collect()
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// utime + stime of `pid`, in clock ticks; `None` once it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Raises this process's soft RLIMIT_NOFILE to the hard limit; returns it.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    hard
}

/// takeoverd run directly (no systemd) on a free port of 127.0.0.1, its
/// control socket and log in a test's directory.
pub struct Takeoverd {
    /// The process (killed on drop).
    pub proc: Reaper,
    /// Its pid.
    pub pid: u32,
    /// The port it listens on.
    pub port: u16,
    /// Its control socket.
    pub sock: PathBuf,
    /// Its stderr.
    pub log: PathBuf,
}

impl Takeoverd {
    /// Starts takeoverd with `args` and `env`, and waits until its first
    /// worker serves.
    pub fn start(dir: &TempDir, args: &[&str], env: &[(&str, String)]) -> Takeoverd {
        let port = free_port();
        let sock = dir.path("ctl.sock");
        let log = dir.path("takeoverd.log");
        let mut cmd = Command::new(bin("takeoverd"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--control-socket"])
            .arg(&sock)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Reaper(cmd.spawn().expect("starting takeoverd"));
        let pid = proc.0.id();
        wait_for_port(port, Duration::from_secs(10));
        wait_for_path(&sock, Duration::from_secs(10));
        wait_until("the first worker serves", Duration::from_secs(5), || ctl_status(&sock)["worker_pid"].is_u64());
        Takeoverd { proc, pid, port, sock, log }
    }
}
