//! Section 8 of BENCHMARKS.md: `takeoverd --workers N`, two workers beside
//! one in the same run.

use std::fmt::Write as _;

use super::prelude::*;
use crate::report::tick;
use crate::report_floor::group;
use crate::report_workers::{self as rw, roll};
use crate::stats::Spread;

/// ## 8. Several workers.
pub(super) fn write(w: &mut String, r: &Results) {
    let Some(s) = &r.workers else {
        return;
    };
    let _ = writeln!(w, "\n## 8. Several workers (`--workers N`)\n");
    let _ = writeln!(
        w,
        "With `--workers N`, N worker processes share the connections: each new connection goes to the worker \
         (*slot*) with the fewest, `ctl reload` replaces the workers one at a time (slot 0, then 1, …), and while a \
         slot's new worker takes over, only that slot's share waits. This section runs `--workers 2` beside \
         `--workers 1` (takeoverd's default, what every other section runs), in the same run and on the same \
         loads.\n\n\
         **What it cannot show: throughput scaling.** This machine has {} CPUs and the client that makes the load \
         needs one of them. Pinned, takeoverd and all its workers share the other one, so two workers cannot echo \
         more than one; unpinned, the second worker would take its CPU from the client, and the figure would be the \
         client's loss, not the workers' gain. More echoes per second with more workers needs more cores than the \
         load generator uses. What two cores can show is what a split costs (CPU per echo), what it buys (each \
         share pauses alone in a reload) and how evenly the connections are shared.\n\n\
         Method:\n\n\
         - **Rolling reload:** lock-step connections at the handoff section's interval, pinned (takeoverd and its \
         workers on one CPU, the clients on the other), `ctl reload`s one at a time; each reload's window is \
         compared with the same window of a run without reloads, as in section 1. takeoverd's reload records \
         (`ctl status --json`) give each roll's longest slot pause and staging, and in their `slots` each slot's own \
         (`pause_ms`, `stage_ms`, `connections`, `serving_at_ms`).\n\
         - **Echo cost:** as section 3 (`--interval-ms 0`, pinned, CPU of takeoverd and every worker over the \
         measured window, per echo the client counted in it).\n\
         - **Balance:** idle connects (each sends one message, then nothing), then each worker's `connections` \
         from `ctl status --json` once every one is up.\n",
        r.machine.cpus
    );
    rolls(w, s);
    slots(w, s);
    echo(w, s);
    balance(w, s);
    let _ = writeln!(w, "\nThe section's targets (also in the table at the top):\n");
    for t in rw::targets(r) {
        let _ = writeln!(
            w,
            "- {} {}: {} (bound {})",
            tick(t.met),
            t.name,
            t.measured.map_or("not measured".into(), |m| format!("{m:.2} {}", t.unit)),
            t.target
        );
    }
    for f in &s.failures {
        let _ = writeln!(w, "- **failed:** {f}");
    }
}

/// The rolling reloads: what the clients saw, against no reload.
fn rolls(w: &mut String, s: &crate::workers::WorkersSection) {
    let _ = writeln!(
        w,
        "Rolling reloads. Latency: the worst 100 ms row of each reload's window, ms, median (min–max) over the \
         reloads; \"no reload\" is the same windows of a run without reloads, and \"added\" each reload window's \
         worst minus its own window's without reloads (the target compares its median). Pause and staging: \
         takeoverd's records, the longest slot of each roll, ms.\n\n\
         | workers | connections | interval | reloads ok | max during reload | max no reload | added | p99 during \
         reload | p99 no reload | longest slot pause | longest staging | total_ms | errors |\n\
         |---:|---:|---:|---:|---|---|---|---|---|---|---|---|---:|"
    );
    for x in &s.reloads {
        let _ = writeln!(
            w,
            "| {} | {} | {} ms | {}/{}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.workers,
            group(x.connections),
            x.interval_ms,
            x.reloads_ok,
            x.reloads,
            if x.failed_workers.is_empty() {
                String::new()
            } else {
                format!(" (failed at slot {:?})", x.failed_workers)
            },
            ms(&x.during_reload.max_ms),
            ms(&x.without_reload.max_ms),
            ms(&x.above_no_reload_ms),
            ms(&x.during_reload.p99_ms),
            ms(&x.without_reload.p99_ms),
            show(&x.rolls.pause_ms, 3),
            ms(&x.rolls.stage_ms),
            ms(&x.rolls.total_ms),
            bold_if(x.errors)
        );
    }
}

/// Each slot's own pause, against one worker's.
fn slots(w: &mut String, s: &crate::workers::WorkersSection) {
    let one = roll(s, 1).and_then(|x| x.slots.first());
    let ratio = |a: &Option<Spread>, b: Option<&Option<Spread>>| match (a, b.and_then(|b| b.as_ref())) {
        (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2} ×", a.median / b.median),
        _ => "–".into(),
    };
    let _ = writeln!(
        w,
        "\nEach slot's handovers, from takeoverd's reload records, ms, median (min–max); \"÷ 1 worker\" divides the medians by \
         those of `--workers 1`'s one slot:\n\n\
         | workers | slot | handovers | connections handed over | pause | pause ÷ 1 worker | staging | staging ÷ 1 \
         worker |\n|---:|---:|---:|---|---|---:|---|---:|"
    );
    for x in &s.reloads {
        for sl in &x.slots {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                x.workers,
                sl.slot,
                sl.handovers,
                show(&sl.connections, 0),
                show(&sl.pause_ms, 3),
                ratio(&sl.pause_ms, one.map(|o| &o.pause_ms)),
                ms(&sl.stage_ms),
                ratio(&sl.stage_ms, one.map(|o| &o.stage_ms))
            );
        }
    }
    if let Some(g) = roll(s, 2).and_then(|x| x.gap_between_pauses_ms) {
        let _ = writeln!(
            w,
            "\nWith 2 workers, slot 1's old worker was told to stop {} ms (median (min–max), {} rolls) after slot 0's \
             new worker served: {}",
            g.show(2),
            g.n,
            if g.min >= 0.0 {
                "the two shares' pauses never overlapped; each share waited only while its own worker handed over."
            } else {
                "**in some rolls the two pauses overlapped** (a negative gap)."
            }
        );
    }
    halving(w, s);
}

/// Whether each ratio to one worker's is about a half or less.
fn halves(ratios: &[f64]) -> bool {
    ratios.iter().all(|x| *x <= 0.65)
}

/// Whether a slot's pause and staging halve with its share: each of the
/// two slots' medians against the one worker's.
fn halving(w: &mut String, s: &crate::workers::WorkersSection) {
    let (Some(one), Some(two)) = (roll(s, 1).and_then(|x| x.slots.first()), roll(s, 2)) else {
        return;
    };
    let ratios = |get: fn(&crate::workers::SlotPauses) -> Option<Spread>| -> Option<Vec<f64>> {
        let base = get(one)?.median;
        two.slots.iter().map(|sl| get(sl).map(|x| x.median / base)).collect::<Option<Vec<f64>>>()
    };
    let (Some(pause), Some(stage)) = (ratios(|sl| sl.pause_ms), ratios(|sl| sl.stage_ms)) else {
        return;
    };
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.2} ×")).collect::<Vec<_>>().join(" and ");
    let _ = writeln!(
        w,
        "
Each of the two slots hands over half the connections; its pause is {} one worker's, its staging {}. {}",
        list(&pause),
        list(&stage),
        match (halves(&pause), halves(&stage)) {
            (true, _) => "The pause halves with the share.",
            (false, true) => {
                "The pause does not halve with the share, the staging does: takeoverd registers a share with the new \
                 worker (the staging) while the old worker still serves, and stops the old one only then, so what \
                 grows with the connections handed over is the staging, not the pause."
            }
            (false, false) => "Neither halves with the share in this run.",
        }
    );
}

/// Echo cost, two workers against one.
fn echo(w: &mut String, s: &crate::workers::WorkersSection) {
    let _ = writeln!(
        w,
        "\nEcho cost (`--interval-ms 0`, pinned: both workers share the server's CPU):\n\n\
         | workers | connections | echoes/s | server CPU µs/echo | of which workers | server cores | client cores | \
         p50 µs | p99 µs | errors |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for e in &s.echo {
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            e.workers,
            group(e.connections),
            e.echoes_per_sec,
            e.server_cpu_us_per_echo,
            e.worker_cpu_us_per_echo,
            e.server_cores,
            e.client_cores,
            e.p50_us,
            e.p99_us,
            bold_if(e.errors)
        );
    }
    let _ = writeln!(
        w,
        "\nThe target compares CPU per echo. Echoes per second is shown but not compared: with one core for the \
         server and lock-step clients it follows whatever else runs on the machine (see the load average under \
         *Machine*), and it cannot show scaling here (above)."
    );
}

/// How the connects were shared out.
fn balance(w: &mut String, s: &crate::workers::WorkersSection) {
    let Some(b) = &s.balance else {
        return;
    };
    let shares: Vec<String> = b
        .shares
        .iter()
        .enumerate()
        .map(|(i, n)| format!("slot {i}: {n} ({:.1} %)", 100.0 * *n as f64 / b.held.max(1) as f64))
        .collect();
    let _ = writeln!(
        w,
        "\nBalance: {} connects to `--workers {}`; takeoverd held {}: {}; largest share {:.1} %; client errors {}.",
        group(b.connections),
        b.workers,
        group(b.held as u64),
        shares.join(", "),
        b.largest_share_pct,
        bold_if(b.errors)
    );
}
