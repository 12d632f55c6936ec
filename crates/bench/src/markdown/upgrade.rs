//! Section 7 of BENCHMARKS.md: takeoverd upgrading itself in place.

use std::fmt::Write as _;

use super::prelude::*;

/// ## 7. In-place upgrade of takeoverd.
pub(super) fn write(w: &mut String, r: &Results) {
    if r.upgrade.is_empty() {
        return;
    }
    let _ = writeln!(w, "\n## 7. In-place upgrade of takeoverd (`ctl upgrade`)\n");
    let _ = writeln!(
        w,
        "takeoverd re-executes its binary (the same one here) while the clients run; the worker is never \
         stopped. Took = `ctl upgrade`'s own figure (request → the new image serving). Latency columns: the worst \
         100 ms row of each upgrade's window, in ms, median (min–max); \"no upgrade\" is the same windows of a run \
         without upgrades.\n"
    );
    let _ = writeln!(
        w,
        "| connections | placement | upgrades ok | took (ms) | pid kept | worker kept | max during upgrade | max no \
         upgrade | p99 during upgrade | p99 no upgrade | errors |\n|---:|---|---:|---|---|---|---|---|---|---|---:|"
    );
    for u in &r.upgrade {
        let _ = writeln!(
            w,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} |",
            u.connections,
            u.placement,
            u.upgrades_ok,
            u.upgrades,
            show(&u.took_ms, 2),
            yes_no(u.pid_unchanged),
            yes_no(u.worker_unchanged),
            ms(&u.during_upgrade.max_ms),
            ms(&u.without_upgrade.max_ms),
            ms(&u.during_upgrade.p99_ms),
            ms(&u.without_upgrade.p99_ms),
            bold_if(u.errors)
        );
    }
    let _ = writeln!(
        w,
        "\n100 upgrades in a row (a run of its own; the clients connected throughout):\n\n| connections | ok | seconds \
         | connections held before → after | takeoverd fds before → after | takeoverd RSS before → after (KiB) | \
         errors |\n|---:|---:|---:|---|---|---|---:|"
    );
    for u in &r.upgrade {
        if let Some(h) = &u.hundred {
            let _ = writeln!(
                w,
                "| {} | {}/100 | {:.1} | {} → {} | {} → {} | {} → {} | {} |",
                u.connections,
                h.ok,
                h.seconds,
                h.connections.0,
                h.connections.1,
                h.fds.0,
                h.fds.1,
                h.rss_kib.0,
                h.rss_kib.1,
                bold_if(h.errors)
            );
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "**no**"
    }
}
