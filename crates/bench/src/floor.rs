//! floor-echo under test: the minimal epoll echo server (src/bin/floor-echo.rs)
//! that the echo and churn measurements run beside takeoverd, as the floor.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

use testkit::procfs;

use crate::procs::{self, Bins};
use crate::server::last_lines;

/// A floor-echo started by the benchmark.
#[derive(Debug)]
pub struct FloorServer {
    child: Option<Child>,
    /// Its pid.
    pub pid: u32,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Its open fds with no connection (stdio, epoll, listener).
    base_fds: usize,
}

impl FloorServer {
    /// Starts floor-echo on a free port (retrying on a port race), pinned to
    /// `cpu` if given, and waits until it accepts connections.
    pub fn start(bins: &Bins, dir: &Path, tag: &str, cpu: Option<usize>) -> anyhow::Result<FloorServer> {
        let mut last_err = String::new();
        for attempt in 0..3 {
            let port = procs::free_port()?;
            let log = dir.join(format!("{tag}-{attempt}.log"));
            let mut cmd = procs::command(&bins.floor, cpu);
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?);
            let mut child = procs::spawn(&mut cmd)?;
            let pid = child.id();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                // A probe connection, closed at once: floor-echo reads its
                // EOF and closes its side.
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    std::thread::sleep(Duration::from_millis(20));
                    let base_fds = procfs::fd_count(pid).unwrap_or(0);
                    return Ok(FloorServer { child: Some(child), pid, port, base_fds });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            procs::kill_group(&mut child);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            last_err = format!("floor-echo did not come up on port {port}: {}", last_lines(&text, 5));
        }
        bail!("{last_err}")
    }

    /// Open connections, from its fd count.
    pub fn connections(&self) -> usize {
        procfs::fd_count(self.pid).unwrap_or(0).saturating_sub(self.base_fds)
    }

    /// Waits until it holds at least `n` connections.
    pub fn wait_connections(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            let held = self.connections();
            if held as u64 >= n {
                return Ok(());
            }
            if t0.elapsed() > timeout || !procfs::alive(self.pid) {
                bail!("floor-echo holds {held} connections after {timeout:?}, expected {n}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut child) = self.child.take() {
            procs::kill_group(&mut child);
        }
    }
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
