//! Section 3 of BENCHMARKS.md: what an echo costs, takeoverd beside the floor.

use std::fmt::Write as _;

use super::prelude::*;

/// ## 3. Echo cost.
pub(super) fn write(w: &mut String, r: &Results) {
    let _ = writeln!(w, "\n## 3. Echo cost\n");
    let _ = writeln!(
        w,
        "`--interval-ms 0`. Server CPU = takeoverd + worker. *pinned*: server on one core, client on the other; \
         *shared*: no pinning. CPU use is in cores (1.0 = one core busy). p50/p99 are the client's whole-run \
         figures.\n\n\
         | connections | placement | echoes/s | server CPU µs/echo | of which worker | client CPU µs/echo | server \
         cores | client cores | p50 µs | p99 µs | errors |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for e in &r.echo {
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            e.connections,
            e.placement,
            e.echoes_per_sec,
            e.server_cpu_us_per_echo,
            e.worker_cpu_us_per_echo,
            e.client_cpu_us_per_echo,
            e.server_cores,
            e.client_cores,
            e.p50_us,
            e.p99_us,
            bold_if(e.errors)
        );
    }

    crate::report_floor::echo_floor(w, r);
}
