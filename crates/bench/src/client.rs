//! `seqnum-client` runs: start, wait, the JSON summary, the timeline.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::procs::{self, Bins, Clock};

/// Connections per client process at most: the hard open-file limit of an
/// ordinary process here is 20 000.
pub const MAX_PER_CLIENT: u64 = 15_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Server port on 127.0.0.1.
    pub port: u16,
    /// Connections in all (split over several processes past [`MAX_PER_CLIENT`]).
    pub connections: u64,
    /// `--interval-ms`.
    pub interval_ms: u64,
    /// `--duration`, seconds.
    pub duration_s: f64,
    /// `--timeout-ms`.
    pub timeout_ms: u64,
    /// `--ramp-ms`.
    pub ramp_ms: u64,
    /// `--source-addresses` (1: not given).
    pub source_addresses: u32,
    /// CPU to pin to.
    pub cpu: Option<usize>,
    /// `--churn-messages` (None: not given).
    pub churn_messages: Option<u64>,
}

impl ClientSpec {
    /// `connections` idle connects (each sends one message within the
    /// hour, that is: after its first echo, nothing), spread over `ramp_ms`.
    pub fn idle(port: u16, connections: u64, ramp_ms: u64, source_addresses: u32) -> ClientSpec {
        ClientSpec {
            port,
            connections,
            interval_ms: 3_600_000,
            duration_s: 600.0,
            timeout_ms: 5000,
            ramp_ms,
            source_addresses,
            cpu: None,
            churn_messages: None,
        }
    }
}

/// One 100 ms row of a timeline, on the benchmark's clock.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Row {
    /// Start of the slice, ms on the benchmark's clock.
    pub t_ms: f64,
    /// Echoes received in it.
    pub echoes: u64,
    /// Latency percentiles and maximum of those echoes, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Maximum, µs.
    pub max_us: u64,
    /// Errors in it.
    pub errors: u64,
}

/// Latency figures over the rows overlapping a window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Window {
    /// Start, ms on the benchmark's clock.
    pub from_ms: f64,
    /// End.
    pub to_ms: f64,
    /// Echoes in the rows.
    pub echoes: u64,
    /// Highest per-row median, µs.
    pub p50_us: u64,
    /// Highest per-row 99th percentile, µs.
    pub p99_us: u64,
    /// Highest latency, µs.
    pub max_us: u64,
    /// Errors in the rows.
    pub errors: u64,
}

/// The figures over the rows of `timelines` that overlap `[from, to]`.
pub fn window(timelines: &[Vec<Row>], from_ms: f64, to_ms: f64) -> Window {
    let mut w = Window { from_ms, to_ms, ..Window::default() };
    for tl in timelines {
        for r in tl.iter().filter(|r| r.t_ms < to_ms && r.t_ms + 100.0 > from_ms) {
            w.echoes += r.echoes;
            w.errors += r.errors;
            if r.echoes > 0 {
                w.p50_us = w.p50_us.max(r.p50_us);
                w.p99_us = w.p99_us.max(r.p99_us);
                w.max_us = w.max_us.max(r.max_us);
            }
        }
    }
    w
}

/// Counters summed over every client process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Connections.
    pub connections: u64,
    /// Messages sent.
    pub sent: u64,
    /// Echoes received.
    pub echoed: u64,
    /// Errors of every kind (discontinuities, resets, EOFs, timeouts, connect errors).
    pub errors: u64,
    /// `discontinuities`.
    pub discontinuities: u64,
    /// `resets`.
    pub resets: u64,
    /// `eofs`.
    pub eofs: u64,
    /// `timeouts`.
    pub timeouts: u64,
    /// `connect_errors`.
    pub connect_errors: u64,
    /// Median latency, µs: of every process's echoes together (their
    /// histograms merged), or, for clients that were killed, the highest
    /// row median of their timelines.
    pub p50_us: u64,
    /// 99th percentile, µs, the same way.
    pub p99_us: u64,
    /// Maximum latency, µs.
    pub max_us: u64,
    /// Echoes per second, summed.
    pub echoes_per_sec: f64,
    /// Connects that completed (more than `connections` with churn).
    pub connects: u64,
    /// Completed connects per second, summed.
    pub connects_per_sec: f64,
    /// The longest run of the processes, s.
    pub duration_s: f64,
    /// Processes that exited non-zero or printed no summary.
    pub failed_processes: u64,
    /// The last lines of a failed process's stderr.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct ClientResult {
    /// Summed counters.
    pub summary: Summary,
    /// Each process's timeline, on the benchmark's clock.
    pub timelines: Vec<Vec<Row>>,
}

#[derive(Debug)]
struct Proc {
    child: Child,
    t0_ms: f64,
    timeline: PathBuf,
    stderr: PathBuf,
}

/// Client processes that are running.
#[derive(Debug)]
pub struct ClientRun {
    procs: Vec<Proc>,
    /// When the last one should end on its own (ms on the benchmark's clock).
    pub end_ms: f64,
}

impl ClientRun {
    /// Starts the clients for `spec`; returns once each has created its
    /// timeline (its clock's origin).
    pub fn start(bins: &Bins, clock: &Clock, dir: &Path, tag: &str, spec: &ClientSpec) -> anyhow::Result<ClientRun> {
        let n_procs = spec.connections.div_ceil(MAX_PER_CLIENT).max(1);
        let mut procs = Vec::new();
        let mut end_ms: f64 = 0.0;
        for i in 0..n_procs {
            let conns = spec.connections / n_procs + u64::from(i < spec.connections % n_procs);
            let timeline = dir.join(format!("{tag}-client{i}.csv"));
            let stderr = dir.join(format!("{tag}-client{i}.log"));
            let _ = std::fs::remove_file(&timeline);
            let mut cmd = procs::command(&bins.client, spec.cpu);
            cmd.args(["-a", "127.0.0.1", "-p", &spec.port.to_string()])
                .args(["--connections", &conns.to_string()])
                .args(["--interval-ms", &spec.interval_ms.to_string()])
                .args(["--duration", &format!("{:.3}", spec.duration_s)])
                .args(["--timeout-ms", &spec.timeout_ms.to_string()])
                .args(["--ramp-ms", &spec.ramp_ms.to_string()])
                .arg("--json")
                .arg("--timeline")
                .arg(&timeline)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&stderr)?);
            if spec.source_addresses > 1 {
                cmd.args(["--source-addresses", &spec.source_addresses.to_string()]);
            }
            if let Some(k) = spec.churn_messages {
                cmd.args(["--churn-messages", &k.to_string()]);
            }
            let mut child = procs::spawn(&mut cmd)?;
            let t0 = Instant::now();
            while !timeline.exists() {
                if let Ok(Some(st)) = child.try_wait() {
                    let text = std::fs::read_to_string(&stderr).unwrap_or_default();
                    bail!("seqnum-client exited at once ({st}): {}", crate::server::last_lines(&text, 5));
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    procs::kill_group(&mut child);
                    bail!("seqnum-client did not create its timeline within 10 s");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let t0_ms = clock.now_ms();
            end_ms = end_ms.max(t0_ms + spec.duration_s * 1e3);
            procs.push(Proc { child, t0_ms, timeline, stderr });
        }
        Ok(ClientRun { procs, end_ms })
    }

    /// Kills every client and reads what the timelines hold (the summary
    /// is then made of the timelines: echoes, errors, the highest row
    /// figures).
    pub fn kill_and_collect(self) -> anyhow::Result<ClientResult> {
        let mut summary = Summary::default();
        let mut timelines = Vec::new();
        for mut p in self.procs {
            let early = p.child.try_wait().ok().flatten();
            procs::kill_group(&mut p.child);
            if let Some(st) = early {
                summary.failed_processes += 1;
                let text = std::fs::read_to_string(&p.stderr).unwrap_or_default();
                summary.failure =
                    Some(format!("seqnum-client ended early ({st}): {}", crate::server::last_lines(&text, 3)));
            }
            let tl = read_timeline(&p.timeline, p.t0_ms)?;
            for r in &tl {
                summary.echoed += r.echoes;
                summary.errors += r.errors;
                summary.p50_us = summary.p50_us.max(r.p50_us);
                summary.p99_us = summary.p99_us.max(r.p99_us);
                summary.max_us = summary.max_us.max(r.max_us);
            }
            timelines.push(tl);
        }
        Ok(ClientResult { summary, timelines })
    }

    /// The client pids.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.child.id()).collect()
    }

    /// Waits for every client (at most `grace` past its planned end), and
    /// reads the summaries and timelines. A client still running is killed
    /// and counted as failed.
    pub fn finish(self, clock: &Clock, grace: Duration) -> anyhow::Result<ClientResult> {
        let (mut parts, mut failed_processes, mut failure) = (Vec::new(), 0, None);
        let mut timelines = Vec::new();
        for mut p in self.procs {
            let left = (self.end_ms - clock.now_ms()).max(0.0) / 1e3;
            let status = testkit::wait_timeout(&mut p.child, Duration::from_secs_f64(left) + grace);
            let mut stdout = String::new();
            if status.is_some() {
                if let Some(mut out) = p.child.stdout.take() {
                    use std::io::Read;
                    let _ = out.read_to_string(&mut stdout);
                }
            }
            procs::kill_group(&mut p.child);
            match testkit::parse_summary(&stdout) {
                Ok(s) => parts.push(s),
                Err(_) => {
                    failed_processes += 1;
                    let text = std::fs::read_to_string(&p.stderr).unwrap_or_default();
                    failure = Some(format!(
                        "seqnum-client {}: {}",
                        status.map_or("did not finish in time".to_owned(), |s| s.to_string()),
                        crate::server::last_lines(&text, 3)
                    ));
                }
            }
            if status.is_some_and(|s| !s.success()) && failure.is_none() {
                let text = std::fs::read_to_string(&p.stderr).unwrap_or_default();
                failure = Some(format!("seqnum-client exited non-zero: {}", crate::server::last_lines(&text, 3)));
            }
            timelines.push(read_timeline(&p.timeline, p.t0_ms)?);
        }
        // The client's own merge (histograms merged, counts and rates
        // summed), over the processes that printed a summary; the ones that
        // did not are counted here, apart from `errors`.
        let connections = parts.iter().map(|s| s.connections).sum();
        let merged = seqnum::client::Summary::merge(connections, parts.len() as u32, &parts);
        let summary = Summary { failed_processes, failure, ..Summary::from(&merged) };
        Ok(ClientResult { summary, timelines })
    }
}

impl From<&seqnum::client::Summary> for Summary {
    fn from(c: &seqnum::client::Summary) -> Summary {
        Summary {
            connections: c.connections,
            sent: c.sent,
            echoed: c.echoed,
            errors: c.errors,
            discontinuities: c.discontinuities,
            resets: c.resets,
            eofs: c.eofs,
            timeouts: c.timeouts,
            connect_errors: c.connect_errors,
            p50_us: c.latency_us.p50,
            p99_us: c.latency_us.p99,
            max_us: c.latency_us.max,
            echoes_per_sec: c.echoes_per_sec,
            connects: c.connects,
            connects_per_sec: c.connects_per_sec,
            duration_s: c.duration_s,
            failed_processes: c.failed_processes,
            failure: None,
        }
    }
}

/// Reads a `--timeline` CSV, placing its rows on the benchmark's clock.
fn read_timeline(path: &Path, t0_ms: f64) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<f64> = line.split(',').filter_map(|x| x.trim().parse::<f64>().ok()).collect();
        if f.len() != 6 {
            continue;
        }
        rows.push(Row {
            t_ms: t0_ms + f[0],
            echoes: f[1] as u64,
            p50_us: f[2] as u64,
            p99_us: f[3] as u64,
            max_us: f[4] as u64,
            errors: f[5] as u64,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: f64, max: u64) -> Row {
        Row { t_ms: t, echoes: 1, p50_us: max / 2, p99_us: max, max_us: max, errors: 0 }
    }

    #[test]
    fn window_takes_overlapping_rows() {
        let tl = vec![vec![row(0.0, 10), row(100.0, 20), row(200.0, 30), row(300.0, 40)]];
        let w = window(&tl, 150.0, 210.0);
        assert_eq!((w.echoes, w.max_us), (2, 30));
        let w = window(&tl, 100.0, 100.0 + 1e-9);
        assert_eq!((w.echoes, w.max_us), (1, 20));
    }
}
