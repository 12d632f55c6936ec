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
             errors (no systemd), the workers sharing them (`--workers`: at least 2, and at most 18 000 \
             connections each). takeoverd keeps open copies of at most `--max-open-connections` of them (its \
             default: its own soft RLIMIT_NOFILE less 1 024) and parks the others' copies in flight. Open-file \
             limit: {}.\n\n\
             Stopped by: {}\n\n\
             RSS per connection: the growth from takeoverd's start to every connection held, divided by the \
             connections (takeoverd; all the workers together), bytes.\n\n\
             | connections | workers | client processes | held | RSS per connection: takeoverd / workers | reloads ok | \
             worker SIGKILL recovered | handoff_ms | old_exit_ms | worst latency in a reload or kill window (ms) | \
             errors | result |\n\
             |---:|---:|---:|---:|---|---:|---|---|---|---:|---:|---|",
            sc.reached.map_or("none".into(), |n| n.to_string()),
            sc.fd_limit,
            sc.stopped_by
        );
        for st in &sc.steps {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {:.0} / {:.0} | {}/{} | {} | {} | {} | {:.1} | {} | {} |",
                st.connections,
                st.workers,
                st.client_processes,
                st.held,
                st.takeoverd_rss_per_conn_b,
                st.workers_rss_per_conn_b,
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
