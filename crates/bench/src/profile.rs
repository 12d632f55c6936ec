//! CPU profiles with `perf` (software `cpu-clock` event, DWARF call
//! graphs, whole system), summarised per process: how much CPU went to
//! each function of interest (inclusive), and the hottest leaf symbols.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::procs;

/// Sampling frequency, Hz.
pub const FREQ: u64 = 999;

/// A function (or group of functions) to account for.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The process name (`comm`) it runs in.
    pub comm: &'static str,
    /// What to call it in the report.
    pub label: &'static str,
    /// A sample counts if any of its frames contains one of these.
    pub frames: &'static [&'static str],
}

/// One line of the profile table.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeRow {
    /// Process.
    pub comm: String,
    /// Label.
    pub label: String,
    /// CPU ms per unit of work (per reload, per second…).
    pub ms_per_unit: f64,
    /// Share of that process's samples, %.
    pub share_pct: f64,
}

/// A hot leaf symbol.
#[derive(Debug, Clone, Serialize)]
pub struct HotSymbol {
    /// Process.
    pub comm: String,
    /// Share of that process's samples, %.
    pub share_pct: f64,
    /// Symbol (kernel symbols are marked `[k]`).
    pub symbol: String,
}

/// A summarised profile.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// What was profiled.
    pub title: String,
    /// The unit `ms_per_unit` is per.
    pub unit: String,
    /// How perf was run.
    pub command: String,
    /// Samples per process.
    pub samples: HashMap<String, u64>,
    /// CPU ms per unit for each whole process.
    pub process_ms_per_unit: HashMap<String, f64>,
    /// The probes.
    pub rows: Vec<ProbeRow>,
    /// The hottest leaves per process.
    pub hot: Vec<HotSymbol>,
    /// Share of each process's samples in the kernel, %.
    pub kernel_pct: HashMap<String, f64>,
    /// The functions of the process's own binary with the most samples
    /// anywhere on the stack (inclusive), per process.
    pub top_inclusive: Vec<ProbeRow>,
    /// The worker's syscalls (echo profile only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscalls: Option<SyscallMix>,
}

/// Whether `perf record -e cpu-clock` works here.
pub fn available(dir: &Path) -> bool {
    let out = dir.join("perf-check.data");
    let ok = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-o"])
        .arg(&out)
        .args(["--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let _ = std::fs::remove_file(out);
    ok
}

/// A `perf record` of the whole system running in the background.
#[derive(Debug)]
pub struct Recording {
    child: std::process::Child,
    data: std::path::PathBuf,
    command: String,
}

/// Starts recording the whole system for `secs` seconds.
pub fn record(dir: &Path, tag: &str, secs: f64) -> anyhow::Result<Recording> {
    let data = dir.join(format!("{tag}.perf.data"));
    let mut cmd = Command::new("perf");
    let freq = FREQ.to_string();
    let args = ["record", "-q", "-a", "-e", "cpu-clock", "-F", &freq, "--call-graph", "dwarf,16384", "-o"];
    cmd.args(args).arg(&data).arg("--").arg("sleep").arg(format!("{secs:.1}"));
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).stdin(Stdio::null());
    let command = format!("perf {} <file> -- sleep {secs:.1}", args.join(" "));
    let child = procs::spawn(&mut cmd)?;
    // Let perf set up before the work starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok(Recording { child, data, command })
}

impl Recording {
    /// Waits for the recording to end and summarises it; `units` is how
    /// many units of work it covered (reloads, seconds…).
    pub fn finish(
        mut self,
        title: &str,
        unit: &str,
        units: f64,
        probes: &[Probe],
        comms: &[&str],
    ) -> anyhow::Result<Profile> {
        let _ = testkit::wait_timeout(&mut self.child, Duration::from_secs(120));
        procs::kill_group(&mut self.child);
        // Only the processes of interest: resolving the inlined frames of
        // everything else on the machine (compilers…) takes minutes.
        let out = Command::new("perf")
            .args(["script", "--comms", &comms.join(","), "-F", "comm,tid,ip,sym,dso", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()?;
        let _ = std::fs::remove_file(&self.data);
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(summarise(&text, title, unit, units, probes, comms, &self.command))
    }
}

/// Summarises `perf script -F comm,tid,ip,sym,dso` output.
fn summarise(
    text: &str,
    title: &str,
    unit: &str,
    units: f64,
    probes: &[Probe],
    comms: &[&str],
    command: &str,
) -> Profile {
    let mut samples: HashMap<String, u64> = HashMap::new();
    let mut hits: HashMap<(String, String), u64> = HashMap::new();
    let mut leaves: HashMap<(String, String), u64> = HashMap::new();
    let mut kernel: HashMap<String, u64> = HashMap::new();
    let mut own: HashMap<(String, String), u64> = HashMap::new();
    let mut comm: Option<String> = None;
    let mut stack: Vec<String> = Vec::new();
    let mut own_frames: Vec<String> = Vec::new();
    let mut flush = |comm: &Option<String>, stack: &Vec<String>, own_frames: &Vec<String>| {
        let Some(c) = comm else { return };
        if !comms.contains(&c.as_str()) {
            return;
        }
        *samples.entry(c.clone()).or_default() += 1;
        let mut seen = std::collections::HashSet::new();
        for f in own_frames {
            if seen.insert(f.as_str()) {
                *own.entry((c.clone(), f.clone())).or_default() += 1;
            }
        }
        for p in probes.iter().filter(|p| p.comm == c) {
            if stack.iter().any(|f| p.frames.iter().any(|x| f.contains(x))) {
                *hits.entry((c.clone(), p.label.to_owned())).or_default() += 1;
            }
        }
        if let Some(leaf) = stack.first() {
            if leaf.contains("[k]") {
                *kernel.entry(c.clone()).or_default() += 1;
            }
            *leaves.entry((c.clone(), leaf.clone())).or_default() += 1;
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with([' ', '\t']) {
            flush(&comm, &stack, &own_frames);
            comm = line.split_whitespace().next().map(str::to_owned);
            stack.clear();
            own_frames.clear();
        } else {
            // "addr symbol+off (dso)"
            let rest = line.trim().split_once(char::is_whitespace).map_or("", |(_, r)| r).trim();
            let (sym, dso) = match rest.rfind(" (") {
                Some(i) => (&rest[..i], &rest[i + 2..rest.len().saturating_sub(1)]),
                None => (rest, ""),
            };
            let sym = sym.split("+0x").next().unwrap_or(sym).trim();
            let k = if dso.contains("kernel") { " [k]" } else { "" };
            stack.push(format!("{sym}{k}"));
            if let Some(c) = &comm {
                if dso.ends_with(&format!("/{c}")) && !is_runtime_frame(sym) {
                    own_frames.push(sym.trim_end_matches(" (inlined)").to_owned());
                }
            }
        }
    }
    flush(&comm, &stack, &own_frames);
    let ms = |n: u64| n as f64 * 1e3 / FREQ as f64 / units.max(1e-9);
    let mut rows = Vec::new();
    for p in probes {
        let total = samples.get(p.comm).copied().unwrap_or(0);
        let n = hits.get(&(p.comm.to_owned(), p.label.to_owned())).copied().unwrap_or(0);
        rows.push(ProbeRow {
            comm: p.comm.to_owned(),
            label: p.label.to_owned(),
            ms_per_unit: ms(n),
            share_pct: if total > 0 { 100.0 * n as f64 / total as f64 } else { 0.0 },
        });
    }
    let mut hot = Vec::new();
    for c in comms {
        let total = samples.get(*c).copied().unwrap_or(0).max(1);
        let mut l: Vec<(&(String, String), &u64)> = leaves.iter().filter(|((cc, _), _)| cc == c).collect();
        l.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0 .1.cmp(&b.0 .1)));
        for ((cc, sym), n) in l.into_iter().take(8) {
            let mut symbol = sym.clone();
            if symbol.len() > 110 {
                symbol.truncate(110);
                symbol.push('…');
            }
            hot.push(HotSymbol { comm: cc.clone(), share_pct: 100.0 * *n as f64 / total as f64, symbol });
        }
    }
    let mut top_inclusive = Vec::new();
    for c in comms {
        let total = samples.get(*c).copied().unwrap_or(0).max(1);
        let mut l: Vec<(&(String, String), &u64)> = own.iter().filter(|((cc, _), _)| cc == c).collect();
        l.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0 .1.cmp(&b.0 .1)));
        // Frames on (nearly) every sample are the process's main loop.
        for ((cc, sym), n) in l.into_iter().filter(|(_, n)| (**n as f64) < 0.97 * total as f64).take(15) {
            let mut label = sym.clone();
            if label.len() > 120 {
                label.truncate(120);
                label.push('…');
            }
            top_inclusive.push(ProbeRow {
                comm: cc.clone(),
                label,
                ms_per_unit: ms(*n),
                share_pct: 100.0 * *n as f64 / total as f64,
            });
        }
    }
    let process_ms_per_unit = samples.iter().map(|(c, n)| (c.clone(), ms(*n))).collect();
    let kernel_pct = samples
        .iter()
        .map(|(c, n)| (c.clone(), 100.0 * kernel.get(c).copied().unwrap_or(0) as f64 / (*n).max(1) as f64))
        .collect();
    Profile {
        title: title.to_owned(),
        unit: unit.to_owned(),
        command: command.to_owned(),
        samples,
        process_ms_per_unit,
        rows,
        hot,
        kernel_pct,
        top_inclusive,
        syscalls: None,
    }
}

/// Frames every sample of a process has (runtime start-up, closures of
/// `main`): not worth ranking.
fn is_runtime_frame(sym: &str) -> bool {
    const SKIP: &[&str] = &[
        "main",
        "_start",
        "__libc_start",
        "lang_start",
        "__rust_begin_short_backtrace",
        "catch_unwind",
        "do_call",
        "call_once",
        "::main",
        "::run (inlined)",
    ];
    sym == "main" || sym.ends_with("::run") || SKIP.iter().any(|k| *k != "main" && sym.contains(k))
}

/// The worker's syscalls per second while echoing (perf tracepoints).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyscallMix {
    /// Seconds traced.
    pub secs: f64,
    /// `sendto` calls (one per echo).
    pub sendto: u64,
    /// `recvfrom` calls that returned data (the peek and the consume).
    pub recvfrom_data: u64,
    /// `recvfrom` calls that returned EAGAIN.
    pub recvfrom_eagain: u64,
    /// `epoll_wait` calls.
    pub epoll_wait: u64,
}

/// Counts the syscalls of `pid` for `secs` seconds.
pub fn syscall_mix(dir: &Path, pid: u32, secs: f64) -> anyhow::Result<SyscallMix> {
    let data = dir.join("syscalls.perf.data");
    let status = Command::new("perf")
        .args(["record", "-q", "-e", "syscalls:sys_exit_recvfrom", "-e", "syscalls:sys_enter_sendto"])
        .args(["-e", "syscalls:sys_enter_epoll_wait", "-p", &pid.to_string(), "-o"])
        .arg(&data)
        .args(["--", "sleep", &format!("{secs:.1}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "perf record of syscall tracepoints failed ({status})");
    let out =
        Command::new("perf").args(["script", "-F", "event,trace", "-i"]).arg(&data).stderr(Stdio::null()).output()?;
    let _ = std::fs::remove_file(&data);
    let mut m = SyscallMix { secs, ..SyscallMix::default() };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.contains("sys_enter_sendto") {
            m.sendto += 1;
        } else if line.contains("sys_enter_epoll_wait") {
            m.epoll_wait += 1;
        } else if line.contains("sys_exit_recvfrom") {
            // -EAGAIN (-11) as an unsigned 64-bit value.
            if line.trim_end().ends_with("0xfffffffffffffff5") {
                m.recvfrom_eagain += 1;
            } else {
                m.recvfrom_data += 1;
            }
        }
    }
    Ok(m)
}

/// What to look for in an echo profile.
pub const ECHO_PROBES: &[Probe] = &[
    Probe {
        comm: "seqnum-worker",
        label: "send(): write the echo (incl. loopback delivery into the client's socket)",
        frames: &["__send", "__x64_sys_sendto"],
    },
    Probe {
        comm: "seqnum-worker",
        label: "recv(MSG_PEEK) + recv(MSG_TRUNC)",
        frames: &["__libc_recv", "__x64_sys_recvfrom"],
    },
    Probe { comm: "seqnum-worker", label: "epoll_wait", frames: &["epoll_wait"] },
    Probe { comm: "seqnum-worker", label: "EchoConn::check_seqnums", frames: &["check_seqnums"] },
    Probe { comm: "takeoverd", label: "takeoverd (anything)", frames: &[""] },
];

/// What to look for in a reload profile.
pub const RELOAD_PROBES: &[Probe] = &[
    Probe { comm: "takeoverd", label: "Supervisor::reload (all of it)", frames: &["Supervisor::reload"] },
    Probe {
        comm: "takeoverd",
        label: "  spawn_ready: fork/exec the new worker, read its hello",
        frames: &["spawn_ready"],
    },
    Probe {
        comm: "takeoverd",
        label: "  collect_quiesced: read the old worker's states",
        frames: &["collect_quiesced"],
    },
    Probe {
        comm: "takeoverd",
        label: "  hand: build the items, offer every fd, await the ack",
        frames: &["Supervisor::hand"],
    },
    Probe {
        comm: "takeoverd",
        label: "  WorkerProc::finish: wait for the old worker's exit",
        frames: &["WorkerProc::finish"],
    },
    Probe {
        comm: "takeoverd",
        label: "  save_state: rewrite the state memfd (after the handoff)",
        frames: &["save_state"],
    },
    Probe {
        comm: "takeoverd",
        label: "  (across the above) serde_json::Value clone",
        frames: &["clone_subtree", "<serde_json::value::Value as core::clone::Clone>"],
    },
    Probe {
        comm: "takeoverd",
        label: "  (across the above) serde_json::Value drop",
        frames: &[
            "drop_in_place<serde_json::value::Value>",
            "drop_in_place<serde_json::map::Map",
            "btree::map::IntoIter",
        ],
    },
    Probe {
        comm: "takeoverd",
        label: "  (across the above) JSON decode (Message::decode)",
        frames: &["Message::decode"],
    },
    Probe {
        comm: "takeoverd",
        label: "  (across the above) malloc/free",
        frames: &["malloc", "_int_free", "cfree", "unlink_chunk", "__libc_free"],
    },
    Probe { comm: "takeoverd", label: "  (across the above) page faults", frames: &["exc_page_fault"] },
    Probe {
        comm: "seqnum-worker",
        label: "new worker: takeover::receive (recvmsg, parse, validate each fd)",
        frames: &["handoff::receive"],
    },
    Probe {
        comm: "seqnum-worker",
        label: "  of which validate (getsockopt ×3 per fd)",
        frames: &["takeover::fd::validate"],
    },
    Probe {
        comm: "seqnum-worker",
        label: "new worker: startup::adopt (EchoConn::adopt, epoll register)",
        frames: &["startup::adopt"],
    },
    Probe {
        comm: "seqnum-worker",
        label: "new worker: first poke_all (a recv on every connection)",
        frames: &["poke_all"],
    },
    Probe { comm: "seqnum-worker", label: "old worker: quiesce (states to takeoverd)", frames: &["on_control"] },
    Probe { comm: "seqnum-worker", label: "serving traffic (Worker::serve)", frames: &["Worker::serve"] },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_perf_script() {
        let text = "takeoverd 10\n\t     1 foo+0x1 (/bin/takeoverd)\n\t     2 Supervisor::hand (/bin/takeoverd)\n\n\
takeoverd 10\n\t     1 bar (/bin/takeoverd)\n\n\
seqnum-worker 11\n\t     3 tcp_sendmsg ([kernel.kallsyms])\n\t     4 __send (libc.so.6)\n\n\
other 12\n\t     5 x (y)\n";
        let p = summarise(text, "t", "reload", 1.0, RELOAD_PROBES, &["takeoverd", "seqnum-worker"], "perf");
        assert_eq!(p.samples["takeoverd"], 2);
        assert_eq!(p.samples["seqnum-worker"], 1);
        let hand = p.rows.iter().find(|r| r.label.contains("hand:")).unwrap();
        assert_eq!(hand.share_pct, 50.0);
        assert_eq!(p.kernel_pct["seqnum-worker"], 100.0);
        assert!(p.hot.iter().any(|h| h.symbol == "tcp_sendmsg [k]"));
        assert!(p.top_inclusive.iter().any(|r| r.comm == "takeoverd" && r.label == "Supervisor::hand"));
        assert!(!p.top_inclusive.iter().any(|r| r.label.contains("__send")), "libc frames are not the binary's");
    }
}
