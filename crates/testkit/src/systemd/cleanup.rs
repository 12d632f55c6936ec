//! Taking a test manager down: its units stopped, the manager stopped, and
//! anything it left (found by its environment and by its cgroup) killed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{UserManager, BOOT_TARGET};
use crate::procfs::{alive, with_env};
use crate::wait::wait_timeout;

impl UserManager {
    /// Pids of processes that carry this manager's runtime directory in
    /// their environment: the manager and everything it started.
    pub fn processes(&self) -> Vec<u32> {
        with_env(&format!("XDG_RUNTIME_DIR={}", self.runtime_dir.display()))
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if !self.units.is_empty() {
            let mut args = vec!["stop"];
            args.extend(self.units.iter().filter(|u| u.as_str() != BOOT_TARGET).map(String::as_str));
            let out = self.systemctl(&args);
            if !out.status.success() {
                eprintln!("cleanup: systemctl --user {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        if let Some(mut child) = self.manager.take() {
            // SIGTERM makes a user manager stop every unit and exit.
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(15)).is_none() {
                eprintln!("cleanup: the user manager {} ignored SIGTERM for 15 s; killed", self.pid);
            }
        }
        // Anything left (the manager was killed, or a unit escaped): kill it.
        for _ in 0..50 {
            let mut left = self.processes();
            for pid in self.cgroup_procs() {
                if !left.contains(&pid) {
                    left.push(pid);
                }
            }
            if left.is_empty() {
                break;
            }
            for pid in &left {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
            eprintln!("cleanup: killed stray processes of the test manager: {left:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        for root in self.cgroup_roots() {
            remove_cgroup_tree(&root);
        }
    }
}

impl UserManager {
    /// This manager's cgroup in every hierarchy it was put in.
    fn cgroup_roots(&self) -> Vec<PathBuf> {
        ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"]
            .iter()
            .map(|h| Path::new(h).join(&self.cgroup))
            .filter(|p| p.join("cgroup.procs").is_file())
            .collect()
    }

    /// Every process in this manager's cgroup tree.
    pub fn cgroup_procs(&self) -> Vec<u32> {
        fn walk(dir: &Path, out: &mut Vec<u32>) {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path(), out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for root in self.cgroup_roots() {
            walk(&root, &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out.retain(|p| alive(*p));
        out
    }
}

/// Removes an (empty) cgroup and its children, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
