//! Section 5 of BENCHMARKS.md: the scale ladder (and the churn section after it).

use std::fmt::Write as _;

use super::prelude::*;

/// ## 5. Scale (and the connection churn after it).
pub(super) fn write(w: &mut String, r: &Results) {
    let _ = writeln!(w, "\n## 5. Scale\n");
    if let Some(sc) = &r.scale {
        let _ = writeln!(
            w,
            "Reached: **{}** live connections surviving 3 rolling reloads and a SIGKILL of one worker with zero \
             errors, {} workers sharing them (`--workers`). Open-file limit: {}.\n\n\
             Stopped by: {}\n\n\
             | connections | client processes | held | reloads ok | worker SIGKILL recovered | handoff_ms | \
             old_exit_ms | worst latency in a reload or kill window (ms) | errors | result |\n\
             |---:|---:|---:|---:|---|---|---|---:|---:|---|",
            sc.reached.map_or("none".into(), |n| n.to_string()),
            sc.steps.first().map_or(0, |s| s.workers),
            sc.fd_limit,
            sc.stopped_by
        );
        for st in &sc.steps {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {}/{} | {} | {} | {} | {:.1} | {} | {} |",
                st.connections,
                st.client_processes,
                st.held,
                st.reloads_ok,
                st.reloads,
                if st.worker_kill_ok { "yes" } else { "no" },
                ms(&st.handoff_ms),
                ms(&st.old_exit_ms),
                st.worst_latency_ms,
                bold_if(st.errors),
                if st.ok { "pass".to_owned() } else { format!("**fail**: {}", st.failure.as_deref().unwrap_or("?")) }
            );
        }
    } else {
        let _ = writeln!(w, "Not run (`--quick`).");
    }

    crate::report_floor::churn(w, r);
}
