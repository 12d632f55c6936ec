//! Section 4 of BENCHMARKS.md: memory with and without connections.

use std::fmt::Write as _;

use super::prelude::*;

/// ## 4. Memory.
pub(super) fn write(w: &mut String, r: &Results) {
    let _ = writeln!(w, "\n## 4. Memory\n");
    if let Some(mm) = &r.memory {
        let _ = writeln!(
            w,
            "| process | RSS, 0 connections | RSS, {n} idle | after a reload | per connection |\n|---|---:|---:|---:|---:|\n\
             | seqnum-worker | {} KiB | {} KiB | {} KiB (fresh worker) | {:.0} B ({:.0} B after the reload) |\n\
             | takeoverd | {} KiB | {} KiB | {} KiB | {:.0} B |\n\n\
             Kernel memory of the sockets themselves is not in RSS and not counted.",
            mm.worker_idle_kib,
            mm.worker_loaded_kib,
            mm.worker_after_reload_kib,
            mm.worker_bytes_per_conn,
            mm.worker_after_reload_bytes_per_conn,
            mm.takeoverd_idle_kib,
            mm.takeoverd_loaded_kib,
            mm.takeoverd_after_reload_kib,
            mm.takeoverd_bytes_per_conn,
            n = mm.connections
        );
    } else {
        let _ = writeln!(w, "Not measured.");
    }
}
