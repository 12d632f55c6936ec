//! What `/proc` says about a process: its fds, memory, CPU time, state,
//! name and children. Every reading returns `None` (or an empty list) once
//! the process is gone, rather than failing.

use std::time::Duration;

/// Fields of `/proc/PID/stat` after the command name: `[0]` is the state,
/// `[1]` the parent pid, `[11]`/`[12]` utime/stime, `[13]`/`[14]`
/// cutime/cstime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Open fds of `pid`, with what they point at (`socket:[123]`, a path...).
pub fn fds_of(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

/// The numbers of the open fds of `pid`.
pub fn fd_numbers(pid: u32) -> Vec<usize> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// The number of open fds of `pid`.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Number of sockets of any kind among the fds of `pid` (the caller
/// subtracts the known non-TCP ones).
pub fn socket_count(pid: u32) -> usize {
    fds_of(pid).iter().filter(|l| l.starts_with("socket:")).count()
}

/// The fd count of `pid` once it has stopped changing (two reads 50 ms
/// apart agree, for at most 2 s), so a connection being closed as we look is
/// not counted.
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

/// Whether `pid` still runs (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| !matches!(f.first().map(String::as_str), Some("Z" | "X")))
}

/// The command name of `pid` (`/proc/PID/comm`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_owned())
}

/// Children of `ppid`: (pid, is a zombie).
pub fn children_of(ppid: u32) -> Vec<(u32, bool)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter_map(|pid| {
            let f = stat_fields(pid)?;
            (f.get(1)?.parse::<u32>().ok()? == ppid).then(|| (pid, f.first().is_some_and(|s| s == "Z")))
        })
        .collect()
}

/// Live (not zombie) children of `ppid`.
pub fn live_children(ppid: u32) -> Vec<u32> {
    children_of(ppid).into_iter().filter(|(_, zombie)| !zombie).map(|(pid, _)| pid).collect()
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime of `pid` and of the children it has waited for (cutime +
/// cstime), in clock ticks: takeoverd's figure covers the workers it reaped.
pub fn cpu_ticks_with_reaped(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    (11..=14).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

/// Clock ticks per second (`CLK_TCK`).
pub fn clk_tck() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map(|v| v as u64).unwrap_or(100)
}

/// Pids of the processes that carry `var` (`NAME=value`) in their
/// environment and still run.
pub fn with_env(var: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|v| v == var.as_bytes()))
                .unwrap_or(false)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(fd_count(me).unwrap() >= 3);
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_ticks(me).is_some());
        assert!(cpu_ticks_with_reaped(me).unwrap() >= cpu_ticks(me).unwrap());
        assert!(comm(me).is_some());
        let parent = nix::unistd::getppid().as_raw() as u32;
        assert!(children_of(parent).iter().any(|(p, z)| *p == me && !z));
        assert!(!alive(u32::MAX / 2));
        assert_eq!(rss_kib(u32::MAX / 2), None);
    }
}
