//! What a run was measured on: the machine (CPUs, kernel, limits, load),
//! the commit and binaries, and the run's date.

use crate::procs::{self, Bins};
use crate::report::{self, Machine};

/// The workspace's commit and the binaries' sizes and modification times.
pub fn fingerprint(bins: &Bins) -> report::Build {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let binaries = bins
        .all()
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok()).map_or("?".into(), format_time);
            format!(
                "{} {} bytes, modified {mtime}",
                p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                meta.map_or(0, |m| m.len())
            )
        })
        .collect();
    report::Build { commit, dirty, binaries }
}

/// The open-file limits, and whether the hard one can be raised.
pub fn fd_limit() -> String {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return "unknown".into() };
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap_or_default().trim().to_owned();
    let raise = match setrlimit(Resource::RLIMIT_NOFILE, hard.max(1 << 20), hard.max(1 << 20)) {
        // Kept: the servers and clients started from here inherit it.
        Ok(()) => "raised to 1048576 for this run (CAP_SYS_RESOURCE)".to_owned(),
        Err(e) => format!(
            "raising it fails with {e} even as root: CAP_SYS_RESOURCE is not in this machine's capability bounding set"
        ),
    };
    format!("RLIMIT_NOFILE soft {soft}, hard {hard} per process (fs.nr_open {nr_open}); {raise}")
}

pub fn machine(fd_limit: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or("?".into(), |k| format!("{:.1} GiB", k / 1024.0 / 1024.0));
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_owned();
    let systemd = std::process::Command::new("systemctl")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
        .unwrap_or_else(|| "not found".into());
    Machine {
        cpu_model: field("model name"),
        cpus: procs::cpus(),
        virtualised: field("flags").split_whitespace().any(|f| f == "hypervisor"),
        memory: mem,
        kernel: read("/proc/sys/kernel/osrelease"),
        loadavg_at_start: read("/proc/loadavg"),
        loadavg_at_end: String::new(),
        systemd,
        tcp_congestion_control: read("/proc/sys/net/ipv4/tcp_congestion_control"),
        fd_limit: fd_limit.to_owned(),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_time(t: std::time::SystemTime) -> String {
    takeover::log::utc(t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn time() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(super::format_time(t), "2026-11-18 11:06:40 UTC");
    }
}
