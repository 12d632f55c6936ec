//! takeoverd run directly (no systemd) by a test, and `takeoverd ctl`
//! against any control socket, its status read into takeoverd's own
//! [`Status`] type.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub use takeoverd::status::{ReloadRecord, Status};

use crate::bins::{bin, free_port, Reaper, TempDir};
use crate::wait::{wait_for_path, wait_for_port, wait_until};

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
pub fn ctl_status(sock: &Path) -> Status {
    let out = ctl(sock, &["status", "--json"]);
    assert!(
        out.status.success(),
        "takeoverd ctl status failed on {} ({}): {}",
        sock.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ctl status printed no status ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `takeoverd ctl status --json`, or `None` when takeoverd does not answer.
pub fn try_ctl_status(sock: &Path) -> Option<Status> {
    let out = ctl(sock, &["status", "--json"]);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

/// takeoverd run directly (no systemd) on a free port of 127.0.0.1, its
/// control socket and log in a test's directory.
#[derive(Debug)]
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
        Takeoverd::start_binary(&bin("takeoverd"), dir, args, env)
    }

    /// [`start`](Self::start) with another takeoverd binary than the
    /// workspace's (a copy the test may break).
    pub fn start_binary(exe: &Path, dir: &TempDir, args: &[&str], env: &[(&str, String)]) -> Takeoverd {
        let port = free_port();
        let sock = dir.path("ctl.sock");
        let log = dir.path("takeoverd.log");
        let mut cmd = Command::new(exe);
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
        wait_until("the first worker serves", Duration::from_secs(5), || ctl_status(&sock).worker_pid.is_some());
        Takeoverd { proc, pid, port, sock, log }
    }

    /// `ctl status --json` of this takeoverd.
    pub fn status(&self) -> Status {
        ctl_status(&self.sock)
    }

    /// What takeoverd and its workers wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
