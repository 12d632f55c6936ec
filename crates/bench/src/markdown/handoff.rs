//! Section 1 of BENCHMARKS.md: reload handoff under live connections.

use std::fmt::Write as _;

use super::prelude::*;

/// ## 1. Reload handoff.
pub(super) fn write(w: &mut String, r: &Results) {
    let _ = writeln!(w, "## 1. Reload handoff\n");
    let _ = writeln!(
        w,
        "Median (min–max) over the reloads. Latency columns: the worst 100 ms row of each reload's window, in ms; \
         \"no reload\" is the same windows in a run without reloads.\n"
    );
    let _ = writeln!(
        w,
        "| connections | placement | interval | reloads ok | handoff_ms | old_exit_ms | p50 during reload | p99 during \
         reload | max during reload | p50 no reload | p99 no reload | max no reload | errors |\n\
         |---:|---|---:|---:|---|---|---|---|---|---|---|---|---:|"
    );
    for h in &r.handoff {
        let _ = writeln!(
            w,
            "| {} | {} | {} ms | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            h.connections,
            h.placement,
            h.interval_ms,
            h.reloads_ok,
            h.reloads,
            ms(&h.handoff_ms),
            ms(&h.old_exit_ms),
            ms(&h.during_reload.p50_ms),
            ms(&h.during_reload.p99_ms),
            ms(&h.during_reload.max_ms),
            ms(&h.without_reload.p50_ms),
            ms(&h.without_reload.p99_ms),
            ms(&h.without_reload.max_ms),
            bold_if(h.errors)
        );
    }
    crate::report_floor::reload_pause(w, r);
    crate::report_floor::reload_phases(w, r);
    let _ = writeln!(w, "\nWhole-run client figures (µs):\n");
    let _ =
        writeln!(w, "| connections | run | echoed | p50 | p99 | max | errors |\n|---:|---|---:|---:|---:|---:|---:|");
    for h in &r.handoff {
        for (name, c) in [("with reloads", &h.client_reload_run), ("without", &h.client_baseline_run)] {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} |",
                h.connections,
                name,
                c.echoed,
                c.p50_us,
                c.p99_us,
                c.max_us,
                bold_if(c.errors)
            );
        }
    }
}
