//! The parts of BENCHMARKS.md (and of the console summary) that set a
//! figure against its floor, for the "Constant-time reload" issue: the
//! reload pause against the same windows without a reload, the reload
//! phases from takeoverd's own records, echo cost against floor-echo, and
//! connection churn against floor-echo; with their targets. report.rs calls
//! each function at its place in the page.

use std::fmt::Write as _;

use crate::client::Window;
use crate::handoff::HandoffResult;
use crate::kinds::Placement;
use crate::report::{Results, Target};
use crate::scenarios::EchoResult;
use crate::stats::show;

/// Sizes of the reload-pause target (pinned placement).
pub const PAUSE_SIZES: [u64; 3] = [1_000, 10_000, 19_900];
/// How much the worst latency in a reload window may exceed the worst in
/// the same windows without a reload, ms.
pub const PAUSE_SLACK_MS: f64 = 2.0;
/// The most takeoverd + worker's CPU per echo may be, in floor-echo's.
pub const ECHO_RATIO: f64 = 1.2;

/// `19900` → `19 900`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "✔ met",
        Some(false) => "✘ missed",
        None => "–",
    }
}

/// The reload-pause comparison of one handoff run.
struct Pause {
    /// Worst latency in any reload window, ms.
    during: Option<f64>,
    /// Worst latency in the same windows without a reload, ms.
    without: Option<f64>,
    /// Windows whose worst latency is within its own baseline window + slack.
    within: usize,
    /// Windows compared.
    windows: usize,
    /// Reload windows in which no echo arrived at all: the pause outlasted
    /// the window, and its length is not known.
    silent_during: usize,
    /// Baseline windows in which no echo arrived: no floor to compare with.
    silent_without: usize,
}

impl Pause {
    fn of(h: &HandoffResult) -> Pause {
        let pairs: Vec<(&Window, &Window)> = h.events.iter().map(|e| &e.window).zip(&h.baseline_windows).collect();
        let within = |(d, b): &&(&Window, &Window)| {
            d.echoes > 0 && b.echoes > 0 && d.max_us as f64 <= b.max_us as f64 + PAUSE_SLACK_MS * 1e3
        };
        Pause {
            during: h.during_reload.max_ms.map(|s| s.max),
            without: h.without_reload.max_ms.map(|s| s.max),
            within: pairs.iter().filter(within).count(),
            windows: pairs.len(),
            silent_during: pairs.iter().filter(|(d, _)| d.echoes == 0).count(),
            silent_without: pairs.iter().filter(|(_, b)| b.echoes == 0).count(),
        }
    }

    /// Missed when a reload window saw no echo at all; unknown when a
    /// baseline window saw none.
    fn met(&self) -> Option<bool> {
        if self.silent_during > 0 {
            return Some(false);
        }
        if self.silent_without > 0 {
            return None;
        }
        Some(self.during? <= self.without? + PAUSE_SLACK_MS)
    }

    /// The worst latency of the reload windows, or how many saw no echo.
    fn show_during(&self) -> String {
        match (self.silent_during, self.during) {
            (0, Some(v)) => format!("{v:.2}"),
            (0, None) => "–".into(),
            (k, _) => format!("no echo at all in {k}/{} windows", self.windows),
        }
    }

    /// The same for the baseline windows.
    fn show_without(&self) -> String {
        match (self.silent_without, self.without) {
            (0, Some(v)) => format!("{v:.2}"),
            (0, None) => "–".into(),
            (k, _) => format!("no echo at all in {k}/{} windows", self.windows),
        }
    }
}

fn pinned(r: &Results, n: u64) -> Option<&HandoffResult> {
    r.handoff.iter().find(|h| h.connections == n && h.placement == Placement::Pinned)
}

/// Section 1: the worst latency in reload windows against the same
/// windows without reload, per size.
pub fn reload_pause(w: &mut String, r: &Results) {
    let _ = writeln!(
        w,
        "\nThe reload pause against its floor, the same windows in the run without reloads (the issue's target: \
         worst echo latency in a reload window ≤ the worst in the same windows without a reload + {PAUSE_SLACK_MS} \
         ms, pinned placement, at 1 000, 10 000 and 19 900 connections). *Worst* is the highest latency of any \
         echo in any of the windows; \"windows within\" compares each reload window with its own baseline window. \
         The pause is takeoverd's `pause_ms` (old worker told to stop → new worker serving), or its `handoff_ms` \
         where this takeoverd does not report `pause_ms`. A reload window in which no echo arrived at all (the \
         pause outlasted it) misses the target.\n\n\
         | connections | placement | reloads ok | pause, median (max), ms | worst latency, reload windows (ms) | worst \
         latency, same windows without reload (ms) | bound: without + {PAUSE_SLACK_MS} ms | windows within their own \
         bound | target |\n|---:|---|---:|---|---:|---:|---:|---:|---|"
    );
    let mut sizes: Vec<u64> =
        r.handoff.iter().filter(|h| h.placement == Placement::Pinned).map(|h| h.connections).collect();
    sizes.extend(PAUSE_SIZES.iter().filter(|n| !sizes.contains(n)).collect::<Vec<_>>());
    sizes.sort_unstable();
    for n in sizes {
        let Some(h) = pinned(r, n) else {
            let _ = writeln!(w, "| {} | pinned | not measured in this run | | | | | | – |", group(n));
            continue;
        };
        let p = Pause::of(h);
        let (pause, figure) = h.phases.pause();
        let f = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.2}"));
        let target = if PAUSE_SIZES.contains(&n) { met(p.met()) } else { "(not a target size)" };
        let _ = writeln!(
            w,
            "| {} | {} | {}/{} | {} ({}) | {} | {} | {} | {}/{} | {} |",
            group(n),
            h.placement,
            h.reloads_ok,
            h.reloads,
            pause.map_or("–".into(), |s| format!("{:.2} ({:.2})", s.median, s.max)),
            figure,
            p.show_during(),
            p.show_without(),
            f(p.without.filter(|_| p.silent_without == 0).map(|x| x + PAUSE_SLACK_MS)),
            p.within,
            p.windows,
            target
        );
    }
}

/// Section 1: where a reload's time goes, from takeoverd's records.
pub fn reload_phases(w: &mut String, r: &Results) {
    let _ = writeln!(
        w,
        "\nWhere a reload's time goes, from takeoverd's own records (`takeoverd ctl status --json`, `reloads`, read \
         once after the run's reloads; takeoverd keeps the last {}), ms, median (min–max):\n\n\
         | connections | placement | records | pause_ms: old worker told to stop → new worker serving | stage_ms: \
         new worker's hello → every connection registered | total_ms: request → done | handoff_ms: request → new \
         worker's ack |\n|---:|---|---:|---|---|---|---|",
        crate::phases::HISTORY
    );
    for h in &r.handoff {
        let p = &h.phases;
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            h.connections,
            h.placement,
            p.records,
            show(&p.pause_ms, 2),
            show(&p.stage_ms, 2),
            show(&p.total_ms, 2),
            show(&p.handoff_ms, 2)
        );
    }
    if !r.handoff.is_empty() && r.handoff.iter().all(|h| h.phases.pause_ms.is_none()) {
        let _ = writeln!(
            w,
            "\nThis takeoverd reports no `pause_ms`, `stage_ms` or `total_ms` (–): only `handoff_ms`, which holds \
             the pause and the new worker's start-up, and stands in for the pause above."
        );
    }
}

fn echo_pair<'a>(r: &'a Results, e: &EchoResult) -> Option<&'a EchoResult> {
    r.floor_echo.iter().find(|f| f.connections == e.connections && f.placement == e.placement)
}

/// Section 3: echo cost against floor-echo.
pub fn echo_floor(w: &mut String, r: &Results) {
    let _ = writeln!(w, "\n### Against the floor\n");
    if r.floor_echo.is_empty() {
        let _ = writeln!(w, "Not measured in this run.");
        return;
    }
    let _ = writeln!(
        w,
        "The same client load, in the same run and placement, against `floor-echo` \
         (`crates/bench/src/bin/floor-echo.rs`: one thread, mio edge-triggered epoll, accept, read then write, no \
         framing, no handoff, no supervisor): the least an echo can cost here. Server CPU per echo = utime+stime \
         from `/proc` (takeoverd + worker; floor-echo) over the same measured window (3 s; 1 s with `--quick`), \
         divided by the client's echoes in it. The issue's target: takeoverd + worker within {ECHO_RATIO}× of the floor at 1 000 connections.\n\n\
         | connections | placement | takeoverd + worker µs/echo | floor-echo µs/echo | ratio | takeoverd echoes/s | \
         floor-echo echoes/s | p99 µs, takeoverd / floor | errors |\n|---:|---|---:|---:|---:|---:|---:|---|---:|"
    );
    for e in &r.echo {
        let Some(f) = echo_pair(r, e) else { continue };
        let _ = writeln!(
            w,
            "| {} | {} | {:.2} | {:.2} | {:.2}× | {:.0} | {:.0} | {} / {} | {} |",
            e.connections,
            e.placement,
            e.server_cpu_us_per_echo,
            f.server_cpu_us_per_echo,
            e.server_cpu_us_per_echo / f.server_cpu_us_per_echo,
            e.echoes_per_sec,
            f.echoes_per_sec,
            e.p99_us,
            f.p99_us,
            e.errors + f.errors
        );
    }
}

/// Section 6: connection churn against floor-echo.
pub fn churn(w: &mut String, r: &Results) {
    let _ = writeln!(w, "\n## 6. Connection churn\n");
    let Some(c) = &r.churn else {
        let _ = writeln!(w, "Not run (`--only`).");
        return;
    };
    let _ = writeln!(
        w,
        "`seqnum-client --connections {n} --churn-messages {k} --interval-ms 0`: {n} connections at a time, each \
         sends {k} seqnums lock-step, closes cleanly and is replaced by a new connect at once, as fast as the client \
         ({p}) can drive; connects/s = the client's completed connects / its run. Against floor-echo (the floor), \
         takeoverd + worker undisturbed, and takeoverd + worker while `takeoverd ctl reload`s and `kill -9`s of the \
         serving worker (pid from `ctl status --json`; the next event only once a new `worker_pid` shows) are spaced \
         evenly over the run. Server CPU per connect = utime+stime over the client's run (takeoverd's including the \
         workers it reaped) / connects. When the client's core is busy (client cores near 1.0) the client is the \
         limit and connects/s comes out alike for every server: server CPU per connect is then the comparison. \
         Failed connects, resets, EOFs, timeouts and wrong echoes are errors: there must be none.\n\n\
         | server | events | connects | connects/s (× floor) | server CPU µs/connect (× floor) | server cores | \
         client cores | echo p99 / max (ms) | failed connects | resets | EOFs | timeouts | discontinuities | result \
         |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
        n = c.connections,
        k = c.messages,
        p = if c.placement == Placement::Pinned { "pinned to CPU 0, servers to CPU 1" } else { "no pinning" },
    );
    let floor = c.runs.iter().find(|x| x.server == "floor-echo" && x.failure.is_none());
    let vs = |v: Option<f64>, f: Option<f64>| match (v, f) {
        (Some(v), Some(f)) if f > 0.0 => format!(" ({:.2}×)", v / f),
        _ => String::new(),
    };
    let num = |v: Option<f64>, d: usize| v.map_or("–".into(), |v| format!("{v:.d$}"));
    for x in &c.runs {
        let result = match &x.failure {
            None => "pass".to_owned(),
            Some(f) => format!("**fail**: {f}"),
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {:.0}{} | {}{} | {} | {} | {:.2} / {:.2} | {} | {} | {} | {} | {} | {} |",
            x.server,
            x.events,
            x.connects,
            x.connects_per_sec,
            vs(Some(x.connects_per_sec), floor.map(|f| f.connects_per_sec)),
            num(x.server_cpu_us_per_connect, 1),
            vs(x.server_cpu_us_per_connect, floor.and_then(|f| f.server_cpu_us_per_connect)),
            num(x.server_cores, 2),
            num(x.client_cores, 2),
            x.p99_us as f64 / 1e3,
            x.max_us as f64 / 1e3,
            x.connect_errors,
            x.resets,
            x.eofs,
            x.timeouts,
            x.discontinuities,
            result
        );
    }
    for x in c.runs.iter().filter(|x| x.reloads + x.kills > 0) {
        let _ = writeln!(
            w,
            "\nDuring the {} run: reloads ok {}/{}, reload pause ({}, last {} reloads) {} ms; kill -9 ok {}/{}, \
             kill → new worker in `ctl status` {} ms{}.",
            x.events,
            x.reloads_ok,
            x.reloads,
            x.reload_pause_figure,
            x.reloads.min(crate::phases::HISTORY),
            show(&x.reload_pause_ms, 2),
            x.kills_ok,
            x.kills,
            show(&x.kill_to_new_worker_ms, 1),
            match x.events_skipped {
                0 => String::new(),
                k => format!(
                    "; **{k} events not run**: the earlier ones took so long that the client's run was over before \
                     their turn"
                ),
            }
        );
    }
}

/// A bullet for the Method section.
pub fn method(w: &mut String) {
    let _ = writeln!(
        w,
        "- **Floors:** each new figure stands next to what it is compared with, measured in the same run: the \
         reload windows next to the same windows without a reload (section 1), takeoverd's echo cost and its \
         connection churn next to `floor-echo`'s, a minimal epoll echo server built with the benchmark (sections 3 \
         and 6). Reload phases come from takeoverd's `ctl status --json` records, not from its logs.\n"
    );
}

/// The targets of the "Constant-time reload" issue.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let e = r.echo.iter().find(|e| e.connections == 1_000 && e.placement == Placement::Pinned);
    let ratio = e.and_then(|e| echo_pair(r, e).map(|f| e.server_cpu_us_per_echo / f.server_cpu_us_per_echo));
    t.push(Target {
        name: "1 000 conns: echo CPU against the floor".into(),
        target: format!("≤ {ECHO_RATIO} ×"),
        measured: ratio.filter(|x| x.is_finite()),
        unit: "×".into(),
        met: ratio.filter(|x| x.is_finite()).map(|x| x <= ECHO_RATIO),
        basis: "takeoverd + worker µs/echo ÷ floor-echo µs/echo, same load and run, pinned".into(),
    });
    for n in PAUSE_SIZES {
        let p = pinned(r, n).map(Pause::of);
        let without = p.as_ref().and_then(|p| p.without);
        t.push(Target {
            name: format!("{} conns: worst echo latency in a reload window, against none", group(n)),
            target: match without.filter(|_| p.as_ref().is_some_and(|p| p.silent_without == 0)) {
                Some(b) => format!("≤ {:.2} ms (no reload {b:.2} + {PAUSE_SLACK_MS})", b + PAUSE_SLACK_MS),
                None => format!("≤ no reload + {PAUSE_SLACK_MS} ms"),
            },
            measured: p.as_ref().filter(|p| p.silent_during == 0).and_then(|p| p.during),
            unit: "ms".into(),
            met: p.as_ref().and_then(Pause::met),
            basis: format!(
                "highest client latency in any reload window against the same windows of a run without reloads, \
                 pinned placement{}",
                match p.as_ref().map_or((0, 0), |p| (p.silent_during, p.windows)) {
                    (0, _) => String::new(),
                    (k, n) => format!("; in {k} of the {n} reload windows no echo arrived at all"),
                }
            ),
        });
    }
    let churned: Vec<_> =
        r.churn.iter().flat_map(|c| &c.runs).filter(|x| x.server == "takeoverd" && x.reloads + x.kills > 0).collect();
    let errors = churned.iter().map(|x| x.errors).sum::<u64>() as f64;
    t.push(Target {
        name: "connection churn through reloads and kill -9: client errors".into(),
        target: "≤ 0 errors".into(),
        measured: (!churned.is_empty()).then_some(errors),
        unit: "errors".into(),
        met: (!churned.is_empty()).then(|| errors == 0.0 && churned.iter().all(|x| x.failure.is_none())),
        basis: "failed connects + resets + EOFs + timeouts + discontinuities, takeoverd with reloads and kills".into(),
    });
    t
}

/// Lines for the console summary.
pub fn console(r: &Results) -> String {
    let mut s = String::new();
    for e in &r.echo {
        if let Some(f) = echo_pair(r, e) {
            let _ = writeln!(
                s,
                "echo vs floor {:>6} conns {:>6}: takeoverd {:.2} µs/echo, floor-echo {:.2} µs/echo: {:.2}×",
                e.connections,
                e.placement,
                e.server_cpu_us_per_echo,
                f.server_cpu_us_per_echo,
                e.server_cpu_us_per_echo / f.server_cpu_us_per_echo
            );
        }
    }
    for h in r.handoff.iter().filter(|h| h.placement == Placement::Pinned) {
        let p = Pause::of(h);
        let _ = writeln!(
            s,
            "reload pause {:>6} conns: worst {} ms in reload windows, {} ms without reload: {}",
            h.connections,
            p.show_during(),
            p.show_without(),
            if PAUSE_SIZES.contains(&h.connections) { met(p.met()) } else { "(not a target size)" }
        );
    }
    for x in r.churn.iter().flat_map(|c| &c.runs) {
        let _ = writeln!(
            s,
            "churn {:>10} ({}): {:.0} connects/s, server {} µs/connect, errors {}{}",
            x.server,
            x.events,
            x.connects_per_sec,
            x.server_cpu_us_per_connect.map_or("–".into(), |v| format!("{v:.1}")),
            x.errors,
            x.failure.as_deref().map(|f| format!(" — {f}")).unwrap_or_default()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_thousands() {
        assert_eq!(super::group(19_900), "19 900");
        assert_eq!(super::group(1_000), "1 000");
        assert_eq!(super::group(100), "100");
        assert_eq!(super::group(100_000), "100 000");
    }
}
